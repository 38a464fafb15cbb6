"""Activation reuse gives the same update as recomputing the lower blocks, and falls back when it would not."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from conftest import shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tiny_llama_lora, tweet_bytes_dataset
from hf_lwsam import LWSAMTrainer


class _ComputeCounter:
    """Counts real forward computations of a submodule inside the first trunk block (replays skip them; a hook would
    not do: replays fire the submodules' hooks again, as recomputing would)."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        forward = module.forward

        def counting_forward(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        module.forward = counting_forward


def _first_block_submodule(model) -> nn.Module:
    from hf_lwsam.selection import find_trunk

    trunk = find_trunk(model)
    if trunk is None:
        return next(m for m in model.modules() if m is not model)
    blocks = trunk[1]
    return next(m for m in blocks[0].modules() if m is not blocks[0] and any(True for _ in m.parameters()))


def _one_step(make, data, sgd_args, reuse: bool, **overrides):
    model = make()
    counter = _ComputeCounter(_first_block_submodule(model))
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5, sam_reuse_activations=reuse, **overrides),
                           train_dataset=data)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    update = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
    return update, trainer, counter.calls


def _rel(a: dict, b: dict) -> float:
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in a)
    return float(torch.sqrt(num / sum((b[n].double() ** 2).sum() for n in b)))


def _gpt2_dropout():
    model = tiny_gpt2()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    return model


CASES = {
    "gpt2": (tiny_gpt2, lambda: shakespeare_lm_dataset(4), dict(sam_target_layers=r"transformer\.h\.2")),
    "gpt2-two-blocks-checkpointing": (
        lambda: tiny_gpt2(n_layer=4), lambda: shakespeare_lm_dataset(4),
        dict(sam_target_layers=["h.2", "h.3", "ln_f"], activation_checkpointing=True,
             activation_checkpointing_kwargs={"use_reentrant": False})),
    "gpt2-dropout": (_gpt2_dropout, lambda: shakespeare_lm_dataset(4), {}),
    "llama-lora": (tiny_llama_lora, lambda: shakespeare_lm_dataset(4), {}),
    "llama-lora-checkpointing": (tiny_llama_lora, lambda: shakespeare_lm_dataset(4),
                                 dict(activation_checkpointing=True,
                                      activation_checkpointing_kwargs={"use_reentrant": False})),
    "bert-classifier": (tiny_bert, lambda: tweet_bytes_dataset(4), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reuse_update_equals_recomputing(case, sgd_args):
    make, data, overrides = CASES[case]
    with_reuse, trainer, calls_reuse = _one_step(make, data(), sgd_args, reuse=True, **overrides)
    without, _, calls_plain = _one_step(make, data(), sgd_args, reuse=False, **overrides)
    assert trainer.reuse_disabled_reason is None
    assert _rel(with_reuse, without) <= 1e-5
    # Two micro-batches (accumulation 2): pass 1 + pass 2 each without reuse, pass 1 only with it
    # (checkpointing adds one recomputation per micro-batch in both paths).
    assert calls_plain - calls_reuse == 2


def test_reuse_is_exact_over_several_steps_with_dropout(sgd_args):
    with_reuse, _, _ = _one_step(_gpt2_dropout, shakespeare_lm_dataset(12), sgd_args, reuse=True,
                                 max_steps=3, learning_rate=0.1)
    without, _, _ = _one_step(_gpt2_dropout, shakespeare_lm_dataset(12), sgd_args, reuse=False,
                              max_steps=3, learning_rate=0.1)
    assert _rel(with_reuse, without) <= 1e-5


class _NoTrunk(nn.Module):
    """A model without a repeated-block trunk."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix, self.head = nn.Embedding(256, 16), nn.Linear(16, 16), nn.Linear(16, 256)

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.mix(self.embed(input_ids))))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


FALLBACKS = {
    "tied-head-perturbed": (tiny_gpt2, dict(sam_target_layers=["h.2", "lm_head"]), "also used below the cut"),
    "shared-weights-below-cut": (tiny_gpt2, dict(sam_target_layers=["h.2", "wte"]), "also used below the cut"),
    "lowest-block-perturbed": (tiny_gpt2, dict(sam_target_layers=["h.0", "h.2"]), "lowest trunk block"),
    "no-trunk": (_NoTrunk, dict(sam_target_layers=["head"]), "no repeated-block trunk"),
    "all": (tiny_gpt2, dict(sam_selection="all"), "nothing below the perturbed layers to reuse"),
    # wpe is not the input embedding, so only the run-time check sees block 0's inputs change in pass 2.
    "inputs-change-in-pass-2": (tiny_gpt2, dict(sam_target_layers=["wpe", "h.2"]), "saw different inputs"),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_unsafe_reuse_falls_back_with_a_logged_reason(case, sgd_args, caplog):
    make, overrides, reason = FALLBACKS[case]
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    with caplog.at_level(logging.INFO, logger="hf_lwsam"):
        with_reuse, trainer, _ = _one_step(make, shakespeare_lm_dataset(4), sgd_args, reuse=True, **overrides)
    assert reason in trainer.reuse_disabled_reason
    messages = [r.getMessage() for r in caplog.records if "activation reuse is off" in r.getMessage()]
    assert len(messages) == 1 and reason in messages[0]  # logged once, not per micro-batch
    if overrides.get("sam_selection") == "all":  # nothing is ever reused there, so turning reuse off is refused
        with pytest.raises(ValueError, match="sam_reuse_activations"):
            _one_step(make, shakespeare_lm_dataset(4), sgd_args, reuse=False, **overrides)
        return
    without, _, _ = _one_step(make, shakespeare_lm_dataset(4), sgd_args, reuse=False, **overrides)
    assert _rel(with_reuse, without) <= 1e-5  # never silently wrong
