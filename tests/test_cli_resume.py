"""No lost work: a real `hf-lwsam-train` process killed (SIGKILL) or preempted (SIGTERM) after a checkpoint, then the
same command run again, resumes and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_cli import make_tiny_bert_dir, write_tweet_csvs

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS = 60  # long enough (~3-6 s of steps) that the signal lands mid-run, short enough for the default suite
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """The command line of a short classification run on real tweets (dropout on, probe selection, timed plain
    steps), minus `--output_dir`."""
    root = tmp_path_factory.mktemp("resume_assets")
    model = make_tiny_bert_dir(root / "tiny-bert")  # hidden/attention dropout 0.1: resume must replay the RNG
    train_csv, validation_csv = write_tweet_csvs(root / "tweets", n_train=64, n_validation=16)
    return [sys.executable, "-m", "hf_lwsam.cli.train", "--model_name_or_path", str(model), "--train_file",
            str(train_csv), "--validation_file", str(validation_csv), "--label_column", "sentiment", "--max_length",
            "32", "--per_device_train_batch_size", "8", "--max_steps", str(MAX_STEPS), "--save_strategy", "steps",
            "--save_steps", "4", "--learning_rate", "1e-3", "--logging_steps", "4", "--report_to", "none",
            "--use_cpu", "true", "--disable_tqdm", "true", "--sam_selection", "probe", "--sam_probe_interval", "5",
            "--measure_plain_steps", "3", "--gradient_accumulation_steps", "2"]


def _run(command: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "--output_dir", str(out)], capture_output=True, text=True, env=ENV, cwd=REPO,
                          timeout=300)


def _start_and_signal(command: list[str], out: Path, signum: int) -> subprocess.Popen:
    """Start the run and send `signum` as soon as its first checkpoint is complete."""
    proc = _start_and_wait_for_a_checkpoint(command, out)
    proc.send_signal(signum)
    return proc


def _start_and_wait_for_a_checkpoint(command: list[str], out: Path) -> subprocess.Popen:
    """Start the run; return once its first checkpoint is complete (the Trainer writes trainer_state.json last)."""
    proc = subprocess.Popen([*command, "--output_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=REPO)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(command, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    proc = _run(command, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out / "model.safetensors")


def _assert_resumed_and_equal(command: list[str], out: Path, from_step: int, reference: dict) -> None:
    rerun = _run(command, out)  # the exact same command, as a requeued job runs it
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {out / f'checkpoint-{from_step}'} (global step {from_step})" in rerun.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == state["max_steps"] == MAX_STEPS
    first_logged = min(log["step"] for log in state["log_history"] if "loss" in log)
    assert first_logged == 4, "the log history of the interrupted part is kept"
    assert (out / "all_results.json").exists() and not (out / ".hf-lwsam-final.tmp").exists()
    final = load_file(out / "model.safetensors")
    assert final.keys() == reference.keys()
    different = [name for name in final if not final[name].equal(reference[name])]
    assert not different, f"resumed weights differ from the uninterrupted run's: {different[:5]}"


def test_sigkill_then_the_same_command_resumes_to_identical_weights(command, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_signal(command, out, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "all_results.json").exists(), "a killed run must not look finished"
    checkpoints = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                         if (p / "trainer_state.json").exists())
    assert checkpoints and checkpoints[-1] < MAX_STEPS
    _assert_resumed_and_equal(command, out, checkpoints[-1], uninterrupted)


def test_sigterm_saves_at_the_step_end_exits_143_and_the_rerun_resumes(command, uninterrupted, tmp_path):
    out = tmp_path / "out"
    proc = _start_and_signal(command, out, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-train:")]
    assert len(message) == 1 and "run the same command again to resume" in message[0], stderr[-3000:]
    step = int(message[0].split("stopped by SIGTERM at step ")[1].split()[0])
    assert 4 <= step < MAX_STEPS and f"checkpoint-{step}" in message[0]
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert not (out / "all_results.json").exists() and not (out / "model.safetensors").exists()
    _assert_resumed_and_equal(command, out, step, uninterrupted)


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes under an `accelerate launch` process (read from /proc)."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        rank = next((v[5:] for v in environ if v.startswith(b"RANK=")), None)
        if parent == launcher_pid and rank is not None:
            ranks[int(rank)] = int(entry.name)
    return ranks


@pytest.mark.slow  # two `accelerate launch` runs of two processes each: ~1 minute on 2 cores
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the ranks")
def test_sigterm_to_one_rank_under_accelerate_stops_every_rank_at_the_same_step(command, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "scripts" / "accelerate_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port),
              "-m", "hf_lwsam.cli.train", *command[3:]]
    out = tmp_path / "out"
    proc = _start_and_wait_for_a_checkpoint(launch, out)
    ranks = _rank_pids(proc.pid)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGTERM)  # only rank 1 is told to stop; rank 0 must agree through the all-reduce
    _, stderr = proc.communicate(timeout=180)
    assert proc.returncode != 0
    messages = [line for line in stderr.splitlines() if "hf-lwsam-train: preempted" in line]
    assert len(messages) == 1, stderr[-3000:]  # printed by rank 0, which received no signal itself
    step = int(messages[0].split("stopped by SIGTERM at step ")[1].split()[0])
    assert step < MAX_STEPS
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    rerun = subprocess.run([*launch, "--output_dir", str(out)], capture_output=True, text=True, env=ENV, cwd=REPO,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"checkpoint-{step} (global step {step})" in rerun.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS


@pytest.mark.slow  # two real runs with 600 evaluation batches: ~25 s on 2 cores
def test_sigterm_during_the_final_evaluation_saves_the_last_step_exits_143_and_the_rerun_finishes(tmp_path):
    """After training, SIGTERM during the final evaluation (or save) saves the last step as a checkpoint and exits
    143; the same command again resumes there with nothing left to train, evaluates and saves."""
    model = make_tiny_bert_dir(tmp_path / "tiny-bert")
    train_csv, validation_csv = write_tweet_csvs(tmp_path / "tweets", n_train=32, n_validation=600)
    command = [sys.executable, "-m", "hf_lwsam.cli.train", "--model_name_or_path", str(model), "--train_file",
               str(train_csv), "--validation_file", str(validation_csv), "--label_column", "sentiment",
               "--max_length", "32", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "1",
               "--max_steps", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
               "--disable_tqdm", "true", "--measure_plain_steps", "0", "--log_level", "info"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*command, "--output_dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=REPO)
    seen = []
    for line in proc.stderr:  # 600 single-row evaluation batches: seconds of evaluation after this line
        seen.append(line)
        if "***** Running Evaluation *****" in line:
            proc.send_signal(signal.SIGTERM)
            break
    stderr = "".join(seen) + proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-train:")]
    assert len(message) == 1 and "during the final evaluation or save, after step 4" in message[0], stderr[-3000:]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / "all_results.json").exists(), "an interrupted run must not look finished"
    rerun = _run(command, out)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoint-4'} (global step 4)" in rerun.stderr
    results = json.loads((out / "all_results.json").read_text())
    assert "eval_accuracy" in results and json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "train_loss" in e]
    assert results["train_loss"] == logged[0]["train_loss"] > 0, "the training loss of the run that trained"
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
