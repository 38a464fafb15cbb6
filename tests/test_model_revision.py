"""`--model_revision` pins every file of a Hub model in both CLIs: its config, tokenizer, weights, the weightless copy
the layer names are checked on, and with `--trust_remote_code` its code.

The Hub is stood in for by a local Hub cache (offline, no git) holding one repository at two commits: `main`, whose
config points at remote code that raises when imported and which has no tokenizer or weights, and the pinned commit,
a tiny GPT-2 with its own (working) remote code. A run pinned to that commit succeeds only if nothing is read from
`main`; the loaders' keyword arguments are recorded at the transformers boundary as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from test_cli import FAST, make_tiny_gpt2_dir, one_torch_thread, run_cli, write_play_texts  # noqa: F401

MAIN, PINNED = "a" * 40, "b" * 40  # commit ids: only `main` is a ref, the pinned one is reached by its id
AUTO_MAP = {"AutoConfig": "configuration_pinned.PinnedConfig",
            "AutoModelForCausalLM": "modeling_pinned.PinnedForCausalLM"}
PINNED_CODE = {
    "configuration_pinned.py": "from transformers import GPT2Config\n\n\nclass PinnedConfig(GPT2Config):\n"
                               "    model_type = 'pinned-gpt2'\n",
    "modeling_pinned.py": "from transformers import GPT2LMHeadModel\n\nfrom .configuration_pinned import PinnedConfig\n"
                          "\n\nclass PinnedForCausalLM(GPT2LMHeadModel):\n    config_class = PinnedConfig\n",
}
TRAP = "raise RuntimeError('the remote code of main was imported')\n"


def write_hub_repo(hub_cache: Path, repo_id: str) -> None:
    """`repo_id` in the Hub cache layout (`models--org--name/{refs,snapshots}`) at the commits `MAIN` and `PINNED`."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    pinned = make_tiny_gpt2_dir(repo / "snapshots" / PINNED)
    config = json.loads((pinned / "config.json").read_text())
    config.update(model_type="pinned-gpt2", auto_map=AUTO_MAP)
    main = repo / "snapshots" / MAIN
    main.mkdir()
    for folder, code in ((pinned, PINNED_CODE), (main, dict.fromkeys(PINNED_CODE, TRAP))):
        (folder / "config.json").write_text(json.dumps(config))
        for name, text in code.items():
            (folder / name).write_text(text)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict[str, list[dict[str, Any]]]:
    """A fresh local Hub cache and remote-code module folder; returns the recorded loader calls by loader."""
    import transformers
    import transformers.dynamic_module_utils as dynamic_modules
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    calls: dict[str, list[dict[str, Any]]] = {}

    def record(owner: Any, method: str, key: str) -> None:
        real = getattr(owner, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.setdefault(key, []).append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, method, classmethod(lambda cls, *a, **k: wrapper(*a, **k))
                            if isinstance(owner, type) else wrapper)

    for auto in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        record(getattr(transformers, auto), "from_pretrained", auto)
    record(dynamic_modules, "get_cached_module_file", "remote code")  # every remote-code file fetched
    return calls


def assert_everything_pinned(calls: dict[str, list[dict[str, Any]]]) -> None:
    assert set(calls) == {"AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "remote code"}, set(calls)
    for loader, made in calls.items():
        assert all(kwargs.get("revision") == PINNED for kwargs in made), (loader, made)


def test_train_cli_pins_config_tokenizer_weights_and_remote_code(hub, tmp_path):
    from huggingface_hub import constants

    repo = "hf-lwsam-test/pinned-train"
    write_hub_repo(Path(constants.HF_HUB_CACHE), repo)
    train_txt, validation_txt = write_play_texts(tmp_path / "plays")
    code, out, err = run_cli([
        "--model_name_or_path", repo, "--model_revision", PINNED, "--trust_remote_code", "true",
        "--task", "causal_lm", "--train_file", train_txt, "--validation_file", validation_txt, "--max_length", "32",
        "--max_steps", "1", "--max_eval_samples", "4", "--output_dir", tmp_path / "out", *FAST])
    assert code == 0, err[-3000:]
    assert_everything_pinned(hub)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "pinned-gpt2" and config["architectures"] == ["PinnedForCausalLM"]


def test_sft_cli_pins_config_tokenizer_weights_and_remote_code(hub, tmp_path, capsys):
    from huggingface_hub import constants

    from conftest import shakespeare_paragraphs
    from hf_lwsam.cli.sft import main

    repo = "hf-lwsam-test/pinned-sft"
    write_hub_repo(Path(constants.HF_HUB_CACHE), repo)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in shakespeare_paragraphs(8)))
    code = main(["--model_name_or_path", repo, "--model_revision", PINNED, "--trust_remote_code", "true",
                 "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                 "--per_device_train_batch_size", "4", "--max_length", "32", "--bf16", "false", "--report_to", "none",
                 "--disable_tqdm", "true"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert_everything_pinned(hub)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "pinned-gpt2" and config["architectures"] == ["PinnedForCausalLM"]
