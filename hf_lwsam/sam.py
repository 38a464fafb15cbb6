"""The SAM math, torch only: the ascent step e_S and its exact undo.

    g_S = dL/dw_S at w                         (S: the selected parameters)
    e_S = rho * g_S / ||g_S||                  (SAM; the norm is over S only)
    e_S = rho * T^2 g_S / ||T g_S||, T = |w_S| (ASAM, scale-invariant)
    descent gradient = dL/dw at (w_S + e_S, w_rest), for every trainable parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 in float32, without concatenating (the norm of the per-tensor norms)."""
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([t.float() for t in tensors])))


@torch.no_grad()
def ascent_direction(
    params: list[torch.Tensor], grads: list[torch.Tensor], rho: float, adaptive: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """e_S for `params` given their gradients `grads`, ||g_S|| (||T g_S|| for ASAM), and whether g_S is finite.

    Everything stays on the device (no host synchronisation): a non-finite g_S (fp16 overflow) gives e_S = 0, so that
    micro-batch takes a plain step, and `finite` says so for the logs. The result may reuse the storage of `grads`.
    """
    if adaptive:
        abs_w = torch._foreach_abs(params)
        grads = torch._foreach_mul(grads, abs_w)  # T g
    norm = global_norm(grads)
    finite = torch.isfinite(norm)
    scale = rho / (norm + 1e-12)  # rho / ||g_S||; a zero gradient gives e = 0
    if adaptive:
        torch._foreach_mul_(grads, abs_w)  # T (T g) = T^2 g
    torch._foreach_mul_(grads, scale)
    for g in grads:
        g.masked_fill_(~finite, 0.0)  # inf/NaN (and x * NaN) become 0: no perturbation, decided on the device
    return list(grads), norm, finite


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
