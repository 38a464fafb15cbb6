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

from hf_lwsam.cli.output import (
    FINAL_TMP_NAME,
    MANIFEST_NAME,
    RESULTS_NAME,
    apply_plan,
    plan_output_dir,
    record_written,
)
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401


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


def _state(root: Path) -> dict[str, tuple]:
    """Every entry under `root`: its bytes (files), inode and modification time."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_ino,
                                             p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("refused, named", [(["--sam_rho", "-1"], "sam_rho=-1"),
                                            (["--sam_preset", "free", "--sam_momentum", "optimizer",
                                              "--optim", "adafactor"], "adafactor")])
def test_a_refused_option_after_a_finished_run_is_one_line_and_touches_nothing(command, tmp_path, refused, named):
    """The full config is built, and refused, before the output directory is touched: with --overwrite_output_dir
    the finished run stays byte for byte."""
    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    before = _state(out)
    code, _, stderr = run_cli([*command, "--output_dir", out, "--overwrite_output_dir", *refused])
    assert code == 2 and len(stderr.splitlines()) == 1 and named in stderr, stderr[-3000:]
    assert stderr.startswith("hf-lwsam-train: error: ")
    assert _state(out) == before


def _reuse_inode(out: Path, name: str, foreign: Path) -> None:
    """As a file system does: `name`, recorded by the run, is removed, and `foreign` put in its place gets the
    removed entry's inode (here the record is pointed at the new entry's inode, which is what reuse amounts to)."""
    record = json.loads((out / MANIFEST_NAME).read_text())
    shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    shutil.move(foreign, out / name)
    stat = (out / name).lstat()
    record["written"][name] = [[stat.st_dev, stat.st_ino, *identity[2:]] for identity in record["written"][name]]
    (out / MANIFEST_NAME).write_text(json.dumps(record))


def test_a_foreign_entry_at_a_reused_inode_is_not_removed(command, tmp_path):
    """Device and inode are reused once an entry is removed: a foreign checkpoint or file that gets a recorded
    entry's inode and name is still not the run's (no random id, another size or modification time), so
    --overwrite_output_dir keeps it."""
    from transformers import Trainer, TrainingArguments

    from conftest import tiny_bert, tweet_bytes_dataset

    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    elsewhere = tmp_path / "elsewhere"
    Trainer(model=tiny_bert(), train_dataset=tweet_bytes_dataset(8), args=TrainingArguments(
        output_dir=str(elsewhere), max_steps=2, save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
        per_device_train_batch_size=8, disable_tqdm=True)).train()
    _reuse_inode(out, "checkpoint-2", elsewhere / "checkpoint-2")
    (tmp_path / "config.json").write_text('{"mine": true}')
    _reuse_inode(out, "config.json", tmp_path / "config.json")
    with pytest.raises(Exception, match="holds checkpoint-2, which hf_lwsam did not write"):
        plan_output_dir(out, overwrite=True, resume_from_checkpoint=None)
    shutil.move(out / "checkpoint-2", tmp_path / "moved")
    plan = plan_output_dir(out, overwrite=True, resume_from_checkpoint=None)
    assert "config.json" not in {p.name for p in plan.remove} and (out / "checkpoint-4") in plan.remove
    apply_plan(plan)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and "mine" in (out / "config.json").read_text()


def test_an_entry_replaced_after_the_plan_is_checked_again_and_kept(command, tmp_path):
    """Each entry is checked against the record right before it is removed, not only when the plan was made."""
    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    plan = plan_output_dir(out, overwrite=True, resume_from_checkpoint=None)
    assert out / "checkpoint-2" in plan.remove and out / "trainer_state.json" in plan.remove
    shutil.rmtree(out / "checkpoint-2")
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-2")  # a copy: no id of its own recorded
    (out / "trainer_state.json").write_text("{}")  # rewritten since: another size and modification time
    with _capture() as records:
        apply_plan(plan)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "trainer_state.json"]
    assert "checkpoint-2, trainer_state.json changed since the run wrote it and is kept" in records[0].getMessage()


def test_a_readme_the_run_did_not_write_is_kept_and_the_card_goes_beside_it(command, tmp_path):
    """A README.md the user wrote or edited is reported as kept and is kept: the new run's card is
    _hf-lwsam-card.md (never uploaded), as the log and the summary say."""
    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    assert "hf-lwsam" in (out / "README.md").read_text()
    (out / "README.md").write_text("# My model\n\nMy own words.\n")
    with _capture() as records:
        code, stdout, stderr = run_cli([*command, "--output_dir", out, "--overwrite_output_dir", "--save_strategy",
                                        "no"])
    log = "\n".join(r.getMessage() for r in records)
    assert code == 0, stderr[-3000:]
    assert "(keeping README.md)" in log and "README.md was not written by hf_lwsam and is kept" in log
    assert (out / "README.md").read_text() == "# My model\n\nMy own words.\n"
    assert "hf-lwsam" in (out / "_hf-lwsam-card.md").read_text()
    assert f"output             : {out} (model card: _hf-lwsam-card.md)" in stdout
    # the card beside it is the run's: the next --overwrite_output_dir removes it, and keeps the user's README.md
    plan = plan_output_dir(out, overwrite=True, resume_from_checkpoint=None)
    assert out / "_hf-lwsam-card.md" in plan.remove and out / "README.md" not in plan.remove


def test_an_error_in_the_final_evaluation_keeps_the_trained_steps_and_the_rerun_finishes(command, tmp_path):
    """Training ends, then the final evaluation raises (a real one: `--eval_accumulation_steps 0` divides by zero
    there), with no checkpoint saved during training: the last step is saved as one, and the same command again,
    without the bad flag, only evaluates and saves the weights an uninterrupted run ends with, bit for bit."""
    whole = tmp_path / "whole"
    assert _run(command, whole, "--save_strategy", "no")[0] == 0
    out = tmp_path / "out"
    with _capture() as records, pytest.raises(ZeroDivisionError):
        run_cli([*command, "--output_dir", out, "--save_strategy", "no", "--eval_accumulation_steps", "0"])
    log = "\n".join(r.getMessage() for r in records)
    assert f"the trained weights are saved in {out / 'checkpoint-4'}" in log, log
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (out / RESULTS_NAME).exists(), "a run that did not finish must not look finished"
    code, log = _run(command, out, "--save_strategy", "no")
    assert code == 0, log
    assert f"Resuming from {out / 'checkpoint-4'} (global step 4)" in log
    assert "eval_accuracy" in json.loads((out / RESULTS_NAME).read_text())
    assert (out / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_another_tools_run_is_never_continued_or_overwritten_unasked(command, tmp_path):
    """A stock `Trainer`'s run in the same folder (both default to `trainer_output`): finished, it is refused; with
    its checkpoint only, it is refused too, naming `--resume_from_checkpoint`; continued with that flag, every file
    it wrote is kept, the ones under the final save's names moved to `_hf-lwsam-kept/`."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from conftest import tweet_bytes_dataset

    out = tmp_path / "out"
    stock = Trainer(model=AutoModelForSequenceClassification.from_pretrained(command[1]),
                    train_dataset=tweet_bytes_dataset(16), args=TrainingArguments(
                        output_dir=str(out), max_steps=2, save_strategy="steps", save_steps=2, report_to="none",
                        use_cpu=True, per_device_train_batch_size=8, disable_tqdm=True))
    stock.save_metrics("all", stock.train().metrics)
    stock.save_model()
    before = _tree(out)
    code, log = _run(command, out)
    assert code == 2 and "holds a finished run hf_lwsam did not write (all_results.json)" in log, log
    assert _tree(out) == before
    (out / RESULTS_NAME).unlink()  # as a script that saves the model and no metrics leaves it
    before = _tree(out)
    code, log = _run(command, out)
    assert code == 2 and "holds checkpoint-2, which hf_lwsam did not write: pass --resume_from_checkpoint" in log, log
    assert _tree(out) == before
    code, log = _run(command, out, "--resume_from_checkpoint", out / "checkpoint-2", "--save_strategy", "no")
    assert code == 0, log
    assert f"Resuming from {out / 'checkpoint-2'} (global step 2)" in log
    assert "model.safetensors" in log and "are kept in" in log
    kept = out / "_hf-lwsam-kept"
    for name, data in before.items():
        assert (out / name).is_file() and (out / name).read_bytes() == data or (kept / name).read_bytes() == data, name
    assert (kept / "model.safetensors").read_bytes() == before["model.safetensors"] != (out / "model.safetensors"
                                                                                        ).read_bytes()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4 and (out / RESULTS_NAME).exists()


