"""Smoke runs of the benchmark scripts: they run end to end and write what they promise (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_throughput_benchmark_runs_every_method_and_writes_json(tmp_path):
    out = tmp_path / "t.json"
    stdout = _run("scripts/benchmark_throughput.py", "--seq_len", "32", "--batch", "2", "--k", "1", "--rounds", "1",
                  "--steps", "1", "--warmup", "1", "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    names = [r["method"] for r in result["results"]]
    assert names == ["adamw", "full SAM", "LW-SAM k=1 truncated", "LW-SAM k=1 reuse", "LW-SAM k=1 stale",
                     "LW-SAM k=1 reuse interval=4", "full SAM stale"]
    assert all(r["tokens_per_s"] > 0 and r["peak_gib"] > 0 for r in result["results"])
    assert result["results"][0]["ratio_to_adamw"] == 1.0
    assert "| LW-SAM k=1 reuse |" in stdout


def test_throughput_benchmark_runs_inside_trl_sft(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "t.json"
    _run("scripts/benchmark_throughput.py", "--trainer", "sft", "--seq_len", "32", "--batch", "2", "--k", "1",
         "--rounds", "1", "--steps", "1", "--warmup", "1", "--methods", "adamw", "k=1 reuse", "--json", str(out),
         timeout=300)
    result = json.loads(out.read_text())
    assert result["trainer"] == "sft" and [r["method"] for r in result["results"]] == [
        "adamw", "LW-SAM k=1 reuse", "LW-SAM k=1 reuse interval=4"]


def test_throughput_benchmark_help():
    assert "--preset" in _run("scripts/benchmark_throughput.py", "--help", timeout=120)


@pytest.mark.slow
def test_accuracy_benchmark_quick(tmp_path):
    args = ("scripts/benchmark_accuracy.py", "--quick", "--tasks", "lm", "cls-full", "--seeds", "0",
            "--out", str(tmp_path))
    _run(*args, timeout=1800)
    table = (tmp_path / "quick" / "accuracy.md").read_text()
    for method in ("adamw", "full SAM", "LW-SAM default", "LW-SAM probe k=2"):
        assert f"| lm | {method} |" in table and f"| cls-full | {method} |" in table
    assert (tmp_path / "quick" / "accuracy.png").stat().st_size > 1000
    runs = sorted((tmp_path / "quick" / "runs").glob("*.json"))
    assert len(runs) == 2 * 4  # per task: AdamW + 3 SAM methods (one rho, one seed); each run is evaluated twice
    for path in runs:
        run = json.loads(path.read_text())
        assert run["validation"].keys() == run["test"].keys() and run["wall_s"] > 0  # seed 0: both splits

    # Resumable: a second call trains nothing, except a run whose cached configuration no longer matches.
    stale = tmp_path / "quick" / "runs" / "cls-full__adamw__rho0.0__seed0.json"
    run = json.loads(stale.read_text())
    stale.write_text(json.dumps(dict(run, config=dict(run["config"], lr=1.0))))
    stdout = _run(*args, timeout=1800)
    assert [line.split("run ")[-1] for line in stdout.splitlines() if "] run " in line] == [
        "cls-full__adamw__rho0.0__seed0"
    ]
    assert json.loads(stale.read_text())["config"] == run["config"]
