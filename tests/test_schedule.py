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


def window_gradient(model, batches, params: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """sum_b grad L_b at the model's current weights with respect to `params` (default: all), L_b = the micro-batch's
    summed token loss / the window's count (the Trainer's normalisation for a causal LM with num_items_in_batch)."""
    params = list(model.parameters()) if params is None else params
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


def assert_resume_is_exact(sgd_args, tmp_path, rows: int, save_step: int, **common):
    """Train `common` uninterrupted and again from the checkpoint at `save_step`: bit-identical weights. Returns the
    checkpoint folder."""
    data = shakespeare_lm_dataset(rows)
    full = tiny_gpt2()
    LWSAMTrainer(model=full, args=sgd_args(**common), train_dataset=data).train()
    run = sgd_args(**common, output_dir=str(tmp_path / "run"), save_strategy="steps", save_steps=save_step)
    LWSAMTrainer(model=tiny_gpt2(), args=run, train_dataset=data).train()
    checkpoint = tmp_path / "run" / f"checkpoint-{save_step}"
    resumed = tiny_gpt2()
    LWSAMTrainer(model=resumed, args=run, train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    return checkpoint


def test_stale_ascent_resumes_exactly_from_a_checkpoint(sgd_args, tmp_path):
    checkpoint = assert_resume_is_exact(sgd_args, tmp_path, 12, 2, sam_rho=0.5, sam_ascent="stale", max_steps=3,
                                        learning_rate=0.2)
    assert (checkpoint / "lwsam_ascent.pt").is_file()


@pytest.mark.parametrize("overrides", [
    dict(sam_reuse_activations=False),
    dict(sam_ascent="stale"),
    dict(sam_interval=2, sam_reuse_activations=False),
    dict(sam_selection="probe", sam_probe_interval=2, sam_reuse_activations=False),
    dict(sam_interval=2, sam_interval_reuse="looksam"),
    dict(sam_ascent="random", sam_start=0.5),
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


# ------------------------------------------------------------------------------------------------------- LookSAM
def sam_window(model, batches, selected: list[str], rho: float):
    """One exact SAM window by hand (SGD lr=1 semantics): the per-parameter window gradient at the perturbed points
    (sum over micro-batches of grad L_b(w_S + e_S^b)) and the clean gradient of S (sum of grad_S L_b(w))."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    sel = [params[n] for n in selected]
    count = sum(_summed_loss(model, b, causal=True)[1] for b in batches)
    total = [torch.zeros_like(p) for p in params.values()]
    clean = [torch.zeros_like(p) for p in sel]
    for batch in batches:
        g = torch.autograd.grad(_summed_loss(model, batch, causal=True)[0] / count, sel)
        clean = [c + gi for c, gi in zip(clean, g)]
        norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        saved = [p.detach().clone() for p in sel]
        with torch.no_grad():
            for p, gi in zip(sel, g):
                p.add_(rho * gi / norm)
        grads = torch.autograd.grad(_summed_loss(model, batch, causal=True)[0] / count, list(params.values()))
        with torch.no_grad():
            for p, s in zip(sel, saved):
                p.copy_(s)
        total = [t + gi for t, gi in zip(total, grads)]
    return dict(zip(names, total)), clean


def flat_dot(a, b):
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def looksam_reference(model, batches, selected, rho, alpha, interval, steps, lr, accumulation=2):
    """LookSAM (Liu et al. 2022, Algorithm 1) with SGD, by hand, over `steps` optimizer steps: SAM steps
    s % interval == 0 keep g_v = g_s - <g_s, g> / ||g||^2 g over S; the others use g + alpha ||g_S|| / ||g_v|| g_v on S.
    Returns the weights and, per SAM step, sin(g_s, g) = ||g_v|| / ||g_s||."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    g_v, sins = None, []
    for s in range(steps):
        window = batches[s * accumulation:(s + 1) * accumulation]
        if s % interval == 0:
            total, clean = sam_window(model, window, selected, rho)
            g_s = [total[n] for n in selected]
            coef = flat_dot(g_s, clean) / flat_dot(clean, clean)
            g_v = [gs - coef * c for gs, c in zip(g_s, clean)]
            sins.append(float(torch.sqrt(flat_dot(g_v, g_v) / flat_dot(g_s, g_s))))
        else:
            total = dict(zip(names, window_gradient(model, window)))
            g_sel = [total[n] for n in selected]
            ratio = alpha * torch.sqrt(flat_dot(g_sel, g_sel)) / torch.sqrt(flat_dot(g_v, g_v))
            for n, v in zip(selected, g_v):
                total[n] = total[n] + ratio * v
        with torch.no_grad():
            for n in names:
                params[n].sub_(lr * total[n])
    return weights(model), sins


def rel_to_start(got, expected, start) -> float:
    num = sum(((got[n] - expected[n]).double() ** 2).sum() for n in got)
    den = sum(((expected[n] - start[n]).double() ** 2).sum() for n in got)
    return float(torch.sqrt(num / den))


@pytest.mark.parametrize("selection", ["pattern", "all"])
def test_looksam_four_steps_equal_the_formula(selection, sgd_args):
    """sam_interval=2: SAM, LookSAM, SAM, LookSAM, with gradient accumulation 2; layer-wise (the component carried by
    S = last block + final norm only) and full."""
    data, rho, alpha = shakespeare_lm_dataset(16), 0.5, 0.7
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_interval=2, sam_interval_reuse="looksam",
                                                      sam_looksam_alpha=alpha, sam_selection=selection, max_steps=4,
                                                      learning_rate=0.5), train_dataset=data)
    selected = trainer.perturbed_parameter_names()
    trainer.train()
    expected, sins = looksam_reference(tiny_gpt2(), _batches(data), selected, rho, alpha, interval=2, steps=4,
                                       lr=0.5)
    start = weights(tiny_gpt2())
    got = weights(model)
    assert rel_to_start(got, expected, start) <= 1e-5
    # Teeth: plain interval-2 training (no component) lands measurably elsewhere.
    plain = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_rho=rho, sam_interval=2, sam_selection=selection,
                                                          max_steps=4, learning_rate=0.5), train_dataset=data)
    plain.train()
    assert rel_to_start(weights(plain.model), expected, start) > 1e-3
    logs = [e for e in trainer.state.log_history if "sam/sam_steps" in e]
    assert [e["sam/sam_steps"] for e in logs] == [1.0, 0.0, 1.0, 0.0]
    assert [e.get("sam/looksam_steps") for e in logs] == [None, 1.0, None, 1.0]
    # The logged sin(g_s, g) of each SAM step: the share of g_s that LookSAM keeps.
    logged = [e["sam/looksam_sin"] for e in logs if "sam/looksam_sin" in e]
    assert logged == pytest.approx(sins, rel=1e-4, abs=1e-6) and len(sins) == 2 and 0 < min(sins)