def test_the_same_command_resumes_only_with_the_options_the_checkpoint_was_trained_with(command, tmp_path):
    """A rerun that finds a checkpoint resumes it only with the options it was trained with (`_hf-lwsam-run.json`
    in each checkpoint): a changed sam_* option, learning rate or training file is refused in one line naming it,
    nothing touched; logging and a longer run are not changes; naming the checkpoint continues with the new options
    and says which changed."""
    out = tmp_path / "out"
    assert _run(command, out)[0] == 0
    saved = json.loads((out / "checkpoint-4" / "_hf-lwsam-run.json").read_text())
    assert saved["sam_rho"] == 0.05 and saved["learning_rate"] == 5e-5 and saved["optim"] == "adamw_torch_fused"
    (out / RESULTS_NAME).unlink()  # as if stopped in the final save: the rerun resumes checkpoint-4
    before = _state(out)
    fewer = write_tweet_csvs(tmp_path / "fewer", n_train=24, n_validation=16)[0]
    for changed, named in [(["--sam_rho", "0.5"], "sam_rho: 0.05 -> 0.5"),
                           (["--sam_preset", "free"], "sam_ascent: 'exact' -> 'momentum'"),
                           (["--learning_rate", "0.05"], "learning_rate: 5e-05 -> 0.05"),
                           (["--train_file", fewer], "num_train_examples: 32 -> 24")]:
        code, _, stderr = run_cli([*command, "--output_dir", out, *changed])
        errors = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-train: error: ")]
        assert code == 2 and len(errors) == 1 and named in errors[0], stderr[-3000:]
        assert "trained with other options" in stderr and _state(out) == before
        if named.startswith(("sam_", "learning_rate")):  # checked before the model is loaded: nothing else printed
            assert len(stderr.splitlines()) == 1, stderr[-3000:]
    code, log = _run(command, out, "--logging_steps", "1", "--max_steps", "6")
    assert code == 0, log
    assert f"Resuming from {out / 'checkpoint-4'} (global step 4)" in log
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    (out / RESULTS_NAME).unlink()
    code, log = _run(command, out, "--max_steps", "6", "--resume_from_checkpoint", out / "checkpoint-6", "--sam_rho",
                     "0.5")
    assert code == 0 and "with options changed from the ones it was trained with: sam_rho: 0.05 -> 0.5" in log, log


def test_the_refusal_of_another_tools_checkpoints_names_the_latest(tmp_path):
    """checkpoint-10 is later than checkpoint-2 (by step, not by name)."""
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    with pytest.raises(Exception, match=r"holds checkpoint-10, checkpoint-2, .*checkpoint-10'"):
        plan_output_dir(tmp_path, overwrite=False, resume_from_checkpoint=None)
