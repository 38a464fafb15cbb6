"""The benchmarks' step timer: one entry per optimizer step, not per micro-batch, for the plain and the SAM step."""

from __future__ import annotations

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from hf_lwsam.step_timer import StepTimer


def test_step_timer_records_one_positive_time_per_optimizer_step(sgd_args):
    timer = StepTimer()
    args = sgd_args(max_steps=3, gradient_accumulation_steps=2, sam_rho=0.05)  # 6 micro-batches, 3 steps
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(12),
                           callbacks=[timer])
    trainer.train()
    assert len(timer.times) == trainer.state.global_step == 3
    assert all(t > 0 for t in timer.times)
