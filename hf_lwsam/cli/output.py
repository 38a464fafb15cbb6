"""The output directory of `hf-lwsam-train` and `hf-lwsam-sft`: what a rerun resumes, what `--overwrite_output_dir`
may remove, and the final save that never leaves a directory looking finished before it is.

A run writes `checkpoint-N/` folders (and the Trainer's `runs/` logs) straight into `output_dir`, as the Hugging Face
example scripts do. The final weights, tokenizer, model card and `trainer_state.json` are written to
`.hf-lwsam-final.tmp/`, then renamed into place; `all_results.json` is written last, so it marks a finished run.

Everything a run writes there is recorded in `_hf-lwsam-train.json` when it is written, with an identity no other
entry has by accident: its device and inode (which a file system reuses once the entry is removed) plus, for a
directory, a random id written inside it (`.hf-lwsam-id`), for a file, its size and modification time in nanoseconds
(a new file at a reused inode is written at another time). `--overwrite_output_dir` removes only entries that are
still the ones recorded, checked again right before each removal, so a checkpoint of another tool, a file replaced or
edited since, or a record copied in from elsewhere never makes it delete anything. A `README.md` the run did not
write is kept: the run's model card then goes to `_hf-lwsam-card.md`. The leading `_` keeps the record and that card
out of Hub uploads (the Trainer skips `_*`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging

from .args import UsageError

logger = logging.get_logger("hf_lwsam.cli.train")

RESULTS_NAME = "all_results.json"  # written last: its presence marks a finished run
MANIFEST_NAME = "_hf-lwsam-train.json"  # what a run wrote in output_dir, recorded as it writes it; never pushed
FINAL_TMP_NAME = ".hf-lwsam-final.tmp"
LOGS_NAME = "runs"  # the Trainer's default logging_dir
ID_NAME = ".hf-lwsam-id"  # inside each directory a run records: a random id no other directory has
CARD_NAME = "README.md"
CARD_ASIDE_NAME = "_hf-lwsam-card.md"  # the run's card when output_dir holds a README.md the run did not write
KEPT_NAME = "_hf-lwsam-kept"  # where the final save moves files of another tool that had the names of the run's files
UPLOAD_IGNORE = ["_*", f"{PREFIX_CHECKPOINT_DIR}-*", f"*{ID_NAME}"]  # the Trainer's push patterns, plus the ids
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")


@dataclass
class OutputPlan:
    """What the run does with `output_dir`: resume from `checkpoint` (or start at step 0) after removing `remove`."""

    output_dir: Path
    checkpoint: str | None = None
    remove: list[Path] = field(default_factory=list)


def _identity(path: Path, create: bool = False) -> list[Any]:
    """What tells the entry at `path` from any other one later put under the same name: its device and inode (reused by
    the file system once the entry is removed), plus a directory's random id (read from its `.hf-lwsam-id`, written
    first with `create`) or a file's size and modification time in nanoseconds (its bytes cannot hold an id)."""
    info = path.lstat()
    if stat.S_ISDIR(info.st_mode):
        marker = path / ID_NAME
        if create and not marker.is_file():
            marker.write_text(secrets.token_hex(16), encoding="utf-8")
        try:
            stamp = "id:" + marker.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            stamp = None  # no id: never one a run recorded
    else:
        stamp = f"{info.st_size}:{info.st_mtime_ns}"
    return [info.st_dev, info.st_ino, stamp]


def _plain_name(name: Any) -> bool:
    """A name directly inside `output_dir` (no separator, not `.` or `..`)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def _read_record(output_dir: Path) -> dict[str, Any]:
    """The record's `written` table as stored (name -> the identities recorded for it); empty when unreadable."""
    try:
        written = json.loads((output_dir / MANIFEST_NAME).read_text(encoding="utf-8")).get("written")
    except (OSError, ValueError, AttributeError):
        return {}
    return written if isinstance(written, dict) else {}


def _still_recorded(output_dir: Path, name: Any, record: dict[str, Any]) -> bool:
    """Whether the entry `name` in `output_dir` is, right now, one that `record` holds."""
    try:
        return _plain_name(name) and _identity(output_dir / name) in record.get(name, [])
    except (OSError, TypeError):
        return False


