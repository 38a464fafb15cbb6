"""Two real processes on the CPU (gloo), started with `accelerate launch` and
`scripts/accelerate_configs/cpu_2proc.yaml`.

One launch runs every scenario of `tests/distributed_worker.py`; each rank saves what it saw and did, and the tests
below compare the ranks with each other and with an independent computation of the SAM update
(`test_update_math.reference_update`). Sharding, verified by `test_each_rank_reads_its_own_shard`: with sequential
sampling, rank r reads batch `k * world_size + r` at its micro-batch k (accelerate's `BatchSamplerShard`).

The one-step scenarios take one SGD(lr=1) step, so the update is the accumulated gradient. The Trainer counts the
predicted tokens of the whole window on every rank (`average_tokens_across_devices`) and multiplies each rank's loss
by the world size; DDP averages: the gradient is `sum over all ranks' micro-batches of grad(summed loss) / N_global`,
the same normalisation as one process reading every micro-batch, which `reference_update` implements.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from conftest import shakespeare_lm_dataset, tiny_gpt2
from distributed_worker import RHO, SINGLE_PASS, make_args
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from test_update_math import _rel, reference_update

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
CPU_CONFIG = ROOT / "scripts" / "accelerate_configs" / "cpu_2proc.yaml"
WORLD, BATCH = 2, 2  # processes, per-device batch size
LAUNCH_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def probe_unavailable_reason() -> str | None:
    """Why `sam_selection="probe"` cannot be tested yet (`None` once the config accepts it)."""
    fields = LWSAMConfig.__dataclass_fields__
    missing = [f for f in ("sam_top_k", "sam_probe_interval", "sam_probe_batches") if f not in fields]
    if missing:
        return f"sam_selection='probe' is not implemented yet: LWSAMConfig has no {', '.join(missing)}"
    try:
        make_args("probe", "unused")
    except (ValueError, TypeError) as error:
        return f"sam_selection='probe' is rejected by LWSAMConfig: {error}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_script(script: Path, args: list[str], *launcher_args: str, timeout: int = LAUNCH_TIMEOUT_S) -> None:
    """`accelerate launch` `script args` on two CPU processes, offline, one thread each, with the repository and
    `tests/` importable; fail with the log's tail if a rank fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CONFIG),
           "--main_process_port", str(_free_port()), *launcher_args, str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"accelerate launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")


def launch(out: Path, scenarios: list[str], *launcher_args: str) -> None:
    """`accelerate launch` the worker's `scenarios` on two CPU processes (`launch_script`)."""
    launch_script(WORKER, ["--out", str(out), "--scenarios", *scenarios], *launcher_args)


