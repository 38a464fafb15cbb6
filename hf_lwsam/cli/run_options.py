"""What a checkpoint was trained with, so that a rerun does not resume it with other options by accident.

Each checkpoint the command-line tools save carries `_hf-lwsam-run.json`: the options that decide what a step trains
(every `sam_*` option as resolved, the optimizer, learning rate and schedule, the batch, the seed) and what the run
trains on (the base model, the data, LoRA). The same command run again resumes only when they are unchanged: a
changed option is refused in one line that names it, before anything is loaded or written. `--max_steps` and
`--num_train_epochs` may change (a longer run continues the same one, as with the stock `Trainer`), as may everything
that does not change the steps (logging, evaluation, saving, the Hub).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..config import LWSAMConfigMixin
from ..model_card import ModelCardInfo
from .args import UsageError

logger = logging.get_logger("hf_lwsam.cli.train")

RUN_OPTIONS_NAME = "_hf-lwsam-run.json"  # in each checkpoint, written before trainer_state.json marks it complete

# The TrainingArguments that change what a step trains (besides every sam_* option).
TRAINING_OPTIONS = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps",
                    "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon",
                    "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                    "label_smoothing_factor", "bf16", "fp16")
# sam_* options that leave the steps as they are (an exact shortcut)
_EXACT_SAM_OPTIONS = ("sam_reuse_activations",)
# What the card knows of the base model and the data
_RUN_FIELDS = ("base_model", "dataset_description", "num_train_examples", "labels", "max_length", "lora")


def _plain(value: Any) -> Any:
    """`value` as JSON reads it back (enums as their value, tuples as lists)."""
    return json.loads(json.dumps(value, default=lambda v: getattr(v, "value", str(v))))


def run_options(args: Any, card_info: ModelCardInfo | None = None) -> dict[str, Any]:
    """The options of a run that decide what it trains: name -> value (JSON values). With `card_info`, also what
    the run trains on (under `model card: <field>`)."""
    sam = [name for name in vars(args) if name.startswith("sam_") and name not in _EXACT_SAM_OPTIONS
           and name in LWSAMConfigMixin.__dataclass_fields__]
    options = {name: getattr(args, name, None) for name in (*sam, *TRAINING_OPTIONS)}
    if card_info is not None:
        options.update(card_options(card_info))
    return _plain(options)


def card_options(card_info: ModelCardInfo) -> dict[str, Any]:
    """What the run trains on, from its card: the base model, the data, LoRA (under `model card: <field>`)."""
    return _plain({f"model card: {name}": getattr(card_info, name, None) for name in _RUN_FIELDS})


def write_run_options(checkpoint_dir: str | Path, options: dict[str, Any]) -> None:
    """Write `options` into the checkpoint folder."""
    path = Path(checkpoint_dir) / RUN_OPTIONS_NAME
    path.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def changed_options(checkpoint: str | Path, options: dict[str, Any]) -> list[str] | None:
    """The options whose value `options` changes from the checkpoint's, as `name: old -> new`; `None` when the
    checkpoint records none (saved by another tool or an older version)."""
    try:
        saved = json.loads((Path(checkpoint) / RUN_OPTIONS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return [f"{name.removeprefix('model card: ')}: {saved.get(name)!r} -> {value!r}"
            for name, value in options.items() if name in saved and saved[name] != value]


def check_resume_options(checkpoint: str, options: dict[str, Any], named: bool, unrecorded_warning: bool = True
                         ) -> None:
    """Refuse to resume `checkpoint` with changed `options` when the rerun found it by itself (`named=False`); when
    `--resume_from_checkpoint` names it, continue with the new options and say which changed. A checkpoint that
    records no options is resumed, with a warning (`unrecorded_warning`) that they are not checked."""
    changed = changed_options(checkpoint, options)
    if changed is None:
        if unrecorded_warning:
            logger.warning(f"{checkpoint} records no options ({RUN_OPTIONS_NAME}): whether this run's options are the "
                           "ones it was trained with is not checked.")
    elif changed and not named:
        raise UsageError(f"the run in --output_dir was trained with other options ({'; '.join(changed)}): run the same "
                         "command as before to resume it, pass --overwrite_output_dir to start over, or a new "
                         "--output_dir (with --resume_from_checkpoint to continue from it with the new options).")
    elif changed:
        logger.warning(f"Resuming {checkpoint} with options changed from the ones it was trained with: "
                       f"{'; '.join(changed)}.")
