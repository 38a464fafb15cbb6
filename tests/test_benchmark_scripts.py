"""Smoke runs of the benchmark scripts: they run end to end and write what they promise (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
                     "LW-SAM k=1 reuse interval=4", "full SAM stale", "full SAM LookSAM interval=5",
                     "full SAM late from 70%", "LW-SAM k=1 reuse LookSAM interval=5", "LW-SAM k=1 reuse late from 70%",
                     "full SAM late from 80%", "full SAM late from 90%", "full SAM late from 95%", "full random", "LW-SAM k=1 random", "norms", "norms stale", "norms late from 70%"]
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
        "adamw", "LW-SAM k=1 reuse", "LW-SAM k=1 reuse interval=4", "LW-SAM k=1 reuse LookSAM interval=5",
        "LW-SAM k=1 reuse late from 70%"]


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
    assert len(runs) == 2 * 4  # per task: AdamW + 3 SAM methods (one rho, one seed)
    for path in runs:
        run = json.loads(path.read_text())
        assert "validation" not in run and run["test"] and run["wall_s"] > 0  # one rho: no sweep, no validation

    # Resumable: a second call trains nothing, except a run whose cached configuration no longer matches.
    stale = tmp_path / "quick" / "runs" / "cls-full__adamw__rho0.0__seed0.json"
    run = json.loads(stale.read_text())
    stale.write_text(json.dumps(dict(run, config=dict(run["config"], lr=1.0))))
    stdout = _run(*args, timeout=1800)
    assert [line.split("run ")[-1] for line in stdout.splitlines() if "] run " in line] == [
        "cls-full__adamw__rho0.0__seed0"
    ]
    assert json.loads(stale.read_text())["config"] == run["config"]


def _script(name: str):
    """A module of scripts/ loaded by path (`study_tasks`: the accuracy study's tasks; `study_harness`: its cache)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_run_cache_keeps_a_run_made_with_the_same_config_and_redoes_another(tmp_path):
    harness = _script("study_harness")
    path, made = tmp_path / "runs" / "a.json", []
    make = lambda: made.append(1) or {"acc": len(made)}  # noqa: E731
    assert harness.cached(path, {"lr": 1}, make) == {"acc": 1, "config": {"lr": 1}}
    assert harness.cached(path, {"lr": 1}, make) == {"acc": 1, "config": {"lr": 1}} and len(made) == 1  # read back
    told = []
    assert harness.cached(path, {"lr": 2}, make, told.append) == {"acc": 2, "config": {"lr": 2}}  # redone
    assert told == ["a.json was made with another configuration: redoing it"]
    assert json.loads(path.read_text()) == {"acc": 2, "config": {"lr": 2}}
    assert harness.cached(tmp_path / "b.json", {}, lambda: None) is None and not (tmp_path / "b.json").exists()


def test_symmetric_label_noise_flips_the_stated_share_to_other_classes():
    from hf_lwsam.data import load_tweets

    tasks = _script("study_tasks")
    clean = load_tweets(seed=42)["train"].select(range(600))  # real tweets, 3 classes
    noisy = tasks.with_label_noise(clean, 0.4, 3)
    flipped = [i for i, (a, b) in enumerate(zip(clean["label"], noisy["label"])) if a != b]
    assert len(flipped) == 240 and noisy["text"] == clean["text"]  # exactly 40 %, texts untouched
    shifts = [(noisy["label"][i] - clean["label"][i]) % 3 for i in flipped]
    assert 0.35 < shifts.count(1) / len(shifts) < 0.65  # uniform over the two other classes
    assert tasks.with_label_noise(clean, 0.4, 3)["label"] == noisy["label"]  # one fixed draw for every run
    assert tasks.with_label_noise(clean, 0.0, 3) is clean


def test_robustness_digits_splits_keep_validation_and_test_clean():
    from sklearn.datasets import load_digits

    tasks = _script("study_tasks")
    budget = tasks.RobustBudget()
    noisy, _ = tasks.robust_data("digits-noise40", budget)
    clean, _ = tasks.robust_data("digits", budget)
    assert [len(noisy[s]) for s in ("train", "validation", "test")] == [997, 300, 500]
    column = lambda split, name, data: torch.stack(list(data[split][name]))  # noqa: E731
    for split in ("validation", "test"):
        assert torch.equal(column(split, "label", noisy), column(split, "label", clean))
        assert torch.equal(column(split, "pixel_values", noisy), column(split, "pixel_values", clean))
    assert (column("train", "label", noisy) != column("train", "label", clean)).sum() == round(0.4 * 997)
    # Every image is a real scikit-learn digit with its true label in the clean splits.
    digits = load_digits()
    lookup = {tuple((torch.tensor(img) / 16.0).flatten().tolist()): int(t)
              for img, t in zip(digits.images, digits.target)}
    for split in ("train", "validation", "test"):
        rows = clean[split].select(range(50))
        for pixels, label in zip(rows["pixel_values"], rows["label"]):
            assert lookup[tuple(pixels.flatten().tolist())] == int(label)


@pytest.mark.slow
def test_accuracy_robustness_suite_quick(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--suite", "robustness", "--quick", "--tasks", "digits-noise40",
         "--seeds", "0", "1", "--methods", "LW-SAM default", "LW-SAM interval=4", "full SAM", "SAM on norms",
         "norms stale", "--out", str(tmp_path), timeout=1800)
    table = (tmp_path / "quick" / "robustness.md").read_text()
    for method in ("adamw", "LW-SAM default", "LW-SAM interval=4", "full SAM", "SAM on norms", "norms stale"):
        assert f"| digits-noise40 | {method} |" in table
    assert "share of full SAM's gain [95% CI]" in table
    norms = next(line for line in table.splitlines() if line.startswith("| digits-noise40 | SAM on norms |"))
    stale = next(line for line in table.splitlines() if line.startswith("| digits-noise40 | norms stale |"))
    assert norms.split(" | ")[2] == stale.split(" | ")[2]  # the stale schedule takes the norms' chosen rho
    assert "(n=2)" in norms and "[" in norms.split(" | ")[5]  # a paired interval over the two seeds
    assert (tmp_path / "quick" / "robustness_pareto.png").stat().st_size > 1000
    run = json.loads((tmp_path / "quick" / "runs" / "digits-noise40__LW-SAM_default__rho0.05__seed1.json").read_text())
    assert len(run["validation_curve"]) == 3 and run["test_at_best_validation"]["accuracy"] > 0
    assert (tmp_path / "quick" / "robustness.png").stat().st_size > 1000


def test_chat_tasks_noise_only_the_training_answers_and_keep_the_chat_format():
    from hf_lwsam.data import TWEET_LABELS

    tasks = _script("study_tasks")
    budget = tasks.Budget()
    noisy, clean = tasks.chat_splits("chat-noise40", budget), tasks.chat_splits("chat", budget)
    small = tasks.chat_splits("chat-small", budget)
    assert [len(noisy[s]) for s in ("train", "validation", "test")] == [512, 200, 200] and len(small["train"]) == 128
    for split in ("validation", "test"):
        assert noisy[split]["completion"] == clean[split]["completion"]
        assert noisy[split]["prompt"] == clean[split]["prompt"]
    assert noisy["train"]["prompt"] == clean["train"]["prompt"]
    assert sum(a != b for a, b in zip(noisy["train"]["label"], clean["train"]["label"])) == round(0.4 * 512)
    for chat in noisy["train"]:  # the answer is the (noisy) label's name, in the assistant's turn
        assert [m["role"] for m in chat["prompt"]] == ["system", "user"]
        assert chat["completion"] == [{"role": "assistant", "content": TWEET_LABELS[chat["label"]]}]


@pytest.mark.slow  # the real SmolLM2-135M, every method family once, full and LoRA
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_throughput_benchmark_smollm2_preset(lora, tmp_path):
    out = tmp_path / "t.json"
    _run("scripts/benchmark_throughput.py", "--preset", "smollm2-135m", *(["--lora"] if lora else []), "--seq_len",
         "16", "--batch", "2", "--k", "1", "--rounds", "1", "--steps", "1", "--warmup", "1", "--json", str(out),
         timeout=1200)
    result = json.loads(out.read_text())
    names = [r["method"] for r in result["results"]]
    assert result["preset"] == "smollm2-135m" and names[:2] == ["adamw", "full SAM"]
    assert {"LW-SAM k=1 reuse", "full SAM late from 90%", "full random"} <= set(names)
    assert ("norms" in names) is (not lora)  # under LoRA the norms are frozen: no norms-only methods
    assert all(r["tokens_per_s"] > 0 for r in result["results"])


@pytest.mark.slow  # SmolLM2 LoRA SFT: AdamW and the three SAM methods, 2 steps each
def test_accuracy_benchmark_chat_task_quick(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--quick", "--tasks", "chat-noise40", "--seeds", "0", "--out", str(tmp_path),
         timeout=1800)
    table = (tmp_path / "quick" / "accuracy.md").read_text()
    for method in ("adamw", "full SAM", "LW-SAM default", "LW-SAM probe k=2"):
        assert f"| chat-noise40 | {method} |" in table
    run = json.loads((tmp_path / "quick" / "runs" / "chat-noise40__LW-SAM_default__rho0.05__seed0.json").read_text())
    assert 0 <= run["test"]["accuracy"] <= 1 and run["perturbed"] and all("lora_" in n for n in run["perturbed"])


@pytest.mark.slow  # the real SmolLM2-135M, 2 LoRA steps
def test_chat_learning_curve_scores_every_step(tmp_path):
    _run("scripts/chat_learning_curve.py", "--steps", "2", "--every", "1", "--held_out", "8", "--out", str(tmp_path),
         timeout=1200)
    result = json.loads((tmp_path / "chat_learning_curve_adamw.json").read_text())
    assert [p["step"] for p in result["curve"]] == [0, 1, 2] and result["train_tweets"] == 16
    assert all(0 <= p["accuracy"] <= 1 and 1 / 3 <= p["top_answer_share"] <= 1 for p in result["curve"])
