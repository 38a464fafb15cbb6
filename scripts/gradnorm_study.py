#!/usr/bin/env python
"""Does layer-wise SAM suppress the *whole model's* gradient norm almost as much as full SAM (the paper's claim)?

Trains one model on one task with each of `--methods` (default: plain AdamW through the stock `Trainer`, full SAM
`sam_selection="all"`, the output-side default pattern, and the probe in three modes: layer/grad_norm,
block/grad_norm, block/grad_norm_per_cost, all k=2), for each of `--seeds` (default 0 1 2: the head's initialisation
and the data order). Every `--measure_every` optimizer steps it records the whole model's gradient norm ||grad L(w)||
of the clean loss on fixed training batches (eval mode, so dropout adds no noise; that time is excluded from the wall
time). The table gives, per method, the mean ± std over seeds of the last third's mean norm, its ratio to AdamW's
(paired per seed) and the share of full SAM's reduction it achieves, (AdamW - method) / (AdamW - full SAM). Runs are
cached under `<output_dir>/gradnorm_runs/` (resumable; the cache of `scripts/study_harness.py`). Writes
`<output_dir>/gradnorm_<task>.{md,png,json}` (`gradnorm_<task>_quick.*` with `--quick`).

Offline defaults: `--task minilm` fine-tunes the shipped all-MiniLM-L6-v2 on the shipped tweets (3-class accuracy);
`--task gpt2` trains a small byte-level GPT-2 from scratch on the shipped Shakespeare plays (validation perplexity).
With the Hub reachable, `--model_name` loads another checkpoint for the minilm task.

    python scripts/gradnorm_study.py              # 3 seeds x 300 steps x 6 methods: ~1.5 h on 2 CPU cores
    python scripts/gradnorm_study.py --quick      # < 3 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from hf_lwsam import probe_layer_grad_norms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))  # the shared study modules beside this file, also when loaded by path
from study_harness import cached, make_trainer, mean_std  # noqa: E402


# ------------------------------------------------------------------------------------------------------ tasks
@dataclass
class Task:
    """A model factory (same seed, same weights every call), the data, and how to read the eval metric."""

    name: str
    make_model: Callable[[], torch.nn.Module]
    train: Dataset
    eval: Dataset
    metric_name: str
    metric: Callable[[dict[str, float]], float]  # eval results -> the reported metric
    higher_is_better: bool
    compute_metrics: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _accuracy(prediction) -> dict[str, float]:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def minilm_task(n_train: int, n_eval: int, max_length: int, seed: int, model_name: str | None = None) -> Task:
    """The shipped MiniLM (or `model_name`) fine-tuned on the shipped 3-class tweets; metric: accuracy."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_lwsam.data import load_tweets, minilm_path

    path = model_name or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tweets = load_tweets(max_train_samples=n_train)
    tweets["validation"] = tweets["validation"].select(range(min(n_eval, len(tweets["validation"]))))
    tokenized = tweets.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length,
                                               padding="max_length"), batched=True, remove_columns=["text"])
    tokenized = tokenized.rename_column("label", "labels")

    def make() -> torch.nn.Module:
        torch.manual_seed(seed)  # the new classifier head: the same initialisation for every run
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)

    return Task("minilm", make, tokenized["train"], tokenized["validation"], "accuracy",
                lambda r: r["eval_accuracy"], True, _accuracy)


def _play_bytes() -> tuple[bytes, bytes]:
    from hf_lwsam.data import shakespeare_files

    files = shakespeare_files()
    names = sorted(files)
    held_out = "hamlet" if "hamlet" in files else names[-1]
    read = lambda n: open(files[n][0], "rb").read()  # noqa: E731
    return b"\n".join(read(n) for n in names if n != held_out), read(held_out)


