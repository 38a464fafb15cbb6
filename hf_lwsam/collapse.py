"""A guard against a rho too large to train: SAM's ascent can pin the model at a flat, useless point (a classifier
stuck at the uniform prediction, loss ln(num_classes)) while every step still runs. Measured on the digits ViT with
40% noisy labels: the default selection at `sam_rho=0.5` kept the clean loss at 2.30 = ln 10 for all 960 steps (test
accuracy 0.09), with the perturbed loss 0.01-0.48 above it. At 0.2 it stayed there for 120 steps, then trained; AdamW
(rho 0) left it after about 60. Judged at a quarter of the run, only the collapsed run is stuck: rho 0 / 0.05 / 0.2 /
0.5 had a clean loss 2.32 -> 1.78 / 1.78 / 1.92 / 2.30 at step 240 of 960.

`CollapseWatch` reads the `sam/*` window averages the trainer logs and warns once when, past a warm-up share of the
run, the clean loss has not fallen below (1 - `min_drop`) of its first window while SAM steps keep a positive
sharpness: SAM is running and the model is not learning. It never changes training.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CollapseWatch:
    """Warns once when the clean loss of the SAM steps stops falling.

    Args:
        rho (`float`): the run's `sam_rho`, named in the warning.
        min_drop (`float`, *optional*, defaults to `0.02`):
            The relative fall of the clean loss, from the first logging window, below which the run counts as stuck.
        after_fraction (`float`, *optional*, defaults to `0.25`):
            The share of the run's optimizer steps to wait before judging (warm-up and the first epochs).
        min_windows (`int`, *optional*, defaults to `3`):
            Logging windows with SAM losses to wait for at least.
    """

    rho: float
    min_drop: float = 0.02
    after_fraction: float = 0.25
    min_windows: int = 3
    _first: float | None = field(default=None, init=False)
    _windows: int = field(default=0, init=False)
    done: bool = field(default=False, init=False)  # judged once: warned, or the loss fell

    def observe(self, logs: dict[str, float], step: int, max_steps: int) -> str | None:
        """Feed one logging window (`loss` and, on exact SAM steps, `sam/loss_perturbed`, `sam/sharpness`); returns the
        warning if this is the window that judges the run and it looks stuck, else `None`."""
        if self.done or "sam/sharpness" not in logs:
            return None
        clean = logs["sam/loss_perturbed"] - logs["sam/sharpness"]  # the SAM steps' clean loss (not the plain ones')
        self._windows += 1
        if self._first is None:
            self._first = clean
            # A run whose SAM losses start late (a resume, sam_start) is past its fast-falling phase: never judged.
            self.done = step >= self.after_fraction * max_steps
        if self._windows < self.min_windows or step < self.after_fraction * max_steps:
            return None
        self.done = True
        if clean < (1 - self.min_drop) * self._first or logs["sam/sharpness"] <= 0:
            return None
        return (f"LW-SAM: after {step} of {max_steps} steps the clean loss has not fallen ({self._first:.4f} -> "
                f"{clean:.4f}) while the perturbed loss stays {logs['sam/sharpness']:.4f} above it: sam_rho={self.rho} "
                "may be too large to train with this selection (the ascent can pin the model at a flat point). Try a "
                "rho about 10x smaller; see the README's safe rho ranges.")
