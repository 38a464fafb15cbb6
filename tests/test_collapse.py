"""The collapse guard: a rho too large to train is named in a warning; a run that learns is left alone."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

from hf_lwsam.collapse import CollapseWatch


def _window(clean: float, sharpness: float) -> dict[str, float]:
    return {"loss": clean, "sam/loss_perturbed": clean + sharpness, "sam/sharpness": sharpness}


def test_stuck_clean_loss_warns_once_at_a_quarter_of_the_run():
    watch = CollapseWatch(rho=0.5)
    said = [watch.observe(_window(2.30, 0.2), step, 100) for step in range(10, 101, 10)]
    assert [i for i, m in enumerate(said) if m] == [2]  # step 30: the first window past 25 steps (and >= 3 windows)
    assert "sam_rho=0.5 may be too large" in said[2] and "2.3000 -> 2.3000" in said[2]


def test_a_falling_loss_or_no_sharpness_never_warns():
    falling, flat_zero = CollapseWatch(rho=0.05), CollapseWatch(rho=0.0)
    for i, step in enumerate(range(10, 101, 10)):
        assert falling.observe(_window(2.3 * 0.97 ** i, 0.1), step, 100) is None
        assert flat_zero.observe(_window(2.3, 0.0), step, 100) is None
    assert falling.done and flat_zero.done
    # A run whose first SAM window comes late (resumed, or sam_start) is not judged: its loss has already plateaued.
    late = CollapseWatch(rho=0.5)
    assert all(late.observe(_window(2.3, 0.2), step, 100) is None for step in range(30, 101, 10)) and late.done
    # Windows without SAM losses (plain steps of sam_interval, the stale ascent) are not counted.
    assert CollapseWatch(rho=0.5).observe({"loss": 2.3}, 50, 100) is None


@pytest.mark.slow
@pytest.mark.parametrize("rho,warns", [(0.5, True), (0.05, False)])
def test_digits_vit_collapse_is_named(rho, warns, caplog, tmp_path):
    """The measured case: the digits ViT, 40% noisy labels, default selection (rho 0.5 pins the loss at ln 10)."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    spec = importlib.util.spec_from_file_location("benchmark_accuracy", root / "scripts" / "benchmark_accuracy.py")
    ba = sys.modules["benchmark_accuracy"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ba)
    from hf_lwsam import LWSAMConfig, LWSAMTrainer

    data, collator = ba.robust_data("digits-noise40", ba.RobustBudget())
    args = LWSAMConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                       logging_steps=10, seed=0, data_seed=0, weight_decay=0.0, per_device_train_batch_size=32,
                       learning_rate=1e-3, num_train_epochs=30, warmup_steps=0.06, sam_rho=rho)
    trainer = LWSAMTrainer(model=ba.tiny_vit(0), args=args, train_dataset=data["train"], data_collator=collator)
    with caplog.at_level(logging.WARNING, logger="hf_lwsam.trainer"):
        trainer.train()
    assert any("may be too large to train" in r.getMessage() for r in caplog.records) is warns
