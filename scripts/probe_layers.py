#!/usr/bin/env python
"""Per-layer gradient norms of a model on its data: the ranking `sam_selection="probe"` would use.

Prints every layer (module owning trainable parameters) ranked by its gradient norm, marks the `--top_k` that a probe
would perturb, and saves a bar chart (layers in depth order, selected ones highlighted) as a PNG (needs matplotlib,
the `plot` extra).

Offline defaults: `--model minilm` is the shipped all-MiniLM-L6-v2 with a new 3-class head on the shipped tweets;
`--model gpt2` is a small byte-level GPT-2 trained from scratch on the shipped Shakespeare plays for
`--train_steps` AdamW steps before probing.

    python scripts/probe_layers.py                       # MiniLM on tweets, top 2
    python scripts/probe_layers.py --model gpt2 --metric grad_norm_per_param --top_k 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from gradnorm_study import REPO, batches_of, build_task  # noqa: E402
from hf_lwsam import probe_layer_grad_norms  # noqa: E402
from hf_lwsam.config import PROBE_METRICS  # noqa: E402
from hf_lwsam.probe import rank_layers, resolve_top_k  # noqa: E402


def plot(norms: dict[str, float], selected: list[str], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(norms)
    fig, ax = plt.subplots(figsize=(max(8, 0.22 * len(names)), 5))
    colors = ["tab:red" if n in selected else "tab:gray" for n in names]
    ax.bar(range(len(names)), [norms[n] for n in names], color=colors)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: red = selected (top {len(selected)})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", choices=["minilm", "gpt2"])
    parser.add_argument("--model_name", default=None, help="minilm: a Hub/local sequence-classification checkpoint")
    parser.add_argument("--metric", default="grad_norm", choices=list(PROBE_METRICS))
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--top_ratio", type=float, default=None, help="wins over --top_k when set")
    parser.add_argument("--batches", type=int, default=4, help="batches whose mean loss is differentiated")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=None, help="gpt2: AdamW steps before probing (default 60)")
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="PNG path (default benchmarks/probe_layers_<model>.png)")
    opts = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    if opts.top_k < 1 or (opts.top_ratio is not None and not 0 < opts.top_ratio <= 1):
        parser.error(f"--top_k={opts.top_k} must be >= 1 and --top_ratio={opts.top_ratio} in (0, 1]")

    print(f"loading {opts.model} ...", flush=True)
    task = build_task(opts.model, opts.quick, opts.seed, opts.model_name)
    model = task.make_model()
    steps = opts.train_steps
    if steps is None:  # none for the pretrained MiniLM; 60 (5 with --quick) for GPT-2, trained from scratch
        steps = 0 if opts.model == "minilm" else (5 if opts.quick else 60)
    if steps:
        print(f"training from scratch for {steps} AdamW steps ...", flush=True)
        args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="probe_layers_"), max_steps=steps,
                                 learning_rate=1e-3, per_device_train_batch_size=opts.batch_size, report_to="none",
                                 save_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=opts.seed)
        Trainer(model=model, args=args, train_dataset=task.train, data_collator=default_data_collator).train()
    count = min(opts.batches, len(task.train) // opts.batch_size)
    batches = batches_of(task.train, opts.batch_size, count)
    print(f"probing {count} batches of {opts.batch_size} ...", flush=True)
    model.train()
    start = time.perf_counter()
    norms = probe_layer_grad_norms(model, batches, metric=opts.metric)
    seconds = time.perf_counter() - start
    k = resolve_top_k(len(norms), opts.top_k, opts.top_ratio)
    selected = rank_layers(norms, k)

    print(f"\n{len(norms)} layers, {opts.metric}, {seconds:.1f}s; '*' = selected by top_k={k}")
    ranked = sorted(norms, key=norms.get, reverse=True)
    for rank, name in enumerate(ranked, 1):
        numel = sum(p.numel() for p in dict(model.named_modules())[name].parameters(recurse=False) if p.requires_grad)
        print(f"{'*' if name in selected else ' '} {rank:3d}. {norms[name]:12.6g}  {numel:>10,}  {name}")
    total = sum(v * v for v in probe_layer_grad_norms(model, batches).values()) ** 0.5 if opts.metric != "grad_norm" \
        else sum(v * v for v in norms.values()) ** 0.5
    print(f"whole-model gradient norm: {total:.6g}")

    out = Path(opts.output) if opts.output else REPO / "benchmarks" / f"probe_layers_{opts.model}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(norms, selected, opts.metric, f"{opts.model}, {opts.metric}", out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
