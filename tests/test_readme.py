"""The README's Python usage example runs as written (in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs(tmp_path, monkeypatch, capsys):
    usage = README.read_text().split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Usage)", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 8  # 256 tweets / batch 32, one epoch
    assert any("sam/sharpness" in log for log in trainer.state.log_history)
    assert "eval_loss" in capsys.readouterr().out


@pytest.mark.slow  # SmolLM2-135M on the CPU: 4 SFT and 2 DPO LoRA steps
def test_readme_trl_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    section = README.read_text().split("## With TRL", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (With TRL)", "exec"), namespace)
    sft, dpo = namespace["sft"], namespace["dpo"]
    assert sft.state.global_step == 4 and dpo.state.global_step == 2
    assert any("lora_" in n for n in dpo.perturbed_parameter_names())
    assert any("sam/sharpness" in log and "num_tokens" in log for log in sft.state.log_history)
    assert any("sam/sharpness" in log and "rewards/margins" in log for log in dpo.state.log_history)
    assert dpo.reuse_disabled_reason is None
