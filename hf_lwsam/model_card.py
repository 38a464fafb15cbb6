"""Model cards for models trained with `LWSAMTrainer`: Hub metadata plus the SAM mode that ran, results and throughput.

The card is rendered by `huggingface_hub.ModelCard.from_template` from the Jinja template
`hf_lwsam/templates/model_card.md.j2` (the only copy, shipped as package data); the YAML front matter is a
`huggingface_hub.ModelCardData`, so `model-index` follows the Hub's schema.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .config import sam_option_docs
from .modes import mode_description, sam_mode
from .selection_rules import SELECTION_RULES

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md.j2"
CARD_TAGS = ("hf-lwsam", "sharpness-aware-minimization")  # every card; plus the mode's tag (`mode_tags`)
MAX_LAYER_GROUPS = 16  # rows of the perturbed-modules table; the rest are counted in one line

# The papers of the modes, by key (`citations`): BibTeX entry type, key and fields (the arXiv id is added).
PAPERS = {
    "sam": ("inproceedings", "foret2021sharpnessaware", "2010.01412", {
        "title": "Sharpness-aware Minimization for Efficiently Improving Generalization",
        "author": "Foret, Pierre and Kleiner, Ariel and Mobahi, Hossein and Neyshabur, Behnam",
        "booktitle": "International Conference on Learning Representations (ICLR)", "year": "2021"}),
    "layer-wise": ("inproceedings", "lee2024layerwise", "2503.14205", {
        "title": "Layer-wise Adaptive Gradient Norm Penalizing Method for Efficient and Accurate Deep Learning",
        "author": "Lee, Sunwoo",
        "booktitle": "Proceedings of the 30th ACM SIGKDD Conference on Knowledge Discovery and Data Mining (KDD '24)",
        "year": "2024"}),
    "momentum": ("misc", "becker2024momentumsam", "2401.12033", {
        "title": "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead",
        "author": "Becker, Marlon and Altrock, Frederick and Risse, Benjamin", "year": "2024"}),
}


def _bibtex(key: str) -> str:
    kind, name, arxiv, fields = PAPERS[key]
    fields = {**fields, "eprint": arxiv, "archivePrefix": "arXiv", "url": f"https://arxiv.org/abs/{arxiv}"}
    return "\n".join([f"@{kind}{{{name},", *(f"  {k:<9} = {{{v}}}," for k, v in fields.items())])[:-1] + "\n}"


# Hub pipeline tags and model-index task types by CLI task.
PIPELINE_TAGS = {"classification": "text-classification", "causal_lm": "text-generation"}
METRIC_NAMES = {"accuracy": "Accuracy", "f1": "Macro F1", "perplexity": "Perplexity", "loss": "Loss"}


@dataclass
class ModelCardInfo:
    r"""
    What the card says about a run, beyond what the trainer knows.

    Parameters:
        task (`str`): `"classification"` or `"causal_lm"`.
        base_model (`str`): the Hub id or local path of the model that was fine-tuned.
        base_model_is_hub_id (`bool`): whether `base_model` is a Hub id (then it goes into the `base_model` metadata;
            a local path is named in the text by its folder name only).
        dataset_ids (`list[str]`): Hub dataset ids for the `datasets` metadata (local paths are left out).
        dataset_description (`str`): a short human-readable description of the training data.
        num_train_examples / num_eval_examples (`int`): examples (blocks for causal LM) used.
        labels (`list[str]`, *optional*): class names (classification).
        max_length (`int`, *optional*): truncation length; for causal LM outside TRL's SFT, the block size the texts
            are packed into (`data_preparation`).
        lora (`dict`, *optional*): LoRA settings when a PEFT adapter was trained.
        metric_source (`str`): where the `evaluate` metrics came from.
        repo_id (`str`, *optional*): where the model is pushed (used in the usage snippet).
        throughput (`dict`): `train_runtime`, `tokens_per_second`, `sam_overhead` (the SAM step's time over a plain
            step's), `plain_steps` (the SAM steps timed both ways) and `sam_steps` (the run's SAM steps).
        train_loss (`float`, *optional*): the run's `train_loss`; by default the one the trainer logged last.
    """

    task: str
    base_model: str
    base_model_is_hub_id: bool = False
    dataset_ids: list[str] = field(default_factory=list)
    dataset_description: str = "a custom dataset"
    num_train_examples: int = 0
    num_eval_examples: int = 0
    labels: list[str] | None = None
    max_length: int | None = None
    lora: dict[str, Any] | None = None
    metric_source: str = ""
    repo_id: str | None = None
    throughput: dict[str, Any] = field(default_factory=dict)
    train_loss: float | None = None


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    return value


def _option_value(name: str, value: Any, args: Any) -> Any:
    """A `sam_*` option's value as the card shows it (an unset layer pattern of the pattern selection is the
    output-side default)."""
    if name == "sam_target_layers" and value is None:
        return SELECTION_RULES[args.sam_selection].target_layers_unset
    return value


def is_hub_id(name: str) -> bool:
    """Whether `name` is a Hub repo id (`name` or `org/name`, as `huggingface_hub` validates it) and no local path:
    only such names may go into the card's `base_model` and `datasets` metadata, which the Hub checks on upload."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not os.path.exists(name)


