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

Every finished run is cached as JSON under `<out>/runs/` (with the configuration it was made with; a run made with
another configuration is redone) and skipped when the script runs again (resumable).
Outputs: `<out>/runs/*.json`, `<out>/<report>.md` (table), `<out>/<report>.png` (metric vs relative cost).

    python scripts/benchmark_accuracy.py            # the default run (79 min measured on 2 CPU cores, +3 to pretrain)
    python scripts/benchmark_accuracy.py --quick    # about 3 minutes: tiny budgets, 2 seeds, one rho
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_lwsam import LWSAMConfig, LWSAMTrainer  # noqa: E402
from hf_lwsam.cli.metrics import classification_metrics  # noqa: E402
from hf_lwsam.data import load_tweets, minilm_path, shakespeare_files, train_byte_bpe  # noqa: E402

LM_FINETUNE_PLAYS = ("twelfth-night", "as-you-like-it", "much-ado-about-nothing", "the-merchant-of-venice")
LM_TEST_PLAY = "a-midsummer-night-s-dream"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])  # + the classifier head, trained
# Every method trains with the AdamW baseline's learning rate. cls: the best validation accuracy (seed 0) of
# {5e-5, 1e-4, 2e-4, 4e-4} (full) and {5e-4, 2e-3, 4e-3, 8e-3, 1.5e-2} (LoRA). lm: fixed, not tuned (1e-3 gives a
# lower validation perplexity but a higher test perplexity: it over-fits the fine-tuning plays).
LEARNING_RATE = {"cls-full": 4e-4, "cls-lora": 8e-3, "lm": 3e-4}


@dataclass
class Method:
    name: str
    sam: dict | None  # None: plain AdamW through the stock Trainer


EMBEDDINGS = r".*(embeddings|wte|wpe)"  # BERT's embedding block, GPT-2's token and position embeddings


def all_methods(asam: bool = False, probe_no_embeddings: bool = False, schedules: bool = False) -> list[Method]:
    out = [
        Method("adamw", None),
        Method("full SAM", dict(sam_selection="all")),
        Method("LW-SAM default", dict(sam_selection="pattern")),
        Method("LW-SAM probe k=2", dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25)),
    ]
    if asam:
        out += [
            Method("full ASAM", dict(sam_selection="all", sam_adaptive=True)),
            Method("LW-ASAM default", dict(sam_selection="pattern", sam_adaptive=True)),
        ]
    if probe_no_embeddings:  # the probe without the embeddings as candidates: their summed gradients rank them high
        out.append(Method("LW-SAM probe k=2 no-emb", dict(sam_selection="probe", sam_top_k=2, sam_probe_interval=25,
                                                          sam_exclude_layers=EMBEDDINGS)))
    if schedules:  # the ascent schedules on the default pattern: a stale ascent (one pass), and SAM every 4th step
        out += [Method("LW-SAM stale", dict(sam_selection="pattern", sam_ascent="stale")),
                Method("LW-SAM interval=4", dict(sam_selection="pattern", sam_interval=4))]
    return out


@dataclass
class Budget:
    cls_train: int = 2000
    cls_eval: int = 1000
    cls_epochs: float = 1.0
    cls_max_length: int = 64
    lm_pretrain_steps: int = 300
    lm_finetune_steps: int = 80
    lm_block: int = 128
    lm_vocab: int = 4096
    lm_eval_blocks: int = 256


QUICK = Budget(cls_train=192, cls_eval=128, cls_max_length=48, lm_pretrain_steps=30, lm_finetune_steps=12,
               lm_block=64, lm_vocab=1024, lm_eval_blocks=64)


# ----------------------------------------------------------------------------------------------------- tasks
def tweet_splits(budget: Budget) -> DatasetDict:
    tweets = load_tweets(seed=42, validation_size=budget.cls_eval, test_size=budget.cls_eval,
                         max_train_samples=budget.cls_train)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    return tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=budget.cls_max_length),
                      batched=True, remove_columns=["text"]), tokenizer


