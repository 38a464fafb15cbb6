"""FSDP2 (`fully_shard`): the ascent gradient of sharded parameters, and e_S distributed to the shards.

Under FSDP2 a parameter is a `DTensor` holding this process's shard (`Shard(0)`), and `torch.autograd.grad` with respect
to it returns `None`: the forward runs on unsharded parameters that FSDP2 all-gathers into the modules just before
they run. So pass 1 captures those: a forward pre-hook on each module owning a selected parameter (it runs after
FSDP2's own pre-forward hook, when the module holds the unsharded parameter) records the tensor the forward uses, and
`autograd.grad` with respect to the recorded tensors gives the full gradient of this process's micro-batch, with no
reduce-scatter and no `.grad` side effect. Every process then averages it (global-batch SAM: one common e_S), and adds
its own shard of e_S to its local shard; the perturbation and its bit-exact undo work on the local tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch without distributed tensors: nothing is ever sharded
    DTensor, distribute_tensor = (), None


def is_sharded(params: list[torch.Tensor]) -> bool:
    """Whether `params` are FSDP2-sharded (`DTensor`s)."""
    return bool(DTensor) and any(isinstance(p, DTensor) for p in params)


def layout(tensors: list[torch.Tensor]) -> list[list[str] | None]:
    """How each tensor is laid out over the processes: its device mesh (the process ranks, as laid out in the mesh), the
    mesh's dimension names and the tensor's placements on it (e.g. `Shard(dim=0)`), as strings; `None` for a whole
    tensor. Two runs whose layouts differ hold different pieces of a tensor on a process, even with equal shapes."""
    return [[str(t.device_mesh.mesh.tolist()), str(t.device_mesh.mesh_dim_names), str(t.placements)]
            if isinstance(t, DTensor) else None for t in tensors]


def reshard(model: nn.Module) -> None:
    """Every FSDP2 module of `model` back on its sharded parameters. A forward without a backward (an evaluation, the
    default selection's trace) leaves the root module holding its unsharded ones, which are not the parameters the
    optimizer steps."""
    if not DTensor:
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Each tensor's local shard (for a parameter, the storage FSDP2 all-gathers from); plain tensors and `None` as
    they are."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


@contextmanager
def capture_unsharded(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> Iterator[dict[str, torch.Tensor]]:
    """Record, during the forward run inside the block, the unsharded tensor each selected parameter is used as.

    Yields `{name: tensor}` (filled as the modules run; the first call of each module counts).
    """
    captured: dict[str, torch.Tensor] = {}
    owners: dict[nn.Module, list[tuple[str, str]]] = {}
    for name, _ in named:
        module_name, _, attr = name.rpartition(".")
        owners.setdefault(model.get_submodule(module_name), []).append((name, attr))

    def hook(module: nn.Module, *_: object) -> None:
        for name, attr in owners[module]:
            captured.setdefault(name, module._parameters[attr])

    handles = [module.register_forward_pre_hook(hook) for module in owners]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def shards_of(full: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """This process's pieces of full tensors that every process holds identically, laid out as `params`' local shards
    (no communication)."""
    return [distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
            if isinstance(p, DTensor) else t for t, p in zip(full, params)]


def gradient_of(target: torch.Tensor, named: list[tuple[str, nn.Parameter]],
                captured: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """g_S: the gradient of `target` with respect to the selected parameters (under FSDP2, to the unsharded tensors
    `capture_unsharded` recorded), through a backward truncated at S that leaves `.grad` alone. A parameter the loss
    does not use gets zeros; a loss that uses none of them is an error, never a silent plain step."""
    wrt = [p for _, p in named] if captured is None else [captured.get(n) for n, _ in named]
    if any(t is None for t in wrt):
        raise RuntimeError(f"LW-SAM: {sum(t is None for t in wrt)} selected parameters were not used by this forward "
                           "under FSDP2 (their modules never ran): select layers the loss uses.")
    grads = torch.autograd.grad(target, wrt, allow_unused=True)
    if all(g is None for g in grads):
        shown = ", ".join(n for n, _ in named[:4])
        raise RuntimeError("LW-SAM: the loss does not depend on any selected parameter (every gradient of S is None), "
                           f"so no perturbation can be computed: select layers the loss uses ({shown}, ... were "
                           "selected).")
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (out of place)."""
    import torch.distributed as dist

    total = tensor.clone()
    dist.all_reduce(total)
    return total


def sum_over_shards(params: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For FSDP2-sharded `params`, the function that turns a sum over this process's shards (a squared norm) into the
    sum over the whole tensors: the sum over the processes, divided by how many of them hold each shard (HSDP
    replicates every shard over its `Replicate()` mesh dimensions, and a whole tensor is on every process); `None` when
    nothing is sharded.

    Raises:
        ValueError: the tensors are held by different numbers of processes each, so one division cannot undo it.
    """
    if not is_sharded(params):
        return None
    import torch.distributed as dist

    replicas = {math.prod(p.device_mesh.size(i) for i, placement in enumerate(p.placements) if placement.is_replicate())
                if isinstance(p, DTensor) else dist.get_world_size() for p in params}
    if len(replicas) > 1:
        raise ValueError(f"The selected parameters are held by {sorted(replicas)} processes each (FSDP2 shards mixed "
                         "with replicated or whole tensors), so the norm of e_S cannot be summed over the processes: "
                         "select layers that are sharded alike (sam_target_layers), or shard them all the same way.")
    (count,) = replicas
    return all_reduce_sum if count == 1 else lambda tensor: all_reduce_sum(tensor) / count


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mean of `tensors` over all processes, in one coalesced all-reduce."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return list(_unflatten_dense_tensors(flat, tensors))


