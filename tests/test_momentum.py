"""`sam_ascent="momentum"` (Momentum-SAM): e_S = -rho m_S / ||m_S|| from the optimizer's first moment after the
previous optimizer step, one pass at w + e_S, the stock optimizer stepping at w. Checked against an independent
computation over several optimizer steps (AdamW and SGD with momentum), and with the Trainer's features."""

from __future__ import annotations

import pytest
import torch

from conftest import shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.ascent import ASCENTS, MomentumAscent
from hf_lwsam.sam import Perturbation, momentum_scale
from test_schedule import assert_resume_is_exact, weights, window_gradient
from test_update_math import _batches

SELECTED = ("transformer.h.2.", "transformer.ln_f.")  # the default selection of tiny_gpt2 (tied lm_head left out)
STEPS = 4


def reference_run(optimizer_cls, optimizer_kwargs: dict, rho: float, selected: tuple[str, ...] | None,
                  data, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Momentum-SAM by hand: at each step, e = -rho m_S / ||m_S|| from the reference optimizer's state (no state on
    the first step: a plain step), the window gradient at (w_S + e, w_rest), e removed, the optimizer step at w."""
    model = tiny_gpt2()
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    key = "exp_avg" if "betas" in optimizer.defaults else "momentum_buffer"
    batches = _batches(data)
    sel = [i for i, n in enumerate(names) if selected is None or n.startswith(selected)]
    for step in range(steps):
        window = batches[2 * step: 2 * step + 2]
        moments = {i: optimizer.state[params[i]][key] for i in sel if key in optimizer.state[params[i]]}
        saved = {i: params[i].detach().clone() for i in moments}
        if moments:
            norm = torch.sqrt(sum((m.double() ** 2).sum() for m in moments.values()))
            with torch.no_grad():
                for i, m in moments.items():
                    params[i].sub_((rho / norm * m.double()).float())
        grads = window_gradient(model, window)
        with torch.no_grad():
            for i, w in saved.items():
                params[i].copy_(w)
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad()
    return weights(model)


def rel(a: dict, b: dict, start: dict) -> float:
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in a)
    den = sum(((b[n] - start[n]).double() ** 2).sum() for n in a)
    return float(torch.sqrt(num / den))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused", "sgd_momentum"])
@pytest.mark.parametrize("selection", ["pattern", "all"])
def test_momentum_ascent_equals_the_formula_over_several_steps(optimizer, selection, sgd_args):
    data, rho = shakespeare_lm_dataset(4 * STEPS), 0.3
    if optimizer.startswith("adamw"):
        args = dict(optim="adamw_torch_fused" if optimizer == "adamw_fused" else "adamw_torch", learning_rate=1e-2)
        reference = (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0, fused=optimizer == "adamw_fused"))
    else:
        args = dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.1)
        reference = (torch.optim.SGD, dict(lr=0.1, momentum=0.9))
    sam = dict(sam_selection="all") if selection == "all" else {}
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_ascent="momentum", max_steps=STEPS, **args,
                                                      **sam), train_dataset=data)
    trainer.train()
    expected = reference_run(*reference, rho, None if selection == "all" else SELECTED, data)
    assert rel(weights(model), expected, weights(tiny_gpt2())) <= 1e-5
    logs = [e for e in trainer.state.log_history if "sam/sam_steps" in e]
    assert [e["sam/sam_steps"] for e in logs] == [0.0] + [1.0] * (STEPS - 1)  # step 0 has no moment: a plain step
    assert all(abs(e["sam/e_norm"] - rho) < 1e-5 and "sam/loss_perturbed" in e for e in logs[1:])
    assert all("sam/sharpness" not in e for e in logs)


def test_the_perturbation_follows_the_reference_sign_and_norm():
    """-rho m / ||m|| over all tensors as one vector (the reference subtracts rho / ||exp_avg|| * exp_avg)."""
    moments = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    scale, norm, usable = momentum_scale(moments, 2.0)
    assert float(scale) == pytest.approx(-0.4) and float(norm) == 5.0 and bool(usable)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))]
    perturbation = Perturbation.apply(params, moments, scale=scale)  # w = 0: S becomes e itself
    assert torch.allclose(params[0], torch.tensor([-1.2, 0.0])) and torch.allclose(params[1], torch.tensor([[-1.6]]))
    perturbation.restore()
    assert moments[0].tolist() == [3.0, 0.0] and params[0].tolist() == [0.0, 0.0]  # m only read, w restored
    moments = [torch.tensor([float("inf"), 1.0])]
    scale, _, usable = momentum_scale(moments, 2.0)
    perturbation = Perturbation.apply(params[:1], moments, scale=scale)
    assert not bool(usable) and float(scale) == 0.0 and params[0].tolist() == [0.0, 0.0]  # e = 0, counted
    perturbation.restore()


def test_a_non_finite_moment_skips_the_perturbation_and_is_counted(sgd_args):
    """An fp16-style overflow in m: e = 0 for that step (decided on the device), counted in `sam/skipped`."""
    from transformers import TrainerCallback

    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.3, sam_ascent="momentum", max_steps=2,
                                                      optim="adamw_torch", learning_rate=1e-2),
                           train_dataset=shakespeare_lm_dataset(8))

    class Overflow(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # after step 0's optimizer step
            selected = dict(model.named_parameters())[trainer.perturbed_parameter_names()[0]]
            trainer.optimizer.state[selected]["exp_avg"].fill_(float("inf"))

    trainer.add_callback(Overflow())
    perturbations = []  # |w_S + e - w_S| per tensor of S as each pass's forward sees it
    watch_passes(trainer, model, lambda tensors, before: perturbations.append(
        [float((t.detach() - w).abs().sum()) for t, w in zip(tensors, before)]))
    trainer.train()
    assert perturbations[:2] == [[], []] and perturbations[2] and not any(perturbations[2] + perturbations[3])
    logs = [e for e in trainer.state.log_history if "sam/sam_steps" in e]
    assert logs[1]["sam/skipped"] == 2.0 and logs[1]["sam/e_norm"] == 0.0  # both micro-batches of step 1


def watch_passes(trainer: LWSAMTrainer, model: torch.nn.Module, at_forward) -> None:
    """Wrap `trainer.pass_at`: `at_forward(tensors, before)` runs at the start of each pass's forward (`tensors`
    perturbed, `before` their values before the pass), and the tensors are checked restored bit-exactly after it."""
    original = trainer.pass_at

    def watched(tensors, steps, *args, **kwargs):
        before = [t.detach().clone() for t in tensors]
        handle = model.register_forward_pre_hook(lambda *_: at_forward(tensors, before))
        try:
            loss = original(tensors, steps, *args, **kwargs)
        finally:
            handle.remove()
        assert all(torch.equal(t, w) for t, w in zip(tensors, before))
        return loss

    trainer.pass_at = watched


def test_momentum_ascent_resumes_exactly(sgd_args, tmp_path):
    """Nothing is kept by the ascent: the moment is in the optimizer's checkpoint."""
    checkpoint = assert_resume_is_exact(sgd_args, tmp_path, 16, 2, sam_rho=0.3, sam_ascent="momentum", max_steps=4,
                                        optim="adamw_torch", learning_rate=1e-2)
    assert not list(checkpoint.glob("lwsam_ascent*"))


