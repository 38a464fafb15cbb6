"""Activation reuse is exact, or falls back with a reason, in the setups where a naive replay goes wrong: aux losses
collected by output recorders (MoE router logits, attentions), several forwards per loss (no-grad targets, a PEFT
reference forward with the adapters disabled), state in dicts and caches, accelerate hooks, running statistics, and
models without input embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
)

from conftest import BYTE_VOCAB, shakespeare_lm_dataset, tiny_gpt2, tiny_llama_lora, tweet_bytes_dataset
from hf_lwsam import LWSAMTrainer

TINY = dict(vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
            tie_word_embeddings=False)


def _build(model_cls, config_cls, seed: int = 0, **overrides):
    def make():
        torch.manual_seed(seed)
        return model_cls(config_cls(**{**TINY, **overrides}))

    return make


def mixtral():
    return _build(MixtralForCausalLM, MixtralConfig, num_local_experts=4, num_experts_per_tok=2,
                  output_router_logits=True, router_aux_loss_coef=0.02)()


def qwen3_moe():
    return _build(Qwen3MoeForCausalLM, Qwen3MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  decoder_sparse_step=1, output_router_logits=True, router_aux_loss_coef=0.5, head_dim=16)()


def qwen2_moe():
    return _build(Qwen2MoeForCausalLM, Qwen2MoeConfig, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, decoder_sparse_step=1, output_router_logits=True,
                  router_aux_loss_coef=0.5)()


def llama_eager():
    model = _build(LlamaForCausalLM, LlamaConfig)()
    model.config._attn_implementation = "eager"
    return model


def one_step(make, data, sgd_args, reuse: bool, trainer_cls=LWSAMTrainer, **overrides):
    """One real SGD step (lr 1, no clipping, 2 micro-batches): the update, and the trainer."""
    model = make()
    trainer = trainer_cls(model=model, args=sgd_args(sam_rho=0.5, sam_reuse_activations=reuse, **overrides),
                          train_dataset=data)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    update = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
    return update, trainer


def rel(a: dict, b: dict) -> float:
    num = sum(((a[n] - b[n]).double() ** 2).sum() for n in a)
    return float(torch.sqrt(num / sum((b[n].double() ** 2).sum() for n in b)))


def reuse_vs_recompute(make, data, sgd_args, trainer_cls=LWSAMTrainer, **overrides):
    with_reuse, trainer = one_step(make, data, sgd_args, True, trainer_cls, **overrides)
    without, _ = one_step(make, data, sgd_args, False, trainer_cls, **overrides)
    return rel(with_reuse, without), trainer


# ------------------------------------------------------------------- losses that see more than the logits
class AttentionLossTrainer(LWSAMTrainer):
    """A loss on the first layer's attention probabilities (collected by transformers' output recorders)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs, output_attentions=True)
        return out.loss + 10.0 * out.attentions[0].pow(2).mean()


class TargetForwardTrainer(LWSAMTrainer):
    """Self-distillation: the loss runs the model twice, the second time without grad for a target."""

    target_first = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.target_first:
            with torch.no_grad():
                target = model(input_ids=inputs["input_ids"]).logits.softmax(-1)
        out = model(**inputs)
        if not self.target_first:
            with torch.no_grad():
                target = model(input_ids=inputs["input_ids"]).logits.softmax(-1)
        return out.loss - 0.5 * (target * out.logits.log_softmax(-1)).sum(-1).mean()


class TargetFirstTrainer(TargetForwardTrainer):
    target_first = True


class ReferenceForwardTrainer(LWSAMTrainer):
    """The DPO-with-PEFT pattern: a reference forward of the same model with the LoRA adapters disabled."""

    reference_first = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        def reference():
            with torch.no_grad(), model.disable_adapter():
                return model(**inputs).logits

        ref = reference() if self.reference_first else None
        out = model(**inputs)
        ref = reference() if ref is None else ref
        return out.loss + ((out.logits - ref) ** 2).mean()


class ReferenceFirstTrainer(ReferenceForwardTrainer):
    reference_first = True


