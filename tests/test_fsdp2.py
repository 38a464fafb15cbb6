"""FSDP2 on the CPU: two gloo processes with raw `fully_shard` on a tiny GPT-2 and a tiny Llama with LoRA. One LW-SAM
step through hf_lwsam's sharded pass 1 / perturb / restore equals single-process LW-SAM on the global batch, g_S is
not zero, and a failing pass 2 leaves the shards exactly as they were; the stale ascent resumes bit for bit from each
process's shard of its vector, and the momentum ascent equals Momentum-SAM on one process, from the optimizer's first
moment or from its own average of the gradients (`sam_momentum="own"`, resumed bit for bit from each process's shard of
m) (`tests/fsdp2_worker.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora
from fsdp2_worker import MOMENTUM_LR, MOMENTUM_RHO, OWN_BETA, OWN_LR, STEPS
from hf_lwsam.selection import layer_parameters, select_layers

ROOT = Path(__file__).resolve().parents[1]
RHO = 0.5

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "fsdp2_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_step(make) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LW-SAM on the global batch (both ranks' rows), SGD lr 1, computed by hand: the weights after the step and the
    gradient at the perturbed point."""
    model = make()
    named = layer_parameters(model, select_layers(model))
    data = shakespeare_lm_dataset(4)
    batch = {k: torch.tensor(v) for k, v in data[:4].items()}
    selected = [p for _, p in named]
    g = torch.autograd.grad(model(**batch).loss, selected)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(selected, g):
            p.add_(RHO * gi / norm)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(**batch).loss, params)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for p, gi in zip(selected, g):
            p.sub_(RHO * gi / norm)
        for p, gi in zip(params, grads):
            p.sub_(gi)
    return {n: p.detach() for n, p in model.named_parameters()}, dict(zip(names, grads))


@pytest.mark.parametrize("name, make", [("gpt2", tiny_gpt2), ("llama-lora", tiny_llama_lora)])
def test_fsdp2_step_equals_single_process_lwsam_on_the_global_batch(results, name, make):
    got = torch.load(results / f"{name}.pt", weights_only=False)
    assert got["sharded"] == "DTensor" and got["finite"] and got["norm"] > 0  # never silently zero
    expected, _ = single_process_step(make)
    start = {n: p.detach() for n, p in make().named_parameters()}
    num = sum(((got["stepped"][n] - expected[n]).double() ** 2).sum() for n in expected)
    den = sum(((expected[n] - start[n]).double() ** 2).sum() for n in expected)
    assert den > 0 and float(torch.sqrt(num / den)) <= 1e-6


@pytest.mark.parametrize("name", ["gpt2", "llama-lora"])
def test_fsdp2_failing_pass_two_restores_the_shards_exactly(results, name):
    assert torch.load(results / f"{name}.pt", weights_only=False)["restored"]


@pytest.mark.parametrize("name, make", [("gpt2", tiny_gpt2), ("llama-lora", tiny_llama_lora)])
def test_fsdp2_probe_norms_of_sharded_gradients_equal_the_whole_gradients(results, name, make):
    """Every process ranks the same per-layer norms: the shards' squared norms, summed over the processes, equal the
    per-layer squared norms of the whole (reduced) gradient."""
    from hf_lwsam.probe import candidate_layers, owned_parameters

    got = torch.load(results / f"{name}.pt", weights_only=False)["layer_norms"]
    _, grads = single_process_step(make)
    model = make()
    names = {id(p): n for n, p in model.named_parameters()}
    for layer, params in owned_parameters(model, candidate_layers(model)).items():
        expected = sum(float((grads[names[id(p)]].double() ** 2).sum()) for p in params)
        assert got[layer] == pytest.approx(expected, rel=1e-4, abs=1e-12), layer


# ---------------------------------------------------------------------------------------- one-pass ascents
def stale(results: Path) -> list[dict]:
    return [torch.load(results / f"stale_rank{r}.pt", weights_only=False) for r in range(2)]


