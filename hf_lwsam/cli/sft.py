"""`hf-lwsam-sft` (also `python scripts/sft.py`): supervised fine-tuning with TRL's `SFTTrainer` and layer-wise SAM.

TRL's `trl sft` script with the `--sam_*` flags: TRL's parser (`TrlParser`, `--config file.yaml`), `ScriptArguments`
(`--dataset_name`, splits), `SFTConfig` (every SFT flag and default) and `ModelConfig` (`--model_name_or_path`,
`--use_peft`, `--lora_r`, ...). Like `hf-lwsam-train` it resumes from the last checkpoint in `--output_dir`, saves a
checkpoint and exits 143 on SIGTERM, writes the final model and the LW-SAM model card to a temporary folder renamed
into place (`all_results.json` last), pushes with `--push_to_hub`, and reports bad input as one line with exit 2:
the options, the model's config and layer names (on a weightless copy), its tokenizer and the dataset's format (one
TRL reads: text, conversational `messages`, prompt/completion) are checked before the weights load, and the trainer
is built before `--output_dir` is touched.

With no model and no dataset it runs offline (`sft_offline.py`): a LoRA SFT of the shipped SmolLM2-135M-Instruct on
tweet sentiment as a chat in its chat template, with the held-out answer accuracy before and after training.

    hf-lwsam-sft                                                          # the offline default
    hf-lwsam-sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --sam_rho 0.05 --use_peft
    accelerate launch -m hf_lwsam.cli.sft --config sft.yaml
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

from transformers.utils import logging

from ..model_card import ModelCardInfo
from .args import (
    OFFLINE_DEFAULTS,
    HelpFormatter,
    RunArguments,
    UsageError,
    brief,
    check_number,
    explain_options,
    given_flags,
    looks_like_path,
    parsing_error,
    read_config_file,
    sam_options_first,
    split_config,
    validate_lora_args,
    validate_measure_plain_steps,
    validate_training_args,
    with_aliases,
)
from .core import (
    ModelCardMixin,
    add_peft_adapter,
    check_model_config,
    check_sam_layers,
    load_model_config,
    load_tokenizer,
    lora_card,
    quiet_datasets,
    weightless_model,
)
from .data import check_texts, describe_dataset, load_named_dataset
from .lifecycle import Command, console_main, run_command
from .sft_data import CONVERSATIONAL, sft_format, shortest_example_tokens
from .speed import ThroughputMixin, speed_rows

logger = logging.get_logger("hf_lwsam.cli.sft")

PROG = "hf-lwsam-sft"
DESCRIPTION = """\
Supervised fine-tuning with TRL's SFTTrainer and layer-wise sharpness-aware minimization (LW-SAM): TRL's `trl sft`
flags (--config sft.yaml, --dataset_name, --model_name_or_path, --use_peft, every SFTConfig flag) plus the --sam_*
options. With no model and no dataset it runs offline: a LoRA SFT of the shipped SmolLM2-135M-Instruct on tweet
sentiment as a chat, with the held-out answer accuracy before and after. Running the same command again resumes
from the last checkpoint in --output_dir.

examples:
  hf-lwsam-sft
  hf-lwsam-sft --model_name_or_path Qwen/Qwen2-0.5B --dataset_name trl-lib/Capybara --use_peft \\
      --sam_preset free --output_dir Qwen2-0.5B-SFT-LWSAM
  hf-lwsam-sft --model_name_or_path ./my-model --dataset_name ./my-chats.jsonl --bf16 false  # local, all weights

