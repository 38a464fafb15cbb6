"""The SAM math, torch only: the ascent step e_S and its exact undo.

    g_S = dL/dw_S at w                         (S: the selected parameters)
    e_S = rho * g_S / ||g_S||                  (SAM; the norm is over S only)
    e_S = rho * T^2 g_S / ||T g_S||, T = |w_S| (ASAM, scale-invariant)
    descent gradient = dL/dw at (w_S + e_S, w_rest), for every trainable parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 in float32, without concatenating (the norm of the per-tensor norms)."""
    if not tensors:  # e.g. a process whose shards of S are empty
        return torch.zeros((), device=torch.get_default_device())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.float() for t in tensors])))


@torch.no_grad()
def ascent_direction(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, adaptive: bool = False,
    sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """e_S for `params` given their gradients `grads`, ||g_S|| (||T g_S|| for ASAM), and whether e_S is usable.

    Everything stays on the device (no host synchronisation): a non-finite g_S (fp16 overflow) or a zero one gives
    e_S = 0, so that micro-batch takes a plain step, and `usable` (finite and non-zero) says so for the logs
    (`sam/skipped`): a vanishing ascent is counted, never silent. The result may reuse the storage of `grads`.
    `sum_across`: for shards of S held by several processes (FSDP2), the sum of a tensor over them (an all-reduce), so
    the norm is the norm of the whole g_S.
    """
    if adaptive:
        abs_w = torch._foreach_abs(params)
        grads = torch._foreach_mul(grads, abs_w)  # T g
    norm = global_norm(grads)
    if sum_across is not None:
        norm = sum_across(norm.pow(2)).sqrt()  # the shards' squared norms add up to the whole one's
    usable = torch.isfinite(norm) & (norm > 0)  # not an overflow, and not a gradient that vanished
    scale = rho / (norm + 1e-12)  # rho / ||g_S||; a zero gradient gives e = 0
    if adaptive:
        torch._foreach_mul_(grads, abs_w)  # T (T g) = T^2 g
    torch._foreach_mul_(grads, scale)
    for g in grads:
        g.masked_fill_(~usable, 0.0)  # inf/NaN (and x * NaN) become 0: no perturbation, decided on the device
    return list(grads), norm, usable


@dataclass
class Perturbation:
    """An ascent step applied in place, with the saved values that undo it bit-exactly (w + e - e != w in floats).

    Use `Perturbation.apply(params, e)`, then `restore()` (idempotent) in a `finally`.
    """

    params: list[torch.Tensor]
    backup: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    @torch.no_grad()
    def apply(cls, params: list[torch.Tensor], steps: list[torch.Tensor]) -> Perturbation:
        """Add `steps` to `params` in place."""
        backup = [p.detach().clone() for p in params]
        torch._foreach_add_(params, steps)
        return cls(params=params, backup=backup)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back; a no-op the second time."""
        if self.backup:
            torch._foreach_copy_(self.params, self.backup)
            self.backup = []
