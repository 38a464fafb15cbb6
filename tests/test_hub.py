"""`--push_to_hub`: real runs whose uploads are intercepted at the `huggingface_hub.HfApi` boundary (no network)."""

from __future__ import annotations

import contextlib
import io
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl, get_token

from hf_lwsam.cli.output import MANIFEST_NAME
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401

TOKEN = "hf_FAKEwriteTokenThatMustNeverBeWritten0123"


@pytest.fixture
def hub(monkeypatch) -> dict[str, list]:
    """`HfApi.create_repo` and `HfApi.upload_folder` recorded instead of sent: the repo, the token `huggingface_hub`
    resolves for the call, and every uploaded file's bytes. `HF_TOKEN` is restored afterwards."""
    calls: dict[str, list] = {"create_repo": [], "upload_folder": []}
    monkeypatch.setenv("HF_TOKEN", "")  # recorded, so whatever a run sets is undone after the test
    monkeypatch.delenv("HF_TOKEN")

    def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, "token": token or get_token(), "private": private,
                                     "exist_ok": exist_ok})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, token=None, ignore_patterns=None, run_as_future=False,
                      path_in_repo=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        names = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        names = filter_repo_objects(names, ignore_patterns=ignore_patterns)
        calls["upload_folder"].append({"repo_id": repo_id, "folder_path": folder_path, "token": token or get_token(),
                                       "run_as_future": run_as_future, "path_in_repo": path_in_repo,
                                       "files": {n: Path(folder_path, n).read_bytes() for n in names}})
        info = CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="End of training",
                          commit_description="", oid="0" * 40)
        if not run_as_future:
            return info
        future: Future = Future()
        future.set_result(info)
        return future

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture(scope="module")
def tweets(tmp_path_factory) -> list:
    """`hf-lwsam-train` flags naming a tiny local BERT and 32 + 16 real tweets in csv files."""
    root = tmp_path_factory.mktemp("hub_train")
    train_csv, validation_csv = write_tweet_csvs(root / "tweets", n_train=32, n_validation=16)
    return ["--model_name_or_path", make_tiny_bert_dir(root / "tiny-bert"), "--train_file", train_csv,
            "--validation_file", validation_csv, "--label_column", "sentiment", "--max_length", "16", *FAST]


def test_push_sends_the_card_and_model_files_to_the_requested_repo(tmp_path, hub, tweets):
    out = tmp_path / "local-name"
    code, stdout, stderr = run_cli([*tweets, "--output_dir", out, "--push_to_hub", "--hub_model_id",
                                    "someone/tweets-lwsam", "--hub_token", TOKEN, "--hub_private_repo", "true"])
    assert code == 0, stderr
    assert hub["create_repo"] == [{"repo_id": "someone/tweets-lwsam", "token": TOKEN, "private": True,
                                   "exist_ok": True}]
    assert len(hub["upload_folder"]) == 1
    push = hub["upload_folder"][0]
    assert push["repo_id"] == "someone/tweets-lwsam" and push["token"] == TOKEN
    assert push["folder_path"] == str(out) and not push["run_as_future"]
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        push["files"])
    assert (out / MANIFEST_NAME).is_file() and not [name for name in push["files"] if "hf-lwsam" in name]
    card = push["files"]["README.md"].decode("utf-8")
    front = yaml.safe_load(card.split("---\n")[1])
    assert "hf-lwsam" in front["tags"] and front["model-index"][0]["name"] == "local-name"
    assert 'model="someone/tweets-lwsam"' in card  # the usage snippet names the pushed repo
    assert push["files"]["README.md"] == (out / "README.md").read_bytes()
    assert "pushed to          : https://huggingface.co/someone/tweets-lwsam" in stdout


# ------------------------------------------------------------------------------------------------- the token
def _files_holding(root: Path, secret: bytes) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes())