@pytest.mark.parametrize("overrides", [
    dict(sam_start=0.5),
    dict(sam_interval=2),
    dict(sam_selection="probe", sam_probe_interval=2, sam_top_k=1),
])
def test_momentum_ascent_with_the_schedules_and_the_probe(overrides, sgd_args):
    """sam_start / sam_interval: non-SAM steps are plain; the probe's selection is perturbed from its moments."""
    data = shakespeare_lm_dataset(16)
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.3, sam_ascent="momentum", max_steps=4,
                                                      optim="adamw_torch", learning_rate=1e-2, **overrides),
                           train_dataset=data)
    trainer.train()
    counts = [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e]
    expected = {"sam_start": [0.0, 0.0, 1.0, 1.0], "sam_interval": [0.0, 0.0, 1.0, 0.0],
                "sam_selection": [0.0, 1.0, 1.0, 1.0]}[next(iter(overrides))]
    assert counts == expected
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_momentum_ascent_under_lora_perturbs_the_adapters(sgd_args):
    """PEFT: S is the trainable adapters of the selected layers; their moments exist from the first step on."""
    data = shakespeare_lm_dataset(8)
    model = tiny_llama_lora()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.3, sam_ascent="momentum", max_steps=2,
                                                      optim="adamw_torch", learning_rate=1e-2), train_dataset=data)
    seen: list[list[str]] = []
    original = trainer.pass_at

    def recording(tensors, steps, *args, scale=None, **kwargs):
        seen.append([float(s.float().norm() * (1.0 if scale is None else abs(float(scale)))) for s in steps])  # ||e||
        return original(tensors, steps, *args, scale=scale, **kwargs)

    trainer.pass_at = recording
    trainer.train()
    assert all("lora_" in n for n in trainer.perturbed_parameter_names())
    assert seen[0] == [] and seen[-1] and sum(x ** 2 for x in seen[-1]) ** 0.5 == pytest.approx(0.3, rel=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_momentum_ascent_under_mixed_precision(dtype, sgd_args):
    if dtype == "fp16" and not torch.cuda.is_available():
        pytest.skip("fp16 mixed precision needs a GPU (the CPU has no fp16 GradScaler path in the Trainer)")
    data = shakespeare_lm_dataset(12)
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.3, sam_ascent="momentum", max_steps=3,
                                                      optim="adamw_torch", learning_rate=1e-2, **{dtype: True}),
                           train_dataset=data)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "sam/e_norm" in e]
    assert logs and all(abs(e["sam/e_norm"] - 0.3) < 1e-4 for e in logs)


