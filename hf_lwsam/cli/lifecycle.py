"""What every command-line entry point shares: one lifecycle ([`run_command`]: output directory, resume, train,
final save with the model card, push, summary), training that resumes and stops cleanly on SIGTERM, the final save
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
from transformers.utils import logging

from ..model_card import ModelCardInfo
from ..preemption import PreemptionCallback
from .args import UsageError, brief, option_error
from .core import network_error, summary
from .output import (
    FINAL_TMP_NAME,
    UPLOAD_IGNORE,
    OutputPlan,
    OutputRecorder,
    apply_plan,
    begin_final_save,
    finish_final_save,
    plan_output_dir,
    record_written,
)
from .run_options import card_options, check_resume_options, run_options

logger = logging.get_logger("hf_lwsam.cli.train")

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


def _save_last_step(trainer: Any, output_dir: Path) -> Path:
    """The last step as `checkpoint-N` in `output_dir` (unless a complete one is there already), recorded as written
    by this run; its path."""
    step = trainer.state.global_step
    checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        trainer._save_checkpoint(trainer.model, trial=None)
        if trainer.args.should_save:
            record_written(output_dir, {checkpoint.name: checkpoint})
    return checkpoint


@contextlib.contextmanager
def preemptible_finish(trainer: Any, output_dir: Path) -> Iterator[None]:
    """Around the final evaluation and save, after training: nothing trained is lost when they do not finish.

    - SIGTERM stops them, the last step is saved as a checkpoint (unless one is there already), and `Preempted` is
      raised (exit 143).
    - An error (e.g. out of memory in the evaluation, a full disk, Ctrl-C) saves the last step the same way, logs
      where, and is raised again as it was.

    Running the command again resumes from that checkpoint with nothing left to train, so it only evaluates and saves.
    (Single process: with several, each rank handles the signal it receives itself, and an error is raised without
    a save, which would wait for the other ranks.)"""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = None
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the checkpoint below is written whole
        checkpoint = _save_last_step(trainer, output_dir)
        raise Preempted(f"stopped by SIGTERM during the final evaluation or save, after step "
                        f"{trainer.state.global_step} of {trainer.state.max_steps}; saved {checkpoint}: run the same "
                        "command again to finish (it evaluates and saves, with nothing left to train).") from None
    except (Exception, KeyboardInterrupt) as error:
        if trainer.args.world_size > 1:
            raise
        try:
            checkpoint = _save_last_step(trainer, output_dir)
        except Exception as failed:  # e.g. the disk is full: the original error is the one to see
            logger.error(f"The final evaluation or save failed ({type(error).__name__}) and the last step could not be "
                         f"saved as a checkpoint either ({type(failed).__name__}: {failed}).")
            raise error from None
        logger.error(f"The final evaluation or save failed ({type(error).__name__}: {error}) after step "
                     f"{trainer.state.global_step} of {trainer.state.max_steps}; the trained weights are saved in "
                     f"{checkpoint}: fix the cause and run the same command again to finish (it evaluates and saves, "
                     "with nothing left to train).")
        raise
    finally:
        if previous is not None:
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


class Command:
    r"""
    What one command supplies to [`run_command`], which runs the steps both commands share around them.

    Args:
        prog (`str`): the command's name, in its report.
        args (`TrainingArguments`): the parsed training arguments.
        run_args (*any*): holds `overwrite_output_dir` and `measure_plain_steps` (the options both commands add).
        options (`set[str]`): the command's option names: a `ValueError` raised while the trainer is built that names
            one of them (as `option_error` reads it) is reported as one line.
    """

    def __init__(self, prog: str, args: Any, run_args: Any, options: set[str]):
        self.prog, self.args, self.run_args, self.options = prog, args, run_args, options

    def prepare(self, output_dir: Path) -> ModelCardInfo:
        """Check and load the model, tokenizer and data (nothing written yet); what the card says about the run."""
        raise NotImplementedError

    def build_trainer(self, **common: Any) -> Any:
        """The trainer, built with `common` (`args`, `card_info`, `card_name`, `measure_plain_steps`); before the
        output directory is touched."""
        raise NotImplementedError

    def before_training(self, trainer: Any) -> None:
        """Called once the output directory is taken, before training (e.g. a metric of the untrained model)."""

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """The final evaluations' metrics, after training."""
        raise NotImplementedError

    def summary_rows(self, trainer: Any, metrics: dict[str, Any], card_info: ModelCardInfo) -> dict[str, str]:
        """The command's rows of the end-of-run report (label: value)."""
        raise NotImplementedError


def run_command(command: Command) -> dict[str, Any]:
    """The lifecycle of both commands: the Hub token out of the arguments, the output directory planned (a previous
    run's last checkpoint to resume from), `command.prepare` (every check before anything is written), the trainer
    built (and the Hub repo created) before the output directory is taken, training that resumes and stops cleanly on
    SIGTERM, the final evaluation and save (with the model card), the push and the summary; returns the final metrics.
    Raises `UsageError` for bad input and `Preempted` after a SIGTERM checkpoint."""
    args = command.args
    hub_token_to_environment(args)  # never pickled into training_args.bin
    logging.set_verbosity(args.get_process_log_level())
    output_dir = Path(args.output_dir).expanduser().resolve()
    plan = plan_output_dir(output_dir, command.run_args.overwrite_output_dir, args.resume_from_checkpoint)
    named = bool(args.resume_from_checkpoint)
    if plan.checkpoint is not None:  # resumed with the options it was trained with, unless named: checked before
        check_resume_options(plan.checkpoint, run_options(args), named)  # anything is loaded, then the model and data
    card_info = command.prepare(output_dir)
    if plan.checkpoint is not None:
        check_resume_options(plan.checkpoint, card_options(card_info), named, unrecorded_warning=False)
    card_info.repo_id = args.hub_model_id or output_dir.name
    point_at_output_dir(args, plan)
    try:  # built (the Hub repo created) before the output directory is touched
        with create_repo_failures(args):
            trainer = command.build_trainer(args=args, card_info=card_info, card_name=output_dir.name,
                                            measure_plain_steps=command.run_args.measure_plain_steps)
    except ValueError as e:  # a library's check that the command's own do not make, naming the option
        error = option_error(e, command.options)
        if error is None:
            raise  # not about an option: a bug, reported with its traceback
        raise error from None
    take_output_dir(args, plan)
    command.before_training(trainer)
    metrics = train_resumably(trainer, plan.checkpoint, output_dir)
    card_info.throughput = trainer.throughput(metrics["train_runtime"])
    card_info.train_loss = metrics.get("train_loss")
    with preemptible_finish(trainer, output_dir):
        metrics.update(command.evaluate(trainer))
        trainer.log_metrics("all", metrics)
        save_final(trainer, output_dir, metrics)
    if args.push_to_hub:
        with push_failures(trainer, output_dir):
            push_final(trainer, output_dir)  # uploads what save_final wrote, without saving again
    if trainer.is_world_process_zero():
        print(summary(command.prog, trainer, command.summary_rows(trainer, metrics, card_info), output_dir))
    return metrics
