"""The benchmarks' step timer (scripts/step_timer.py): one entry per optimizer step, not per micro-batch, for the
plain and the SAM step."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer

_spec = importlib.util.spec_from_file_location("step_timer", Path(__file__).resolve().parents[1] / "scripts" /
                                               "step_timer.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
StepTimer = _module.StepTimer


def test_step_timer_records_one_positive_time_per_optimizer_step(sgd_args):
    timer = StepTimer()
    args = sgd_args(max_steps=3, gradient_accumulation_steps=2, sam_rho=0.05)  # 6 micro-batches, 3 steps
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(12),
                           callbacks=[timer])
    trainer.train()
    assert len(timer.times) == trainer.state.global_step == 3
    assert all(t > 0 for t in timer.times)
