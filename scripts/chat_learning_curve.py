#!/usr/bin/env python
"""Sizing the SmolLM2 accuracy study (`benchmark_accuracy.py --suite chat`): what a run costs, which cost reductions
keep its scores, and how many steps AdamW needs before its validation score stops improving.

Every run here is the study's own recipe (`study_tasks._chat_recipe` on `chat-noise40`: SmolLM2-135M-Instruct,
LoRA r=16 on every linear layer, 40% noisy training labels, batch 8, linear decay over the run), scored on the study's
validation tweets by answer accuracy and answer NLL (`study_tasks.answer_scores`), with the forgetting NLL at the end.

  --measure_cost   seconds per optimizer step of each variant (float32 / CPU bf16 autocast, padded / padding-free
                   batches, LoRA / every weight), interleaved; seconds to score the validation prompts in float32 and
                   bf16, and their scores; the prompt's tokens with the task's system turn, with the chat template's
                   default one and with the instruction in the user turn; the loss of the same chats padded and
                   padding-free (they must match). Writes `<out>/chat_sizing_cost.json`.
  --padding_free_check   only the last check, added to an existing `<out>/chat_sizing_cost.json`.
  (default)        one AdamW run of `--steps` steps scored every `--every` steps (and before the first):
                   `<out>/chat_learning_curve_<method>[_bf16][_padding_free].json`.

    python scripts/chat_learning_curve.py --measure_cost --threads 1
    python scripts/chat_learning_curve.py --steps 64 --every 32 --threads 1            # the float32 run of 64 steps
    python scripts/chat_learning_curve.py --steps 64 --every 32 --bf16 --threads 1     # the same in bf16
    python scripts/chat_learning_curve.py --steps 192 --every 32 --bf16 --threads 1    # the curve
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the study's modules, beside this file
from step_timer import StepTimer  # noqa: E402
from study_harness import MACHINE, make_trainer, quiet  # noqa: E402
from study_tasks import TASKS, Budget, answer_scores, chat_splits, run_config  # noqa: E402

METHODS = {"adamw": None, "full SAM": dict(sam_preset="exact"), "free preset": dict(sam_preset="free")}
TASK = "chat-noise40"


class Curve(TrainerCallback):
    """Scores the validation chats every `every` optimizer steps (and before the first); with `partial`, the points so
    far are written there after each one (`"partial": true`), so a run stopped midway keeps its curve."""

    def __init__(self, score, every: int, partial: Path | None = None, about: dict | None = None):
        self.score_fn, self.every, self.points, self.partial, self.about = score, every, [], partial, about or {}

    def score(self, model, step: int) -> None:
        start = time.perf_counter()
        point = dict(step=step, **self.score_fn(model), score_s=time.perf_counter() - start)
        self.points.append(point)
        if self.partial is not None:
            self.partial.write_text(json.dumps(dict(self.about, partial=True, curve=self.points), indent=1))
        print(f"step {step:4d}: validation answer accuracy {point['accuracy']:.3f}, answer NLL "
              f"{point['answer_nll']:.3f}, most frequent answer {point['top_answer_share']:.2f}", flush=True)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.score(model, state.global_step)


def trainer_for(hp: dict, chats, seed: int, out: Path, max_steps: int, sam: dict | None = None, rho: float = 0.05,
                callbacks: list | None = None):
    """The study's chat recipe (`TASKS[TASK].recipe`) as a trainer of `max_steps` steps, and the recipe."""
    task = TASKS[TASK]
    recipe = task.recipe(task, hp, chats, seed)
    args = dict(output_dir=str(out / "tmp"), report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_strategy="no", seed=seed, data_seed=seed, weight_decay=0.0,
                per_device_train_batch_size=hp["batch"], learning_rate=hp["lr"], max_steps=max_steps, **recipe.args)
    trainer = quiet(make_trainer(args, sam, rho, sft=True, model=recipe.model, train_dataset=recipe.train,
                                 callbacks=callbacks or [], **recipe.trainer_kwargs))
    return trainer, recipe


def scorer(tokenizer, chats, bf16: bool):
    def score(model) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = answer_scores(model, tokenizer, chats)
        from hf_lwsam.cli.sft_offline import answer_log_probs

        # the most likely answer of each of the first 64 chats (index into TWEET_LABELS)
        guess = answer_log_probs(model, tokenizer, chats.select(range(min(len(chats), 64)))).argmax(-1).tolist()
        return dict(scores, top_answer_share=Counter(guess).most_common(1)[0][1] / len(guess))
    return score


