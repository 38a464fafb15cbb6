"""`hf-lwsam-sft`: the offline default trains, saves the final model with the LW-SAM card and `all_results.json` last,
refuses to overwrite a finished run, and reports bad input as one line with exit 2, writing nothing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
from hf_lwsam.cli.sft import main  # noqa: E402

TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--logging_steps", "1"]


def test_offline_default_trains_saves_and_refuses_a_second_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *TINY, "--sam_rho", "0.1"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] > 0 and "eval_loss" in results
    card = (out / "README.md").read_text()
    assert "hf-lwsam" in card and "sam_rho" in card.replace("`", "")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = [e for e in state["log_history"] if "sam/sharpness" in e]
    assert logged and "num_tokens" in logged[0]
    capsys.readouterr()
    assert main(["--output_dir", str(out), *TINY]) == 2  # a finished run is not overwritten silently
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite_output_dir" in err[0]


BAD = {
    "negative rho": (["--sam_rho", "-1"], "sam_rho=-1"),
    "unknown flag": (["--bogus", "1"], "--bogus"),
    "model without data": (["--model_name_or_path", "gpt2"], "--dataset_name is missing"),
    "missing config file": (["--config", "nope.yaml"], "--config needs an existing YAML file"),
    "bad selection": (["--sam_selection", "best"], "sam_selection"),
    "layers matching nothing": (["--sam_target_layers", "nothing.here", "nor.this"], "matches no module"),
    "bad regex": (["--sam_target_layers", "["], "sam_target_layers"),
    "missing train split": (["--dataset_train_split", "nope"], "has no 'nope' split"),
    "eval without a split": (["--eval_strategy", "steps", "--dataset_test_split", "nope"], "needs a 'nope' split"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    flags, expected = BAD[case]
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-lwsam-sft: error:") and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_push_to_hub_sends_the_lwsam_card(tmp_path, monkeypatch, capsys):
    """The upload is intercepted at the `huggingface_hub.HfApi` boundary (no network)."""
    from pathlib import Path

    from huggingface_hub import CommitInfo, HfApi, RepoUrl

    pushed: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        pushed.append({"repo_id": repo_id, "files": {p.relative_to(folder_path).as_posix(): p.read_bytes()
                                                     for p in Path(folder_path).rglob("*") if p.is_file()}})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="End of training",
                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *TINY, "--push_to_hub", "--hub_model_id", "someone/sft-lwsam"]) == 0
    assert [p["repo_id"] for p in pushed] == ["someone/sft-lwsam"]
    card = pushed[0]["files"]["README.md"].decode("utf-8")
    assert "hf-lwsam" in card and card == (out / "README.md").read_text()
    assert "model.safetensors" in pushed[0]["files"]
