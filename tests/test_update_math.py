"""The trainer's update equals an independent computation of the (layer-wise) SAM formula.

One optimizer step of SGD(lr=1): w_new = w - sum_b grad L_b(w_S + e_S^b, w_rest), with
e_S^b = rho * g_S^b / ||g_S^b|| (ASAM: rho * |w|^2 g / || |w| g ||), g_S^b = grad_S L_b(w), and L_b the
micro-batch loss normalised as the stock Trainer normalises it. Causal LMs take `num_items_in_batch`: the loss is
summed over the micro-batch's tokens / the window's token count. BERT classifiers declare `**kwargs` but their loss
ignores `num_items_in_batch`, so the trainer does not pass it (`hf_lwsam.loss_kwargs`): each micro-batch contributes
its mean divided by the accumulation steps, as for a forward without loss kwargs (ViT).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from conftest import shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tiny_llama_lora, tweet_bytes_dataset
from hf_lwsam import LWSAMTrainer
from test_reuse_cases import digits_dataset, tiny_vit


def _summed_loss(model, batch, causal: bool, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if causal:  # next-token prediction: position t predicts token t+1
        logits, labels = logits[:, :-1], batch["labels"][:, 1:]
    else:
        labels = batch["labels"]
    # label_smoothing: (1 - eps) * nll + eps * mean over classes of -log p, as the Trainer's LabelSmoother computes it.
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum",
                           label_smoothing=label_smoothing)
    return loss, labels.numel()


def reference_update(model, batches, selected: list[str] | None, rho: float, causal: bool, adaptive: bool = False,
                     divided_by_accumulation: bool = False, label_smoothing: float = 0.0):
    """w_new under SGD lr=1 after one accumulation window, computed by hand. `divided_by_accumulation`: a model whose
    loss is a micro-batch mean (ViT, BERT classifiers), which the Trainer divides by the accumulation steps.
    `label_smoothing`: the loss of `label_smoothing_factor` (summed over the window's tokens / their count)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    # The divisor of each micro-batch's summed loss (see the module docstring).
    window_items = sum(_summed_loss(model, b, causal)[1] for b in batches) if causal else len(batches[0]["labels"])
    if divided_by_accumulation:
        window_items *= len(batches)
    total = [torch.zeros_like(p) for p in params.values()]
    for batch in batches:
        sel = [params[n] for n in (selected if selected is not None else names)]
        loss, _ = _summed_loss(model, batch, causal, label_smoothing)
        g = torch.autograd.grad(loss / window_items, sel, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(sel, g)]
        if adaptive:
            norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(sel, g)))
            e = [rho * p.detach() ** 2 * gi / norm for p, gi in zip(sel, g)]
        else:
            norm = torch.sqrt(sum((gi**2).sum() for gi in g))
            e = [rho * gi / norm for gi in g]
        saved = [p.detach().clone() for p in sel]
        with torch.no_grad():
            for p, ei in zip(sel, e):
                p.add_(ei)
        loss, _ = _summed_loss(model, batch, causal, label_smoothing)
        grads = torch.autograd.grad(loss / window_items, list(params.values()), allow_unused=True)
        with torch.no_grad():
            for p, s in zip(sel, saved):
                p.copy_(s)
        total = [t + (0 if gi is None else gi) for t, gi in zip(total, grads)]
    return {n: (p - t).detach() for (n, p), t in zip(params.items(), total)}


def _batches(dataset, size: int = 2):
    return [{k: torch.tensor(dataset[i : i + size][k]) for k in dataset.column_names}
            for i in range(0, len(dataset), size)]


def _rel(a: dict, b: dict, ref: dict) -> float:
    """||(a - ref) - (b - ref)|| / ||b - ref||: relative difference of two updates from the same start."""
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in a)
    den = sum(((b[n] - ref[n]).double() ** 2).sum() for n in a)
    return float(torch.sqrt(num / den))


