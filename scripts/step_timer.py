"""The benchmarks' step timer (scripts beside this file): the wall time of each optimizer step, seen from the
`Trainer` loop."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    r"""
    A [`~transformers.TrainerCallback`] that records the wall time of every optimizer step in `times` (seconds), from
    `on_step_begin` to `on_step_end`: the data loading is left out, forward, backward, clipping and the optimizer
    step are in. Drop the first few entries (warm-up) before taking a mean or median.

    Args:
        device (`str`, *optional*, defaults to `"cpu"`):
            With `"cuda"`, the device is synchronised at both ends, so the time covers the queued kernels too.
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.times, self._t0 = device, [], 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._t0)
