"""`hf-lwsam-sft`: a run trains, saves the final model with the LW-SAM card and `all_results.json` last, refuses to
overwrite a finished run, and reports bad input as one line with exit 2, writing nothing.

The fast tests run a tiny GPT-2 saved to a local folder with a local dataset (`--model_name_or_path` /
`--dataset_name`); the offline default (a LoRA SFT of SmolLM2-135M-Instruct) is the slow test at the end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("trl")
from hf_lwsam.cli.sft import main  # noqa: E402

TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> list[str]:
    """Flags naming a tiny GPT-2 (random init, an in-process BPE) and Shakespeare paragraphs, both in local folders
    (and bf16 off: SFTConfig turns it on, this CPU has none)."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import shakespeare_paragraphs, tiny_tokenizer

    root = tmp_path_factory.mktemp("local")
    tokenizer = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=3, n_head=2,
                               bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    paragraphs = shakespeare_paragraphs(48)
    Dataset.from_dict({"text": paragraphs[:32]}).to_json(root / "data" / "train.jsonl")
    Dataset.from_dict({"text": paragraphs[32:]}).to_json(root / "data" / "test.jsonl")
    return ["--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"), "--bf16", "false"]


def test_a_run_trains_saves_and_refuses_a_second_run(local, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *local, *TINY, "--sam_rho", "0.1"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_loss"] > 0
    card = (out / "README.md").read_text()
    assert "hf-lwsam" in card and "sam_rho" in card.replace("`", "")
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    logged = [e for e in state["log_history"] if "sam/sharpness" in e]
    assert logged and "num_tokens" in logged[0]
    capsys.readouterr()
    assert main(["--output_dir", str(out), *local, *TINY]) == 2  # a finished run is not overwritten silently
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
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, local, tmp_path, capsys):
    flags, expected = BAD[case]
    out = tmp_path / "run"
    given = [] if "--model_name_or_path" in flags else local  # the model-without-data case names only a model
    assert main(["--output_dir", str(out), *given, *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-lwsam-sft: error:") and expected in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_push_to_hub_sends_the_lwsam_card(local, tmp_path, monkeypatch, capsys):
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
    # (no checkpoints: the Trainer would push each one in the background, which this fake does not imitate)
    assert main(["--output_dir", str(out), *local, *TINY, "--save_strategy", "no", "--push_to_hub", "--hub_model_id",
                 "someone/sft-lwsam"]) == 0
    assert [p["repo_id"] for p in pushed] == ["someone/sft-lwsam"]
    card = pushed[0]["files"]["README.md"].decode("utf-8")
    assert "hf-lwsam" in card and card == (out / "README.md").read_text()
    assert "model.safetensors" in pushed[0]["files"]


@pytest.mark.slow  # SmolLM2-135M on the CPU: 2 LoRA steps and 2 x 200 held-out prompts scored
def test_offline_default_is_a_lora_sft_of_smollm2_reporting_answer_accuracy(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1"]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert 0 <= results["eval_answer_accuracy_before"] <= 1 and 0 <= results["eval_answer_accuracy"] <= 1
    assert results["train_loss"] > 0
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not (out / "model.safetensors").exists()  # the LoRA adapter, not a copy of the 538 MB model
    card = (out / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "LoRA" in card and "hf-lwsam" in card and "Answer Accuracy" in card
    summary = capsys.readouterr().out
    assert "held-out answer accuracy" in summary and "model.layers.29." in summary
