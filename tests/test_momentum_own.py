"""`sam_momentum="own"`: Momentum-SAM with its own average of the gradients of S, m <- beta m + (1 - beta) g at each
optimizer step, for optimizers that keep no readable first moment; `sam_preset="free"` picks the optimizer's moment
or the own average. Checked against the optimizer's moment (AdamW, beta = beta1) and against the formula by hand
(plain SGD, Adafactor, AdamW with beta1 = 0), with gradient accumulation, a checkpoint resume and the refusals."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import Trainer

from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.modes import mode_description
from test_momentum import rel
from test_schedule import assert_resume_is_exact, weights, window_gradient
from test_update_math import _batches

STEPS, RHO, BETA = 3, 0.3, 0.9


def own_reference(make_optimizer, data, steps: int = STEPS, rho: float = RHO, beta: float = BETA,
                  make_model=tiny_gpt2, kept: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Momentum-SAM with an own average by hand, every parameter perturbed: at each step (2 micro-batches) e =
    -rho m / ||m|| (none before the first step: a plain step), the window gradient G at w + e, e removed, then
    m <- beta m + (1 - beta) G (m = 0 before) and a fresh optimizer's step at w with G. `kept`: filled with the last m
    by parameter name."""
    model = make_model()
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    batches, m = _batches(data), None
    for step in range(steps):
        saved = [p.detach().clone() for p in params]
        if m is not None:
            norm = torch.sqrt(sum((x.double() ** 2).sum() for x in m))
            with torch.no_grad():
                for p, x in zip(params, m):
                    p.sub_((rho / norm * x.double()).float())
        grads = window_gradient(model, batches[2 * step: 2 * step + 2])
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        m = [(1 - beta) * g for g in grads] if m is None else [beta * x + (1 - beta) * g for x, g in zip(m, grads)]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad()
    if kept is not None:
        kept.update((n, x) for (n, _), x in zip(model.named_parameters(), m))
    return weights(model)


def trained(sgd_args, data, trainer_cls=LWSAMTrainer, make_model=tiny_gpt2, **overrides) -> LWSAMTrainer:
    trainer = trainer_cls(model=make_model(), args=sgd_args(sam_rho=RHO, max_steps=STEPS, **overrides),
                          train_dataset=data)
    trainer.train()
    return trainer


def sam_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "sam/sam_steps" in e]


def test_own_average_gives_the_updates_of_adamws_moment(sgd_args):
    """With AdamW and beta = adam_beta1, the own average is exp_avg: the same updates within float rounding."""
    data = shakespeare_lm_dataset(4 * STEPS)
    common = dict(sam_ascent="momentum", optim="adamw_torch", learning_rate=1e-2, adam_beta1=BETA)
    a = trained(sgd_args, data, sam_momentum="optimizer", **common)
    b = trained(sgd_args, data, sam_momentum="own", sam_momentum_beta=BETA, **common)
    assert b._ascent.source == "own" and a._ascent.source == "optimizer"
    start = weights(tiny_gpt2())
    assert rel(weights(b.model), weights(a.model), start) <= 1e-6
    assert [e["sam/sam_steps"] for e in sam_logs(b)] == [0.0, 1.0, 1.0]


def test_own_average_with_plain_sgd_equals_the_formula(sgd_args):
    """SGD without momentum keeps nothing: step 1 is plain, then the gradient at w - rho m / ||m||, m the own
    average."""
    data = shakespeare_lm_dataset(4 * STEPS)
    trainer = trained(sgd_args, data, sam_selection="all", sam_ascent="momentum", sam_momentum="own",
                      learning_rate=0.1)
    expected = own_reference(lambda p: torch.optim.SGD(p, lr=0.1), data)
    assert rel(weights(trainer.model), expected, weights(tiny_gpt2())) <= 1e-5
    logs = sam_logs(trainer)
    assert [e["sam/sam_steps"] for e in logs] == [0.0, 1.0, 1.0]
    assert all(abs(e["sam/e_norm"] - RHO) < 1e-5 for e in logs[1:])


