"""Tiny real models built from configs, and real data from the offline asset packages."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_lwsam.data import load_tweets, shakespeare_files  # noqa: E402

BYTE_VOCAB = 256  # byte-level "tokenizer": real text, no tokenizer download


def _text_bytes(play: str = "hamlet") -> bytes:
    with open(shakespeare_files()[play][0], "rb") as f:
        return f.read()


def shakespeare_lm_dataset(n: int, seq_len: int = 16, play: str = "hamlet", start: int = 5000) -> Dataset:
    """`n` equal-length byte sequences of a real play, `labels` = `input_ids` (causal LM)."""
    data = _text_bytes(play)
    rows = [list(data[start + i * seq_len : start + (i + 1) * seq_len]) for i in range(n)]
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def tweet_bytes_dataset(n: int, seq_len: int = 24) -> Dataset:
    """`n` real tweets as fixed-length byte sequences with their 3-class sentiment labels."""
    tweets = load_tweets()["train"].select(range(n))
    ids = [list(t.encode("utf-8")[:seq_len].ljust(seq_len, b" ")) for t in tweets["text"]]
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * n, "labels": tweets["label"]})


def tiny_gpt2(seed: int = 0, n_layer: int = 3, tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=BYTE_VOCAB, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tie,
    )
    model = GPT2LMHeadModel(config)
    # GPT-2 leaves loss_type unset, and the Trainer then counts unshifted labels for num_items_in_batch
    # (stock behaviour); naming the loss makes it count exactly the predicted tokens.
    model.loss_type = "ForCausalLM"
    return model


def tiny_llama(seed: int = 0, n_layer: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layer,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def tiny_llama_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed)
    torch.manual_seed(seed + 1)
    # init_lora_weights=False: random B, so the LoRA gradients are not zero at the first step.
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, init_lora_weights=False))


def tiny_bert(seed: int = 0, n_layer: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, num_hidden_layers=n_layer, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


_TOKENIZERS: dict = {}


def shakespeare_paragraphs(n: int, play: str = "hamlet", min_chars: int = 40) -> list[str]:
    """The first `n` paragraphs of a real play with at least `min_chars` characters."""
    text = _text_bytes(play).decode("utf-8")
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= min_chars][:n]


def tiny_tokenizer(vocab: int = 300):
    """A byte-level BPE trained in-process on one play (no download); pad = eos = `<|endoftext|>` (id 0)."""
    if vocab not in _TOKENIZERS:
        from hf_lwsam.data import train_byte_bpe

        _TOKENIZERS[vocab] = train_byte_bpe(shakespeare_paragraphs(400), vocab)
    return _TOKENIZERS[vocab]


@pytest.fixture
def sgd_args(tmp_path):
    """Arguments for one plain SGD step (lr=1, no momentum, decay, clipping or warmup), sequential batches."""

    def make(**overrides):
        from hf_lwsam import LWSAMConfig

        kwargs = dict(
            output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=0.0, warmup_steps=0, train_sampling_strategy="sequential", report_to="none",
            use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        )
        kwargs.update(overrides)
        return LWSAMConfig(**kwargs)

    return make