def gpt2_task(n_train: int, n_eval: int, seq_len: int, seed: int, n_layer: int = 4, n_embd: int = 128) -> Task:
    """A byte-level GPT-2 trained from scratch on the plays (Hamlet held out); metric: validation perplexity."""
    from transformers import GPT2Config, GPT2LMHeadModel

    train_text, eval_text = _play_bytes()
    rng = np.random.default_rng(seed)

    def chunks(text: bytes, n: int) -> Dataset:
        starts = rng.integers(0, len(text) - seq_len - 1, size=n)
        rows = [list(text[s : s + seq_len]) for s in starts]
        return Dataset.from_dict({"input_ids": rows, "labels": rows})

    def make() -> torch.nn.Module:
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=256, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=4,
                            bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"
        return model

    return Task("gpt2", make, chunks(train_text, n_train), chunks(eval_text, n_eval), "perplexity",
                lambda r: math.exp(r["eval_loss"]), False)


def build_task(name: str, quick: bool, seed: int = 0, model_name: str | None = None,
               train_samples: int | None = None, eval_samples: int | None = None) -> Task:
    """`minilm` or `gpt2` at the default or `quick` size; `train_samples`/`eval_samples` override the sizes."""
    if name == "minilm":
        n_train, n_eval, length = (64, 64, 32) if quick else (1280, 500, 48)
        return minilm_task(train_samples or n_train, eval_samples or n_eval, length, seed=seed, model_name=model_name)
    if name == "gpt2":
        n_train, n_eval, length = (96, 64, 64) if quick else (1920, 256, 128)
        return gpt2_task(train_samples or n_train, eval_samples or n_eval, length, seed=seed,
                         **(dict(n_layer=2, n_embd=64) if quick else {}))
    raise ValueError(f"--task {name!r} is unknown: use 'minilm' or 'gpt2'.")


def batches_of(dataset: Dataset, size: int, count: int) -> list[dict[str, torch.Tensor]]:
    return [default_data_collator([dataset[j] for j in range(i * size, (i + 1) * size)]) for i in range(count)]


