"""One rank of `test_fsdp2.py`: raw `fully_shard` (FSDP2) on 2 CPU processes (gloo), one LW-SAM SGD step driven by
hf_lwsam's own pass-1 / perturb / restore code (the functions `LWSAMTrainer` calls under FSDP2), then a pass 2 that
fails, which must leave the shards exactly as they were. Rank 0 saves `<out>/<model>.pt`.

The one-pass ascents, as `hf_lwsam.ascent` takes them under FSDP2 (accelerate sets FSDP up only for GPU-like devices:
on the CPU it gives the Trainer DDP, so the Trainer is not driven here): `sam_ascent="stale"` for 3 steps,
uninterrupted and resumed after 2 from the model's shards and each process's `lwsam_ascent_rank{N}.pt`
(`<out>/stale_rank<r>.pt`), and `sam_ascent="momentum"` with AdamW for 3 steps (`<out>/momentum_rank<r>.pt`).

`LWSAMTrainer` itself under FSDP2 (`<out>/trainer_rank<r>.pt`): on a model that transformers shards at load time
(`from_pretrained(distributed_config=DistributedConfig(fsdp_size=2))`, gloo on the CPU), whose parameters the Trainer
neither wraps nor re-shards: the momentum ascent's steps and logs, and the stale ascent's checkpoint files (written by
every process before `_save_rng_state` returns, with the layout of the parameters; refused under another layout), and
Momentum-SAM's own average of the gradients (`sam_momentum="own"`): its steps, and its resume from each process's shard
of m (`<out>/own_rank<r>.pt`)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora
from hf_lwsam.ascent import first_moments
from hf_lwsam.probe import candidate_layers, grad_squared_norms, owned_parameters
from hf_lwsam.sam import Perturbation, ascent_direction, global_norm
from hf_lwsam.schedule import AscentSchedule
from hf_lwsam.selection import layer_parameters, select_layers
from hf_lwsam.sharding import (
    all_reduce_mean,
    all_reduce_sum,
    capture_unsharded,
    gradient_of,
    is_sharded,
    local,
    shards_of,
)

RHO, ROWS_PER_RANK = 0.5, 2
STEPS, STALE_LR = 3, 0.2  # the one-pass ascents' runs: optimizer steps, SGD's learning rate for the stale ascent
MOMENTUM_RHO, MOMENTUM_LR = 0.3, 1e-2  # AdamW, as test_momentum.reference_run computes it on one process
OWN_LR, OWN_BETA = 0.1, 0.9  # plain SGD with Momentum-SAM's own average of the gradients (`sam_momentum="own"`)
MODELS = {  # name -> (builder, the trunk's blocks)
    "gpt2": (tiny_gpt2, lambda m: m.transformer.h),
    "llama-lora": (tiny_llama_lora, lambda m: m.base_model.model.model.layers),
}


def batch_of(rank: int, step: int = 0) -> dict[str, torch.Tensor]:
    """This rank's rows of global batch `step` (rows `4 step` to `4 step + 3`: rank 0 the first two)."""
    first = (2 * step + rank) * ROWS_PER_RANK
    data = shakespeare_lm_dataset(first + ROWS_PER_RANK)[first:first + ROWS_PER_RANK]
    return {k: torch.tensor(v) for k, v in data.items()}


def sharded(name: str, mesh) -> tuple[torch.nn.Module, list[str], list[tuple[str, torch.nn.Parameter]]]:
    """Model `name` with every trunk block and the whole model `fully_shard`ed, its selected layers and S."""
    make, blocks = MODELS[name]
    model = make()
    selected = select_layers(model)  # the default output-side selection, resolved before sharding
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, selected, layer_parameters(model, selected)  # S resolved after sharding: DTensors


def run(name: str, out: str, rank: int, mesh) -> None:
    blocks = MODELS[name][1]
    model, selected, named = sharded(name, mesh)
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


# ------------------------------------------------------------------------------------------ one-pass ascents
def step_at(model: torch.nn.Module, optimizer: torch.optim.Optimizer, shards: list[torch.Tensor],
            steps: list[torch.Tensor], batch: dict[str, torch.Tensor], after_backward=None) -> float:
    """One optimizer step whose gradient is taken at w + e (`steps` added to `shards`, restored exactly, as
    `trainer.pass_at` does); `after_backward` runs before the optimizer step (the stale ascent keeps `.grad` there).
    Returns ||e|| over every process's shards."""
    e_norm = float(all_reduce_sum(global_norm(steps).pow(2)).sqrt())
    perturbation = Perturbation.apply(shards, steps) if shards else Perturbation(params=[])
    try:  # FSDP2 reduce-scatters the mean gradient of the processes' batches into .grad
        model(**batch).loss.backward()
    finally:
        perturbation.restore()
    if after_backward is not None:
        after_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return e_norm


