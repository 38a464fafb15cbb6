"""A model whose loss ignores `num_items_in_batch` (a BERT classifier) is trained on its per-batch mean loss, averaged
over gradient-accumulation steps (and processes: tests/test_ddp_loss.py), not multiplied by their number; causal LMs
keep the token average over the window. One process here."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Trainer

from conftest import BYTE_VOCAB, shakespeare_lm_dataset, tiny_bert, tiny_gpt2, tiny_llama, tweet_bytes_dataset
from hf_lwsam import LWSAMTrainer
from hf_lwsam.loss_kwargs import fix_loss_kwargs, forward_uses_num_items_in_batch


def tiny_llama_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0))


def _bert_lora():
    from peft import LoraConfig, TaskType, get_peft_model

    return get_peft_model(tiny_bert(), LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]))


@pytest.mark.parametrize("make, uses", [
    (tiny_bert, False),  # BertForSequenceClassification: CrossEntropyLoss() mean, **kwargs only for attention
    (tiny_llama_classifier, False),  # the generic sequence-classification head: loss_function without **kwargs
    (tiny_gpt2, True),  # self.loss_function(..., **kwargs): ForCausalLMLoss sums and divides by num_items_in_batch
    (tiny_llama, True),
])
def test_which_forward_passes_num_items_in_batch_to_its_loss(make, uses):
    assert forward_uses_num_items_in_batch(make()) is uses


@pytest.mark.parametrize("make, data, accepts", [
    (tiny_bert, lambda: tweet_bytes_dataset(4), False),
    (_bert_lora, lambda: tweet_bytes_dataset(4), False),  # PEFT-wrapped: the base model's forward decides
    (tiny_llama_classifier, lambda: tweet_bytes_dataset(4), False),
    (tiny_gpt2, lambda: shakespeare_lm_dataset(4), True),
    (tiny_llama, lambda: shakespeare_lm_dataset(4), True),
])
def test_the_trainer_passes_num_items_in_batch_only_to_losses_that_use_it(sgd_args, make, data, accepts):
    trainer = LWSAMTrainer(model=make(), args=sgd_args(), train_dataset=data())
    assert trainer.model_accepts_loss_kwargs is accepts


def test_a_trainer_that_computes_its_own_loss_is_left_as_it_is(sgd_args):
    """`compute_loss` overridden (as TRL's trainers do), `compute_loss_func` or label smoothing: the stock flag
    stays."""

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    data = tweet_bytes_dataset(4)
    for trainer in (OwnLoss(model=tiny_bert(), args=sgd_args(), train_dataset=data),
                    Trainer(model=tiny_bert(), args=sgd_args(), train_dataset=data,
                            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss),
                    Trainer(model=tiny_bert(), args=sgd_args(label_smoothing_factor=0.1), train_dataset=data)):
        assert trainer.model_accepts_loss_kwargs and not fix_loss_kwargs(trainer)
    plain = Trainer(model=tiny_bert(), args=sgd_args(), train_dataset=data)  # a stock Trainer can use the fix too
    assert plain.model_accepts_loss_kwargs and fix_loss_kwargs(plain) and not plain.model_accepts_loss_kwargs


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_accumulation_averages_a_classifier_loss_instead_of_summing_it(sgd_args, rho):
    """One SGD step over 4 tweets as 2 micro-batches of 2 equals the step on one batch of 4 with rho=0 (the mean loss's
    gradient); with SAM, each micro-batch's perturbed gradient is weighted 1/2. The logged loss is the window's mean."""
    data = tweet_bytes_dataset(4)
    start = tiny_bert()
    steps = {}
    for accumulation in (1, 2):
        model = copy.deepcopy(start)
        trainer = LWSAMTrainer(model=model, train_dataset=data, args=sgd_args(
            sam_rho=rho, sam_selection="all", gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=4 // accumulation))
        result = trainer.train()
        steps[accumulation] = (result.training_loss, {n: p.detach() for n, p in model.named_parameters()})
    with torch.no_grad():
        mean_loss = start(**{k: torch.tensor(v) for k, v in data[:4].items()}).loss.item()
    assert steps[2][0] == pytest.approx(mean_loss, rel=1e-5)  # the stock Trainer logs twice the mean here
    assert steps[1][0] == pytest.approx(mean_loss, rel=1e-5)
    if rho == 0.0:
        for name, p in steps[1][1].items():
            torch.testing.assert_close(steps[2][1][name], p, rtol=1e-5, atol=1e-6)
    else:  # the accumulated SAM step by hand: the mean of the micro-batches' perturbed-gradient steps
        from test_update_math import _batches, _rel, reference_update

        begin = {n: p.detach().clone() for n, p in start.named_parameters()}
        expected = reference_update(copy.deepcopy(start), _batches(data), None, rho, causal=False,
                                    divided_by_accumulation=True)
        assert _rel(steps[2][1], expected, begin) <= 1e-5
