"""The README's Quickstart is two commands (install and run the main job; run the tests), and `.ci/run` runs exactly
the commands the README gives for CI: the Quickstart's install, the docs build and the Quickstart's test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_ci_runs_the_readme_quickstart():
    readme = (REPO / "README.md").read_text()
    quickstart = _bash_blocks(readme.split("## Quickstart", 1)[1])[0]
    assert len(quickstart) == 2
    install, main_job = quickstart[0].rsplit(" && ", 1)
    assert install.startswith('pip install -e ".[dev]" && ') and main_job == "hf-lwsam-train"
    assert quickstart[1] == "python -m pytest"

    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    ci_block = _bash_blocks(readme.split("CI (`.ci/run`) runs exactly", 1)[1])[0]
    assert commands == ci_block  # exactly the README's CI lines, in order
    assert commands[1] == install and commands[-1] == quickstart[1]
    assert 'pip install -e ".[docs]" && mkdocs build --strict' in commands