def _assert_token_nowhere(out: Path, hub: dict[str, list], printed: str) -> None:
    """The push used the token, and no file written under `out`, no uploaded file and nothing printed holds it."""
    assert hub["upload_folder"] and all(call["token"] == TOKEN for call in hub["upload_folder"])
    assert list(out.glob("checkpoint-*/training_args.bin")) and (out / "training_args.bin").is_file()
    assert _files_holding(out, TOKEN.encode()) == []
    uploaded = [f"{call['path_in_repo'] or '.'}/{name}" for call in hub["upload_folder"]
                for name, data in call["files"].items() if TOKEN.encode() in data]
    assert uploaded == []
    assert TOKEN not in printed


def test_hub_token_is_in_no_file_hf_lwsam_train_writes_or_pushes(tmp_path, hub, tweets):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli([*tweets, "--output_dir", out, "--save_strategy", "steps", "--save_steps", "1",
                                    "--push_to_hub", "--hub_model_id", "someone/leak-check", "--hub_token", TOKEN,
                                    "--hub_strategy", "all_checkpoints"])
    assert code == 0, stderr
    assert any(call["path_in_repo"] == "checkpoint-1" for call in hub["upload_folder"])
    _assert_token_nowhere(out, hub, stdout + stderr)


def test_hub_token_is_in_no_file_hf_lwsam_sft_writes_or_pushes(tmp_path, hub, local, capfd):
    from hf_lwsam.cli.sft import main

    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--output_dir", str(out), *local, *TINY_SFT, "--save_strategy", "steps", "--save_steps", "1",
                     "--push_to_hub", "--hub_model_id", "someone/sft-leak-check", "--hub_token", TOKEN,
                     "--hub_strategy", "checkpoint"])
    assert code == 0, err.getvalue()[-3000:]
    assert any(call["path_in_repo"] == "last-checkpoint" for call in hub["upload_folder"])
    captured = capfd.readouterr()
    _assert_token_nowhere(out, hub, err.getvalue() + captured.out + captured.err)


TINY_SFT = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> list[str]:
    """A tiny local GPT-2 and Shakespeare paragraphs in a local folder, as `hf-lwsam-sft` flags."""
    pytest.importorskip("trl")
    from datasets import Dataset

    from conftest import shakespeare_paragraphs
    from test_cli import make_tiny_gpt2_dir

    root = tmp_path_factory.mktemp("hub_sft")
    model = make_tiny_gpt2_dir(root / "tiny-gpt2")
    paragraphs = shakespeare_paragraphs(24)
    Dataset.from_dict({"text": paragraphs[:16]}).to_json(root / "data" / "train.jsonl")
    Dataset.from_dict({"text": paragraphs[16:]}).to_json(root / "data" / "test.jsonl")
    return ["--model_name_or_path", str(model), "--dataset_name", str(root / "data"), "--bf16", "false"]



