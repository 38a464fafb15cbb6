"""Ascent schedules: `sam_interval` (non-SAM steps are the stock step bit for bit) and `sam_ascent="stale"` (one pass
at w + e_S, e_S from the previous SAM step's gradient of S), checked against an independent computation, across a
resume, and without host synchronisation in the step."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from transformers import Trainer

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from test_update_math import _batches, _summed_loss

SELECTED = ("transformer.h.2.", "transformer.ln_f.")  # the default selection of tiny_gpt2 (tied lm_head left out)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def window_gradient(model, batches) -> list[torch.Tensor]:
    """sum_b grad L_b at the model's current weights, L_b = the micro-batch's summed token loss / the window's count
    (the Trainer's normalisation for a causal LM with num_items_in_batch)."""
    params = list(model.parameters())
    count = sum(_summed_loss(model, b, causal=True)[1] for b in batches)
    total = [torch.zeros_like(p) for p in params]
    for batch in batches:
        grads = torch.autograd.grad(_summed_loss(model, batch, causal=True)[0] / count, params)
        total = [t + g for t, g in zip(total, grads)]
    return total


def test_sam_interval_non_sam_steps_are_the_stock_step_bit_for_bit(sgd_args):
    data = shakespeare_lm_dataset(8)  # two windows of 2 micro-batches of 2
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5, sam_interval=2, max_steps=2), train_dataset=data)
    trainer.train()
    # The reference: one LW-SAM step (step 0 is a SAM step), then the plain Trainer's step on the second window.
    reference = tiny_gpt2()
    LWSAMTrainer(model=reference, args=sgd_args(sam_rho=0.5, max_steps=1), train_dataset=data).train()
    Trainer(model=reference, args=sgd_args(max_steps=1), train_dataset=data.select(range(4, 8))).train()
    a, b = weights(model), weights(reference)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [1.0, 0.0]


def test_stale_ascent_two_steps_equal_the_formula(sgd_args):
    """Step 0 has no stale gradient: a plain step, whose window gradient G(w0) is kept. Step 1 perturbs S by
    e = rho G(w0)_S / ||G(w0)_S|| and takes one pass there: w2 = w1 - G(w1_S + e, w1_rest)."""
    data, rho = shakespeare_lm_dataset(8), 0.5
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_ascent="stale", max_steps=2),
                           train_dataset=data)
    trainer.train()

    ref = tiny_gpt2()
    names = [n for n, _ in ref.named_parameters()]
    batches = _batches(data)
    g0 = window_gradient(ref, batches[:2])
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g0):
            p.sub_(g)  # w1 = w0 - G(w0)
    after_first = weights(ref)
    sel = [i for i, n in enumerate(names) if n.startswith(SELECTED)]
    norm = torch.sqrt(sum((g0[i] ** 2).sum() for i in sel))
    params = list(ref.parameters())
    with torch.no_grad():
        for i in sel:
            params[i].add_(rho * g0[i] / norm)
    g1 = window_gradient(ref, batches[2:])
    w2 = {n: after_first[n] - g for n, g in zip(names, g1)}

    got = weights(model)
    start = weights(tiny_gpt2())
    num = sum(((got[n] - w2[n]).double() ** 2).sum() for n in names)
    den = sum(((w2[n] - start[n]).double() ** 2).sum() for n in names)
    assert float(torch.sqrt(num / den)) <= 1e-5
    logs = [e for e in trainer.state.log_history if "sam/sam_steps" in e]
    assert [e["sam/sam_steps"] for e in logs] == [0.0, 1.0]  # the first SAM step was a plain one
    assert "sam/sharpness" not in logs[1] and logs[1]["sam/grad_norm_selected"] > 0


def test_stale_ascent_resumes_exactly_from_a_checkpoint(sgd_args, tmp_path):
    data = shakespeare_lm_dataset(12)
    common = dict(sam_rho=0.5, sam_ascent="stale", max_steps=3, learning_rate=0.2)
    full = tiny_gpt2()
    LWSAMTrainer(model=full, args=sgd_args(**common), train_dataset=data).train()

    run = sgd_args(**common, output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=2)
    LWSAMTrainer(model=tiny_gpt2(), args=run, train_dataset=data).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "lwsam_ascent.pt").is_file()
    resumed = tiny_gpt2()
    LWSAMTrainer(model=resumed, args=run, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("overrides", [
    dict(sam_reuse_activations=False),
    dict(sam_ascent="stale"),
    dict(sam_interval=2, sam_reuse_activations=False),
    dict(sam_selection="probe", sam_probe_interval=2, sam_reuse_activations=False),
])
def test_no_host_synchronisation_inside_a_step(overrides, sgd_args, monkeypatch):
    """hf_lwsam's code calls no `.item()`, `.tolist()`, `bool()`/`float()`/`int()` of a tensor while `training_step`
    runs (on a GPU each is a device-to-host copy that stalls the queue); logging reads the window's sums afterwards."""
    syncs: list[str] = []
    in_step = [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            # Only what hf_lwsam's own code reads: the model's forward has the syncs the stock step has too.
            if in_step[0] and f"{os.sep}hf_lwsam{os.sep}" in sys._getframe(1).f_code.co_filename:
                syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_rho=0.5, max_steps=4, **overrides),
                           train_dataset=shakespeare_lm_dataset(16))
    step = trainer.training_step

    def watched(*args, **kwargs):
        in_step[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            in_step[0] = False

    trainer.training_step = watched
    trainer.train()
    assert trainer.state.global_step == 4
    # The probe decides its selection on the host at the end of a probe: one read per probe (two probes in 4 steps).
    assert syncs == (["tolist"] * 2 if overrides.get("sam_selection") == "probe" else []), syncs


def test_stale_and_interval_are_validated():
    from hf_lwsam import LWSAMConfig

    with pytest.raises(ValueError, match="sam_interval=0 is invalid"):
        LWSAMConfig(output_dir="x", sam_interval=0)
    with pytest.raises(ValueError, match="sam_ascent='old' is unknown"):
        LWSAMConfig(output_dir="x", sam_ascent="old")
    assert copy.copy(LWSAMConfig(output_dir="x", sam_ascent="stale", sam_interval=4)).sam_interval == 4