EXACT = {
    "mixtral-router-aux-loss": (mixtral, LWSAMTrainer),
    "qwen3-moe-router-aux-loss": (qwen3_moe, LWSAMTrainer),
    "qwen2-moe-router-aux-loss": (qwen2_moe, LWSAMTrainer),
    "loss-on-attentions": (llama_eager, AttentionLossTrainer),
    "no-grad-target-forward-after": (_build(LlamaForCausalLM, LlamaConfig), TargetForwardTrainer),
    "no-grad-target-forward-before": (_build(LlamaForCausalLM, LlamaConfig), TargetFirstTrainer),
    "lora-reference-forward-after": (tiny_llama_lora, ReferenceForwardTrainer),
    "lora-reference-forward-before": (tiny_llama_lora, ReferenceFirstTrainer),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_reuse_is_exact_with_recorded_outputs_and_several_forwards(case, sgd_args):
    make, trainer_cls = EXACT[case]
    difference, trainer = reuse_vs_recompute(make, shakespeare_lm_dataset(4), sgd_args, trainer_cls)
    assert trainer.reuse_disabled_reason is None  # reuse stayed on ...
    assert difference <= 1e-5  # ... and gave the recomputed update


def test_router_aux_loss_reaches_the_replayed_layers(sgd_args):
    """The aux loss's gradient on a replayed layer's router is there, and equals the recomputed one."""
    with_reuse, trainer = one_step(mixtral, shakespeare_lm_dataset(4), sgd_args, True)
    without, _ = one_step(mixtral, shakespeare_lm_dataset(4), sgd_args, False)
    gate = next(n for n in with_reuse if n.startswith("model.layers.0.") and "gate" in n and "expert" not in n)
    assert trainer.reuse_disabled_reason is None
    assert with_reuse[gate].abs().sum() > 0
    torch.testing.assert_close(with_reuse[gate], without[gate], rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------------- fallbacks
def prefix_tuning_llama():
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(_build(LlamaForCausalLM, LlamaConfig)(),
                          PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_prefix_tuning_with_the_prompt_encoder_perturbed_falls_back(sgd_args):
    # The perturbed prefix reaches every block through the cache: nothing can be replayed.
    difference, trainer = reuse_vs_recompute(prefix_tuning_llama, shakespeare_lm_dataset(4), sgd_args,
                                             sam_target_layers=["prompt_encoder"])
    assert trainer.reuse_disabled_reason is not None
    assert difference <= 1e-5


# ------------------------------------------------------------------------------------- accelerate hooks
def test_instance_level_forward_hooks_survive_a_reuse_step(sgd_args):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = tiny_gpt2()
    for block in model.transformer.h:
        add_hook_to_module(block, Count())
    forwards = [block.__dict__["forward"] for block in model.transformer.h]
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5), train_dataset=shakespeare_lm_dataset(4))
    trainer.train()
    assert trainer.reuse_disabled_reason is None
    assert [block.__dict__["forward"] for block in model.transformer.h] == forwards  # the same objects
    Count.calls = 0
    with torch.no_grad():
        model(input_ids=torch.tensor([list(range(8))]))
    assert Count.calls == 3  # every block's hook still runs


# ------------------------------------------------------------------------------ execution-order default
def tiny_bart():
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=BYTE_VOCAB, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, dropout=0.0,
        attention_dropout=0.0, activation_dropout=0.0, tie_word_embeddings=False))


def tiny_deberta_v2():
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=BYTE_VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("make, data, run_before_trunk", [
    (tiny_bart, lambda: shakespeare_lm_dataset(4), "model.decoder.layernorm_embedding"),
    (tiny_deberta_v2, lambda: tweet_bytes_dataset(4), "deberta.encoder.rel_embeddings"),
    (lambda: gemma3n(), lambda: shakespeare_lm_dataset(4), "model.embed_tokens_per_layer"),
])
def test_default_selection_follows_execution_order_and_keeps_reuse(make, data, run_before_trunk, sgd_args):
    difference, trainer = reuse_vs_recompute(make, data(), sgd_args)
    layers = trainer.perturbed_parameter_names()
    assert not any(name.startswith(run_before_trunk) for name in layers)
    assert trainer.reuse_disabled_reason is None
    assert difference <= 1e-5


# ----------------------------------------------------------------------------- vision: BatchNorm, no embedding
def digits_dataset(n: int):
    from datasets import Dataset
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0  # real 8x8 handwritten digits
    return Dataset.from_dict({"pixel_values": images.tolist(), "labels": digits.target[:n].tolist()})


def tiny_resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 1, 1], layer_type="basic",
        num_labels=10, downsample_in_first_stage=False))


def _running_stats(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


@pytest.mark.parametrize("reuse", [True, False])
def test_running_statistics_are_updated_once_as_in_the_plain_step(reuse, sgd_args):
    data = digits_dataset(4)
    plain_model = tiny_resnet()
    Trainer(model=plain_model, args=sgd_args(), train_dataset=data).train()
    model = tiny_resnet()
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_rho=0.5, sam_reuse_activations=reuse), train_dataset=data)
    trainer.train()
    if reuse:
        assert trainer.reuse_disabled_reason is None  # the default selection replays the lower stages
    expected, got = _running_stats(plain_model), _running_stats(model)
    assert any("running_mean" in n for n in got)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_cnn_without_input_embeddings_reuse_equals_recompute(sgd_args):
    difference, trainer = reuse_vs_recompute(tiny_resnet, digits_dataset(4), sgd_args)
    assert trainer.reuse_disabled_reason is None
    assert any(name.startswith("classifier") for name in trainer.perturbed_parameter_names())
    assert difference <= 1e-5


