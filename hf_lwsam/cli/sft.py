"""`hf-lwsam-sft` (also `python scripts/sft.py`): supervised fine-tuning with TRL's `SFTTrainer` and layer-wise SAM.

TRL's `trl sft` script with the `--sam_*` flags: TRL's parser (`TrlParser`, `--config file.yaml`), `ScriptArguments`
(`--dataset_name`, splits), `SFTConfig` (every SFT flag and default) and `ModelConfig` (`--model_name_or_path`,
`--use_peft`, `--lora_r`, ...). Like `hf-lwsam-train` it resumes from the last checkpoint in `--output_dir`, saves a
checkpoint and exits 143 on SIGTERM, writes the final model and the LW-SAM model card to a temporary folder renamed
into place (`all_results.json` last), pushes with `--push_to_hub`, and reports bad input as one line with exit 2.

With no model and no dataset it runs offline (`sft_offline.py`): a LoRA SFT of the shipped SmolLM2-135M-Instruct on
tweet sentiment as a chat in its chat template, with the held-out answer accuracy before and after training.

    hf-lwsam-sft                                                          # the offline default
    hf-lwsam-sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --sam_rho 0.05 --use_peft
    accelerate launch -m hf_lwsam.cli.sft --config sft.yaml
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..model_card import ModelCardInfo, write_model_card
from .args import UsageError
from .lifecycle import console_main, save_final, take_output_dir, train_resumably
from .output import plan_output_dir
from .sft_offline import EMBEDDED_DEFAULTS
from .train import check_sam_layers

logger = logging.get_logger("hf_lwsam.cli.sft")

PROG = "hf-lwsam-sft"
@dataclass
class RunArguments:
    """What the script adds to TRL's flags."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: remove a previous run's checkpoints and results (only those)."}
    )


def make_parser():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..trl import SFTLWSAMConfig

    parser = TrlParser((ScriptArguments, SFTLWSAMConfig, ModelConfig, RunArguments), prog=PROG)

    def one_line_error(message: str) -> None:
        raise UsageError(message.splitlines()[-1] if message else "invalid arguments")

    parser.error = one_line_error
    return parser


def parse_args(argv: list[str] | None = None):
    """`(script_args, training_args, model_args, run_args, embedded)`; `embedded` when no model and no dataset were
    given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    embedded = not ({"model_name_or_path", "dataset_name", "config"} & given)
    if not embedded and "config" not in given and len({"model_name_or_path", "dataset_name"} & given) == 1:
        missing = "--dataset_name" if "model_name_or_path" in given else "--model_name_or_path"
        raise UsageError(f"{missing} is missing: pass both --model_name_or_path and --dataset_name, or neither for "
                         "the offline default.")
    if embedded:
        parser.set_defaults(**{k: v for k, v in EMBEDDED_DEFAULTS.items() if k not in given})
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or not Path(argv[i + 1]).is_file():
            raise UsageError("--config needs an existing YAML file: pass --config path/to/sft.yaml.")
    try:
        with warnings.catch_warnings():  # transformers' deprecation notes on TRL's own defaults are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            script_args, training_args, model_args, run_args = parser.parse_args_and_config(argv)
    except ValueError as e:  # a config's own validation (SFTConfig, the sam_* options), or a malformed YAML
        raise UsageError(" ".join(str(e).split())) from None
    if not embedded and (model_args.model_name_or_path is None or script_args.dataset_name is None):
        missing = "--model_name_or_path" if model_args.model_name_or_path is None else "--dataset_name"
        raise UsageError(f"{missing} is missing (in --config or as a flag): pass both, or neither for the offline "
                         "default.")
    return script_args, training_args, model_args, run_args, embedded


def skeleton_model(model_args: Any) -> Any:
    """The model built from its config on the meta device (no weights): layer names to check the sam_* patterns."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = model_args.model_name_or_path
    remote = getattr(model_args, "trust_remote_code", False)  # TRL 1.16's ModelConfig no longer has the field
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=remote)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model_name_or_path {name!r} could not be loaded ({' '.join(str(e).split())[:200]}): pass "
                         "a Hub model id or a local model directory.") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)