def load(out: Path, scenario: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


DEFAULT_SCENARIOS = ["sync_ga1", "local_ga1", "sync_ga2", "local_ga2", "sync_ga2_noreuse", "multistep"]


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> Path:
    """One 2-process launch of every default scenario (plus probe selection once it exists), fp32."""
    out = tmp_path_factory.mktemp("ddp_fp32")
    launch(out, DEFAULT_SCENARIOS + list(SINGLE_PASS) + ([] if probe_unavailable_reason() else ["probe"]))
    return out


# ------------------------------------------------------------------------------------------------------- helpers
def shard(n_micro: int, rank: int) -> list[list[int]]:
    """Dataset rows of each micro-batch that `rank` reads (sequential sampling, accelerate's batch sharding)."""
    return [list(range((k * WORLD + rank) * BATCH, (k * WORLD + rank + 1) * BATCH)) for k in range(n_micro)]


def rows_to_batch(dataset, rows: list[int]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(dataset[rows][k]) for k in dataset.column_names}


def start_model(ranks: list[dict[str, Any]]) -> torch.nn.Module:
    """`tiny_gpt2()` as the ranks started it (checked against their saved start)."""
    model = tiny_gpt2()
    for name, p in model.named_parameters():
        assert torch.equal(p, ranks[0]["start"][name]) and torch.equal(p, ranks[1]["start"][name]), name
    return model


def n_micro(ranks: list[dict[str, Any]]) -> int:
    return len(ranks[0]["passes"]) // 2


def rank_local_batches(dataset, ranks) -> list[dict[str, torch.Tensor]]:
    """Every micro-batch of the window as its own batch: SAM with one perturbation per rank and micro-batch."""
    return [rows_to_batch(dataset, shard(n_micro(ranks), r)[k]) for k in range(n_micro(ranks)) for r in range(WORLD)]


def global_batches(dataset, ranks) -> list[dict[str, torch.Tensor]]:
    """Micro-batch k of every rank concatenated: the global micro-batches one process would read."""
    return [rows_to_batch(dataset, sum((shard(n_micro(ranks), r)[k] for r in range(WORLD)), []))
            for k in range(n_micro(ranks))]


def by_hand_perturbation(model, batch, names: list[str]) -> dict[str, torch.Tensor]:
    """e_S = rho g_S / ||g_S|| at the start weights, g_S the gradient of `batch`'s summed next-token loss."""
    params = dict(model.named_parameters())
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                             reduction="sum")
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return {n: (RHO * g / norm).detach() for n, g in zip(names, grads)}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors."""
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in b)
    den = sum((b[n].double() ** 2).sum() for n in b)
    return float(torch.sqrt(num / den))


# --------------------------------------------------------------------------------------------------------- tests
def test_each_rank_reads_its_own_shard(fp32_run):
    """The launch really ran two gloo processes, and rank r read batch k * 2 + r at micro-batch k."""
    for scenario in DEFAULT_SCENARIOS:
        ranks = load(fp32_run, scenario)
        args, n_examples = make_args(scenario, "unused")
        dataset = shakespeare_lm_dataset(n_examples)
        for r, result in enumerate(ranks):
            assert (result["rank"], result["world_size"]) == (r, WORLD)
            assert result["distributed_type"] == "DistributedType.MULTI_CPU"
            assert n_micro(ranks) == args.max_steps * args.gradient_accumulation_steps
            seen = [p["input_ids"] for p in result["passes"]]
            expected = [rows_to_batch(dataset, rows)["input_ids"] for rows in shard(n_micro(ranks), r)]
            assert all(torch.equal(seen[2 * k], expected[k]) and torch.equal(seen[2 * k + 1], expected[k])
                       for k in range(n_micro(ranks))), f"{scenario} rank {r}"


def test_ranks_hold_bit_identical_parameters(fp32_run):
    """4 AdamW steps (full SAM, per-rank perturbations, accumulation 2, clipping): identical weights on both ranks."""
    rank0, rank1 = load(fp32_run, "multistep")
    assert rank0["log_history"][-1]["step"] == 4
    moved = 0
    for name, p in rank0["end"].items():
        assert torch.equal(p, rank1["end"][name]), name
        moved += not torch.equal(p, rank0["start"][name])
    assert moved == len(rank0["end"])  # every parameter was trained
    # ... although each rank perturbed differently (its own micro-batch gradient).
    e0, e1 = rank0["passes"][1]["perturbation"], rank1["passes"][1]["perturbation"]
    assert rel_diff(e0, e1) > 0.05


@pytest.mark.parametrize("scenario", ["sync_ga1", "sync_ga2", "sync_ga2_noreuse"])
def test_sync_perturbation_equals_single_process_sam_on_global_batch(fp32_run, scenario, tmp_path):
    ranks = load(fp32_run, scenario)
    dataset = shakespeare_lm_dataset(make_args(scenario, "unused")[1])
    model = start_model(ranks)
    selected = ranks[0]["selected"]
    batches = global_batches(dataset, ranks)
    got = ranks[0]["end"]

    # 1. An independent computation: one process, SAM with one perturbation per global micro-batch.
    expected = reference_update(copy.deepcopy(model), batches, selected, RHO, causal=True)
    assert _rel(got, expected, ranks[0]["start"]) <= 1e-5
    # 2. The single-process trainer on the same global batches (per-device batch 2 * 2).
    single = copy.deepcopy(model)
    args, n_examples = make_args(scenario, str(tmp_path / "single"), per_device_train_batch_size=WORLD * BATCH)
    LWSAMTrainer(model=single, args=args, train_dataset=dataset).train()
    assert _rel(got, dict(single.named_parameters()), ranks[0]["start"]) <= 1e-5

    # The ranks applied the same perturbation: e from the all-reduced g_S of the global micro-batch.
    for k in range(n_micro(ranks)):
        e0, e1 = (r["passes"][2 * k + 1]["perturbation"] for r in ranks)
        assert all(torch.equal(e0[n], e1[n]) for n in selected)
        assert rel_diff(e0, by_hand_perturbation(model, batches[k], selected)) <= 1e-5
    # Teeth: the rank-local (m-sharpness) update is measurably different.
    local = reference_update(copy.deepcopy(model), rank_local_batches(dataset, ranks), selected, RHO, causal=True)
    assert _rel(local, expected, ranks[0]["start"]) > 1e-3


@pytest.mark.parametrize("scenario", ["local_ga1", "local_ga2"])
def test_default_perturbation_is_rank_local(fp32_run, scenario):
    """m-sharpness: each rank perturbs with its own micro-batch gradient; pass 2's gradients are averaged."""
    ranks = load(fp32_run, scenario)
    dataset = shakespeare_lm_dataset(make_args(scenario, "unused")[1])
    model = start_model(ranks)
    selected = ranks[0]["selected"]
    for k in range(n_micro(ranks)):
        per_rank = [r["passes"][2 * k + 1]["perturbation"] for r in ranks]
        for r in range(WORLD):
            own = by_hand_perturbation(model, rows_to_batch(dataset, shard(n_micro(ranks), r)[k]), selected)
            assert rel_diff(per_rank[r], own) <= 1e-5, f"rank {r} micro-batch {k}"
        assert rel_diff(per_rank[0], per_rank[1]) > 0.05  # the shards' directions differ

    got = ranks[0]["end"]
    assert all(torch.equal(got[n], ranks[1]["end"][n]) for n in got)
    expected = reference_update(copy.deepcopy(model), rank_local_batches(dataset, ranks), selected, RHO, causal=True)
    assert _rel(got, expected, ranks[0]["start"]) <= 1e-5
    plain = reference_update(copy.deepcopy(model), rank_local_batches(dataset, ranks), selected, 0.0, causal=True)
    assert _rel(plain, expected, ranks[0]["start"]) > 1e-3


