"""Ascents written outside the package, against the public host (`hf_lwsam.Ascent`, `register_ascent`,
`AscentHost`): a two-pass one matches an independent computation of its formula, a zero perturbation trains as the
stock `Trainer` bit for bit, and the registry is open (read live by `LWSAMConfig`) and strict (no duplicate names); the
options an ascent declares drive the unused-option refusals, its kept-vector kind the checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import HfArgumentParser, Trainer

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import Ascent, AscentHost, LWSAMConfig, LWSAMTrainer, register_ascent
from hf_lwsam.ascent import ASCENTS, ExactAscent
from test_update_math import _batches, _rel, reference_update


@pytest.fixture(autouse=True)
def registry():
    """The registry as it was: each test registers its own ascents."""
    saved = dict(ASCENTS)
    yield ASCENTS
    ASCENTS.clear()
    ASCENTS.update(saved)


class AntiSAM(Ascent):
    """A two-pass ascent through the public host only: e_S = -rho g_S / ||g_S|| (towards the descent)."""

    name = "anti-sam"
    help = "minus SAM's e_S; two passes"
    options = ("sam_sync_perturbation", "sam_reuse_activations")
    clean_loss = True

    def step(self, host, model, inputs, num_items_in_batch):
        named = host.sam_parameters()
        params = [p for _, p in named]
        clean, grads, scale = host.ascent_gradient(model, inputs, num_items_in_batch, named)
        steps, norm, finite = host.ascent_direction(params, grads)
        torch._foreach_neg_(steps)
        perturbed = host.pass_at(params, steps, model, inputs, num_items_in_batch, after_pass_one=True)
        host.record_sam_step(clean, perturbed, norm / scale, finite)
        return clean


class ZeroAscent(Ascent):
    """No perturbation: the base step, through the public host."""

    name = "zero"
    help = "no perturbation; one pass"

    def step(self, host, model, inputs, num_items_in_batch):
        loss = host.pass_at([], [], model, inputs, num_items_in_batch)
        host.record_plain_step()
        return loss


def test_an_external_two_pass_ascent_matches_its_formula_by_hand(sgd_args):
    register_ascent(AntiSAM)
    rho, layers = 0.5, r"transformer\.h\.2"
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference_model = copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=rho, sam_ascent="anti-sam", sam_target_layers=layers),
                           train_dataset=dataset)
    assert isinstance(trainer, AscentHost)
    selected = trainer.perturbed_parameter_names()
    trainer.train()
    assert trainer.reuse_disabled_reason is None  # pass 2 replayed the blocks below S (host.ascent_gradient's reuse)
    got = {n: p.detach() for n, p in model.named_parameters()}
    # The formula with -rho: w - (gradient at w - rho g_S / ||g_S||), per micro-batch, summed over the window.
    expected = reference_update(reference_model, _batches(dataset), selected, -rho, causal=True)
    assert _rel(got, expected, start) <= 1e-5
    sam = reference_update(copy.deepcopy(reference_model), _batches(dataset), selected, rho, causal=True)
    assert _rel(sam, expected, start) > 1e-3  # teeth: not SAM's own update
    logs = [e for e in trainer.state.log_history if "sam/sharpness" in e]
    assert logs and logs[0]["sam/sam_steps"] == 1.0 and logs[0]["sam/sharpness"] < 0  # at w - e_S the loss is lower


def test_a_zero_perturbation_through_the_host_trains_as_the_stock_trainer(sgd_args):
    register_ascent(ZeroAscent)
    args = sgd_args(max_steps=3, learning_rate=0.1, sam_ascent="zero", sam_selection="all")
    plain_model, zero_model = tiny_gpt2(), tiny_gpt2()
    plain = Trainer(model=plain_model, args=args, train_dataset=shakespeare_lm_dataset(12))
    plain.train()
    zero = LWSAMTrainer(model=zero_model, args=args, train_dataset=shakespeare_lm_dataset(12))
    zero.train()
    for (name, p), q in zip(plain_model.named_parameters(), zero_model.parameters()):
        assert torch.equal(p, q), name
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (plain, zero)]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_a_second_ascent_named_exact_is_refused_and_the_builtin_kept():
    class MyExact(Ascent):
        name = "exact"
        help = "another exact"

    with pytest.raises(ValueError, match=r"sam_ascent='exact' is already registered \(hf_lwsam\.ascent\.ExactAscent\)"
                                         r": give .*MyExact another name"):
        register_ascent(MyExact)
    assert ASCENTS["exact"] is ExactAscent
    with pytest.raises(ValueError, match="has no name"):
        register_ascent(type("Nameless", (Ascent,), {"help": "h"}))
    with pytest.raises(ValueError, match="subclass of hf_lwsam.Ascent"):
        register_ascent(object)


def test_an_ascent_registered_after_import_is_accepted_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"sam_ascent='zero' is unknown: use one of 'exact', 'stale', 'random', "
                                         r"'momentum', or register it first"):
        LWSAMConfig(output_dir=str(tmp_path), sam_ascent="zero", use_cpu=True)
    register_ascent(ZeroAscent)
    assert LWSAMConfig(output_dir=str(tmp_path), sam_ascent="zero", use_cpu=True).sam_ascent == "zero"
    (parsed,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--sam_ascent", "zero"])  # a live choice of --sam_ascent
    assert parsed.sam_ascent == "zero"
    with pytest.raises(ValueError, match=r"sam_ascent='nope' is unknown: use one of .*'momentum', 'zero', or"):
        LWSAMConfig(output_dir=str(tmp_path), sam_ascent="nope", use_cpu=True)


def test_the_declared_options_drive_the_unused_option_refusals(tmp_path):
    register_ascent(AntiSAM)
    register_ascent(ZeroAscent)

    def config(**kwargs):
        return LWSAMConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)

    assert config(sam_ascent="anti-sam", sam_sync_perturbation=True).sam_sync_perturbation is True
    assert config(sam_ascent="anti-sam", sam_reuse_activations=False).sam_reuse_activations is False
    with pytest.raises(ValueError, match=r"sam_sync_perturbation=True does nothing without sam_ascent='exact' or "
                                         r"'anti-sam' \(sam_preset='exact' or 'fast'\)"):
        config(sam_ascent="zero", sam_sync_perturbation=True)
    with pytest.raises(ValueError, match=r"sam_reuse_activations=False does nothing with sam_ascent='zero': a "
                                         r"one-pass ascent has no first pass to reuse"):
        config(sam_ascent="zero", sam_reuse_activations=False)
    with pytest.raises(ValueError, match=r"sam_momentum='own' does nothing without sam_ascent='momentum'"):
        config(sam_ascent="anti-sam", sam_momentum="own")


class LastGradient(Ascent):
    """A one-pass ascent that keeps a vector of its own kind: e_S from the previous window's gradient of S."""

    name = "last-gradient"
    help = "the previous window's gradient of S; one pass"
    kept_vector = "last-gradient"

    def step(self, host, model, inputs, num_items_in_batch):
        named = host.sam_parameters()
        names, params = [n for n, _ in named], [p for _, p in named]
        kept = host.schedule.direction(names, like=params)
        if kept is None:
            loss = host.pass_at([], [], model, inputs, num_items_in_batch)
            host.record_plain_step()
        else:
            steps, norm, finite = host.ascent_direction(params, [g.clone() for g in kept])
            loss = host.pass_at(params, steps, model, inputs, num_items_in_batch)
            host.record_sam_step(None, loss, norm, finite)
        if host.accelerator.sync_gradients:
            host.schedule.keep(names, [p.grad for p in params], like=params)
        return loss