def test_fsdp2_stale_resume_from_each_process_shard_is_bit_exact(results):
    """3 stale steps uninterrupted equal 2 steps, a checkpoint (the model's shards, `lwsam_ascent_rank{N}.pt` per
    process), a fresh model and schedule loaded from it and the third step, bit for bit; without the kept vector the
    third step is a plain one and lands elsewhere."""
    ranks = stale(results)
    for r, got in enumerate(ranks):
        assert got["files"] == ["lwsam_ascent_rank0.pt", "lwsam_ascent_rank1.pt", "model_rank0.pt", "model_rank1.pt"]
        saved = got["saved"]
        assert saved["per_process"] and saved["num_processes"] == 2 and saved["kind"] == "stale"
        for name, g in zip(saved["names"], saved["grads"]):  # this process's piece of each tensor of S (Shard(0))
            assert g.shape == torch.empty(got["full_shapes"][name]).chunk(2)[r].shape and g.abs().sum() > 0, name
        assert got["e_norms"] == pytest.approx([0.0] + [RHO] * (STEPS - 1), abs=1e-5)  # plain, then stale SAM
        assert all(torch.equal(got["resumed"][n], p) for n, p in got["uninterrupted"].items()), f"rank {r}"
        assert all(torch.equal(a, b) for a, b in zip(got["resumed_kept"], got["kept"])), f"rank {r}"
        assert not all(torch.equal(got["without_vector"][n], p) for n, p in got["uninterrupted"].items())
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["saved"]["grads"], ranks[1]["saved"]["grads"]))


def test_fsdp2_stale_resume_with_other_processes_or_sharding_is_refused(results):
    """Another process count, a process without its own file (only the other's), and an unsharded vector (a
    `lwsam_ascent.pt` of one process or DDP) for sharded S: each a `ValueError` saying how to resume."""
    for r, got in enumerate(stale(results)):
        refused = got["refused"]
        assert refused["three processes"] is not None and "was written by 2 processes" in refused["three processes"]
        assert "this run has 3. Resume with 2 processes." in refused["three processes"]
        assert refused["process 2 of 3"] is not None and "but none for process 2" in refused["process 2 of 3"]
        assert refused["own file missing"] is not None and f"but none for process {r}" in refused["own file missing"]
        assert refused["unsharded vector"] is not None and "does not fit this run" in refused["unsharded vector"]
        assert "Resume with the same number of processes" in refused["unsharded vector"]


def test_fsdp2_momentum_steps_equal_the_single_process_formula(results):
    """AdamW with `sam_ascent="momentum"` on 2 processes: e_S from the shards of the first moment with the norm summed
    over them (||e_S|| = rho, not rho per process) takes the steps of Momentum-SAM by hand on the global batches."""
    from test_momentum import SELECTED, reference_run, rel

    ranks = [torch.load(results / f"momentum_rank{r}.pt", weights_only=False) for r in range(2)]
    got = ranks[0]["stepped"]
    assert ranks[0]["sharded"] == "DTensor" and all(torch.equal(p, ranks[1]["stepped"][n]) for n, p in got.items())
    assert ranks[0]["selected"] == [n for n in got if n.startswith(SELECTED)]
    assert ranks[0]["e_norms"] == pytest.approx([MOMENTUM_RHO] * (STEPS - 1), rel=1e-5)
    data, adamw = shakespeare_lm_dataset(4 * STEPS), (torch.optim.AdamW, dict(lr=MOMENTUM_LR, weight_decay=0.0))
    expected = reference_run(*adamw, MOMENTUM_RHO, SELECTED, data, steps=STEPS)
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert rel(got, expected, start) <= 1e-5
    assert rel(reference_run(*adamw, 0.0, SELECTED, data, steps=STEPS), expected, start) > 1e-2  # SAM changed it


# ------------------------------------------------------------------------------------------ LWSAMTrainer itself
def trainer_results(results: Path) -> list[dict]:
    return [torch.load(results / f"trainer_rank{r}.pt", weights_only=False) for r in range(2)]


def test_fsdp2_trainer_momentum_logs_the_global_e_norm_and_takes_the_formula_steps(results):
    """`LWSAMTrainer` with `sam_ascent="momentum"` on a model sharded at load: S is the sharded parameters (the default
    selection's trace leaves the root module unsharded until it is resharded), so every step after the first is a SAM
    step; the logged `sam/e_norm` is ||e_S|| over the whole of S, rho (not the norm of one process's shards, about
    rho / sqrt(2)); and the weights are those of Momentum-SAM by hand on the global batches."""
    from test_momentum import SELECTED, reference_run, rel

    ranks = trainer_results(results)
    got = ranks[0]["stepped"]
    assert ranks[0]["sharded"] == "DTensor" and all(torch.equal(p, ranks[1]["stepped"][n]) for n, p in got.items())
    assert ranks[0]["selected"] == [n for n in got if n.startswith(SELECTED)]
    for r, logged in enumerate(ranks):
        assert [e["sam/sam_steps"] for e in logged["logs"]] == [0.0] + [1.0] * (STEPS - 1), f"rank {r}"
        assert [e["sam/e_norm"] for e in logged["logs"][1:]] == pytest.approx([MOMENTUM_RHO] * (STEPS - 1), abs=1e-6)
    data, adamw = shakespeare_lm_dataset(4 * STEPS), (torch.optim.AdamW, dict(lr=MOMENTUM_LR, weight_decay=0.0))
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert rel(got, reference_run(*adamw, MOMENTUM_RHO, SELECTED, data, steps=STEPS), start) <= 1e-5