@pytest.mark.parametrize("scenario", ["sync_ga2", "local_ga2", "sync_ga2_noreuse", "multistep"])
def test_gradient_accumulation_syncs_once_per_optimizer_step(fp32_run, scenario):
    """Pass 1 never all-reduces through DDP; pass 2 only on the last micro-batch of each accumulation window."""
    ranks = load(fp32_run, scenario)
    accumulation = make_args(scenario, "unused")[0].gradient_accumulation_steps
    assert accumulation == 2
    for result in ranks:
        passes = result["passes"]
        steps = len(passes) // (2 * accumulation)
        will_sync = [p["will_sync"] for p in passes]
        # Per optimizer step: pass 1, pass 2 of micro-batch 0, then pass 1, pass 2 of micro-batch 1.
        assert will_sync == [False, False, False, True] * steps
        total = result["allreduces_total"]
        assert total > 0 and total % steps == 0
        per_step = total // steps  # DDP buckets of this model
        # Bucket all-reduces counted before each pass: nothing new until the last pass 2 of each window ran.
        counted = [p["allreduces_before"] for p in passes]
        assert counted == [s * per_step for s in range(steps) for _ in range(2 * accumulation)]


@pytest.mark.parametrize("scenario", ["looksam_sync", "random_late", "momentum", "momentum_own"])
def test_schedules_equal_single_process_on_the_global_batch(fp32_run, scenario, tmp_path):
    """LookSAM with a synchronised ascent (g_v from all-reduced gradients, added after the all-reduce), random
    perturbation from step 1 (noise seeded by step and parameter, not by rank) and Momentum-SAM with AdamW (e_S from
    the optimizer's first moment, identical on every process without any communication of its own; with plain SGD,
    its own average of the all-reduced gradient): two processes take the single-process trainer's steps on the global
    batches."""
    ranks = load(fp32_run, scenario)
    model = start_model(ranks)
    args, n_examples = make_args(scenario, str(tmp_path / "single"), per_device_train_batch_size=WORLD * BATCH)
    single = LWSAMTrainer(model=model, args=args, train_dataset=shakespeare_lm_dataset(n_examples))
    single.train()
    got, start = ranks[0]["end"], ranks[0]["start"]
    assert all(torch.equal(got[n], ranks[1]["end"][n]) for n in got)
    assert _rel(got, dict(single.model.named_parameters()), start) <= 1e-5
    steps = [e["sam/sam_steps"] for e in ranks[0]["log_history"] if "sam/sam_steps" in e]
    if scenario in ("random_late", "momentum", "momentum_own"):
        assert steps == ([0.0, 1.0, 1.0] if scenario == "random_late" else [0.0, 1.0, 1.0, 1.0])
        for a, b in zip(*(r["passes"] for r in ranks)):  # every process perturbed with the same noise / moment
            assert all(torch.equal(a["at"][n], b["at"][n]) for n in a["at"])
        if scenario != "random_late":  # ... and really perturbed: ||e_S|| = rho on the SAM steps (step 0 has no moment)
            e_norms = [e["sam/e_norm"] for e in ranks[0]["log_history"] if "sam/e_norm" in e]
            assert len(e_norms) == 3 and all(abs(x - args.sam_rho) < 1e-5 for x in e_norms)
    else:
        assert steps == [1.0, 0.0, 1.0, 0.0]
        assert [e["sam/looksam_steps"] for e in ranks[0]["log_history"] if "sam/looksam_steps" in e] == [1.0, 1.0]


