"""`sam_selection="probe"`: per-layer gradient norms against an independent computation, the ranking, the schedule,
checkpoint/resume and the candidate restriction."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tiny_llama_lora, tweet_bytes_dataset
from hf_lwsam import LWSAMTrainer, probe_layer_grad_norms
from hf_lwsam.probe import candidate_layers

# The paper's ranking, the subject of this file: every layer a candidate, scored by its gradient norm.
LAYER_NORMS = dict(sam_probe_granularity="layer", sam_probe_metric="grad_norm")


def _batches(dataset, size: int = 4):
    return [{k: torch.tensor(dataset[i : i + size][k]) for k in dataset.column_names}
            for i in range(0, len(dataset), size)]


def reference_layer_norms(model, batches) -> dict[str, tuple[float, int]]:
    """(||grad of the mean loss||, numel) per module owning trainable parameters, via `.backward()` on a copy; a
    parameter shared by two modules counts for the first one."""
    model = copy.deepcopy(model)
    loss = sum(model(**b).loss for b in batches) / len(batches)  # mean loss over the batches
    loss.backward()
    seen, out = set(), {}
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            squared = sum(float((p.grad.double() ** 2).sum()) for p in params)  # ||g_l||^2 = sum of entries^2
            out[name] = (math.sqrt(squared), sum(p.numel() for p in params))
    return out


@pytest.mark.parametrize("make, data", [(tiny_gpt2, lambda: shakespeare_lm_dataset(8)),
                                        (tiny_bert, lambda: tweet_bytes_dataset(8))])
def test_probe_layer_grad_norms_matches_independent_computation(make, data):
    model = make()
    model.train()
    batches = _batches(data())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = reference_layer_norms(model, batches)

    got = probe_layer_grad_norms(model, batches)
    per_param = probe_layer_grad_norms(model, batches, metric="grad_norm_per_param")

    assert list(got) == list(expected)  # same layers, depth order; GPT-2's tied lm_head counted under wte
    for name, (norm, numel) in expected.items():
        assert got[name] == pytest.approx(norm, rel=1e-5, abs=1e-9)
        assert per_param[name] == pytest.approx(norm / math.sqrt(numel), rel=1e-5, abs=1e-9)
    assert all(p.grad is None for p in model.parameters())  # no .grad touched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no weight touched
    assert max(got.values()) > 0
    with pytest.raises(ValueError, match="metric='hessian' is unknown"):
        probe_layer_grad_norms(model, batches, metric="hessian")


def test_trainer_probe_reads_the_step_gradient(sgd_args):
    """rho=0, one micro-batch: the probe's norms are those of the clean gradient of that batch at the start weights."""
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    expected = probe_layer_grad_norms(copy.deepcopy(model).train(), _batches(dataset))
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", **LAYER_NORMS, sam_rho=0.0, per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        sam_probe_interval=0))
    trainer.train()
    got = trainer._layer_probe.last_norms
    assert list(got) == list(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-8)


def test_dominant_layer_is_selected(sgd_args):
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(8)
    unscaled = probe_layer_grad_norms(copy.deepcopy(model).train(), _batches(dataset))
    assert max(unscaled, key=unscaled.get) != "transformer.h.0.mlp.c_proj"
    with torch.no_grad():  # c_fc's output x 50 is c_proj's input (GELU ~ ReLU there): dL/dW = delta x^T grows ~50x
        model.transformer.h[0].mlp.c_fc.weight.mul_(50.0)
        model.transformer.h[0].mlp.c_fc.bias.mul_(50.0)
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", **LAYER_NORMS, sam_top_k=1, sam_probe_interval=0, max_steps=2,
        learning_rate=1e-3,
        per_device_train_batch_size=4, gradient_accumulation_steps=1))
    initial = list(trainer._sam_layers)
    trainer.train()
    assert initial == ["transformer.ln_f"]  # before the first probe: the output-most candidate
    norms = trainer._layer_probe.last_norms
    assert max(norms, key=norms.get) == "transformer.h.0.mlp.c_proj"
    assert trainer._sam_layers == ["transformer.h.0.mlp.c_proj"]
    assert trainer.perturbed_parameter_names() == ["transformer.h.0.mlp.c_proj.weight",
                                                   "transformer.h.0.mlp.c_proj.bias"]


@pytest.mark.parametrize("options, count", [(dict(sam_top_k=4), 4), (dict(sam_top_ratio=0.1), 3),
                                            (dict(sam_top_k=1, sam_top_ratio=1.0), 21)])