def test_looksam_resumes_exactly_from_a_checkpoint(sgd_args, tmp_path):
    """SAM steps 0, 2, 4; the checkpoint is taken after 3 steps, and the resumed run's first step (3) reuses step 2's
    g_v, which only the checkpoint (lwsam_ascent.pt) carries."""
    checkpoint = assert_resume_is_exact(sgd_args, tmp_path, 20, 3, sam_rho=0.5, sam_interval=2,
                                        sam_interval_reuse="looksam", max_steps=5, learning_rate=0.2)
    assert torch.load(checkpoint / "lwsam_ascent.pt", weights_only=True)["kind"] == "looksam"


# ---------------------------------------------------------------------------------------------- late-phase SAM
def test_sam_start_resolves_steps_and_fractions():
    from hf_lwsam.schedule import AscentSchedule

    assert AscentSchedule(start=0.7).start_step(10) == 7  # 0.7 * 10 = 7.000000000000001: still step 7
    assert AscentSchedule(start=0.57).start_step(100) == 57  # 56.99999999999999
    assert AscentSchedule(start=0.25).start_step(10) == 3  # the first step s >= 2.5
    late = AscentSchedule(interval=3, start=4)
    assert [s for s in range(12) if late.is_sam_step(s)] == [4, 7, 10]  # the interval counts from the start
    looksam = AscentSchedule(interval=2, start=1, reuse="looksam")
    assert [s for s in range(6) if looksam.is_looksam_step(s)] == [2, 4]  # no reuse before the phase starts


