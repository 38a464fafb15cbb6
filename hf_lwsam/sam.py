"""The SAM math, torch only: the ascent step e_S and its exact undo.

    g_S = dL/dw_S at w                         (S: the selected parameters)
    e_S = rho * g_S / ||g_S||                  (SAM; the norm is over S only)
    e_S = rho * T^2 g_S / ||T g_S||, T = |w_S| (ASAM, scale-invariant)
    descent gradient = dL/dw at (w_S + e_S, w_rest), for every trainable parameter.

LookSAM (Liu et al., CVPR 2022, Algorithm 1), over S as one vector:
    SAM step:      g_v = g_s - (<g_s, g> / ||g||^2) g      (g_s: SAM gradient, g: clean gradient, both of S)
    steps between: g  <-  g + alpha * ||g|| / ||g_v|| * g_v

Momentum-SAM (Becker, Altrock, Fischer, arXiv 2401.12033; reference code MarlonBecker/MSAM, optimizer/adamW_msam.py):
    e_S = -rho * m_S / ||m_S||   (m: the optimizer's first moment after the previous optimizer step)
    the gradient is taken once, at (w_S + e_S, w_rest), and the optimizer steps at w.

Random-weight perturbation (RWP, TMLR 2024; Flat-LoRA, ICML 2025), per output row r of each weight W:
    e[r] ~ N(0, rho^2 ||W[r]||^2 / n I)   (n = the row's length; a 1-D parameter: e[i] ~ N(0, rho^2 w[i]^2))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import sqrt
from typing import ClassVar

import torch

_NORM_CHUNK = 2**20  # elements: the CPU widens one bf16/fp16 piece at a time to float32 (4 MiB), never a tensor
_ADD_CHUNK = 2**17  # elements: a scaled perturbation is added one chunk (512 KiB of float32) at a time, in the cache


def _norm_pieces(t: torch.Tensor) -> list[torch.Tensor]:
    """`t` as the pieces whose norms make up its norm: a contiguous bf16/fp16 tensor in chunks (views, no copy), a
    float64 one narrowed to float32 as before, anything else as it is."""
    if t.dtype in (torch.bfloat16, torch.float16) and t.is_contiguous():
        return list(t.view(-1).split(_NORM_CHUNK))
    return [t.float()] if t.dtype == torch.float64 else [t]


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """||concat(tensors)||_2 in float32, without concatenating (the norm of the per-tensor norms).

    float32 tensors: the norm of their `torch._foreach_norm`s, bit for bit. bf16/fp16 tensors are read in their
    own dtype and summed in float32 (`dtype=torch.float32`): no float32 copy of them at once (the CPU kernel widens
    one chunk of `_NORM_CHUNK` elements at a time), equal to the norm of their float32 copies within float32
    rounding (the summation order differs)."""
    if not tensors:  # e.g. a process whose shards of S are empty
        return torch.zeros((), device=torch.get_default_device())
    pieces = [piece for t in tensors for piece in _norm_pieces(t)]
    if all(piece.dtype == torch.float32 for piece in pieces):
        norms = torch._foreach_norm(pieces)
    else:
        norms = torch._foreach_norm(pieces, 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


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
    norm, usable, scale = _norm_scale(grads, rho, sum_across)
    if adaptive:
        torch._foreach_mul_(grads, abs_w)  # T (T g) = T^2 g
    torch._foreach_mul_(grads, scale)
    return _zero_unless(usable, grads), norm, usable


def _norm_scale(tensors: list[torch.Tensor], rho: float, sum_across: Callable[[torch.Tensor], torch.Tensor] | None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """||tensors|| (over every process's shards with `sum_across`), whether it is usable (finite and non-zero: not an
    overflow, not a vanished direction) and rho / ||tensors||, all on the device."""
    norm = global_norm(tensors)
    if sum_across is not None:
        norm = sum_across(norm.pow(2)).sqrt()  # the shards' squared norms add up to the whole one's
    usable = torch.isfinite(norm) & (norm > 0)
    return norm, usable, rho / (norm + 1e-12)  # a zero direction gives e = 0


def _zero_unless(usable: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    """`steps`, zeroed in place where not `usable`: inf/NaN (and x * NaN) become 0, no perturbation, decided on the
    device."""
    for e in steps:
        e.masked_fill_(~usable, 0.0)
    return list(steps)


@torch.no_grad()
def momentum_direction(
    moments: list[torch.Tensor], rho: float, sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Momentum-SAM's e_S = -rho * m_S / ||m_S|| for the first moments `moments` of S, ||m_S||, and whether e_S is
    usable. The sign is the reference code's (`p.sub_(exp_avg, alpha=rho / ||exp_avg||)`): the perturbation points
    along the optimizer's own next step, -m.

    As in `ascent_direction`, everything stays on the device: a non-finite or zero m_S gives e_S = 0 (counted in
    `sam/skipped`). `moments` are not modified. `sum_across`: the sum over the processes holding shards (FSDP2)."""
    scale, norm, usable = momentum_scale(moments, rho, sum_across)
    return _zero_unless(usable, torch._foreach_mul(moments, scale)), norm, usable  # -rho m / ||m||, new tensors