The --sam_* options come first below, then the script's, TRL's script and model flags, then every SFTConfig flag."""


def make_parser():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..trl import SFTLWSAMConfig

    parser = TrlParser((ScriptArguments, SFTLWSAMConfig, ModelConfig, RunArguments), prog=PROG,
                       allow_abbrev=False,  # a typo such as --sam_rh must not become --sam_rho
                       usage=f"{PROG} [sft.yaml | --config sft.yaml] [--flag VALUE ...]", description=DESCRIPTION,
                       formatter_class=HelpFormatter)

    def one_line_error(message: str) -> None:
        raise UsageError(message.splitlines()[-1] if message else "invalid arguments")

    parser.error = one_line_error
    parser._optionals.title = "SFT and Trainer options (TRL SFTConfig, transformers TrainingArguments)"
    return explain_options(sam_options_first(parser, {
        "hf-lwsam-sft": {f.name for f in fields(RunArguments)},
        "TRL script (ScriptArguments)": {f.name for f in fields(ScriptArguments)},
        "TRL model (ModelConfig)": {f.name for f in fields(ModelConfig)}}))


def parse_args(argv: list[str] | None = None):
    """`(script_args, training_args, model_args, run_args, embedded)`; `embedded` when no model and no dataset were
    given. Every option is checked here, before anything is loaded."""
    config_file, argv = split_config(with_aliases(list(sys.argv[1:] if argv is None else argv)))
    # a leading CONFIG.yaml or --config=CONFIG.yaml: TRL's parser reads --config CONFIG.yaml
    if config_file is not None:
        argv = ["--config", config_file, *argv]
    parser = make_parser()
    given = given_flags(argv)
    embedded = not ({"model_name_or_path", "dataset_name", "config"} & given)
    if not embedded and "config" not in given and len({"model_name_or_path", "dataset_name"} & given) == 1:
        missing = "--dataset_name" if "model_name_or_path" in given else "--model_name_or_path"
        raise UsageError(f"{missing} is missing: pass both --model_name_or_path and --dataset_name, or neither for "
                         "the offline default.")
    if embedded:
        parser.set_defaults(**{k: v for k, v in OFFLINE_DEFAULTS[PROG].items() if k not in given})
    flags = argv
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or not Path(argv[i + 1]).is_file():
            raise UsageError("--config needs an existing YAML file: pass --config path/to/sft.yaml.")
        config = read_config_file(argv[i + 1], parser, extra_keys=("env",))  # syntax, names and types
        given |= set(config) - {"env"}
        flags = argv[:i] + argv[i + 2:]
        parser.set_defaults(**{k: v for k, v in config.items() if k != "env"})
    namespace, _ = parser.parse_known_args(flags)  # argparse errors here; unknown flags are reported below
    validate_sft_args(namespace, given)  # before the dataclasses' own, terser checks
    try:
        with warnings.catch_warnings():  # transformers' deprecation notes on TRL's own defaults are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            script_args, training_args, model_args, run_args = parser.parse_args_and_config(argv)
    except ValueError as e:  # a config's own validation (SFTConfig, the sam_* options), unknown flags
        if "support bf16" in str(e):  # SFTConfig turns bf16 on by default; TrainingArguments' hint names use_cpu only
            raise UsageError("--bf16 is on (SFTConfig's default) and this machine has no bf16 accelerator: pass "
                             "--bf16 false, or --use_cpu true to train in bf16 on the CPU.") from None
        raise parsing_error(e, PROG, namespace) from None
    if not embedded and (model_args.model_name_or_path is None or script_args.dataset_name is None):
        missing = "--model_name_or_path" if model_args.model_name_or_path is None else "--dataset_name"
        raise UsageError(f"{missing} is missing (in --config or as a flag): pass both, or neither for the offline "
                         "default.")
    if not embedded:  # how TRL's own `trl sft` loads the named model
        training_args.model_init_kwargs = {
            "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
            "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
            **(training_args.model_init_kwargs or {})}
    return script_args, training_args, model_args, run_args, embedded


def validate_sft_args(a: Any, given: set[str]) -> None:
    """The checks of `hf-lwsam-train` for the shared training and LoRA options, and SFT's own lengths, on the parsed
    namespace; `given` holds the options set as flags or in the config file."""
    validate_training_args(a)
    validate_measure_plain_steps(a)
    validate_lora_args(a, given, enabled=a.use_peft, switch="--use_peft")
    check_number("max_length", a.max_length, "at least 2 tokens (e.g. 512), or none to keep whole sequences",
                 at_least=2, optional=True)
    if not a.dataset_text_field:
        raise UsageError("--dataset_text_field is empty: pass the name of the text column (default: text).")
    template = a.chat_template_path
    if template and not os.path.isfile(template) and (template.endswith((".jinja", ".j2"))
                                                      or looks_like_path(template)):
        raise UsageError(f"--chat_template_path {template!r} does not exist: pass a .jinja file, or the id of a model "
                         "whose chat template to copy.")
    if a.dataset_streaming:
        raise UsageError("--dataset_streaming is not supported by hf-lwsam-sft (the data's format and texts are "
                         "checked up front): drop it, or pass a smaller --dataset_name split.")
    for flag in ("load_in_4bit", "load_in_8bit"):
        if getattr(a, flag) and importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"--{flag} needs bitsandbytes, which is not installed: pip install bitsandbytes (and "
                             f"train on a CUDA GPU), or drop --{flag}.")


def skeleton_model(name: str, config: Any, peft_config: Any, trust_remote_code: bool = False,
                   revision: str | None = None) -> Any:
    """The model built from its config on the meta device (no weights, remote code from `--model_revision`), wrapped
    by PEFT as the trainer will wrap it: the layer names to check the `--lora_target_modules` and sam_* patterns
    against."""
    from transformers import AutoModelForCausalLM

    try:
        model = weightless_model(AutoModelForCausalLM, config, trust_remote_code, revision)
    except ValueError as e:  # no causal-LM class for this config
        raise UsageError(f"--model_name_or_path {name!r} is not a causal language model "
                         f"({brief(str(e), 200)}): pass one, e.g. openai-community/gpt2.") from None
    if peft_config is None:
        return model
    with warnings.catch_warnings():  # PEFT's notes on this copy are shown again when the trainer wraps the real model
        warnings.simplefilter("ignore")
        return add_peft_adapter(model, peft_config)


def load_causal_lm(name: str, args: Any, model_args: Any) -> Any:
    """The causal LM as TRL's `SFTTrainer` loads a model given by name (TRL's `create_model_from_path` with
    `args.model_init_kwargs`, which carry `--model_revision`, and the quantization config), but with the class given:
    TRL would read it from a config loaded without the revision, running `main`'s code under `--trust_remote_code`."""
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.model_init_kwargs or {})
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # as SFTTrainer: "auto" fails under distributed training
    args.model_init_kwargs = None  # used here (SFTTrainer would warn that they come with a loaded model)
    try:
        return create_model_from_path(name, architecture=AutoModelForCausalLM, **kwargs)
    except OSError as e:  # e.g. no weights at this revision
        raise UsageError(f"{name!r} cannot be loaded: {brief(str(e))}") from None