def test_sam_start_steps_before_are_the_stock_trainer_bit_for_bit(sgd_args):
    """AdamW with clipping and a decaying schedule: a run that never reaches sam_start is the plain Trainer."""
    data = shakespeare_lm_dataset(12)
    common = dict(max_steps=3, optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear", max_grad_norm=1.0)
    plain, late = tiny_gpt2(), tiny_gpt2()
    Trainer(model=plain, args=sgd_args(**common), train_dataset=data).train()
    trainer = LWSAMTrainer(model=late, args=sgd_args(**common, sam_rho=0.5, sam_start=3), train_dataset=data)
    trainer.train()
    a, b = weights(plain), weights(late)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("start", [2, 0.5])
def test_sam_start_plain_then_sam_steps(start, sgd_args):
    """sam_start=2 (a step) or 0.5 (of max_steps=4): two stock steps, then LW-SAM steps; with sam_interval=2 from the
    start only step 2 is a SAM step."""
    data = shakespeare_lm_dataset(16)
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5, sam_start=start, max_steps=4, learning_rate=0.5),
                           train_dataset=data)
    trainer.train()
    reference = tiny_gpt2()
    Trainer(model=reference, args=sgd_args(max_steps=2, learning_rate=0.5), train_dataset=data.select(range(8))).train()
    LWSAMTrainer(model=reference, args=sgd_args(sam_rho=0.5, max_steps=2, learning_rate=0.5),
                 train_dataset=data.select(range(8, 16))).train()
    a, b = weights(model), weights(reference)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [0.0, 0.0, 1.0, 1.0]
    every_other = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_rho=0.5, sam_start=start, sam_interval=2,
                                                                max_steps=4), train_dataset=data)
    every_other.train()
    logs = [e["sam/sam_steps"] for e in every_other.state.log_history if "sam/sam_steps" in e]
    assert logs == [0.0, 0.0, 1.0, 0.0]


def test_sam_start_with_stale_ascent_records_on_the_first_late_step(sgd_args):
    data = shakespeare_lm_dataset(16)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_rho=0.5, sam_start=2, sam_ascent="stale",
                                                            max_steps=4), train_dataset=data)
    trainer.train()
    # Steps 0-1 stock, step 2 the plain step that records the gradient of S, step 3 the first stale SAM step.
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [0.0, 0.0, 0.0, 1.0]


def test_sam_start_fraction_resumes_exactly(sgd_args, tmp_path):
    assert_resume_is_exact(sgd_args, tmp_path, 16, 3, sam_rho=0.5, sam_start=0.5, sam_ascent="stale", max_steps=4,
                           learning_rate=0.2)


# ----------------------------------------------------------------------------------------- random perturbation
def row_scaled_noise(model, names: list[str], rho: float, seed: int, step: int) -> dict[str, torch.Tensor]:
    """e by hand: per output row r, e[r] ~ N(0, rho^2 ||W[r]||^2 / n); 1-D: e[i] ~ N(0, rho^2 w[i]^2); GPT-2's Conv1D
    keeps W as (in, out), so its rows are its columns. Parameter i of S draws from a generator seeded with
    noise_seed(seed, step, i)."""
    from transformers.pytorch_utils import Conv1D

    from hf_lwsam.sam import noise_seed

    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out = {}
    for i, name in enumerate(names):
        w = params[name].detach()
        g = torch.Generator().manual_seed(noise_seed(seed, step, i))
        z = torch.randn(w.shape, generator=g)
        if w.dim() == 1:
            out[name] = rho * w.abs() * z
        elif isinstance(modules[name.rpartition(".")[0]], Conv1D):
            out[name] = rho * (w.norm(dim=0, keepdim=True) / w.shape[0] ** 0.5) * z
        else:
            out[name] = rho * (w.norm(dim=1, keepdim=True) / w.shape[1] ** 0.5) * z
    return out


@pytest.mark.parametrize("selection", ["pattern", "all"])
def test_random_perturbation_three_steps_equal_the_formula(selection, sgd_args):
    """w_{s+1} = w_s - G(w_s + e_s), e_s the step's row-scaled noise on S, the same for both micro-batches."""
    data, rho = shakespeare_lm_dataset(12), 0.5
    model = tiny_gpt2()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_ascent="random", sam_selection=selection,
                                                      max_steps=3, learning_rate=0.5), train_dataset=data)
    selected = trainer.perturbed_parameter_names()
    trainer.train()
    ref, batches = tiny_gpt2(), _batches(data)
    params = dict(ref.named_parameters())
    for s in range(3):
        e = row_scaled_noise(ref, selected, rho, seed=0, step=s)
        saved = weights(ref)
        with torch.no_grad():
            for n, v in e.items():
                params[n].add_(v)
        grads = window_gradient(ref, batches[2 * s:2 * s + 2])
        with torch.no_grad():
            for (n, p), g in zip(params.items(), grads):
                p.copy_(saved[n] - 0.5 * g)
    start, got, expected = weights(tiny_gpt2()), weights(model), weights(ref)
    assert rel_to_start(got, expected, start) <= 1e-5
    plain = tiny_gpt2()
    Trainer(model=plain, args=sgd_args(max_steps=3, learning_rate=0.5), train_dataset=data).train()
    assert rel_to_start(weights(plain), expected, start) > 1e-3  # the noise moved the update
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [1.0, 1.0, 1.0]


