"""What `hf-lwsam-train` and `hf-lwsam-sft` share before training: the model's config, tokenizer and weightless copy
loaded from a local directory or the Hub (at a pinned revision), the checks made on them before the weights load,
LoRA wrapping and quiet `datasets` processing. Each bad input raises a one-line `UsageError`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets.utils as datasets_progress
import torch
from transformers import AutoConfig, AutoTokenizer

from ..model_card import (
    ModelCardInfo,
    build_model_card,
    name_adapter_base_model,
    perturbed_layers,
    write_model_card,
)
from ..selection_rules import SELECTION_RULES
from .args import UsageError, brief, looks_like_path
from .output import card_name, write_card
from .run_options import run_options, write_run_options

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def hub_kwargs(trust_remote_code: bool = False, revision: str | None = None) -> dict[str, Any]:
    """The keyword arguments of every `from_pretrained` of the model's files: `trust_remote_code` and the pinned
    `revision` (transformers then also takes the model's remote code from that revision)."""
    return {"trust_remote_code": trust_remote_code, "revision": revision}


def load_model_config(name: str | None, trust_remote_code: bool = False,
                      revision: str | None = None) -> tuple[str, Any, bool]:
    """The model path (the shipped MiniLM when `name` is `None`), its config, and whether it names a Hub repo."""
    if name is None:
        from ..data import minilm_path

        try:
            name = minilm_path()
        except FileNotFoundError as e:
            raise UsageError(f"{e} (or pass --model_name_or_path)") from None
    is_local = os.path.isdir(name)
    if os.path.isfile(name):
        raise UsageError(f"--model_name_or_path {name!r} is a file: pass the model's directory (with config.json) or "
                         "a Hub model id.")
    if not is_local and (looks_like_path(name) or os.path.exists(name)):
        raise UsageError(f"--model_name_or_path {name!r} does not exist: pass an existing model directory or a "
                         "Hub model id such as 'bert-base-uncased'.")
    if not is_local:
        check_hub_model(name, revision)
    try:
        config = AutoConfig.from_pretrained(name, **hub_kwargs(trust_remote_code, revision))
    except (OSError, ValueError) as e:
        from huggingface_hub import constants

        if is_local:
            raise UsageError(f"--model_name_or_path {name!r} is not a model directory (no usable config.json: "
                             f"{brief(str(e), 200)}): pass a directory written by save_pretrained.") from None
        if constants.HF_HUB_OFFLINE:
            raise UsageError(f"--model_name_or_path {name!r} is not a local directory and the Hub is offline "
                             "(HF_HUB_OFFLINE=1) with no cached copy: pass a local model directory, or unset "
                             "HF_HUB_OFFLINE.") from None
        raise UsageError(f"--model_name_or_path {name!r} could not be loaded from the Hub ({brief(str(e), 200)}): "
                         "check the id, or pass a local model directory.") from None
    return name, config, not is_local


# Where the errors of a Hub call come from when the Hub cannot be reached: huggingface_hub's HTTP client (httpx or its
# successor), which it lets through, or the socket (`ConnectionError`, `TimeoutError`).
_NETWORK_MODULES = ("httpx", "httpx2", "httpcore", "requests", "urllib3", "aiohttp")


def network_error(error: BaseException) -> bool:
    """Whether `error` says the Hub could not be reached (no connection, DNS failure, timeout)."""
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        cls.__module__.split(".")[0] in _NETWORK_MODULES for cls in type(error).__mro__)


def check_hub_model(name: str, revision: str | None = None) -> None:
    """One request for the Hub model's `config.json`, before transformers downloads it (which retries a failed
    connection for about 30 s): no connection, a repo or revision that does not exist, or a gated repo is one
    `UsageError` line at once. Nothing is asked when the Hub is offline (`HF_HUB_OFFLINE`: transformers reads the
    cache) or the file is cached (transformers uses it when the Hub cannot be reached)."""
    from huggingface_hub import (
        constants,
        get_hf_file_metadata,
        hf_hub_url,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    flag = f"--model_name_or_path {name!r}"
    try:
        if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision))
    except HFValidationError:
        return  # not a valid repo id: transformers says why
    except OfflineModeIsEnabled:
        return
    except GatedRepoError:
        raise UsageError(f"{flag} is a gated Hub model: accept its terms at https://huggingface.co/{name} and log in "
                         "(hf auth login), or pass a local model directory.") from None
    except RevisionNotFoundError:
        raise UsageError(f"--model_revision {revision!r} does not exist in the Hub model {name!r}: pass one of its "
                         "branches, tags or commit ids.") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} is not a model on the Hub (or a private one this login cannot see): check the id, "
                         "log in with hf auth login for a private model, or pass a local model directory.") from None
    except HfHubHTTPError:
        return  # any other answer of the Hub (no config.json, a server error): transformers reports it
    except Exception as e:
        if not network_error(e):
            raise
        raise UsageError(f"{flag} is not a local directory nor in the Hub cache, and the Hub cannot be reached "
                         f"({type(e).__name__}: {brief(str(e), 150)}): check the network, or pass a local model "
                         "directory (HF_HUB_OFFLINE=1 uses cached models only).") from None