def test_lwsam_trainer_never_pickles_a_configured_hub_token(tmp_path, sgd_args):
    """A library user's config may carry `hub_token`: the checkpoints' and the saved model's `training_args.bin` do
    not, and the trainer keeps the token for its own Hub calls."""
    import torch

    from conftest import tiny_bert, tweet_bytes_dataset
    from hf_lwsam import LWSAMTrainer

    args = sgd_args(max_steps=2, save_strategy="steps", save_steps=1, hub_token=TOKEN, sam_rho=0.05)
    trainer = LWSAMTrainer(model=tiny_bert(), args=args, train_dataset=tweet_bytes_dataset(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = sorted(tmp_path.rglob("training_args.bin"))
    assert [p.relative_to(tmp_path).as_posix() for p in saved] == [
        "final/training_args.bin", "out/checkpoint-1/training_args.bin", "out/checkpoint-2/training_args.bin"]
    assert _files_holding(tmp_path, TOKEN.encode()) == []
    assert torch.load(saved[0], weights_only=False).hub_token is None and trainer.args.hub_token == TOKEN
    # Every torch.save(args) of the Trainer (also _push_from_checkpoint's copy next to a pushed checkpoint) pickles it.
    import pickle

    assert TOKEN.encode() not in pickle.dumps(trainer.args) and trainer.args.hub_token == TOKEN


# ------------------------------------------------------------------------------------------ network failures
def _connect_error() -> Exception:
    """The error huggingface_hub lets through when the network is down: its HTTP client's ConnectError."""
    import importlib

    client = "httpx2" if importlib.util.find_spec("httpx2") else "httpx"  # huggingface_hub >= 2 uses httpx2
    return importlib.import_module(client).ConnectError("[Errno -3] Temporary failure in name resolution")


def _error_lines(stderr: str, prog: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}:")]


def test_no_network_when_creating_the_repo_is_one_line_and_removes_nothing(tmp_path, monkeypatch, tweets):
    """--overwrite_output_dir on a finished run: the repo cannot be created, and the previous run's files stay."""
    out = tmp_path / "run"
    assert run_cli([*tweets, "--output_dir", out])[0] == 0
    before = sorted(p.name for p in out.iterdir())

    def create_repo(self, repo_id, **kwargs):
        raise _connect_error()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    code, _, stderr = run_cli([*tweets, "--output_dir", out, "--overwrite_output_dir", "--push_to_hub",
                               "--hub_model_id", "someone/offline"])
    errors = _error_lines(stderr, "hf-lwsam-train")
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert "could not create the Hub repo 'someone/offline' (ConnectError: [Errno -3]" in errors[0]
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("error", ["ConnectError", "ConnectionError"])
def test_no_network_for_the_final_push_is_one_line_and_the_model_is_saved(tmp_path, hub, monkeypatch, tweets,
                                                                        error):
    def upload_folder(self, **kwargs):
        raise _connect_error() if error == "ConnectError" else ConnectionError("Connection reset by peer")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    code, _, stderr = run_cli([*tweets, "--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/offline"])
    errors = _error_lines(stderr, "hf-lwsam-train")
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert f"could not upload to the Hub repo 'someone/offline' ({error}:" in errors[0]
    assert (f"nothing is lost, the trained model is saved in {out}: upload it with hf upload someone/offline"
            in errors[0])
    assert {"model.safetensors", "README.md", "all_results.json"} <= {p.name for p in out.iterdir()}


def test_no_network_for_the_sft_push_is_one_line_and_the_model_is_saved(tmp_path, hub, monkeypatch, local):
    from hf_lwsam.cli.sft import main

    def upload_folder(self, **kwargs):
        raise _connect_error()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out, err = tmp_path / "run", io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--output_dir", str(out), *local, *TINY_SFT, "--save_strategy", "no", "--push_to_hub",
                     "--hub_model_id", "someone/offline"])
    errors = _error_lines(err.getvalue(), "hf-lwsam-sft")
    assert code == 2 and len(errors) == 1 and "nothing is lost, the trained model is saved in" in errors[0], errors
    assert {"model.safetensors", "README.md", "all_results.json"} <= {p.name for p in out.iterdir()}


