"""What every command-line entry point shares: training that resumes and stops cleanly on SIGTERM, the final save
that is renamed into place, and the exit codes (0 done, 2 bad input, 143 preempted; one line on stderr)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..preemption import PreemptionCallback
from .args import UsageError, brief
from .core import network_error
from .output import (
    FINAL_TMP_NAME,
    UPLOAD_IGNORE,
    OutputPlan,
    OutputRecorder,
    apply_plan,
    begin_final_save,
    finish_final_save,
    record_written,
)

EXIT_PREEMPTED = 128 + 15  # the shell's status for SIGTERM


class Preempted(Exception):
    """Training stopped on a termination signal after saving a checkpoint; running the command again resumes."""


HUB_TOKEN_FLAGS = ("--hub_token", "--hub-token")


def without_hub_token(argv: list[str]) -> list[str]:
    """`argv` without its `--hub_token TOKEN` and `--hub_token=TOKEN` arguments."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in HUB_TOKEN_FLAGS:
            skip = True  # and its value, the next argument
        elif not arg.startswith(tuple(f"{flag}=" for flag in HUB_TOKEN_FLAGS)):
            kept.append(arg)
    return kept


def hub_token_to_environment(args: Any) -> None:
    """Move `--hub_token` into `HF_TOKEN`, where `huggingface_hub` reads it for every Hub call, and clear it from
    `args` and from `sys.argv`: the Trainer pickles its arguments into the `training_args.bin` of every checkpoint and
    of the final folder, which `--push_to_hub` uploads, and integrations record `sys.argv` (the process's command line
    in `/proc/PID/cmdline` keeps it: `hf auth login` keeps the token off the command line)."""
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
    args.hub_token = None
    sys.argv[:] = without_hub_token(sys.argv)


def _from_network(error: BaseException) -> bool:
    """An error of the Hub (huggingface_hub's own errors) or of the connection to it, not of the local disk."""
    return network_error(error) or any(cls.__module__.split(".")[0] == "huggingface_hub" for cls in type(error).__mro__)


def _is_hub_failure(error: BaseException) -> bool:
    return isinstance(error, OSError) or _from_network(error)


@contextlib.contextmanager
def hub_failures(action: str, fix: str | Callable[[BaseException], str], enabled: bool = True) -> Iterator[None]:
    """A failure of the Hub, of the network or of a file read for the upload inside (with `enabled`) becomes one
    `UsageError` line: `--push_to_hub could not {action} ({error}): {fix}` (`fix` may depend on the error)."""
    try:
        yield
    except Exception as e:
        if not enabled or not _is_hub_failure(e):
            raise
        advice = fix(e) if callable(fix) else fix
        raise UsageError(f"--push_to_hub could not {action} ({type(e).__name__}: {brief(str(e), 200)}): "
                         f"{advice}") from None


def create_repo_failures(args: Any) -> contextlib.AbstractContextManager:
    """`hub_failures` around building the trainer, which creates the Hub repo with `--push_to_hub`."""
    return hub_failures(f"create the Hub repo {args.hub_model_id!r}", "check the network and the token (HF_TOKEN, "
                        "hf auth login or --hub_token), or drop --push_to_hub.", enabled=args.push_to_hub)


def push_failures(trainer: Any, output_dir: Path) -> contextlib.AbstractContextManager:
    """`hub_failures` around the final push ([`push_final`], which only reads `output_dir`): the message says what
    failed, where the saved model is and how to upload it."""
    repo = trainer.hub_model_id or trainer.args.hub_model_id
    upload = f"upload it with hf upload {repo} {output_dir} --exclude 'checkpoint-*' '_*'."

    def fix(error: BaseException) -> str:
        if _from_network(error):
            return f"check the network and the token; nothing is lost, the trained model is saved in {output_dir}: " \
                   + upload
        return (f"a file in {output_dir} could not be read for the upload; the trained model is saved there as the "
                f"run wrote it (the upload only reads it): fix the cause, then {upload}")

    return hub_failures(f"upload to the Hub repo {repo!r}", fix)


def push_final(trainer: Any, output_dir: Path) -> None:
    """Upload the saved `output_dir` to the run's Hub repo as `Trainer.push_to_hub` uploads it (after any checkpoint
    push in progress, the same ignore patterns plus the directories' ids), without saving into it again: the final
    save wrote it whole, the upload only reads it."""
    from huggingface_hub import HfApi

    args = trainer.args
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    if not trainer.is_world_process_zero():
        return
    if trainer.hub_model_id is None:
        trainer.init_hf_repo()
    trainer._finish_current_push()
    HfApi().upload_folder(repo_id=trainer.hub_model_id, folder_path=str(output_dir), commit_message="End of training",
                          token=args.hub_token, ignore_patterns=UPLOAD_IGNORE, revision=args.hub_revision)


