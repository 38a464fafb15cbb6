"""`sam_preset`: several options at once, the same training as the options spelled out, clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import HfArgumentParser

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.config import SAM_PRESETS


def _train(args) -> tuple[dict[str, torch.Tensor], list[float]]:
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(40))
    trainer.train()
    steps = [e["sam/sam_steps"] for e in trainer.state.log_history if "sam/sam_steps" in e]
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, steps


def test_fast_preset_trains_exactly_as_its_options_spelled_out(sgd_args):
    """'fast' = full SAM over the last 20% of the run: SAM on steps 8 and 9 of 10 only, and the weights equal those
    of the run given sam_selection='all', sam_start=0.8 by hand."""
    preset = sgd_args(sam_preset="fast", max_steps=10, learning_rate=0.1, gradient_accumulation_steps=1)
    assert (preset.sam_selection, preset.sam_start) == ("all", 0.8)
    by_preset, steps = _train(preset)
    by_hand, _ = _train(sgd_args(sam_selection="all", sam_start=0.8, max_steps=10, learning_rate=0.1,
                                 gradient_accumulation_steps=1))
    assert steps == [0.0] * 8 + [1.0, 1.0]
    assert all(torch.equal(by_preset[n], by_hand[n]) for n in by_hand)


def test_exact_preset_is_full_sam_every_step(sgd_args):
    args = sgd_args(sam_preset="exact", max_steps=3)
    assert (args.sam_selection, args.sam_start, args.sam_interval) == ("all", 0, 1)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=shakespeare_lm_dataset(16))
    assert trainer.perturbed_parameter_names() == [n for n, p in trainer.model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("given, message", [
    (dict(sam_preset="fast", sam_start=0.5), "sam_preset='fast' sets sam_start=0.8, but sam_start=0.5 was given"),
    (dict(sam_preset="exact", sam_selection="probe"), "sam_preset='exact' sets sam_selection='all', but "
                                                       "sam_selection='probe' was given"),
    (dict(sam_preset="quick"), "sam_preset='quick' is unknown: use one of 'exact', 'fast', 'free'"),
])
def test_a_conflicting_or_unknown_preset_is_refused_by_name(given, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LWSAMConfig(output_dir=str(tmp_path), use_cpu=True, **given)


def test_a_preset_agrees_with_the_same_value_given_and_keeps_the_other_options(tmp_path):
    args = LWSAMConfig(output_dir=str(tmp_path), use_cpu=True, sam_preset="fast", sam_start=0.8, sam_rho=0.1,
                       sam_interval=1, sam_adaptive=True)
    assert (args.sam_selection, args.sam_start, args.sam_rho, args.sam_interval, args.sam_adaptive) == (
        "all", 0.8, 0.1, 1, True)
    assert set(SAM_PRESETS) == {"exact", "fast", "free"}


def test_free_preset_trains_exactly_as_its_options_spelled_out(sgd_args):
    """'free' = Momentum-SAM on every parameter at rho 0.2 (the radius its study chose), bit for bit its options."""
    common = dict(max_steps=4, learning_rate=1e-2, optim="adamw_torch", gradient_accumulation_steps=1)
    preset = sgd_args(sam_preset="free", **common)
    assert (preset.sam_selection, preset.sam_ascent, preset.sam_rho) == ("all", "momentum", 0.2)
    by_preset, steps = _train(preset)
    by_hand, _ = _train(sgd_args(sam_selection="all", sam_ascent="momentum", sam_rho=0.2, **common))
    assert steps == [0.0, 1.0, 1.0, 1.0]  # the first step has no moment yet
    assert all(torch.equal(by_preset[n], by_hand[n]) for n in by_hand)


def test_free_preset_keeps_a_radius_the_user_set_even_at_the_default(tmp_path):
    assert LWSAMConfig(output_dir=str(tmp_path), sam_preset="free", sam_rho=0.05).sam_rho == 0.05
    assert LWSAMConfig(output_dir=str(tmp_path), sam_preset="free", sam_rho=0.3).sam_rho == 0.3
    with pytest.raises(ValueError, match="sam_preset='free' sets sam_ascent='momentum', but sam_ascent='exact'"):
        LWSAMConfig(output_dir=str(tmp_path), sam_preset="free", sam_ascent="exact")


def test_preset_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--sam_preset", "fast"])
    assert (args.sam_preset, args.sam_selection, args.sam_start) == ("fast", "all", 0.8)
    with pytest.raises(SystemExit):  # argparse's own choices check: exit 2 with the valid choices
        HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--sam_preset", "quick"])
