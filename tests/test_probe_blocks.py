"""`sam_probe_granularity="block"` and `sam_probe_metric="grad_norm_per_cost"`: the candidates, their recompute costs
and their scores against independent computations, on GPT-2, BERT, Llama + LoRA and T5."""

from __future__ import annotations

import copy
import math

import pytest
from torch import nn

from conftest import shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tiny_llama_lora
from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.probe import candidate_layers, candidate_units, recompute_costs
from test_probe import _batches, reference_layer_norms
from test_reuse_cases import tiny_t5


def test_gpt2_blocks_are_candidates_and_embeddings_are_not():
    model = tiny_gpt2()  # 3 blocks, ln_f, lm_head tied to wte
    units = candidate_units(model, granularity="block")
    assert list(units) == ["transformer.h.0", "transformer.h.1", "transformer.h.2", "transformer.ln_f"]
    layers = candidate_layers(model)
    for i in range(3):
        assert units[f"transformer.h.{i}"] == [n for n in layers if n.startswith(f"transformer.h.{i}.")]
    # Asked for by name, the embeddings are candidates again.
    named = candidate_units(model, ["wte", "ln_f"], granularity="block")
    assert list(named) == ["transformer.wte", "transformer.ln_f"]
    assert candidate_units(model, granularity="layer") == {n: [n] for n in layers}


def test_bert_lora_t5_units():
    bert = candidate_units(tiny_bert(), granularity="block")
    assert list(bert) == ["bert.encoder.layer.0", "bert.encoder.layer.1", "bert.pooler.dense", "classifier"]
    lora = candidate_units(tiny_llama_lora(), granularity="block")
    assert list(lora) == ["base_model.model.model.layers.0", "base_model.model.model.layers.1"]
    assert all(".lora_" in layer for layers in lora.values() for layer in layers)  # only the trainable adapters
    t5 = candidate_units(tiny_t5(), granularity="block")
    # Both stacks' blocks and final norms; the shared embedding (lm_head is tied to it here) is left out.
    assert list(t5) == ["encoder.block.0", "encoder.block.1", "encoder.final_layer_norm", "decoder.block.0",
                        "decoder.block.1", "decoder.block.2", "decoder.final_layer_norm"]


def test_model_without_blocks_falls_back_to_layers():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert candidate_units(mlp, granularity="block") == {"0": ["0"], "2": ["2"]}
    with pytest.raises(ValueError, match="sam_probe_granularity='blocks' is unknown"):
        candidate_units(mlp, granularity="blocks")


def test_recompute_costs_against_the_parameter_count():
    model = tiny_gpt2()
    units = candidate_units(model, granularity="block")
    block = [sum(p.numel() for p in model.transformer.h[i].parameters()) for i in range(3)]
    ln_f = sum(p.numel() for p in model.transformer.ln_f.parameters())
    head = model.lm_head.weight.numel()  # tied to wte: no parameter of its own, but a matmul in the second pass
    total = sum(block) + ln_f + head  # wte and wpe are lookups
    expected = [(sum(block[i:]) + ln_f + head) / total for i in range(3)] + [(ln_f + head) / total]
    assert recompute_costs(model, units).tolist() == pytest.approx(expected, rel=1e-12)
    assert recompute_costs(model, {"transformer.wte": ["transformer.wte"]}).tolist() == [1.0]  # the whole model


@pytest.mark.parametrize("metric", ["grad_norm", "grad_norm_per_cost"])
def test_block_scores_match_independent_computation(sgd_args, metric):
    """rho=0, one micro-batch: a block's score is sqrt(sum of its layers' squared gradient norms) (/ its cost)."""
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    reference = reference_layer_norms(copy.deepcopy(model).train(), _batches(dataset))
    units = candidate_units(model, granularity="block")
    costs = dict(zip(units, recompute_costs(model, units).tolist()))
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", sam_probe_granularity="block", sam_probe_metric=metric, sam_top_k=1, sam_rho=0.0,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, sam_probe_interval=0))
    assert trainer._sam_layers == ["transformer.ln_f"]  # before the first probe: the output-most candidate
    trainer.train()
    got = trainer._layer_probe.last_norms
    assert list(got) == list(units)
    for name, layers in units.items():
        norm = math.sqrt(sum(reference[layer][0] ** 2 for layer in layers))
        expected = norm / costs[name] if metric == "grad_norm_per_cost" else norm
        assert got[name] == pytest.approx(expected, rel=1e-4)
    best = max(got, key=got.get)
    assert trainer._sam_layers == units[best]  # the whole block is perturbed
    assert trainer.perturbed_parameter_names() == [
        n for n, p in model.named_parameters() if any(n.startswith(layer + ".") for layer in units[best])]


def test_cost_aware_ranking_can_disagree_with_the_norm(sgd_args):
    """Tiny GPT-2 at init: block 1 has the largest gradient norm, but block 2 recomputes less and wins per unit of
    cost (norms 1.395 vs 1.349, costs 0.73 vs 0.45 of the model)."""
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    picks = {}
    for metric in ("grad_norm", "grad_norm_per_cost"):
        trainer = LWSAMTrainer(model=copy.deepcopy(model), train_dataset=dataset, args=sgd_args(
            sam_selection="probe", sam_probe_granularity="block", sam_probe_metric=metric, sam_top_k=1, sam_rho=0.0,
            sam_probe_interval=0, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1))
        trainer.train()
        picks[metric] = trainer._layer_probe.selection
    assert picks == {"grad_norm": ["transformer.h.1"], "grad_norm_per_cost": ["transformer.h.2"]}


def test_bad_granularity_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match="sam_probe_granularity='module' is unknown: use one of 'block', 'layer'"):
        LWSAMConfig(output_dir=str(tmp_path), sam_selection="probe", sam_probe_granularity="module")
