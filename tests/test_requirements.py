"""The package's declared requirements exclude versions with known security defects in what the package relies on."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def _dependencies() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {(r := Requirement(line)).name: r for line in project["dependencies"]}


def test_torch_requirement_excludes_versions_whose_weights_only_load_can_be_bypassed():
    """`torch.load(..., weights_only=True)` (the ascent and RNG state of a checkpoint) runs code from a crafted file
    before torch 2.6 (CVE-2025-32434), so no torch older than 2.6 may be installed with the package."""
    torch_requirement = _dependencies()["torch"]
    assert not any(torch_requirement.specifier.contains(v) for v in ("2.4.0", "2.5.1", "2.6.0rc1"))
    assert torch_requirement.specifier.contains("2.6.0") and torch_requirement.specifier.contains("2.13.0")