def test_random_with_rho_zero_is_the_stock_trainer_with_dropout(sgd_args):
    """The noise has its own generators: with rho=0 (e = 0) the run equals the plain Trainer bit for bit, dropout
    masks included, so the global RNG stream was not touched."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def dropout_gpt2():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                           resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2))
        model.loss_type = "ForCausalLM"
        return model

    data = shakespeare_lm_dataset(8)
    plain, noisy = dropout_gpt2(), dropout_gpt2()
    Trainer(model=plain, args=sgd_args(max_steps=2, learning_rate=0.5), train_dataset=data).train()
    LWSAMTrainer(model=noisy, args=sgd_args(max_steps=2, learning_rate=0.5, sam_rho=0.0, sam_ascent="random",
                                            sam_selection="all"), train_dataset=data).train()
    a, b = weights(plain), weights(noisy)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_random_perturbation_resumes_exactly(sgd_args, tmp_path):
    assert_resume_is_exact(sgd_args, tmp_path, 16, 2, sam_rho=0.5, sam_ascent="random", sam_selection="all",
                           max_steps=4, learning_rate=0.2)


def test_random_perturbation_under_lora_perturbs_the_merged_weight(sgd_args):
    """Flat-LoRA: the LoRA modules of S keep their adapters and perturb the frozen base weight W by noise scaled by the
    rows of W + scale * B A; the step's adapter gradient is taken there."""
    from conftest import tiny_llama_lora

    data, rho = shakespeare_lm_dataset(4), 0.5
    model = tiny_llama_lora()
    reference = copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_ascent="random"), train_dataset=data)
    selected = trainer.perturbed_parameter_names()
    assert selected and all(".lora_" in n for n in selected)
    trainer.train()

    from hf_lwsam.sam import noise_seed

    modules = dict(reference.named_modules())
    owners = list(dict.fromkeys(n.partition(".lora_")[0] for n in selected))  # in the order of S
    trainable = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.no_grad():
        for i, owner in enumerate(owners):
            lora = modules[owner]
            w = lora.base_layer.weight
            merged = w + lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
            z = torch.randn(w.shape, generator=torch.Generator().manual_seed(noise_seed(0, 0, i)))
            w.add_(rho * merged.norm(dim=1, keepdim=True) / w.shape[1] ** 0.5 * z)
    grads = window_gradient(reference, _batches(data), list(trainable.values()))
    expected = {n: start[n] - g for n, g in zip(trainable, grads)}
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert rel_to_start(got, expected, start) <= 1e-5
    clean = tiny_llama_lora()  # teeth: the unperturbed adapter update is measurably different
    plain = window_gradient(clean, _batches(data), [p for p in clean.parameters() if p.requires_grad])
    assert rel_to_start({n: start[n] - g for n, g in zip(trainable, plain)}, expected, start) > 1e-3
    for name, p in model.named_parameters():  # the base weights are restored bit-exactly
        if not p.requires_grad:
            assert torch.equal(p, dict(clean.named_parameters())[name]), name


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("overrides, message", [
    (dict(sam_interval_reuse="lookahead"), "sam_interval_reuse='lookahead' is unknown"),
    (dict(sam_interval_reuse="looksam"), "sam_interval_reuse='looksam' with sam_interval=1 is meaningless"),
    (dict(sam_interval_reuse="looksam", sam_interval=5, sam_ascent="stale"), "needs the clean gradient"),
    (dict(sam_looksam_alpha=-0.1), "sam_looksam_alpha=-0.1 is invalid"),
    (dict(sam_looksam_alpha=float("nan")), "sam_looksam_alpha=nan is invalid"),
    (dict(sam_start=-1), "sam_start=-1 is invalid"),
    (dict(sam_start=1.5), "sam_start=1.5 is invalid"),
    (dict(sam_start=True), "sam_start=True is invalid"),
    (dict(sam_start="0.7"), "sam_start='0.7' is invalid"),
    (dict(sam_ascent="random", sam_adaptive=True), "sam_ascent='random' with sam_adaptive=True is not supported"),
    (dict(sam_ascent="random", fsdp="full_shard"), "sam_ascent='random' is not supported with fsdp='full_shard'"),
    (dict(sam_interval=5, sam_interval_reuse="looksam", fsdp="full_shard"), "'looksam' is not supported with fsdp"),
])
def test_new_options_are_validated(overrides, message):
    from hf_lwsam import LWSAMConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LWSAMConfig(output_dir="x", **overrides)