def weightless_model(auto: Any, config: Any, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """`auto.from_config(config)` on the meta device (no weights), with the class `from_pretrained` would build: for
    remote code (`--trust_remote_code`), the class comes from the pinned revision, as in `from_pretrained` (a plain
    `from_config` takes it from `main`) and is registered for `auto`, which then builds it."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    class_ref = (getattr(config, "auto_map", None) or {}).get(auto.__name__)
    if trust_remote_code and isinstance(class_ref, str):
        model_class = get_class_from_dynamic_module(class_ref, config.name_or_path, revision=revision)
        auto.register(type(config), model_class, exist_ok=True)
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The model's tokenizer (padding with its EOS token when it has no pad token)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kwargs(trust_remote_code, revision))
    except (OSError, ValueError) as e:
        raise UsageError(f"no tokenizer could be loaded from {name!r} ({brief(str(e), 200)}): save one next to the "
                         "model with tokenizer.save_pretrained.") from None
    if len(tokenizer) <= len(tokenizer.all_special_tokens):  # a folder without tokenizer files gives an empty one
        raise UsageError(f"{name!r} has no tokenizer files (the tokenizer built from it has {len(tokenizer)} "
                         "token(s)): save the model's tokenizer next to it with tokenizer.save_pretrained.")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_peft_adapter(model: Any, peft_config: Any) -> Any:
    """`get_peft_model(model, peft_config)`, a bad target module name reported as one `UsageError` line."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config)
    except ValueError as e:
        raise UsageError(f"LoRA could not be added: {brief(str(e))}; pass --lora_target_modules with module names "
                         "of this model (or 'all-linear').") from None


def lora_card(model_args: Any) -> dict[str, Any] | None:
    """The LoRA settings the model card lists, `None` without `--use_peft` (`model_args`: `hf-lwsam-train`'s
    `ModelArguments` or TRL's `ModelConfig`, which name them alike)."""
    if not model_args.use_peft:
        return None
    return {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
            "target_modules": model_args.lora_target_modules}


def check_model_config(config: Any, name: str, task: str | None = None, max_length: int | None = None) -> None:
    """Checks against the model's config, before any data or weights are loaded."""
    architectures = list(getattr(config, "architectures", None) or [])
    if task == "causal_lm" and architectures and not any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        raise UsageError(f"--task causal_lm needs a causal language model and {name!r} is a "
                         f"{', '.join(architectures)}: pass a causal LM (e.g. --model_name_or_path "
                         "openai-community/gpt2), or --task classification.")
    positions = [v for k in ("max_position_embeddings", "n_positions")
                 if isinstance(v := getattr(config, k, None), int)]
    if max_length is not None and positions and max_length > min(positions):
        raise UsageError(f"--max_length {max_length} is longer than the {min(positions)} positions "
                         f"{name!r} supports: pass --max_length {min(positions)} or less.")


def check_sam_layers(model: Any, args: Any) -> None:
    """The `sam_target_layers` / `sam_exclude_layers` patterns must match this model (as the trainer would check)."""
    try:
        SELECTION_RULES[args.sam_selection].check_layers(model, args)  # the rule's own dry run of its patterns
    except ValueError as e:
        flag = "--sam_exclude_layers" if "sam_exclude_layers=" in str(e).split(" ", 1)[0] else "--sam_target_layers"
        raise UsageError(f"{' '.join(str(e).split())} Pass {flag} with names of this model.") from None


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No `datasets` progress bars while loading, checking and tokenizing the data (bad data then fails with one
    line; the Trainer's own progress bar is unaffected)."""
    was_enabled = not datasets_progress.are_progress_bars_disabled()
    datasets_progress.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets_progress.enable_progress_bars()



class ModelCardMixin:
    """Trainer mixin of both commands: the LW-SAM model card (`write_model_card`) is written next to the weights
    whenever the model is saved, and into `output_dir` through the stock `create_model_card` hook (which TRL's
    trainers call at each checkpoint), instead of the stock draft: there it is written whole and recorded as the
    run's (`output.write_card`), and a `README.md` the run did not write is kept (the card goes beside it).

    Args:
        card_info ([`ModelCardInfo`]): what the card says about the run beyond the trainer's own state.
        card_name (`str`): the card's title.
        *other arguments*: as for the trainer it is mixed into.
    """

    def __init__(self, *args: Any, card_info: ModelCardInfo, card_name: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.card_info, self.card_name = card_info, card_name

    def _save_rng_state(self, output_dir: str) -> None:
        """Checkpoints also carry the options the run trains with (`run_options`), so a rerun resumes only with
        them; written before `trainer_state.json`, which marks a checkpoint complete."""
        super()._save_rng_state(output_dir)
        if self.args.should_save:
            write_run_options(output_dir, run_options(self.args, self.card_info))

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The LW-SAM card in `output_dir` instead of the stock draft (TRL calls it at each checkpoint)."""
        if self.is_world_process_zero():
            write_card(Path(self.args.output_dir),
                       lambda path: build_model_card(self, self.card_info, self.card_name).save(path))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the stock `Trainer` does, then write the card next to the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not self.args.should_save:
            return
        name_adapter_base_model(self.model, output_dir or self.args.output_dir, self.card_info)
        if Path(output_dir or self.args.output_dir).resolve() == Path(self.args.output_dir).resolve():
            self.create_model_card()  # output_dir itself: a README.md there that the run did not write is kept
        else:
            write_model_card(self, self.card_info, output_dir, self.card_name)


def summary(prog: str, trainer: Any, rows: dict[str, str], output_dir: Path) -> str:
    """The end-of-run report: the command's `rows` (label: value), then the perturbed layers, the output folder and,
    with `--push_to_hub`, the Hub repository."""
    layers, num_params = perturbed_layers(trainer)
    shown = ", ".join(layers[:6]) + (f", ... (+{len(layers) - 6})" if len(layers) > 6 else "")
    rows = {**rows, "perturbed layers": f"{len(layers)} ({num_params:,} parameters): {shown}",
            "output": f"{output_dir} (model card: {card_name(output_dir)})"}
    if trainer.args.push_to_hub:
        rows["pushed to"] = f"https://huggingface.co/{trainer.hub_model_id}"
    return "\n".join(["", f"***** {prog} summary *****", *(f"  {label:<19}: {value}" for label, value in rows.items())])