@pytest.mark.parametrize("optim, extra", [
    ("adafactor", {}),
    ("adamw_torch", dict(adam_beta1=0.0)),
])
def test_the_free_preset_keeps_its_own_average_for_an_optimizer_without_a_readable_moment(optim, extra, sgd_args,
                                                                                           caplog):
    """Adafactor, and AdamW with beta1 = 0, train under sam_preset='free' and perturb from step 2, exactly as the
    formula with a fresh optimizer of the same class and hyperparameters stepping on the hand-perturbed gradient.
    Llama, not GPT-2: GPT-2's attention key biases have a gradient of pure float rounding (softmax ignores them), which
    Adafactor's normalised update turns into a full-size step."""
    data = shakespeare_lm_dataset(4 * STEPS)
    caplog.set_level(logging.INFO, logger="hf_lwsam")
    trainer = trained(sgd_args, data, make_model=tiny_llama, sam_preset="free", optim=optim, learning_rate=1e-2,
                      **extra)
    assert trainer._ascent.source == "own"
    assert "keeps its own average of the gradients of S" in caplog.text
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args)  # the class and kwargs the Trainer built
    kwargs["weight_decay"] = trainer.args.weight_decay  # set per parameter group by the Trainer (0 here)
    expected = own_reference(lambda p: cls(p, **kwargs), data, make_model=tiny_llama)
    assert rel(weights(trainer.model), expected, weights(tiny_llama())) <= 1e-5
    logs = sam_logs(trainer)
    assert [e["sam/sam_steps"] for e in logs] == [0.0, 1.0, 1.0]
    assert all(abs(e["sam/e_norm"] - RHO) < 1e-5 for e in logs[1:])
    assert "an average of the gradients of S kept by hf_lwsam" in mode_description(trainer.args, trainer._ascent.source)


def test_the_free_preset_trains_schedule_free_adamw_with_its_own_average(sgd_args):
    pytest.importorskip("schedulefree")
    data = shakespeare_lm_dataset(4 * STEPS)
    trainer = trained(sgd_args, data, sam_preset="free", optim="schedule_free_adamw", learning_rate=1e-2)
    assert trainer._ascent.source == "own"
    logs = sam_logs(trainer)
    assert [e["sam/sam_steps"] for e in logs] == [0.0, 1.0, 1.0]
    assert all(abs(e["sam/e_norm"] - RHO) < 1e-5 for e in logs[1:])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_free_preset_reads_adamws_moment(sgd_args, caplog):
    caplog.set_level(logging.INFO, logger="hf_lwsam")
    trainer = trained(sgd_args, shakespeare_lm_dataset(4 * STEPS), sam_preset="free", optim="adamw_torch",
                      learning_rate=1e-2)
    assert trainer._ascent.source == "optimizer" and not trainer.schedule.keeps_state
    assert "takes m from the first moment of" in caplog.text
    assert "the optimizer's first moment" in mode_description(trainer.args, trainer._ascent.source)


def test_the_free_preset_decides_on_an_optimizer_passed_to_the_trainer(sgd_args):
    """`optimizers=(optimizer, None)`: decided on that optimizer (SGD without momentum: own); a second `train()` adds
    no second hook."""
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_preset="free", max_steps=2),
                           train_dataset=shakespeare_lm_dataset(8), optimizers=(optimizer, None))
    assert trainer._ascent.source == "own"
    trainer.train()
    trainer.train()
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    assert trainer._schedule.direction(trainer.perturbed_parameter_names()) is not None


class PointRecorder(LWSAMTrainer):
    """Records S at every `compute_loss` call (observation only)."""

    def compute_loss(self, model, inputs, **kwargs):
        self.__dict__.setdefault("points", []).append([p.detach().clone() for _, p in self._sam_parameters()])
        return super().compute_loss(model, inputs, **kwargs)


def test_one_perturbation_per_optimizer_step_under_gradient_accumulation(sgd_args):
    """Both micro-batches of a window are taken at the same w + e_S, computed once for the window and freed after
    it (the update equals the formula: `test_own_average_with_plain_sgd_equals_the_formula` accumulates 2)."""
    trainer = trained(sgd_args, shakespeare_lm_dataset(4 * STEPS), trainer_cls=PointRecorder, sam_ascent="momentum",
                      sam_momentum="own", learning_rate=0.1)
    points = trainer.points
    assert len(points) == 2 * STEPS
    for step in range(1, STEPS):
        first, second = points[2 * step], points[2 * step + 1]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert trainer._ascent._cached is None


