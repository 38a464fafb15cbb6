"""Selection rules (`sam_selection`) as registered classes: a rule defined outside the package is accepted by the config
by name, trains, and perturbs exactly what it chose, with the update equal to layer-wise SAM computed by hand on those
parameters; names are unique; an unknown name is refused with the live registry listed. The built-in rules' selections
are checked bit for bit by tests/test_update_snapshot.py."""

from __future__ import annotations

import copy

import pytest
from transformers import HfArgumentParser

from conftest import shakespeare_lm_dataset, tiny_gpt2
from hf_lwsam import LWSAMConfig, LWSAMTrainer, SelectionRule, register_selection_rule
from hf_lwsam.selection import find_trunk
from hf_lwsam.selection_rules import SELECTION_RULES
from test_update_math import _batches, _rel, reference_update


class EveryOtherBlock(SelectionRule):
    """Blocks 0, 2, 4, ... of the repeated-block trunk (every layer under them)."""

    name = "test_every_other_block"
    help = "every other transformer block"

    def layers(self, model):
        trunk, blocks = find_trunk(model)
        roots = [f"{trunk}.{i}" for i in range(0, len(blocks), 2)]
        return [name for name, module in model.named_modules()
                if any(name.startswith(root + ".") for root in roots) and list(module.parameters(recurse=False))]


class NamesNothing(SelectionRule):
    name = "test_names_nothing"

    def layers(self, model):
        return ["no.such.module"]


@pytest.fixture
def registered():
    """The test rules registered for one test, removed afterwards (the registry is process-wide)."""
    for rule in (EveryOtherBlock, NamesNothing):
        register_selection_rule(rule)
    yield
    for rule in (EveryOtherBlock, NamesNothing):
        SELECTION_RULES.pop(rule.name, None)


def test_registered_rule_trains_and_its_update_is_sam_on_its_parameters(registered, sgd_args):
    rho = 0.5
    model, dataset = tiny_gpt2(n_layer=3), shakespeare_lm_dataset(4)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    reference_model = copy.deepcopy(model)
    args = sgd_args(sam_rho=rho, sam_selection=EveryOtherBlock.name)
    assert args.sam_selection == EveryOtherBlock.name
    trainer = LWSAMTrainer(model=model, args=args, train_dataset=dataset)

    # Exactly blocks 0 and 2: every parameter under them, nothing else (block 1, embeddings, ln_f).
    chosen = [n for n in start if n.startswith(("transformer.h.0.", "transformer.h.2."))]
    assert trainer.perturbed_parameter_names() == chosen
    assert trainer.num_perturbed_layers == 2 * 6  # ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj
    trainer.train()
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    expected = reference_update(reference_model, _batches(dataset), chosen, rho, causal=True)
    assert _rel(got, expected, start) <= 1e-5
    # The check tells the selection apart: SAM on every parameter, or on block 1 only, gives another update.
    everything = reference_update(copy.deepcopy(reference_model), _batches(dataset), None, rho, causal=True)
    middle = [n for n in start if n.startswith("transformer.h.1.")]
    block_1 = reference_update(copy.deepcopy(reference_model), _batches(dataset), middle, rho, causal=True)
    assert _rel(everything, expected, start) > 1e-3 and _rel(block_1, expected, start) > 1e-3
    assert any("sam/loss_perturbed" in log for log in trainer.state.log_history)


def test_rule_is_accepted_once_registered_and_by_the_argument_parser(sgd_args, tmp_path):
    with pytest.raises(ValueError, match="sam_selection='test_every_other_block' is unknown"):
        sgd_args(sam_selection=EveryOtherBlock.name)
    register_selection_rule(EveryOtherBlock)
    try:
        assert sgd_args(sam_selection=EveryOtherBlock.name).sam_selection == EveryOtherBlock.name
        (parsed,) = HfArgumentParser(LWSAMConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--sam_selection", EveryOtherBlock.name])
        assert parsed.sam_selection == EveryOtherBlock.name
    finally:
        SELECTION_RULES.pop(EveryOtherBlock.name)


def test_duplicate_name_is_refused(registered):
    class AnotherPattern(SelectionRule):
        name = "pattern"

    for rule in (AnotherPattern, EveryOtherBlock):
        with pytest.raises(ValueError, match=rf"sam_selection='{rule.name}' is already registered"):
            register_selection_rule(rule)
    assert SELECTION_RULES["pattern"].__name__ == "PatternSelection"


def test_invalid_rule_classes_are_refused():
    class Nameless(SelectionRule):
        pass

    with pytest.raises(ValueError, match=r"Nameless has no name \(Nameless.name=None\)"):
        register_selection_rule(Nameless)
    with pytest.raises(ValueError, match=r"pass a subclass of hf_lwsam.SelectionRule"):
        register_selection_rule(dict)


def test_unknown_name_lists_the_live_registry(registered, sgd_args):
    with pytest.raises(ValueError) as refusal:
        sgd_args(sam_selection="everything")
    message = str(refusal.value)
    assert message.startswith("sam_selection='everything' is unknown: use one of 'pattern', 'all', 'probe', ")
    assert f"'{EveryOtherBlock.name}'" in message and "register_selection_rule" in message


def test_rule_naming_no_module_is_refused_at_construction(registered, sgd_args):
    with pytest.raises(ValueError, match=r"sam_selection='test_names_nothing' \(NamesNothing.layers\) names no module"):
        LWSAMTrainer(model=tiny_gpt2(), args=sgd_args(sam_selection=NamesNothing.name),
                     train_dataset=shakespeare_lm_dataset(4))


def test_builtin_rules_are_registered_in_order():
    assert list(SELECTION_RULES)[:3] == ["pattern", "all", "probe"]
    assert [rule.layer_wise for rule in SELECTION_RULES.values()][:3] == [True, False, True]
