"""Does layer-wise SAM match full SAM's accuracy at near-plain cost? Measured on the real offline data.

One runner for every study: a table of tasks (`study_tasks.TASKS`: each task's data, model, budget, metric and
protocol) times a table of methods (`study_methods`: each row's `sam_*` options, other TrainingArguments and rho),
every run cached. Per task: AdamW's learning rate chosen on validation (seed 0) where the task has a grid, then rho per
method on validation (seed 0) where the method has several, then every method with `--seeds`, reported on test.

Suites (`--suite`, or the suite of the `--tasks` given), each with its methods table:
  main (`main_methods`)   AdamW; full SAM (`sam_selection="all"`); layer-wise SAM with the output-side default
      pattern; layer-wise SAM with probe selection (k = 2); `--asam`: the ASAM variants of the two fixed SAM modes
      (their own rho grid, `--asam_rhos`); `--probe_no_embeddings`: the probe with the embeddings left out of its
      candidates; `--schedules`: the default pattern with a stale ascent and with SAM every 4th step; `--probe_modes`:
      the probe at block granularity, ranked by gradient norm and by gradient norm per unit of recompute cost.
    cls-full  the shipped pretrained MiniLM fine-tuned on the shipped tweets (3-class sentiment): accuracy, macro-F1
    cls-lora  the same under PEFT LoRA (r=8 on query/value; the classifier head trained)
    lm        a small GPT-2 pretrained from scratch on most Shakespeare plays (cached), fine-tuned on a held-out group
              of plays; perplexity on a further held-out play
  chat (`chat_methods`: AdamW and Adafactor with learning rates chosen on validation, full SAM
      (`sam_preset="exact"`), `sam_preset="fast"`, `sam_preset="free"`, the layer-wise default)
    chat-noise40, chat-noise40-full (also chat, chat-small)
              the shipped pretrained SmolLM2-135M-Instruct, SFT (TRL's SFTTrainer; LoRA r=16 on every linear layer,
              every weight for `-full`) on tweet sentiment as a chat in its chat template (`hf-lwsam-sft`'s offline
              task): 2048 tweets with 40% noisy answers, 1 epoch of 256 steps of 8 (where AdamW's validation curve
              peaked), CPU bf16 autocast, padding-free batches. Scores on 1000 test tweets (500 validation):
              the accuracy of the most likely answer among negative/neutral/positive, the answer NLL, and the NLL of
              a held-out play before and after (forgetting). ~25 min an AdamW run on one busy CPU core; a GPU's
              study (`--device cuda`, scripts/gpu_study.sh)
  robustness (`robust_methods`): the regimes where the literature reports SAM's largest gains. AdamW, full SAM, LW-SAM
      default, LW-SAM probe, the stale ascent and SAM every 4th step (these two take LW-SAM default's rho), LW-SAM
      over the output half of the trunk; SAM over one part of the model at a time (`LOCATIONS`: embeddings, input
      half, output half, normalization layers, attention, MLP, head); the cheap modes on every parameter (LookSAM k=5,
      SAM in the last 30/20/10/5%, random perturbation) and on the normalization layers (stale, last 30%, LookSAM
      k=5), each schedule with the rho of the method whose layers it perturbs. AdamW's learning rate is chosen on
      validation from a small grid. Each run trains several epochs, validates every epoch, and is tested at the end
      and at its best validation epoch (early stopping). Label noise is symmetric (a fixed random share of the
      training examples gets one of the other classes, uniformly) and in the training split only.
    tweets-noise20/40  MiniLM fine-tuned on 500 tweets with 20% / 40% noisy labels, 4 epochs
    tweets-small       MiniLM fine-tuned on 250 clean tweets, 8 epochs
    digits[-noise20/40] a 4-block ViT trained from scratch on scikit-learn's 8x8 digits (997 train / 300 / 500),
                       30 epochs
Each comparison: the mean paired difference against AdamW with its 95% t interval, and the share of full SAM's gain
kept with a paired bootstrap interval (`scripts/study_stats.py`); the robustness report adds `<report>_pareto.png`
(the gain against throughput ÷ AdamW). `--measure_cost` adds each method's throughput ÷ AdamW on the cls, lm, tweets
and chat tasks, measured side by side with each task's own TrainingArguments (run it on an idle machine); the digits
tasks (a Python-bound tiny ViT), and a chat task not timed yet, take the ratio of the same mode in
`benchmarks/throughput/` (`Task.cost_files`).

Adding a method is one row in its suite's methods table (`scripts/study_methods.py`, with examples: a new ascent with
its own rho grid, a learning-rate schedule that needs other TrainingArguments); adding a task is one `Task` row in
`study_tasks.TASKS` (its loader, its recipe: model, splits, TrainingArguments, scoring; its `run_config` entry).

Every finished run is cached as JSON under `<out>/runs/<task>__<method>__rho<rho>__seed<seed>.json` (with the
configuration it was made with and, for a SAM run, its `sam_*` options as the library resolves them; a run made with
another configuration, or resolved otherwise since, is redone) and skipped when the script runs again (resumable); a
learning rate or rho chosen from a sweep some of whose runs are not in the cache is named in the report's note; a
row that takes another row's rho is left out without it; the long chat runs also keep a checkpoint every 1/8 of the
run under `<out>/partial/<key>/`, so a run stopped part-way resumes from it (the same run an uninterrupted one
makes; removed once cached).
`--report_only` trains nothing and tabulates the cached runs (missing ones are left out); `--dry_run` lists the
runs still to do. `--device cuda` trains on the GPU: its runs are cached under their own keys (`...__cuda.json`, the
device in their configuration) and every run records its `machine`, so a report never mixes CPU and GPU runs.
`--workers N` trains N runs at a time in separate processes (on one GPU: its small models leave it mostly idle);
`--time_budget S` starts no run after S seconds (the rest resume next time).
Outputs: `<out>/runs/*.json`, `<out>/<report>.md` (table), `<out>/<report>.png` (metric vs relative cost).

    python scripts/benchmark_accuracy.py            # the default run (79 min measured on 2 CPU cores, +3 to pretrain)
    python scripts/benchmark_accuracy.py --quick    # about 3 minutes: tiny budgets, 2 seeds, one rho
    python scripts/benchmark_accuracy.py --suite robustness --tasks digits-noise40 tweets-noise40 --measure_cost
    python scripts/benchmark_accuracy.py --tasks chat-noise40 chat-small chat --rhos 0.05 --threads 1 \
        --report accuracy_smollm2   # 36 runs: about 7 h on one CPU core
    python scripts/benchmark_accuracy.py --tasks chat-noise40 --device cuda --workers 4 --time_budget 420 \
        --seeds 0 1 2 3 4 5 6 7 --rhos 0.05   # the same study on one GPU (scripts/gpu_study.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared study modules beside this file, also when
from step_timer import StepTimer  # noqa: E402
from study_harness import (  # noqa: E402  # loaded by path
    MACHINE,
    cached,
    machine,
    make_trainer,
    mean_std,
    quiet,
    resolved_sam,
)
from study_methods import (  # noqa: E402
    LABEL_SMOOTHINGS,
    PLAIN_LRS,
    PLAIN_OPTIMIZERS,
    REFERENCE_RHOS,
    WEIGHT_DECAYS,
    Method,
    baseline_grid,
    chat_methods,
    main_methods,
    reference_methods,
    robust_methods,
    sam_refusal,
)
from study_stats import gain_fraction, paired_difference  # noqa: E402
from study_tasks import ROBUST_LR_GRID, TASKS, Budget, RobustBudget, Task, run_config  # noqa: E402

THROUGHPUT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput"
SUITES = {"main": ("cls-full", "cls-lora", "lm"), "chat": ("chat-noise40", "chat-noise40-full"),
          "robustness": tuple(name for name, task in TASKS.items() if task.suite == "robustness")}
REPORTS = {"main": "accuracy", "chat": "accuracy_smollm2", "robustness": "robustness"}


def methods_table(task: Task, a) -> list[Method]:
    """The rows `task`'s suite trains on it (`--methods`: only these, and AdamW)."""
    if task.suite == "robustness":
        table = robust_methods(task.family) + (reference_methods() if a.baselines else [])
    elif task.suite == "chat":
        table = chat_methods()
    else:
        table = main_methods(a.asam, a.asam_rhos, a.probe_no_embeddings, a.schedules, a.probe_modes)
    return [m for m in table if a.methods is None or m.name == "adamw" or m.name in a.methods]


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