def test_the_declared_kept_vector_is_checkpointed_with_its_kind(sgd_args, tmp_path):
    register_ascent(LastGradient)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_ascent="last-gradient", max_steps=2, save_steps=1,
                                                              save_strategy="steps", sam_rho=0.3),
                           train_dataset=shakespeare_lm_dataset(8))
    trainer.train()
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "lwsam_ascent.pt", weights_only=True)
    assert state["kind"] == "last-gradient" and state["names"] == trainer.perturbed_parameter_names()
    assert [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e] == [0.0, 1.0]


def test_a_failing_ascent_leaves_the_weights_and_the_model_as_they_were(sgd_args):
    """Pass 2 without pass 1 is refused before anything is perturbed; a step failing between the two passes leaves no
    reuse wrapper behind."""

    class NoPassOne(Ascent):
        name = "no-pass-one"
        help = "pass 2 alone"

        def step(self, host, model, inputs, num_items_in_batch):
            params = [p for _, p in host.sam_parameters()]
            return host.pass_at(params, [torch.ones_like(p) for p in params], model, inputs, num_items_in_batch,
                                after_pass_one=True)

    class FailsAfterPassOne(Ascent):
        name = "fails-after-pass-one"
        help = "pass 1, then an error"

        def step(self, host, model, inputs, num_items_in_batch):
            host.ascent_gradient(model, inputs, num_items_in_batch)
            raise RuntimeError("boom between the passes")

    register_ascent(NoPassOne)
    register_ascent(FailsAfterPassOne)
    for name, error, match in [("no-pass-one", ValueError, "call ascent_gradient"),
                               ("fails-after-pass-one", RuntimeError, "boom")]:
        model = tiny_gpt2()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = LWSAMTrainer(model=model, args=sgd_args(sam_ascent=name, sam_target_layers=r"transformer\.h\.2"),
                               train_dataset=shakespeare_lm_dataset(4))
        with pytest.raises(error, match=match):
            trainer.train()
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert all("forward" not in block.__dict__ for block in model.transformer.h)  # reuse's wrappers removed
