"""What the accuracy and gradient-norm studies (`benchmark_accuracy.py`, `gradnorm_study.py`) do alike: cache a run
as JSON with the configuration it was made with, build the plain or the layer-wise SAM trainer of a method (the
stock `Trainer` or TRL's `SFTTrainer`), quiet a trainer, name the machine a run ran on, and format a mean ± std over
seeds. (The offline defaults, `HF_HUB_OFFLINE=1`, ..., are its users' to
set before importing it.)

    >>> mean_std([0.80, 0.82])
    '0.8100 ± 0.0141'
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from hf_lwsam import LWSAMConfig, LWSAMTrainer

MACHINE = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def machine(device: str = "cpu") -> str:
    """What a run on `device` ran on: `MACHINE` for the CPU, else the accelerator's name and torch's version."""
    if device == "cpu":
        return MACHINE
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def cached(path: Path, config: dict[str, Any], make: Callable[[], dict | None],
           log: Callable[[str], None] | None = None, resolved: dict[str, Any] | None = None) -> dict | None:
    """The run stored at `path` if it was made with `config`, else `make()` stored there with `config` (resumable).

    Args:
        path: the run's JSON file.
        config: everything the run depends on (compared as JSON: a tuple equals the list it is stored as); a
            stored run with another `config` is redone.
        make: runs it and returns its record (`config` is set on it); `None` (nothing run) stores nothing.
        log: told when a stored run is redone.
        resolved: a SAM run's options as the library resolves them (`resolved_sam`), stored as `resolved_sam`; a
            stored run that holds other ones (a preset or a default changed since) is redone. Runs stored before
            it was recorded are not checked.
    """
    config = json.loads(json.dumps(config))
    resolved = None if resolved is None else json.loads(json.dumps(resolved))
    if path.exists():
        stored = json.loads(path.read_text())
        same = resolved is None or stored.get("resolved_sam", resolved) == resolved
        if stored.get("config") == config and same:
            return stored
        if log:
            log(f"{path.name} was made with another configuration" + ("" if same else " (the library resolves its "
                "sam_* options otherwise now)") + ": redoing it")
    result = make()
    if result is None:
        return None
    result = dict(result, config=config, **({} if resolved is None else {"resolved_sam": resolved}))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")  # a run stopped while writing leaves no half a file
    partial.write_text(json.dumps(result, indent=1))
    partial.replace(path)
    return result


def make_trainer(args: dict[str, Any], sam: dict[str, Any] | None, rho: float, sft: bool = False,
                 **kwargs: Any) -> Trainer:
    """The stock `Trainer` with `TrainingArguments(**args)` for `sam=None` (plain AdamW), else an `LWSAMTrainer` with
    `LWSAMConfig(**args, sam_rho=rho, **sam)`; with `sft`, TRL's `SFTTrainer` / `SFTConfig` and
    `SFTLWSAMTrainer` / `SFTLWSAMConfig` instead. `kwargs` go to the trainer (model, datasets, collator, ...)."""
    plain, plain_args, lw, lw_args = Trainer, TrainingArguments, LWSAMTrainer, LWSAMConfig
    if sft:
        import trl

        from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer

        plain, plain_args, lw, lw_args = trl.SFTTrainer, trl.SFTConfig, SFTLWSAMTrainer, SFTLWSAMConfig
    if sam is None:
        return plain(args=plain_args(**args), **kwargs)
    return lw(args=lw_args(**args, sam_rho=rho, **sam), **kwargs)


def resolved_sam(sam: dict[str, Any] | None, rho: float) -> dict[str, Any] | None:
    """Every `sam_*` option of `LWSAMConfig(sam_rho=rho, **sam)` as the library resolves it (a preset's, the
    defaults): what a SAM run trains with; `None` for a plain run (`sam=None`) or options the library refuses.

        >>> resolved_sam(dict(sam_preset="free"), 0.2)["sam_ascent"], resolved_sam(None, 0.0)
        ('momentum', None)
    """
    if sam is None:
        return None
    try:
        config = LWSAMConfig(output_dir="unused", report_to="none", sam_rho=rho, **sam)
    except ValueError:
        return None
    return {name: getattr(config, name) for name in sorted(vars(config)) if name.startswith("sam_")}


def quiet(trainer: Trainer) -> Trainer:
    """`trainer` without the callback that prints every log (`disable_tqdm=True` adds it)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def mean_std(xs: Sequence[float], fmt: str = ".4f") -> str:
    """`mean ± std` of `xs` in `fmt` (std 0 for a single value)."""
    return f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:{fmt}}"