def test_sam_start_keeps_steps_as_int_and_fractions_as_float():
    from hf_lwsam import LWSAMConfig

    assert [LWSAMConfig(output_dir="x", sam_start=v).sam_start for v in (0, 0.0, 100, 100.0, 0.7)] == [0, 0, 100, 100,
                                                                                                    0.7]
    assert type(LWSAMConfig(output_dir="x", sam_start=100.0).sam_start) is int


def test_cli_flags_parse_the_new_options(tmp_path):
    """`hf-lwsam-train` and `hf-lwsam-sft` take the options as flags; `--sam_start 100` is step 100, `0.7` a
    fraction."""
    from hf_lwsam.cli import sft
    from hf_lwsam.cli.args import UsageError, make_parser, parse_args

    flags = ["--sam_interval", "5", "--sam_interval_reuse", "looksam", "--sam_looksam_alpha", "0.5",
             "--output_dir", str(tmp_path / "out")]
    for value, expected in (("100", 100), ("0.7", 0.7)):
        args = parse_args(["--sam_start", value, *flags])[2]
        assert (args.sam_start, type(args.sam_start), args.sam_interval_reuse, args.sam_looksam_alpha) == (
            expected, type(expected), "looksam", 0.5)
        sft_args = sft.parse_args(["--sam_start", value, "--sam_ascent", "random", "--output_dir", str(tmp_path)])[1]
        assert (sft_args.sam_start, sft_args.sam_ascent) == (expected, "random")
    for parse in (parse_args, lambda argv: sft.parse_args(argv)):
        with pytest.raises(UsageError, match="sam_start=1.5 is invalid"):
            parse(["--sam_start", "1.5", "--output_dir", str(tmp_path / "out")])
    dests = {a.dest for a in make_parser()._actions} & {a.dest for a in sft.make_parser()._actions}
    assert {"sam_interval_reuse", "sam_looksam_alpha", "sam_start", "sam_ascent"} <= dests


@pytest.mark.parametrize("overrides", [dict(sam_interval=2, sam_interval_reuse="looksam"), dict(sam_ascent="random"),
                                       dict(sam_start=0.5, sam_ascent="stale")])
def test_schedules_with_the_probe_selection(overrides, sgd_args):
    """The probe re-selects every 2 steps (tweets on a tiny BERT); every schedule follows its current S."""
    from conftest import tiny_bert, tweet_bytes_dataset

    trainer = LWSAMTrainer(model=tiny_bert(), args=sgd_args(sam_rho=0.5, max_steps=6, learning_rate=0.1,
                                                            sam_selection="probe", sam_probe_interval=2, sam_top_k=1,
                                                            sam_probe_granularity="layer", sam_probe_metric="grad_norm",
                                                            **overrides), train_dataset=tweet_bytes_dataset(24))
    trainer.train()
    logs = [e for e in trainer.state.log_history if "sam/sam_steps" in e]
    assert len(logs) == 6 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    got = [e["sam/sam_steps"] for e in logs]
    if "sam_interval_reuse" in overrides:
        assert got == [1.0, 0.0] * 3
    elif overrides.get("sam_ascent") == "random":
        assert got == [1.0] * 6
    else:  # late stale: steps 0-2 plain (3 records); a probe that changes S restarts from a recording plain step
        assert got[:3] == [0.0, 0.0, 0.0] and sum(got) >= 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("overrides", [dict(sam_interval=2, sam_interval_reuse="looksam"), dict(sam_start=0.5),
                                       dict(sam_ascent="random", sam_selection="all")])
def test_schedules_under_bf16_autocast_follow_fp32(overrides, sgd_args):
    """bf16 autocast on the CPU (fp16's GradScaler path needs CUDA: tests/test_gpu.py): the 4-step update points the
    way of the fp32 one."""
    data, runs = shakespeare_lm_dataset(16), []
    for bf16 in (True, False):
        model = tiny_gpt2()
        trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5, max_steps=4, learning_rate=0.1, bf16=bf16,
                                                          **overrides), train_dataset=data)
        trainer.train()
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        runs.append(torch.cat([(p - q).flatten() for p, q in zip(model.parameters(), tiny_gpt2().parameters())]))
    low, full = runs
    assert torch.isfinite(low).all() and 0 < float((low - full).norm()) and torch.nn.functional.cosine_similarity(
        low, full, dim=0) > 0.99
