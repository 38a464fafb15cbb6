"""Running statistics are updated once per micro-batch, by pass 1, as the plain `Trainer`'s single forward does.

A module that updates buffers in its forward (BatchNorm's running mean and variance, its batch counter) would update
them again in pass 2, at the perturbed weights, and with activation reuse only in the blocks that pass 2 recomputes.
`BufferGuard` notes which modules' buffers pass 1 changed, keeps those buffers as pass 1 left them, and puts them back
after pass 2, in place (DDP and others hold references to the buffer tensors).
"""

from __future__ import annotations

import torch
from torch import nn


class BufferGuard:
    """Keeps a model's buffers as pass 1 left them.

    Args:
        model (`nn.Module`): the model whose buffers are watched (listed once, at construction).
    """

    def __init__(self, model: nn.Module):
        self._modules = [m for m in model.modules() if any(b is not None for b in m._buffers.values())]
        self._marks: list[tuple] = []
        self._saved: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def _state(module: nn.Module) -> tuple:
        return tuple((id(b), b._version) for b in module._buffers.values() if b is not None)

    def mark(self) -> None:
        """Before pass 1: note every buffer's identity and version counter."""
        self._marks = [self._state(m) for m in self._modules]

    @torch.no_grad()
    def keep_pass_one(self) -> None:
        """After pass 1: copy the buffers of each module whose buffers pass 1 changed."""
        self._saved = [
            (m, name, b, b.clone())
            for m, mark in zip(self._modules, self._marks) if self._state(m) != mark
            for name, b in m._buffers.items() if b is not None
        ]

    @torch.no_grad()
    def restore(self) -> None:
        """After pass 2: the saved buffers back, the same tensor objects with pass 1's values."""
        for module, name, tensor, value in self._saved:
            module._buffers[name] = tensor
            tensor.copy_(value)
        self._saved = []
