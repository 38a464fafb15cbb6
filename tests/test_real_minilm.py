"""A short real run: the shipped pretrained MiniLM fine-tuned on the shipped tweets with layer-wise SAM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_lwsam import LWSAMConfig, LWSAMTrainer
from hf_lwsam.data import load_tweets, minilm_path

SAM_KEYS = ("sam/loss_perturbed", "sam/sharpness", "sam/grad_norm_selected", "sam/num_perturbed_layers", "sam/skipped")


@pytest.mark.slow  # 2 epochs of the real MiniLM (the README usage test covers it in the default suite)
def test_minilm_on_tweets_lowers_loss_and_logs_sam_metrics(tmp_path):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    tweets = load_tweets(max_train_samples=384)
    tokenize = lambda batch: tokenizer(batch["text"], truncation=True, max_length=32)  # noqa: E731
    train = tweets["train"].map(tokenize, batched=True, remove_columns=["text"])
    held_out = tweets["validation"].select(range(128)).map(tokenize, batched=True, remove_columns=["text"])
    args = LWSAMConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=32, per_device_eval_batch_size=64, num_train_epochs=2,
        learning_rate=1e-4, warmup_steps=2, logging_steps=4, report_to="none", use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, sam_rho=0.05,
    )
    trainer = LWSAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                           data_collator=DataCollatorWithPadding(tokenizer))
    assert trainer.perturbed_parameter_names()[-1] == "classifier.bias"
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)

    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) >= 4 and all(key in log for log in train_logs for key in SAM_KEYS)
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    assert all(log["sam/skipped"] == 0 and log["sam/grad_norm_selected"] > 0 for log in train_logs)
    assert train_logs[0]["sam/num_perturbed_layers"] == 10  # last encoder block (8) + pooler + classifier
    # The perturbed loss is the loss at w + e: on average above the clean loss (positive sharpness).
    assert sum(log["sam/sharpness"] for log in train_logs) > 0
