"""`select_layers` semantics: PEFT-style matching, exclusion, LoRA names, the output-side default, errors."""

from __future__ import annotations

import pytest

from conftest import tiny_bert, tiny_gpt2, tiny_llama, tiny_llama_lora
from hf_lwsam import select_layers
from hf_lwsam.selection import find_trunk, layer_parameters

GPT2_LAST_BLOCK = [
    "transformer.h.2.ln_1", "transformer.h.2.attn.c_attn", "transformer.h.2.attn.c_proj",
    "transformer.h.2.ln_2", "transformer.h.2.mlp.c_fc", "transformer.h.2.mlp.c_proj",
]

CASES = [
    # (id, model factory, target, exclude, expected layer names)
    ("tied-head-default", tiny_gpt2, None, None, GPT2_LAST_BLOCK + ["transformer.ln_f"]),
    ("untied-head-default", lambda: tiny_gpt2(tie=False), None, None,
     GPT2_LAST_BLOCK + ["transformer.ln_f", "lm_head"]),
    ("block-level-list", tiny_gpt2, ["h.2"], None, GPT2_LAST_BLOCK),
    ("block-level-regex", tiny_gpt2, r"transformer\.h\.2", None, GPT2_LAST_BLOCK),
    ("regex-alternation", tiny_gpt2, r".*\.h\.[12]\.mlp\.c_proj", None,
     ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_proj"]),
    ("list-suffix-at-dot", tiny_gpt2, ["c_proj"], None,
     [f"transformer.h.{i}.{m}.c_proj" for i in range(3) for m in ("attn", "mlp")]),
    ("list-suffix-not-substring", tiny_gpt2, ["proj", "2.mlp.c_fc"], None, ["transformer.h.2.mlp.c_fc"]),
    ("list-exact", tiny_gpt2, ["transformer.ln_f"], None, ["transformer.ln_f"]),
    ("exclude-removes-sublayers", tiny_gpt2, ["h.2"], ["attn"], [n for n in GPT2_LAST_BLOCK if ".attn." not in n]),
    ("exclude-regex", tiny_gpt2, None, r".*ln_.*", [n for n in GPT2_LAST_BLOCK if "ln_" not in n]),
    ("bert-default", tiny_bert, None, None, [
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.1.attention.output.LayerNorm", "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense", "bert.encoder.layer.1.output.LayerNorm", "bert.pooler.dense",
        "classifier"]),
    ("llama-default-untied", tiny_llama, None, None, [
        f"model.layers.1.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                        "input_layernorm", "post_attention_layernorm")] + ["model.norm", "lm_head"]),
    ("lora-default-adapters-only", tiny_llama_lora, None, None, [
        f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_{ab}.default" for p in "qv" for ab in "AB"]),
    ("lora-list-by-suffix", tiny_llama_lora, ["layers.0.self_attn.q_proj"], None, [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"]),
    ("lora-regex-lora-B", tiny_llama_lora, r".*lora_B\.default", None, [
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_B.default" for i in range(2) for p in "qv"]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_selection_table(case):
    _, make, target, exclude, expected = case
    assert select_layers(make(), target, exclude) == expected


def test_regex_must_match_the_whole_name():
    with pytest.raises(ValueError, match=r"matches no module"):
        select_layers(tiny_gpt2(), r"h\.2\.mlp\.c_fc")


def test_tied_output_embedding_is_left_out_of_the_default():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in layer_parameters(model, select_layers(model))]
    assert "transformer.wte.weight" not in names and "lm_head.weight" not in names


def test_trunk_is_found_under_peft():
    name, blocks = find_trunk(tiny_llama_lora())
    assert name == "base_model.model.model.layers" and len(blocks) == 2


def test_layer_parameters_use_named_parameters_names():
    model = tiny_llama_lora()
    params = layer_parameters(model, select_layers(model))
    assert [n for n, _ in params] == [
        f"base_model.model.model.layers.1.self_attn.{p}_proj.lora_{ab}.default.weight" for p in "qv" for ab in "AB"]
    assert all(p.requires_grad for _, p in params)


@pytest.mark.parametrize(
    "target, exclude, message",
    [
        ("does_not_exist", None, r"sam_target_layers='does_not_exist' matches no module .*transformer\.h\.0"),
        (["nope", "nada"], None, r"sam_target_layers=\['nope', 'nada'\] matches no module"),
        (None, ["nope"], r"sam_exclude_layers=\['nope'\] matches no module"),
        (["h.2"], ["h.2"], r"selects no trainable parameter: what is left after sam_exclude_layers"),
    ],
)
def test_bad_patterns_raise_with_the_users_input(target, exclude, message):
    with pytest.raises(ValueError, match=message):
        select_layers(tiny_gpt2(), target, exclude)


def test_pattern_matching_only_frozen_modules_raises():
    with pytest.raises(ValueError, match=r"sam_target_layers=\['norm'\] selects no trainable parameter: every module "
                                         r"it matches is frozen .*lora_A"):
        select_layers(tiny_llama_lora(), ["norm"])


def test_default_without_a_trunk_asks_for_explicit_layers():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"needs a repeated-block trunk .* pass sam_target_layers explicitly"):
        select_layers(model)
    assert select_layers(model, ["2"]) == ["2"]
