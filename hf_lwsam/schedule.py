"""Ascent schedules: which optimizer steps are SAM steps (`sam_interval`), and where e_S comes from (`sam_ascent`).

- `"exact"`: e_S from a truncated ascent pass at w on the same micro-batch (two passes; the default).
- `"stale"`: e_S from the gradient of S that the previous SAM step left in `.grad`: the accumulated (and, under DDP,
  all-reduced) gradient of its window at its perturbed point, copied after the window's last backward and before the
  optimizer step zeroes it. A SAM step is then one forward and one backward at w + e_S. Every process holds the same
  copy (DDP all-reduces `.grad` before the copy), so every process perturbs with the same e_S.

The first SAM step of a run, and the first one after the selection changed (a probe), has no stale gradient of S: it
is a plain step, whose gradient is recorded for the next SAM step. The copy is saved with every checkpoint
(`lwsam_ascent.pt`) so that a resumed run perturbs exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

STATE_FILE = "lwsam_ascent.pt"


class AscentSchedule:
    """The SAM-step policy and, for `"stale"`, the kept gradient of S.

    Args:
        interval (`int`): SAM steps are the optimizer steps `s` with `s % interval == 0`.
        ascent (`str`): `"exact"` or `"stale"`.
    """

    def __init__(self, interval: int = 1, ascent: str = "exact"):
        self.interval, self.ascent = interval, ascent
        self._names: list[str] = []
        self._grads: list[torch.Tensor] | None = None

    def is_sam_step(self, step: int) -> bool:
        return step % self.interval == 0

    @property
    def stale(self) -> bool:
        return self.ascent == "stale"

    def direction(self, names: list[str]) -> list[torch.Tensor] | None:
        """The kept gradient of S for the parameters `names`, or `None` when there is none for this selection."""
        return self._grads if self._grads is not None and names == self._names else None

    @torch.no_grad()
    def keep(self, names: list[str], grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> None:
        """Copy the gradient of S (`.grad` after the window's last backward, before the optimizer step; a missing one
        as zeros shaped like `like`)."""
        self._names = list(names)
        self._grads = [torch.zeros_like(t) if g is None else g.detach().clone() for g, t in zip(grads, like)]

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save(self, checkpoint_dir: str) -> None:
        if self._grads is not None:
            torch.save({"names": self._names, "grads": [g.cpu() for g in self._grads]},
                       os.path.join(checkpoint_dir, STATE_FILE))

    def load(self, checkpoint_dir: str, device: Any) -> None:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if os.path.isfile(path):
            state = torch.load(path, map_location=device, weights_only=True)
            self._names, self._grads = state["names"], state["grads"]
        else:  # a checkpoint of a run without a kept gradient: the next SAM step is a plain one
            self._names, self._grads = [], None
