"""Ascent schedules: which optimizer steps are SAM steps (`sam_start`, `sam_interval`), what the steps between do
(`sam_interval_reuse`), and where e_S comes from (`sam_ascent`).

When: optimizer step `s` is a SAM step when `s >= start` and `(s - start) % interval == 0`; `start` is `sam_start`, a
step or a fraction of the run's `max_steps` (the first step `s >= fraction * max_steps`). The interval counts from the
start, so the first step of the late phase is a SAM step. Every other step is a plain step: exactly the stock step,
or, with `sam_interval_reuse="looksam"`, a LookSAM step (after the late phase started): the stock step plus the kept
component (`sam.looksam_add_`) once per optimizer step, on the window's last micro-batch.

Where e_S comes from:
- `"exact"`: e_S from a truncated ascent pass at w on the same micro-batch (two passes; the default).
- `"stale"`: e_S from the gradient of S that the previous SAM step left in `.grad`: the accumulated (and, under DDP,
  all-reduced) gradient of its window at its perturbed point, copied after the window's last backward and before the
  optimizer step zeroes it. A SAM step is then one forward and one backward at w + e_S. Every process holds the same
  copy (DDP all-reduces `.grad` before the copy), so every process perturbs with the same e_S.
- `"random"`: Gaussian e (`sam.random_direction`), seeded by (seed, optimizer step, parameter index): one forward and
  one backward at w + e, the same noise on every process and after a resume, nothing kept.

The first stale SAM step of a run (or of the late phase), and the first one after the selection changed (a probe), has
no stale gradient of S: it is a plain step, whose gradient is recorded for the next SAM step. The kept vector (the
stale gradient of S, or LookSAM's g_v) is saved with every checkpoint (`lwsam_ascent.pt`) so that a resumed run
perturbs and reuses exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

STATE_FILE = "lwsam_ascent.pt"


class AscentSchedule:
    """The SAM-step policy and the kept vector of S (the stale gradient, or LookSAM's g_v).

    Args:
        interval (`int`): SAM steps are every `interval`-th optimizer step from `start` on.
        ascent (`str`): `"exact"`, `"stale"` or `"random"`.
        start (`int` or `float`, *optional*, defaults to `0`): an optimizer step, or a fraction in `[0, 1)` of the
            run's `max_steps`.
        reuse (`str`, *optional*, defaults to `"none"`): `"none"` or `"looksam"` (what the steps between do).
    """

    def __init__(self, interval: int = 1, ascent: str = "exact", start: int | float = 0, reuse: str = "none"):
        self.interval, self.ascent, self.start, self.reuse = interval, ascent, start, reuse
        self._names: list[str] = []
        self._grads: list[torch.Tensor] | None = None
        self._clean: list[torch.Tensor] | None = None  # LookSAM: the SAM window's clean gradient of S, summed

    def start_step(self, max_steps: int | None = None) -> int:
        """The first step of the SAM phase: `start` itself, or for a fraction the first step `s >= start * max_steps`
        (rounded to 9 digits first, so 0.7 * 10 is step 7, not 8)."""
        if isinstance(self.start, int):
            return self.start
        return math.ceil(round(self.start * max(int(max_steps or 0), 0), 9))

    def is_sam_step(self, step: int, max_steps: int | None = None) -> bool:
        start = self.start_step(max_steps)
        return step >= start and (step - start) % self.interval == 0

    def is_looksam_step(self, step: int, max_steps: int | None = None) -> bool:
        """A step between two SAM steps of the late phase on which LookSAM adds its kept component."""
        return self.looksam and step > self.start_step(max_steps) and not self.is_sam_step(step, max_steps)

    @property
    def stale(self) -> bool:
        return self.ascent == "stale"

    @property
    def random(self) -> bool:
        return self.ascent == "random"

    @property
    def looksam(self) -> bool:
        return self.reuse == "looksam"

    @property
    def keeps_state(self) -> bool:
        """Whether a checkpoint must carry the kept vector for an exact resume."""
        return self.stale or self.looksam

    def direction(self, names: list[str]) -> list[torch.Tensor] | None:
        """The kept vector of S for the parameters `names`, or `None` when there is none for this selection."""
        return self._grads if self._grads is not None and names == self._names else None

    @torch.no_grad()
    def keep(self, names: list[str], grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> None:
        """Copy the vector of S (stale: `.grad` after the window's last backward, before the optimizer step; LookSAM:
        g_v; a missing one as zeros shaped like `like`)."""
        self._names = list(names)
        self._grads = [torch.zeros_like(t) if g is None else g.detach().clone() for g, t in zip(grads, like)]

    # -- LookSAM: the SAM window's clean gradient of S -----------------------------------------------------------
    @torch.no_grad()
    def add_clean(self, grads: list[torch.Tensor]) -> None:
        """Add one micro-batch's ascent-pass gradient of S (the clean gradient, as pass 1 computed it) to the window's
        sum (copied: the ascent step reuses the storage of `grads`)."""
        if self._clean is None:
            self._clean = [g.detach().clone() for g in grads]
        else:
            torch._foreach_add_(self._clean, grads)

    def pop_clean(self) -> list[torch.Tensor]:
        """The window's clean gradient of S; the sum starts over."""
        clean, self._clean = self._clean, None
        return clean

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str) -> None:
        if self._grads is not None:
            torch.save({"names": self._names, "grads": [g.cpu() for g in self._grads], "kind": self._kind()},
                       os.path.join(checkpoint_dir, STATE_FILE))

    def load(self, checkpoint_dir: str, device: Any) -> None:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        state = torch.load(path, map_location=device, weights_only=True) if os.path.isfile(path) else None
        # A checkpoint of a run without a kept vector, or with another kind of one (stale gradient vs g_v): the next
        # SAM step starts over (a plain stale step; LookSAM reuses nothing until the next SAM step).
        if state is not None and state.get("kind", "stale") == self._kind():
            self._names, self._grads = state["names"], state["grads"]
        else:
            self._names, self._grads = [], None

    def _kind(self) -> str:
        return "looksam" if self.looksam else "stale"