def cls_model(lora: bool, seed: int):
    set_seed(seed)  # the classifier head's initialisation depends on the seed
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **LORA))
    return model


def _read(play: str) -> str:
    with open(shakespeare_files()[play][0], encoding="utf-8") as f:
        return f.read()


def _blocks(tokenizer, texts: list[str], size: int) -> Dataset:
    ids = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(ids) // size
    return Dataset.from_dict({"input_ids": [ids[i * size : (i + 1) * size] for i in range(n)]})


def lm_assets(budget: Budget, cache: Path, log) -> tuple[str, DatasetDict]:
    """The pretrained small GPT-2 checkpoint (trained once and cached) and the fine-tune/validation/test blocks."""
    held_out = set(LM_FINETUNE_PLAYS) | {LM_TEST_PLAY}
    pretrain_plays = [p for p in shakespeare_files() if p not in held_out]
    ckpt = cache / f"gpt2-shakespeare-v{budget.lm_vocab}-s{budget.lm_pretrain_steps}-b{budget.lm_block}"
    if (ckpt / "config.json").exists():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(ckpt)
    else:
        log(f"pretraining a small GPT-2 on {len(pretrain_plays)} plays ({budget.lm_pretrain_steps} steps) -> {ckpt}")
        tokenizer = train_byte_bpe([_read(p) for p in pretrain_plays], budget.lm_vocab)
        corpus = _blocks(tokenizer, [_read(p) for p in pretrain_plays], budget.lm_block)
        set_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=budget.lm_block, n_embd=128, n_layer=4,
                            n_head=4, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = GPT2LMHeadModel(config)
        args = TrainingArguments(output_dir=str(cache / "pretrain"), per_device_train_batch_size=32,
                                 max_steps=budget.lm_pretrain_steps, learning_rate=1e-3, warmup_steps=20,
                                 lr_scheduler_type="cosine", report_to="none", save_strategy="no", use_cpu=True,
                                 logging_steps=50, seed=0, disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=corpus,
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
    tune = _blocks(tokenizer, [_read(p) for p in LM_FINETUNE_PLAYS], budget.lm_block).shuffle(seed=0)
    n_val = min(max(len(tune) // 10, 8), budget.lm_eval_blocks)
    test = _blocks(tokenizer, [_read(LM_TEST_PLAY)], budget.lm_block)
    splits = DatasetDict(train=tune.select(range(n_val, len(tune))), validation=tune.select(range(n_val)),
                         test=test.select(range(min(len(test), budget.lm_eval_blocks))))
    return str(ckpt), splits


# ------------------------------------------------------------------------------------------------------ runs
def run_config(task: str, budget: Budget) -> dict:
    """Everything a cached run depends on besides method, rho and seed: a cached run made otherwise is redone."""
    if task.startswith("cls"):
        hp = dict(batch=32, epochs=budget.cls_epochs, lr=LEARNING_RATE[task], warmup_ratio=0.06,
                  train=budget.cls_train, eval=budget.cls_eval, max_length=budget.cls_max_length)
        if task == "cls-lora":
            hp.update(lora=LORA)
    else:
        hp = dict(batch=16, steps=budget.lm_finetune_steps, lr=LEARNING_RATE[task], warmup_steps=5,
                  block=budget.lm_block, vocab=budget.lm_vocab, pretrain_steps=budget.lm_pretrain_steps,
                  eval_blocks=budget.lm_eval_blocks)
    return dict(task=task, **hp)


def _metrics(task: str, metrics: dict) -> dict:
    if task.startswith("cls"):
        return dict(accuracy=metrics["eval_accuracy"], f1=metrics["eval_f1"])
    return dict(perplexity=math.exp(metrics["eval_loss"]))


def train_and_eval(task: str, method: Method, rho: float, seed: int, budget: Budget, ctx: dict) -> dict:
    """Train once, then evaluate on the test split (the report) and, for seed 0, the validation split (rho sweep)."""
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
    if method.sam is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data["train"],
                          data_collator=collator, compute_metrics=compute_metrics)
    else:
        trainer = LWSAMTrainer(model=model, args=LWSAMConfig(**common, sam_rho=rho, **method.sam),
                               train_dataset=data["train"], data_collator=collator, compute_metrics=compute_metrics)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    splits = ("validation", "test") if seed == 0 else ("test",)
    return dict(task=task, method=method.name, rho=rho, seed=seed, wall_s=wall, tokens_per_s=tokens / wall,
                perturbed=trainer.perturbed_parameter_names() if method.sam else [], config=hp,
                **{split: _metrics(task, trainer.evaluate(data[split])) for split in splits})


def cached_run(task: str, method: Method, rho: float, seed: int, budget: Budget, ctx: dict) -> dict:
    """`train_and_eval`, cached under `<out>/runs/`; a cached run made with another configuration is redone."""
    key = f"{task}__{method.name.replace(' ', '_').replace('=', '')}__rho{rho}__seed{seed}"
    path = ctx["out"] / "runs" / f"{key}.json"
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("config") == run_config(task, budget):
            return cached
        ctx["log"](f"{path.name} was made with another configuration: redoing it")
    ctx["log"](f"run {key}")
    result = train_and_eval(task, method, rho, seed, budget, ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    val = f"validation {_metric_str(result['validation'])}, " if "validation" in result else ""
    ctx["log"](f"     -> {val}test {_metric_str(result['test'])}, {result['wall_s']:.0f} s")
    return result


def _metric_name(task: str) -> str:
    return "perplexity" if task == "lm" else "accuracy"


def _metric_str(r: dict) -> str:
    return f"perplexity {r['perplexity']:.2f}" if "perplexity" in r else f"acc {r['accuracy']:.4f} F1 {r['f1']:.4f}"


# --------------------------------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def summarise(task: str, finals: dict[str, list[dict]], chosen: dict[str, float]) -> tuple[list[str], list[dict]]:
    metric = _metric_name(task)
    base = {r["seed"]: r for r in finals["adamw"]}
    lines, points = [], []
    for name, runs in finals.items():
        vals = [r["test"][metric] for r in runs]
        rel_cost = [base[r["seed"]]["tokens_per_s"] / r["tokens_per_s"] for r in runs]  # wall time ÷ AdamW's
        thr = [r["tokens_per_s"] / base[r["seed"]]["tokens_per_s"] for r in runs]
        diffs = [r["test"][metric] - base[r["seed"]]["test"][metric] for r in runs]
        wins = sum(d < 0 if task == "lm" else d > 0 for d in diffs)
        f1 = _mean_std([r["test"]["f1"] for r in runs]) if task.startswith("cls") else "-"
        spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        paired = "-" if name == "adamw" else f"{statistics.mean(diffs):+.4f} ± {spread:.4f} ({wins}/{len(runs)} better)"
        lines.append(f"| {task} | {name} | {chosen.get(name, '-')} | {_mean_std(vals)} | {f1} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} | {statistics.mean(thr):.2f} | {paired} |")
        points.append(dict(task=task, method=name, mean=statistics.mean(vals),
                           std=statistics.stdev(vals) if len(vals) > 1 else 0.0, cost=statistics.mean(rel_cost)))
    return lines, points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({p["task"] for p in points})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for p in [p for p in points if p["task"] == task]:
            ax.errorbar(p["cost"], p["mean"], yerr=p["std"], fmt="o", capsize=4, label=p["method"])
        ax.set_xlabel("relative cost (wall time ÷ AdamW)")
        ax.set_ylabel(f"test {_metric_name(task)}" + (" (lower is better)" if task == "lm" else ""))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets, seeds 0 1, rho 0.05 only (a few minutes)")
    p.add_argument("--tasks", nargs="+", default=["cls-full", "cls-lora", "lm"], choices=["cls-full", "cls-lora", "lm"])
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    p.add_argument("--rhos", type=float, nargs="+", default=None, help="sweep (default: 0.01 0.05 0.1)")
    p.add_argument("--asam", action="store_true", help="also run the ASAM variants of the two fixed SAM modes")
    p.add_argument("--asam_rhos", type=float, nargs="+", default=None,
                   help="ASAM's sweep (default: 0.1 0.5 1.0; ASAM scales e by |w|, so it needs a larger rho)")
    p.add_argument("--probe_no_embeddings", action="store_true",
                   help="also run the probe with the embedding layers left out of its candidates")
    p.add_argument("--schedules", action="store_true",
                   help="also run the ascent schedules: sam_ascent='stale' and sam_interval=4 on the default pattern")
    p.add_argument("--out", default="benchmarks/accuracy", help="output folder (runs are cached here)")
    p.add_argument("--report", default="accuracy", help="name of the table and figure: <out>/<report>.md and .png")
    a = p.parse_args()
    budget = QUICK if a.quick else Budget()
    seeds = a.seeds or ([0, 1] if a.quick else [0, 1, 2])
    rhos = a.rhos or ([0.05] if a.quick else [0.01, 0.05, 0.1])
    asam_rhos = a.asam_rhos or ([0.5] if a.quick else [0.1, 0.5, 1.0])
    out = Path(a.out) / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    ctx = dict(out=out, log=log)
    methods = all_methods(a.asam, a.probe_no_embeddings, a.schedules)
    lines, points = [], []
    for task in a.tasks:
        if task.startswith("cls") and "tweets" not in ctx:
            ctx["tweets"] = tweet_splits(budget)
        if task == "lm" and "lm" not in ctx:
            ctx["lm"] = lm_assets(budget, Path(a.out) / "cache", log)
        metric = _metric_name(task)
        chosen: dict[str, float] = {}
        if 0 in seeds:  # AdamW seed 0 right before the sweep's seed-0 runs, its partners in the throughput ratio
            cached_run(task, methods[0], 0.0, 0, budget, ctx)
        for m in methods[1:]:  # rho sweep on validation, seed 0
            grid = asam_rhos if m.sam.get("sam_adaptive") else rhos
            sweep = {rho: cached_run(task, m, rho, 0, budget, ctx)["validation"][metric] for rho in grid}
            chosen[m.name] = (min if task == "lm" else max)(sweep, key=sweep.get)
            log(f"{task} {m.name}: validation {metric} by rho {sweep} -> rho={chosen[m.name]}")
        finals: dict[str, list[dict]] = {m.name: [] for m in methods}
        for seed in seeds:  # seed-major: each seed's runs back to back, so its throughput ratios are side by side
            for m in methods:
                finals[m.name].append(cached_run(task, m, chosen.get(m.name, 0.0), seed, budget, ctx))
        task_lines, task_points = summarise(task, finals, chosen)
        lines += task_lines
        points += task_points

    header = ("| task | method | rho | test accuracy / perplexity (mean ± std) | macro-F1 | wall s | "
              "throughput ÷ AdamW | paired Δ vs AdamW (per seed) |\n|---|---|---|---|---|---|---|---|")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    note = (f"Metric: accuracy for cls tasks (macro-F1 beside it), perplexity for lm (lower is better). "
            f"Seeds {seeds}; rho chosen per method on validation from {rhos}"
            + (f" (ASAM: {asam_rhos})" if a.asam else "") + f". Machine: {machine}. "
            f"Budget: {budget}.")
    table = header + "\n" + "\n".join(lines) + "\n\n" + note + "\n"
    (out / f"{a.report}.md").write_text(table)
    plot(points, out / f"{a.report}.png")
    print("\n" + table)
    log(f"done: {out / a.report}.md, {out / a.report}.png")


if __name__ == "__main__":
    main()