def _recorded(output_dir: Path) -> dict[str, list[list[Any]]]:
    """The record's entries that are still on disk as recorded: name -> the identity recorded for it."""
    record = _read_record(output_dir)
    return {name: [_identity(output_dir / name)] for name in record if _still_recorded(output_dir, name, record)}


def record_written(output_dir: Path, entries: dict[str, Path]) -> None:
    """Record that the run wrote `entries` (name in `output_dir` -> the path that has, or will be renamed to have,
    that name; a directory gets its random id first), keeping the recorded entries still on disk as they were
    written."""
    record = _recorded(output_dir)
    for name, path in entries.items():
        identity = _identity(path, create=True)
        if identity not in record.setdefault(name, []):
            record[name].append(identity)
    _write_json_atomically(output_dir / MANIFEST_NAME, {"written": dict(sorted(record.items()))})


def _reserved(output_dir: Path) -> set[str]:
    """The names only a run of this CLI uses, present in `output_dir`: its record and its final save's folder."""
    return {n for n in (MANIFEST_NAME, FINAL_TMP_NAME) if (output_dir / n).exists()}


def _written_by_cli(output_dir: Path) -> set[str]:
    """Names in `output_dir` that a run of this CLI wrote, as recorded when it wrote them."""
    return set(_recorded(output_dir)) | _reserved(output_dir)


def card_name(output_dir: Path) -> str:
    """The name of the run's model card in `output_dir`: `README.md`, unless a `README.md` the run did not write is
    there (the user's own card, or one edited since): that one is kept and the run's card is `_hf-lwsam-card.md`."""
    readme = output_dir / CARD_NAME
    if (readme.exists() or readme.is_symlink()) and CARD_NAME not in _recorded(output_dir):
        return CARD_ASIDE_NAME
    return CARD_NAME


def write_card(output_dir: Path, save: Callable[[Path], Any]) -> Path:
    """Write the run's model card into `output_dir` whole (`save(path)` writes it) under `card_name`, recorded as
    written by this run; returns its path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / card_name(output_dir)
    partial = path.with_name(path.name + ".partial")
    save(partial)
    record_written(output_dir, {path.name: partial})
    os.replace(partial, path)
    return path


class OutputRecorder(TrainerCallback):
    r"""
    Records each checkpoint the Trainer saves in `output_dir`, and its `runs/` logs when this run created them.

    Args:
        output_dir (`Path`): the run's output directory.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.logs_were_there = (output_dir / LOGS_NAME).exists()

    def _record(self, args: Any, checkpoint: Path | None = None) -> None:
        entries = {checkpoint.name: checkpoint} if checkpoint is not None and checkpoint.is_dir() else {}
        logs = self.output_dir / LOGS_NAME
        if not self.logs_were_there and logs.is_dir() and LOGS_NAME not in _recorded(self.output_dir):
            entries[LOGS_NAME] = logs
        if args.should_save and entries:
            record_written(self.output_dir, entries)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(args)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(args, self.output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(args)


def _checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if _CHECKPOINT.match(p.name) and p.is_dir())


def _step(checkpoint_name: str) -> int:
    """The global step of a `checkpoint-N` folder's name."""
    return int(checkpoint_name.rsplit("-", 1)[1])


def _is_previous_run(output_dir: Path) -> bool:
    return bool(_recorded(output_dir)) or (output_dir / FINAL_TMP_NAME).is_dir() or bool(_checkpoints(output_dir))


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """`get_last_checkpoint(output_dir)`, skipping checkpoints without `trainer_state.json` (the Trainer writes it
    last, so a checkpoint without it was interrupted while being saved)."""
    last = get_last_checkpoint(str(output_dir))
    if last is None or os.path.isfile(os.path.join(last, TRAINER_STATE_NAME)):
        return last
    logger.warning(f"{last} is incomplete (no {TRAINER_STATE_NAME}: interrupted while saving); it is not resumed from")
    complete = [p for p in output_dir.iterdir() if _CHECKPOINT.match(p.name) and (p / TRAINER_STATE_NAME).is_file()]
    return str(max(complete, key=lambda p: _step(p.name))) if complete else None