CASES = {
    "gpt2-last-block": dict(make=tiny_gpt2, data=lambda: shakespeare_lm_dataset(4), causal=True,
                            sam=dict(sam_target_layers=r"transformer\.h\.2")),
    "gpt2-all": dict(make=tiny_gpt2, data=lambda: shakespeare_lm_dataset(4), causal=True,
                     sam=dict(sam_selection="all")),
    "gpt2-asam-last-block": dict(make=tiny_gpt2, data=lambda: shakespeare_lm_dataset(4), causal=True,
                                 sam=dict(sam_target_layers=["h.2", "ln_f"], sam_adaptive=True)),
    "gpt2-asam-all": dict(make=tiny_gpt2, data=lambda: shakespeare_lm_dataset(4), causal=True,
                          sam=dict(sam_selection="all", sam_adaptive=True)),
    "llama-lora-default": dict(make=tiny_llama_lora, data=lambda: shakespeare_lm_dataset(4), causal=True, sam={}),
    "bert-classifier-default": dict(make=tiny_bert, data=lambda: tweet_bytes_dataset(4), causal=False, sam={},
                                    divided_by_accumulation=True),
    # The probe at block granularity, ranked per unit of recompute cost (the first step uses the initial selection).
    "bert-probe-block-cost": dict(make=tiny_bert, data=lambda: tweet_bytes_dataset(4), causal=False,
                                  sam=dict(sam_selection="probe", sam_probe_granularity="block",
                                           sam_probe_metric="grad_norm_per_cost", sam_top_k=3),
                                  divided_by_accumulation=True),
    # Vision: a tiny ViT on real 8x8 digits, the default selection with activation reuse on.
    "vit-default-reuse": dict(make=lambda: tiny_vit(), data=lambda: digits_dataset(4), causal=False, sam={},
                              divided_by_accumulation=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_matches_independent_formula(case, sgd_args):
    spec = CASES[case]
    rho = 0.5  # large enough that SAM's update is far from the plain one
    model, dataset = spec["make"](), spec["data"]()
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reference_model = copy.deepcopy(model)

    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, **spec["sam"]), train_dataset=dataset)
    selected = trainer.perturbed_parameter_names()
    trainer.train()
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if case.endswith("-reuse"):
        assert trainer.reuse_disabled_reason is None  # the update below went through activation reuse

    divided = spec.get("divided_by_accumulation", False)
    expected = reference_update(reference_model, _batches(dataset), selected, rho, spec["causal"],
                                adaptive=spec["sam"].get("sam_adaptive", False), divided_by_accumulation=divided)
    assert _rel(got, expected, start) <= 1e-5

    plain = reference_update(copy.deepcopy(reference_model), _batches(dataset), selected, 0.0, spec["causal"],
                             divided_by_accumulation=divided)
    # The check has teeth: the SAM update is measurably different from plain SGD's.
    assert _rel(plain, expected, start) > 1e-3
    if spec["sam"].get("sam_selection") == "all":
        assert selected == list(start)
    else:
        assert 0 < len(selected) < len(start)


def test_lora_default_perturbs_last_block_adapters_only(sgd_args):
    model = tiny_llama_lora()
    trainer = LWSAMTrainer(model=model, args=sgd_args(), train_dataset=shakespeare_lm_dataset(4))
    names = trainer.perturbed_parameter_names()
    assert names and all("layers.1." in n and ".lora_" in n for n in names)
    assert set(names) <= {n for n, p in model.named_parameters() if p.requires_grad}


def test_zero_learning_rate_leaves_weights_bit_identical(sgd_args):
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = sgd_args(learning_rate=0.0, sam_rho=0.5)
    LWSAMTrainer(model=model, args=args, train_dataset=shakespeare_lm_dataset(4)).train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_rho_zero_equals_plain_trainer(sgd_args):
    plain_model, sam_model = tiny_gpt2(), tiny_gpt2()
    args = sgd_args(max_steps=3, learning_rate=0.1, sam_rho=0.0, sam_selection="all")
    Trainer(model=plain_model, args=args, train_dataset=shakespeare_lm_dataset(12)).train()
    LWSAMTrainer(model=sam_model, args=args, train_dataset=shakespeare_lm_dataset(12)).train()
    for (name, p), q in zip(plain_model.named_parameters(), sam_model.parameters()):
        assert torch.equal(p, q), name


class _FailingSecondPass(LWSAMTrainer):
    """Raises inside pass 2 (the perturbed forward), as an OOM or a bad batch would."""

    calls = 0

    def compute_loss(self, model, inputs, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:
            raise RuntimeError("boom in pass 2")
        return super().compute_loss(model, inputs, **kwargs)


def test_failing_step_leaves_weights_unperturbed(sgd_args):
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _FailingSecondPass(model=model, args=sgd_args(sam_rho=0.5), train_dataset=shakespeare_lm_dataset(4))
    with pytest.raises(RuntimeError, match="boom in pass 2"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())  # pass 1 never touched .grad


def test_looksam_terms_are_free_of_the_loss_scale_and_skip_non_finite_components():
    """fp16: `.grad` and pass 1's gradients carry the GradScaler's scale s. g_v then carries s too, and the added term
    alpha ||s g|| / ||s g_v|| s g_v is s times the unscaled one: unscaling afterwards gives the fp32 step."""
    from hf_lwsam.sam import looksam_add_, looksam_component

    torch.manual_seed(0)
    g_s, g, now = ([torch.randn(4, 3), torch.randn(5)] for _ in range(3))
    v = looksam_component(g_s, g)
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    by_hand = flat(g_s) - (flat(g_s) @ flat(g)) / (flat(g) @ flat(g)) * flat(g)  # Algorithm 1, whole vector
    assert torch.allclose(flat(v), by_hand, atol=1e-6) and abs(float(flat(v) @ flat(g))) < 1e-5
    plain = [t.clone() for t in now]
    assert bool(looksam_add_(plain, v, 0.7))
    expected = flat(now) + 0.7 * flat(now).norm() / by_hand.norm() * by_hand
    assert torch.allclose(flat(plain), expected, atol=1e-6)
    s = 2.0**16
    scaled = [t * s for t in now]
    looksam_add_(scaled, looksam_component([t * s for t in g_s], [t * s for t in g]), 0.7)
    assert torch.allclose(flat(scaled) / s, flat(plain), rtol=1e-6, atol=1e-6)
    # A g_v from an overflowed SAM step adds nothing (and no NaN).
    overflowed = [t.clone() for t in now]
    assert not bool(looksam_add_(overflowed, [torch.full_like(t, float("inf")) for t in v], 0.7))
    assert torch.equal(flat(overflowed), flat(now))
