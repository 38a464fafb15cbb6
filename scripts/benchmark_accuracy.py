"""Does layer-wise SAM match full SAM's accuracy at near-plain cost? Measured on the real offline data.

Methods (same budget and hyperparameters otherwise): plain AdamW; full SAM (`sam_selection="all"`); layer-wise SAM
with the output-side default pattern; layer-wise SAM with probe selection (k = 2); with `--asam`, the ASAM variants of
the two fixed SAM modes; with `--probe_no_embeddings`, the probe with the embeddings left out of its candidates; with
`--schedules`, the default pattern with a stale ascent (`sam_ascent="stale"`) and with SAM every 4th step.
Each run trains once and is evaluated on a validation split (seed 0: the rho sweep) and a separate test split. rho is
chosen per method on validation, then every method is trained with `--seeds` and reported on test.

Tasks:
  cls-full  the shipped pretrained MiniLM fine-tuned on the shipped tweets (3-class sentiment): accuracy, macro-F1
  cls-lora  the same under PEFT LoRA (r=8 on query/value; the classifier head trained)
  lm        a small GPT-2 pretrained from scratch on most Shakespeare plays (cached), fine-tuned on a held-out group
            of plays; perplexity on a further held-out play
  chat, chat-small, chat-noise40 (`--tasks`, not in the default run)
            the shipped pretrained SmolLM2-135M-Instruct, LoRA SFT (TRL's SFTTrainer, r=16 on every linear layer)
            on tweet sentiment as a chat in its chat template (`hf-lwsam-sft`'s offline task): 512 clean training
            tweets, 1 epoch; 128 clean tweets, 4 epochs; 512 tweets with 40% noisy labels, 1 epoch (64 steps of 8
            each: AdamW answers mostly one label up to ~24 steps). Metric: accuracy of the most likely answer among
            negative/neutral/positive on held-out tweets. Sized for a GPU (used when present): ~7 h on one CPU core

With `--probe_modes`, the probe also at block granularity (`sam_probe_granularity="block"`), ranked by gradient norm
and by gradient norm per unit of recompute cost (`sam_probe_metric="grad_norm_per_cost"`).

`--suite robustness`: the regimes where the literature reports SAM's largest gains. Methods (`robust_methods`, a
table): AdamW, full SAM, LW-SAM default, LW-SAM probe, the stale ascent and SAM every 4th step (these two take LW-SAM
default's rho), LW-SAM over the output half of the trunk (how deep the perturbation must reach); SAM over one part of
the model at a time (`LOCATIONS`: embeddings, input half, output half, normalization layers, attention, MLP, head:
where full SAM's gain comes from); the cheap modes on every parameter (LookSAM k=5, SAM in the last 30%, random
perturbation) and on the normalization layers (stale, last 30%, LookSAM k=5), each schedule with the rho of the method
whose layers it perturbs. Each comparison: the mean paired difference against AdamW with its 95% t interval, and the
share of full SAM's gain kept with a paired bootstrap interval (`scripts/study_stats.py`); `<report>_pareto.png`
plots the gain against throughput ÷ AdamW. AdamW's
learning rate is chosen on validation from a small grid, rho per method; both by the final validation accuracy of
seed 0. Each run trains several epochs, validates every epoch, and is tested at the end and at its best validation
epoch (early stopping). Label noise is symmetric (a fixed random share of the training examples gets one of the
other classes, uniformly) and in the training split only.
  tweets-noise20/40  MiniLM fine-tuned on 500 tweets with 20% / 40% noisy labels, 4 epochs
  tweets-small       MiniLM fine-tuned on 250 clean tweets, 8 epochs
  digits[-noise20/40] a 4-block ViT trained from scratch on scikit-learn's 8x8 digits (997 train / 300 / 500), 30 epochs
`--measure_cost` adds each method's throughput ÷ AdamW on the task, measured side by side (run it on an idle machine).

Every finished run is cached as JSON under `<out>/runs/` (with the configuration it was made with; a run made with
another configuration is redone) and skipped when the script runs again (resumable).
Outputs: `<out>/runs/*.json`, `<out>/<report>.md` (table), `<out>/<report>.png` (metric vs relative cost).
The tasks (budgets, splits, models, each run's configuration) are in `scripts/study_tasks.py`; the run cache
and the trainer of a method, shared with `gradnorm_study.py`, in `scripts/study_harness.py`.

    python scripts/benchmark_accuracy.py            # the default run (79 min measured on 2 CPU cores, +3 to pretrain)
    python scripts/benchmark_accuracy.py --quick    # about 3 minutes: tiny budgets, 2 seeds, one rho
    python scripts/benchmark_accuracy.py --suite robustness --tasks digits-noise40 tweets-noise40 --measure_cost
    python scripts/benchmark_accuracy.py --tasks chat-noise40 chat-small chat --rhos 0.05 --threads 1 \
        --report accuracy_smollm2   # 36 runs: minutes on a GPU, about 7 h on one CPU core
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_lwsam.cli.metrics import classification_metrics  # noqa: E402
from hf_lwsam.data import smollm2_path  # noqa: E402
from hf_lwsam.step_timer import StepTimer  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study modules beside this file, also when
from study_harness import MACHINE, cached, make_trainer, mean_std, quiet  # noqa: E402  # loaded by path (the tests)
from study_stats import gain_fraction, paired_difference  # noqa: E402
from study_tasks import QUICK, QUICK_ROBUST, ROBUST_LR_GRID, ROBUST_TASKS, Budget, RobustBudget  # noqa: E402
from study_tasks import CHAT_LORA, CHAT_TASKS, LEARNING_RATE, chat_splits, cls_model, lm_assets  # noqa: E402
from study_tasks import robust_data, run_config, tiny_vit, tweet_splits  # noqa: E402


@dataclass
class Method:
    name: str
    sam: dict | None  # None: plain AdamW through the stock Trainer
    rho_from: str | None = None  # robustness suite: take this method's chosen rho instead of sweeping its own


EMBEDDINGS = r".*(embeddings|wte|wpe)"  # BERT's embedding block, GPT-2's token and position embeddings


def all_methods(asam: bool = False, probe_no_embeddings: bool = False, schedules: bool = False,
                probe_modes: bool = False) -> list[Method]:
    out = [
        Method("adamw", None),
        Method("full SAM", dict(sam_selection="all")),
        Method("LW-SAM default", dict(sam_selection="pattern")),
        Method("LW-SAM probe k=2", dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25,
                                        sam_probe_granularity="layer")),
    ]
    if asam:
        out += [
            Method("full ASAM", dict(sam_selection="all", sam_adaptive=True)),
            Method("LW-ASAM default", dict(sam_selection="pattern", sam_adaptive=True)),
        ]
    if probe_no_embeddings:  # the probe without the embeddings as candidates: their summed gradients rank them high
        out.append(Method("LW-SAM probe k=2 no-emb", dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25,
                                                          sam_exclude_layers=EMBEDDINGS,
                                                          sam_probe_granularity="layer")))
    if probe_modes:  # the probe's candidates at block granularity, ranked by gradient norm or per unit of cost
        out += [Method(f"LW-SAM probe k=2 block{'/cost' if metric.endswith('cost') else ''}",
                       dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25, sam_probe_granularity="block",
                            sam_probe_metric=metric)) for metric in ("grad_norm", "grad_norm_per_cost")]
    if schedules:  # the ascent schedules on the default pattern: a stale ascent (one pass), and SAM every 4th step
        out += [Method("LW-SAM stale", dict(sam_selection="pattern", sam_ascent="stale")),
                Method("LW-SAM interval=4", dict(sam_selection="pattern", sam_interval=4))]
    return out


# The probe mode the robustness suite runs: the options spelled out, so that the cache notices a changed default.
PROBE = dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25, sam_probe_granularity="block",
             sam_probe_metric="grad_norm_per_cost")


# How deep must the perturbation reach? The output half of the trunk (ViT: blocks 2-3 of 4; MiniLM: 3-5 of 6) + head.
LAST_HALF = {"digits": r"vit\.layers\.[23]|vit\.layernorm|classifier",
             "tweets": r"bert\.encoder\.layer\.[345]|bert\.pooler\.dense|classifier"}

# Where does full SAM's gain come from? SAM over one part of the model at a time (issue 23), as sam_target_layers.
LOCATIONS = {
    "digits": {"embeddings": r"vit\.embeddings", "input half": r"vit\.layers\.[01]",
               "output half": r"vit\.layers\.[23]", "norms": r".*layernorm.*",
               "attention": r"vit\.layers\.\d+\.attention", "mlp": r"vit\.layers\.\d+\.mlp", "head": r"classifier"},
    "tweets": {"embeddings": r"bert\.embeddings", "input half": r"bert\.encoder\.layer\.[012]",
               "output half": r"bert\.encoder\.layer\.[345]", "norms": r".*LayerNorm",
               "attention": r"bert\.encoder\.layer\.\d+\.attention",
               "mlp": r"bert\.encoder\.layer\.\d+\.(intermediate|output)", "head": r"bert\.pooler\.dense|classifier"},
}


def robust_methods(family: str) -> list[Method]:
    """The robustness suite's methods, as a table: name, `sam_*` options, and (for a schedule over another method's
    layers and e_S) the method whose chosen rho it takes."""
    pattern, full = dict(sam_selection="pattern"), dict(sam_selection="all")
    norms = dict(sam_selection="pattern", sam_target_layers=LOCATIONS[family]["norms"])
    return [Method("adamw", None), Method("full SAM", full),
            Method("LW-SAM default", pattern), Method("LW-SAM probe", PROBE),
            Method("LW-SAM stale", dict(pattern, sam_ascent="stale"), "LW-SAM default"),
            Method("LW-SAM interval=4", dict(pattern, sam_interval=4), "LW-SAM default"),
            Method("LW-SAM last half", dict(pattern, sam_target_layers=LAST_HALF[family])),
            *[Method(f"SAM on {where}", dict(pattern, sam_target_layers=regex))
              for where, regex in LOCATIONS[family].items()],
            # The cheap modes: on every parameter, and on the normalization layers (SAM-ON's selection).
            Method("full LookSAM k=5", dict(full, sam_interval=5, sam_interval_reuse="looksam"), "full SAM"),
            *[Method(f"full SAM late {start:.0%}", dict(full, sam_start=start), "full SAM")
              for start in (0.7, 0.8, 0.9, 0.95)],  # SAM over the last 30% / 20% / 10% / 5% of the run
            Method("full random", dict(full, sam_ascent="random")),
            Method("norms stale", dict(norms, sam_ascent="stale"), "SAM on norms"),
            Method("norms late 70%", dict(norms, sam_start=0.7), "SAM on norms"),
            Method("norms LookSAM k=5", dict(norms, sam_interval=5, sam_interval_reuse="looksam"), "SAM on norms")]


class BestValidation(TrainerCallback):
    """Keeps the per-epoch validation accuracy and a copy of the weights at its best epoch (for the test at the best
    validation epoch: early stopping, the usual defence against fitting noisy labels)."""

    def __init__(self):
        self.curve: list[float] = []
        self.best, self.best_epoch, self.weights = -1.0, 0.0, None
        self.active = True

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.active:
            return
        self.curve.append(metrics["eval_accuracy"])
        if metrics["eval_accuracy"] > self.best:
            self.best, self.best_epoch = metrics["eval_accuracy"], state.epoch
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------ runs
def _metrics(task: str, metrics: dict) -> dict:
    if task != "lm":
        return dict(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    return dict(perplexity=math.exp(metrics["eval_loss"]))


def train_and_eval_chat(task: str, method: Method, rho: float, seed: int, budget: Budget, ctx: dict) -> dict:
    """A LoRA SFT of SmolLM2 on the chat task (TRL's `SFTTrainer`, or `SFTLWSAMTrainer`), then the answer accuracy
    on the test split and, for seed 0, the validation split."""
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from hf_lwsam.cli.sft_offline import answer_accuracy
    from hf_lwsam.trl import SFTLWSAMConfig, SFTLWSAMTrainer

    hp, chats = run_config(task, budget), ctx[task]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    set_seed(seed)  # the LoRA initialisation depends on the seed
    model = AutoModelForCausalLM.from_pretrained(smollm2_path())
    common = dict(output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no",
                  use_cpu=not torch.cuda.is_available(),  # the only task sized for a GPU (see `Budget`)
                  disable_tqdm=True, logging_strategy="no", seed=seed, data_seed=seed, weight_decay=0.0, bf16=False,
                  per_device_train_batch_size=hp["batch"], learning_rate=hp["lr"], num_train_epochs=hp["epochs"],
                  warmup_steps=hp["warmup_steps"], max_length=hp["max_length"], activation_checkpointing=False)
    if method.sam is None:
        trainer_cls, args = trl.SFTTrainer, trl.SFTConfig(**common)
    else:
        trainer_cls, args = SFTLWSAMTrainer, SFTLWSAMConfig(**common, sam_rho=rho, **method.sam)
    trainer = trainer_cls(model=model, args=args, train_dataset=chats["train"].remove_columns("label"),
                          processing_class=tokenizer, peft_config=LoraConfig(**CHAT_LORA))
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * hp["epochs"]
    return timed_run(trainer, task, method, rho, seed, tokens, hp,
                     lambda split: dict(accuracy=answer_accuracy(trainer.model, tokenizer, chats[split])),
                     validate=ctx.get("validate", True))


def timed_run(trainer, task: str, method: Method, rho: float, seed: int, tokens: int, hp: dict, evaluate,
              validate: bool = True) -> dict:
    """Train `trainer` (quietly), timed; the run's record with `evaluate(split)` on the test split and, for seed 0
    with `validate` (a rho sweep), the validation split."""
    quiet(trainer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    splits = ("validation", "test") if seed == 0 and validate else ("test",)
    return dict(task=task, method=method.name, rho=rho, seed=seed, wall_s=wall, tokens_per_s=tokens / wall,
                perturbed=trainer.perturbed_parameter_names() if method.sam else [], config=hp,
                **{split: evaluate(split) for split in splits})


def train_and_eval(task: str, method: Method, rho: float, seed: int, budget: Budget, ctx: dict) -> dict:
    """Train once, then evaluate on the test split (the report) and, for seed 0, the validation split (rho sweep)."""
    if task in CHAT_TASKS:
        return train_and_eval_chat(task, method, rho, seed, budget, ctx)
    hp = run_config(task, budget)
    common = dict(output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no", use_cpu=True,
                  disable_tqdm=True, logging_strategy="no", seed=seed, data_seed=seed, weight_decay=0.0,
                  per_device_train_batch_size=hp["batch"], learning_rate=hp["lr"])
    if task.startswith("cls"):
        data, tokenizer = ctx["tweets"]
        model = cls_model(lora=task == "cls-lora", seed=seed)
        common.update(per_device_eval_batch_size=128, num_train_epochs=hp["epochs"],
                      warmup_steps=hp["warmup_ratio"])  # a float in [0, 1): a ratio of the total steps
        collator, compute_metrics = DataCollatorWithPadding(tokenizer), classification_metrics()[0]
        tokens = sum(len(ids) for ids in data["train"]["input_ids"]) * hp["epochs"]
    else:
        ckpt, data = ctx["lm"]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
        set_seed(seed)
        model = GPT2LMHeadModel.from_pretrained(ckpt)
        model.loss_type = "ForCausalLM"
        common.update(per_device_eval_batch_size=32, max_steps=hp["steps"], warmup_steps=hp["warmup_steps"])
        collator, compute_metrics = DataCollatorForLanguageModeling(tokenizer, mlm=False), None
        tokens = hp["steps"] * hp["batch"] * hp["block"]
    trainer = make_trainer(common, method.sam, rho, model=model, train_dataset=data["train"], data_collator=collator,
                           compute_metrics=compute_metrics)
    return timed_run(trainer, task, method, rho, seed, tokens, hp,
                     lambda split: _metrics(task, trainer.evaluate(data[split])), validate=ctx.get("validate", True))


def train_and_eval_robust(task: str, method: Method, rho: float, seed: int, rb: RobustBudget, ctx: dict,
                          lr: float) -> dict:
    """Train for several epochs, validating every epoch; test at the end and at the best validation epoch."""
    hp = run_config(task, rb, lr)
    data, collator = ctx[task]
    model = tiny_vit(seed) if task.startswith("digits") else cls_model(lora=False, seed=seed)
    common = dict(output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no", use_cpu=True,
                  disable_tqdm=True, logging_strategy="epoch", eval_strategy="epoch", seed=seed, data_seed=seed,
                  weight_decay=0.0, per_device_train_batch_size=hp["batch"], per_device_eval_batch_size=128,
                  learning_rate=lr, num_train_epochs=hp["epochs"], warmup_steps=hp["warmup_ratio"])
    best = BestValidation()
    trainer = quiet(make_trainer(common, method.sam, rho, model=model, train_dataset=data["train"],
                                 eval_dataset=data["validation"], data_collator=collator,
                                 compute_metrics=classification_metrics()[0], callbacks=[best]))
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    best.active = False
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    test_end = _metrics("cls", trainer.evaluate(data["test"]))
    trainer.model.load_state_dict(best.weights)
    test_best = _metrics("cls", trainer.evaluate(data["test"]))
    return dict(task=task, method=method.name, rho=rho, seed=seed, wall_s=wall, config=hp,
                perturbed=trainer.perturbed_parameter_names() if method.sam else [],
                validation=dict(accuracy=best.curve[-1]), validation_curve=best.curve, train_loss_curve=losses,
                best_epoch=best.best_epoch, test=test_end, test_at_best_validation=test_best)


def cached_run(task: str, method: Method, rho: float, seed: int, budget: Budget | RobustBudget, ctx: dict,
               lr: float | None = None) -> dict:
    """`train_and_eval` (or `train_and_eval_robust`), cached as `<out>/runs/<key>.json` with its configuration; a
    cached run made with another configuration is redone. `None` for a run not cached with `--report_only`."""
    key = f"{task}__{method.name.replace(' ', '_').replace('=', '').replace('/', '-')}__rho{rho}__seed{seed}"
    if lr is not None and task in ROBUST_TASKS and method.sam is None:
        key += f"__lr{lr}"  # the robustness suite's AdamW learning-rate sweep
    config = run_config(task, budget, lr) if task in ROBUST_TASKS else run_config(task, budget)
    if method.sam is not None and task in ROBUST_TASKS:
        config = dict(config, sam=method.sam)  # the method's options: a changed probe mode redoes the run

    def make() -> dict | None:
        if ctx.get("report_only"):
            ctx["log"](f"{key}: no cached run (--report_only: left out)")
            return None
        ctx["log"](f"run {key}")
        if task in ROBUST_TASKS:
            result = train_and_eval_robust(task, method, rho, seed, budget, ctx, lr)
        else:
            result = train_and_eval(task, method, rho, seed, budget, ctx)
        val = f"validation {_metric_str(result['validation'])}, " if "validation" in result else ""
        best = ""
        if "best_epoch" in result:
            best = f", at the best validation epoch ({result['best_epoch']:.0f}) "
            best += _metric_str(result["test_at_best_validation"])
        ctx["log"](f"     -> {val}test {_metric_str(result['test'])}{best}, {result['wall_s']:.0f} s")
        return result

    return cached(ctx["out"] / "runs" / f"{key}.json", config, make, ctx["log"])


def _metric_name(task: str) -> str:
    return "perplexity" if task == "lm" else "accuracy"


def _metric_str(r: dict) -> str:
    if "perplexity" in r:
        return f"perplexity {r['perplexity']:.2f}"
    return f"acc {r['accuracy']:.4f}" + (f" F1 {r['f1']:.4f}" if "f1" in r else "")


# --------------------------------------------------------------------------------------------------- report
def share_of_gain(base: dict[int, dict], full: dict[int, dict], runs: list[dict], read):
    """The share of full SAM's gain `runs` keep (`study_stats.gain_fraction`) over the seeds they and full SAM both
    ran; `read(run)` is the metric; `None` without such seeds."""
    both = [r for r in runs if r["seed"] in full]
    if not both:
        return None
    return gain_fraction([read(base[r["seed"]]) for r in both], [read(full[r["seed"]]) for r in both],
                         [read(r) for r in both])


def summarise(task: str, finals: dict[str, list[dict]], chosen: dict[str, float],
              costs: dict[str, float] | None = None, wall_ratios: bool = True) -> tuple[list[str], list[dict]]:
    """Test metric per method; throughput ÷ AdamW from `costs` (measured side by side) when given, else from the
    runs' wall times (`wall_ratios`; otherwise 'not measured': runs that shared the cores)."""
    metric = _metric_name(task)
    base = {r["seed"]: r for r in finals["adamw"]}
    full = {r["seed"]: r for r in finals.get("full SAM", [])}
    lines, points = [], []
    for name, runs in finals.items():
        vals = [r["test"][metric] for r in runs]
        thr = [r["tokens_per_s"] / base[r["seed"]]["tokens_per_s"] for r in runs] if wall_ratios else []
        if name == "adamw":
            thr = [1.0]
        elif costs and name in costs:
            thr = [costs[name]]
        rel_cost = [1 / t for t in thr]  # wall time ÷ AdamW's
        adamw = [base[r["seed"]]["test"][metric] for r in runs]
        diff = paired_difference(adamw, vals)
        wins = sum(v < b if task == "lm" else v > b for b, v in zip(adamw, vals))
        f1 = mean_std([r["test"]["f1"] for r in runs]) if task.startswith("cls") else "-"
        scale = 1 if task == "lm" else 100  # perplexity; accuracy in points
        paired = "-" if name == "adamw" else f"{diff.format(scale)} ({wins}/{len(runs)} better)"
        share = None if name in ("adamw", "full SAM") else share_of_gain(base, full, runs,
                                                                         lambda r: r["test"][metric])
        share = "-" if share is None else share.format(1).replace("+", "")
        lines.append(f"| {task} | {name} | {chosen.get(name, '-')} | {mean_std(vals)} | {f1} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} | "
                     f"{f'{statistics.mean(thr):.2f}' if thr else 'not measured'} | {paired} | "
                     f"{share} |")
        points.append(dict(task=task, method=name, mean=statistics.mean(vals),
                           std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                           cost=statistics.mean(rel_cost) if rel_cost else None))
    return lines, points


def summarise_robust(task: str, finals: dict[str, list[dict]], chosen: dict[str, float],
                     costs: dict[str, float]) -> tuple[list[str], list[dict]]:
    """Test accuracy at the end and at the best validation epoch; per method the mean paired difference against AdamW
    with its 95% t interval, and the share of full SAM's gain it keeps with a paired bootstrap interval (seeds that
    both the method and full SAM ran)."""
    base = {r["seed"]: r for r in finals["adamw"]}
    full = {r["seed"]: r for r in finals.get("full SAM", [])}
    lines, points = [], []
    for name, runs in finals.items():
        row = [task, name, str(chosen.get(name, "-")), str(len(runs))]
        for split in ("test", "test_at_best_validation"):
            vals = [r[split]["accuracy"] for r in runs]
            diff = paired_difference([base[r["seed"]][split]["accuracy"] for r in runs], vals)
            wins = sum(r[split]["accuracy"] > base[r["seed"]][split]["accuracy"] for r in runs)
            row += [mean_std(vals), "-" if name == "adamw" else f"{diff.format(100)} ({wins}/{len(runs)})"]
            if split == "test":
                share = None if name == "adamw" else share_of_gain(base, full, runs, lambda r: r["test"]["accuracy"])
                row.append("-" if share is None or name == "full SAM" else
                           f"{share.format(1)} (n={share.n})".replace("+", ""))
            points.append(dict(task=task, method=name, split=split, mean=statistics.mean(vals),
                               std=statistics.stdev(vals) if len(vals) > 1 else 0.0, throughput=costs.get(name),
                               gain=diff.mean, gain_lo=diff.lo, gain_hi=diff.hi))
        cost = f"{costs[name]:.2f}" if name in costs else "not measured"
        row += [f"{statistics.mean(r['best_epoch'] for r in runs):.1f}", cost]
        lines.append("| " + " | ".join(row) + " |")
    return lines, points


def plot_robust(points: list[dict], path: Path) -> None:
    """Test accuracy at the end vs throughput ÷ AdamW, one panel per task (clean and noisy side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(p["task"] for p in points))
    methods = list(dict.fromkeys(p["method"] for p in points))
    color = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 4.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        measured = [p for p in points if p["task"] == task and p["split"] == "test" and p["throughput"] is not None]
        for p in measured:
            ax.errorbar(p["throughput"], p["mean"], yerr=p["std"], fmt="o", capsize=4, color=color[p["method"]])
        if not measured:
            ax.text(0.5, 0.5, "throughput not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("throughput ÷ AdamW (measured side by side)")
        ax.set_ylabel("test accuracy at the end")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color[m], marker="o", linestyle="") for m in methods]
    fig.legend(handles, methods, loc="lower center", ncol=len(methods), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p["task"] for p in points})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for p in [p for p in points if p["task"] == task and p["cost"] is not None]:  # a measured cost only
            ax.errorbar(p["cost"], p["mean"], yerr=p["std"], fmt="o", capsize=4, label=p["method"])
        ax.set_xlabel("relative cost (wall time ÷ AdamW)")
        ax.set_ylabel(f"test {_metric_name(task)}" + (" (lower is better)" if task == "lm" else ""))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def task_model_and_data(task: str, ctx: dict) -> tuple[Any, Dataset, Any, int]:
    """A fresh model (seed 0), the training split, the collator and the batch size of a task (for `measure_costs`)."""
    if task in ROBUST_TASKS:
        data, collator = ctx[task]
        model = tiny_vit(0) if task.startswith("digits") else cls_model(lora=False, seed=0)
        return model, data["train"], collator, 32
    if task == "lm":
        ckpt, data = ctx["lm"]
        model = GPT2LMHeadModel.from_pretrained(ckpt)
        model.loss_type = "ForCausalLM"
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
        return model, data["train"], DataCollatorForLanguageModeling(tokenizer, mlm=False), 16
    data, tokenizer = ctx["tweets"]
    return cls_model(lora=task == "cls-lora", seed=0), data["train"], DataCollatorWithPadding(tokenizer), 32


def measure_costs(task: str, methods: list[Method], ctx: dict, lr: float, rounds: int = 3,
                  steps: int = 12) -> dict[str, float]:
    """Throughput ÷ AdamW of each method on the task's model and data: interleaved rounds of `steps` timed steps
    (after 2 warm-up steps; whole `sam_interval=4` cycles; a probe picks its layers at step 0), each round's mean step
    time, the median over rounds of the per-round ratio. Needs an otherwise idle machine."""
    per_round: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(rounds):
        step_time = {}
        for m in methods:
            model, train, collator, batch = task_model_and_data(task, ctx)
            common = dict(output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no", use_cpu=True,
                          disable_tqdm=True, logging_strategy="no", seed=0, per_device_train_batch_size=batch,
                          learning_rate=lr, max_steps=steps + 2)
            timer = StepTimer()  # the first 2 steps are warm-up, left out below
            quiet(make_trainer(common, m.sam, 0.05, model=model, train_dataset=train, data_collator=collator,
                               callbacks=[timer])).train()
            step_time[m.name] = statistics.mean(timer.times[2:])
        for m in methods:
            per_round[m.name].append(step_time["adamw"] / step_time[m.name])
    return {name: statistics.median(r) for name, r in per_round.items()}


def measured_costs(task: str, methods: list[Method], ctx: dict, lr: float, out: Path, measure: bool,
                   log, finals: dict[str, list[dict]] | None = None) -> dict[str, float]:
    """`measure_costs`, kept in `<out>/costs_<task>.json` (measured again with `--measure_cost`, else read).

    A probe re-selects during training (every 25 steps), so a short timing from step 0 would time its first pick;
    it is timed with the layers its seed-0 run ended with (`finals`), as a fixed pattern."""
    path = out / f"costs_{task}.json"
    if measure:
        log(f"{task}: measuring throughput side by side (the machine must be idle)")
        timed = []
        for m in methods:
            if m.sam and m.sam.get("sam_selection") == "probe" and finals and finals.get(m.name):
                layers = sorted({name.rsplit(".", 1)[0] for name in finals[m.name][0]["perturbed"]})
                m = Method(m.name, dict(sam_selection="pattern", sam_target_layers=layers))
            timed.append(m)
        path.write_text(json.dumps(measure_costs(task, timed, ctx, lr), indent=1))
    return json.loads(path.read_text()) if path.exists() else {}


THROUGHPUT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"
# The chat tasks' costs: `benchmark_throughput.py --preset smollm2-135m --lora` (LoRA r=16 on every linear layer;
# SmolLM2's default selection is block 29 + the final norm, the preset's k=1 with reuse; the probe is not measured).
SMOLLM2_LORA_JSON = (THROUGHPUT_DIR / "throughput_smollm2_lora_cpu.json",)
CHAT_COST_PROXY = {"full SAM": "full SAM", "LW-SAM default": "LW-SAM k=1 reuse"}
# The CPU benchmark shape's ratios: the cheaper roads' run, then the late-phase runs (issue 23): full SAM's modes
# side by side with the shorter late phases (3 rounds x 20 steps), then the last 10% / 5% alone with AdamW, longer
# (5 rounds x 40 steps: one SAM step in 20 needs more steps to be timed well), then full SAM and its last 20% / 10%
# the same way (the figures the study reports).
THROUGHPUT_JSONS = tuple(THROUGHPUT_DIR / name for name in ("cheaper_roads_cpu.json", "late_phase_cpu.json",
                                                            "late_phase_long_cpu.json", "late_phase_final_cpu.json"))
# Each robustness method's cost, read from the throughput benchmark's CPU shape (GPT-2, 6 layers, d=256, T=128) with the
# same selection rule carried over: the tiny ViT's step time is Python-bound and says nothing about a real model's.
COST_PROXY = {"full SAM": "full SAM", "LW-SAM default": "LW-SAM k=1 reuse", "LW-SAM stale": "LW-SAM k=1 stale",
              "LW-SAM interval=4": "LW-SAM k=1 reuse interval=4", "SAM on norms": "norms",
              "norms stale": "norms stale", "norms late 70%": "norms late from 70%",
              "full LookSAM k=5": "full SAM LookSAM interval=5", "full random": "full random",
              **{f"full SAM late {p}%": f"full SAM late from {p}%" for p in (70, 80, 90, 95)}}


def benchmark_costs(paths: tuple[Path, ...] = THROUGHPUT_JSONS, proxy: dict[str, str] = COST_PROXY) -> dict[str, float]:
    """Throughput ÷ AdamW per robustness method from `scripts/benchmark_throughput.py`'s JSON files (each ratio
    measured against the AdamW of its own run; a later file's figure replaces an earlier one's; empty if not run)."""
    ratios = {}
    for path in paths:
        if path.exists():
            ratios.update({r["method"]: r["ratio_to_adamw"] for r in json.loads(path.read_text())["results"]})
    return {name: ratios[bench] for name, bench in dict(proxy, adamw="adamw").items() if bench in ratios}


def plot_pareto(points: list[dict], path: Path) -> None:
    """Gain over AdamW (test at the end, points, 95% t interval) against throughput ÷ AdamW: one point per method and
    task with a measured cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in points if p["split"] == "test" and p["method"] != "adamw" and p["throughput"] is not None]
    tasks = list(dict.fromkeys(p["task"] for p in shown))
    floor = -5.0  # a collapsed run (-70 points) would flatten the rest: drawn on the floor, its value in the label
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, task in enumerate(tasks):
        for p in (q for q in shown if q["task"] == task):
            if p["gain"] * 100 < floor:
                ax.plot(p["throughput"], floor, "v", color=f"C{i}")
                ax.annotate(f"{p['method']} ({p['gain'] * 100:+.1f}, off scale)", (p["throughput"], floor),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
                continue
            lo, hi = p["gain_lo"], p["gain_hi"]
            err = [[(p["gain"] - lo) * 100], [(hi - p["gain"]) * 100]] if math.isfinite(lo) else None
            ax.errorbar(p["throughput"], p["gain"] * 100, yerr=err, fmt="o", capsize=3, color=f"C{i}",
                        label=task if p is next(q for q in shown if q["task"] == task) else None)
            ax.annotate(p["method"], (p["throughput"], p["gain"] * 100), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_ylim(bottom=floor - 0.5)
    ax.set_xlabel("throughput ÷ AdamW (CPU benchmark shape, same selection rule)")
    ax.set_ylabel("test accuracy gain over AdamW, points (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_robustness(a, rb: RobustBudget, seeds: list[int], rhos: list[float], out: Path, ctx: dict, log) -> None:
    """The robustness suite: label noise, small data, and digits; see the module docstring."""
    lines, points = [], []
    for task in a.tasks:
        ctx[task] = robust_data(task, rb)
        family = "digits" if task.startswith("digits") else "tweets"
        methods = [m for m in robust_methods(family) if a.methods is None or m.name in a.methods or m.sam is None]
        grid = ROBUST_LR_GRID[family][:1] if a.quick else ROBUST_LR_GRID[family]
        sweep = {lr: cached_run(task, methods[0], 0.0, 0, rb, ctx, lr)["validation"]["accuracy"] for lr in grid}
        lr = max(sweep, key=sweep.get)
        log(f"{task} adamw: final validation accuracy by lr {sweep} -> lr={lr}")
        chosen: dict[str, float] = {}
        for m in methods[1:]:
            if m.rho_from in chosen:
                chosen[m.name] = chosen[m.rho_from]  # the same layers and e_S, applied on a schedule
                continue
            runs = {rho: cached_run(task, m, rho, 0, rb, ctx, lr) for rho in rhos}
            sweep = {rho: r["validation"]["accuracy"] for rho, r in runs.items() if r is not None}
            if sweep:  # (--report_only: a method with no cached sweep run is left out)
                chosen[m.name] = max(sweep, key=sweep.get)
                log(f"{task} {m.name}: final validation accuracy by rho {sweep} -> rho={chosen[m.name]}")
        methods = [m for m in methods if m.sam is None or m.name in chosen]
        finals = {m.name: [cached_run(task, m, chosen.get(m.name, 0.0), seed, rb, ctx, lr) for seed in seeds]
                  for m in methods}
        paired = {r["seed"] for r in finals["adamw"] if r is not None}  # seeds with an AdamW run to pair with
        finals = {name: [r for r in runs if r is not None and r["seed"] in paired] for name, runs in finals.items()}
        finals = {name: runs for name, runs in finals.items() if runs}
        methods = [m for m in methods if m.name in finals]
        costs = measured_costs(task, methods, ctx, lr, out, a.measure_cost, log, finals)
        proxies = benchmark_costs()
        # digits: the benchmark shape's costs (the ViT's own step time is Python-bound); tweets: MiniLM's own.
        costs = proxies if task.startswith("digits") else dict(proxies, **costs)
        task_lines, task_points = summarise_robust(task, finals, chosen, costs)
        lines += task_lines
        points += task_points
    header = ("| task | method | rho | seeds | test acc. at the end | Δ vs AdamW, pt [95% CI] (wins) | "
              "share of full SAM's gain [95% CI] | test acc. at best validation epoch | Δ vs AdamW, pt [95% CI] "
              "(wins) | best epoch | throughput ÷ AdamW |\n|---|---|---|---|---|---|---|---|---|---|---|")
    note = (f"Seeds {seeds}; accuracy mean ± std over seeds; Δ: the mean paired difference against AdamW in points "
            "with its 95% t interval (seeds better than AdamW); share of full SAM's gain: mean Δ / full SAM's mean Δ "
            "on the test at the end, 95% paired bootstrap interval (inf: full SAM's gain itself not established). "
            f"AdamW's learning rate chosen on validation from {ROBUST_LR_GRID}, rho per method from {rhos} "
            "(a schedule takes the rho of the method whose layers it perturbs), both by the final validation accuracy "
            "of seed 0. Label "
            "noise in the training split only. Throughput: `--measure_cost`, interleaved on an idle machine; for the "
            "digits tasks the CPU benchmark shape's ratio of the same mode and selection rule "
            "(`benchmarks/throughput/{cheaper_roads,late_phase,late_phase_long,late_phase_final}_cpu.json`, a "
            "later file's figure first; 'not measured' where they have no such mode). "
            f"Machine: {MACHINE}. Budget: {rb}.")
    write_report(out / a.report, header, lines, note, lambda path: plot_robust(points, path), log)
    plot_pareto(points, out / f"{a.report}_pareto.png")


def write_report(stem: Path, header: str, lines: list[str], note: str, draw, log) -> None:
    """`<stem>.md` (the table and its note) and `<stem>.png` (`draw(path)`), and the table on stdout."""
    table = header + "\n" + "\n".join(lines) + "\n\n" + note + "\n"
    stem.with_suffix(".md").write_text(table)
    draw(stem.with_suffix(".png"))
    print("\n" + table)
    log(f"done: {stem}.md, {stem}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets, seeds 0 1, rho 0.05 only (a few minutes)")
    p.add_argument("--suite", default="main", choices=["main", "robustness"],
                   help="main: cls-full, cls-lora, lm; robustness: label noise, small data, digits (see above)")
    p.add_argument("--tasks", nargs="+", default=None,
                   choices=["cls-full", "cls-lora", "lm", *CHAT_TASKS, *ROBUST_TASKS],
                   help="default: the suite's tasks")
    p.add_argument("--methods", nargs="+", default=None, help="robustness suite: run only these methods (+ AdamW)")
    p.add_argument("--measure_cost", action="store_true",
                   help="measure each method's throughput ÷ AdamW on each task side by side (an idle machine)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--report_only", action="store_true",
                   help="robustness suite: train nothing; tabulate the cached runs (missing ones are left out)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    p.add_argument("--rhos", type=float, nargs="+", default=None, help="sweep (default: 0.01 0.05 0.1)")
    p.add_argument("--asam", action="store_true", help="also run the ASAM variants of the two fixed SAM modes")
    p.add_argument("--asam_rhos", type=float, nargs="+", default=None,
                   help="ASAM's sweep (default: 0.1 0.5 1.0; ASAM scales e by |w|, so it needs a larger rho)")
    p.add_argument("--probe_no_embeddings", action="store_true",
                   help="also run the probe with the embedding layers left out of its candidates")
    p.add_argument("--schedules", action="store_true",
                   help="also run the ascent schedules: sam_ascent='stale' and sam_interval=4 on the default pattern")
    p.add_argument("--probe_modes", action="store_true",
                   help="also run the probe at block granularity, ranked by gradient norm and by norm per unit of cost")
    p.add_argument("--out", default="benchmarks/accuracy", help="output folder (runs are cached here)")
    p.add_argument("--report", default=None,
                   help="name of the table and figure: <out>/<report>.md and .png (default: accuracy / robustness)")
    a = p.parse_args()
    robust = a.suite == "robustness"
    a.tasks = a.tasks or (list(ROBUST_TASKS) if robust else ["cls-full", "cls-lora", "lm"])
    a.report = a.report or ("robustness" if robust else "accuracy")
    if robust != all(t in ROBUST_TASKS for t in a.tasks):
        p.error(f"--tasks {' '.join(a.tasks)} do not belong to --suite {a.suite}")
    if a.measure_cost and set(a.tasks) & set(CHAT_TASKS):
        p.error("--measure_cost does not time the chat tasks: run scripts/benchmark_throughput.py --preset "
                "smollm2-135m --lora --trainer sft for their throughput")
    budget = QUICK if a.quick else Budget()
    seeds = a.seeds or ([0, 1] if a.quick else [0, 1, 2])
    rhos = a.rhos or ([0.05] if a.quick else [0.01, 0.05, 0.1])
    asam_rhos = a.asam_rhos or ([0.5] if a.quick else [0.1, 0.5, 1.0])
    out = Path(a.out) / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(a.threads or max(torch.get_num_threads(), 1))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    ctx = dict(out=out, log=log, report_only=a.report_only, validate=len(rhos) > 1)
    if robust:
        return run_robustness(a, QUICK_ROBUST if a.quick else RobustBudget(), seeds, rhos, out, ctx, log)
    methods = all_methods(a.asam, a.probe_no_embeddings, a.schedules, a.probe_modes)
    lines, points = [], []
    for task in a.tasks:
        if task.startswith("cls") and "tweets" not in ctx:
            ctx["tweets"] = tweet_splits(budget)
        if task == "lm" and "lm" not in ctx:
            ctx["lm"] = lm_assets(budget, Path(a.out) / "cache", log)
        if task in CHAT_TASKS and task not in ctx:
            ctx[task] = chat_splits(task, budget)
        metric = _metric_name(task)
        chosen: dict[str, float] = {}
        if 0 in seeds:  # AdamW seed 0 right before the sweep's seed-0 runs, its partners in the throughput ratio
            cached_run(task, methods[0], 0.0, 0, budget, ctx)
        for m in methods[1:]:  # rho sweep on validation, seed 0 (one rho: no sweep, no validation)
            grid = asam_rhos if m.sam.get("sam_adaptive") else rhos
            if len(grid) == 1:
                chosen[m.name] = grid[0]
                continue
            sweep = {rho: cached_run(task, m, rho, 0, budget, ctx)["validation"][metric] for rho in grid}
            chosen[m.name] = (min if task == "lm" else max)(sweep, key=sweep.get)
            log(f"{task} {m.name}: validation {metric} by rho {sweep} -> rho={chosen[m.name]}")
        finals: dict[str, list[dict]] = {m.name: [] for m in methods}
        for seed in seeds:  # seed-major: each seed's runs back to back, so its throughput ratios are side by side
            for m in methods:
                finals[m.name].append(cached_run(task, m, chosen.get(m.name, 0.0), seed, budget, ctx))
        if task in CHAT_TASKS:  # the study's runs share the cores: the SmolLM2 LoRA benchmark's ratios instead
            costs = benchmark_costs(SMOLLM2_LORA_JSON, CHAT_COST_PROXY)
        else:
            costs = measured_costs(task, methods, ctx, LEARNING_RATE[task], out, a.measure_cost, log, finals)
        task_lines, task_points = summarise(task, finals, chosen, costs, wall_ratios=task not in CHAT_TASKS)
        lines += task_lines
        points += task_points

    header = ("| task | method | rho | test accuracy / perplexity (mean ± std) | macro-F1 | wall s | "
              "throughput ÷ AdamW | paired Δ vs AdamW, 95% t interval (seeds better) | share of full SAM's gain |"
              "\n|---|---|---|---|---|---|---|---|---|")
    note = (f"Metric: accuracy for cls tasks (macro-F1 beside it), perplexity for lm (lower is better). "
            f"Seeds {seeds}; " + (f"rho chosen per method on validation from {rhos}" if len(rhos) > 1 else
                                  f"rho fixed at {rhos[0]} (no sweep)")
            + (f" (ASAM: {asam_rhos})" if a.asam else "") + f". Machine: {MACHINE}. "
            f"Budget: {budget}. Paired Δ: the mean paired difference against AdamW (accuracy in points) with its 95% "
            f"t interval; share of full SAM's gain: mean Δ / full SAM's mean Δ, 95% paired bootstrap interval (inf: "
            f"full SAM's own gain not established). Chat tasks' throughput: the SmolLM2 LoRA benchmark "
            f"(`benchmarks/throughput/throughput_smollm2_lora_cpu.json`), not the study's runs, which shared the "
            f"cores.")
    write_report(out / a.report, header, lines, note, lambda path: plot(points, path), log)


if __name__ == "__main__":
    main()
