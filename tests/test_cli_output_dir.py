"""`--output_dir` of `hf-lwsam-train`: a finished run is not trained over by accident, `--overwrite_output_dir` removes
only what a previous run wrote (as recorded when it wrote it), and a directory whose final save was interrupted is
resumed, not taken as finished."""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import shutil
from pathlib import Path

import pytest
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401

from hf_lwsam.cli.output import (
    FINAL_TMP_NAME,
    MANIFEST_NAME,
    RESULTS_NAME,
    apply_plan,
    plan_output_dir,
    record_written,
)


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
    written = json.loads((out / MANIFEST_NAME).read_text())["written"]
    assert {"model.safetensors", "README.md", "trainer_state.json", RESULTS_NAME, "checkpoint-2",
            "checkpoint-4"} <= set(written)
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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_overwrite_keeps_a_checkpoint_another_trainer_wrote(command, tmp_path):
    """A stock `Trainer` saving into the same folder: its checkpoint is not removed, and the run does not start next
    to it (it would resume from it or rotate it away); the user is told to move it."""
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_bert, tweet_bytes_dataset

    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    Trainer(model=tiny_bert(), train_dataset=tweet_bytes_dataset(8), args=TrainingArguments(
        output_dir=str(out), max_steps=1, save_strategy="steps", save_steps=1, report_to="none", use_cpu=True,
        per_device_train_batch_size=8, disable_tqdm=True)).train()
    before = _tree(out)
    assert "checkpoint-1/trainer_state.json" in before
    code, log = _run(command, out, "--overwrite_output_dir")
    assert code == 2 and "holds checkpoint-1, which hf_lwsam did not write" in log, log
    assert _tree(out) == before, "nothing is removed"
    shutil.move(out / "checkpoint-1", tmp_path / "moved")
    code, log = _run(command, out, "--overwrite_output_dir", "--save_strategy", "no")
    assert code == 0, log
    assert not list(out.glob("checkpoint-*")) and (tmp_path / "moved" / "trainer_state.json").is_file()


def test_a_copied_run_is_not_taken_for_this_tools_own(command, tmp_path):
    """A finished run copied elsewhere, record included (as a downloaded or copied folder would be): its entries are
    not the ones recorded, so --overwrite_output_dir removes nothing there."""
    assert _run(command, tmp_path / "out")[0] == 0
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", copy)
    before = _tree(copy)
    code, log = _run(command, copy, "--overwrite_output_dir")
    assert code == 2 and "which hf_lwsam did not write" in log, log
    assert _tree(copy) == before


def test_overwrite_removes_only_recorded_entries_inside_output_dir(tmp_path):
    """A record naming paths outside `output_dir`, or names whose entries were replaced since, removes none of them;
    an entry recorded as written is removed."""
    out, outside = tmp_path / "out", tmp_path / "outside.txt"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")
    record_written(out, {"checkpoint-3": out / "checkpoint-3"})
    outside.write_text("not ours")
    (out / "notes.txt").write_text("replaced since it was recorded")
    record = json.loads((out / MANIFEST_NAME).read_text())
    identity = lambda path: [path.lstat().st_dev, path.lstat().st_ino]  # noqa: E731
    record["written"].update({"../outside.txt": [identity(outside)], "..": [identity(tmp_path)],
                              str(outside): [identity(outside)], "notes.txt": [[0, 0]]})
    (out / MANIFEST_NAME).write_text(json.dumps(record))
    plan = plan_output_dir(out, overwrite=True, resume_from_checkpoint=None)
    assert sorted(p.name for p in plan.remove) == [MANIFEST_NAME, "checkpoint-3"]
    apply_plan(plan)
    assert outside.read_text() == "not ours" and (out / "notes.txt").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