def load_data(script_args: Any) -> Any:
    return load_named_dataset(script_args.dataset_name, script_args.dataset_config, "--dataset_config",
                              "pass a local folder of data files instead")


def sft_splits(data: Any, script_args: Any, args: Any) -> tuple[Any, Any, str]:
    """The train split, the evaluation split (`None` when there is none) and their format, checked: a format TRL
    reads and, for text, rows with empty text are counted, logged and dropped (all empty is refused)."""
    if script_args.dataset_train_split not in data:
        raise UsageError(f"the dataset has no {script_args.dataset_train_split!r} split (it has {list(data)}): pass "
                         "--dataset_train_split with one of them.")
    splits = {"train": data[script_args.dataset_train_split]}
    if script_args.dataset_test_split in data:
        splits["eval"] = data[script_args.dataset_test_split]
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    if strategy != "no" and "eval" not in splits:
        raise UsageError(f"--eval_strategy {strategy} needs a {script_args.dataset_test_split!r} split: pass "
                         f"--dataset_test_split with one of {list(data)}, or --eval_strategy no.")
    field = args.dataset_text_field
    formats = {name: sft_format(split, name, field) for name, split in splits.items()}
    if len(set(formats.values())) > 1:
        raise UsageError(f"the train and eval splits are in different formats ({formats}): pass splits in one format.")
    if formats["train"] == "text":
        check_texts(splits, field, flag="--dataset_text_field")
        splits = {name: split.filter(lambda batch: [isinstance(t, str) and t.strip() != "" for t in batch[field]],
                                     batched=True) for name, split in splits.items()}
    if args.assistant_only_loss and not formats["train"].startswith("conversational"):
        raise UsageError(f"--assistant_only_loss needs conversational data and the train split is {formats['train']}: "
                         f"pass data in {CONVERSATIONAL}, or drop --assistant_only_loss.")
    masked = formats["train"].endswith("prompt_completion") or "completion_mask" in splits["train"].column_names
    if args.completion_only_loss and not masked:  # TRL would train on every token, the card would say otherwise
        raise UsageError(f"--completion_only_loss needs prompt/completion data and the train split is "
                         f"{formats['train']}: pass 'prompt' and 'completion' columns (or a tokenized split with a "
                         "'completion_mask'), or drop --completion_only_loss.")
    return splits["train"], splits.get("eval"), formats["train"]


