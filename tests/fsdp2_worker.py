"""One rank of `test_fsdp2.py`: raw `fully_shard` (FSDP2) on 2 CPU processes (gloo), one LW-SAM SGD step driven by
hf_lwsam's own pass-1 / perturb / restore code (the functions `LWSAMTrainer` calls under FSDP2), then a pass 2 that
fails, which must leave the shards exactly as they were. Rank 0 saves `<out>/<model>.pt`."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora
from hf_lwsam.probe import candidate_layers, grad_squared_norms, owned_parameters
from hf_lwsam.sam import Perturbation, ascent_direction
from hf_lwsam.selection import layer_parameters, select_layers
from hf_lwsam.sharding import all_reduce_mean, all_reduce_sum, capture_unsharded, gradient_of, local, shards_of

RHO, ROWS_PER_RANK = 0.5, 2
MODELS = {  # name -> (builder, the trunk's blocks)
    "gpt2": (tiny_gpt2, lambda m: m.transformer.h),
    "llama-lora": (tiny_llama_lora, lambda m: m.base_model.model.model.layers),
}


def batch_of(rank: int) -> dict[str, torch.Tensor]:
    data = shakespeare_lm_dataset(2 * ROWS_PER_RANK)[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK]
    return {k: torch.tensor(v) for k, v in data.items()}


def run(name: str, out: str, rank: int, mesh) -> None:
    make, blocks = MODELS[name]
    model = make()
    selected = select_layers(model)  # the default output-side selection, resolved before sharding
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    named = layer_parameters(model, selected)  # resolved after sharding: DTensors
    params = [p for _, p in named]
    batch = batch_of(rank)

    # Pass 1 at w: g_S of this rank's micro-batch w.r.t. the unsharded parameters, averaged over ranks, sharded.
    with capture_unsharded(model, named) as captured:
        loss = model(**batch).loss
        grads = gradient_of(loss, named, captured)
    grads = shards_of(all_reduce_mean(grads), params)
    shards = local(params)
    steps, norm, finite = ascent_direction(shards, grads, RHO, sum_across=all_reduce_sum)
    perturbation = Perturbation.apply(shards, steps)
    try:  # pass 2 at w + e: FSDP2 reduce-scatters the mean gradient into .grad
        model(**batch).loss.backward()
    finally:
        perturbation.restore()
    # The probe's per-layer squared norms of the sharded .grad: the shards' sums, added over the processes.
    owned = owned_parameters(model, candidate_layers(model))
    layer_norms = grad_squared_norms(owned)
    dist.all_reduce(layer_norms)
    with torch.no_grad():  # SGD, lr 1
        for p in model.parameters():
            if p.grad is not None:
                local([p])[0].sub_(local([p.grad])[0])
    model.zero_grad(set_to_none=True)
    stepped = {n: p.full_tensor().clone() for n, p in model.named_parameters()}

    # A pass 2 that raises leaves every shard exactly as it was.
    before = [t.clone() for t in local(params)]
    with capture_unsharded(model, named) as captured:
        grads = gradient_of(model(**batch).loss, named, captured)
    steps, _, _ = ascent_direction(local(params), shards_of(all_reduce_mean(grads), params), RHO,
                                   sum_across=all_reduce_sum)
    handle = blocks(model)[-1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("pass 2 failed")))
    perturbation = Perturbation.apply(local(params), steps)
    try:
        model(**batch)
    except RuntimeError:
        pass
    finally:
        perturbation.restore()
        handle.remove()
    restored = all(torch.equal(a, b) for a, b in zip(before, local(params)))
    if rank == 0:
        torch.save({"stepped": stepped, "layer_norms": dict(zip(owned, layer_norms.tolist())), "norm": float(norm),
                    "finite": bool(finite), "restored": restored,
                    "selected": selected, "sharded": type(params[0]).__name__}, os.path.join(out, f"{name}.pt"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in MODELS:
        run(name, out, rank, mesh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