def test_looksam_keeps_the_same_component_on_every_rank(fp32_run):
    """Rank-local ascent (m-sharpness): the clean gradient of S is all-reduced once per SAM window, so g_v, and with it
    every LookSAM step, is the same on both ranks."""
    rank0, rank1 = load(fp32_run, "looksam_local")
    assert rank0["kept"] is not None and all(torch.equal(a, b) for a, b in zip(rank0["kept"], rank1["kept"]))
    assert all(torch.equal(p, rank1["end"][n]) and not torch.equal(p, rank0["start"][n])
               for n, p in rank0["end"].items() if n in rank0["selected"])


def test_probe_selection_identical_on_all_ranks(fp32_run):
    reason = probe_unavailable_reason()
    if reason:
        pytest.skip(reason)
    ranks = load(fp32_run, "probe")
    n_trainable = len(ranks[0]["start"])
    for k in range(n_micro(ranks)):
        names = [r["passes"][2 * k + 1]["perturbed_names"] for r in ranks]
        assert names[0] == names[1], f"step {k}: rank 0 perturbs {names[0]}, rank 1 {names[1]}"
        assert 0 < len(names[0]) < n_trainable
        # ... and really perturbed them: a non-zero e on each rank.
        for r in ranks:
            e = r["passes"][2 * k + 1]["perturbation"]
            assert sum(float(e[n].abs().sum()) for n in names[0]) > 0
    assert ranks[0]["selected"] == ranks[1]["selected"]
    assert all(torch.equal(p, ranks[1]["end"][n]) for n, p in ranks[0]["end"].items())
    history = [r["probe_history"] for r in ranks]
    if history[0] is not None:  # the probe's own record: one probe per step (sam_probe_interval=1), same on both
        assert len(history[0]) == make_args("probe", "unused")[0].max_steps
        assert history[0] == history[1]


@pytest.mark.slow
def test_bf16_from_the_launcher(tmp_path):
    """`--mixed_precision bf16` at launch: autocast in both passes, rank-identical weights, the fp32 update's
    direction."""
    launch(tmp_path, ["sync_ga1", "multistep"], "--mixed_precision", "bf16")
    multistep = load(tmp_path, "multistep")
    assert [r["mixed_precision"] for r in multistep] == ["bf16", "bf16"]
    for name, p in multistep[0]["end"].items():
        assert torch.isfinite(p).all() and torch.equal(p, multistep[1]["end"][name]), name

    ranks = load(tmp_path, "sync_ga1")
    dataset = shakespeare_lm_dataset(make_args("sync_ga1", "unused")[1])
    model = start_model(ranks)
    expected = reference_update(model, global_batches(dataset, ranks), ranks[0]["selected"], RHO, causal=True)
    start = ranks[0]["start"]
    update = torch.cat([(ranks[0]["end"][n] - start[n]).flatten() for n in start])
    expected_update = torch.cat([(expected[n] - start[n]).flatten() for n in start])
    assert 1e-4 < _rel(ranks[0]["end"], expected, start)  # bf16 really was on ...
    assert torch.nn.functional.cosine_similarity(update, expected_update, dim=0) > 0.99  # ... and is close to fp32