# -------------------------------------------------------------------------------- the architecture matrix
def gemma3n():
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    # KV sharing: the last two layers reuse the keys/values that layers 0-1 leave in a shared dict (a side effect).
    return _build(Gemma3nForCausalLM, Gemma3nTextConfig, num_hidden_layers=4, num_key_value_heads=1, head_dim=16,
                  vocab_size_per_layer_input=BYTE_VOCAB, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
                  layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8, laurel_rank=4,
                  activation_sparsity_pattern=[0.0] * 4)()


def _auto(model_name: str, config_name: str, **overrides):
    import transformers

    return _build(getattr(transformers, model_name), getattr(transformers, config_name), **overrides)


def tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=BYTE_VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
        tie_word_embeddings=False))


ENCODER = dict(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LM, CLS, IMAGES = (lambda: shakespeare_lm_dataset(4)), (lambda: tweet_bytes_dataset(4)), (lambda: digits_dataset(4))
ARCHITECTURES = {
    # decoders
    "gpt2": (lambda: tiny_gpt2(tie=False), LM),
    "llama": (_build(LlamaForCausalLM, LlamaConfig), LM),
    "mistral-sliding-window": (_auto("MistralForCausalLM", "MistralConfig", sliding_window=8), LM),
    "qwen2": (_auto("Qwen2ForCausalLM", "Qwen2Config"), LM),
    "qwen3": (_auto("Qwen3ForCausalLM", "Qwen3Config", head_dim=16), LM),
    "gemma2-alternating": (_auto("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=8), LM),
    "gemma3-text": (_auto("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=8), LM),
    "gemma3n-kv-sharing": (gemma3n, LM),
    "phi3": (_auto("Phi3ForCausalLM", "Phi3Config"), LM),
    "gpt-neox": (_auto("GPTNeoXForCausalLM", "GPTNeoXConfig"), LM),
    "opt": (_auto("OPTForCausalLM", "OPTConfig", ffn_dim=64, word_embed_proj_dim=32), LM),
    "bloom": (_auto("BloomForCausalLM", "BloomConfig", n_layer=3, n_head=2), LM),
    "falcon": (_auto("FalconForCausalLM", "FalconConfig"), LM),
    "mixtral-moe": (mixtral, LM),
    "qwen3-moe": (qwen3_moe, LM),
    "qwen2-moe": (qwen2_moe, LM),
    "olmoe": (_auto("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, num_experts_per_tok=2,
                    output_router_logits=True), LM),
    # encoders (sequence classification)
    "bert": (_auto("BertForSequenceClassification", "BertConfig", **ENCODER), CLS),
    "roberta": (_auto("RobertaForSequenceClassification", "RobertaConfig", **ENCODER, pad_token_id=1), CLS),
    "electra": (_auto("ElectraForSequenceClassification", "ElectraConfig", **ENCODER, embedding_size=32), CLS),
    "distilbert": (_auto("DistilBertForSequenceClassification", "DistilBertConfig", dim=32, n_layers=3, n_heads=2,
                         hidden_dim=64, num_labels=3, dropout=0.0, attention_dropout=0.0), CLS),
    "deberta-v2": (tiny_deberta_v2, CLS),
    "modernbert": (_auto("ModernBertForSequenceClassification", "ModernBertConfig", num_labels=3,
                         global_attn_every_n_layers=2, local_attention=8), CLS),
    # encoder-decoders
    "t5": (tiny_t5, LM),
    "bart": (tiny_bart, LM),
    # vision
    "vit": (tiny_vit, IMAGES),
    "resnet": (tiny_resnet, IMAGES),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_reuse_equals_recompute_or_falls_back(name, sgd_args):
    make, data = ARCHITECTURES[name]
    difference, trainer = reuse_vs_recompute(make, data(), sgd_args)
    assert difference <= 1e-5, (name, trainer.reuse_disabled_reason)
    print(f"{name}: reuse {'on' if trainer.reuse_disabled_reason is None else 'off: ' + trainer.reuse_disabled_reason}")


class _PoppingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x, scratch):
        scratch.pop("pending", None)  # removes an entry of a dict it is given: a replay cannot repeat that
        return torch.tanh(self.linear(x))


class _PoppingModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(256, 16), nn.Linear(16, 256)
        self.blocks = nn.ModuleList(_PoppingBlock() for _ in range(3))

    def forward(self, input_ids, labels=None):
        h, scratch = self.embed(input_ids), {"pending": True}
        for block in self.blocks:
            h = block(h, scratch)
        logits = self.head(h)
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_side_effect_that_cannot_be_replayed_falls_back(sgd_args):
    difference, trainer = reuse_vs_recompute(_PoppingModel, shakespeare_lm_dataset(4), sgd_args)
    assert "removes an entry" in trainer.reuse_disabled_reason
    assert difference <= 1e-5


def test_global_module_hooks_fall_back(sgd_args):
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m)))
    try:
        difference, trainer = reuse_vs_recompute(tiny_gpt2, shakespeare_lm_dataset(4), sgd_args,
                                                 sam_target_layers=["h.2", "ln_f"])
    finally:
        handle.remove()
    assert "global module forward hooks" in trainer.reuse_disabled_reason
    assert difference <= 1e-5