def load_data(script_args: Any) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(script_args.dataset_name, name=script_args.dataset_config)
    except Exception as e:  # the datasets library raises many types; the user needs the cause in one line
        cause = e.__cause__ or e
        raise UsageError(f"--dataset_name {script_args.dataset_name!r} could not be loaded "
                         f"({type(cause).__name__}: {' '.join(str(cause).split())[:200]}): pass a Hub dataset id or a "
                         "local dataset directory.") from None


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, validate, train (resuming from the last checkpoint in `output_dir`), evaluate, save (with card) and
    optionally push; returns the final metrics."""
    from trl import get_peft_config

    from ..trl import SFTLWSAMTrainer
    from . import sft_offline

    script_args, args, model_args, run_args, embedded = parse_args(argv)
    logging.set_verbosity(args.get_process_log_level())
    output_dir = Path(args.output_dir).expanduser().resolve()
    plan = plan_output_dir(output_dir, run_args.overwrite_output_dir, args.resume_from_checkpoint)
    if embedded:
        model, tokenizer, data, held_out = sft_offline.embedded_model_and_data()
        if not model_args.use_peft:  # with --use_peft false the offline default is a full fine-tune
            check_sam_layers(model, args)  # before TRL tokenizes: a bad layer name fails first
        base_model, description = sft_offline.BASE_MODEL, sft_offline.description()
        dataset_ids: list[str] = []
    else:
        if not model_args.use_peft:  # names as the trainer will see them (PEFT would wrap them)
            check_sam_layers(skeleton_model(model_args), args)
        data = load_data(script_args)
        model, tokenizer, base_model = model_args.model_name_or_path, None, model_args.model_name_or_path
        description, dataset_ids = f"the {script_args.dataset_name} dataset", [script_args.dataset_name]
    for split in (script_args.dataset_train_split,):
        if split not in data:
            raise UsageError(f"the dataset has no {split!r} split (it has {list(data)}): pass "
                             "--dataset_train_split with one of them.")
    train = data[script_args.dataset_train_split]
    test = data.get(script_args.dataset_test_split)
    if args.eval_strategy != "no" and test is None:
        raise UsageError(f"--eval_strategy {args.eval_strategy} needs a {script_args.dataset_test_split!r} split: "
                         f"pass --dataset_test_split with one of {list(data)}, or --eval_strategy no.")
    card_info = ModelCardInfo(
        task="causal_lm", base_model=base_model, base_model_is_hub_id=True, dataset_ids=dataset_ids,
        dataset_description=description, num_train_examples=len(train),
        num_eval_examples=len(test) if test is not None else 0, max_length=args.max_length,
        metric_source="SFTTrainer (TRL) loss, entropy and token accuracy" + (
            "; answer accuracy: the most likely of the three answers, before and after training" if embedded else ""),
        lora={"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
              "target_modules": model_args.lora_target_modules} if model_args.use_peft else None,
        repo_id=args.hub_model_id or output_dir.name,
    )
    take_output_dir(args, plan)
    try:
        trainer = SFTLWSAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                  processing_class=tokenizer, peft_config=get_peft_config(model_args))
    except ValueError as e:  # e.g. sam_target_layers matching no module of this model
        raise UsageError(" ".join(str(e).split())) from None
    if embedded:  # the task metric of the model as it starts (adapters at their zero init)
        before = sft_offline.answer_accuracy(trainer.model, tokenizer, held_out, args.per_device_eval_batch_size)
    metrics = train_resumably(trainer, plan.checkpoint, output_dir)
    if test is not None:
        metrics.update(trainer.evaluate())
    if embedded:  # logged as an evaluation: the model card and trainer_state.json show it
        after = sft_offline.answer_accuracy(trainer.model, tokenizer, held_out, args.per_device_eval_batch_size)
        task = {f"eval_{sft_offline.METRIC}_before": before, f"eval_{sft_offline.METRIC}": after}
        metrics.update(task)
        trainer.log(task)
    trainer.log_metrics("all", metrics)
    save_final(trainer, output_dir, metrics, lambda folder: write_model_card(trainer, card_info, folder,
                                                                            output_dir.name))
    if args.push_to_hub:
        trainer.create_model_card = lambda *a, **k: write_model_card(trainer, card_info, args.output_dir,
                                                                     output_dir.name)
        trainer.push_to_hub(commit_message="End of training")
    if trainer.is_world_process_zero():
        print(f"\n***** {PROG} summary *****\n  train loss: {metrics.get('train_loss', float('nan')):.4f}"
              + (f"\n  eval loss : {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
              + (f"\n  held-out answer accuracy: {metrics[f'eval_{sft_offline.METRIC}_before']:.3f} before, "
                 f"{metrics[f'eval_{sft_offline.METRIC}']:.3f} after" if embedded else "")
              + f"\n  perturbed : {', '.join(trainer.perturbed_parameter_names()[:6])}"
              + f"\n  output    : {output_dir} (model card: README.md)")
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 on bad input, 143 when preempted; each failure as one line on stderr."""
    return console_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
