"""The "works with" matrix: the Trainer / TRL switches LM fine-tuners turn on, each with LW-SAM in its default selection
(reuse on), the probe and the stale ascent where it applies. Every cell is either exact (the update equals the
independent formula of the same configuration, <= 1e-5 relative in fp32, or equals LW-SAM without the switch where the
switch does not change the math, with the same selection), or a logged fallback / refusal naming the switch, the
reason and the alternative. The README's "Works with" table points at these tests.

The independent formulas are the shared ones: `test_update_math.reference_update` (SGD lr 1, by hand) and
`test_trl._sft_reference_step` (TRL's SFT loss, by hand).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback

from conftest import shakespeare_lm_dataset, tiny_llama
from hf_lwsam import LWSAMTrainer
from test_reuse_cases import one_step, rel
from test_update_math import _batches, _rel, reference_update

RHO = 0.5
# The three ways LW-SAM picks and perturbs S; the probe re-selects every step (block candidates, top 2).
MODES = {
    "default-reuse": {},
    "probe": dict(sam_selection="probe", sam_probe_interval=1, sam_top_k=2),
    "stale": dict(sam_ascent="stale"),
}


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def selections(trainer) -> list[list[str]]:
    """The perturbed parameter names at the end, and the logged sam/num_perturbed_layers of every step."""
    logged = [e["sam/num_perturbed_layers"] for e in trainer.state.log_history if "sam/num_perturbed_layers" in e]
    return [trainer.perturbed_parameter_names(), logged]


class _Steps(TrainerCallback):
    """Weights after each optimizer step, and how many graphs dynamo has compiled by then."""

    def __init__(self, model):
        self.model, self.weights, self.graphs = model, [], []

    def on_step_end(self, args, state, control, **kwargs):
        from torch._dynamo.utils import counters

        self.weights.append(weights(self.model))
        self.graphs.append(counters["stats"]["unique_graphs"])


@pytest.fixture
def dynamo():
    """A clean dynamo cache and counters for a torch_compile test, and again after it."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


# ----------------------------------------------------------------------------------------------- torch_compile
def test_torch_compile_keeps_the_selection_is_exact_and_compiles_once(sgd_args, dynamo, caplog):
    """The issue's repro (a tiny Llama with an untied head, here 2 layers instead of 4 to compile faster), default
    selection, SGD lr 1, rho 0.5. With
    torch_compile the selection keeps the final norm and the head, step 1 equals the formula, 3 steps equal the run
    without compile, reuse turns itself off with the reason, and steps 2-3 compile nothing new."""
    data = shakespeare_lm_dataset(12)
    args = dict(sam_rho=RHO, max_steps=3)
    plain_model = tiny_llama()
    plain = LWSAMTrainer(model=plain_model, args=sgd_args(**args), train_dataset=data)
    plain.train()

    model = tiny_llama()
    start, reference_model = weights(model), copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(**args, torch_compile=True, torch_compile_backend="aot_eager"),
                           train_dataset=data)
    steps = _Steps(model)
    trainer.add_callback(steps)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # it really ran compiled

    names = trainer.perturbed_parameter_names()
    assert "lm_head.weight" in names and "model.norm.weight" in names and len(names) == 11
    assert selections(trainer) == selections(plain)
    reason = trainer.reuse_disabled_reason
    assert "torch_compile=True" in reason and "torch_compile=False" in reason
    assert any("torch_compile=True" in r.getMessage() for r in caplog.records)  # logged, once
    assert plain.reuse_disabled_reason is None

    expected = reference_update(reference_model, _batches(data.select(range(4))), names, RHO, causal=True)
    assert _rel(steps.weights[0], expected, start) <= 1e-5  # step 1: the formula
    assert rel({n: p - start[n] for n, p in weights(model).items()},
               {n: p - start[n] for n, p in weights(plain_model).items()}) <= 1e-5
    assert steps.graphs[0] > 0 and steps.graphs[-1] == steps.graphs[0]  # no recompilation after the first step


@pytest.mark.parametrize("mode", ["probe", "stale"])
def test_torch_compile_probe_and_stale_equal_lwsam_without_compile(mode, sgd_args, dynamo):
    data = shakespeare_lm_dataset(12)
    args = dict(max_steps=3, **MODES[mode])
    without, plain = one_step(tiny_llama, data, sgd_args, True, **args)
    with_compile, trainer = one_step(tiny_llama, data, sgd_args, True, **args, torch_compile=True,
                                     torch_compile_backend="eager")
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert selections(trainer) == selections(plain)
    assert rel(with_compile, without) <= 1e-5


