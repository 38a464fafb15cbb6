"""What the trainer must follow or honour so that it trains what it is asked to: the model `model_init` builds for each
`train()`, a schedule-free optimizer's training weights after an evaluation, `sam_exclude_layers` under
`sam_selection="all"`, a model compiled before it is given to the trainer, and an optimizer given at construction that
the momentum ascent cannot read. Each update is checked against a fresh run or an independent computation of the
formula (`test_update_math.reference_update`, `test_momentum.reference_run`, `test_schedule.sam_window`)."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from transformers import Trainer

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMTrainer
from test_momentum import reference_run, rel
from test_schedule import sam_window, weights
from test_update_math import _batches, _rel, reference_update

STEPS = 3
ADAMW = dict(optim="adamw_torch", learning_rate=1e-2)
MODES = {  # each ascent, and the probe, whose state holds the model's tensors
    "exact": {},
    "momentum": dict(sam_ascent="momentum", **ADAMW),
    "random": dict(sam_ascent="random"),
    "stale": dict(sam_ascent="stale"),
    "probe": dict(sam_selection="probe", sam_probe_interval=1, sam_top_k=2),
}
SAM_STEPS = {"momentum": [0.0, 1.0, 1.0], "stale": [0.0, 1.0, 1.0]}  # the first step has no moment / kept gradient


def sam_logs(trainer) -> list[dict[str, float]]:
    return [{k: v for k, v in e.items() if k.startswith("sam/") or k == "loss"} for e in trainer.state.log_history
            if "sam/sam_steps" in e]


# ------------------------------------------------------------------------------------------------- model_init
@pytest.mark.parametrize("mode", list(MODES))
def test_a_second_train_with_model_init_trains_the_new_model_as_a_fresh_trainer(mode, sgd_args):
    """`train()` rebuilds the model with `model_init` (so does every trial of `hyperparameter_search`): the selection,
    the optimizer state the momentum ascent reads, the random ascent's targets, the probe and the kept vector follow
    the new model. A second `train()` makes the SAM steps of the first and ends on the weights of a fresh trainer."""
    data = shakespeare_lm_dataset(4 * STEPS)
    args = dict(dict(max_steps=STEPS, learning_rate=0.1), **MODES[mode])
    trainer = LWSAMTrainer(model_init=lambda: tiny_gpt2(), args=sgd_args(**args), train_dataset=data)
    trainer.train()
    first, first_logs = weights(trainer.model), sam_logs(trainer)
    trainer.train()
    fresh = LWSAMTrainer(model_init=lambda: tiny_gpt2(), args=sgd_args(**args), train_dataset=data)
    fresh.train()
    assert [e["sam/sam_steps"] for e in sam_logs(trainer)] == SAM_STEPS.get(mode, [1.0] * STEPS)
    assert sam_logs(trainer) == first_logs == sam_logs(fresh)
    assert weights(trainer.model).keys() == first.keys()
    assert all(torch.equal(p, first[n]) and torch.equal(p, weights(fresh.model)[n])
               for n, p in weights(trainer.model).items())
    assert trainer.perturbed_parameter_names() == fresh.perturbed_parameter_names()
    assert not all(torch.equal(p, q) for p, q in zip(first.values(), weights(tiny_gpt2()).values()))  # it trained


# ----------------------------------------------------------------------------------------- schedule-free
def schedule_free_reference(data, selected: list[str], rho: float, lr: float, steps: int) -> dict[str, torch.Tensor]:
    """SAM with `schedulefree.AdamWScheduleFree` by hand (as `optim="schedule_free_adamw"` builds it): in train mode
    throughout, each window's gradient is the sum over its micro-batches of the gradient at w_S + e_S of the
    micro-batch (`sam_window`), and the optimizer steps; the training weights (y) after `steps` steps."""
    import schedulefree

    model = tiny_gpt2()
    optimizer = schedulefree.AdamWScheduleFree(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                               weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0)
    optimizer.train()
    batches = _batches(data)
    for step in range(steps):
        grads, _ = sam_window(model, batches[2 * step: 2 * step + 2], selected, rho)
        for name, p in model.named_parameters():
            p.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad()
    return weights(model)


@pytest.mark.parametrize("selection", ["all", "default-reuse"])
@pytest.mark.parametrize("evaluate", [True, False])
def test_schedule_free_optimizer_evaluated_every_step_takes_the_sam_steps_of_the_formula(selection, evaluate,
                                                                                          sgd_args):
    """An optimizer with `train()`/`eval()` moves the weights between its training point y and its evaluation point x.
    The SAM step runs the stock step's `optimizer.train()` before it perturbs, so with an evaluation after every step
    S is perturbed and restored at y, and the run ends on the steps of SAM by hand (the layer-wise default, with
    activation reuse, no longer fails with an in-place modification)."""
    pytest.importorskip("schedulefree")
    data, rho, lr, steps = shakespeare_lm_dataset(4 * 4), 0.5, 1e-2, 4
    sam = dict(sam_selection="all") if selection == "all" else {}
    model = tiny_gpt2()
    every_step = dict(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2) if evaluate else {}
    trainer = LWSAMTrainer(model=model, args=sgd_args(optim="schedule_free_adamw", learning_rate=lr, sam_rho=rho,
                                                      max_steps=steps, **every_step, **sam),
                           train_dataset=data, eval_dataset=shakespeare_lm_dataset(4, start=20000))
    trainer.train()
    trainer.optimizer.train()  # the last evaluation left the evaluation point x in the model
    assert sum(e["sam/sam_steps"] for e in sam_logs(trainer)) == steps
    assert sum("eval_loss" in e for e in trainer.state.log_history) == (steps if evaluate else 0)
    selected = trainer.perturbed_parameter_names()
    assert len(selected) == (len(list(model.parameters())) if selection == "all" else 14)  # h.2 and ln_f
    expected = schedule_free_reference(data, selected, rho, lr, steps)
    assert _rel(weights(model), expected, weights(tiny_gpt2())) <= 1e-4
    plain = schedule_free_reference(data, selected, 0.0, lr, steps)  # the check separates SAM from plain steps
    assert _rel(plain, expected, weights(tiny_gpt2())) > 1e-2


# ------------------------------------------------------------------------------- sam_selection="all", exclusions
NOT_EMBEDDINGS = [n for n, _ in tiny_gpt2().named_parameters() if not n.startswith(("transformer.wte.",
                                                                                     "transformer.wpe."))]


def test_all_with_exclude_layers_leaves_the_excluded_modules_and_their_tied_head_unperturbed(sgd_args):
    """`sam_preset="free"` (every trainable parameter, the momentum ascent) with `sam_exclude_layers=["wte", "wpe"]`:
    the embeddings are not perturbed, nor the output head tied to `wte` (the same tensor), and the steps are those of
    Momentum-SAM on the rest by hand."""
    data, rho = shakespeare_lm_dataset(4 * STEPS), 0.3
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_preset="free", sam_exclude_layers=["wte", "wpe"],
                                                      sam_rho=rho, max_steps=STEPS, **ADAMW), train_dataset=data)
    assert trainer.perturbed_parameter_names() == NOT_EMBEDDINGS
    assert trainer.num_perturbed_layers == len({n.rpartition(".")[0] for n in NOT_EMBEDDINGS})
    trainer.train()
    adamw, start = (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0)), weights(tiny_gpt2())
    expected = reference_run(*adamw, rho, tuple(NOT_EMBEDDINGS), data, steps=STEPS)
    assert rel(weights(model), expected, start) <= 1e-5
    assert rel(reference_run(*adamw, rho, None, data, steps=STEPS), expected, start) > 1e-3  # the embeddings count


def test_all_with_exclude_layers_exact_sam_step_equals_the_formula(sgd_args):
    """Full SAM (two passes) without the embeddings: one SGD step equals SAM by hand on the rest."""
    data = shakespeare_lm_dataset(4)
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_selection="all", sam_exclude_layers=["wte", "wpe"],
                                                      sam_rho=0.5), train_dataset=data)
    trainer.train()
    expected = reference_update(tiny_gpt2(), _batches(data), NOT_EMBEDDINGS, 0.5, causal=True)
    assert trainer.perturbed_parameter_names() == NOT_EMBEDDINGS
    assert _rel(weights(model), expected, weights(tiny_gpt2())) <= 1e-5


@pytest.mark.parametrize("exclude, message", [
    (["nonexistent", "missing"], "sam_exclude_layers=['nonexistent', 'missing'] matches no module of GPT2LMHeadModel"),
    ("transformer", "sam_exclude_layers='transformer' leaves sam_selection='all' no trainable parameter"),
])
def test_all_with_exclude_layers_that_match_nothing_or_everything_is_refused(exclude, message, sgd_args):
    """A pattern that matches no module, and one that leaves nothing to perturb (`transformer` holds every parameter,
    the head is tied to its `wte`): a `ValueError` at construction naming the option."""
    with pytest.raises(ValueError, match=re.escape(message)):
        LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_selection="all", sam_exclude_layers=exclude),
                     train_dataset=shakespeare_lm_dataset(4))


# ------------------------------------------------------------------------------------- a pre-compiled model
def uneven_tokens(n: int):
    """Real text whose micro-batches predict different numbers of tokens (labels -100 after position 5 in every other
    pair of rows), so the token average over the window differs from the mean of the micro-batch means."""
    data = shakespeare_lm_dataset(n)
    return data.map(lambda row, i: {"labels": [t if i % 4 > 1 or j < 5 else -100 for j, t in enumerate(row["labels"])]},
                    with_indices=True)


@pytest.fixture
def dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_model_compiled_before_the_trainer_keeps_the_token_average(backend, sgd_args, dynamo, caplog):
    """`torch.compile(model)` given to the trainer: its loss uses `num_items_in_batch` as the uncompiled model's does,
    so the token average over the window is kept as the stock Trainer keeps it (the first logged loss equals the stock
    one), the default selection is traced under the model's own names, and every step equals LW-SAM on the uncompiled
    model."""
    data = uneven_tokens(4 * STEPS)
    args = dict(max_steps=STEPS, learning_rate=0.1, remove_unused_columns=False)  # a compiled forward has no signature
    stock = Trainer(model=tiny_gpt2(), args=sgd_args(**args), train_dataset=data)
    stock.train()
    plain = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(**args), train_dataset=data)
    plain.train()
    compiled = torch.compile(tiny_gpt2(), backend=backend)
    with caplog.at_level(logging.WARNING, logger="hf_lwsam"):
        trainer = LWSAMTrainer(model=compiled, args=sgd_args(**args), train_dataset=data)
        trainer.train()
    assert trainer.model_accepts_loss_kwargs and stock.model_accepts_loss_kwargs
    assert not any("could not trace" in r.getMessage() for r in caplog.records)
    assert trainer.perturbed_parameter_names() == ["_orig_mod." + n for n in plain.perturbed_parameter_names()]
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (stock, plain, trainer)]
    assert losses[2][0] == pytest.approx(losses[0][0], rel=1e-6)  # the first step's clean loss: the stock one
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
    got = {n.removeprefix("_orig_mod."): p for n, p in weights(compiled).items()}
    assert _rel(got, weights(plain.model), weights(tiny_gpt2())) <= 1e-5


# ---------------------------------------------------------------------------------- optimizers=(optimizer, ...)
def test_an_optimizer_given_at_construction_that_the_momentum_ascent_cannot_read_is_refused_there(sgd_args, tmp_path):
    """`optimizers=(optimizer, None)` with `sam_ascent="momentum"`: an optimizer without a first moment (SGD without
    momentum) is a `ValueError` at construction, not at the first step; AdamW is accepted and takes SAM steps."""
    data, model = shakespeare_lm_dataset(4 * STEPS), tiny_gpt2()
    # optim names the optimizer the Trainer would build; the one given replaces it
    args = sgd_args(sam_ascent="momentum", max_steps=STEPS, output_dir=str(tmp_path / "refused"), **ADAMW)
    with pytest.raises(ValueError, match="sam_ascent='momentum'.*SGD without momentum"):
        LWSAMTrainer(model=model, args=args, train_dataset=data,
                     optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_ascent="momentum", max_steps=STEPS, **ADAMW),
                           train_dataset=data,
                           optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0), None))
    trainer.train()
    assert [e["sam/sam_steps"] for e in sam_logs(trainer)] == [0.0, 1.0, 1.0]
