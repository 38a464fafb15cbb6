"""`hf-lwsam-train` (also `python scripts/train.py`): fine-tune a model with layer-wise SAM from the command line.

Sequence classification or causal language modelling, any Hub model or local directory, Hub datasets or local files,
optional LoRA, evaluation through `evaluate`, a model card in `output_dir/README.md` and `--push_to_hub`. With no model
or data flags it fine-tunes the shipped all-MiniLM-L6-v2 on the shipped tweets, offline, in ~2 minutes on 2 CPU cores.

    hf-lwsam-train                                         # the embedded offline default
    hf-lwsam-train config.yaml --learning_rate 3e-5        # a YAML/JSON config, flags override it
    accelerate launch -m hf_lwsam.cli.train --model_name_or_path ... --dataset_name ...
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from ..model_card import ModelCardInfo
from ..trainer import LWSAMTrainer
from .args import DataArguments, ModelArguments, UsageError, brief, parse_args
from .core import (
    CAUSAL_SUFFIXES,
    ModelCardMixin,
    add_peft_adapter,
    check_model_config,
    check_sam_layers,
    hub_kwargs,
    load_model_config,
    load_tokenizer,
    lora_card,
    quiet_datasets,
    weightless_model,
)
from .data import (
    check_label_cells,
    check_texts,
    load_raw_data,
    pack_for_causal_lm,
    prepare_labels,
    resolve_columns,
    tokenize_for_classification,
)
from .lifecycle import Command, console_main, run_command
from .metrics import causal_lm_metrics, classification_metrics, describe_metrics
from .speed import ThroughputMixin, speed_rows

logger = logging.get_logger("hf_lwsam.cli.train")

EMBEDDED_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class CLITrainer(ModelCardMixin, ThroughputMixin, LWSAMTrainer):
    r"""
    [`LWSAMTrainer`] for the script: writes the LW-SAM model card ([`ModelCardMixin`]), adds `perplexity` to causal-LM
    evaluations, and counts the tokens it trains on and times a few SAM steps against plain ones ([`ThroughputMixin`]).

    Args:
        card_info ([`ModelCardInfo`]): what the card says about the run beyond the trainer's own state.
        card_name (`str`): the card's title.
        *other arguments*: as for [`ThroughputMixin`] and [`LWSAMTrainer`].
    """

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.card_info.task == "causal_lm":
            from .metrics import add_perplexity

            for key in [k for k in logs if k.endswith("_loss") and k != "loss"]:
                add_perplexity(logs, prefix=key[: -len("_loss")])
        super().log(logs, start_time)


# ------------------------------------------------------------------------------------------------ model loading
def resolve_task(task: str | None, config: Any, label_column: str | None, name: str) -> str:
    """The explicit `--task`, else classification for labelled data, else causal LM for a causal-LM model."""
    if task is not None:
        return task
    if label_column is not None:
        return "classification"
    if any(arch.endswith(CAUSAL_SUFFIXES) for arch in (config.architectures or [])):
        return "causal_lm"
    raise UsageError(f"cannot tell the task: the data has no label column and {name!r} is not a causal LM; pass "
                     "--label_column NAME for classification, or --task causal_lm with a causal LM.")


def load_model(name: str, config: Any, task: str, model_args: ModelArguments, labels: list[str] | None,
               tokenizer: Any, skeleton: bool = False) -> Any:
    """The model (with its LoRA adapter); `skeleton=True` builds it from `config` on the meta device instead, with
    no weights loaded, to check the LoRA and LW-SAM layer names first."""
    label_kwargs: dict[str, Any] = {} if task != "classification" else {
        "num_labels": len(labels), "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)}}
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        if skeleton:
            config = copy.deepcopy(config)
            for key, value in label_kwargs.items():
                setattr(config, key, value)
            model = weightless_model(auto, config, model_args.trust_remote_code, model_args.model_revision)
        else:
            model = auto.from_pretrained(name, **hub_kwargs(model_args.trust_remote_code, model_args.model_revision),
                                         **label_kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(f"{name!r} cannot be loaded for {task}: {brief(str(e))}") from None
    if task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.use_peft:
        with warnings.catch_warnings():  # PEFT's notes are shown once, for the real model, not for its copy
            if skeleton:
                warnings.simplefilter("ignore")
            model = _add_lora(model, task, model_args)
    return model


def _add_lora(model: Any, task: str, model_args: ModelArguments) -> Any:
    from peft import LoraConfig, TaskType

    targets = model_args.lora_target_modules
    if targets is not None and len(targets) == 1:
        targets = targets[0]  # one value: a regex or 'all-linear', as in PEFT
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=targets,
    )
    return add_peft_adapter(model, config)


# ------------------------------------------------------------------------------------------------ checks
def _limit(split: Any, n: int | None) -> Any:
    return split if n is None else split.select(range(min(n, len(split))))


def _max_length(data_args: DataArguments, tokenizer: Any, config: Any, task: str) -> int:
    if data_args.max_length is not None:
        return data_args.max_length
    limits = [512 if task == "classification" else 1024, tokenizer.model_max_length]
    limits += [v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(config, k, None), int)]
    return min(limits)


# --------------------------------------------------------------------------------------------------------- main
def check_best_metric(metric: str | None, names: list[str]) -> None:
    """`--metric_for_best_model` must name a metric the evaluations report (the loss or one of `names`), else the
    Trainer fails with a `KeyError` at the first evaluation, after training started."""
    known = ["loss", *names]
    if metric is not None and metric.removeprefix("eval_") not in known:
        raise UsageError(f"--metric_for_best_model {metric!r} is not a metric the evaluations report: pass one of "
                         f"{known}.")


class TrainCommand(Command):
    """`hf-lwsam-train`'s part of the lifecycle ([`run_command`]): the model, data, trainer, evaluation and report."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments, args: Any, embedded: bool):
        options = {f.name for parsed in (model_args, data_args, args) for f in fields(parsed)}
        super().__init__("hf-lwsam-train", args, args, options)
        self.model_args, self.data_args, self.embedded = model_args, data_args, embedded

    def prepare(self, output_dir: Path) -> ModelCardInfo:
        model_args, data_args, args = self.model_args, self.data_args, self.args
        name, config, is_hub = load_model_config(model_args.model_name_or_path, model_args.trust_remote_code,
                                                 model_args.model_revision)
        check_model_config(config, name, model_args.task, data_args.max_length)
        with quiet_datasets():
            raw = load_raw_data(data_args, self.embedded, args.seed)
            if args.do_predict and "test" not in raw.splits:
                raise UsageError("--do_predict needs a test split and the data has none: pass --test_file PATH, or "
                                 "drop --do_predict.")
            text_column, label_column = resolve_columns(raw.splits, data_args.text_column, data_args.label_column)
            task = resolve_task(model_args.task, config, label_column if model_args.task != "causal_lm" else None,
                                name)
            if task == "classification" and label_column is None:
                raise UsageError(f"--task classification needs labels and the data has none of the default label "
                                 f"columns: pass --label_column with one of {raw.splits['train'].column_names}.")
            if task == "classification":
                check_label_cells(raw, label_column)  # a data file's rows without a label, by row number
            if task == "causal_lm":
                check_model_config(config, name, task, data_args.max_length)
            splits = raw.splits
            splits["train"] = _limit(splits["train"], data_args.max_train_samples)
            if not args.do_predict and "test" in splits:
                del splits["test"]  # only evaluated with --do_predict
            for split in ("validation", "test"):
                if split in splits:
                    splits[split] = _limit(splits[split], data_args.max_eval_samples)
            labels = None
            if task == "classification":
                splits, labels = prepare_labels(splits, label_column)
            check_texts(splits, text_column)
        tokenizer = load_tokenizer(name, model_args.trust_remote_code, model_args.model_revision)
        max_length = _max_length(data_args, tokenizer, config, task)
        with args.main_process_first(desc="dataset preprocessing"), quiet_datasets():
            if task == "classification":
                splits = tokenize_for_classification(splits, tokenizer, text_column, max_length,
                                                     data_args.preprocessing_num_workers)
                collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if args.fp16 or args.bf16 else None)
                compute_metrics, metric_names = classification_metrics()
                preprocess = None
            else:
                splits = pack_for_causal_lm(splits, tokenizer, text_column, max_length,
                                            data_args.preprocessing_num_workers)
                collator = default_data_collator
                compute_metrics, preprocess, metric_names = causal_lm_metrics()
        for split, rows in splits.items():
            if len(rows) == 0:
                raise UsageError(f"the {split} split has no rows left after dropping empty texts: pass data with "
                                 "non-empty texts, a larger --max_train_samples/--max_eval_samples, or for causal LM "
                                 "a smaller --max_length.")
        check_best_metric(args.metric_for_best_model, metric_names)
        # The LoRA and LW-SAM layer names are checked on a weightless copy, so a bad name fails before the weights load.
        check_sam_layers(load_model(name, config, task, model_args, labels, tokenizer, skeleton=True), args)
        self.model = load_model(name, config, task, model_args, labels, tokenizer)
        self.splits, self.tokenizer, self.task = splits, tokenizer, task
        self.trainer_kwargs = {"data_collator": collator, "compute_metrics": compute_metrics,
                               "preprocess_logits_for_metrics": preprocess}
        return ModelCardInfo(
            task=task, base_model=EMBEDDED_BASE_MODEL if model_args.model_name_or_path is None else name,
            base_model_is_hub_id=is_hub or model_args.model_name_or_path is None, dataset_ids=raw.dataset_ids,
            dataset_description=raw.description, num_train_examples=len(splits["train"]),
            num_eval_examples=len(splits["validation"]), labels=labels, max_length=max_length,
            metric_source=describe_metrics(metric_names), lora=lora_card(model_args),
        )

    def build_trainer(self, **common: Any) -> CLITrainer:
        return CLITrainer(model=self.model, train_dataset=self.splits["train"], eval_dataset=self.splits["validation"],
                          processing_class=self.tokenizer, **self.trainer_kwargs, **common)

    def evaluate(self, trainer: CLITrainer) -> dict[str, float]:
        metrics = trainer.evaluate()
        if self.args.do_predict and "test" in self.splits:
            metrics.update(trainer.evaluate(self.splits["test"], metric_key_prefix="test"))
        return metrics

    def summary_rows(self, trainer: CLITrainer, metrics: dict[str, Any], info: ModelCardInfo) -> dict[str, str]:
        """The task metrics, train time, tokens/s and the step-time ratio."""
        nan = float("nan")
        if self.task == "classification":
            rows = {"eval accuracy": f"{metrics.get('eval_accuracy', nan):.4f}",
                    "eval macro-F1": f"{metrics.get('eval_f1', nan):.4f}"}
        else:
            rows = {"eval perplexity": f"{metrics.get('eval_perplexity', nan):.2f}",
                    "eval token accuracy": f"{metrics.get('eval_accuracy', nan):.4f}"}
        rows.update(speed_rows(trainer, info, "examples" if self.task == "classification" else "blocks"))
        rows["metrics"] = info.metric_source
        return rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, validate, train (resuming from the last checkpoint in `output_dir`), evaluate, save (with card) and
    optionally push ([`run_command`]); returns the final metrics. Raises `UsageError` for bad input before anything
    is written, and `Preempted` after a SIGTERM checkpoint."""
    model_args, data_args, args, embedded = parse_args(argv)
    transformers.utils.logging.enable_explicit_format()
    set_seed(args.seed)
    return run_command(TrainCommand(model_args, data_args, args, embedded))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: returns 0 on success, 2 on bad input and 143 (128 + SIGTERM) when preempted, each with
    one line on stderr."""
    return console_main("hf-lwsam-train", run, argv)


if __name__ == "__main__":
    sys.exit(main())