def test_a_model_compiled_in_place_is_traced_eagerly_and_turns_reuse_off(sgd_args, dynamo):
    """`model.compile()` before the trainer (no torch_compile flag): the same selection and update as uncompiled."""
    data = shakespeare_lm_dataset(4)

    def compiled_llama():
        model = tiny_llama(n_layer=3)
        model.compile(backend="eager")
        return model

    without, plain = one_step(lambda: tiny_llama(n_layer=3), data, sgd_args, True)
    compiled, trainer = one_step(compiled_llama, data, sgd_args, True)
    assert trainer.perturbed_parameter_names() == plain.perturbed_parameter_names()
    assert "torch_compile" in trainer.reuse_disabled_reason
    assert rel(compiled, without) <= 1e-5


class _HiddenTrunk(torch.nn.Module):
    """Calls its blocks' `forward` directly, as some compiled or fused code paths do: no module hook sees them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(256, 16)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.norm, self.head = torch.nn.LayerNorm(16), torch.nn.Linear(16, 256)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = torch.tanh(block.forward(h))
        logits = self.head(self.norm(h))
        return {"loss": torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_trace_that_cannot_see_the_trunk_keeps_the_registration_order_and_says_so(sgd_args, caplog):
    trainer = LWSAMTrainer(model=_HiddenTrunk(), args=sgd_args(sam_rho=RHO), train_dataset=shakespeare_lm_dataset(4))
    before = trainer.perturbed_parameter_names()
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.perturbed_parameter_names() == before  # final norm and head kept, not dropped as "never called"
    assert {"norm.weight", "head.weight"} <= set(before)
    assert any("could not trace the execution order" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------ switches of the Trainer
def test_label_smoothing_update_equals_the_smoothed_formula(sgd_args):
    """label_smoothing_factor: the Trainer's LabelSmoother pops the labels from the inputs; both passes get their own
    copy, and the update is the formula on the smoothed loss."""
    data, model = shakespeare_lm_dataset(4), tiny_llama()
    start, reference_model = weights(model), copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=RHO, label_smoothing_factor=0.2), train_dataset=data)
    trainer.train()
    assert trainer.label_smoother is not None and trainer.reuse_disabled_reason is None
    names = trainer.perturbed_parameter_names()
    assert names == LWSAMTrainer(model=tiny_llama(), args=sgd_args(), train_dataset=data).perturbed_parameter_names()
    expected = reference_update(reference_model, _batches(data), names, RHO, causal=True, label_smoothing=0.2)
    assert _rel(weights(model), expected, start) <= 1e-5
    unsmoothed = reference_update(copy.deepcopy(reference_model), _batches(data), names, RHO, causal=True)
    assert _rel(unsmoothed, expected, start) > 1e-3  # the smoothing is really in the loss


def _same_as_without(make, data, sgd_args, mode: str, switch: dict, **extra):
    """LW-SAM with and without `switch` (a Trainer option that must not change the math), in a MODES `mode`: the
    updates, the runs."""
    args = dict(max_steps=3, **MODES[mode], **extra)
    without, plain = one_step(make, data, sgd_args, True, **args)
    with_switch, trainer = one_step(make, data, sgd_args, True, **args, **switch)
    assert selections(trainer) == selections(plain)
    assert trainer.reuse_disabled_reason == plain.reuse_disabled_reason
    return with_switch, without, trainer, plain


@pytest.mark.parametrize("mode", list(MODES))
def test_include_num_input_tokens_seen_counts_each_micro_batch_once(mode, sgd_args):
    data = shakespeare_lm_dataset(12)
    with_switch, without, trainer, _ = _same_as_without(tiny_llama, data, sgd_args, mode,
                                                        dict(include_num_input_tokens_seen="all"))
    assert all(torch.equal(with_switch[n], without[n]) for n in without)
    stock = Trainer(model=tiny_llama(), args=sgd_args(max_steps=3, include_num_input_tokens_seen="all"),
                    train_dataset=data)
    stock.train()
    assert trainer.state.num_input_tokens_seen == stock.state.num_input_tokens_seen == 12 * 16


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_empty_cache_steps_does_not_change_the_update(mode, sgd_args):
    with_switch, without, _, _ = _same_as_without(tiny_llama, shakespeare_lm_dataset(12), sgd_args, mode,
                                                  dict(torch_empty_cache_steps=1))
    assert all(torch.equal(with_switch[n], without[n]) for n in without)


@pytest.mark.parametrize("mode", list(MODES))
def test_eval_on_start_evaluates_the_unperturbed_model_and_keeps_the_update(mode, sgd_args):
    data = shakespeare_lm_dataset(12)
    evaluation = dict(eval_strategy="steps", eval_steps=100, per_device_eval_batch_size=2)
    args = dict(max_steps=3, **MODES[mode])
    model = tiny_llama()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=RHO, eval_on_start=True, **args, **evaluation),
                           train_dataset=data, eval_dataset=data.select(range(4)))
    start = weights(model)
    trainer.train()
    without, plain = one_step(tiny_llama, data, sgd_args, True, **args)  # no evaluation at all
    assert selections(trainer) == selections(plain)
    assert all(torch.equal(p - start[n], without[n]) for n, p in weights(model).items())
    stock = Trainer(model=tiny_llama(), args=sgd_args(**args, **evaluation), eval_dataset=data.select(range(4)))
    first = trainer.state.log_history[0]  # the evaluation before any step, of the start weights
    assert first["step"] == 0 and first["eval_loss"] == stock.evaluate()["eval_loss"]


OPTIMIZERS = {  # optim -> learning rate (Adam-type steps are about lr per coordinate)
    "sgd": 1.0,
    "adamw_torch_fused": 1e-2,
    "adafactor": 1e-2,
}


@pytest.mark.parametrize("optim", list(OPTIMIZERS))
def test_optimizers_step_on_the_sam_gradient(optim, sgd_args):
    """The optimizer is the stock one and sees `.grad` = the SAM gradient: its step equals the same optimizer class
    (with the Trainer's own kwargs for `optim`) stepping once on the formula's gradient."""
    data, model = shakespeare_lm_dataset(4), tiny_llama()
    start, reference_model = weights(model), copy.deepcopy(model)
    args = sgd_args(sam_rho=RHO, optim=optim, learning_rate=OPTIMIZERS[optim])
    trainer = LWSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    names = trainer.perturbed_parameter_names()
    assert trainer.reuse_disabled_reason is None and "lm_head.weight" in names

    # The SAM gradient by hand (SGD lr 1: w - w_new), then the optimizer's step on it.
    sam_step = reference_update(copy.deepcopy(reference_model), _batches(data), names, RHO, causal=True)
    plain_step = reference_update(copy.deepcopy(reference_model), _batches(data), names, 0.0, causal=True)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, reference_model)
    if optim == "adamw_torch_fused":
        assert kwargs.get("fused") is True

    def step(gradient_step):
        stepped = copy.deepcopy(reference_model)
        params = [p for p in stepped.parameters() if p.requires_grad]
        for (n, _), p in zip(stepped.named_parameters(), params):
            p.grad = (start[n] - gradient_step[n]).clone()
        optimizer_cls([{"params": params, "weight_decay": args.weight_decay}], **kwargs).step()  # as the Trainer groups
        return weights(stepped)

    expected = step(sam_step)
    assert _rel(weights(model), expected, start) <= 1e-5
    assert _rel(step(plain_step), expected, start) > 1e-3  # SAM's step is not the plain one


# ------------------------------------------------------------------------------------------ auto_find_batch_size
class MemoryBoundLlama(torch.nn.Module):
    """A tiny Llama that, for batches above `max_batch` rows, allocates a scratch buffer too large for any machine: a
    real allocation failure (`DefaultCPUAllocator: can't allocate memory`, what accelerate's
    `find_executable_batch_size` catches), on its `fail_at`-th forward of such a batch (1: the first forward, the
    default selection's trace; 3: the trace, pass 1, then LW-SAM's perturbed pass 2)."""

    def __init__(self, max_batch: int, fail_at: int):
        super().__init__()
        self.inner, self.max_batch, self.fail_at = tiny_llama(), max_batch, fail_at
        self.big_forwards, self.failures = 0, 0
        self.config = self.inner.config

    def forward(self, input_ids, labels=None, **kwargs):
        if input_ids.shape[0] > self.max_batch:
            self.big_forwards += 1
            if self.big_forwards >= self.fail_at:
                self.failures += 1
                torch.empty(1 << 52, dtype=torch.uint8)  # 4 PiB: raises RuntimeError(... can't allocate memory ...)
        return self.inner(input_ids=input_ids, labels=labels, **kwargs)


@pytest.mark.parametrize("fail_at", [pytest.param(1, marks=pytest.mark.slow), 3],
                         ids=["oom-in-the-trace", "oom-in-pass-2"])
def test_auto_find_batch_size_retries_from_unperturbed_weights(fail_at, sgd_args):
    data = shakespeare_lm_dataset(8)
    model = MemoryBoundLlama(max_batch=2, fail_at=fail_at)
    start = weights(model)
    at_each_start = []

    class AtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            at_each_start.append(weights(model))

    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=RHO, max_steps=2, per_device_train_batch_size=4,
                                                      gradient_accumulation_steps=1, auto_find_batch_size=True),
                           train_dataset=data, callbacks=[AtTrainBegin()])
    trainer.train()
    assert model.failures >= 1 and trainer._train_batch_size <= 2  # the retry really happened
    assert len(at_each_start) == 1 + model.failures
    for seen in at_each_start:  # every attempt started from the unperturbed start
        assert all(torch.equal(seen[n], start[n]) for n in start)

    # The same as LW-SAM started directly at the batch size the retry found.
    reference = MemoryBoundLlama(max_batch=1 << 30, fail_at=1)
    direct = LWSAMTrainer(model=reference, args=sgd_args(sam_rho=RHO, max_steps=2, gradient_accumulation_steps=1,
                                                         per_device_train_batch_size=trainer._train_batch_size),
                          train_dataset=data)
    direct.train()
    assert trainer.perturbed_parameter_names() == direct.perturbed_parameter_names()
    assert "inner.lm_head.weight" in trainer.perturbed_parameter_names()
    assert trainer.reuse_disabled_reason is None and direct.reuse_disabled_reason is None
    a, b = weights(model), weights(reference)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_an_out_of_memory_retry_keeps_no_clean_gradient_of_the_failed_attempt_for_looksam(sgd_args):
    """LookSAM sums the window's clean gradients of S over its micro-batches: an out-of-memory error in pass 2 of the
    window's first micro-batch, then the retry at a smaller batch, ends with the weights of LookSAM run directly at
    that batch size (the failed micro-batch's clean gradient is not in the retried window's sum)."""
    looksam = dict(sam_rho=RHO, max_steps=4, gradient_accumulation_steps=2, sam_interval=2,
                   sam_interval_reuse="looksam", sam_looksam_alpha=0.7, learning_rate=0.5)
    data = shakespeare_lm_dataset(16)
    model = MemoryBoundLlama(max_batch=2, fail_at=3)  # the trace, pass 1, then pass 2 fails
    trainer = LWSAMTrainer(model=model, args=sgd_args(per_device_train_batch_size=4, auto_find_batch_size=True,
                                                      **looksam), train_dataset=data)
    trainer.train()
    assert model.failures >= 1 and trainer._train_batch_size == 2
    reference = MemoryBoundLlama(max_batch=1 << 30, fail_at=1)
    LWSAMTrainer(model=reference, args=sgd_args(per_device_train_batch_size=2, **looksam), train_dataset=data).train()
    a, b = weights(model), weights(reference)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------------------ NEFTune
class EmbeddingRecorder(TrainerCallback):
    """Records the (noisy) input-embedding outputs of every training-mode forward; registered at train begin, after
    the Trainer's NEFTune hook, so it sees the noise."""

    def __init__(self, model):
        self.model, self.outputs = model, []

    def on_train_begin(self, args, state, control, **kwargs):
        embedding = self.model.get_input_embeddings()
        embedding.register_forward_hook(
            lambda m, a, out: self.outputs.append((a[0].clone(), out.detach().clone())) if m.training else None)


def test_neftune_both_passes_see_the_same_noise_and_the_update_is_the_formula(sgd_args):
    data, model = shakespeare_lm_dataset(4), tiny_llama()
    start, reference_model = weights(model), copy.deepcopy(model)
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=RHO, neftune_noise_alpha=5.0), train_dataset=data)
    recorder = EmbeddingRecorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    assert trainer.reuse_disabled_reason is None
    names = trainer.perturbed_parameter_names()
    assert "lm_head.weight" in names

    # Two micro-batches, two passes each: pass 2 sees exactly pass 1's noise, and the noise is there.
    assert len(recorder.outputs) == 4
    noise = []
    for (ids1, out1), (ids2, out2) in (recorder.outputs[0:2], recorder.outputs[2:4]):
        assert torch.equal(ids1, ids2) and torch.equal(out1, out2)
        clean = reference_model.get_input_embeddings()(ids1).detach()
        assert (out1 - clean).abs().max() > 1e-3
        noise.append((ids1, out1 - clean))

    # The formula with that noise added to the embeddings of each micro-batch, in both of its passes.
    def add_noise(module, args, output):
        return output + next(n for ids, n in noise if torch.equal(ids, args[0]))

    reference_model.get_input_embeddings().register_forward_hook(add_noise)
    expected = reference_update(reference_model, _batches(data), names, RHO, causal=True)
    assert _rel(weights(model), expected, start) <= 1e-5


