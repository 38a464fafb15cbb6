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
def momentum_scale(
    moments: list[torch.Tensor], rho: float, sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factor s of Momentum-SAM's e_S = s * m_S: -rho / ||m_S|| where m_S is usable (finite and non-zero), 0 where
    not; with ||m_S|| and whether it is usable, all on the device. The sign is the reference code's
    (`p.sub_(exp_avg, alpha=rho / ||exp_avg||)`): the perturbation points along the optimizer's own next step, -m.
    `Perturbation.apply(params, moments, scale=s)` perturbs by e_S = s m_S without forming it on its own."""
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
    """An ascent step applied to `params`, with what undoes it bit-exactly (w + e - e != w in floats).

    Use `Perturbation.apply(params, e)` (or `apply(params, d, scale=s)` for e = s * d), then `restore()` (idempotent)
    in a `finally`. Two ways, chosen per call:

    - **swapped** (every tensor an `nn.Parameter` that no other tensor aliases: not a view, its storage shared with
      nothing, e.g. the model's own weights): w + e is written into a buffer of S's size and swapped in as each
      parameter's `.data`; `restore()` swaps w's storage back. w is never written, nothing is copied back: S is read
      once and w + e written once (3 passes over S, against 7 for a backup, an add and a copy back).
    - **in place** (anything else, e.g. FSDP2's local shards, views of the storage it all-gathers from): w is copied
      to a backup, e is added in place, the backup is copied back.

    On the CPU the buffer of S's size (the swapped-in w + e, or the backup) is kept after `restore()` and reused by the
    next `apply()` on tensors of the same shapes, dtypes and devices (the selection S, every micro-batch): a fresh one
    is memory that glibc's allocator may have given back to the system (always for a block of 32 MiB or more), whose
    pages then fault in again at every micro-batch. One buffer, of the last S perturbed, is kept (S's size, also after
    training); a perturbation applied while another is active, or on another selection, allocates its own. On a GPU
    the caching allocator already reuses the block, and a kept one would hold S's size of GPU memory between steps.
    """

    params: list[torch.Tensor]
    backup: list[torch.Tensor] = field(default_factory=list)  # what restore() puts back: w (swapped) or a copy of w
    swapped: list[torch.Tensor] = field(default_factory=list)  # the swapped-in w + e (swapped only)

    _spare: ClassVar[dict[tuple, list[torch.Tensor]]] = {}  # at most one entry: layout of S -> its kept buffer

    @classmethod
    @torch.no_grad()
    def apply(cls, params: list[torch.Tensor], steps: list[torch.Tensor], scale: torch.Tensor | None = None
              ) -> Perturbation:
        """Perturb `params` by `steps`.

        Args:
            params (`list[torch.Tensor]`): the tensors to perturb.
            steps (`list[torch.Tensor]`): e, one tensor per tensor of `params`; with `scale`, the directions d that e is
                made from. Only read.
            scale (`torch.Tensor`, *optional*): a 0-dim factor (e.g. `momentum_scale`'s): e = `(d * scale)` in the
                parameter's dtype, rounded as that formula (the product, then the parameter's dtype, then the sum), and
                e = 0 where `scale` is 0 (d may then be non-finite). Swapped, e is never formed on its own: the
                product is written into the buffer that then receives w + e; on the CPU a zero scale perturbs nothing
                (the pass runs at w, nothing to restore).
        """
        if not params:  # nothing to perturb (e.g. a step before any moment): the pass runs at w
            return cls(params=params)
        kept = _kept_on_restore(params)
        if scale is not None and kept and scale.device.type == "cpu" and float(scale) == 0.0:  # a free host read
            return cls(params=params)
        buffer = cls._spare.pop(_layout(params), None) if kept else None
        if buffer is not None and not all(_unaliased(b, owner=1) for b in buffer):
            buffer = None  # something still holds the kept buffer (e.g. a retained graph): never written over
        if buffer is None:
            buffer = [torch.empty_like(p) for p in params]
        if all(_swappable(p) for p in params):
            for p, d, out in zip(params, steps, buffer):
                _add_into(out, p, d, scale)  # w + e, w only read
            backup = [p.data for p in params]  # w's storage, swapped back by restore()
            for p, out in zip(params, buffer):
                p.data = out
            return cls(params=params, backup=backup, swapped=buffer)
        if scale is not None:  # e formed, 0 where scale is (no host synchronisation)
            steps = [e.to(p.dtype) for e, p in zip(_zero_unless(scale != 0, torch._foreach_mul(steps, scale)), params)]
        torch._foreach_copy_(buffer, params)
        torch._foreach_add_(params, steps)
        return cls(params=params, backup=buffer)

    @torch.no_grad()
    def restore(self) -> None:
        """Put w back (swap its storage back, or copy the backup); a no-op the second time."""
        if not self.backup:
            return
        if self.swapped:
            for p, w in zip(self.params, self.backup):
                p.data = w
            kept = self.swapped
        else:
            torch._foreach_copy_(self.params, self.backup)
            kept = self.backup
        if _kept_on_restore(self.params):
            Perturbation._spare.clear()  # a buffer of an earlier selection is freed
            Perturbation._spare[_layout(self.params)] = kept
        self.backup, self.swapped = [], []


def _add_into(out: torch.Tensor, w: torch.Tensor, d: torch.Tensor, scale: torch.Tensor | None) -> None:
    """`out <- w + e`, e = d (`scale` None) or `(d * scale).to(w.dtype)`, 0 where `scale` is 0, rounded as `w.add_(e)`
    would round it (addition commutes bit for bit)."""
    if scale is None:
        torch.add(w, d, out=out)
        return
    torch.mul(d, scale, out=out)  # e in w's dtype, formed where w + e goes
    if out.device.type != "cpu":  # the CPU returned before for a zero scale; a device decides without a host read
        out.masked_fill_(scale == 0, 0.0)  # d * 0 may be NaN
    out.add_(w)


def _swappable(t: torch.Tensor) -> bool:
    """Whether perturbing `t` by swapping its storage is the same as perturbing it in place: an `nn.Parameter` itself
    (not a subclass such as a DTensor) whose storage no other tensor shares (no view of it, no alias), so every reader
    of w reads the parameter."""
    return type(t) is torch.nn.Parameter and not t._is_view() and _unaliased(t, owner=1)


def _unaliased(t: torch.Tensor, owner: int) -> bool:
    """Whether `t`'s storage is held by `owner` tensors and no more (the storage's use count, less the reference of the
    Python storage object made to read it); an unknown count is taken as shared."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    return use_count(t.untyped_storage()._cdata) - 1 <= owner


def _kept_on_restore(params: list[torch.Tensor]) -> bool:
    """Whether the buffer of `params`' size is kept for the next perturbation: a non-empty S on the CPU."""
    return bool(params) and all(p.device.type == "cpu" for p in params)


def _layout(params: list[torch.Tensor]) -> tuple:
    """What a kept buffer must match to be reused: every tensor's shape, dtype and device."""
    return tuple((tuple(p.shape), p.dtype, p.device) for p in params)