def test_fsdp2_trainer_writes_every_process_ascent_file_before_the_checkpoint_is_marked_complete(results):
    """The stale ascent's checkpoint: when `_save_rng_state` returns on process 0 (which then writes
    `trainer_state.json`, marking the checkpoint complete), process 1's file is written, although process 1 came 2 s
    late; each file records the layout of its shards (device mesh, dimension names, placements)."""
    for r, got in enumerate(trainer_results(results)):
        assert got["seen"] == ["lwsam_ascent_rank0.pt", "lwsam_ascent_rank1.pt"], f"rank {r}"
        saved = got["saved"]
        assert saved["per_process"] and saved["process_index"] == r and len(saved["layout"]) == len(saved["names"])
        assert all(entry == ["[0, 1]", "('fsdp',)", "(Shard(dim=0),)"] for entry in saved["layout"]), saved["layout"]


def test_fsdp2_trainer_resume_with_another_mesh_layout_is_refused(results):
    """The same 2 processes with another layout (`dp_replicate_size=2, fsdp_size=1`: whole tensors replicated): a
    `ValueError` naming the layouts and the fix; the same layout loads each process's own vector."""
    for r, got in enumerate(trainer_results(results)):
        assert got["loaded_equal"], f"rank {r}"
        refused = got["other_layout"]
        assert refused is not None and "for another layout of the parameters" in refused
        assert "(Shard(dim=0),) on the device mesh of ranks [0, 1] (dimensions ('fsdp',))" in refused
        assert "('dp_replicate', 'fsdp')" in refused and "Resume with the device mesh and sharding" in refused


def test_fsdp2_trainer_under_hsdp_counts_each_shard_once_in_the_norm(results):
    """HSDP (`dp_replicate_size=2, fsdp_size=1`: each shard on both processes): the norm of g_S or m_S sums each shard
    once, not once per replica, so e_S has length rho and the steps are those of one process on the global batch: the
    momentum ascent's as Momentum-SAM by hand, the exact ascent's one SGD step as LW-SAM by hand."""
    from test_momentum import SELECTED, reference_run, rel

    got = trainer_results(results)[0]
    assert got["hsdp_placements"] == "(Replicate(), Shard(dim=0))"
    data, adamw = shakespeare_lm_dataset(4 * STEPS), (torch.optim.AdamW, dict(lr=MOMENTUM_LR, weight_decay=0.0))
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert rel(got["hsdp_momentum"], reference_run(*adamw, MOMENTUM_RHO, SELECTED, data, steps=STEPS), start) <= 1e-5
    expected, _ = single_process_step(tiny_gpt2)
    assert rel(got["hsdp_exact"], expected, start) <= 1e-5


# ------------------------------------------------------------------------ Momentum-SAM's own average of gradients
def own_results(results: Path) -> list[dict]:
    return [torch.load(results / f"own_rank{r}.pt", weights_only=False) for r in range(2)]


def own_sgd(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer of the own-average runs: SGD without momentum (it keeps no first moment)."""
    return torch.optim.SGD(params, lr=OWN_LR)


def whole_moment(ranks: list[dict], key: str) -> list[torch.Tensor]:
    """The processes' shards of m (`Shard(0)`: rank 0's rows first), put together into whole tensors."""
    return [torch.cat(pieces) for pieces in zip(*(got[key] for got in ranks))]


def moment_error(whole: list[torch.Tensor], names: list[str], expected: dict[str, torch.Tensor]) -> float:
    num = sum(float(((m - expected[n]).double() ** 2).sum()) for n, m in zip(names, whole))
    return (num / sum(float((expected[n].double() ** 2).sum()) for n in names)) ** 0.5


def test_fsdp2_own_average_under_the_free_preset_takes_the_formula_steps(results):
    """SGD without momentum keeps no moment, so `sam_preset="free"` keeps Momentum-SAM's own average (every parameter
    in S), each process a shard of it: step 1 is plain (m = 0), then e_S = -rho m / ||m|| with the norm over the whole
    of S. The weights are those of the formula by hand on one process on the global batches (m from the gradients the
    optimizer stepped with), and the processes' shards of m, put together, are m by hand."""
    from test_momentum import rel
    from test_momentum_own import own_reference

    ranks = own_results(results)
    got = ranks[0]["stepped"]
    assert ranks[0]["sharded"] == "DTensor" and all(torch.equal(p, ranks[1]["stepped"][n]) for n, p in got.items())
    assert ranks[0]["source"] == "own" and ranks[0]["selected"] == list(got)
    for r, own in enumerate(ranks):
        assert [e["sam/sam_steps"] for e in own["logs"]] == [0.0] + [1.0] * (STEPS - 1), f"rank {r}"
        assert [e["sam/e_norm"] for e in own["logs"][1:]] == pytest.approx([MOMENTUM_RHO] * (STEPS - 1), abs=1e-6)
    data, kept = shakespeare_lm_dataset(4 * STEPS), {}
    expected = own_reference(own_sgd, data, rho=MOMENTUM_RHO, beta=OWN_BETA, kept=kept)
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert rel(got, expected, start) <= 1e-5
    assert rel(own_reference(own_sgd, data, rho=0.0), expected, start) > 1e-2  # SAM changed it
    assert moment_error(whole_moment(ranks, "kept"), ranks[0]["selected"], kept) <= 1e-5