def check_resume_checkpoint(path: str) -> None:
    """`--resume_from_checkpoint PATH` must be a checkpoint folder the Trainer wrote."""
    if not os.path.isdir(path):
        what = "is a file" if os.path.exists(path) else "does not exist"
        raise UsageError(f"--resume_from_checkpoint {path!r} {what}: pass a checkpoint-N folder, or leave the flag out "
                         "to resume from the last checkpoint in --output_dir.")
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise UsageError(f"--resume_from_checkpoint {path!r} is not a complete checkpoint (no {TRAINER_STATE_NAME}): "
                         "pass a checkpoint-N folder written by the Trainer.")


def _check_writable(output_dir: Path) -> None:
    """The nearest existing ancestor must be a directory we can create entries in (a probe folder is created and
    removed at once)."""
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output_dir {str(output_dir)!r} is under the file {str(existing)!r}: pass a directory "
                         "path.")
    writable = os.access(existing, os.W_OK | os.X_OK)
    if writable:  # os.access is True for root where mkdir still fails (/proc): create and remove a probe folder
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".hf-lwsam-probe-", dir=existing))
        except OSError:
            writable = False
    if not writable:
        raise UsageError(f"--output_dir {str(output_dir)!r} is not writable ({str(existing)!r} is read-only for this "
                         "user): pass a directory you can write to.")


def plan_output_dir(output_dir: Path, overwrite: bool, resume_from_checkpoint: str | None) -> OutputPlan:
    """Decide, without touching the disk, how the run uses `output_dir`. Raises `UsageError` for a directory that holds
    a finished run (without `--overwrite_output_dir`) or files this CLI did not write."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {str(output_dir)!r} is a file: pass a directory path.")
    _check_writable(output_dir)
    if resume_from_checkpoint:
        check_resume_checkpoint(resume_from_checkpoint)
    plan = OutputPlan(output_dir, checkpoint=resume_from_checkpoint or None)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return plan
    ours = _written_by_cli(output_dir)
    foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in ours)
    others = [name for name in _checkpoints(output_dir) if name not in ours]  # another tool's checkpoints
    if not _is_previous_run(output_dir):
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
            raise UsageError(
                f"--output_dir {str(output_dir)!r} holds files hf_lwsam did not write ({shown}) and no previous "
                "run" + (" (--overwrite_output_dir only removes a previous run's files)" if overwrite else "")
                + ": pass a new or empty --output_dir.")
        return plan
    if overwrite:
        if resume_from_checkpoint and Path(resume_from_checkpoint).resolve().is_relative_to(output_dir):
            raise UsageError("--resume_from_checkpoint is inside --output_dir, which --overwrite_output_dir clears: "
                             "drop one of the two flags.")
        if others:  # kept, the Trainer would resume from it or rotate it away: the user decides where it goes
            raise UsageError(f"--output_dir {str(output_dir)!r} holds {', '.join(others)}, which hf_lwsam did not "
                             "write, and --overwrite_output_dir removes only what it wrote: move it out of "
                             "--output_dir, or pass a new --output_dir.")
        plan.remove = sorted(p for p in output_dir.iterdir() if p.name in ours)
        return plan
    if (output_dir / RESULTS_NAME).is_file() and RESULTS_NAME not in ours:
        raise UsageError(f"--output_dir {str(output_dir)!r} holds a finished run hf_lwsam did not write "
                         f"({RESULTS_NAME}): pass a new --output_dir (with --resume_from_checkpoint to continue from "
                         "one of its checkpoints).")
    if (output_dir / RESULTS_NAME).is_file() and (output_dir / MANIFEST_NAME).is_file():
        raise UsageError(f"--output_dir {str(output_dir)!r} holds a finished run: pass --overwrite_output_dir to train "
                         "again from step 0 (only the previous run's files are removed), or a new --output_dir.")
    if others and plan.checkpoint is None:  # another tool's run (a stock Trainer's, `trl sft`): never continued unasked
        last = output_dir / max(others, key=_step)
        raise UsageError(f"--output_dir {str(output_dir)!r} holds {', '.join(others)}, which hf_lwsam did not write: "
                         f"pass --resume_from_checkpoint {str(last)!r} to continue that run, move it out of "
                         "--output_dir, or pass a new --output_dir.")
    if plan.checkpoint is None:
        plan.checkpoint = last_complete_checkpoint(output_dir)
    return plan


def apply_plan(plan: OutputPlan) -> None:
    """Remove what `--overwrite_output_dir` replaces (main process only), and log what the run resumes from."""
    if plan.remove:
        # Each entry is checked against the record again right before it is removed (time passed since the plan:
        # the model loaded); the record itself goes last.
        record, reserved = _read_record(plan.output_dir), _reserved(plan.output_dir)
        remove = [p for p in plan.remove if p.name in reserved or _still_recorded(plan.output_dir, p.name, record)]
        changed = sorted(p.name for p in plan.remove if p not in remove and (p.exists() or p.is_symlink()))
        kept = sorted(p.name for p in plan.output_dir.iterdir() if p not in remove)
        logger.warning(f"--overwrite_output_dir: removing the previous run's {', '.join(p.name for p in remove)} "
                       f"from {plan.output_dir}" + (f" (keeping {', '.join(kept)})" if kept else "")
                       + (f"; {', '.join(changed)} changed since the run wrote it and is kept" if changed else ""))
        for path in sorted(remove, key=lambda p: p.name == MANIFEST_NAME):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if plan.checkpoint is not None:
        state = json.loads(Path(plan.checkpoint, TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        logger.warning(f"Resuming from {plan.checkpoint} (global step {state.get('global_step')}); pass "
                       "--overwrite_output_dir to start over instead.")
    elif plan.output_dir.is_dir() and _is_previous_run(plan.output_dir) and not plan.remove:
        logger.warning(f"{plan.output_dir} holds a previous run without a complete checkpoint: starting from step 0.")


def begin_final_save(output_dir: Path) -> Path:
    """A fresh temporary folder inside `output_dir` for the final artefacts."""
    tmp = output_dir / FINAL_TMP_NAME
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _write_json_atomically(path: Path, value: dict, record: bool = False) -> None:
    """Write `path` whole or not at all; `record=True` records it as written by this run first."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    if record:
        record_written(path.parent, {path.name: partial})
    os.replace(partial, path)


