"""LW-SAM under mixed precision on one CUDA device: bf16 autocast and fp16 with the GradScaler.

Run with `python -m pytest -m gpu tests/test_gpu.py` (skipped without CUDA). The runs come from `scripts/gpu_check.py`;
the reference is the independent fp32 computation of the SAM update in `test_update_math.reference_update`.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gpu_check import ByteLMDataset, cosine, make_model, text_bytes, train  # noqa: E402
from test_update_math import reference_update  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

RHO, BATCH, ACCUMULATION, SEQ = 0.5, 4, 2, 64


def step_vs_reference(precision: str, device: str = "cuda") -> tuple[float, float, object]:
    """One SGD(lr=1) LW-SAM step in `precision` against the fp32 by-hand update from the same start and batches.

    Returns (cosine of the two updates, their relative difference, the run).
    """
    run = train(precision, device, 1, size="tiny", seq_len=SEQ, batch=BATCH, accumulation=ACCUMULATION, lr=1.0,
                optim="sgd", rho=RHO)
    dataset = ByteLMDataset(text_bytes()[0], BATCH * ACCUMULATION, SEQ)
    batches = [{k: torch.stack([dataset[i][k] for i in range(b * BATCH, (b + 1) * BATCH)])
                for k in ("input_ids", "labels")}
               for b in range(ACCUMULATION)]
    model = make_model("tiny", SEQ)  # the same seeded start as the run's
    expected = reference_update(copy.deepcopy(model), batches, run.trainer.perturbed_parameter_names(), RHO,
                                causal=True)
    start = {n: p.detach() for n, p in model.named_parameters()}
    reference = torch.cat([(expected[n] - start[n]).flatten() for n in start])
    update = run.update()
    return cosine(update, reference), float((update - reference).norm() / reference.norm()), run


def test_bf16_step_matches_fp32_formula():
    cos, rel, run = step_vs_reference("bf16")
    assert run.trainer.accelerator.mixed_precision == "bf16"
    assert cos > 0.99, f"cosine {cos}, relative difference {rel}"
    assert rel > 1e-6  # bf16 really changed the arithmetic


def test_fp16_step_matches_fp32_formula():
    cos, rel, run = step_vs_reference("fp16")
    scaler = run.trainer.accelerator.scaler
    assert scaler is not None and scaler.is_enabled()  # the GradScaler path: pass 1 differentiates the scaled loss
    assert run.logs("sam/skipped") == [0.0]
    assert cos > 0.99, f"cosine {cos}, relative difference {rel}"


def test_fp16_overflow_in_pass_1_is_skipped_and_counted():
    steps, overflow_at = 6, 3  # micro-batch 3 is in optimizer step 1 (accumulation 2)
    base = train("fp16", "cuda", steps, size="tiny", seq_len=SEQ)
    forced = train("fp16", "cuda", steps, size="tiny", seq_len=SEQ, overflow_at=overflow_at, factor=1e38)
    skipped, base_skipped = forced.logs("sam/skipped"), base.logs("sam/skipped")
    assert sum(skipped) - sum(base_skipped) == 1
    assert skipped[1] - base_skipped[1] == 1
    assert forced.trainer.state.global_step == steps
    assert all(math.isfinite(v) for v in forced.logs("loss"))
    assert forced.weights_finite()


SCHEDULES = {
    "looksam": dict(sam_interval=2, sam_interval_reuse="looksam"),
    "late": dict(sam_start=0.5),
    "random": dict(sam_ascent="random", sam_selection="all"),
}


def schedule_vs_fp32(precision: str, schedule: str, device: str = "cuda") -> tuple[float, object]:
    """4 SGD steps of an ascent schedule in `precision` against the same run in fp32: (cosine of the updates, run)."""
    kwargs = dict(size="tiny", seq_len=SEQ, batch=BATCH, accumulation=ACCUMULATION, lr=0.1, optim="sgd", rho=RHO,
                  **SCHEDULES[schedule])
    low, full = train(precision, device, 4, **kwargs), train("fp32", device, 4, **kwargs)
    return cosine(low.update(), full.update()), low


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedules_under_mixed_precision_follow_fp32(precision, schedule):
    """fp16: LookSAM's g_v and `.grad` carry the GradScaler's scale, which the ratio ||g|| / ||g_v|| cancels."""
    cos, run = schedule_vs_fp32(precision, schedule)
    assert run.weights_finite() and cos > 0.99, f"cosine {cos}"
    if schedule == "looksam":  # the component was added on the steps between (unless fp16 skipped that step)
        assert sum(run.logs("sam/looksam_steps")) >= (1 if precision == "fp16" else 2)