def padding_free_check(budget: Budget, chats, out: Path, n: int = 8) -> dict[str, float]:
    """The untrained model's loss on the first `n` training chats (as the trainer tokenized them), collated padded
    and padding-free (one packed row, `position_ids` restarting at each chat): equal if the packed attention keeps
    every chat to itself."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    hp = run_config(TASK, replace(budget, chat_padding_free=True, chat_bf16=False))
    trainer, _ = trainer_for(hp, chats, 0, out, 1)
    examples = [trainer.train_dataset[i] for i in range(n)]
    losses = {}
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(trainer.processing_class.pad_token_id, padding_free=padding_free)(
            examples)
        keep = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}
        with torch.no_grad():
            losses["padding-free" if padding_free else "padded"] = trainer.model(**keep).loss.item()
    return losses


def measure_cost(a, budget: Budget, out: Path) -> dict:
    """Seconds per optimizer step of each variant (one warm-up step, then `a.timed_steps`, interleaved over
    `a.rounds` rounds), scoring seconds, prompt lengths and the padding-free loss check."""
    from transformers import AutoTokenizer

    from hf_lwsam.data import SENTIMENT_SYSTEM_PROMPT, smollm2_path

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    chats = chat_splits(TASK, budget)
    variants = {"float32 padded": (False, False, False), "bf16 padded": (True, False, False),
                "float32 padding-free": (False, True, False), "bf16 padding-free": (True, True, False),
                "full float32 padded": (False, False, True), "full bf16 padded": (True, False, True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, (bf16, padding_free, full) in variants.items():
            b = replace(budget, chat_bf16=bf16, chat_padding_free=padding_free)
            hp = run_config(f"{TASK}-full" if full else TASK, b)
            timer = StepTimer("cpu")
            trainer, _ = trainer_for(hp, chats, 0, out, 1 + a.timed_steps, callbacks=[timer])
            trainer.train()
            times[name] += timer.times[1:]
            print(f"{name}: {statistics.mean(timer.times[1:]):.2f} s a step", flush=True)
    # scoring: the validation prompts in float32 and bf16, the same untrained model
    hp = run_config(TASK, budget)
    trainer, _ = trainer_for(hp, chats, 0, out, 1)
    scoring = {}
    for bf16 in (False, True):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            scores = answer_scores(trainer.model, tokenizer, chats["validation"])
        scoring["bf16" if bf16 else "float32"] = dict(scores, seconds=time.perf_counter() - start,
                                                      prompts=len(chats["validation"]))
    sample = chats["train"].select(range(min(64, len(chats["train"]))))
    tokens = lambda msgs: len(tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False),  # noqa: E731
                                        add_special_tokens=False)["input_ids"])
    own = [tokens(c["prompt"] + c["completion"]) for c in sample]
    default = [tokens(c["prompt"][1:] + c["completion"]) for c in sample]  # no system turn: the template's own
    bare_instruction = [tokens([dict(role="user", content=SENTIMENT_SYSTEM_PROMPT + "\n" + c["prompt"][1]["content"])]
                               + c["completion"]) for c in sample]
    padded = [8 * max(own[i : i + 8]) for i in range(0, len(own), 8)]
    return dict(machine=MACHINE, threads=torch.get_num_threads(), rounds=a.rounds, timed_steps=a.timed_steps,
                step_s={name: statistics.mean(t) for name, t in times.items()},
                step_s_all=times, padding_free_loss=padding_free_check(budget, chats, out), scoring=scoring,
                tokens_per_chat=dict(task_system_turn=statistics.mean(own), template_default_system=statistics.mean(
                    default), instruction_in_user_turn=statistics.mean(bare_instruction)),
                padding_share=1 - sum(own) / sum(padded))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure_cost", action="store_true", help="time the variants (see above) instead of a curve")
    p.add_argument("--padding_free_check", action="store_true", help="only the padding-free loss check (see above)")
    p.add_argument("--method", choices=list(METHODS), default="adamw")
    p.add_argument("--steps", type=int, default=64, help="optimizer steps of 8 chats (one epoch over steps x 8)")
    p.add_argument("--every", type=int, default=32, help="score the validation chats every this many steps")
    p.add_argument("--lr", type=float, default=None, help="default: the task's fixed learning rate")
    p.add_argument("--bf16", action="store_true", help="CPU bf16 autocast for training and scoring")
    p.add_argument("--padding_free", action="store_true", help="TRL's padding-free batches")
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2, help="--measure_cost: interleaved rounds")
    p.add_argument("--timed_steps", type=int, default=3, help="--measure_cost: timed steps a variant and round")
    p.add_argument("--quick", action="store_true", help="the study's smoke sizes (tests)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/accuracy")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TASKS[TASK].budget(a.quick)
    if a.padding_free_check:
        path = out / "chat_sizing_cost.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        result.pop("first_batch_loss", None)  # an earlier check's: the first batches of two runs, not the same chats
        result["padding_free_loss"] = padding_free_check(base, chat_splits(TASK, base), out)
    elif a.measure_cost:
        result = measure_cost(a, base, out)
        path = out / "chat_sizing_cost.json"
    else:
        budget = replace(base, chat_train=8 * a.steps, chat_bf16=a.bf16, chat_padding_free=a.padding_free)
        chats = chat_splits(TASK, budget)
        hp = run_config(TASK, budget, a.lr)
        from transformers import AutoTokenizer

        from hf_lwsam.data import smollm2_path

        suffix = "_bf16" * a.bf16 + "_padding_free" * a.padding_free + f"_{a.steps}"
        path = out / f"chat_learning_curve_{a.method.replace(' ', '_')}{suffix}.json"
        about = dict(method=a.method, rho=a.rho if METHODS[a.method] else None, seed=a.seed, steps=a.steps, config=hp,
                     machine=MACHINE)
        curve = Curve(scorer(AutoTokenizer.from_pretrained(smollm2_path()), chats["validation"], a.bf16), a.every,
                      partial=path, about=about)
        trainer, recipe = trainer_for(hp, chats, a.seed, out, a.steps, METHODS[a.method], a.rho, [curve])
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        scoring = sum(point["score_s"] for point in curve.points)
        result = dict(about, threads=torch.get_num_threads(), train_s=wall - scoring,
                      scoring_s=scoring, validation_label_shares={k: v / len(chats["validation"]) for k, v in sorted(
                          Counter(chats["validation"]["label"]).items())},
                      curve=curve.points, **recipe.after(trainer))
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
