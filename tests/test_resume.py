"""Library-level resume exactness with `PreemptionCallback`: a run stopped by a real SIGTERM (saved at the end of the
optimizer step it arrived in) and resumed from that checkpoint ends bit-identical to an uninterrupted run, for the
default and probe selections, with and without gradient accumulation, dropout on."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

from conftest import tweet_bytes_dataset
from hf_lwsam import LWSAMConfig, LWSAMTrainer, PreemptionCallback
from test_cli import one_torch_thread  # noqa: F401

MAX_STEPS = 6


class SigtermAtStep(TrainerCallback):
    """Sends this process a real SIGTERM when optimizer step `step` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)  # dropout on
    return BertForSequenceClassification(config)


def _trainer(output_dir, selection: str, accumulation: int) -> LWSAMTrainer:
    args = LWSAMConfig(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=MAX_STEPS, learning_rate=1e-3, save_strategy="no", logging_steps=1, report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, sam_selection=selection,
        **(dict(sam_top_k=2, sam_probe_interval=2) if selection == "probe" else {}),  # probe options need the probe
    )
    return LWSAMTrainer(model=_model(), args=args, train_dataset=tweet_bytes_dataset(48))


@pytest.mark.parametrize("selection, accumulation", [("pattern", 1), ("pattern", 2), ("probe", 1), ("probe", 2)])
def test_sigterm_checkpoint_resumes_bit_identically(tmp_path, selection, accumulation):
    reference = _trainer(tmp_path / "reference", selection, accumulation)
    reference.train()

    interrupted = _trainer(tmp_path / "run", selection, accumulation)
    preemption = PreemptionCallback()
    interrupted.add_callback(preemption)
    interrupted.add_callback(SigtermAtStep(3))
    previous_handler = signal.getsignal(signal.SIGTERM)
    interrupted.train()
    assert preemption.preempted and preemption.stopped_at_step == interrupted.state.global_step == 3
    assert signal.getsignal(signal.SIGTERM) == previous_handler, "the handler is restored when training ends"
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").exists(), "saved although save_strategy='no'"

    resumed = _trainer(tmp_path / "run", selection, accumulation)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == MAX_STEPS
    if selection == "probe":
        assert resumed._sam_layers == reference._sam_layers
    for (name, a), (_, b) in zip(reference.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{name} differs after resuming"


def test_the_signal_handler_is_put_back_after_an_out_of_memory_retry_and_after_train_raises(sgd_args):
    """`auto_find_batch_size` runs `on_train_begin` again after an out-of-memory error: the handler put back at the end
    is the one before training (not the callback's own, which would swallow every later SIGTERM), and a SIGTERM
    received in the failed attempt still stops the retried one. A `train()` that raises puts it back too."""
    from conftest import shakespeare_lm_dataset
    from test_works_with import MemoryBoundLlama

    class SigtermOnce(TrainerCallback):  # at the start of the attempt that runs out of memory
        def on_train_begin(self, args, state, control, **kwargs):
            if not hasattr(self, "sent"):
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    preemption = PreemptionCallback()
    model = MemoryBoundLlama(max_batch=2, fail_at=3)
    trainer = LWSAMTrainer(model=model, args=sgd_args(per_device_train_batch_size=4, gradient_accumulation_steps=1,
                                                      max_steps=3, auto_find_batch_size=True, sam_rho=0.05),
                           train_dataset=shakespeare_lm_dataset(16), callbacks=[preemption, SigtermOnce()])
    trainer.train()
    assert model.failures >= 1, "the first attempt ran out of memory and was retried"
    assert preemption.preempted and preemption.stopped_at_step == 1 and trainer.state.global_step == 1
    assert signal.getsignal(signal.SIGTERM) == before

    class Fails(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("a user's callback failed")

    failing = LWSAMTrainer(model=MemoryBoundLlama(max_batch=8, fail_at=3), args=sgd_args(max_steps=2),
                           train_dataset=shakespeare_lm_dataset(8), callbacks=[PreemptionCallback(), Fails()])
    with pytest.raises(RuntimeError, match="a user's callback failed"):
        failing.train()
    assert signal.getsignal(signal.SIGTERM) == before