def test_fsdp2_own_average_with_adamw_and_beta_one_equals_the_first_moment(results):
    """AdamW with `sam_momentum="own"` and beta = beta1 on the default selection: the steps of Momentum-SAM by hand
    from AdamW's `exp_avg`, and those of the same trainer reading the sharded `exp_avg` itself."""
    from test_momentum import SELECTED, reference_run, rel

    ranks = own_results(results)
    got = ranks[0]["adamw_stepped"]
    assert all(torch.equal(p, ranks[1]["adamw_stepped"][n]) for n, p in got.items())
    assert ranks[0]["adamw_source"] == "own"
    assert ranks[0]["adamw_selected"] == [n for n in got if n.startswith(SELECTED)]
    assert [e["sam/sam_steps"] for e in ranks[0]["adamw_logs"]] == [0.0] + [1.0] * (STEPS - 1)
    data, adamw = shakespeare_lm_dataset(4 * STEPS), (torch.optim.AdamW, dict(lr=MOMENTUM_LR, weight_decay=0.0))
    start = {n: p.detach() for n, p in tiny_gpt2().named_parameters()}
    assert rel(got, reference_run(*adamw, MOMENTUM_RHO, SELECTED, data, steps=STEPS), start) <= 1e-5
    assert rel(got, trainer_results(results)[0]["stepped"], start) <= 1e-5


def test_fsdp2_own_average_resumes_from_each_process_shard_bit_for_bit(results):
    """After `STEPS - 1` steps each process writes its own shard of m (`lwsam_ascent_rank{N}.pt`: kind "momentum",
    float32, this process's rows of each tensor of S); the shards put together are m by hand. A fresh trainer on the
    saved model shards that loads it takes the last step exactly as the uninterrupted run (a SAM step), and holds the
    same m after it; without m the last step is a plain one and lands elsewhere."""
    from test_momentum_own import own_reference

    ranks, kept = own_results(results), {}
    own_reference(own_sgd, shakespeare_lm_dataset(4 * STEPS),
                  steps=STEPS - 1, rho=MOMENTUM_RHO, beta=OWN_BETA, kept=kept)
    names = ranks[0]["selected"]
    for r, got in enumerate(ranks):
        assert [f for f in got["files"] if f.startswith("lwsam")] == ["lwsam_ascent_rank0.pt", "lwsam_ascent_rank1.pt"]
        saved = got["saved"]
        assert saved is not None, f"process {r} wrote no lwsam_ascent_rank{r}.pt"
        assert saved["per_process"] and saved["num_processes"] == 2 and saved["process_index"] == r
        assert saved["kind"] == "momentum" and saved["names"] == names
        assert all(entry == ["[0, 1]", "('fsdp',)", "(Shard(dim=0),)"] for entry in saved["layout"]), saved["layout"]
        for name, m in zip(names, saved["grads"]):
            assert m.dtype == torch.float32 and m.shape == torch.empty(got["full_shapes"][name]).chunk(2)[r].shape
        assert all(torch.equal(got["resumed"][n], p) for n, p in got["stepped"].items()), f"rank {r}"
        assert [e["sam/sam_steps"] for e in got["resumed_logs"]] == [1.0], f"rank {r}"
        assert all(torch.equal(a, b) for a, b in zip(got["resumed_kept"], got["kept"])), f"rank {r}"
        assert not all(torch.equal(got["without_vector"][n], p) for n, p in got["stepped"].items())
    saved = [{"grads": got["saved"]["grads"]} for got in ranks]
    assert moment_error(whole_moment(saved, "grads"), names, kept) <= 1e-5