def test_no_network_when_sft_creates_the_repo_is_one_line_and_writes_nothing(tmp_path, monkeypatch, local):
    from hf_lwsam.cli.sft import main

    def create_repo(self, repo_id, **kwargs):
        raise _connect_error()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    out, err = tmp_path / "run", io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["--output_dir", str(out), *local, *TINY_SFT, "--push_to_hub", "--hub_model_id", "someone/x"])
    errors = _error_lines(err.getvalue(), "hf-lwsam-sft")
    assert code == 2 and len(errors) == 1 and "could not create the Hub repo 'someone/x' (ConnectError" in errors[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------- the final push
def _files_state(root: Path) -> dict[str, tuple]:
    """Each file directly in `root`: its inode, modification time and bytes."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in root.iterdir() if p.is_file()}


def test_the_final_push_uploads_the_saved_files_without_rewriting_them(tmp_path, hub, monkeypatch, tweets):
    """The final save writes the model whole (renamed into place, all_results.json last); the push only reads it:
    no file is written again before or during the upload."""
    import json

    fake = HfApi.upload_folder
    at_upload: dict[str, tuple] = {}

    def upload_folder(self, **kwargs):
        at_upload.update(_files_state(Path(kwargs["folder_path"])))
        return fake(self, **kwargs)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    code, _, stderr = run_cli([*tweets, "--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/as-saved"])
    assert code == 0, stderr[-3000:]
    after = _files_state(out)
    assert at_upload == after
    finished = (out / "all_results.json").stat().st_mtime_ns  # the final save writes it last
    final = set(json.loads((out / MANIFEST_NAME).read_text())["written"]) & set(after)
    assert {"model.safetensors", "config.json", "README.md", "training_args.bin"} <= final
    rewritten = sorted(name for name in final if after[name][1] > finished)
    assert rewritten == [], f"written after the final save: {rewritten}"
    pushed = hub["upload_folder"][0]["files"]
    assert {name: after[name][2] for name in pushed} == pushed


def test_a_file_error_during_the_upload_is_reported_as_one_and_the_saved_files_are_untouched(tmp_path, hub,
                                                                                             monkeypatch, tweets):
    """An OSError of the upload that is not the network's (a file it cannot read) is named as such, and the saved
    model it reports is the one the final save wrote."""
    at_upload: dict[str, tuple] = {}

    def upload_folder(self, *, folder_path, **kwargs):
        at_upload.update(_files_state(Path(folder_path)))
        raise PermissionError(13, "Permission denied", str(Path(folder_path) / "model.safetensors"))

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "run"
    code, _, stderr = run_cli([*tweets, "--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/unreadable"])
    errors = _error_lines(stderr, "hf-lwsam-train")
    assert code == 2 and len(errors) == 1, stderr[-2000:]
    assert "could not upload to the Hub repo 'someone/unreadable' (PermissionError: [Errno 13] Permission denied" \
        in errors[0]
    assert f"a file in {out} could not be read for the upload; the trained model is saved there as the run wrote it" \
        in errors[0] and "check the network" not in errors[0]
    assert at_upload and _files_state(out) == at_upload
    finished = (out / "all_results.json").stat().st_mtime_ns
    assert all(mtime <= finished for name, (_, mtime, _) in at_upload.items() if name != MANIFEST_NAME)


@pytest.mark.parametrize("form", ["--hub_token TOKEN", "--hub_token=TOKEN"])
def test_the_hub_token_leaves_sys_argv_before_any_hub_call(tmp_path, hub, monkeypatch, tweets, form):
    """Integrations record `sys.argv`: the token is moved into HF_TOKEN and dropped from it, in both flag forms,
    before the Hub repo is created; the other arguments stay as given."""
    import sys

    from hf_lwsam.cli.train import main

    argv_seen: list[list[str]] = []
    fake = HfApi.create_repo

    def create_repo(self, repo_id, **kwargs):
        argv_seen.append(list(sys.argv))
        return fake(self, repo_id, **kwargs)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    token_args = ["--hub_token", TOKEN] if form == "--hub_token TOKEN" else [f"--hub_token={TOKEN}"]
    args = [str(a) for a in [*tweets, "--output_dir", tmp_path / "run", "--push_to_hub", "--hub_model_id",
                             "someone/argv"]]
    monkeypatch.setattr(sys, "argv", ["hf-lwsam-train", *args[:4], *token_args, *args[4:]])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main()
    assert code == 0, err.getvalue()[-3000:]
    assert hub["create_repo"][0]["token"] == TOKEN and hub["upload_folder"][0]["token"] == TOKEN
    assert argv_seen == [["hf-lwsam-train", *args]] and sys.argv == ["hf-lwsam-train", *args]
