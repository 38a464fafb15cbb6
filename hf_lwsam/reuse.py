"""Activation reuse: pass 2 skips the trunk blocks below the lowest perturbed block.

The weights below the cut do not change between the two passes, so neither do those blocks' outputs. Pass 1 keeps the
outputs of `blocks[:cut]` (with their autograd graph); in pass 2 each of those blocks returns its kept output instead
of recomputing it, so only the upper blocks, the final norm and the head run again, and one backward goes through
everything. The gradients equal the plain two-pass ones; the cost drops from 2F + 2B to F + B + (F + B of the top).

Dropout: the trainer restores the RNG state before pass 2, so both passes draw the same masks; a replayed pass also
restores, after the last kept block, the RNG state pass 1 had there, so the upper blocks draw the same masks as
without reuse. Reuse is therefore exact with dropout on too.

Safety is checked twice: statically (no perturbed parameter may live below the cut or in the input embedding) and at
run time (every kept block must see in pass 2 exactly the inputs it saw in pass 1; otherwise that pass silently falls
back to recomputing, which is always correct, and reuse is switched off with a reason).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .selection import find_trunk


def capture_rng() -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU and current-CUDA-device generator states (no device synchronisation)."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_rng(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    values = list(args) + [kwargs[k] for k in sorted(kwargs)]
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):  # e.g. Llama's (cos, sin) position embeddings
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def _same_inputs(now: list[torch.Tensor], then: list[torch.Tensor]) -> bool:
    if len(now) != len(then):
        return False
    # `is` first: a kept block's input is usually the previous kept block's output object.
    return all(a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)) for a, b in zip(now, then))


class ActivationReuse:
    """Keeps and replays the outputs of `blocks[:cut]` for one micro-batch.

    Args:
        blocks (`nn.ModuleList`): the model's repeated-block trunk.
        cut (`int`): index of the lowest perturbed block; `blocks[:cut]` are replayed.
    """

    def __init__(self, blocks: nn.ModuleList, cut: int):
        self.blocks, self.cut = blocks, cut
        self.mismatch: str | None = None  # set when pass 2 saw different inputs; reuse must then be switched off
        self._mode = "off"
        self._kept: dict[int, tuple[list[torch.Tensor], Any]] = {}
        self._rng_at_cut: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _wrap(self, index: int, block: nn.Module) -> None:
        forward = block.forward

        def reusing_forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode == "record":
                out = forward(*args, **kwargs)
                self._kept[index] = (_tensors(args, kwargs), out)
                if index == self.cut - 1:
                    self._rng_at_cut = capture_rng()
                return out
            if self._mode == "replay" and index in self._kept:
                inputs, out = self._kept.pop(index)  # popped: a checkpoint recompute later runs the real forward
                if _same_inputs(_tensors(args, kwargs), inputs):
                    if index == self.cut - 1 and self._rng_at_cut is not None:
                        restore_rng(self._rng_at_cut)  # the upper blocks draw pass 1's dropout masks
                    return out
                self.mismatch = f"block {index} of the trunk saw different inputs in the perturbed pass"
                self._mode, self._kept = "off", {}
            return forward(*args, **kwargs)

        block.forward = reusing_forward  # instance attribute: nn.Module.__call__ dispatches to it

    @contextmanager
    def session(self) -> Iterator[ActivationReuse]:
        """Install the wrappers for one micro-batch; `record()` / `replay()` switch modes inside."""
        for i in range(self.cut):
            self._wrap(i, self.blocks[i])
        try:
            yield self
        finally:
            for i in range(self.cut):
                self.blocks[i].__dict__.pop("forward", None)
            self._mode, self._kept, self._rng_at_cut = "off", {}, None

    def record(self) -> None:
        self._mode = "record"

    def replay(self) -> None:
        """Switch to replay; a no-op (plain recomputation) if pass 1 kept nothing."""
        self._mode = "replay" if len(self._kept) == self.cut else "off"


def plan_reuse(model: nn.Module, perturbed: list[nn.Parameter]) -> tuple[nn.ModuleList, int] | str:
    """`(blocks, cut)` when pass 2 may replay `blocks[:cut]`, else the reason it may not."""
    trunk = find_trunk(model)
    if trunk is None:
        return "no repeated-block trunk (nn.ModuleList of transformer blocks) was found"
    _, blocks = trunk
    perturbed_ids = {id(p) for p in perturbed}
    cut = len(blocks)
    for i, block in enumerate(blocks):
        if any(id(p) in perturbed_ids for p in block.parameters()):
            cut = i
            break
    if cut == 0:
        return "the lowest trunk block is perturbed, so nothing below it can be reused"
    below = {id(p) for block in blocks[:cut] for p in block.parameters()}
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if embedding is not None:
        below |= {id(p) for p in embedding.parameters()}
    if below & perturbed_ids:
        return (
            "a perturbed parameter is also used below the cut (an output head tied to the input embedding, or "
            "shared weights)"
        )
    return blocks, cut
