"""`--push_to_hub`: a real run whose upload is intercepted at the `huggingface_hub.HfApi` boundary (no network)."""

from __future__ import annotations

import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401


def test_push_sends_the_card_and_model_files_to_the_requested_repo(tmp_path, monkeypatch):
    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, "token": token, "private": private, "exist_ok": exist_ok})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, token=None, ignore_patterns=None, run_as_future=False, **kwargs):
        from pathlib import Path

        files = {p.relative_to(folder_path).as_posix(): p.read_bytes() for p in Path(folder_path).rglob("*")
                 if p.is_file()}
        calls["upload_folder"].append({"repo_id": repo_id, "folder_path": folder_path, "token": token,
                                       "run_as_future": run_as_future, "files": files})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="End of training",
                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    model_dir = make_tiny_bert_dir(tmp_path / "tiny-bert")
    train_csv, validation_csv = write_tweet_csvs(tmp_path / "tweets", n_train=32, n_validation=16)
    out = tmp_path / "local-name"
    code, stdout, stderr = run_cli([
        "--model_name_or_path", model_dir, "--train_file", train_csv, "--validation_file", validation_csv,
        "--label_column", "sentiment", "--max_length", "16", "--output_dir", out, "--push_to_hub",
        "--hub_model_id", "someone/tweets-lwsam", "--hub_token", "hf_test_token", "--hub_private_repo", "true", *FAST,
    ])
    assert code == 0, stderr
    assert calls["create_repo"] == [{"repo_id": "someone/tweets-lwsam", "token": "hf_test_token", "private": True,
                                     "exist_ok": True}]
    assert len(calls["upload_folder"]) == 1
    push = calls["upload_folder"][0]
    assert push["repo_id"] == "someone/tweets-lwsam" and push["token"] == "hf_test_token"
    assert push["folder_path"] == str(out) and not push["run_as_future"]
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        push["files"])
    card = push["files"]["README.md"].decode("utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "hf-lwsam" in front["tags"] and front["model-index"][0]["name"] == "local-name"
    assert 'model="someone/tweets-lwsam"' in card  # the usage snippet names the pushed repo
    assert push["files"]["README.md"] == (out / "README.md").read_bytes()
    assert "pushed to          : https://huggingface.co/someone/tweets-lwsam" in stdout
