"""Preemption: save a checkpoint and stop cleanly when the job is told to stop (SIGTERM, as SLURM and Kubernetes send
before killing a job)."""

from __future__ import annotations

import signal
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PreemptionCallback(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that turns a termination signal into "save a checkpoint at the end of the
    current optimizer step, then stop training".

    While `Trainer.train` runs, the callback handles `signals` (SIGTERM by default) by setting a flag. At the end of
    each optimizer step it checks the flag and, when it is set, asks the Trainer for a checkpoint
    (`control.should_save`, honoured whatever the `save_strategy`) and to stop (`control.should_training_stop`).
    `train()` then returns normally; check `preempted` afterwards and exit non-zero, and resume later with
    `trainer.train(resume_from_checkpoint=True)` (or `get_last_checkpoint(output_dir)`). With more than one process
    the flag is all-reduced (max) at every step end, so every process stops at the same step even when only one
    received the signal. The previous signal handlers are restored when training ends, and by `LWSAMTrainer` when
    `train()` raises (with a stock `Trainer`, call `restore_signal_handlers()` in a `finally`).

    ```python
    callback = PreemptionCallback()
    trainer.add_callback(callback)
    trainer.train()
    if callback.preempted:
        sys.exit(f"preempted: checkpoint-{callback.stopped_at_step} saved; run again to resume")
    ```

    Args:
        signals (`tuple[int, ...]`, *optional*, defaults to `(signal.SIGTERM,)`):
            The signals to handle. Handlers can only be installed from the main thread; elsewhere the callback
            does nothing.

    Attributes:
        preempted (`bool`): whether training was stopped by a signal.
        stopped_at_step (`int | None`): the global step of the checkpoint saved on preemption.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.preempted = False
        self.stopped_at_step: int | None = None
        self._requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self._requested = True

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        if self._previous:  # the same train() again (`auto_find_batch_size` retries): a signal already received stays
            return
        self._requested, self.preempted, self.stopped_at_step = False, False, None
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                logger.warning(
                    f"PreemptionCallback cannot handle {signal.Signals(signum).name} outside the main thread"
                )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        requested = self._requested
        if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested and not self.preempted:
            self.preempted, self.stopped_at_step = True, state.global_step
            control.should_save = True
            control.should_training_stop = True
            logger.warning(f"Termination signal received: saving checkpoint-{state.global_step} and stopping training")
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any):
        self.restore_signal_handlers()

    def restore_signal_handlers(self) -> None:
        """Put back the handlers `on_train_begin` replaced (called at the end of training; `LWSAMTrainer.train` also
        calls it when training raises, which skips `on_train_end`: with a stock `Trainer`, call it in a `finally`)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