@torch.no_grad()
def momentum_scale(
    moments: list[torch.Tensor], rho: float, sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factor s of Momentum-SAM's e_S = s * m_S: -rho / ||m_S|| where m_S is usable (finite and non-zero), 0 where
    not; with ||m_S|| and whether it is usable, all on the device. `Perturbation.apply(params, moments, scale=s)`
    perturbs by it without forming e_S (`momentum_direction` forms it)."""
    norm, usable, scale = _norm_scale(moments, -rho, sum_across)
    return torch.where(usable, scale, 0.0), norm, usable  # 0: no perturbation (m * 0 may be NaN: never formed)


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """<concat(a), concat(b)> in float32."""
    if not a:
        return torch.zeros((), device=torch.get_default_device())
    return torch.stack([(x.float() * y.float()).sum() for x, y in zip(a, b)]).sum()


@torch.no_grad()
def looksam_component(sam_grads: list[torch.Tensor], clean_grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """LookSAM's kept component g_v = g_s - ||g_s|| cos(g, g_s) g / ||g|| = g_s - (<g_s, g> / ||g||^2) g: the part of
    the SAM gradient orthogonal to the clean one, over the whole of `sam_grads` as one vector (Algorithm 1 of the
    paper). Only g's direction enters, so g may be on any scale (a sum or a mean over processes and micro-batches).
    A zero g gives g_v = g_s; a non-finite input gives a non-finite g_v, which `looksam_add_` then ignores."""
    coef = _dot(sam_grads, clean_grads) / (global_norm(clean_grads).pow(2) + 1e-30)  # <g_s, g> / ||g||^2
    return [(s.float() - coef * c.float()).to(s.dtype) for s, c in zip(sam_grads, clean_grads)]


@torch.no_grad()
def looksam_add_(grads: list[torch.Tensor], component: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """`grads += alpha * ||grads|| / ||g_v|| * g_v` in place (LookSAM's step between SAM steps), on the device.

    The ratio ||g|| / ||g_v|| makes the added term scale with `grads` only: under fp16 loss scaling `grads` and the
    term carry the same scale. A zero or non-finite g_v (an fp16 overflow on its SAM step), or a non-finite `grads`
    (a step the GradScaler skips anyway), adds nothing. Returns whether the term was added (a device bool)."""
    norm, kept_norm = global_norm(grads), global_norm(component)
    usable = torch.isfinite(norm) & torch.isfinite(kept_norm) & (kept_norm > 0)
    coef = torch.where(usable, alpha * norm / (kept_norm + 1e-30), torch.zeros_like(norm))
    for g, v in zip(grads, component):
        # where, not coef = 0 alone: inf * 0 is NaN. Unusable: grads are left as they are.
        g.add_(torch.where(usable, v.float() * coef, 0.0).to(g.dtype))
    return usable


def noise_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of parameter `index`'s noise at optimizer step `step`: the same on every process and after a
    resume, distinct across steps and parameters."""
    return (int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(index) & (2**63 - 1)


@torch.no_grad()
def random_direction(
    params: list[torch.Tensor], rho: float, seeds: list[int], row_dims: list[int],
    references: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Gaussian e for `params`, scaled per output row by the row's norm (Flat-LoRA's filter-wise noise):
    e[r] ~ N(0, rho^2 ||R[r]||^2 / n I), R the reference weight (`references`, e.g. a LoRA module's merged weight
    W + s B A; default the parameter itself), r indexing dimension `row_dims[i]` (1 for GPT-2's `Conv1D`, which stores
    W transposed) and n the number of entries of a row; a 1-D parameter: e[i] ~ N(0, rho^2 w[i]^2).

    Parameter i draws from its own `torch.Generator` seeded with `seeds[i]` (see `noise_seed`), on its device, so the
    global RNG stream (dropout) is untouched. The noise is drawn in float32 and returned in the parameter's dtype."""
    out = []
    for i, (p, seed, row_dim) in enumerate(zip(params, seeds, row_dims)):
        ref = (p if references is None else references[i]).detach().float()
        generator = torch.Generator(device=p.device)
        generator.manual_seed(seed)
        noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        if p.dim() < 2:
            scale = ref.abs()  # each entry is its own output unit
        else:
            rows = ref.movedim(row_dim, 0).flatten(1)  # (rows, n)
            shape = [1] * p.dim()
            shape[row_dim] = -1
            scale = (torch.linalg.vector_norm(rows, dim=1) / sqrt(rows.shape[1])).view(shape)  # ||R[r]|| / sqrt(n)
        out.append(noise.mul_(scale).mul_(rho).to(p.dtype))
    return out


@dataclass
class Perturbation:
    """An ascent step applied in place, with the saved values that undo it bit-exactly (w + e - e != w in floats).

    Use `Perturbation.apply(params, e)` (or `apply(params, d, scale=s)` for e = s * d), then `restore()` (idempotent)
    in a `finally`.

    On the CPU the backup's storage is kept after `restore()` and reused by the next `apply()` on tensors of the same
    shapes, dtypes and devices (the selection S, every micro-batch): a fresh copy is memory that glibc's allocator may
    have given back to the system (always for a block of 32 MiB or more), whose pages then fault in again at every
    micro-batch. One backup, of the last S perturbed, is kept (S's size, also after training); a perturbation
    applied while another is active, or on another selection, allocates its own. CUDA tensors are cloned: the
    caching allocator already reuses the block, and a kept one would hold S's size of GPU memory between steps.
    """

    params: list[torch.Tensor]
    backup: list[torch.Tensor] = field(default_factory=list)

    _spare: ClassVar[dict[tuple, list[torch.Tensor]]] = {}  # at most one entry: layout of S -> its kept backup

    @classmethod
    @torch.no_grad()
    def apply(cls, params: list[torch.Tensor], steps: list[torch.Tensor], scale: torch.Tensor | None = None
              ) -> Perturbation:
        """Add `steps` to `params` in place.

        Args:
            params (`list[torch.Tensor]`): the tensors to perturb.
            steps (`list[torch.Tensor]`): e, one tensor per tensor of `params`; with `scale`, the directions d that e is
                made from (not modified).
            scale (`torch.Tensor`, *optional*): a 0-dim factor (e.g. `momentum_scale`'s): e = `(d * scale)` in the
                parameter's dtype, rounded as that formula (the product, then the parameter's dtype, then the sum), and
                e = 0 where `scale` is 0 (d may then be non-finite). On the CPU e is never formed (`_backup_and_add_`)
                and a zero scale perturbs nothing (the pass runs at w, nothing to restore).
        """
        on_cpu = _kept_on_restore(params)
        if scale is not None and on_cpu and scale.device.type == "cpu":
            if float(scale) == 0.0:  # a host read, free on the CPU
                return cls(params=params)
            backup = cls._spare.pop(_layout(params), None)
            if backup is None:
                backup = [torch.empty_like(p) for p in params]
            _backup_and_add_(params, steps, scale, backup)
            return cls(params=params, backup=backup)
        if scale is not None and params:  # on the device: e formed (no host synchronisation), 0 where scale is
            steps = [e.to(p.dtype) for e, p in zip(_zero_unless(scale != 0, torch._foreach_mul(steps, scale)), params)]
        backup = cls._spare.pop(_layout(params), None) if on_cpu else None
        if backup is None:
            backup = [p.detach().clone() for p in params]
        else:
            torch._foreach_copy_(backup, params)
        if params:  # nothing to perturb (e.g. a step before any moment): the pass runs at w
            torch._foreach_add_(params, steps)
        return cls(params=params, backup=backup)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved values back; a no-op the second time."""
        if self.backup:
            torch._foreach_copy_(self.params, self.backup)
            if _kept_on_restore(self.params):
                Perturbation._spare.clear()  # a backup of an earlier selection is freed
                Perturbation._spare[_layout(self.params)] = self.backup
            self.backup = []


@torch.no_grad()
def _backup_and_add_(params: list[torch.Tensor], directions: list[torch.Tensor], scale: torch.Tensor,
                     backup: list[torch.Tensor]) -> None:
    """`backup <- params`, then `params += (directions * scale).to(dtype)`, one chunk of `_ADD_CHUNK` elements at a
    time: the chunk of S the copy reads is still in the cache for the add, and e is formed in a scratch chunk (one per
    dtype) that stays there, so S is read once and written once, d read once, and nothing of S's size is allocated.
    The rounding is the formula's: the product is written to the scratch in S's dtype, then added. If it is
    interrupted (an exception between two chunks, e.g. a KeyboardInterrupt), the chunks already perturbed are
    restored before it propagates."""
    scratch: dict[torch.dtype, torch.Tensor] = {}
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (chunk of S, its backup), restored if interrupted
    try:
        for p, d, b in zip(params, directions, backup):
            if not (p.is_contiguous() and d.is_contiguous() and b.is_contiguous() and d.shape == p.shape):
                b.copy_(p)
                done.append((p, b))
                p.add_(torch.mul(d, scale).to(p.dtype))  # a strided tensor: e formed for it alone
                continue
            if p.dtype not in scratch:
                size = max(t.numel() for t in params if t.dtype == p.dtype)
                scratch[p.dtype] = torch.empty(min(_ADD_CHUNK, size), dtype=p.dtype, device=p.device)
            for pc, dc, bc in zip(p.view(-1).split(_ADD_CHUNK), d.view(-1).split(_ADD_CHUNK),
                                  b.view(-1).split(_ADD_CHUNK)):
                bc.copy_(pc)
                done.append((pc, bc))
                e = scratch[p.dtype][: pc.numel()]
                torch.mul(dc, scale, out=e)  # d * scale, rounded to S's dtype as `(d * scale).to(dtype)`
                pc.add_(e)
    except BaseException:
        for pc, bc in done:
            pc.copy_(bc)
        raise


def _kept_on_restore(params: list[torch.Tensor]) -> bool:
    """Whether the backup of `params` is kept for the next perturbation: a non-empty S on the CPU."""
    return bool(params) and all(p.device.type == "cpu" for p in params)


def _layout(params: list[torch.Tensor]) -> tuple:
    """What a kept backup must match to be reused: every tensor's shape, dtype and device."""
    return tuple((tuple(p.shape), p.dtype, p.device) for p in params)
