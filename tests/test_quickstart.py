"""The README's Quickstart is two commands (install and run the main job; run the tests) and `.ci/run` runs the same
install and the same test command."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_quickstart():
    quickstart = (REPO / "README.md").read_text().split("## Quickstart", 1)[1].split("```bash\n", 1)[1]
    lines = quickstart.split("```", 1)[0].strip().splitlines()
    assert len(lines) == 2
    install, main_job = lines[0].rsplit(" && ", 1)
    assert install.startswith("pip install torch==2.13.0 && ") and main_job == "hf-lwsam-train"
    assert lines[1] == "python -m pytest"
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    assert commands == [install, lines[1]]