def perturbed_layers(trainer: Any) -> tuple[list[str], int]:
    """The modules (in parameter order) and the parameter count that `trainer` perturbs."""
    sizes = _layer_sizes(trainer)
    return list(sizes), sum(sizes.values())


def _layer_sizes(trainer: Any) -> dict[str, int]:
    """Parameters per perturbed module of `trainer`, in parameter order."""
    params, sizes = dict(trainer.model.named_parameters()), {}
    for name in trainer.perturbed_parameter_names():
        module = name.rsplit(".", 1)[0]
        sizes[module] = sizes.get(module, 0) + (params[name].numel() if name in params else 0)
    return sizes


def hub_base_model(info: ModelCardInfo) -> str | None:
    """The Hub id the card names as its base model (`info.base_model` when it is one), or `None` for a local model."""
    return info.base_model if info.base_model_is_hub_id and is_hub_id(info.base_model) else None


def name_adapter_base_model(model: Any, output_dir: str | Path, info: ModelCardInfo) -> None:
    """Name the card's Hub base model as `base_model_name_or_path` in the `adapter_config.json` of each PEFT adapter
    of `model` saved in `output_dir`. A model the card names by its Hub id may have been loaded from a local copy (the
    CLIs' offline defaults load the shipped SmolLM2 and MiniLM), whose path PEFT records; a local model keeps its path.
    The file is edited after PEFT wrote it: with the Hub id in memory, PEFT would look the model up on the Hub at
    every save."""
    hub_id = hub_base_model(info)
    for name in (getattr(model, "peft_config", None) or {}) if hub_id else ():
        path = Path(output_dir) / ("" if name == "default" else name) / "adapter_config.json"  # PEFT's layout
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config["base_model_name_or_path"] = hub_id
            path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")  # as PEFT writes it


def _index_span(values: list[int]) -> str:
    """`7`, `[0-29]` (a contiguous run), `[0,4,9]` (up to 4 values) or `*`."""
    values = sorted(set(values))
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"[{values[0]}-{values[-1]}]"
    return "[" + ",".join(map(str, values)) + "]" if len(values) <= 4 else "*"


