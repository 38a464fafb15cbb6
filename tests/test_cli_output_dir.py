"""`--output_dir` of `hf-lwsam-train`: a finished run is not trained over by accident, `--overwrite_output_dir` removes
only what a previous run wrote, and a directory whose final save was interrupted is resumed, not taken as finished."""

from __future__ import annotations

import contextlib
import json
import logging as std_logging

import pytest
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401

from hf_lwsam.cli.output import FINAL_TMP_NAME, MANIFEST_NAME, RESULTS_NAME


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    root = tmp_path_factory.mktemp("output_dir_assets")
    train_csv, validation_csv = write_tweet_csvs(root / "tweets", n_train=32, n_validation=16)
    return ["--model_name_or_path", make_tiny_bert_dir(root / "tiny-bert"), "--train_file", train_csv,
            "--validation_file", validation_csv, "--label_column", "sentiment", "--max_length", "16", *FAST,
            "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


def _run(command: list, out, *extra) -> tuple[int, str]:
    """Run the CLI, returning the exit code and its warnings plus stderr."""
    with _capture() as records:
        code, _, stderr = run_cli([*command, "--output_dir", out, *extra])
    return code, "\n".join(r.getMessage() for r in records) + stderr


@contextlib.contextmanager
def _capture():
    """The records of the CLI's logger (`hf_lwsam.cli.train`)."""
    records: list[std_logging.LogRecord] = []
    handler = std_logging.Handler()
    handler.emit = records.append
    logger = std_logging.getLogger("hf_lwsam.cli.train")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_finished_run_is_refused_and_overwrite_keeps_the_users_files(command, tmp_path):
    out = tmp_path / "out"
    code, log = _run(command, out)
    assert code == 0, log
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "README.md", "trainer_state.json", RESULTS_NAME} <= set(files)
    assert {"checkpoint-2", "checkpoint-4"} <= {p.name for p in out.iterdir()}

    (out / "notes.txt").write_text("mine")
    code, log = _run(command, out)
    assert code == 2 and "holds a finished run: pass --overwrite_output_dir" in log

    code, log = _run(command, out, "--overwrite_output_dir", "--save_strategy", "no")
    assert code == 0, log
    assert "removing the previous run's" in log and "(keeping notes.txt)" in log
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob("checkpoint-*")), "the previous run's checkpoints are removed, none are new"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_interrupted_final_save_is_resumed_not_taken_as_finished(command, tmp_path):
    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    weights = (out / "model.safetensors").read_bytes()
    # As if killed after the final files were renamed into place but before all_results.json was written.
    (out / RESULTS_NAME).unlink()
    code, log = _run(command, out)
    assert code == 0, log
    assert f"Resuming from {out / 'checkpoint-4'} (global step 4)" in log
    assert (out / RESULTS_NAME).exists() and not (out / FINAL_TMP_NAME).exists()
    assert (out / "model.safetensors").read_bytes() == weights


def test_leftover_final_save_without_checkpoints_starts_over(command, tmp_path):
    out = tmp_path / "out"
    (out / FINAL_TMP_NAME).mkdir(parents=True)
    (out / FINAL_TMP_NAME / "model.safetensors").write_bytes(b"half written")
    code, log = _run(command, out, "--save_strategy", "no")
    assert code == 0, log
    assert "without a complete checkpoint: starting from step 0" in log
    assert not (out / FINAL_TMP_NAME).exists() and (out / RESULTS_NAME).exists()
