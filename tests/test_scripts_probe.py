"""Smoke runs of `scripts/probe_layers.py` and `scripts/gradnorm_study.py` in `--quick` mode on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _run(*args: str, timeout: int = 600) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ["probe_layers.py", "gradnorm_study.py"])
def test_help(script):
    assert "--quick" in _run(str(SCRIPTS / script), "--help")


@pytest.mark.slow
def test_probe_layers_quick(tmp_path):
    png = tmp_path / "layers.png"
    out = _run(str(SCRIPTS / "probe_layers.py"), "--model", "gpt2", "--quick", "--top_k", "3", "--batches", "2",
               "--batch_size", "4", "--output", str(png))
    marked = [line for line in out.splitlines() if line.startswith("* ")]
    assert len(marked) == 3  # the top 3 of the ranking are marked
    ranked = [line for line in out.splitlines() if line[:1] in "* " and ". " in line[:8]]
    assert ranked[:3] == marked  # ... and they are the first three of the ranking
    assert png.stat().st_size > 1000


@pytest.mark.slow
def test_gradnorm_study_quick(tmp_path):
    args = (str(SCRIPTS / "gradnorm_study.py"), "--quick", "--task", "gpt2", "--seeds", "0", "1", "--methods",
            "full SAM", "output-side pattern", "probe k=2 (block, grad_norm_per_cost)", "--output_dir", str(tmp_path))
    out = _run(*args)
    table = (tmp_path / "gradnorm_gpt2_quick.md").read_text()
    for label in ("AdamW", "full SAM", "probe k=2 (block, grad_norm_per_cost)", "output-side pattern"):
        assert f"| {label} |" in table
    assert (tmp_path / "gradnorm_gpt2_quick.png").stat().st_size > 1000
    results = json.loads((tmp_path / "gradnorm_gpt2_quick.json").read_text())["results"]
    assert all(len(runs) == 2 and all(r["norms"] and all(n > 0 for n in r["norms"]) for r in runs)
               for runs in results.values())
    assert "wrote" in out
    assert len(list((tmp_path / "gradnorm_runs").glob("*.json"))) == 8  # 4 methods x 2 seeds, cached
    assert "[seed 0]" in _run(*args)  # a second call reads the cache (and still reports)