def sft_trainer_class() -> type:
    """`SFTLWSAMTrainer` writing the LW-SAM model card and timing the run as `hf-lwsam-train`'s trainer does
    ([`ModelCardMixin`], [`ThroughputMixin`]); built on first use, TRL being optional."""
    from ..trl import SFTLWSAMTrainer

    return type("CLISFTTrainer", (ModelCardMixin, ThroughputMixin, SFTLWSAMTrainer), {"__module__": __name__})


class SFTCommand(Command):
    """`hf-lwsam-sft`'s part of the lifecycle ([`run_command`]): the model, data, trainer, evaluation and report; with
    no model and no dataset, the offline default (`sft_offline.py`) with its held-out answer accuracy."""

    def __init__(self, script_args: Any, args: Any, model_args: Any, run_args: RunArguments, embedded: bool):
        options = {f.name for parsed in (script_args, args, model_args, run_args) for f in fields(parsed)}
        super().__init__(PROG, args, run_args, options)
        self.script_args, self.model_args, self.embedded = script_args, model_args, embedded

    def prepare(self, output_dir: Path) -> ModelCardInfo:
        from trl import get_peft_config

        from . import sft_offline

        script_args, args, model_args = self.script_args, self.args, self.model_args
        self.peft_config = get_peft_config(model_args)
        if self.embedded:
            self.model, self.tokenizer, data, self.held_out = sft_offline.embedded_model_and_data()
            # before TRL tokenizes: a bad layer name fails first (names as PEFT will wrap them)
            check_sam_layers(skeleton_model(sft_offline.BASE_MODEL, self.model.config, self.peft_config), args)
            base_model, description, is_hub = sft_offline.BASE_MODEL, sft_offline.description(), True
            dataset_ids: list[str] = []
            with quiet_datasets():
                self.train, self.test, _ = sft_splits(data, script_args, args)
        else:
            # Everything is checked before the weights load: the model's config, layer names and LoRA targets (on a
            # weightless copy), the data's format and texts, the tokenizer.
            hub = {"trust_remote_code": args.trust_remote_code, "revision": model_args.model_revision}
            name, config, is_hub = load_model_config(model_args.model_name_or_path, **hub)
            check_model_config(config, name, max_length=args.max_length)
            check_sam_layers(skeleton_model(name, config, self.peft_config, **hub), args)
            with quiet_datasets():
                self.train, self.test, data_format = sft_splits(load_data(script_args), script_args, args)
            self.tokenizer = load_tokenizer(name, **hub)
            if data_format.startswith("conversational") and self.tokenizer.chat_template is None and \
                    args.chat_template_path is None:
                raise UsageError(f"the data is conversational and the tokenizer of {name!r} has no chat template: "
                                 "pass --chat_template_path (a .jinja file, or a model id whose template to copy), a "
                                 "model with a chat template, or text data.")
            self.model, base_model = name, name
            description, dataset_ids = describe_dataset(script_args.dataset_name, script_args.dataset_config)
        return ModelCardInfo(
            task="causal_lm", base_model=base_model, base_model_is_hub_id=is_hub, dataset_ids=dataset_ids,
            dataset_description=description, num_train_examples=len(self.train),
            num_eval_examples=len(self.test) if self.test is not None else 0, max_length=args.max_length,
            metric_source="SFTTrainer (TRL) loss, entropy and token accuracy" + (
                "; answer accuracy: the most likely of the three answers, before and after training"
                if self.embedded else ""),
            lora=lora_card(model_args),
        )

    def build_trainer(self, **common: Any) -> Any:
        args = self.args
        with quiet_datasets():  # weights loaded, data tokenized
            if not self.embedded:
                self.model = load_causal_lm(self.model, args, self.model_args)
            trainer = sft_trainer_class()(model=self.model, train_dataset=self.train, eval_dataset=self.test,
                                          processing_class=self.tokenizer, peft_config=self.peft_config, **common)
        for split, rows, kept in (("train", self.train, trainer.train_dataset), ("eval", self.test,
                                                                                  trainer.eval_dataset)):
            if rows is not None and len(kept) == 0:  # TRL drops an example cut inside its prompt (no token to learn)
                shortest = shortest_example_tokens(rows, trainer.processing_class, args.dataset_text_field)
                raise UsageError(f"--max_length {args.max_length} leaves no {split} example with a token to learn "
                                 f"from (TRL drops an example cut inside its prompt; the shortest example is "
                                 f"{shortest} tokens): pass --max_length {shortest} or more.")
        # what is trained: after TRL's own filtering (packing)
        common["card_info"].num_train_examples = len(trainer.train_dataset)
        return trainer

    def before_training(self, trainer: Any) -> None:
        if self.embedded:  # the task metric of the model as it starts (adapters at their zero init)
            self.before = self._answer_accuracy(trainer)

    def _answer_accuracy(self, trainer: Any) -> float:
        from .sft_offline import answer_accuracy

        return answer_accuracy(trainer.model, self.tokenizer, self.held_out, self.args.per_device_eval_batch_size)

    def evaluate(self, trainer: Any) -> dict[str, float]:
        from .sft_offline import METRIC

        metrics = trainer.evaluate() if self.test is not None else {}
        if self.embedded:  # logged as an evaluation: the model card and trainer_state.json show it
            task = {f"eval_{METRIC}_before": self.before, f"eval_{METRIC}": self._answer_accuracy(trainer)}
            metrics.update(task)
            trainer.log(task)
        return metrics

    def summary_rows(self, trainer: Any, metrics: dict[str, Any], info: ModelCardInfo) -> dict[str, str]:
        """The train and eval loss, train time, tokens/s, the step-time ratio and, offline, the answer accuracy."""
        from .sft_offline import METRIC

        trained = "packed sequences" if self.args.packing else "examples"
        rows = {"train loss": f"{metrics.get('train_loss', float('nan')):.4f}", **speed_rows(trainer, info, trained)}
        if "eval_loss" in metrics:
            rows["eval loss"] = f"{metrics['eval_loss']:.4f}"
        if self.embedded:
            rows["held-out answer accuracy"] = (f"{metrics[f'eval_{METRIC}_before']:.3f} before, "
                                                f"{metrics[f'eval_{METRIC}']:.3f} after")
        return rows


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, validate, train (resuming from the last checkpoint in `output_dir`), evaluate, save (with card) and
    optionally push ([`run_command`]); returns the final metrics."""
    return run_command(SFTCommand(*parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 on success, 2 on bad input, 143 when preempted; each failure as one line on stderr."""
    return console_main(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())