def test_top_k_and_top_ratio_select_the_right_count(sgd_args, options, count):
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", **LAYER_NORMS, sam_probe_interval=0, max_steps=1, **options))
    assert len(trainer._layer_probe.candidates) == 21  # 3 blocks x 6 layers + wte, wpe, ln_f (lm_head tied)
    trainer.train()
    norms, selected = trainer._layer_probe.last_norms, trainer._sam_layers
    assert len(selected) == count == trainer.num_perturbed_layers
    others = [norms[n] for n in norms if n not in selected]
    assert not others or min(norms[n] for n in selected) >= max(others)  # the top `count` by norm
    assert selected == [n for n in norms if n in selected]  # depth order


@pytest.mark.parametrize("options, probe_steps", [
    (dict(sam_probe_interval=2, max_steps=5), [0, 2, 4]),
    (dict(sam_probe_interval=0, max_steps=3), [0]),
    # 4 micro-batches per probe at 2 per window: a probe spans steps s, s+1 and finishes at s+1.
    (dict(sam_probe_interval=3, sam_probe_batches=4, gradient_accumulation_steps=2, max_steps=5), [1, 4]),
])
def test_probe_schedule(sgd_args, options, probe_steps):
    model, dataset = tiny_gpt2(n_layer=2), shakespeare_lm_dataset(32)
    options.setdefault("gradient_accumulation_steps", 1)
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", **LAYER_NORMS, learning_rate=1e-3, per_device_train_batch_size=2,
        logging_steps=100, **options))
    trainer.train()
    probe = trainer._layer_probe
    assert [s for s, _ in probe.history] == probe_steps  # every completed probe, and only those
    assert probe.num_probes == len(probe_steps) and probe.pending is None


def test_resume_keeps_selection_and_schedule(sgd_args, tmp_path):
    common = dict(sam_selection="probe", **LAYER_NORMS, sam_top_k=2, sam_probe_interval=3,
                  sam_probe_batches=2, max_steps=6,
                  gradient_accumulation_steps=1, per_device_train_batch_size=2, learning_rate=0.05,
                  save_strategy="steps", save_steps=4, save_only_model=False, logging_steps=100)
    dataset = shakespeare_lm_dataset(32)
    full = LWSAMTrainer(model=tiny_gpt2(n_layer=2), train_dataset=dataset,
                        args=sgd_args(output_dir=str(tmp_path / "full"), **common))
    full.train()
    # Probes span steps (0, 1) and (3, 4): checkpoint-4 is saved mid-probe, after step 3's window.
    assert [s for s, _ in full._layer_probe.history] == [1, 4]

    resumed = LWSAMTrainer(model=tiny_gpt2(n_layer=2, seed=1), train_dataset=dataset,
                           args=sgd_args(output_dir=str(tmp_path / "resumed"), **common))
    assert resumed._sam_layers == resumed._layer_probe.initial_selection()
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    probe = resumed._layer_probe
    assert [s for s, _ in probe.history] == [4]  # the schedule continues; the pending half-probe is finished
    assert probe.history == full._layer_probe.history[1:]
    assert probe.num_probes == 2 and resumed._sam_layers == full._sam_layers
    for name, value in full._layer_probe.last_norms.items():
        assert probe.last_norms[name] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("edit", ["unknown layer", "pending of another length", "missing key"])
