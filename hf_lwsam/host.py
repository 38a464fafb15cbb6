"""`AscentHost`: what an ascent (`hf_lwsam.Ascent`) may use of the trainer that runs it.

`LWSAMMixin` implements it. An ascent's `step(host, model, inputs, num_items_in_batch)` reads S from
`host.sam_parameters()`, perturbs only through `host.pass_at` (the one place that adds e to S, runs the base class's
pass and restores S bit-exactly), and records the micro-batch with `host.record_sam_step` or `host.record_plain_step`.
A two-pass ascent takes g_S from `host.ascent_gradient` and e_S from `host.ascent_direction`:

    named = host.sam_parameters()
    params = [p for _, p in named]
    clean, grads, scale = host.ascent_gradient(model, inputs, num_items_in_batch, named)
    steps, norm, finite = host.ascent_direction(params, grads)
    perturbed = host.pass_at(params, steps, model, inputs, num_items_in_batch, after_pass_one=True)
    host.record_sam_step(clean, perturbed, norm / scale, finite)
    return clean
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch import nn
    from transformers import TrainerState

    from .config import LWSAMConfigMixin
    from .schedule import AscentSchedule


@runtime_checkable
class AscentHost(Protocol):
    """The public surface of the trainer an ascent runs on ([`LWSAMMixin`] implements it).

    Attributes:
        args (`LWSAMConfig`): the training options, `sam_*` included (`args.sam_rho`, `args.seed`, ...).
        optimizer (`torch.optim.Optimizer` or `None`): the optimizer the base class steps (accelerate's wrapper once
            training started; `None` before it is created).
        accelerator (`accelerate.Accelerator`): `accelerator.sync_gradients` is `True` on the last micro-batch of an
            optimizer step, `accelerator.num_processes` the number of processes.
        state (`transformers.TrainerState`): `state.global_step`, the optimizer steps taken so far.
        model (`torch.nn.Module`): the model given to the trainer (the names of `sam_parameters` are its names).
        schedule (`AscentSchedule`): which steps are SAM steps, and the kept vector of S, saved with every checkpoint
            when the ascent's `kept_vector` names its kind (`direction`, `keep`, `average`).
    """

    args: LWSAMConfigMixin
    optimizer: torch.optim.Optimizer | None
    accelerator: Accelerator
    state: TrainerState
    model: nn.Module

    @property
    def schedule(self) -> AscentSchedule: ...

    def sam_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The selected parameters S of the current step, by name (under FSDP2 the sharded ones)."""
        ...

    def ascent_gradient(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any,
                        named: list[tuple[str, nn.Parameter]] | None = None
                        ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | float]:
        """Pass 1 at w: the clean loss, g_S of `named` (default `sam_parameters()`) and the loss scale g_S carries."""
        ...

    def ascent_direction(self, params: list[torch.Tensor], grads: list[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """e_S from `grads` (consumed): the steps for this process's shards of `params`, the norm, and whether it is
        finite."""
        ...

    def pass_at(self, tensors: list[torch.Tensor], steps: list[torch.Tensor], model: nn.Module,
                inputs: dict[str, Any], num_items_in_batch: Any, after_pass_one: bool = False,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """The base class's step at `tensors + steps` (`steps` consumed; with a 0-dim `scale`, at `tensors + scale *
        steps`, none where it is 0), `tensors` restored bit-exactly; its loss."""
        ...

    def record_sam_step(self, clean: torch.Tensor | None, perturbed: torch.Tensor, norm: torch.Tensor,
                        finite: torch.Tensor, e_norm: torch.Tensor | None = None) -> None:
        """Count a SAM micro-batch in the logging window (`sam/*`)."""
        ...

    def record_plain_step(self) -> None:
        """Count a micro-batch without a perturbation in the logging window."""
        ...

    def record_window(self, key: str, value: Any) -> None:
        """Add `value` to the logging window's sum `key` (on the device)."""
        ...