# --------------------------------------------------------------------------------------------- measurement
class GradNormRecorder(TrainerCallback):
    """Records ||grad L(w)|| of the whole model (clean loss, fixed batches, eval mode) every `every` steps."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], every: int):
        self.batches, self.every = batches, every
        self.steps: list[int] = []
        self.norms: list[float] = []
        self.seconds = 0.0  # measurement time, subtracted from the wall time

    def measure(self, model: torch.nn.Module, step: int) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        norms = probe_layer_grad_norms(model, self.batches)
        model.train(was_training)
        self.steps.append(step)
        self.norms.append(math.sqrt(sum(v * v for v in norms.values())))  # ||g|| = sqrt(sum_l ||g_l||^2)
        self.seconds += time.perf_counter() - start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.measure(model, state.global_step)


# ------------------------------------------------------------------------------------------------------- runs
METHODS: dict[str, dict[str, Any] | None] = {  # label -> sam options (`None`: plain AdamW, the stock Trainer)
    "AdamW": None,
    "full SAM": dict(sam_selection="all"),
    "output-side pattern": dict(sam_selection="pattern"),
    "probe k=2 (layer, grad_norm)": dict(sam_selection="probe", sam_top_k=2, sam_probe_granularity="layer",
                                         sam_probe_metric="grad_norm"),
    "probe k=2 (block, grad_norm)": dict(sam_selection="probe", sam_top_k=2, sam_probe_granularity="block",
                                         sam_probe_metric="grad_norm"),
    "probe k=2 (block, grad_norm_per_cost)": dict(sam_selection="probe", sam_top_k=2, sam_probe_granularity="block",
                                                  sam_probe_metric="grad_norm_per_cost"),
}


def run_config(task: Task, opts: argparse.Namespace) -> dict[str, Any]:
    """Everything a cached run depends on besides the method and the seed: a cached run made otherwise is redone."""
    return dict(task=task.name, train=len(task.train), eval=len(task.eval), batch=opts.batch_size, steps=opts.steps,
                lr=opts.lr, rho=opts.rho, probe_interval=opts.probe_interval, measure_every=opts.measure_every,
                measure_batches=opts.measure_batches, quick=opts.quick, model_name=opts.model_name)


def train_once(task: Task, label: str, sam: dict[str, Any] | None, opts: argparse.Namespace, seed: int) -> dict:
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="gradnorm_"), per_device_train_batch_size=opts.batch_size,
        max_steps=opts.steps, learning_rate=opts.lr, warmup_steps=0, weight_decay=0.0,
        lr_scheduler_type="linear", logging_steps=max(1, opts.measure_every), save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), seed=seed, disable_tqdm=True, data_seed=seed,
        per_device_eval_batch_size=64,
    )
    model = task.make_model()
    recorder = GradNormRecorder(batches_of(task.train, opts.batch_size, opts.measure_batches), opts.measure_every)
    if sam is not None and sam.get("sam_selection") == "probe":  # the interval only for the probe (refused elsewhere)
        sam = dict(sam, sam_probe_interval=opts.probe_interval)
    trainer = make_trainer(common, sam, opts.rho, model=model, train_dataset=task.train, eval_dataset=task.eval,
                           data_collator=default_data_collator, compute_metrics=task.compute_metrics,
                           callbacks=[recorder])
    start = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - start - recorder.seconds
    metric = task.metric(trainer.evaluate())
    steps, norms = recorder.steps, recorder.norms
    last_third = [n for s, n in zip(steps, norms) if s >= steps[-1] * 2 / 3]
    selected = getattr(trainer, "_sam_layers", None)
    return dict(label=label, seed=seed, metric=metric, grad_norm_last_third=statistics.fmean(last_third), wall_s=wall,
                steps=steps, norms=norms, global_step=result.global_step,
                selected=None if sam is None or sam.get("sam_selection") == "all" else selected)


def cached_run(task: Task, label: str, opts: argparse.Namespace, seed: int, cache: Path) -> dict:
    """`train_once`, cached as JSON under `cache` with its configuration (resumable; another one redoes it)."""
    config = dict(run_config(task, opts), sam=METHODS[label], seed=seed)
    stem = f"{task.name}{'_quick' if opts.quick else ''}__{re.sub(r'[^A-Za-z0-9]+', '_', label)}"
    return cached(cache / f"{stem}__seed{seed}.json", config,
                  lambda: train_once(task, label, METHODS[label], opts, seed))


def _blocks(layers: list[str]) -> list[str]:
    """Layer names with every trunk block's layers shown as the block (`bert.encoder.layer.5`)."""
    out: list[str] = []
    for name in layers:
        match = re.match(r"(.*\.(?:layer|layers|h|block)\.\d+)\.", name)
        short = match.group(1) if match else name
        if short not in out:
            out.append(short)
    return out