# -------------------------------------------------------------------------------------------------------- TRL
def sft_llama(seed: int = 0):
    """A tiny Llama over the in-process tokenizer: its attention reads packed sequences' boundaries from
    `position_ids` (transformers' packed-sequence mask), on the CPU too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tiny_tokenizer

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0))


# TRL enforces max_length in padding-free mode only by packing; without packing it must be None.
@pytest.mark.parametrize("switch", [dict(packing=True, max_length=64), dict(padding_free=True, max_length=None)],
                         ids=["packing", "padding_free"])
def test_sft_packing_and_padding_free_equal_the_formula_with_reuse_on(switch, tmp_path):
    pytest.importorskip("trl")
    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer
    from test_trl import SGD, _sft_reference_step, sft

    options = dict(switch)
    runs = [sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, model=sft_llama(), **SGD, **options, max_steps=1,
                sam_rho=RHO, sam_reuse_activations=reuse) for reuse in (True, False)]
    trainer = runs[0]
    assert trainer.padding_free and trainer.reuse_disabled_reason is None
    batch = next(iter(trainer.get_train_dataloader()))
    starts = int((batch["position_ids"][0] == 0).sum())
    assert batch["input_ids"].shape[0] == 1 and starts >= 2 and "attention_mask" not in batch  # several sequences
    with torch.no_grad():  # ... whose boundaries the model reads from position_ids: they are part of the math checked
        probe_model = sft_llama().eval()
        assert not torch.allclose(probe_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits,
                                  probe_model(input_ids=batch["input_ids"]).logits)
    names = trainer.perturbed_parameter_names()
    plain_names = sft(SFTLWSAMTrainer, SFTLWSAMConfig, tmp_path, model=sft_llama(), **SGD, max_steps=1,
                      sam_rho=RHO).perturbed_parameter_names()
    assert names == plain_names and "lm_head.weight" in names

    expected = _sft_reference_step(tmp_path, RHO, make_model=sft_llama, selected_names=names, **options)
    start = weights(sft_llama())
    assert _rel(weights(trainer.model), expected, start) <= 1e-5
    assert _rel(weights(runs[1].model), expected, start) <= 1e-5  # reuse off: the same


def test_sft_neftune_both_passes_see_the_same_noise_and_reuse_equals_recompute(tmp_path):
    pytest.importorskip("trl")
    from conftest import tiny_tokenizer
    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer
    from test_trl import COMMON, SGD, sft_data

    results = []
    for reuse in (True, False):
        model = sft_llama()
        args = SFTLWSAMConfig(output_dir=str(tmp_path / "neft"), **{**COMMON, **SGD, "learning_rate": 0.1}, max_steps=1,
                              neftune_noise_alpha=5.0, sam_rho=RHO, sam_reuse_activations=reuse)
        trainer = SFTLWSAMTrainer(model=model, args=args, train_dataset=sft_data(), processing_class=tiny_tokenizer())
        recorder = EmbeddingRecorder(model)
        trainer.add_callback(recorder)
        trainer.train()
        assert len(recorder.outputs) == 4  # two micro-batches, two passes each
        for (ids1, out1), (ids2, out2) in (recorder.outputs[0:2], recorder.outputs[2:4]):
            assert torch.equal(ids1, ids2) and torch.equal(out1, out2)  # pass 2 sees pass 1's noise
        ids, noisy = recorder.outputs[0]
        assert (noisy - sft_llama().get_input_embeddings()(ids)).abs().max() > 1e-3  # the noise is there
        results.append((weights(model), trainer))
    (a, trainer), (b, _) = results
    assert trainer.reuse_disabled_reason is None
    assert _rel(a, b, weights(sft_llama())) <= 1e-5  # reuse on = reuse off
