#!/usr/bin/env python
"""How many LoRA steps does SmolLM2-135M-Instruct need to learn the chat task? (sizing the SmolLM2 accuracy study)

A LoRA SFT of the shipped SmolLM2-135M-Instruct on tweet sentiment as a chat (`hf-lwsam-sft`'s offline task and the
accuracy study's `chat` tasks: r=16 on every linear layer, learning rate 2e-3, batch 8, linear decay over the run),
scored every `--every` optimizer steps on held-out tweets: the accuracy of the most likely answer, and the share of
the most frequent predicted answer (1.0: the model answers one label whatever the tweet, i.e. it learned only the
label prior). Writes `<out>/chat_learning_curve_<method>.json`.

    python scripts/chat_learning_curve.py --steps 64 --every 16     # AdamW, about 15 min on one CPU core
    python scripts/chat_learning_curve.py --method "LW-SAM default"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback, set_seed  # noqa: E402

from hf_lwsam.cli.sft_offline import answer_predictions  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's chat recipe, beside this file
from study_tasks import CHAT_LORA, LEARNING_RATE  # noqa: E402

METHODS = {"adamw": None, "full SAM": dict(sam_selection="all"), "LW-SAM default": dict(sam_selection="pattern")}


class Curve(TrainerCallback):
    """Scores the held-out chats every `every` optimizer steps (and before the first)."""

    def __init__(self, tokenizer, chats, every: int):
        self.tokenizer, self.chats, self.every, self.points = tokenizer, chats, every, []

    def score(self, model, step: int) -> None:
        guess = answer_predictions(model, self.tokenizer, self.chats)
        accuracy = sum(g == y for g, y in zip(guess, self.chats["label"])) / len(guess)
        majority = Counter(guess).most_common(1)[0][1] / len(guess)
        self.points.append(dict(step=step, accuracy=accuracy, top_answer_share=majority))
        print(f"step {step:4d}: answer accuracy {accuracy:.3f}, most frequent answer {majority:.2f}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.score(model, state.global_step)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=list(METHODS), default="adamw")
    p.add_argument("--steps", type=int, default=64, help="optimizer steps of 8 chats (one epoch over steps x 8)")
    p.add_argument("--every", type=int, default=16, help="score the held-out chats every this many steps")
    p.add_argument("--held_out", type=int, default=200, help="held-out tweets scored")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/accuracy")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import trl
    from peft import LoraConfig

    from hf_lwsam.data import load_tweets, smollm2_path, tweet_sentiment_chats
    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer

    tweets = load_tweets(seed=42, validation_size=a.held_out, test_size=a.held_out, max_train_samples=8 * a.steps)
    train, held_out = tweet_sentiment_chats(tweets["train"]).remove_columns("label"), tweet_sentiment_chats(
        tweets["test"])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    common = dict(output_dir=str(Path(a.out) / "tmp"), report_to="none", save_strategy="no", use_cpu=True,
                  disable_tqdm=True, logging_strategy="no", seed=a.seed, data_seed=a.seed, weight_decay=0.0,
                  bf16=False, per_device_train_batch_size=8, learning_rate=LEARNING_RATE["chat"], max_steps=a.steps,
                  warmup_steps=2, max_length=128, activation_checkpointing=False)
    sam = METHODS[a.method]
    trainer_cls, args = ((trl.SFTTrainer, trl.SFTConfig(**common)) if sam is None else
                         (SFTLWSAMTrainer, SFTLWSAMConfig(**common, sam_rho=a.rho, **sam)))
    curve = Curve(tokenizer, held_out, a.every)
    trainer = trainer_cls(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          peft_config=LoraConfig(**CHAT_LORA), callbacks=[curve])
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    result = dict(method=a.method, rho=a.rho if sam else None, seed=a.seed, steps=a.steps, batch=8,
                  train_tweets=len(train), held_out=a.held_out, held_out_label_shares={
                      k: v / a.held_out for k, v in sorted(Counter(held_out["label"]).items())},
                  wall_s=time.perf_counter() - start, curve=curve.points)
    path = Path(a.out) / f"chat_learning_curve_{a.method.replace(' ', '_')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