class RunClock(TrainerCallback):
    """The run's training time across resumes: written into each checkpoint when it is complete (the mark that it
    is: the Trainer calls `on_save` after writing everything), read back when the run resumes from it."""

    FILE = "run_clock.json"

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / self.FILE).write_text(json.dumps(dict(wall_s=self.elapsed(), step=state.global_step)))


def partial_run(task: Task, job: Job, budget: Budget | RobustBudget, ctx: dict) -> tuple[Path, Path | None]:
    """Where a resumable run (`Task.save_steps`) keeps its checkpoints, `<out>/partial/<key>/`, and its last complete
    checkpoint to resume from (`None`: start). Checkpoints made with another configuration are removed."""
    folder = ctx["out"] / "partial" / run_key(task, job, ctx["device"])
    config = json.loads(json.dumps(run_configuration(task, job, budget, ctx["device"])))
    stamp = folder / "configuration.json"
    if folder.exists() and (not stamp.exists() or json.loads(stamp.read_text()) != config):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(config, indent=1))
    complete = [c for c in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (c / RunClock.FILE).exists()]
    return folder, max(complete, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


# ------------------------------------------------------------------------------------------------------ runs
@dataclass
class Job:
    """One run: a method at one rho and seed on a task (at the chosen learning rate, where the task sweeps it).
    `validate`: a seed-0 run of the train-once protocol is also scored on validation (a rho sweep needs it)."""

    task: str
    method: Method
    rho: float
    seed: int
    lr: float | None = None
    validate: bool = True
    wd: float = 0.0  # the weight decay (chosen with the learning rate where the task has a `wd_grid`)


def task_data(task: Task, budget: Budget | RobustBudget, ctx: dict) -> Any:
    """The task's data, loaded once per `Task.data` key (only when a run trains)."""
    if task.data not in ctx["data"]:
        ctx["data"][task.data] = task.load(task, budget, ctx["cache"], ctx["log"])
    return ctx["data"][task.data]


def train_and_eval(task: Task, job: Job, budget: Budget | RobustBudget, ctx: dict) -> dict:
    """Train the job's method on the task once and score it: on test (and, for seed 0 with `job.validate`, on
    validation); under the robustness protocol validated every epoch and tested at the end and at the best
    validation epoch."""
    method, hp = job.method, run_config(task.name, budget, job.lr, job.wd)
    recipe = task.recipe(task, hp, task_data(task, budget, ctx), job.seed)
    args = dict(output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no",
                use_cpu=ctx["device"] == "cpu", disable_tqdm=True, logging_strategy="no", seed=job.seed,
                data_seed=job.seed, weight_decay=job.wd, per_device_train_batch_size=hp["batch"],
                learning_rate=hp["lr"], **recipe.args)
    kwargs = dict(recipe.trainer_kwargs)
    clock, resume, saved = RunClock(), None, None
    if task.save_steps:  # a checkpoint every `save_steps` of the run; the last two kept, the newest resumed from
        folder, resume = partial_run(task, job, budget, ctx)
        args.update(output_dir=str(folder), save_strategy="steps", save_steps=task.save_steps, save_total_limit=2)
        if resume is not None:
            saved = json.loads((resume / RunClock.FILE).read_text())
            clock = RunClock(saved["wall_s"])
            ctx["log"](f"     resumed from {resume.name}")
    kwargs["callbacks"] = [clock]
    if task.epochs:  # validated (and logged) every epoch
        best = BestValidation()
        args.update(logging_strategy="epoch", eval_strategy="epoch")
        kwargs["eval_dataset"] = recipe.splits["validation"]
        kwargs["callbacks"].append(best)
    trainer = quiet(make_trainer(method.training_args(args), method.sam, job.rho, sft=recipe.sft,
                                 model=recipe.model, train_dataset=recipe.train_dataset, **kwargs))
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    wall = clock.elapsed()  # training only, summed over the run's resumes
    record = dict(task=task.name, method=method.name, rho=job.rho, seed=job.seed, wall_s=wall,
                  machine=machine(ctx["device"]), perturbed=trainer.perturbed_parameter_names() if method.sam else [],
                  config=hp)
    if saved is not None:
        record["resumed_from_step"] = saved["step"]
    if recipe.tokens is not None:
        record["tokens_per_s"] = recipe.tokens(trainer) / wall
    if recipe.after is not None:
        record.update(recipe.after(trainer))
    if not task.epochs:
        splits = ("validation", "test") if job.seed == 0 and job.validate else ("test",)
        return dict(record, **{split: recipe.evaluate(trainer, split) for split in splits})
    best.active = False
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    test_end = at_best = recipe.evaluate(trainer, "test")
    if best.best_epoch != trainer.state.epoch:  # at the last epoch the best weights are the final ones: scored above
        trainer.model.load_state_dict(best.weights)
        at_best = recipe.evaluate(trainer, "test")
    return dict(record, validation=dict(accuracy=best.curve[-1]), validation_curve=best.curve,
                train_loss_curve=losses, best_epoch=best.best_epoch, test=test_end, test_at_best_validation=at_best)


def run_key(task: Task, job: Job, device: str) -> str:
    """The run's cache file name (without `.json`): task, method, rho, seed; the learning rate of a plain run of a
    task that sweeps it, or of a row with learning rates of its own; the device, unless the CPU."""
    name = job.method.name.replace(" ", "_").replace("=", "").replace("/", "-")
    key = f"{task.name}__{name}__rho{job.rho}__seed{job.seed}"
    if job.method.sam is None and (task.lr_grid or job.method.lrs):
        key += f"__lr{job.lr}"  # AdamW's learning-rate sweep, or the row's own (e.g. Adafactor's)
        key += f"__wd{job.wd}" if job.wd else ""
    return key if device == "cpu" else f"{key}__{device}"


def run_configuration(task: Task, job: Job, budget: Budget | RobustBudget, device: str) -> dict:
    """Everything a cached run depends on: `run_config`, the method's `sam_*` options (`Task.method_in_config`), its
    other TrainingArguments, and the device unless the CPU."""
    config = run_config(task.name, budget, job.lr, job.wd)
    if task.method_in_config and job.method.sam is not None:
        config = dict(config, sam=job.method.sam)
    if job.method.args:
        config = dict(config, args=job.method.args)
    return config if device == "cpu" else dict(config, device=device)


def cached_run(job: Job, ctx: dict, peek: bool = False) -> dict | None:
    """`train_and_eval`, cached as `<out>/runs/<key>.json` with its configuration; a cached run made with another
    configuration is redone. `None` for a run not in the cache that is not trained (`peek`, `--report_only`,
    `--dry_run`, `--time_budget` spent)."""
    task = TASKS[job.task]
    budget = task.budget(ctx["quick"])
    key = run_key(task, job, ctx["device"])
    log = ctx["log"]

    def make() -> dict | None:
        if peek:
            return None
        if ctx["report_only"] or ctx["dry_run"]:
            if key not in ctx.setdefault("listed", set()):  # once, though a phase asks for it again
                ctx["listed"].add(key)
                log(f"{key}: " + ("to run" if ctx["dry_run"] else "no cached run (--report_only: left out)"))
            return None
        if ctx["deadline"] is not None and time.time() > ctx["deadline"]:
            log(f"{key}: not started (--time_budget spent)")
            return None
        log(f"run {key}")
        result = train_and_eval(task, job, budget, ctx)
        val = f"validation {_metric_str(result['validation'])}, " if "validation" in result else ""
        best = ""
        if "best_epoch" in result:
            best = f", at the best validation epoch ({result['best_epoch']:.0f}) "
            best += _metric_str(result["test_at_best_validation"])
        log(f"     -> {val}test {_metric_str(result['test'])}{best}, {result['wall_s']:.0f} s")
        return result

    run = cached(ctx["out"] / "runs" / f"{key}.json", run_configuration(task, job, budget, ctx["device"]), make,
                 None if peek else log, resolved_sam(job.method.sam, job.rho))
    if run is not None and task.save_steps:  # cached: its checkpoints (`partial_run`) are no longer needed
        shutil.rmtree(ctx["out"] / "partial" / key, ignore_errors=True)
    return run


_WORKER: dict = {}


def _start_worker(settings: dict) -> None:
    torch.set_num_threads(settings.pop("threads"))
    hf_logging.set_verbosity_error()
    _WORKER.update(settings, data={})


def _work(job: Job) -> dict | None:
    return cached_run(job, _WORKER)


def execute(jobs: list[Job], ctx: dict) -> list[dict | None]:
    """The jobs' results in order: cached ones read, the others trained (`--workers` at a time, in worker processes
    that keep their loaded data between jobs)."""
    if ctx["workers"] <= 1 or ctx["report_only"] or ctx["dry_run"]:
        return [cached_run(job, ctx) for job in jobs]
    results = [cached_run(job, ctx, peek=True) for job in jobs]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo and "pool" not in ctx:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        settings = {k: ctx[k] for k in ("out", "cache", "device", "quick", "deadline", "report_only", "dry_run")}
        settings.update(threads=ctx["threads"], workers=1, log=_Log(ctx["t0"]))
        ctx["pool"] = ProcessPoolExecutor(ctx["workers"], mp_context=get_context("spawn"),
                                          initializer=_start_worker, initargs=(settings,))
    for i, result in zip(todo, ctx["pool"].map(_work, [jobs[i] for i in todo]) if todo else []):
        results[i] = result
    return results


class _Log:
    """Print a message with the seconds since `t0` (picklable, for the worker processes)."""

    def __init__(self, t0: float):
        self.t0 = t0

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)


