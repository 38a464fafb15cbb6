"""The kept ascent vector in checkpoints (`AscentSchedule.save` / `load` / `direction`), in one process: one file for
the run, or under FSDP2 one per process holding its shard (`lwsam_ascent_rank{N}.pt`); a resume with another number
of processes, without this process's file, or with other shapes is refused. The shards here are a real gradient of
S cut along dimension 0 as FSDP2's `Shard(0)` cuts it; `tests/test_fsdp2.py` does the same across two processes."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam.schedule import AscentSchedule
from hf_lwsam.selection import layer_parameters, select_layers

CPU = torch.device("cpu")
WORLD = 2


@pytest.fixture(scope="module")
def gradient() -> tuple[list[str], list[torch.Tensor]]:
    """Names of S (tiny_gpt2's default selection) and the gradient of S on real text."""
    model = tiny_gpt2()
    named = layer_parameters(model, select_layers(model))
    batch = {k: torch.tensor(v) for k, v in shakespeare_lm_dataset(2)[:2].items()}
    return [n for n, _ in named], list(torch.autograd.grad(model(**batch).loss, [p for _, p in named]))


def shard(tensors: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Process `rank`'s piece of each tensor, as FSDP2's `Shard(0)` over `WORLD` processes holds it."""
    return [torch.chunk(t, WORLD, dim=0)[rank].clone() for t in tensors]


def save_per_process(directory, names: list[str], grads: list[torch.Tensor], ranks=range(WORLD)) -> None:
    for rank in ranks:
        schedule = AscentSchedule(ascent="stale")
        pieces = shard(grads, rank)
        schedule.keep(names, pieces, like=pieces, per_process=True)
        schedule.save(str(directory), rank, WORLD)


def loaded(directory, process_index: int = 0, num_processes: int = WORLD, **kwargs) -> AscentSchedule:
    schedule = AscentSchedule(**{"ascent": "stale", **kwargs})
    schedule.load(str(directory), CPU, process_index, num_processes)
    return schedule


def test_each_process_saves_and_reloads_its_own_shard(gradient, tmp_path):
    names, grads = gradient
    save_per_process(tmp_path, names, grads)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lwsam_ascent_rank0.pt", "lwsam_ascent_rank1.pt"]
    for rank in range(WORLD):
        schedule = loaded(tmp_path, rank)
        assert schedule.per_process
        kept = schedule.direction(names, like=shard(grads, rank))
        assert all(torch.equal(a, b) for a, b in zip(kept, shard(grads, rank))), rank
    assert not all(torch.equal(a, b) for a, b in zip(shard(grads, 0), shard(grads, 1)))  # two different pieces


def test_a_whole_vector_is_one_file_that_every_process_reads(gradient, tmp_path):
    names, grads = gradient
    schedule = AscentSchedule(ascent="stale")
    schedule.keep(names, grads, like=grads)
    schedule.save(str(tmp_path), 0, WORLD)
    assert [p.name for p in tmp_path.iterdir()] == ["lwsam_ascent.pt"]
    for rank in range(WORLD):
        schedule = loaded(tmp_path, rank)
        assert not schedule.per_process
        assert all(torch.equal(a, b) for a, b in zip(schedule.direction(names, like=grads), grads))


@pytest.mark.parametrize("num_processes", [1, 4])
def test_per_process_vectors_with_another_number_of_processes_are_refused(num_processes, gradient, tmp_path):
    names, grads = gradient
    save_per_process(tmp_path, names, grads)
    message = (rf"lwsam_ascent_rank0.pt was written by 2 processes, each keeping its shard of the ascent vector; this "
               rf"run has {num_processes}. Resume with 2 processes.")
    with pytest.raises(ValueError, match=message):
        loaded(tmp_path, 0, num_processes)
    with pytest.raises(ValueError, match="but none for process 3"):  # no file at all for a fourth process
        loaded(tmp_path, 3, 4)


def test_a_checkpoint_without_this_process_file_is_refused(gradient, tmp_path):
    """Only the other process's shard there: it is not read in place of this process's own."""
    names, grads = gradient
    save_per_process(tmp_path, names, grads, ranks=[1])
    with pytest.raises(ValueError, match=r"holds per-process ascent vectors \(lwsam_ascent_rank1.pt\) but none for "
                                         r"process 0: resume with the number of processes that wrote the checkpoint"):
        loaded(tmp_path, 0)
    assert loaded(tmp_path, 1).direction(names, like=shard(grads, 1)) is not None


def test_a_vector_of_other_shapes_is_refused_naming_the_parameter(gradient, tmp_path):
    """A whole vector (one process or DDP wrote it) for a sharded S, and a shard for whole parameters."""
    names, grads = gradient
    whole = AscentSchedule(ascent="stale")
    whole.keep(names, grads, like=grads)
    whole.save(str(tmp_path), 0, 1)
    first = names[0]
    full, piece = (re.escape(str(tuple(t.shape))) for t in (grads[0], shard(grads, 0)[0]))
    with pytest.raises(ValueError, match=rf"lwsam_ascent.pt does not fit this run: {first} has shape {full} there "
                                         rf"but {piece} here\. Resume with the same number of processes and the same "
                                         "sharding"):
        loaded(tmp_path, 0, 1).direction(names, like=shard(grads, 0))

    (tmp_path / "sharded").mkdir()
    save_per_process(tmp_path / "sharded", names, grads)
    with pytest.raises(ValueError, match=rf"{first} has shape {piece} there but {full} here"):
        loaded(tmp_path / "sharded", 0).direction(names, like=grads)


def test_another_selection_or_kind_of_vector_starts_over(gradient, tmp_path):
    """Not refusals: a vector for other parameters (a probe changed S), a stale gradient read by LookSAM (which keeps
    g_v) and a checkpoint without a vector are not used: the next SAM step starts over."""
    names, grads = gradient
    save_per_process(tmp_path, names, grads)
    assert loaded(tmp_path).direction(names, like=shard(grads, 0)) is not None
    assert loaded(tmp_path).direction(names[1:], like=shard(grads, 0)[1:]) is None
    assert loaded(tmp_path, ascent="exact", reuse="looksam").direction(names, like=shard(grads, 0)) is None
    (tmp_path / "empty").mkdir()
    assert loaded(tmp_path / "empty").direction(names) is None


def test_a_file_copied_to_another_process_name_is_refused(gradient, tmp_path):
    """A per-process file records its writer: process 1 reading process 0's file (renamed or copied) is refused."""
    names, grads = gradient
    save_per_process(tmp_path, names, grads)
    (tmp_path / "lwsam_ascent_rank1.pt").write_bytes((tmp_path / "lwsam_ascent_rank0.pt").read_bytes())
    with pytest.raises(ValueError, match=re.escape("holds the ascent vector of process 0, not of process 1")):
        loaded(tmp_path, 1)


@pytest.mark.parametrize("preset", ["exact", "free"])
def test_resumed_from_the_last_steps_checkpoint_part_way_through_an_epoch_it_trains_no_step_more(sgd_args, preset):
    """The stock loop (transformers 5.x) takes one optimizer step past max_steps when resumed from the last step's
    checkpoint part-way through an epoch: here it stops where it was, the weights those of the checkpoint."""
    from hf_lwsam import LWSAMTrainer

    args = sgd_args(sam_preset=preset, learning_rate=0.1, max_steps=2, save_strategy="steps", save_steps=1)
    data = shakespeare_lm_dataset(16)  # 4 optimizer steps an epoch
    whole = tiny_gpt2()
    LWSAMTrainer(model=whole, args=args, train_dataset=data).train()
    resumed = tiny_gpt2()
    trainer = LWSAMTrainer(model=resumed, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=f"{args.output_dir}/checkpoint-2")
    assert trainer.state.global_step == 2
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_a_checkpoint_before_any_vector_says_so_and_one_missing_its_file_is_warned(gradient, tmp_path, caplog):
    """Every save writes the run's file, also before a vector is kept; a checkpoint without it (removed, or from an
    older version) resumes without one, with a warning that the next steps differ from an uninterrupted run's."""
    import logging

    names, grads = gradient
    (tmp_path / "early").mkdir()
    AscentSchedule(ascent="stale").save(str(tmp_path / "early"), 0, 1)
    assert [p.name for p in (tmp_path / "early").iterdir()] == ["lwsam_ascent.pt"]
    with caplog.at_level(logging.WARNING, logger="hf_lwsam"):
        assert loaded(tmp_path / "early", 0, 1).direction(names, like=grads) is None
        assert not caplog.records
        (tmp_path / "removed").mkdir()
        assert loaded(tmp_path / "removed", 0, 1).direction(names, like=grads) is None
    assert any("has no lwsam_ascent.pt: the run's kept vector (stale) is not restored" in r.getMessage()
               for r in caplog.records)


def test_an_own_average_restored_for_another_sharding_is_refused_at_the_first_optimizer_step(gradient, tmp_path):
    """The momentum ascent's own m, saved whole (one process or DDP), loaded where S is sharded (this process's
    halves): the optimizer step's average refuses it as a SAM step would, before any step (a plain first step
    included), not with a shape error from inside the update."""
    names, grads = gradient
    whole = AscentSchedule(ascent="momentum")
    whole.average(names, grads, like=grads, beta=0.9)
    whole.save(str(tmp_path), 0, 1)
    restored = AscentSchedule(ascent="momentum")
    restored.load(str(tmp_path), CPU, 0, WORLD)
    halves = shard(grads, 0)
    with pytest.raises(ValueError, match=r"does not fit this run: .* Resume with the same number of processes"):
        restored.average(names, halves, like=halves, beta=0.9)