def stale_step(model: torch.nn.Module, named: list[tuple[str, torch.nn.Parameter]], schedule: AscentSchedule,
               optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    """A `sam_ascent="stale"` step as `StaleAscent.step` takes it (accumulation 1): e_S from this process's kept
    shards of the previous step's gradient of S (none: a plain step), and this step's gradient shards kept."""
    names, params = [n for n, _ in named], [p for _, p in named]
    shards = local(params)
    kept = schedule.direction(names, like=shards)
    if kept is None:
        steps = [torch.zeros_like(t) for t in shards]
    else:
        steps, _, _ = ascent_direction(shards, [g.clone() for g in kept], RHO, sum_across=all_reduce_sum)
    return step_at(model, optimizer, shards, steps, batch, lambda: schedule.keep(
        names, local([p.grad for p in params]), like=shards, per_process=is_sharded(params)))


def refusal(action) -> str | None:
    """The message of the `ValueError` that `action()` raises, or `None`."""
    try:
        action()
    except ValueError as error:
        return str(error)
    return None


def stale_resume(out: str, rank: int, mesh) -> None:
    """3 stale steps uninterrupted; 2 steps, the model's shards and the schedule saved per process, then a fresh model,
    optimizer and schedule loaded from them and the third step; the same third step without the kept vector (plain);
    and the resumes the schedule refuses. Saves `<out>/stale_rank<rank>.pt`."""
    world, cpu = dist.get_world_size(), torch.device("cpu")
    checkpoint = os.path.join(out, "stale_checkpoint")
    os.makedirs(checkpoint, exist_ok=True)

    def start() -> tuple[Any, Any, AscentSchedule, torch.optim.Optimizer]:
        model, _, named = sharded("gpt2", mesh)
        return model, named, AscentSchedule(ascent="stale"), torch.optim.SGD(model.parameters(), lr=STALE_LR)

    def full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.full_tensor().clone() for n, p in model.named_parameters()}

    def load_shards(model: torch.nn.Module) -> None:
        saved = torch.load(os.path.join(checkpoint, f"model_rank{rank}.pt"), weights_only=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.to_local().copy_(saved[n])

    model, named, schedule, optimizer = start()
    names = [n for n, _ in named]
    e_norms = [stale_step(model, named, schedule, optimizer, batch_of(rank, s)) for s in range(STEPS)]
    uninterrupted, kept = full(model), [g.clone() for g in schedule.direction(names)]

    model, named, schedule, optimizer = start()
    for s in range(STEPS - 1):
        stale_step(model, named, schedule, optimizer, batch_of(rank, s))
    torch.save({n: p.to_local().clone() for n, p in model.named_parameters()},
               os.path.join(checkpoint, f"model_rank{rank}.pt"))
    schedule.save(checkpoint, rank, world)
    dist.barrier()
    saved = torch.load(os.path.join(checkpoint, f"lwsam_ascent_rank{rank}.pt"), weights_only=True)

    model, named, schedule, optimizer = start()
    load_shards(model)
    schedule.load(checkpoint, cpu, rank, world)
    stale_step(model, named, schedule, optimizer, batch_of(rank, STEPS - 1))
    resumed, resumed_kept = full(model), schedule.direction(names)

    model, named, schedule, optimizer = start()
    load_shards(model)  # ... and no kept vector: the third step is a plain one
    stale_step(model, named, schedule, optimizer, batch_of(rank, STEPS - 1))
    without_vector = full(model)

    # A checkpoint holding only the other process's vector (copied without this one's), and an unsharded one (as a
    # single process or DDP writes it: lwsam_ascent.pt, whole tensors); each process in its own folder.
    partial, whole = os.path.join(out, f"partial_rank{rank}"), os.path.join(out, f"whole_rank{rank}")
    os.makedirs(partial), os.makedirs(whole)
    shutil.copy(os.path.join(checkpoint, f"lwsam_ascent_rank{1 - rank}.pt"), partial)
    unsharded = AscentSchedule(ascent="stale")
    unsharded.keep(names, [p.full_tensor() for _, p in named], like=[p.full_tensor() for _, p in named])
    unsharded.save(whole, rank, world)
    from_whole = AscentSchedule(ascent="stale")
    from_whole.load(whole, cpu, rank, world)
    refused = {
        "three processes": refusal(lambda: AscentSchedule(ascent="stale").load(checkpoint, cpu, rank, 3)),
        "process 2 of 3": refusal(lambda: AscentSchedule(ascent="stale").load(checkpoint, cpu, 2, 3)),
        "own file missing": refusal(lambda: AscentSchedule(ascent="stale").load(partial, cpu, rank, world)),
        "unsharded vector": refusal(lambda: from_whole.direction(names, like=local([p for _, p in named]))),
    }
    torch.save({"uninterrupted": uninterrupted, "resumed": resumed, "without_vector": without_vector,
                "kept": kept, "resumed_kept": resumed_kept, "saved": saved, "e_norms": e_norms,
                "full_shapes": {n: tuple(p.shape) for n, p in named}, "files": sorted(os.listdir(checkpoint)),
                "refused": refused}, os.path.join(out, f"stale_rank{rank}.pt"))


def momentum_steps(out: str, rank: int, mesh) -> None:
    """3 AdamW steps with `sam_ascent="momentum"` as `MomentumAscent.step` takes them: e_S = -rho m_S / ||m_S|| from
    this process's shards of the first moment, the norm summed over the processes (a plain first step: no moment yet).
    Saves `<out>/momentum_rank<rank>.pt`: the whole weights after, S's names and ||e_S|| of the SAM steps."""
    model, _, named = sharded("gpt2", mesh)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(model.parameters(), lr=MOMENTUM_LR, weight_decay=0.0)
    key, inner = first_moments(optimizer)
    e_norms = []
    for step in range(STEPS):
        state = [inner.state.get(p, {}).get(key) for p in params]
        shards, steps = [], []
        if not all(m is None for m in state):
            shards = local(params)
            moments = [torch.zeros_like(t) if m is None else m for m, t in zip(local(state), shards)]
            # -rho m / ||m||, the norm over every process's shards
            norm = all_reduce_sum(sum((m.double() ** 2).sum() for m in moments)).sqrt()
            steps = [(-MOMENTUM_RHO * m.double() / norm).to(m.dtype) for m in moments]
        e_norm = step_at(model, optimizer, shards, steps, batch_of(rank, step))
        if shards:
            e_norms.append(e_norm)
    torch.save({"stepped": {n: p.full_tensor().clone() for n, p in model.named_parameters()}, "e_norms": e_norms,
                "selected": [n for n, _ in named], "sharded": type(state[0]).__name__},
               os.path.join(out, f"momentum_rank{rank}.pt"))


# ----------------------------------------------------------------------------------------- LWSAMTrainer itself
def distributed_gpt2(directory: str, **sizes: int) -> torch.nn.Module:
    """The tiny GPT-2 saved in `directory`, sharded by transformers as it loads (`DistributedConfig(**sizes)`)."""
    from transformers import GPT2LMHeadModel
    from transformers.distributed import DistributedConfig

    model = GPT2LMHeadModel.from_pretrained(directory, distributed_config=DistributedConfig(**sizes))
    model.loss_type = "ForCausalLM"  # as tiny_gpt2 names it
    return model


def trainer_config(out: str, **overrides: Any) -> Any:
    """The `LWSAMConfig` of the trainer runs: 2 rows per process, constant learning rate, no clipping, sequential
    batches, `STEPS` steps, no checkpoints, a log per step; `overrides` on top."""
    from hf_lwsam import LWSAMConfig

    return LWSAMConfig(**{**dict(
        output_dir=os.path.join(out, "trainer"), per_device_train_batch_size=ROWS_PER_RANK, max_steps=STEPS,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
        train_sampling_strategy="sequential", report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, seed=0), **overrides})


def train_sharded(directory: str, data: Any, args: Any, **sizes: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """`LWSAMTrainer` trained with `args` on `data` and the tiny GPT-2 in `directory` sharded at load (`sizes`); the
    trainer and the whole weights after."""
    from hf_lwsam import LWSAMTrainer

    trainer = LWSAMTrainer(model=distributed_gpt2(directory, **sizes), train_dataset=data, args=args)
    trainer.train()
    return trainer, {n: p.full_tensor().detach().clone() for n, p in trainer.model.named_parameters()}


def trainer_runs(out: str, rank: int) -> None:
    """`LWSAMTrainer` on 2 processes, each with 2 rows of every global batch of 4 (accumulation 1).

    Momentum: AdamW for `STEPS` steps; the whole weights after, the logs, S's names; the same under HSDP
    (`DistributedConfig(dp_replicate_size=2, fsdp_size=1)`: every tensor whole on each process), and one exact SGD
    step (lr 1) there. Stale: `STEPS` SGD steps, then `_save_rng_state` (the checkpoint's last write of every process
    before process 0 writes `trainer_state.json`) with process 1 arriving 2 s late: which files process 0 sees when its
    call returns; the layout saved; a fresh trainer on the same layout loading it; and one on HSDP refused."""
    from hf_lwsam import LWSAMTrainer

    directory, checkpoint = os.path.join(out, "gpt2"), os.path.join(out, "trainer_checkpoint")
    if rank == 0:
        tiny_gpt2().save_pretrained(directory)
        os.makedirs(checkpoint)
    dist.barrier()

    def config(**overrides: Any) -> Any:
        return trainer_config(out, **overrides)

    data = shakespeare_lm_dataset(4 * STEPS)

    def trained(sizes: dict[str, int], **options: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        return train_sharded(directory, data, config(**options), **sizes)

    adamw = dict(optim="adamw_torch", learning_rate=MOMENTUM_LR, sam_ascent="momentum", sam_rho=MOMENTUM_RHO)
    momentum, stepped = trained({"fsdp_size": 2}, **adamw)
    logs = [{k: v for k, v in e.items() if k.startswith("sam/")} for e in momentum.state.log_history
            if "sam/sam_steps" in e]
    # HSDP: every shard on both processes (replicated over dp_replicate), so the norms count each shard once
    hsdp = {"dp_replicate_size": 2, "fsdp_size": 1}
    hsdp_trainer, hsdp_momentum = trained(hsdp, **adamw)
    _, hsdp_exact = trained(hsdp, optim="sgd", learning_rate=1.0, max_steps=1, sam_rho=RHO)

    stale = LWSAMTrainer(model=distributed_gpt2(directory, fsdp_size=2), train_dataset=data,
                         args=config(optim="sgd", learning_rate=STALE_LR, sam_ascent="stale", sam_rho=RHO))
    stale.train()
    if rank == 1:
        time.sleep(2.0)  # this process's file is written 2 s after process 0's
    stale._save_rng_state(checkpoint)
    seen = sorted(f for f in os.listdir(checkpoint) if f.startswith("lwsam_ascent"))  # when process 0 may mark it
    saved = torch.load(os.path.join(checkpoint, f"lwsam_ascent_rank{rank}.pt"), weights_only=True)
    dist.barrier()

    same = LWSAMTrainer(model=distributed_gpt2(directory, fsdp_size=2), train_dataset=data,
                        args=config(optim="sgd", learning_rate=STALE_LR, sam_ascent="stale", sam_rho=RHO))
    same._load_rng_state(checkpoint)
    names, params = saved["names"], same._named_parameters()
    loaded = same._schedule.direction(names, like=local([params[n] for n in names]))
    other = LWSAMTrainer(model=distributed_gpt2(directory, **hsdp), train_dataset=data,
                         args=config(optim="sgd", learning_rate=STALE_LR, sam_ascent="stale", sam_rho=RHO))
    torch.save({"logs": logs, "stepped": stepped, "selected": momentum.perturbed_parameter_names(),
                "sharded": type(momentum._sam_parameters()[0][1]).__name__, "seen": seen, "saved": saved,
                "hsdp_momentum": hsdp_momentum, "hsdp_exact": hsdp_exact,
                "hsdp_placements": str(hsdp_trainer._sam_parameters()[0][1].placements),
                "loaded_equal": loaded is not None and all(torch.equal(a, b) for a, b in zip(loaded, saved["grads"])),
                "other_layout": refusal(lambda: other._load_rng_state(checkpoint))},
               os.path.join(out, f"trainer_rank{rank}.pt"))


def own_average_runs(out: str, rank: int) -> None:
    """Momentum-SAM with its own average of the gradients of S (`sam_momentum="own"`) under `LWSAMTrainer`, the model
    sharded at load (`fsdp_size=2`; the tiny GPT-2 that `trainer_runs` saved). Saves `<out>/own_rank<rank>.pt`.

    SGD without momentum under `sam_preset="free"` (which picks the own average: SGD keeps no moment; S is every
    parameter) for `STEPS` steps; AdamW with `sam_momentum="own"` and beta = beta1 for `STEPS` steps. The resume:
    `STEPS - 1` free SGD steps, the checkpoint's ascent state written by the trainer (`_save_rng_state`: each process
    its shard of m) with the model's shards, then a fresh trainer on the same shards that loads it (`_load_rng_state`)
    and takes the last step on the last global batch; and the same last step without loading m (a plain step).
    A full `Trainer` checkpoint cannot be taken here: transformers refuses checkpoints of models sharded at load time
    (their optimizer state), and SGD without momentum has none."""
    directory, checkpoint = os.path.join(out, "gpt2"), os.path.join(out, "own_checkpoint")
    if rank == 0:
        os.makedirs(checkpoint)
    dist.barrier()
    data = shakespeare_lm_dataset(4 * STEPS)
    free = dict(optim="sgd", learning_rate=OWN_LR, sam_preset="free", sam_rho=MOMENTUM_RHO, sam_momentum_beta=OWN_BETA)
    uninterrupted, stepped = train_sharded(directory, data, trainer_config(out, **free), fsdp_size=2)
    adamw = dict(optim="adamw_torch", learning_rate=MOMENTUM_LR, sam_ascent="momentum", sam_rho=MOMENTUM_RHO,
                 sam_momentum="own", sam_momentum_beta=OWN_BETA, adam_beta1=OWN_BETA)
    adamw_trainer, adamw_stepped = train_sharded(directory, data, trainer_config(out, **adamw), fsdp_size=2)

    first, _ = train_sharded(directory, data, trainer_config(out, **dict(free, max_steps=STEPS - 1)), fsdp_size=2)
    first._save_rng_state(checkpoint)  # the ascent's part of a checkpoint: this process's lwsam_ascent_rank{N}.pt
    shards = {n: p.to_local().clone() for n, p in first.model.named_parameters()}
    mine = os.path.join(checkpoint, f"lwsam_ascent_rank{rank}.pt")
    saved = torch.load(mine, weights_only=True) if os.path.isfile(mine) else None  # the test says which is missing
    dist.barrier()
    last = data.select(range(4 * (STEPS - 1), 4 * STEPS))  # the last global batch

    def last_step(load: bool) -> tuple[Any, dict[str, torch.Tensor]]:
        from hf_lwsam import LWSAMTrainer

        trainer = LWSAMTrainer(model=distributed_gpt2(directory, fsdp_size=2), train_dataset=last,
                               args=trainer_config(out, **dict(free, max_steps=1)))
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                p.to_local().copy_(shards[n])
        if load:
            trainer._load_rng_state(checkpoint)
        trainer.train()
        return trainer, {n: p.full_tensor().detach().clone() for n, p in trainer.model.named_parameters()}

    resumed, resumed_stepped = last_step(load=True)
    _, without_vector = last_step(load=False)

    def sam_logs(trainer: Any) -> list[dict[str, float]]:
        return [{k: v for k, v in e.items() if k.startswith("sam/")} for e in trainer.state.log_history
                if "sam/sam_steps" in e]

    names = uninterrupted.perturbed_parameter_names()
    torch.save({"stepped": stepped, "logs": sam_logs(uninterrupted), "source": uninterrupted._ascent.source,
                "selected": names, "sharded": type(uninterrupted._sam_parameters()[0][1]).__name__,
                "adamw_stepped": adamw_stepped, "adamw_source": adamw_trainer._ascent.source,
                "adamw_selected": adamw_trainer.perturbed_parameter_names(), "adamw_logs": sam_logs(adamw_trainer),
                "saved": saved, "files": sorted(os.listdir(checkpoint)),
                "full_shapes": {n: tuple(p.shape) for n, p in stepped.items()},
                "resumed": resumed_stepped, "resumed_logs": sam_logs(resumed), "without_vector": without_vector,
                "kept": [m.clone() for m in uninterrupted.schedule.direction(names)],
                "resumed_kept": [m.clone() for m in resumed.schedule.direction(names)]},
               os.path.join(out, f"own_rank{rank}.pt"))


def main() -> None:
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in MODELS:
        run(name, out, rank, mesh)
    stale_resume(out, rank, mesh)
    momentum_steps(out, rank, mesh)
    trainer_runs(out, rank)
    own_average_runs(out, rank)
    dist.barrier()
    dist.destroy_process_group()
    # `fully_shard` keeps the process group referenced past `destroy_process_group` (gloo's threads stay up), and
    # their teardown at interpreter exit can abort a rank ("terminate called without an active exception") after all
    # results are written: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