def test_own_average_resumes_exactly(sgd_args, tmp_path):
    """3 steps = 2 steps, checkpoint, resume, 1 step, bit for bit: m is saved with the checkpoint."""
    checkpoint = assert_resume_is_exact(sgd_args, tmp_path, 4 * STEPS, 2, sam_rho=RHO, sam_ascent="momentum",
                                        sam_momentum="own", max_steps=STEPS, optim="adafactor", learning_rate=1e-2)
    state = torch.load(checkpoint / "lwsam_ascent.pt", weights_only=True)
    assert state["kind"] == "momentum" and all(g.dtype == torch.float32 for g in state["grads"])


def test_a_non_finite_gradient_leaves_the_average_unchanged():
    from hf_lwsam.schedule import AscentSchedule

    schedule = AscentSchedule(ascent="momentum")
    like = [torch.zeros(2), torch.zeros(1)]
    schedule.average(["a", "b"], [torch.tensor([1.0, 2.0]), torch.tensor([4.0])], like, 0.5)
    schedule.average(["a", "b"], [torch.tensor([float("inf"), 0.0]), torch.tensor([0.0])], like, 0.5)
    schedule.average(["a", "b"], [torch.tensor([3.0, 2.0]), None], like, 0.5)  # no gradient: b keeps its m
    m = schedule.direction(["a", "b"])
    assert m[0].tolist() == [1.75, 1.5] and m[1].tolist() == [2.0]  # 0.5 [0.5, 1] + 0.5 [3, 2]; b: 0.5 * 4


@pytest.mark.parametrize("overrides, message", [
    (dict(sam_ascent="momentum", sam_momentum="optimizer", optim="adafactor"),
     r"optim='adafactor' keeps none that can be read.*set sam_momentum='own'"),
    (dict(sam_preset="free", sam_momentum="optimizer", optim="adafactor"), r"optim='adafactor' keeps none"),
    (dict(sam_ascent="momentum", optim="adafactor"), r"optim='adafactor' keeps none"),  # unset outside the preset
    (dict(sam_momentum="own"), r"sam_momentum='own' does nothing without sam_ascent='momentum'"),
    (dict(sam_preset="exact", sam_momentum_beta=0.8), r"sam_momentum_beta=0.8 does nothing without sam_ascent="),
    (dict(sam_ascent="momentum", optim="adamw_torch", sam_momentum_beta=0.8),
     r"sam_momentum_beta=0.8 does nothing with sam_momentum='optimizer'"),
    (dict(sam_ascent="momentum", sam_momentum="own", sam_momentum_beta=1.0), r"sam_momentum_beta=1.0 is invalid"),
    (dict(sam_ascent="momentum", sam_momentum="adam"), r"sam_momentum='adam' is unknown"),
])
def test_bad_momentum_options_are_refused_by_name(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        LWSAMConfig(output_dir=str(tmp_path), **overrides)


def test_an_explicit_optimizer_source_refuses_an_optimizer_passed_to_the_trainer(sgd_args):
    model = tiny_gpt2()
    start = weights(model)
    with pytest.raises(ValueError, match=r"needs the optimizer's first moment, but the optimizer is torch\.optim"):
        LWSAMTrainer(model=model, args=sgd_args(sam_preset="free", sam_momentum="optimizer", optim="adamw_torch"),
                     train_dataset=shakespeare_lm_dataset(8),
                     optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skipped_or_non_finite_step_leaves_the_average_unchanged(precision, sgd_args):
    """An infinite gradient of S at step 1 (set before the optimizer step): under fp16 the GradScaler skips the step
    and never calls the optimizer, so the pre-hook does not run; without a scaler the hook sees it and keeps m."""
    from transformers import TrainerCallback

    if precision == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 mixed precision needs a GPU (the CPU has no fp16 GradScaler path in the Trainer)")
    device = dict(fp16=True, use_cpu=False) if precision == "fp16" else {}
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_rho=RHO, max_steps=3, sam_ascent="momentum",
                                                            sam_momentum="own", learning_rate=0.1, **device),
                           train_dataset=shakespeare_lm_dataset(12))
    kept = []

    class Inject(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                first = trainer._sam_parameters()[0][1]
                first.grad.view(-1)[0] = float("inf")

        def on_step_end(self, args, state, control, **kwargs):
            kept.append([m.clone() for m in trainer._schedule.direction(trainer.perturbed_parameter_names())])

    trainer.add_callback(Inject())
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(kept[0], kept[1]))  # step 1 left m as step 0 made it
    assert all(torch.isfinite(m).all() for m in kept[1])
    if precision == "fp16":  # the scaler skipped only step 1: step 2 updated m again
        assert not all(torch.equal(a, b) for a, b in zip(kept[1], kept[2]))