def test_resume_from_a_probe_state_that_does_not_fit_starts_afresh(sgd_args, tmp_path, caplog, edit):
    """A checkpoint whose saved probe state names layers this model does not have (or is otherwise inconsistent) is
    not trusted: probing starts afresh from the initial selection, with the reason logged, instead of a `KeyError`."""
    import json
    import logging

    from hf_lwsam.probe import STATE_KEY

    common = dict(sam_selection="probe", **LAYER_NORMS, sam_top_k=2, sam_probe_interval=2, max_steps=3,
                  per_device_train_batch_size=2, learning_rate=0.05, save_strategy="steps", save_steps=2,
                  save_only_model=False, logging_steps=100)
    dataset = shakespeare_lm_dataset(12)
    LWSAMTrainer(model=tiny_gpt2(n_layer=2), train_dataset=dataset,
                 args=sgd_args(output_dir=str(tmp_path / "full"), **common)).train()
    state_file = tmp_path / "full" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    saved = state["stateful_callbacks"][STATE_KEY]
    if edit == "unknown layer":
        saved["selection"] = ["transformer.h.7.attn.c_attn", saved["selection"][-1]]
    elif edit == "pending of another length":
        saved["pending"] = [1.0, 2.0]
    else:
        del saved["num_probes"]
    state_file.write_text(json.dumps(state))

    resumed = LWSAMTrainer(model=tiny_gpt2(n_layer=2), train_dataset=dataset,
                           args=sgd_args(output_dir=str(tmp_path / "resumed"), **common))
    with caplog.at_level(logging.WARNING, logger="hf_lwsam.probe"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert "probe state does not fit this model" in caplog.text and "probing starts afresh" in caplog.text
    if edit == "unknown layer":
        assert "transformer.h.7.attn.c_attn" in caplog.text
    probe = resumed._layer_probe
    assert [s for s, _ in probe.history] == [2] and probe.num_probes == 1  # the step-2 probe ran on the new state
    assert resumed._sam_layers == probe.selected_layers() and resumed.state.global_step == 3


def test_candidates_follow_patterns():
    model = tiny_gpt2()
    everything = candidate_layers(model)
    assert "transformer.wte" in everything and "lm_head" not in everything  # tied head: counted under wte
    upper = candidate_layers(model, r"transformer\.h\.[12]")
    assert upper == [n for n in everything if n.startswith(("transformer.h.1.", "transformer.h.2."))]
    no_embeddings = candidate_layers(model, exclude_layers=["wte", "wpe"])
    assert no_embeddings == [n for n in everything if n not in ("transformer.wte", "transformer.wpe")]
    assert candidate_layers(model, ["lm_head", "ln_f"]) == ["transformer.ln_f", "lm_head"]  # wte not a candidate
    lora = candidate_layers(tiny_llama_lora())
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    with pytest.raises(ValueError, match=r"sam_exclude_layers=\['nothing'\] matches no module"):
        candidate_layers(model, exclude_layers=["nothing"])
    with pytest.raises(ValueError, match=r"sam_target_layers='nothing' matches no module"):
        candidate_layers(model, "nothing")


def test_trainer_restricts_probe_to_pattern(sgd_args):
    model, dataset = tiny_gpt2(), shakespeare_lm_dataset(4)
    trainer = LWSAMTrainer(model=model, train_dataset=dataset, args=sgd_args(
        sam_selection="probe", **LAYER_NORMS, sam_target_layers=r"transformer\.h\.1", sam_top_k=3,
        sam_probe_interval=0))
    trainer.train()
    assert len(trainer._sam_layers) == 3 and all(n.startswith("transformer.h.1.") for n in trainer._sam_layers)
    assert set(trainer._layer_probe.last_norms) == {n for n in candidate_layers(model) if ".h.1." in n}


def test_a_probe_on_a_looksam_step_ranks_the_clean_gradient_and_looksam_still_adds_its_component(sgd_args):
    """A probe step that is also a LookSAM step (a step between SAM steps): the probe ranks `.grad` before LookSAM's
    component is added to the selected layers' (which would favour them: alpha 3 triples their norms), and the
    component is still added to the S that step ran with."""
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):  # the model at w when step 3 begins
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                self.model = copy.deepcopy(model)

    data, snapshot = shakespeare_lm_dataset(16), Snapshot()
    args = sgd_args(per_device_train_batch_size=2, gradient_accumulation_steps=1, max_steps=4, learning_rate=1e-3,
                    sam_selection="probe", sam_probe_granularity="layer", sam_probe_metric="grad_norm", sam_top_k=2,
                    sam_probe_interval=3, sam_interval=2, sam_interval_reuse="looksam", sam_looksam_alpha=3.0,
                    sam_rho=0.5)
    trainer = LWSAMTrainer(model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[snapshot])
    trainer.train()
    batch = {k: torch.tensor(data[6:8][k]) for k in data.column_names}  # step 3's batch (sequential, batch 2)
    clean = probe_layer_grad_norms(snapshot.model.train(), [batch])
    probe = trainer._layer_probe
    assert probe.history[0][1] != probe.history[-1][1], "the probe at step 3 changed the selection"
    for name, norm in clean.items():
        assert math.isclose(probe.last_norms[name], norm, rel_tol=1e-5), name
    assert probe.history[-1][1] == sorted(sorted(clean, key=clean.get)[-2:], key=list(clean).index)
    added = {e["step"]: e["sam/looksam_steps"] for e in trainer.state.log_history if "sam/looksam_steps" in e}
    assert added.get(4) == 1.0, "the probe step (the 4th) added LookSAM's component to the S it ran with"