def _metric_str(r: dict) -> str:
    if "perplexity" in r:
        return f"perplexity {r['perplexity']:.2f}"
    return f"acc {r['accuracy']:.4f}" + (f" F1 {r['f1']:.4f}" if "f1" in r else "")


def choose(sweep: dict[Any, float], lower_is_better: bool = False) -> Any:
    """The key of the best value of `sweep`."""
    return (min if lower_is_better else max)(sweep, key=sweep.get)


def choose_reference(scores: dict[tuple[str, float], list[float]]) -> tuple[str, float]:
    """The plain configuration (row name, learning rate) with the best mean validation accuracy over the selection
    seeds; a tie goes to the first in grid order."""
    return max(scores, key=lambda k: statistics.fmean(scores[k]))


def on_reference(task: Task, methods: list[Method], a, ctx: dict, own_lr: dict[str, float]) -> list[Method]:
    """The plain-baseline grid (`baseline_grid`) on the selection seeds (`--reference_seeds`), its best configuration
    by mean validation accuracy as the task's reference, and `methods` with the reference row after AdamW and each
    `on_reference` row on the reference's optimizer settings; a row the reference's optimizer cannot run (the free
    preset without a first moment) is left out as not applicable. The grid's scores go to `ctx["baselines"]`."""
    name, log = task.name, ctx["log"]
    grid, seeds = baseline_grid(task.family), list(a.reference_seeds)
    # seed-major: a stopped grid has every configuration's first seeds
    jobs = [Job(name, m, 0.0, seed, x) for seed in seeds for m in grid for x in (m.lrs[:1] if a.quick else m.lrs)]
    runs = execute(jobs, ctx)
    scores: dict[tuple[str, float], list[float]] = {}
    tests: dict[tuple[str, float], list[float]] = {}
    for j, r in zip(jobs, runs):
        if r is not None:
            scores.setdefault((j.method.name, j.lr), []).append(r["validation"]["accuracy"])
            tests.setdefault((j.method.name, j.lr), []).append(r["test"]["accuracy"])
    complete = {k: v for k, v in scores.items() if len(v) == len(seeds)}
    kept = [m for m in methods if not m.on_reference]
    info = ctx.setdefault("baselines", {})[name] = dict(scores=scores, tests=tests, reference=None, seeds=seeds,
                                                        not_applicable={}, configurations=len(jobs) // len(seeds))
    if len(complete) < len(jobs) // len(seeds):  # the reference is the best of the whole grid, not of a part
        log(f"{name}: {len(complete)} of {len(jobs) // len(seeds)} plain configurations run on every selection seed "
            f"{seeds}: the reference and the rows on it wait")
        return kept
    ref_name, ref_lr = info["reference"] = choose_reference(complete)
    ref = next(m for m in grid if m.name == ref_name)
    log(f"{name}: reference {ref_name} lr={ref_lr} (mean validation accuracy "
        f"{statistics.fmean(complete[(ref_name, ref_lr)]):.4f} over seeds {seeds}, {len(complete)} configurations)")
    own_lr[ref_name] = ref_lr
    out = [kept[0], ref, *kept[1:]]  # AdamW first (the pairing base), the reference beside it
    for m in methods:
        if not m.on_reference:
            continue
        why = sam_refusal(m.sam, ref.args)
        if why is not None:  # the library's own refusal of the row's options with that optimizer
            info["not_applicable"][m.name] = why
            log(f"{name} {m.name}: not applicable ({why})")
            continue
        out.append(replace(m, args={**ref.args, **m.args}))
        own_lr[m.name] = ref_lr
    return out


def incomplete(ctx: dict, task: str, what: str, ran: int, grid: int) -> None:
    """Record (for the report's note) and log a choice made on `ran` of a sweep's `grid` values."""
    if ran < grid:
        ctx.setdefault("partial_sweeps", []).append(f"{task} {what} from {ran} of {grid} values")
        ctx["log"](f"{task} {what}: chosen from {ran} of {grid} values (the others are not in the cache)")


def run_task(task: Task, methods: list[Method], seeds: list[int], rhos: list[float], ctx: dict,
             a) -> tuple[dict[str, list[dict]], dict[str, float], float | None] | None:
    """The task's study: AdamW's learning rate (`Task.lr_grid`), rho per method, then every seed. The runs per
    method (seeds with an AdamW run to pair with), the chosen rhos and learning rate; `None` without AdamW runs."""
    log, name, metric = ctx["log"], task.name, task.metric
    lr, wd = None, 0.0
    if task.lr_grid:
        grid = [(x, d) for x in (task.lr_grid[:1] if a.quick else task.lr_grid) for d in task.wd_grid]
        runs = execute([Job(name, methods[0], 0.0, 0, x, True, d) for x, d in grid], ctx)
        sweep = {g: r["validation"]["accuracy"] for g, r in zip(grid, runs) if r is not None}
        if not sweep:
            log(f"{name}: no AdamW run to choose the learning rate from: left out")
            return None
        lr, wd = choose(sweep)
        log(f"{name} adamw: final validation accuracy by (lr, weight decay) {sweep} -> lr={lr}, weight decay={wd}")
        incomplete(ctx, name, "adamw (lr, weight decay)", len(sweep), len(grid))
    own_lr: dict[str, float] = {}  # the plain rows with their own learning rate, and the rows on the reference
    if getattr(a, "baselines", False):  # the grid and its reference, also with no row on it (`--methods adamw`)
        methods = on_reference(task, methods, a, ctx, own_lr)
    sweeps_lr = [m for m in methods[1:] if m.sam is None and m.lrs and m.name not in own_lr]
    # --quick: one rho per row, the middle of its own grid (a smoke run, no sweep)
    grid_of = (lambda m: m.grid(rhos)[len(m.grid(rhos)) // 2:][:1]) if a.quick else (lambda m: m.grid(rhos))
    validate = bool(task.lr_grid) or bool(sweeps_lr) or any(len(grid_of(m)) > 1 for m in methods if m.sam)
    if sweeps_lr:  # a second plain optimizer (Adafactor): its own learning rate, chosen on validation (seed 0)
        grid = [(m, x) for m in sweeps_lr for x in (m.lrs[:1] if a.quick else m.lrs)]
        runs = execute([Job(name, m, 0.0, 0, x, True, wd) for m, x in grid], ctx)
        for m in sweeps_lr:
            sweep = {x: r["validation"][metric] for (n, x), r in zip(grid, runs) if n is m and r is not None}
            if sweep:
                own_lr[m.name] = choose(sweep, task.lower_is_better)
                log(f"{name} {m.name}: validation {metric} by lr {sweep} -> lr={own_lr[m.name]}")
                incomplete(ctx, name, f"{m.name} lr", len(sweep), sum(n is m for n, _ in grid))
        methods = [m for m in methods if not (m in sweeps_lr and m.name not in own_lr)]
    job = lambda m, rho, seed: Job(name, m, rho, seed, own_lr.get(m.name, lr), validate, wd)  # noqa: E731
    ctx.setdefault("chosen_lr", {})[name] = dict(own_lr, adamw=lr, weight_decay=wd)
    chosen: dict[str, float] = {}
    names = {m.name for m in methods}
    for dependent in (False, True):  # the rows with their own rho first, then those that take another row's
        todo = [m for m in methods if m.sam is not None and bool(m.rho_from) is dependent]
        for m in [m for m in todo if m.rho_from in chosen]:
            chosen[m.name] = chosen[m.rho_from]  # the same layers and e_S, applied on a schedule
        for m in [m for m in todo if dependent and m.rho_from not in chosen]:  # never a rho of the study's grid
            why = "not among the rows run" if m.rho_from not in names else "left out"
            log(f"{name} {m.name}: takes its rho from {m.rho_from!r}, {why}: left out")
        todo = [m for m in todo if m.name not in chosen and not dependent]
        for m in [m for m in todo if len(grid_of(m)) == 1]:
            chosen[m.name] = grid_of(m)[0]  # one rho: no sweep
        sweeps = [(m, rho) for m in todo if len(grid_of(m)) > 1 for rho in grid_of(m)]
        first = [job(methods[0], 0.0, 0)] if 0 in seeds and not dependent else []  # AdamW's seed 0 beside them
        runs = execute(first + [job(m, rho, 0) for m, rho in sweeps], ctx)[len(first):]
        for m in [m for m in todo if len(grid_of(m)) > 1]:
            sweep = {rho: r["validation"][metric] for (n, rho), r in zip(sweeps, runs) if n is m and r is not None}
            if not sweep:
                log(f"{name} {m.name}: no seed-0 run of its rho sweep: left out")
                continue
            chosen[m.name] = choose(sweep, task.lower_is_better)
            log(f"{name} {m.name}: validation {metric} by rho {sweep} -> rho={chosen[m.name]}")
            incomplete(ctx, name, f"{m.name} rho", len(sweep), len(grid_of(m)))
    methods = [m for m in methods if m.sam is None or m.name in chosen]
    # seed-major: each seed's runs back to back, so its throughput ratios are side by side
    jobs = [job(m, chosen.get(m.name, 0.0), seed) for seed in seeds for m in methods]
    finals: dict[str, list[dict]] = {m.name: [] for m in methods}
    for j, r in zip(jobs, execute(jobs, ctx)):
        if r is not None:
            finals[j.method.name].append(r)
    paired = {r["seed"] for r in finals[methods[0].name]}  # seeds with an AdamW run to pair with
    for n, runs in finals.items():
        if unpaired := sorted(r["seed"] for r in runs if r["seed"] not in paired):
            log(f"{name} {n}: seeds {unpaired} left out (no AdamW run of theirs to pair with)")
    finals = {n: [r for r in runs if r["seed"] in paired] for n, runs in finals.items()}
    finals = {n: runs for n, runs in finals.items() if runs}
    if methods[0].name not in finals:
        if not ctx["dry_run"]:
            log(f"{name}: no AdamW run to compare with: left out")
        return None
    return finals, chosen, lr


# --------------------------------------------------------------------------------------------------- report
def share_of_gain(base: dict[int, dict], full: dict[int, dict], runs: list[dict], read):
    """The share of full SAM's gain `runs` keep (`study_stats.gain_fraction`) over the seeds they and full SAM both
    ran; `read(run)` is the metric; `None` without such seeds."""
    both = [r for r in runs if r["seed"] in full]
    if not both:
        return None
    return gain_fraction([read(base[r["seed"]]) for r in both], [read(full[r["seed"]]) for r in both],
                         [read(r) for r in both])


def summarise(task: Task, finals: dict[str, list[dict]], chosen: dict[str, float],
              costs: dict[str, float] | None = None, wall_ratios: bool = True) -> tuple[list[str], list[dict]]:
    """Test metric per method; throughput ÷ AdamW from `costs` (measured side by side) when given, else from the
    runs' wall times (`wall_ratios`; otherwise 'not measured': runs that shared the cores)."""
    metric, lower = task.metric, task.lower_is_better
    sign = -1 if lower else 1  # the share of a gain: a drop in perplexity is one
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
        wins = sum(v < b if lower else v > b for b, v in zip(adamw, vals))
        f1 = mean_std([r["test"]["f1"] for r in runs]) if "f1" in runs[0]["test"] else "-"
        scale = 1 if lower else 100  # perplexity; accuracy in points
        paired = "-" if name == "adamw" else f"{diff.format(scale)} ({wins}/{len(runs)} better)"
        share = None if name in ("adamw", "full SAM") else share_of_gain(base, full, runs,
                                                                         lambda r: sign * r["test"][metric])
        share = ("-" if share is None else "- (full SAM gained nothing)" if math.isnan(share.mean) else
                 share.format(1).replace("+", ""))
        lines.append(f"| {task.name} | {name} | {chosen.get(name, '-')} | {mean_std(vals)} | {f1} | "
                     f"{statistics.mean(r['wall_s'] for r in runs):.0f} | "
                     f"{f'{statistics.mean(thr):.2f}' if thr else 'not measured'} | {paired} | "
                     f"{share} |")
        points.append(dict(task=task.name, method=name, mean=statistics.mean(vals),
                           std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                           cost=statistics.mean(rel_cost) if rel_cost else None))
    return lines, points


def summarise_robust(task: Task, finals: dict[str, list[dict]], chosen: dict[str, float],
                     costs: dict[str, float]) -> tuple[list[str], list[dict]]:
    """Test accuracy at the end and at the best validation epoch; per method the mean paired difference against AdamW
    with its 95% t interval, and the share of full SAM's gain it keeps with a paired bootstrap interval (seeds that
    both the method and full SAM ran)."""
    base = {r["seed"]: r for r in finals["adamw"]}
    full = {r["seed"]: r for r in finals.get("full SAM", [])}
    lines, points = [], []
    for name, runs in finals.items():
        row = [task.name, name, str(chosen.get(name, "-")), str(len(runs))]
        for split in ("test", "test_at_best_validation"):
            vals = [r[split]["accuracy"] for r in runs]
            diff = paired_difference([base[r["seed"]][split]["accuracy"] for r in runs], vals)
            wins = sum(r[split]["accuracy"] > base[r["seed"]][split]["accuracy"] for r in runs)
            row += [mean_std(vals), "-" if name == "adamw" else f"{diff.format(100)} ({wins}/{len(runs)})"]
            if split == "test":
                share = None if name == "adamw" else share_of_gain(base, full, runs, lambda r: r["test"]["accuracy"])
                row.append("-" if share is None or name == "full SAM" else f"- (full SAM gained nothing) (n={share.n})"
                           if math.isnan(share.mean) else f"{share.format(1)} (n={share.n})".replace("+", ""))
            points.append(dict(task=task.name, method=name, split=split, mean=statistics.mean(vals),
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
        ax.set_ylabel(f"test {TASKS[task].metric}" + (" (lower is better)" if TASKS[task].lower_is_better else ""))
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure_costs(task: Task, methods: list[Method], ctx: dict, lr: float | None, rounds: int = 3,
                  steps: int = 12) -> dict[str, float]:
    """Throughput ÷ AdamW of each method on the task's model and data, with the task's own TrainingArguments (e.g. the
    chat tasks' bf16 autocast and padding-free batches, through TRL's `SFTTrainer`): interleaved rounds of `steps`
    timed steps (after 2 warm-up steps; whole `sam_interval=4` cycles; a probe picks its layers at step 0), each
    round's mean step time, the median over rounds of the per-round ratio. Needs an otherwise idle machine."""
    budget = task.budget(ctx["quick"])
    hp = run_config(task.name, budget, lr)
    if ctx["quick"]:  # the smoke sizes: one short round
        rounds, steps = 1, 4
    per_round: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(rounds):
        step_time = {}
        for m in methods:
            recipe = task.recipe(task, hp, task_data(task, budget, ctx), 0)
            common = dict(recipe.args, output_dir=str(ctx["out"] / "tmp"), report_to="none", save_strategy="no",
                          use_cpu=ctx["device"] == "cpu", disable_tqdm=True, logging_strategy="no", seed=0,
                          per_device_train_batch_size=hp["batch"], learning_rate=hp["lr"], max_steps=steps + 2)
            timer = StepTimer(ctx["device"])  # the first 2 steps are warm-up, left out below
            quiet(make_trainer(m.training_args(common), m.sam, 0.05, sft=recipe.sft, model=recipe.model,
                               train_dataset=recipe.train_dataset,
                               **dict(recipe.trainer_kwargs, callbacks=[timer]))).train()
            step_time[m.name] = statistics.mean(timer.times[2:])
        for m in methods:
            per_round[m.name].append(step_time["adamw"] / step_time[m.name])
    return {name: statistics.median(r) for name, r in per_round.items()}


def measured_costs(task: Task, methods: list[Method], ctx: dict, lr: float | None, measure: bool,
                   finals: dict[str, list[dict]] | None = None) -> dict[str, float]:
    """`measure_costs`, kept in `<out>/costs_<task>.json` (measured again with `--measure_cost`, else read).

    A probe re-selects during training (every 25 steps), so a short timing from step 0 would time its first pick;
    it is timed with the layers its seed-0 run ended with (`finals`), as a fixed pattern."""
    device = ctx["device"]
    path = ctx["out"] / (f"costs_{task.name}.json" if device == "cpu" else f"costs_{task.name}_{device}.json")
    if measure:
        ctx["log"](f"{task.name}: measuring throughput side by side (the machine must be idle)")
        timed = []
        for m in methods:
            if m.sam and m.sam.get("sam_selection") == "probe" and finals and finals.get(m.name):
                layers = sorted({name.rsplit(".", 1)[0] for name in finals[m.name][0]["perturbed"]})
                m = Method(m.name, dict(sam_selection="pattern", sam_target_layers=layers), args=m.args)
            timed.append(m)
        path.write_text(json.dumps(measure_costs(task, timed, ctx, lr), indent=1))
    return json.loads(path.read_text()) if path.exists() else {}


def benchmark_costs(task: Task, device: str = "cpu") -> dict[str, float]:
    """Throughput ÷ AdamW per method from `scripts/benchmark_throughput.py`'s JSON files (`Task.cost_files` on
    `device`, through `Task.cost_proxy`; each ratio measured against the AdamW of its own run; a later file's figure
    replaces an earlier one's; empty if not run)."""
    ratios = {}
    for name in task.cost_files:
        path = THROUGHPUT_DIR / name.format(device=device)
        if path.exists():
            ratios.update({r["method"]: r["ratio_to_adamw"] for r in json.loads(path.read_text())["results"]})
    return {name: ratios[bench] for name, bench in dict(task.cost_proxy, adamw="adamw").items() if bench in ratios}


def task_costs(task: Task, methods: list[Method], ctx: dict, lr: float | None, measure: bool,
               finals: dict[str, list[dict]]) -> dict[str, float]:
    """Each method's throughput ÷ AdamW: the task's own side-by-side timing (`Task.measurable`) over the benchmark's
    ratios of the same modes (`Task.cost_files`)."""
    costs = benchmark_costs(task, ctx["device"])
    if task.measurable:
        costs = dict(costs, **measured_costs(task, methods, ctx, lr, measure, finals))
    return costs


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


def machines(finals: list[dict[str, list[dict]]]) -> str:
    """The machines the runs ran on (`MACHINE` for a run that did not record it: the CPU runs made before)."""
    return "; ".join(sorted({r.get("machine", MACHINE) for f in finals for runs in f.values() for r in runs}))


def write_report(stem: Path, header: str, lines: list[str], note: str, draw, ctx: dict) -> None:
    """`<stem>.md` (the table and its note, with the choices made on an incomplete sweep) and `<stem>.png`
    (`draw(path)`), and the table on stdout."""
    partial = ctx.get("partial_sweeps", [])
    if partial:  # the choice is the best of the runs there are: said, not hidden
        note += (" Chosen from an incomplete sweep (runs not in the cache): " + "; ".join(partial) + ".")
    table = header + "\n" + "\n".join(lines) + "\n\n" + note + "\n"
    stem.with_suffix(".md").write_text(table)
    draw(stem.with_suffix(".png"))
    print("\n" + table)
    ctx["log"](f"done: {stem}.md, {stem}.png")


def report_robust(a, results: list[tuple], seeds: list[int], rhos: list[float], ctx: dict) -> None:
    """The robustness report: `<report>.md`, `<report>.png` and `<report>_pareto.png`."""
    lines, points = [], []
    for task, finals, chosen, costs, _ in results:
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
            f"Machine: {machines([r[1] for r in results])}. Budget: {results[0][0].budget(a.quick)}.")
    write_report(ctx["out"] / a.report, header, lines, note, lambda path: plot_robust(points, path), ctx)
    plot_pareto(points, ctx["out"] / f"{a.report}_pareto.png")


def paired_cell(base: dict[int, dict], runs: list[dict], split: str = "test") -> str:
    """`+1.23 [+0.40, +2.06] (5/8)`: the mean paired difference against `base` (seed -> run) in points over the
    seeds both ran, its 95% t interval, and the seeds ahead; `-` without a shared seed."""
    both = [r for r in runs if r["seed"] in base]
    if not both:
        return "-"
    pairs = [(base[r["seed"]][split]["accuracy"], r[split]["accuracy"]) for r in both]
    diff = paired_difference([b for b, _ in pairs], [o for _, o in pairs])
    return f"{diff.format(100)} ({sum(o > b for b, o in pairs)}/{len(pairs)})"


def report_baselines(a, results: list[tuple], seeds: list[int], rhos: list[float], ctx: dict) -> None:
    """The plain-baseline report (`--baselines`): per task the grid's mean validation (and test) accuracy per
    configuration and the chosen reference, then each row's test accuracy with its paired gain over the reference
    and over the suite's AdamW; `<report>.png`: the gains over the reference."""
    grid_lines, lines, points = [], [], []
    for task, finals, chosen, _, methods in results:
        info = ctx.get("baselines", {}).get(task.name)
        if info is None:
            continue
        grids = swept_rhos(methods, rhos)
        ref_name, ref_lr = info["reference"] or (None, None)
        plain = {m.name: m for m in baseline_grid(task.family)}
        # the configurations run on every selection seed first (best first), then the partly run ones
        selection_seeds = len(info["seeds"])

        def order(kv, selection_seeds=selection_seeds):
            return len(kv[1]) < selection_seeds, -statistics.fmean(kv[1])

        for (row, lr), vals in sorted(info["scores"].items(), key=order):
            mark = " **reference**" if (row, lr) == (ref_name, ref_lr) else ""
            opts = ", ".join(f"{k}={v}" for k, v in plain[row].args.items())
            lr_cell = on_edge(lr, plain[row].lrs) if mark else f"{lr:g}"
            grid_lines.append(f"| {task.name} | {row}{mark} | {opts} | {lr_cell} | {len(vals)} | {mean_std(vals)} | "
                              f"{mean_std(info['tests'][(row, lr)])} |")
        if ref_name is None:
            lines.append(f"| {task.name} | (no reference yet: {len(info['scores'])} of {info['configurations']} "
                         f"configurations run, not every one on seeds {info['seeds']}) | - | - | - | - | - |")
        base = {r["seed"]: r for r in finals["adamw"]}
        ref = {r["seed"]: r for r in finals.get(ref_name, [])}
        for name, runs in finals.items():
            label = f"{name} (reference, lr {ref_lr:g})" if name == ref_name else name
            vals = [r["test"]["accuracy"] for r in runs]
            vs_ref = "-" if name == ref_name else paired_cell(ref, runs)
            vs_adamw = "-" if name == "adamw" else paired_cell(base, runs)
            lines.append(f"| {task.name} | {label} | {on_edge(chosen.get(name, '-'), grids.get(name))} | {len(runs)} | "
                         f"{mean_std(vals)} | "
                         f"{vs_ref} | {vs_adamw} |")
            both = [r for r in runs if r["seed"] in ref]
            if name != ref_name and len(both) > 1:
                d = paired_difference([ref[r["seed"]]["test"]["accuracy"] for r in both],
                                      [r["test"]["accuracy"] for r in both])
                points.append(dict(task=task.name, method=figure_label(name, chosen.get(name)), gain=d.mean, lo=d.lo,
                                   hi=d.hi))
        for name, why in info["not_applicable"].items():
            lines.append(f"| {task.name} | {name} | - | 0 | not applicable: {why.split('. ')[0]} | - | - |")
    families = [f for f in PLAIN_LRS if any(t.family == f and t.name in ctx.get("baselines", {}) for t, *_ in results)]
    grid = "; ".join(f"{family}: " + ", ".join(f"{opt} lr {list(PLAIN_LRS[family][opt])} {args or ''}".strip()
                                                for opt, args in PLAIN_OPTIMIZERS.items()) for family in families)
    header = ("| task | plain configuration | TrainingArguments | lr | seeds | validation acc. (mean ± std) | "
              "test acc. (mean ± std) |\n|---|---|---|---|---|---|---|\n" + "\n".join(grid_lines) + "\n\n"
              "| task | method | rho | seeds | test acc. at the end | Δ vs reference, pt [95% CI] (wins) | "
              "Δ vs AdamW, pt [95% CI] (wins) |\n|---|---|---|---|---|---|---|")
    note = (f"Plain-baseline grid: {grid}, each with weight decay {list(WEIGHT_DECAYS)} and label smoothing "
            f"{list(LABEL_SMOOTHINGS)} (label_smoothing_factor); the reference is the configuration with the best mean "
            f"final validation accuracy over seeds {a.reference_seeds}. The rows 'on reference' train with the "
            "reference's optimizer settings and learning rate, rho chosen on validation (seed 0) from its own grid "
            f"(full SAM and the fast preset {list(REFERENCE_RHOS['full'])}, the free preset "
            f"{list(REFERENCE_RHOS['free'])}); full SAM on the suite's AdamW from {rhos}, full momentum from its "
            "momentum grid; '(grid edge)': chosen on an edge of its grid; 'adamw' is the suite's AdamW (lr chosen from "
            f"{ROBUST_LR_GRID}, weight decay 0); full SAM and full momentum (the free preset's options) without "
            f"'on reference' train on it. Seeds {seeds}; Δ: the mean paired difference in points with its 95% t "
            "interval (seeds ahead); a difference whose interval holds 0 is no measured effect. "
            f"Machine: {machines([r[1] for r in results])}. Budget: {results[0][0].budget(a.quick)}.")
    write_report(ctx["out"] / a.report, header, lines, note, lambda path: plot_gains(points, path), ctx)


def figure_label(name: str, rho: Any) -> str:
    """A row of the baseline report as the figure names it: what it ran on, and its rho. Rows without 'on reference'
    train on the suite's AdamW; 'full momentum' is the free preset's options there."""
    shown = {"adamw": "AdamW (the suite's)", "full momentum": "free preset's options"}.get(name, name)
    if name != "adamw" and not name.endswith(" on reference"):
        shown += " on the suite's AdamW"
    return shown if rho in (None, "-") else f"{shown}, rho {rho}"


def plot_gains(points: list[dict], path: Path) -> None:
    """The paired test-accuracy gain over the reference (points, 95% t interval) per method, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(p["task"] for p in points)) or ["(no runs)"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        shown = [p for p in points if p["task"] == task]
        for i, p in enumerate(shown):
            err = [[(p["gain"] - p["lo"]) * 100], [(p["hi"] - p["gain"]) * 100]] if math.isfinite(p["lo"]) else None
            ax.errorbar(p["gain"] * 100, i, xerr=err, fmt="o", capsize=3)
        ax.set_yticks(range(len(shown)), [p["method"] for p in shown], fontsize=7)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("test accuracy gain over the reference, points (95% CI)")
        ax.set_title(f"{task}: gain over the best plain configuration (reference)", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def on_edge(value: Any, grid: Any) -> str:
    """`value`, marked when validation chose it on an edge of its `grid` of several values (the best may lie
    beyond: a grid to extend).

        >>> on_edge(0.01, (0.01, 0.05, 0.1)), on_edge(0.05, (0.01, 0.05, 0.1)), on_edge(0.05, (0.05,))
        ('0.01 (grid edge)', '0.05', '0.05')
    """
    grid = list(grid or ())
    if value is None or value == "-":
        return "-"
    return f"{value} (grid edge)" if len(grid) > 1 and value in (min(grid), max(grid)) else f"{value}"


def swept_rhos(methods: list[Method], rhos: list[float]) -> dict[str, list[float]]:
    """Each row's rho grid where it sweeps one (not a row taking another's rho, not a plain row)."""
    return {m.name: m.grid(rhos) for m in methods if m.sam is not None and m.rho_from is None}


def paired_metric(base: dict[int, dict], runs: list[dict], read, scale: float = 1.0) -> str:
    """The mean paired difference `read(run) - read(base run)` over the seeds both ran, times `scale`, with its 95%
    t interval (and `(n=k)` when `base` has fewer of the seeds than `runs`); `-` without a shared seed."""
    both = [r for r in runs if r["seed"] in base]
    if not both:
        return "-"
    cell = paired_difference([read(base[r["seed"]]) for r in both], [read(r) for r in both]).format(scale)
    return cell if len(both) == len(runs) else f"{cell} (n={len(both)})"


def forgetting(run: dict) -> float:
    """How much the fine-tuning raised the NLL of the held-out text (nats per token; negative: lowered it)."""
    return run["forgetting"]["nll_after"] - run["forgetting"]["nll_before"]


PLAIN_ROWS = ("adamw", "adafactor")  # the chat study's plain optimizers


def strongest_plain(finals: dict[str, list[dict]]) -> str:
    """The plain row (`PLAIN_ROWS`) with the higher mean test accuracy over the seeds every plain row ran: the
    baseline a SAM row must beat (chosen on test, the stronger baseline, so the comparison favours no SAM row)."""
    rows = {name: {r["seed"]: r["test"]["accuracy"] for r in finals[name]} for name in PLAIN_ROWS if finals.get(name)}
    seeds = set.intersection(*(set(acc) for acc in rows.values()))
    if not seeds:
        return "adamw"
    return max(rows, key=lambda name: (statistics.mean(rows[name][s] for s in seeds), name == "adamw"))


def report_chat(a, results: list[tuple], seeds: list[int], rhos: list[float], ctx: dict) -> None:
    """The SmolLM2 report: per method its test answer accuracy, answer NLL and forgetting, each with the mean paired
    difference against AdamW and its 95% t interval; the learning rates and rhos chosen on validation; throughput ÷
    AdamW (`--measure_cost` on the task's own recipe, else the benchmark's ratio of the same mode)."""
    lines, points, strongest = [], [], {}
    for task, finals, chosen, costs, methods in results:
        base = {r["seed"]: r for r in finals["adamw"]}
        grids = swept_rhos(methods, rhos)
        lr_grids = {m.name: m.lrs for m in methods if m.lrs} | {"adamw": task.lr_grid}
        plain = strongest[task.name] = strongest_plain(finals)
        best = {r["seed"]: r for r in finals[plain]}
        lrs = ctx.get("chosen_lr", {}).get(task.name, {})
        for name, runs in finals.items():
            acc = [r["test"]["accuracy"] for r in runs]
            nll = [r["test"]["answer_nll"] for r in runs]
            forget = [forgetting(r) for r in runs]
            wins = sum(r["test"]["accuracy"] > base[r["seed"]]["test"]["accuracy"] for r in runs)
            lr = lrs.get(name, lrs.get("adamw"))
            cells = ["-"] * 3 if name == "adamw" else [
                f"{paired_metric(base, runs, lambda r: r['test']['accuracy'], 100)} ({wins}/{len(runs)})",
                paired_metric(base, runs, lambda r: r["test"]["answer_nll"]), paired_metric(base, runs, forgetting)]
            vs_best = "-" if name in PLAIN_ROWS else paired_metric(best, runs, lambda r: r["test"]["accuracy"], 100)
            lr_cell = on_edge(lr, lr_grids.get(name) if name in PLAIN_ROWS else ())  # SAM rows: AdamW's
            lines.append(f"| {task.name} | {name} | {on_edge(chosen.get(name, '-'), grids.get(name))} | {lr_cell} | "
                         f"{len(runs)} | {mean_std(acc)} | {cells[0]} | {vs_best} | {mean_std(nll)} | {cells[1]} | "
                         f"{mean_std(forget, '+.4f')} | {cells[2]} | "
                         f"{statistics.mean(r['wall_s'] for r in runs):.0f} | "
                         f"{f'{costs[name]:.2f}' if name in costs else 'not measured'} |")
            points.append(dict(task=task.name, method=name, mean=statistics.mean(acc),
                               std=statistics.stdev(acc) if len(acc) > 1 else 0.0, cost=None))
    header = ("| task | method | rho | lr | seeds | test answer accuracy | Δ vs AdamW, pt [95% CI] (wins) | Δ vs the "
              "strongest plain row, pt [95% CI] | answer NLL | Δ vs AdamW [95% CI] | forgetting (NLL after - before) "
              "| Δ vs AdamW [95% CI] | wall s | throughput ÷ AdamW |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
              "---|---|")
    wds = {t.name: ctx.get("chosen_lr", {}).get(t.name, {}).get("weight_decay") for t, *_ in results}
    note = (f"Seeds {seeds}; mean ± std over seeds; Δ: the mean paired difference against AdamW (same seed: the "
            "same data order, LoRA initialisation and label noise) with its 95% t interval; an interval holding 0 is "
            "no measured effect. Answer accuracy: the most likely of negative/neutral/positive after the generation "
            "prompt; answer NLL: the mean negative log-likelihood of the right answer's first token (whole "
            "vocabulary); forgetting: the NLL per token of the first forget_blocks x forget_block tokens of "
            "a-midsummer-night-s-dream (not fine-tuned on) after training minus before (positive: forgot). AdamW's "
            f"learning rate and weight decay chosen on validation (seed 0) from the task's grids (chosen weight "
            f"decay: {wds}), Adafactor's learning rate likewise (with AdamW's chosen weight decay); every SAM row "
            f"trains with AdamW's; rho from each row's grid{own_grids(results)}. The strongest plain row: of "
            f"{list(PLAIN_ROWS)}, the one with the higher mean test accuracy over the seeds both ran ({strongest}); "
            "every SAM row's accuracy is also paired against it. Throughput ÷ AdamW: `--measure_cost`, the methods "
            "timed side by side on the task's own recipe (bf16 autocast, padding-free batches, TRL's SFTTrainer) "
            "on an idle machine, the median over 3 rounds of 12 steps (`costs_<task>.json`); where not timed yet, the "
            "ratio of the same mode on the SmolLM2 LoRA benchmark shape (`benchmarks/throughput/`). "
            f"Machine: {machines([r[1] for r in results])}. Budget: {results[0][0].budget(a.quick)}.")
    write_report(ctx["out"] / a.report, header, lines, note, lambda path: plot(points, path), ctx)


def own_grids(results: list[tuple]) -> str:
    """` (name: [rhos], ...)` for the reported rows with their own rho grid (ASAM's is named apart)."""
    grids = {m.name: list(m.rhos) for *_, methods in results for m in methods
             if m.rhos is not None and not (m.sam or {}).get("sam_adaptive")}
    return f" ({', '.join(f'{name}: {grid}' for name, grid in grids.items())})" if grids else ""


def report_main(a, results: list[tuple], seeds: list[int], rhos: list[float], ctx: dict) -> None:
    """The main (and chat) report: `<report>.md` and `<report>.png`."""
    lines, points = [], []
    for task, finals, chosen, costs, _ in results:
        task_lines, task_points = summarise(task, finals, chosen, costs, wall_ratios=task.measurable)
        lines += task_lines
        points += task_points
    header = ("| task | method | rho | test accuracy / perplexity (mean ± std) | macro-F1 | wall s | "
              "throughput ÷ AdamW | paired Δ vs AdamW, 95% t interval (seeds better) | share of full SAM's gain |"
              "\n|---|---|---|---|---|---|---|---|---|")
    note = (f"Metric: accuracy for cls tasks (macro-F1 beside it), perplexity for lm (lower is better). "
            f"Seeds {seeds}; " + (f"rho chosen per method on validation from {rhos}" if len(rhos) > 1 else
                                  f"rho fixed at {rhos[0]} (no sweep)")
            + (f" (ASAM: {a.asam_rhos})" if a.asam else "") + own_grids(results)
            + f". Machine: {machines([r[1] for r in results])}. "
            f"Budget: {results[0][0].budget(a.quick)}. Paired Δ: the mean paired difference against AdamW "
            f"(accuracy in points) with its 95% t interval; share of full SAM's gain: mean Δ / full SAM's mean Δ, "
            f"95% paired bootstrap interval (inf: "
            f"full SAM's own gain not established). Chat tasks' throughput: the SmolLM2 LoRA benchmark "
            f"(`benchmarks/throughput/throughput_smollm2_lora_{ctx['device']}.json`), not the study's runs, which "
            f"shared the cores.")
    write_report(ctx["out"] / a.report, header, lines, note, lambda path: plot(points, path), ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny budgets, seeds 0 1, rho 0.05 only (a few minutes)")
    p.add_argument("--suite", default=None, choices=list(SUITES),
                   help="main: cls-full, cls-lora, lm; chat: the SmolLM2 chat tasks; robustness: label noise, small "
                        "data, digits (see above). Default: the suite of --tasks, else main")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS), help="default: the suite's tasks")
    p.add_argument("--methods", nargs="+", default=None, help="run only these methods of the suite's table (+ AdamW)")
    p.add_argument("--measure_cost", action="store_true",
                   help="measure each method's throughput ÷ AdamW on each task side by side (an idle machine)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing; tabulate the cached runs (missing ones are left out)")
    p.add_argument("--dry_run", action="store_true", help="train and write nothing; list the runs still to do")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where runs train; a GPU's runs are cached and reported apart from the CPU's (default: cpu)")
    p.add_argument("--workers", type=int, default=1, help="runs trained at a time, in worker processes (default: 1)")
    p.add_argument("--time_budget", type=float, default=None,
                   help="seconds after which no run starts (the runs left resume next time; default: no limit)")
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
    p.add_argument("--baselines", action="store_true",
                   help="robustness tasks: run the plain-baseline grid (AdamW, Adafactor, SGD with momentum; their "
                        "learning rates, weight decay, label smoothing) on --reference_seeds, take the best by mean "
                        "validation accuracy as the reference, and SAM on top of it; report: baselines")
    p.add_argument("--reference_seeds", type=int, nargs="+", default=None,
                   help="seeds the reference is chosen on (default: 0 1 2; quick: 0)")
    p.add_argument("--out", default="benchmarks/accuracy", help="output folder (runs are cached here)")
    p.add_argument("--report", default=None,
                   help="name of the table and figure: <out>/<report>.md and .png (default: accuracy / "
                        "accuracy_smollm2 / robustness, with _<device> off the CPU)")
    a = p.parse_args()
    suites = {TASKS[t].suite for t in a.tasks or ()}
    if len(suites) > 1:
        p.error(f"--tasks {' '.join(a.tasks)} mix the suites {', '.join(sorted(suites))}: run one suite at a time")
    suite = a.suite or (suites.pop() if suites else "main")
    a.tasks = a.tasks or list(SUITES[suite])
    if any(TASKS[t].suite != suite for t in a.tasks):
        p.error(f"--tasks {' '.join(a.tasks)} do not belong to --suite {suite}")
    if a.baselines and suite != "robustness":
        p.error(f"--baselines: the plain-baseline grid runs on the robustness tasks, not the {suite} suite's")
    a.reference_seeds = a.reference_seeds or ([0] if a.quick else [0, 1, 2])
    a.report = a.report or ("baselines" if a.baselines else REPORTS[suite]) + ("" if a.device == "cpu" else
                                                                                f"_{a.device}")
    if a.device == "cuda" and not (a.report_only or a.dry_run) and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu, or --report_only / --dry_run)")
    if a.workers < 1:
        p.error(f"--workers {a.workers}: give 1 or more")
    seeds = a.seeds or ([0, 1] if a.quick else [0, 1, 2])
    rhos = a.rhos or ([0.05] if a.quick else [0.01, 0.05, 0.1])
    a.asam_rhos = a.asam_rhos or ([0.5] if a.quick else [0.1, 0.5, 1.0])
    tables = {t: methods_table(TASKS[t], a) for t in a.tasks}
    unknown = sorted(set(a.methods or ()) - {m.name for table in tables.values() for m in table})
    if unknown:
        p.error(f"--methods {', '.join(unknown)}: not in the {suite} suite's methods table "
                f"({', '.join(dict.fromkeys(m.name for table in tables.values() for m in table))})")
    out = Path(a.out) / ("quick" if a.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    threads = a.threads or max(torch.get_num_threads(), 1)
    torch.set_num_threads(threads)
    t0 = time.time()
    ctx = dict(out=out, cache=Path(a.out) / "cache", log=_Log(t0), t0=t0, device=a.device, quick=a.quick,
               report_only=a.report_only, dry_run=a.dry_run, workers=a.workers, threads=threads, data={},
               deadline=None if a.time_budget is None else t0 + a.time_budget)
    results = []
    try:
        for name in a.tasks:
            task = TASKS[name]
            done = run_task(task, tables[name], seeds, rhos, ctx, a)
            if done is not None:
                finals, chosen, lr = done
                methods = [m for m in tables[name] if m.name in finals]
                costs = task_costs(task, methods, ctx, lr, a.measure_cost, finals)
                results.append((task, finals, chosen, costs, methods))
    finally:
        if "pool" in ctx:
            ctx["pool"].shutdown()
    if a.dry_run or not results:
        ctx["log"](f"--dry_run: {len(ctx.get('listed', ()))} runs to do, nothing written" if a.dry_run else
                   "nothing written: no task has runs to report")
        return
    report = (report_baselines if a.baselines else report_robust if suite == "robustness" else
              report_chat if suite == "chat" else report_main)
    report(a, results, seeds, rhos, ctx)


if __name__ == "__main__":
    main()
