"""The "works with" matrix: the Trainer / TRL switches LM fine-tuners turn on, each with LW-SAM in its default selection
(reuse on), the probe and the stale ascent where it applies. Every cell is either exact (the update equals the
independent formula of the same configuration, <= 1e-5 relative in fp32, or equals LW-SAM without the switch where the
switch does not change the math, with the same selection), or a logged fallback / refusal naming the switch, the
reason and the alternative. The README's "Works with" table points at these tests.

The independent formulas are the shared ones: `test_update_math.reference_update` (SGD lr 1, by hand) and
`test_trl._sft_reference_step` (TRL's SFT loss, by hand).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback

from conftest import shakespeare_lm_dataset, tiny_llama
from hf_lwsam import LWSAMTrainer
from test_reuse_cases import one_step, rel
from test_update_math import _batches, _rel, reference_update

RHO = 0.5
# The three ways LW-SAM picks and perturbs S; the probe re-selects every step (block candidates, top 2).
MODES = {
    "default-reuse": {},
    "probe": dict(sam_selection="probe", sam_probe_interval=1, sam_top_k=2),
    "stale": dict(sam_ascent="stale"),
}


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def selections(trainer) -> list[list[str]]:
    """The perturbed parameter names at the end, and the logged sam/num_perturbed_layers of every step."""
    logged = [e["sam/num_perturbed_layers"] for e in trainer.state.log_history if "sam/num_perturbed_layers" in e]
    return [trainer.perturbed_parameter_names(), logged]


class _Steps(TrainerCallback):
    """Weights after each optimizer step, and how many graphs dynamo has compiled by then."""

    def __init__(self, model):
        self.model, self.weights, self.graphs = model, [], []

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.weights.append(weights(self.model))
        self.graphs.append(counters["stats"]["unique_graphs"])


@pytest.fixture
def dynamo():
    """A clean dynamo cache and counters for a torch_compile test, and again after it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


# ----------------------------------------------------------------------------------------------- torch_compile
def test_torch_compile_keeps_the_selection_is_exact_and_compiles_once(sgd_args, dynamo, caplog):
    """The issue's repro: a tiny Llama (4 layers, untied head), default selection, SGD lr 1, rho 0.5. With
    torch_compile the selection keeps the final norm and the head, step 1 equals the formula, 3 steps equal the run
    without compile, reuse turns itself off with the reason, and steps 2-3 compile nothing new."""
    data = shakespeare_lm_dataset(12)
    args = dict(sam_rho=RHO, max_steps=3)
    plain_model = tiny_llama(n_layer=4)
    plain = LWSAMTrainer(model=plain_model, args=sgd_args(**args), train_dataset=data)
    plain.train()

    model = tiny_llama(n_layer=4)
    start, reference_model = weights(model), copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(**args, torch_compile=True, torch_compile_backend="aot_eager"),
                           train_dataset=data)
    steps = _Steps(model)
    trainer.add_callback(steps)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # it really ran compiled

    names = trainer.perturbed_parameter_names()
    assert "lm_head.weight" in names and "model.norm.weight" in names and len(names) == 11
    assert selections(trainer) == selections(plain)
    assert "torch_compile=True" in trainer.reuse_disabled_reason and "torch_compile=False" in trainer.reuse_disabled_reason
    assert any("torch_compile=True" in r.getMessage() for r in caplog.records)  # logged, once
    assert plain.reuse_disabled_reason is None

    expected = reference_update(reference_model, _batches(data.select(range(4))), names, RHO, causal=True)
    assert _rel(steps.weights[0], expected, start) <= 1e-5  # step 1: the formula
    assert rel({n: p - start[n] for n, p in weights(model).items()},
               {n: p - start[n] for n, p in weights(plain_model).items()}) <= 1e-5
    assert steps.graphs[0] > 0 and steps.graphs[-1] == steps.graphs[0]  # no recompilation after the first step


@pytest.mark.parametrize("mode", ["probe", "stale"])
def test_torch_compile_probe_and_stale_equal_lwsam_without_compile(mode, sgd_args, dynamo):
    data = shakespeare_lm_dataset(12)
    args = dict(max_steps=3, **MODES[mode])
    without, plain = one_step(tiny_llama, data, sgd_args, True, **args)
    with_compile, trainer = one_step(tiny_llama, data, sgd_args, True, **args, torch_compile=True,
                                     torch_compile_backend="eager")
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert selections(trainer) == selections(plain)
    assert rel(with_compile, without) <= 1e-5


def test_a_model_compiled_in_place_is_traced_eagerly_and_turns_reuse_off(sgd_args, dynamo):
    """`model.compile()` before the trainer (no torch_compile flag): the same selection and update as uncompiled."""
    data = shakespeare_lm_dataset(4)

    def compiled_llama():
        model = tiny_llama(n_layer=3)
        model.compile(backend="eager")
        return model

    without, plain = one_step(lambda: tiny_llama(n_layer=3), data, sgd_args, True)
    compiled, trainer = one_step(compiled_llama, data, sgd_args, True)
    assert trainer.perturbed_parameter_names() == plain.perturbed_parameter_names()
    assert "torch_compile" in trainer.reuse_disabled_reason
    assert rel(compiled, without) <= 1e-5
