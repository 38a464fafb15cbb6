"""The speed both CLIs report: train time, tokens/s and the SAM step's time against a plain step of the same run."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from transformers import Trainer

from ..model_card import ModelCardInfo, sam_mode
from ..reuse import capture_rng, restore_rng


class ThroughputMixin:
    r"""
    Mixin for an [`LWSAMTrainer`] (or a TRL trainer built by `lwsam_trainer`): counts the tokens it trains on and, on
    a few SAM steps spread over the run's SAM steps, also times a plain (non-SAM) step on the same batch and discards
    its gradients and records: the SAM step's cost, in the mode that runs.

    Args:
        measure_plain_steps (`int`, *optional*, defaults to `4`):
            How many SAM micro-batches are also timed as plain steps (single process only; 0 disables).
        *other arguments*: as for the trainer it is mixed into.
    """

    def __init__(self, *a: Any, measure_plain_steps: int = 4, **kw: Any):
        super().__init__(*a, **kw)
        self.measure_plain_steps = measure_plain_steps
        self.sam_step_times: list[float] = []
        self.plain_step_times: list[float] = []
        self.tokens_seen = 0
        self._sam_micro_batches = 0  # SAM steps' micro-batches trained so far

    def _sync(self) -> None:
        if self.args.device.type == "cuda":
            torch.cuda.synchronize()

    def sam_steps_in_run(self) -> int:
        """How many of the run's optimizer steps are SAM steps (`sam_start`, `sam_interval`)."""
        schedule, max_steps = self._schedule, self.state.max_steps
        return len(range(schedule.start_step(max_steps), max_steps, schedule.interval))

    def _may_time_plain_step(self) -> bool:
        """On SAM steps only, every `stride`-th of their micro-batches after the first, so the timed pairs spread over
        the run's SAM steps."""
        n = self.measure_plain_steps
        if n <= 0 or self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self._sam_micro_batches <= 1:
            return False
        if not self._schedule.is_sam_step(self.state.global_step, self.state.max_steps):
            return False
        stride = max(self.sam_steps_in_run() * self.args.gradient_accumulation_steps // (n + 1), 1)
        return (self._sam_micro_batches - 1) % stride == 0 and len(self.plain_step_times) < n

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        # the tokens trained on: the attention mask's ones, or every position of a padding-free (packed) batch
        mask = inputs.get("attention_mask")
        self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self._sam_micro_batches += self._schedule.is_sam_step(self.state.global_step, self.state.max_steps)
        if not self._may_time_plain_step():
            return super().training_step(model, inputs, num_items_in_batch)
        # The stock step on the same batch, for the overhead figure. It leaves no trace: its gradients, the RNG draws
        # and what its `compute_loss` records (TRL's metrics and token count) are put back, so a measured run trains
        # and logs exactly like an unmeasured one. The order alternates so that neither step always runs warm.
        params = [p for p in model.parameters() if p.requires_grad]

        def plain_step() -> float:
            """Time the stock step, then put back `.grad`, the RNG state and the records it found."""
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            rng = capture_rng()
            with self._compute_loss_records_undone():
                self._sync()
                begin = time.perf_counter()
                Trainer.training_step(self, model, inputs, num_items_in_batch)
                self._sync()
                elapsed = time.perf_counter() - begin
            for p, g in zip(params, grads):
                p.grad = g
            restore_rng(rng)
            return elapsed

        plain_first = len(self.plain_step_times) % 2 == 0
        plain = plain_step() if plain_first else 0.0
        self._sync()
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._sync()
        sam = time.perf_counter() - start
        if not plain_first:
            plain = plain_step()
        self.plain_step_times.append(plain)
        self.sam_step_times.append(sam)
        return loss

    def throughput(self, train_runtime: float) -> dict[str, Any]:
        """Train time, tokens/s (without the timed plain steps) and the SAM step / plain step time ratio."""
        measured = sum(self.plain_step_times)
        seconds = max(train_runtime - measured, 1e-9)
        result: dict[str, Any] = {
            "train_runtime": round(train_runtime, 1),
            "tokens_per_second": round(self.tokens_seen * self.accelerator.num_processes / seconds, 1),
            "device": f"{self.accelerator.num_processes} x {self.args.device.type}",
        }
        if self.plain_step_times and self.sam_step_times:
            ratio = statistics.median(sam / plain for sam, plain in zip(self.sam_step_times, self.plain_step_times))
            result.update(sam_overhead=round(ratio, 2), plain_steps=len(self.plain_step_times),
                          sam_steps=self.sam_steps_in_run(), max_steps=self.state.max_steps)
        return result


def speed_rows(trainer: Any, info: ModelCardInfo, trained: str) -> dict[str, str]:
    """The end-of-run report's speed rows from `info.throughput`: train time (with `info.num_train_examples` of what
    `trained` names, e.g. `"examples"`, and the steps), tokens/s and the SAM step / plain step time ratio."""
    t = info.throughput
    return {
        "train time": f"{t['train_runtime']:.1f} s ({info.num_train_examples:,} {trained}, "
                      f"{trainer.state.global_step} steps)",
        "tokens/s": f"{t['tokens_per_second']:,.0f}",
        sam_mode(trainer.args) + " vs plain": (
            f"{t['sam_overhead']:.2f}x step time (median over {t['plain_steps']} of the run's {t['sam_steps']} SAM "
            f"steps, of {t['max_steps']} steps in all; each also timed as a plain step)" if t.get("sam_overhead") else
            "not measured (--measure_plain_steps 0, multi-process, or too few SAM steps)"),
    }