def render(task: Task, per_label: dict[str, list[dict]], opts: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """The table (mean ± std over seeds, paired ratios per seed) and the plot (mean curve, min-max band)."""
    base = {r["seed"]: r for r in per_label["AdamW"]}
    full = {r["seed"]: r for r in per_label.get("full SAM", [])}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    lines = [
        f"# Whole-model gradient norm: AdamW vs full SAM vs layer-wise SAM ({task.name})",
        "",
        f"Task `{task.name}`, {len(task.train)} training examples, batch {opts.batch_size}, {opts.steps} steps, "
        f"lr {opts.lr}, rho {opts.rho}, probe interval {opts.probe_interval} steps, seeds {opts.seeds}, device: "
        f"{device}, torch {torch.__version__}. Gradient norm: ||grad L(w)|| of the clean loss on "
        f"{opts.measure_batches} fixed training batches (eval mode) every {opts.measure_every} steps, averaged over "
        "the last third of training. Ratios are paired per seed (mean ± std over seeds). *Share of full SAM's "
        "reduction*: (AdamW - method) / (AdamW - full SAM), per seed. The runs' wall times (in the JSON) are not "
        "a cost measurement: runs shared the cores; see benchmark_throughput.py / --measure_cost for cost.",
        "",
        f"| run | final {task.metric_name} | grad norm (last third) | ÷ AdamW | share of full SAM's reduction | "
        "perturbed at the end (seed 0; blocks named as a whole) |",
        "|---|---|---|---|---|---|",
    ]
    for label, rs in per_label.items():
        gn = [r["grad_norm_last_third"] for r in rs]
        ratio = [r["grad_norm_last_third"] / base[r["seed"]]["grad_norm_last_third"] for r in rs]
        share = [(base[r["seed"]]["grad_norm_last_third"] - r["grad_norm_last_third"])
                 / (base[r["seed"]]["grad_norm_last_third"] - full[r["seed"]]["grad_norm_last_third"])
                 for r in rs if r["seed"] in full and label not in ("AdamW", "full SAM")]
        sel = rs[0]["selected"]
        layers = "all" if label == "full SAM" else ("-" if sel is None else ", ".join(_blocks(sel)))
        lines.append(f"| {label} | {mean_std([r['metric'] for r in rs])} | {mean_std(gn)} | {mean_std(ratio, '.3f')} | "
                     f"{mean_std(share, '.2f') if share else '-'} | {layers} |")
    stem = f"gradnorm_{task.name}{'_quick' if opts.quick else ''}"  # --quick never overwrites the full results
    md = out / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for label, rs in per_label.items():
        steps = rs[0]["steps"]
        curves = np.array([r["norms"] for r in rs])
        style = "-" if label in ("AdamW", "full SAM") else "--"
        ax.plot(steps, curves.mean(0), style, label=f"{label} ({len(rs)} seeds)")
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.15)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("whole-model gradient norm ||grad L(w)||")
    ax.set_yscale("log")
    ax.set_title(f"Whole-model gradient norm during training ({task.name}; mean, band: min-max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return md, png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="minilm", choices=["minilm", "gpt2"])
    parser.add_argument("--model_name", default=None, help="minilm task: a Hub/local sequence-classification model")
    parser.add_argument("--quick", action="store_true", help="tiny settings, < 3 minutes on 2 CPU cores")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 300; 16 with --quick)")
    parser.add_argument("--train_samples", type=int, default=None, help="default: steps x batch (one pass)")
    parser.add_argument("--eval_samples", type=int, default=None, help="default: 500 (minilm), 256 (gpt2)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 16 (8 with --quick)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-4 (minilm), 1e-3 (gpt2)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--probe_interval", type=int, default=None, help="default: 20 (5 with --quick)")
    parser.add_argument("--measure_every", type=int, default=None, help="default: 10 (2 with --quick)")
    parser.add_argument("--measure_batches", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (0 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output_dir", default=str(REPO / "benchmarks"))
    opts = parser.parse_args(argv)
    opts.batch_size = opts.batch_size or (8 if opts.quick else 16)
    opts.steps = opts.steps or (16 if opts.quick else 300)
    opts.seeds = opts.seeds if opts.seeds is not None else ([0] if opts.quick else [0, 1, 2])
    opts.lr = opts.lr or (1e-4 if opts.task == "minilm" else 1e-3)
    opts.probe_interval = opts.probe_interval if opts.probe_interval is not None else (5 if opts.quick else 20)
    opts.measure_every = opts.measure_every or (2 if opts.quick else 10)
    if "AdamW" not in opts.methods:
        opts.methods.insert(0, "AdamW")  # every ratio is paired with AdamW's run of the same seed
    if opts.threads:
        torch.set_num_threads(opts.threads)
    hf_logging.set_verbosity_error()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    per_label: dict[str, list[dict]] = {label: [] for label in opts.methods}
    for seed in opts.seeds:  # seed-major: one seed's runs back to back (the same data order and head init per seed)
        task = build_task(opts.task, opts.quick, seed, opts.model_name,
                          opts.train_samples or opts.steps * opts.batch_size, opts.eval_samples)
        for label in opts.methods:
            r = cached_run(task, label, opts, seed, out / "gradnorm_runs")
            per_label[label].append(r)
            print(f"[seed {seed}] {label:40s} {task.metric_name} {r['metric']:.4f}  grad norm (last third) "
                  f"{r['grad_norm_last_third']:.4f}  wall {r['wall_s']:.1f}s", flush=True)
    md, png = render(task, per_label, opts, out)
    (out / md.with_suffix(".json").name).write_text(json.dumps({"options": vars(opts), "results": per_label}, indent=1))
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