def point_at_output_dir(args: Any, plan: OutputPlan) -> None:
    """Point the run at `plan.output_dir` and name the Hub repo after it unless `--hub_model_id` did (nothing is
    written)."""
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = plan.output_dir.name
    args.output_dir = str(plan.output_dir)


def take_output_dir(args: Any, plan: OutputPlan) -> None:
    """Apply `plan` to its output directory (main process first: the only place a previous run's files are removed,
    with --overwrite_output_dir), point the run at it, and name the Hub repo after it unless `--hub_model_id` did."""
    point_at_output_dir(args, plan)
    with args.main_process_first(desc="output directory"):
        if args.should_save:
            apply_plan(plan)


class LogLastStep(TrainerCallback):
    """Under several processes, log at the last step: the `Trainer` adds the loss since the last log to `train_loss`
    from each process's own value, not averaged over the processes, so without it `train_loss` is rank-local."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.world_size > 1 and state.global_step >= state.max_steps:
            control.should_log = True


def train_resumably(trainer: Any, checkpoint: str | None, output_dir: Path) -> dict[str, Any]:
    """`trainer.train()` from `checkpoint` (or step 0) with a `PreemptionCallback`, recording each checkpoint in
    `output_dir` as written by this run; its metrics, or `Preempted`. `train_loss` is averaged over the processes."""
    preemption = PreemptionCallback()
    trainer.add_callback(preemption)
    trainer.add_callback(LogLastStep())
    trainer.add_callback(OutputRecorder(output_dir))
    start = json.loads(Path(checkpoint, TRAINER_STATE_NAME).read_text())["global_step"] if checkpoint else None
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if preemption.preempted:
        step = preemption.stopped_at_step
        raise Preempted(f"stopped by SIGTERM at step {step} of {trainer.state.max_steps}; saved "
                        f"{output_dir / f'checkpoint-{step}'}: run the same command again to resume from it.")
    metrics = dict(result.metrics)
    earlier = [entry for entry in trainer.state.log_history[:-1] if "train_loss" in entry]
    if start == trainer.state.global_step and earlier:
        # Resumed after the last step (stopped during the final evaluation or save): nothing was trained now, so the
        # training metrics are the ones the interrupted run logged when its training ended.
        metrics.update({key: value for key, value in earlier[-1].items() if key != "step"})
    return metrics


class _Terminated(BaseException):
    """SIGTERM during the final evaluation or save (a BaseException, so no library `except Exception` swallows it)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def preemptible_finish(trainer: Any, output_dir: Path) -> Iterator[None]:
    """Around the final evaluation and save, after training: SIGTERM stops them, the last step is saved as a
    checkpoint (unless one is there already), and `Preempted` is raised (exit 143). Running the command again
    resumes from that checkpoint with nothing left to train, so it only evaluates and saves. (Single process: with
    several, each rank handles the signal it receives itself.)"""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the checkpoint below is written whole
        step = trainer.state.global_step
        checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not (checkpoint / TRAINER_STATE_NAME).is_file():
            trainer._save_checkpoint(trainer.model, trial=None)
            if trainer.args.should_save:
                record_written(output_dir, {checkpoint.name: checkpoint})
        raise Preempted(f"stopped by SIGTERM during the final evaluation or save, after step {step} of "
                        f"{trainer.state.max_steps}; saved {checkpoint}: run the same command again to finish "
                        "(it evaluates and saves, with nothing left to train).") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def save_final(trainer: Any, output_dir: Path, metrics: dict[str, Any]) -> None:
    """The final weights, tokenizer, model card (written by the trainer's `save_model`, [`ModelCardMixin`]) and
    `trainer_state.json` go to a temporary folder and are renamed into `output_dir`; `all_results.json` is written
    last. Interrupted anywhere, the directory does not look finished and a rerun resumes."""
    args = trainer.args
    tmp = output_dir / FINAL_TMP_NAME
    with args.main_process_first(desc="final save"):
        if args.should_save:
            begin_final_save(output_dir)
    trainer.save_model(str(tmp), _internal_call=True)  # no push from here: it comes once, after the rename
    if args.should_save:
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        finish_final_save(output_dir, tmp, metrics)
    trainer.accelerator.wait_for_everyone()


def console_main(prog: str, run: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run `run(argv)`: 0 on success, 2 on bad input and 143 when preempted, each failure as one line on stderr."""
    try:
        with warnings.catch_warnings():
            # TRL and PEFT read this deprecated transformers property: its FutureWarning is not the user's to act on
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            run(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if PartialState().is_main_process:
            print(f"{prog}: preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
