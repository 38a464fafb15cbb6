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


def test_throughput_benchmark_times_adamw_and_the_recommended_mode_side_by_side(tmp_path):
    out = tmp_path / "t.json"
    stdout = _run("scripts/benchmark_throughput.py", "--seq_len", "32", "--batch", "2", "--rounds", "2", "--steps", "4",
                  "--warmup", "1", "--methods", "^adamw$", "^free preset$", "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["adamw", "free preset"]
    assert result["rounds"] == 2 and all(r["tokens_per_s"] > 0 for r in result["results"])
    adamw, free = result["results"]
    assert adamw["ratio_to_adamw"] == 1.0
    assert free["ratio_to_adamw"] == pytest.approx(adamw["ms_per_step"] / free["ms_per_step"])
    assert "| free preset |" in stdout


@pytest.mark.slow  # every method (or a fresh process per method) end to end: 10-30 s
def test_throughput_benchmark_runs_every_method_and_writes_json(tmp_path):
    out = tmp_path / "t.json"
    stdout = _run("scripts/benchmark_throughput.py", "--seq_len", "32", "--batch", "2", "--k", "1", "--rounds", "1",
                  "--steps", "1", "--warmup", "1", "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    names = [r["method"] for r in result["results"]]
    assert names == ["adamw", "full SAM", "adafactor", "sgd momentum 0.9", "LW-SAM k=1 truncated", "LW-SAM k=1 reuse",
                     "LW-SAM k=1 stale",
                     "LW-SAM k=1 reuse interval=4", "full SAM stale", "full SAM LookSAM interval=5",
                     "full SAM late from 70%", "LW-SAM k=1 reuse LookSAM interval=5", "LW-SAM k=1 reuse late from 70%",
                     "full SAM late from 80%", "full SAM late from 90%", "full SAM late from 95%", "full random",
                     "full momentum", "free preset", "LW-SAM k=1 random", "LW-SAM k=1 momentum", "norms",
                     "norms stale", "norms late from 70%"]
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    # the CPU measures memory only with --memory (a fresh process per method): no column from this shared process
    assert result["peak_memory"] is None and all(r["peak_gib"] is None for r in result["results"])
    assert result["results"][0]["ratio_to_adamw"] == 1.0
    assert "| LW-SAM k=1 reuse |" in stdout


@pytest.mark.slow  # every method (or a fresh process per method) end to end: 10-30 s
def test_throughput_benchmark_memory_column_from_a_fresh_process_per_method(tmp_path):
    out = tmp_path / "t.json"
    stdout = _run("scripts/benchmark_throughput.py", "--seq_len", "32", "--batch", "2", "--k", "1", "--rounds", "1",
                  "--steps", "1", "--warmup", "1", "--methods", "^adamw$", "^free preset$", "--memory",
                  "--json", str(out), timeout=300)
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["adamw", "free preset"]
    assert "fresh process" in result["peak_memory"]
    assert all(r["peak_gib"] > 0 and r["peak_ratio"] > 0 for r in result["results"])
    assert result["results"][0]["peak_ratio"] == 1.0
    assert len([line for line in stdout.splitlines() if line.startswith("  memory ")]) == 2
    assert "| free preset |" in stdout


@pytest.mark.slow  # every method (or a fresh process per method) end to end: 10-30 s
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


def test_method_rows_keep_sam_options_and_other_training_arguments_apart():
    methods = _script("study_methods")
    wsd = methods.Method("adamw WSD", None, args=dict(lr_scheduler_type="warmup_stable_decay",
                                                      lr_scheduler_kwargs=dict(num_decay_steps=16)))
    assert wsd.training_args(dict(seed=0, lr_scheduler_type="linear")) == dict(
        seed=0, lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs=dict(num_decay_steps=16))
    assert methods.Method("m", dict(sam_selection="all"), rhos=(0.05, 0.3)).grid([0.01]) == [0.05, 0.3]
    assert methods.Method("m", dict(sam_selection="all")).grid([0.01, 0.1]) == [0.01, 0.1]
    with pytest.raises(ValueError, match=r"sets sam_rho: put the sam_\* options in `sam`"):
        methods.Method("m", None, args=dict(sam_rho=0.1))
    with pytest.raises(ValueError, match=r"'learning_rate'.* not sam_\*: put them in `args`"):
        methods.Method("m", dict(learning_rate=1.0))
    with pytest.raises(ValueError, match=r"rhos=\(0.1,\) and rho_from='full SAM' both set"):
        methods.Method("m", dict(sam_selection="all"), rhos=(0.1,), rho_from="full SAM")
    throughput = _script("benchmark_throughput")  # one row type for the accuracy and the throughput benchmarks
    rows = throughput.methods(6, [1])
    assert all(type(m) is methods.Method for m in rows) and rows[0].sam is None
    assert {m.name: m.cycle for m in rows}["full SAM late from 95%"] == 20


def _row(bench, task, name: str):
    """The methods-table row `name` of `task`'s suite (every flag of the main suite on; the robustness suite with its
    plain-baseline grid and the rows on its reference)."""
    if task.epochs:
        table = bench.robust_methods(task.family) + bench.baseline_grid(task.family) + bench.reference_methods()
    else:
        table = bench.chat_methods() if task.suite == "chat" else bench.main_methods(True, None, True, True, True)
    return next(m for m in table if m.name == name)


def test_every_cached_run_keeps_its_key_and_configuration():
    """The runner names each committed run's file and rebuilds the configuration it was made with, so reports are
    rebuilt from the cache without training (the chat tasks' pilot runs were made with an earlier budget)."""
    bench = _script("benchmark_accuracy")
    paths = sorted((ROOT / "benchmarks" / "accuracy" / "runs").glob("*.json"))
    assert len(paths) > 600
    for path in paths:
        run = json.loads(path.read_text())
        task = bench.TASKS[run["task"]]
        lr = run["config"]["lr"] if task.lr_grid else None
        row = _row(bench, task, run["method"])
        if row.on_reference:  # trained with the reference's optimizer settings
            row = bench.replace(row, args=run["config"]["args"])
        job = bench.Job(task.name, row, run["rho"], run["seed"], lr, wd=run["config"].get("weight_decay", 0.0))
        device = run["config"].get("device", "cpu")
        assert bench.run_key(task, job, device) == path.stem
        if task.suite != "chat":
            config = bench.run_configuration(task, job, task.budget(), device)
            assert json.loads(json.dumps(config)) == run["config"], path.name


def test_gpu_runs_and_other_training_arguments_are_cached_apart():
    bench, methods = _script("benchmark_accuracy"), _script("study_methods")
    task = bench.TASKS["chat-noise40"]
    job = bench.Job(task.name, _row(bench, task, "full SAM"), 0.05, 3)
    assert bench.run_key(task, job, "cpu") == "chat-noise40__full_SAM__rho0.05__seed3"
    assert bench.run_key(task, job, "cuda") == "chat-noise40__full_SAM__rho0.05__seed3__cuda"
    cpu, gpu = (bench.run_configuration(task, job, task.budget(), device) for device in ("cpu", "cuda"))
    assert gpu == dict(cpu, device="cuda") and cpu["sam"] == {"sam_preset": "exact"} and "device" not in cpu
    assert cpu["eval"] >= 1000 and cpu["val"] >= 500  # the scores' standard error ~1.5 points
    adamw = bench.Job(task.name, _row(bench, task, "adamw"), 0.0, 0, 2e-3, wd=0.1)
    assert bench.run_key(task, adamw, "cpu") == "chat-noise40__adamw__rho0.0__seed0__lr0.002__wd0.1"
    assert bench.run_configuration(task, adamw, task.budget(), "cpu")["weight_decay"] == 0.1
    wsd = methods.Method("adamw WSD", None, args=dict(lr_scheduler_type="warmup_stable_decay"))
    digits = bench.TASKS["digits-noise40"]
    config = bench.run_configuration(digits, bench.Job(digits.name, wsd, 0.0, 0, 1e-3), digits.budget(), "cpu")
    assert config["args"] == {"lr_scheduler_type": "warmup_stable_decay"} and config["lr"] == 1e-3
    assert bench.run_key(digits, bench.Job(digits.name, wsd, 0.0, 0, 1e-3), "cpu") == (
        "digits-noise40__adamw_WSD__rho0.0__seed0__lr0.001")


def test_report_only_rebuilds_the_committed_study_report_byte_identical(tmp_path):
    """The committed study report's rows (rows added to the table since are left out) come back byte for byte."""
    (tmp_path / "runs").symlink_to(ROOT / "benchmarks" / "accuracy" / "runs")
    committed = ROOT / "benchmarks" / "accuracy" / "robustness_study.md"
    rows = dict.fromkeys(line.split(" | ")[1] for line in committed.read_text().splitlines()
                         if line.startswith("| digits"))
    _run("scripts/benchmark_accuracy.py", "--suite", "robustness", "--tasks", "digits-noise40", "digits-noise20",
         "--rhos", "0.01", "0.02", "0.05", "0.1", "0.2", "--seeds", *map(str, range(16)), "--report_only",
         "--methods", *rows, "--report", "robustness_study", "--out", str(tmp_path), timeout=600)
    assert (tmp_path / "robustness_study.md").read_bytes() == committed.read_bytes()


def test_dry_run_lists_the_gpu_runs_to_do_and_writes_nothing(tmp_path):
    """The chat study's plan: AdamW's (lr, weight decay) grid and Adafactor's lr grid on seed 0, then each row's rho
    grid on seed 0 (nothing is trained, so nothing is chosen and no seed run is listed)."""
    stdout = _run("scripts/benchmark_accuracy.py", "--tasks", "chat-noise40", "--device", "cuda", "--dry_run",
                  "--seeds", "0", "1", "--methods", "adafactor", "free preset", "--out", str(tmp_path), timeout=300)
    todo = [line.split("] ")[1] for line in stdout.splitlines() if line.endswith(": to run")]
    assert todo == [f"chat-noise40__adamw__rho0.0__seed0__lr{lr}{wd}__cuda: to run" for lr in (0.001, 0.002, 0.004)
                    for wd in ("", "__wd0.1")]
    assert "chat-noise40: no AdamW run to choose the learning rate from: left out" in stdout
    assert list(tmp_path.rglob("*.*")) == []


def test_accuracy_benchmark_refuses_bad_flags_in_one_line(monkeypatch, capsys):
    bench = _script("benchmark_accuracy")

    def error(*args: str) -> str:
        monkeypatch.setattr(sys, "argv", ["benchmark_accuracy.py", *args])
        with pytest.raises(SystemExit) as exit_:
            bench.main()
        assert exit_.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device here" in error("--tasks", "chat", "--device", "cuda")
    assert "--methods nope: not in the chat suite's methods table" in error("--tasks", "chat", "--methods", "nope")
    assert "do not belong to --suite main" in error("--suite", "main", "--tasks", "digits")
    assert "mix the suites chat, main" in error("--tasks", "chat", "lm")
    assert "--workers 0: give 1 or more" in error("--workers", "0")


def test_time_budget_spent_starts_no_run(tmp_path):
    stdout = _run("scripts/benchmark_accuracy.py", "--suite", "robustness", "--quick", "--tasks", "digits",
                  "--time_budget", "0", "--out", str(tmp_path), timeout=300)
    assert "digits__adamw__rho0.0__seed0__lr0.001: not started (--time_budget spent)" in stdout
    assert "nothing written: no task has runs to report" in stdout and not list(tmp_path.rglob("*.json"))


@pytest.mark.slow  # 2 x 6 tiny-ViT runs
def test_worker_processes_make_the_same_runs_as_one_process(tmp_path):
    args = ("scripts/benchmark_accuracy.py", "--suite", "robustness", "--quick", "--tasks", "digits", "--threads", "1",
            "--seeds", "0", "1", "--methods", "full SAM", "LW-SAM default")
    _run(*args, "--out", str(tmp_path / "one"), timeout=1800)
    _run(*args, "--workers", "2", "--out", str(tmp_path / "two"), timeout=1800)
    one, two = (sorted((tmp_path / d / "quick" / "runs").glob("*.json")) for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 6
    for a, b in zip(one, two):
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert (ra["test"], ra["train_loss_curve"]) == (rb["test"], rb["train_loss_curve"]), a.name
    report = [(tmp_path / d / "quick" / "robustness.md").read_text() for d in ("one", "two")]
    assert report[0] == report[1]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chat_task_on_the_gpu_is_cached_apart(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--quick", "--tasks", "chat-noise40", "--device", "cuda", "--seeds", "0",
         "--methods", "full SAM", "--workers", "2", "--out", str(tmp_path), timeout=1800)
    runs = sorted(p.name for p in (tmp_path / "quick" / "runs").glob("*.json"))
    assert runs == ["chat-noise40__adamw__rho0.0__seed0__cuda.json",
                    "chat-noise40__full_SAM__rho0.05__seed0__cuda.json"]
    run = json.loads((tmp_path / "quick" / "runs" / runs[1]).read_text())
    assert run["config"]["device"] == "cuda" and torch.cuda.get_device_name() in run["machine"]
    assert torch.cuda.get_device_name() in (tmp_path / "quick" / "accuracy_smollm2_cuda.md").read_text()


def test_device_check_plan_fits_one_call_and_runs_the_fsdp2_check():
    plan = subprocess.run(["bash", "scripts/device_check.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert plan.returncode == 0, plan.stderr
    steps = {line.split(":")[0]: int(line.split("at most ")[1].split("s")[0]) for line in plan.stdout.splitlines()
             if ": at most " in line and not line.startswith("total")}
    assert list(steps) == ["fsdp2_check", "gpu_check_works_with", "gpu_check", "gpu_tests", "throughput_gpt2-350m"]
    assert "scripts/accelerate_configs/fsdp2.yaml --num_processes 1 scripts/gpu_check_fsdp2.py" in plan.stdout
    assert plan.stdout.strip().endswith("total: at most 530s of TOTAL=530s") and sum(steps.values()) + 30 <= 530
    tight = subprocess.run(["bash", "scripts/device_check.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, TOTAL="400"))
    assert tight.returncode == 1  # steps that could not all fit are a failure before anything runs


def test_gpu_study_dry_run_passes_its_flags_on(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_study.sh", "--dry_run", "--seeds", "0", "--methods", "full SAM"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OUT=str(tmp_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line.split("] ")[1] for line in done.stdout.splitlines() if line.endswith(": to run")] == [
        f"chat-noise40__adamw__rho0.0__seed0__lr{lr}{wd}__cuda: to run" for lr in (0.001, 0.002, 0.004)
        for wd in ("", "__wd0.1")]
    assert (tmp_path / "gpu_study.log").exists() and not (tmp_path / "gpu_runs.tar.gz").exists()


def test_a_method_rows_training_arguments_reach_the_trainer(tmp_path):
    """A row that only changes TrainingArguments (here the learning-rate schedule) trains differently from AdamW on
    the same seed, and its run records the machine."""
    bench, methods = _script("benchmark_accuracy"), _script("study_methods")
    task = bench.TASKS["digits"]
    ctx = dict(out=tmp_path, cache=tmp_path / "cache", log=print, device="cpu", data={})
    runs = [bench.train_and_eval(task, bench.Job(task.name, m, 0.0, 0, 3e-3), task.budget(quick=True), ctx)
            for m in (methods.Method("adamw"), methods.Method("adamw constant", None,
                                                              args=dict(lr_scheduler_type="constant")))]
    assert [len(r["train_loss_curve"]) for r in runs] == [3, 3] and runs[0]["machine"] == bench.MACHINE
    assert runs[0]["train_loss_curve"][0] != runs[1]["train_loss_curve"][0]  # the warm-up and decay differ


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
    for path in (tmp_path / "quick" / "runs").glob("*.json"):  # best at the last epoch: the final test is the best's
        run = json.loads(path.read_text())
        last = run["best_epoch"] == len(run["validation_curve"])
        assert (run["test_at_best_validation"] == run["test"]) or not last, path.name


def test_chat_tasks_noise_only_the_training_answers_and_keep_the_chat_format():
    from hf_lwsam.data import TWEET_LABELS

    tasks = _script("study_tasks")
    budget = tasks.Budget()
    noisy, clean = tasks.chat_splits("chat-noise40", budget), tasks.chat_splits("chat", budget)
    small = tasks.chat_splits("chat-small", budget)
    assert [len(noisy[s]) for s in ("train", "validation", "test")] == [2048, 500, 1000] and len(small["train"]) == 128
    for split in ("validation", "test"):
        assert noisy[split]["completion"] == clean[split]["completion"]
        assert noisy[split]["prompt"] == clean[split]["prompt"]
    assert noisy["train"]["prompt"] == clean["train"]["prompt"]
    assert sum(a != b for a, b in zip(noisy["train"]["label"], clean["train"]["label"])) == round(0.4 * 2048)
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


@pytest.mark.slow  # SmolLM2 LoRA SFT: the chat suite's AdamW and three SAM rows, 2 steps each
def test_accuracy_benchmark_chat_task_quick(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--quick", "--tasks", "chat-noise40", "--seeds", "0", "--out", str(tmp_path),
         timeout=1800)
    table = (tmp_path / "quick" / "accuracy_smollm2.md").read_text()
    for method in ("adamw", "full SAM", "fast preset", "LW-SAM default"):
        assert f"| chat-noise40 | {method} |" in table
    runs = tmp_path / "quick" / "runs"
    run = json.loads((runs / "chat-noise40__LW-SAM_default__rho0.05__seed0.json").read_text())
    assert 0 <= run["test"]["accuracy"] <= 1 and run["perturbed"] and all("lora_" in n for n in run["perturbed"])
    assert run["test"]["answer_nll"] > 0 and set(run["forgetting"]) == {"nll_before", "nll_after"}
    assert run["config"]["sam"] == {"sam_selection": "pattern"} and run["machine"]
    fast = json.loads((runs / "chat-noise40__fast_preset__rho0.05__seed0.json").read_text())
    assert fast["config"]["sam"] == {"sam_preset": "fast"} and len(fast["perturbed"]) == len(
        json.loads((runs / "chat-noise40__full_SAM__rho0.05__seed0.json").read_text())["perturbed"])
    assert "| answer NLL |" in table and "forgetting (NLL after - before)" in table
    assert "| Δ vs the strongest plain row, pt [95% CI] |" in table and "| chat-noise40 | adafactor |" in table


def test_the_strongest_plain_row_is_the_better_mean_over_the_seeds_both_ran():
    bench = _script("benchmark_accuracy")
    run = lambda seed, acc: dict(seed=seed, test=dict(accuracy=acc))  # noqa: E731
    adamw = [run(0, 0.60), run(1, 0.62), run(2, 0.70)]
    assert bench.strongest_plain(dict(adamw=adamw, adafactor=[run(0, 0.63), run(1, 0.61)])) == "adafactor"
    assert bench.strongest_plain(dict(adamw=adamw, adafactor=[run(0, 0.60), run(1, 0.62)])) == "adamw"  # a tie
    assert bench.strongest_plain(dict(adamw=adamw, adafactor=[])) == "adamw"
    assert bench.strongest_plain(dict(adamw=adamw)) == "adamw"


@pytest.mark.slow  # SmolLM2 LoRA SFT: AdamW and the free preset, trained and then timed side by side (80 s)
def test_measure_cost_times_a_chat_task_on_its_own_recipe(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--quick", "--tasks", "chat-small", "--methods", "adamw", "free preset",
         "--seeds", "0", "--measure_cost", "--out", str(tmp_path), timeout=1800)
    costs = json.loads((tmp_path / "quick" / "costs_chat-small.json").read_text())
    assert set(costs) == {"adamw", "free preset"} and costs["adamw"] == 1.0 and costs["free preset"] > 0
    table = (tmp_path / "quick" / "accuracy_smollm2.md").read_text()
    assert "| throughput ÷ AdamW |" in table
    assert f"| {costs['free preset']:.2f} |" in next(line for line in table.splitlines() if "| free preset |" in line)


@pytest.mark.slow  # the real SmolLM2-135M, 2 LoRA steps
def test_chat_learning_curve_scores_every_step(tmp_path):
    _run("scripts/chat_learning_curve.py", "--steps", "2", "--every", "1", "--quick", "--padding_free", "--bf16",
         "--out", str(tmp_path), timeout=1200)
    result = json.loads((tmp_path / "chat_learning_curve_adamw_bf16_padding_free_2.json").read_text())
    assert [p["step"] for p in result["curve"]] == [0, 1, 2] and result["config"]["train"] == 16
    assert "partial" not in result  # the points written after each score are replaced by the finished run
    assert result["config"]["bf16"] and result["config"]["padding_free"] and result["forgetting"]["nll_after"] > 0
    assert all(0 <= p["accuracy"] <= 1 and p["answer_nll"] > 0 and 1 / 3 <= p["top_answer_share"] <= 1
               for p in result["curve"])


def test_the_reference_is_the_best_mean_over_the_selection_seeds_not_seed_0():
    bench = _script("benchmark_accuracy")
    scores = {("plain adamw wd0 ls0", 1e-3): [0.90, 0.70, 0.71], ("plain sgd wd0 ls0", 3e-2): [0.80, 0.80, 0.79],
              ("plain adafactor wd0 ls0", 1e-3): [0.78, 0.81, 0.80]}
    assert bench.choose_reference(scores) == ("plain sgd wd0 ls0", 3e-2)  # mean 0.797; seed 0 alone picks AdamW
    tie = {("a", 1e-3): [0.8, 0.7], ("b", 1e-3): [0.7, 0.8]}
    assert bench.choose_reference(tie) == ("a", 1e-3)  # a tie: the first in grid order


def test_plain_baseline_grid_rows_and_the_momentum_ascents_optimizers():
    methods = _script("study_methods")
    grid = methods.baseline_grid()
    assert sum(len(m.lrs) for m in grid) == 48 and all(m.sam is None for m in grid)
    sgd = next(m for m in grid if m.name == "plain sgd wd0.1 ls0.1")
    assert sgd.args == dict(optim="sgd", optim_args="momentum=0.9", weight_decay=0.1, label_smoothing_factor=0.1)
    assert "optim" not in next(m for m in grid if m.name == "plain adamw wd0 ls0").args  # the adamw row's default
    # the fine-tuned tweets tasks: the same rows (36 configurations), each optimizer with learning rates of its own
    tweets = {m.name: m.lrs for m in methods.baseline_grid("tweets")}
    assert list(tweets) == [m.name for m in grid] and tweets["plain adamw wd0 ls0"] == (3e-5, 1e-4, 3e-4)
    assert all(tweets[m.name] != m.lrs for m in grid)
    with pytest.raises(ValueError, match="no plain-baseline grid for the 'chat' tasks"):
        methods.baseline_grid("chat")
    # a row on the reference: the library's own refusal decides. The free preset keeps its own gradient average where
    # the optimizer has no readable first moment; the optimizer's moment asked for explicitly is refused there.
    free, optimizer_moment = dict(sam_preset="free"), dict(sam_selection="all", sam_ascent="momentum",
                                                           sam_momentum="optimizer")
    assert methods.sam_refusal(free, dict(optim="adafactor", weight_decay=0.1)) is None
    assert methods.sam_refusal(optimizer_moment, dict(optim="adafactor")) is not None
    assert methods.sam_refusal(optimizer_moment, dict(optim="sgd", optim_args="momentum=0.9")) is None
    assert methods.sam_refusal(optimizer_moment, dict(optim="sgd")) is not None  # SGD without momentum keeps none
    assert methods.sam_refusal(optimizer_moment, {}) is None
    with pytest.raises(ValueError, match=r"lrs=\(0.1,\) on a SAM row"):
        methods.Method("m", dict(sam_selection="all"), lrs=(0.1,))
    with pytest.raises(ValueError, match="on_reference=True on a plain row"):
        methods.Method("m", None, on_reference=True)


def test_answer_scores_match_a_forward_per_prompt_by_hand():
    """Batched, left-padded scoring equals one unpadded forward per prompt: the accuracy of the most likely label and
    the mean NLL of the right label's first token over the whole vocabulary; the forgetting NLL likewise."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_lwsam.data import TWEET_LABELS, load_tweets, smollm2_path, tweet_sentiment_chats

    tasks = _script("study_tasks")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id))
    chats = tweet_sentiment_chats(load_tweets(seed=42)["test"].select(range(7)))
    nll, right = [], []
    for chat in chats:
        text = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        answers = [tokenizer(text + label, add_special_tokens=False)["input_ids"][ids.shape[1]]
                   for label in TWEET_LABELS]
        with torch.no_grad():
            log_p = model(input_ids=ids).logits[0, -1].log_softmax(-1)[answers]
        nll.append(-log_p[chat["label"]].item())
        right.append(int(log_p.argmax()) == chat["label"])
    assert len({len(tokenizer.apply_chat_template(c["prompt"], tokenize=False)) for c in chats}) > 1  # padding used
    scores = tasks.answer_scores(model, tokenizer, chats, batch_size=3)
    assert scores["accuracy"] == pytest.approx(sum(right) / len(right))
    assert scores["answer_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    blocks = tasks.text_blocks(tokenizer, 3, 16)
    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    by_hand = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert tasks.text_nll(model, blocks, batch_size=2) == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.slow  # the real SmolLM2-135M, one forward each way
def test_padding_free_batches_give_the_padded_loss(tmp_path):
    """The study trains padding-free: one packed row per batch must keep each chat's attention to itself."""
    _run("scripts/chat_learning_curve.py", "--padding_free_check", "--quick", "--out", str(tmp_path), timeout=600)
    losses = json.loads((tmp_path / "chat_sizing_cost.json").read_text())["padding_free_loss"]
    assert losses["padding-free"] == pytest.approx(losses["padded"], rel=1e-5) and losses["padded"] > 0


@pytest.mark.slow  # 12 + 6 tiny-ViT runs of 3 epochs
def test_baselines_pick_a_reference_and_train_sam_on_its_optimizer(tmp_path):
    _run("scripts/benchmark_accuracy.py", "--suite", "robustness", "--quick", "--tasks", "digits-noise40",
         "--baselines", "--seeds", "0", "--methods", "full SAM on reference", "fast on reference", "free on reference",
         "--out", str(tmp_path), timeout=1800)
    report = (tmp_path / "quick" / "baselines.md").read_text()
    reference = next(line for line in report.splitlines() if "**reference**" in line).split(" | ")[1]
    name = reference.replace(" **reference**", "")
    runs = tmp_path / "quick" / "runs"
    full = json.loads(next(runs.glob("digits-noise40__full_SAM_on_reference__*.json")).read_text())
    key = f"digits-noise40__{name.replace(' ', '_')}__rho0.0__seed0__lr*.json"
    grid_row = json.loads(next(runs.glob(key)).read_text())
    assert full["config"]["args"] == grid_row["config"]["args"] and full["config"]["lr"] == grid_row["config"]["lr"]
    assert f"| digits-noise40 | {name} (reference, lr" in report and "| digits-noise40 | fast on reference |" in report
    # the free preset runs on every reference: on Adafactor with its own gradient average
    assert "| digits-noise40 | free on reference |" in report


@pytest.mark.slow  # SmolLM2 LoRA SFT, 4 steps: run whole, then killed after a checkpoint and resumed (~2 min)
def test_a_chat_run_killed_part_way_resumes_to_the_run_an_uninterrupted_one_makes(tmp_path):
    """The long chat runs keep checkpoints (`Task.save_steps`): a run killed after one resumes from it at the next
    start, and its record (test scores, forgetting) is the uninterrupted run's; its checkpoints go once it is cached."""
    import signal
    import time

    args = ["scripts/benchmark_accuracy.py", "--quick", "--tasks", "chat-small", "--methods", "free preset",
            "--seeds", "0", "--threads", "1"]
    key = "chat-small__free_preset__rho0.2__seed0"
    _run(*args, "--out", str(tmp_path / "whole"), timeout=1800)
    whole = json.loads((tmp_path / "whole" / "quick" / "runs" / f"{key}.json").read_text())

    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out / "quick" / "partial" / key
    deadline = time.time() + 1200
    while not list(partial.glob("checkpoint-*/run_clock.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(partial.glob("checkpoint-*/run_clock.json")), "no complete checkpoint before the run ended"
    assert not (out / "quick" / "runs" / f"{key}.json").exists()  # killed before it was cached

    _run(*args, "--out", str(out), timeout=1800)
    resumed = json.loads((out / "quick" / "runs" / f"{key}.json").read_text())
    assert 1 <= resumed["resumed_from_step"] < 4 and "resumed_from_step" not in whole
    for field in ("test", "forgetting", "perturbed", "config"):
        assert resumed[field] == whole[field], field
    assert resumed["wall_s"] > 0 and not partial.exists()


@pytest.mark.parametrize("name", ["benchmark_accuracy", "study_harness", "study_methods", "study_stats"])
def test_the_study_scripts_docstring_examples_hold(name):
    import doctest

    result = doctest.testmod(_script(name))
    assert result.attempted > 0 and result.failed == 0


def test_a_row_taking_another_rows_rho_is_left_out_without_it(tmp_path):
    """A row whose rho is another row's (`rho_from`) is never given a rho of the study's grid instead: without that
    row among the ones run it is left out, saying why, and nothing of it is run."""
    (tmp_path / "runs").symlink_to(ROOT / "benchmarks" / "accuracy" / "runs")  # AdamW's cached runs choose its lr
    stdout = _run("scripts/benchmark_accuracy.py", "--suite", "robustness", "--tasks", "digits-noise40", "--methods",
                  "LW-SAM stale", "--seeds", "0", "--dry_run", "--out", str(tmp_path), timeout=300)
    why = "digits-noise40 LW-SAM stale: takes its rho from 'LW-SAM default', not among the rows run: left out"
    assert why in stdout
    assert not [line for line in stdout.splitlines() if "LW-SAM_stale" in line and line.endswith(": to run")]


def test_a_plain_rows_own_learning_rates_are_cached_apart_and_a_changed_resolution_is_redone(tmp_path):
    """Adafactor's own learning rates on a task without AdamW's grid (`chat`) have a key each; a SAM run stored with
    `sam_*` options the library now resolves otherwise is redone, one stored before they were recorded is kept."""
    bench, harness = _script("benchmark_accuracy"), _script("study_harness")
    task = bench.TASKS["chat"]
    keys = {bench.run_key(task, bench.Job(task.name, _row(bench, task, "adafactor"), 0.0, 0, lr), "cpu")
            for lr in (1e-3, 2e-3, 4e-3)}
    assert keys == {f"chat__adafactor__rho0.0__seed0__lr{lr}" for lr in (0.001, 0.002, 0.004)}
    made = []
    make = lambda: made.append(1) or {"test": {"accuracy": 0.5}}  # noqa: E731
    path, free = tmp_path / "run.json", harness.resolved_sam(dict(sam_preset="free"), 0.2)
    harness.cached(path, {"lr": 1}, make, resolved=free)
    assert json.loads(path.read_text())["resolved_sam"]["sam_ascent"] == "momentum" and made == [1]
    assert harness.cached(path, {"lr": 1}, make, resolved=free)["test"]["accuracy"] == 0.5 and made == [1]
    harness.cached(path, {"lr": 1}, make, resolved=dict(free, sam_selection="pattern"))
    assert made == [1, 1], "redone: the library resolves the options otherwise"
    legacy = {k: v for k, v in json.loads(path.read_text()).items() if k != "resolved_sam"}
    path.write_text(json.dumps(legacy))
    assert harness.cached(path, {"lr": 1}, make, resolved=free) == legacy and made == [1, 1]


def test_the_share_of_full_sams_gain_reads_a_lower_perplexity_as_the_gain():
    """Perplexity: full SAM's gain is a drop; where full SAM raised it, no share of a gain is reported."""
    bench = _script("benchmark_accuracy")
    task = bench.TASKS["lm"]
    run = lambda seed, ppl: {"seed": seed, "test": {"perplexity": ppl}, "wall_s": 1.0, "tokens_per_s": 1.0}  # noqa
    finals = {"adamw": [run(s, p) for s, p in enumerate((30.0, 31.0, 29.5))],
              "full SAM": [run(s, p) for s, p in enumerate((29.0, 30.2, 28.9))],
              "half": [run(s, p) for s, p in enumerate((29.5, 30.6, 29.2))]}
    lines, _ = bench.summarise(task, finals, {}, wall_ratios=False)
    share = lines[2].rstrip(" |").rsplit(" | ", 1)[1]
    assert share.startswith("0.5"), lines[2]  # half of full SAM's drop of 0.8
    worse = dict(finals, **{"full SAM": [run(s, p) for s, p in enumerate((30.5, 31.4, 29.9))]})
    lines, _ = bench.summarise(task, worse, {}, wall_ratios=False)
    assert lines[2].endswith("| - (full SAM gained nothing) |"), lines[2]