def layer_groups(layers: list[str], sizes: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """The perturbed modules grouped by name pattern (each numeric part of a dotted name is an index): one entry per
    pattern, in first-seen order, with `pattern` (the indices shown as `7`, `[0-29]`, ...), `count` (modules) and
    `parameters` (their parameter count, from `sizes`: module name -> parameters).

    A module that no other module shares its pattern with keeps its own name: the default output-side selection is
    listed name by name, the 420 LoRA tensors of every layer of a 30-layer model as 14 patterns.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for layer in layers:
        parts = layer.split(".")
        key = tuple(None if p.isdigit() else p for p in parts)
        group = groups.setdefault(key, {"indices": [[] for p in parts if p.isdigit()], "count": 0, "parameters": 0})
        for slot, value in zip(group["indices"], (int(p) for p in parts if p.isdigit())):
            slot.append(value)
        group["count"] += 1
        group["parameters"] += (sizes or {}).get(layer, 0)
    rows = []
    for key, group in groups.items():
        spans = iter(_index_span(values) for values in group["indices"])
        pattern = ".".join(part if part is not None else next(spans) for part in key)
        rows.append({"pattern": pattern, "count": group["count"], "parameters": f"{group['parameters']:,}"})
    return rows


def data_preparation(trainer: Any, info: ModelCardInfo) -> str | None:
    """What the data collator (and TRL's dataset preparation) made of the texts, read from the run's config: packing
    into blocks, or truncation and per-batch padding, and which tokens the loss is on."""
    args, length = trainer.args, info.max_length
    if hasattr(args, "packing"):  # TRL's SFTConfig
        if args.packing:
            text = f"examples packed into sequences of {length} tokens (TRL packing, `{args.packing_strategy}`)"
        else:
            text = (f"each example truncated to its first {length} tokens" if length else "examples kept whole") + (
                ", each batch flattened into one sequence without padding" if getattr(trainer, "padding_free", False)
                else ", each batch padded to its longest example (no packing)")
        columns = getattr(trainer.train_dataset, "column_names", None) or ["completion_mask"]  # unknown: the flag
        completion_only = getattr(trainer, "completion_only_loss", False) and "completion_mask" in columns
        loss = ("the completion only" if completion_only else
                "the assistant turns only" if getattr(args, "assistant_only_loss", False) else "every token")
        return f"{text}; loss on {loss}"
    if info.task == "causal_lm":
        return f"texts concatenated and cut into blocks of {length} tokens; loss on every token"
    if length:
        return f"each text truncated to {length} tokens, each batch padded to its longest text"
    return None


def citations(args: Any) -> list[str]:
    """BibTeX of the method that ran: layer-wise SAM (Lee, KDD 2024) for a layer-wise selection, Momentum-SAM (Becker
    et al.) for the momentum ascent, SAM (Foret et al., ICLR 2021) otherwise."""
    keys = ["layer-wise"] if SELECTION_RULES[args.sam_selection].layer_wise else []
    keys.append("momentum" if args.sam_ascent == "momentum" else "sam")
    return [_bibtex(key) for key in keys]


def mode_tags(args: Any) -> list[str]:
    """The card's tags for the mode that ran."""
    tags = ["layer-wise-sam"] if SELECTION_RULES[args.sam_selection].layer_wise else []
    return tags + (["momentum-sam"] if args.sam_ascent == "momentum" else [])


def final_eval_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged evaluation metrics, without the `eval_` prefix and the runtime counters."""
    for entry in reversed(log_history):
        if any(k.startswith("eval_") for k in entry):
            skip = ("runtime", "samples_per_second", "steps_per_second")
            return {k[5:]: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(skip)}
    return {}


def results_table(log_history: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per evaluation: the latest training loss, epoch, step and the eval metrics (as `TrainingSummary`)."""
    rows, train_loss, metric_names = [], "No log", []
    for entry in log_history:
        if "loss" in entry:
            train_loss = _fmt(entry["loss"])
        metrics = {k: v for k, v in entry.items() if k.startswith("eval_")}
        if not metrics:
            continue
        row = {"Training Loss": train_loss, "Epoch": _fmt(entry.get("epoch")), "Step": entry.get("step")}
        for key, value in metrics.items():
            if key.endswith(("runtime", "samples_per_second", "steps_per_second")):
                continue
            short = key[len("eval_"):]
            name = "Validation Loss" if short == "loss" else METRIC_NAMES.get(short, short.replace("_", " ").title())
            if name not in metric_names:
                metric_names.append(name)
            row[name] = _fmt(value)
        rows.append(row)
    return ["Training Loss", "Epoch", "Step", *metric_names], rows


def _hyperparameters(args: Any, world_size: int) -> dict[str, Any]:
    total = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(world_size, 1)
    values = {
        "learning_rate": args.learning_rate,
        "train_batch_size": args.per_device_train_batch_size,
        "eval_batch_size": args.per_device_eval_batch_size,
        "seed": args.seed,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": total,
        "optimizer": getattr(args.optim, "value", args.optim),
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "num_epochs": args.num_train_epochs if args.max_steps <= 0 else None,
        "training_steps": args.max_steps if args.max_steps > 0 else None,
        "mixed_precision": "bf16" if args.bf16 else ("fp16" if args.fp16 else None),
        "num_devices": world_size if world_size > 1 else None,
    }
    return {k: v for k, v in values.items() if v is not None}


def _versions(lora: bool) -> dict[str, str]:
    import datasets
    import torch
    import transformers

    from . import __version__

    versions = {"hf_lwsam": __version__, "Transformers": transformers.__version__, "PyTorch": torch.__version__,
                "Datasets": datasets.__version__}
    if lora:
        import peft

        versions["PEFT"] = peft.__version__
    versions["Python"] = platform.python_version()
    return versions


def _usage_snippet(info: ModelCardInfo, repo: str) -> str:
    if info.lora:
        auto = "AutoPeftModelForSequenceClassification" if info.task == "classification" else "AutoPeftModelForCausalLM"
        return (f"from peft import {auto}\nfrom transformers import AutoTokenizer\n\n"
                f'model = {auto}.from_pretrained("{repo}")\ntokenizer = AutoTokenizer.from_pretrained("{repo}")')
    if info.task == "classification":
        return (f'from transformers import pipeline\n\nclassifier = pipeline("text-classification", model="{repo}")\n'
                'print(classifier("I love this!"))')
    return (f'from transformers import pipeline\n\ngenerator = pipeline("text-generation", model="{repo}")\n'
            'print(generator("To be, or not to be", max_new_tokens=40)[0]["generated_text"])')


def build_model_card(trainer: Any, info: ModelCardInfo, model_name: str) -> ModelCard:
    """Render the card of `trainer`'s run.

    Args:
        trainer ([`LWSAMTrainer`]): the trainer (its `args`, `state.log_history` and perturbed parameters are used).
        info ([`ModelCardInfo`]): what the trainer does not know (base model, data, throughput, ...).
        model_name (`str`): the card's title and `model-index` name.
    """
    args, log_history = trainer.args, trainer.state.log_history
    layers, num_params = perturbed_layers(trainer)
    eval_metrics = final_eval_metrics(log_history)
    task_type = PIPELINE_TAGS[info.task]
    dataset_ids = [name for name in info.dataset_ids if is_hub_id(name)]
    base_is_hub_id = hub_base_model(info) is not None
    dataset_type = dataset_ids[0] if dataset_ids else "custom"
    eval_results = [
        EvalResult(task_type=task_type, dataset_type=dataset_type, dataset_name=info.dataset_description,
                   metric_type=key, metric_name=METRIC_NAMES[key], metric_value=float(eval_metrics[key]))
        for key in ("accuracy", "f1", "perplexity") if key in eval_metrics and math.isfinite(eval_metrics[key])
    ]
    card_data = ModelCardData(
        library_name="peft" if info.lora else "transformers",
        base_model=info.base_model if base_is_hub_id else None,
        datasets=dataset_ids or None,
        tags=[*CARD_TAGS, *mode_tags(args), *(["lora", "peft"] if info.lora else []), task_type],
        pipeline_tag=task_type,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    columns, rows = results_table(log_history)
    train_loss = info.train_loss
    if train_loss is None:
        train_loss = next((entry["train_loss"] for entry in reversed(log_history) if "train_loss" in entry), None)
    world_size = getattr(getattr(trainer, "accelerator", None), "num_processes", 1)
    groups = layer_groups(layers, _layer_sizes(trainer))
    sam = {
        # one row per `sam_*` option, in the order and with the names of LWSAMConfigMixin's fields
        "options": [(o["name"], _option_value(o["name"], getattr(args, o["name"], o["default"]), args))
                    for o in sam_option_docs()],
        "mode": sam_mode(args),
        "preset": getattr(args, "sam_preset", None),
        "description": mode_description(args, getattr(getattr(trainer, "_ascent", None), "source", None)),
        "rho": args.sam_rho,
        "groups": groups[:MAX_LAYER_GROUPS],
        "more_groups": len(groups[MAX_LAYER_GROUPS:]),
        "more_modules": sum(group["count"] for group in groups[MAX_LAYER_GROUPS:]),
        "num_layers": len(layers),
        "num_parameters": f"{num_params:,}",
    }
    throughput = {"train_runtime": None, "tokens_per_second": None, "sam_overhead": None, "device": None,
                  **{k: _fmt(v) for k, v in info.throughput.items()}}
    lora = info.lora or {}
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        base_model=info.base_model if base_is_hub_id else Path(info.base_model).name,
        base_model_url=f"https://huggingface.co/{info.base_model}" if base_is_hub_id else None,
        dataset_description=info.dataset_description,
        task=info.task.replace("_", "-"),
        task_description={"classification": "sequence classification", "causal_lm": "causal language modelling"}[
            info.task],
        num_train_examples=info.num_train_examples,
        num_eval_examples=info.num_eval_examples,
        data_preparation=data_preparation(trainer, info),
        labels=info.labels,
        use_lora=bool(info.lora),
        lora_r=lora.get("r"), lora_alpha=lora.get("alpha"), lora_dropout=lora.get("dropout"),
        lora_target_modules=lora.get("target_modules") or "PEFT default for the architecture",
        eval_results={METRIC_NAMES.get(k, k): _fmt(v) for k, v in eval_metrics.items()},
        sam=sam,
        hyperparameters=_hyperparameters(args, world_size),
        train_loss=_fmt(train_loss),
        results_columns=columns,
        results_table=rows,
        throughput=throughput,
        metric_source=info.metric_source,
        usage_snippet=_usage_snippet(info, info.repo_id or model_name),
        versions=_versions(bool(info.lora)),
        citations=citations(args),
    )


def write_model_card(trainer: Any, info: ModelCardInfo, output_dir: str | Path, model_name: str) -> Path:
    """Render the card and write it to `output_dir/README.md`; returns the path."""
    path = Path(output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(trainer, info, model_name).save(path)
    return path