def finish_final_save(output_dir: Path, tmp: Path, results: dict) -> None:
    """Record the artefacts in `tmp` as written by this run, rename them into `output_dir`, and write
    `all_results.json` last. Interrupted anywhere, the directory lacks `all_results.json` and a rerun resumes."""
    (output_dir / RESULTS_NAME).unlink(missing_ok=True)
    targets = {name: name for name in sorted(p.name for p in tmp.iterdir())}
    if CARD_NAME in targets and card_name(output_dir) != CARD_NAME:
        targets[CARD_NAME] = CARD_ASIDE_NAME
        logger.warning(f"{output_dir / CARD_NAME} was not written by hf_lwsam and is kept (it is what a Hub upload of "
                       f"the folder sends); the run's model card is {output_dir / CARD_ASIDE_NAME}")
    recorded = _recorded(output_dir)
    foreign = [t for t in targets.values()
               if t not in recorded and ((output_dir / t).exists() or (output_dir / t).is_symlink())]
    if foreign:  # another tool's files where the run's go (e.g. a stock Trainer finished here first): kept, moved aside
        kept = output_dir / KEPT_NAME
        kept.mkdir(exist_ok=True)
        for target in foreign:
            aside = kept / target
            n = 1
            while aside.exists() or aside.is_symlink():
                aside, n = kept / f"{target}.{n}", n + 1
            os.replace(output_dir / target, aside)
        logger.warning(f"{', '.join(foreign)} in {output_dir} were not written by hf_lwsam and are kept in {kept}; the "
                       "run's own files take their names")
    # renaming keeps what `_identity` reads (a directory's id, a file's inode, size and modification time)
    record_written(output_dir, {target: tmp / name for name, target in targets.items()})
    for name, target in targets.items():
        if (output_dir / target).is_dir() and not (output_dir / target).is_symlink():
            shutil.rmtree(output_dir / target)
        os.replace(tmp / name, output_dir / target)
    tmp.rmdir()
    _write_json_atomically(output_dir / RESULTS_NAME, results, record=True)