@pytest.mark.parametrize("optim, optim_args, why", [
    ("sgd", None, "SGD without momentum keeps none"),
    ("adafactor", None, "optim='adafactor' keeps none that can be read"),
    ("adagrad", None, "torch.optim.adagrad.Adagrad"),
])
def test_an_optim_without_a_readable_moment_is_refused_when_the_config_is_built(optim, optim_args, why, sgd_args):
    """The optimizer `optim` names is known when the config is built: refused there, before a trainer or a run."""
    with pytest.raises(ValueError, match=r"sam_ascent='momentum' needs the optimizer's first moment.*optim=") as info:
        sgd_args(sam_ascent="momentum", optim=optim, optim_args=optim_args, max_steps=2)
    assert why in str(info.value)


@pytest.mark.parametrize("make, why", [
    (lambda params: torch.optim.SGD(params, lr=0.1), "SGD without momentum"),
    (lambda params: torch.optim.Adagrad(params, lr=0.1), "torch.optim.adagrad.Adagrad"),
    (lambda params: torch.optim.AdamW(params, lr=0.1, betas=(0.0, 0.999)), "its beta1 is 0"),
])
def test_an_optimizer_without_a_readable_moment_is_refused_before_the_first_step(make, why, sgd_args):
    """`optimizers=(optimizer, None)` bypasses `optim`: the optimizer itself is checked before anything steps."""
    model = tiny_gpt2()
    start = weights(model)
    with pytest.raises(ValueError, match=r"sam_ascent='momentum' needs the optimizer's first moment, but the "
                                         r"optimizer is torch\.optim\.") as info:
        LWSAMTrainer(model=model, args=sgd_args(sam_ascent="momentum", optim="adamw_torch", max_steps=2),
                     train_dataset=shakespeare_lm_dataset(8), optimizers=(make(model.parameters()), None)).train()
    assert why in str(info.value)
    assert all(torch.equal(start[n], p) for n, p in model.named_parameters())  # nothing stepped


@pytest.mark.parametrize("overrides, message", [
    (dict(sam_adaptive=True), "sam_ascent='momentum' with sam_adaptive=True is not supported"),
    (dict(sam_interval=2, sam_interval_reuse="looksam"), "sam_interval_reuse='looksam' with sam_ascent='momentum'"),
])
def test_bad_combinations_are_refused_by_name(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        LWSAMConfig(output_dir=str(tmp_path), sam_ascent="momentum", **overrides)


def test_momentum_is_one_registered_ascent():
    assert ASCENTS["momentum"] is MomentumAscent and "momentum" in LWSAMConfig.__dataclass_fields__[
        "sam_ascent"].metadata["choices"]
