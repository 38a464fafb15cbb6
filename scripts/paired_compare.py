"""Paired comparisons of two rows of a study from the run cache: the mean test-accuracy difference B - A over the seeds
both have, in points, with its 95% paired t interval and how many seeds B is ahead. For rows whose right baseline is
not AdamW's default schedule, e.g. a SAM tail on a warmup-stable-decay schedule against AdamW on that schedule.

    python scripts/paired_compare.py --task digits-noise40 --pairs "adamw WSD:full SAM late 80% WSD"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_stats import paired_difference  # noqa: E402

RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / "runs"


def accuracies(task: str, method: str, rho: float | None = None) -> dict[int, float]:
    """Test accuracy at the end per seed of one cached row (at `rho`, else its only rho with several seeds)."""
    runs = [json.loads(p.read_text()) for p in RUNS.glob(f"{task}__{method.replace(' ', '_')}__rho*__seed*.json")]
    runs = [r for r in runs if r["method"] == method and r["task"] == task]
    if rho is None and runs:
        counts: dict[float, int] = {}
        for r in runs:
            counts[r["rho"]] = counts.get(r["rho"], 0) + 1
        rho = max(counts, key=counts.get)  # the chosen rho: the one run on every seed
    return {r["seed"]: r["test"]["accuracy"] for r in runs if r["rho"] == rho}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True)
    p.add_argument("--pairs", nargs="+", required=True, help="'A:B' row names; prints B - A")
    a = p.parse_args()
    print("| task | B | A | seeds | B - A, pt [95% CI] | B ahead |")
    print("|---|---|---|---|---|---|")
    for pair in a.pairs:
        first, second = pair.split(":")
        x, y = accuracies(a.task, first), accuracies(a.task, second)
        seeds = sorted(set(x) & set(y))
        if len(seeds) < 2:
            print(f"| {a.task} | {second} | {first} | {len(seeds)} | too few paired seeds | - |")
            continue
        d = paired_difference([x[s] for s in seeds], [y[s] for s in seeds])
        ahead = sum(y[s] > x[s] for s in seeds)
        print(f"| {a.task} | {second} | {first} | {len(seeds)} | {100 * d.mean:+.2f} [{100 * d.lo:+.2f}, "
              f"{100 * d.hi:+.2f}] | {ahead}/{len(seeds)} |")


if __name__ == "__main__":
    main()
