"""The docs are tested: every Python block of README.md and docs/ runs, every `hf-lwsam-*` command shown is accepted
by the real parser, every relative link and repository path exists, the generated reference pages are current and
byte-stable, the API reference names every public object, and `mkdocs build --strict` fails on a broken link, a
missing anchor and a missing page; the API page renders HF-style docstrings (links, optional arguments)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REPORTS = DOCS / "benchmarks"  # a link to ../benchmarks: the scripts' own reports, checked where they are written
FENCE_MARKERS = {"notest", "slow", "gpu"}  # the only ways a Python block is not run by the default suite
PROCESS_WORDS = re.compile(r"this session|earlier session|this round|issue [0-9]{1,2}\b|was lent|this turn", re.I)
PATH_ROOTS = ("hf_lwsam/", "scripts/", "tests/", "benchmarks/", "docs/", ".ci/", "model_cards/")
ROOT_FILES = {"README.md", "pyproject.toml", "mkdocs.yml", ".ci/run"}
COMMANDS = {"hf-lwsam-train", "hf-lwsam-sft"}


def doc_files() -> list[Path]:
    pages = [p for p in sorted(DOCS.rglob("*.md")) if REPORTS not in p.parents]
    return [REPO / "README.md", *pages]


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    markers: set[str]
    heading: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the heading they sit under."""
    found, heading, fence, start, body, info = [], "", None, 0, [], ""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            match = re.match(r"^\s*(`{3,})(.*)$", line)
            if match:
                fence, info, start, body = match.group(1), match.group(2).strip(), number, []
        elif line.strip() == fence:
            words = info.split()
            lang = words[0] if words else ""
            found.append(Block(path, start, lang, set(words[1:]), heading, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    return found


def python_blocks() -> list:
    params = []
    for path in doc_files():
        for block in blocks(path):
            if block.lang != "python" or "notest" in block.markers:
                continue
            marks = [getattr(pytest.mark, m) for m in ("slow", "gpu") if m in block.markers]
            params.append(pytest.param(block, id=block.id, marks=marks))
    return params


# ------------------------------------------------------------------------------------------- Python blocks run
def _check_readme_usage(namespace: dict, out: str) -> None:
    from hf_lwsam.modes import RECOMMENDED_PRESET, preset_options

    trainer = namespace["trainer"]
    assert trainer.state.global_step == 8  # 256 tweets / batch 32, one epoch
    assert trainer.args.sam_preset == RECOMMENDED_PRESET and trainer.args.sam_rho == preset_options("free").sam_rho
    assert any("sam/loss_perturbed" in log and "sam/e_norm" in log for log in trainer.state.log_history)
    assert "eval_loss" in out


def _check_readme_trl(namespace: dict, out: str) -> None:
    sft = namespace["sft"]
    assert sft.state.global_step == 4
    assert any("sam/loss_perturbed" in log and "num_tokens" in log for log in sft.state.log_history)


def _check_trl_guide(namespace: dict, out: str) -> None:
    sft, dpo = namespace["sft"], namespace["dpo"]
    assert sft.state.global_step == 4 and dpo.state.global_step == 2
    assert any("lora_" in n for n in dpo.perturbed_parameter_names())
    assert any("sam/sharpness" in log and "num_tokens" in log for log in sft.state.log_history)
    assert any("sam/sharpness" in log and "rewards/margins" in log for log in dpo.state.log_history)
    assert dpo.reuse_disabled_reason is None


# What a block must have done beyond running, by (file, heading).
CHECKS = {
    ("README.md", "Usage"): _check_readme_usage,
    ("README.md", "With TRL"): _check_readme_trl,
    ("docs/guides/trl.md", "TRL: `SFTTrainer` and `DPOTrainer`"): _check_trl_guide,
}


def test_python_fences_use_only_known_markers():
    unknown = {b.id: b.markers - FENCE_MARKERS for p in doc_files() for b in blocks(p)
               if b.lang == "python" and b.markers - FENCE_MARKERS}
    assert not unknown, f"unknown fence markers (use {sorted(FENCE_MARKERS)}): {unknown}"
    keys = {(str(b.path.relative_to(REPO)), b.heading) for p in doc_files() for b in blocks(p) if b.lang == "python"}
    assert set(CHECKS) <= keys  # every check still finds its block


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs(block: Block, tmp_path, monkeypatch, capsys):
    if "gpu" in block.markers:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    from hf_lwsam.ascent import ASCENTS
    from hf_lwsam.selection_rules import SELECTION_RULES

    registered, rules = dict(ASCENTS), dict(SELECTION_RULES)
    try:
        exec(compile(block.code, block.id, "exec"), namespace)
    finally:  # a block that registers an ascent or a selection rule (docs/development.md) leaves the registries as
        ASCENTS.clear()  # they were
        ASCENTS.update(registered)
        SELECTION_RULES.clear()
        SELECTION_RULES.update(rules)
    check = CHECKS.get((str(block.path.relative_to(REPO)), block.heading))
    if check is not None:
        check(namespace, capsys.readouterr().out)


# ------------------------------------------------------------------------------------- commands are accepted
def _commands_in(text: str) -> list[list[str]]:
    """Every `hf-lwsam-*` invocation in shell text: continuation lines joined, comments dropped, split at && ; |."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        command: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";", "|", "||"):
                if command and command[0] in COMMANDS:
                    commands.append(command)
                command = []
            else:
                command.append(token)
    return commands


def shown_commands() -> list:
    from hf_lwsam.cli import args, sft

    found = []
    for path in doc_files():
        for block in blocks(path):
            if block.lang in ("bash", "sh", "shell", "console", "text", ""):
                found += [(f"{block.id}", c) for c in _commands_in(block.code)]
        prose = re.sub(r"^\s*`{3,}.*?^\s*`{3,}", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", prose):
            found += [(f"{path.relative_to(REPO)} (inline)", c) for c in _commands_in(span)]
    for name, parser in (("hf-lwsam-train --help", args.make_parser()), ("hf-lwsam-sft --help", sft.make_parser())):
        found += [(name, c) for c in _commands_in(parser.description)]
    return [pytest.param(argv, id=f"{where}: {shlex.join(argv)[:60]}") for where, argv in found]


# The one refusal that is about the machine, not the command: SFTConfig turns bf16 on, and this CPU has none.
MACHINE_REFUSALS = ("--bf16 is on (SFTConfig's default) and this machine has no bf16 accelerator",)


@pytest.mark.parametrize("argv", shown_commands())
def test_shown_command_is_accepted_by_its_parser(argv, monkeypatch):
    from hf_lwsam.cli import args, sft
    from hf_lwsam.cli.args import UsageError

    monkeypatch.chdir(REPO)  # paths in commands are relative to the repository root
    command, flags = argv[0], argv[1:]
    if "--help" in flags:
        with pytest.raises(SystemExit) as exit_info:
            (args.make_parser() if command == "hf-lwsam-train" else sft.make_parser()).parse_args(flags)
        assert exit_info.value.code == 0
        return
    try:
        args.parse_args(flags) if command == "hf-lwsam-train" else sft.parse_args(flags)
    except UsageError as error:
        assert str(error).startswith(MACHINE_REFUSALS), f"{shlex.join(argv)}: {error}"


def test_commands_are_found_in_every_place_they_are_shown():
    found = [p.values[0] for p in shown_commands()]
    assert sum(c[0] == "hf-lwsam-sft" for c in found) >= 3 and sum(c[0] == "hf-lwsam-train" for c in found) >= 8


# -------------------------------------------------------------------------------------- links and paths exist
def _link_targets(text: str) -> list[str]:
    text = re.sub(r"^\s*`{3,}.*?^\s*`{3,}", "", text, flags=re.S | re.M)  # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def _repository_paths(text: str) -> list[str]:
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"^\s*`{3,}.*?^\s*`{3,}", "", text, flags=re.S | re.M))
    return [s for s in spans if " " not in s and (s.startswith(PATH_ROOTS) or s.split("::")[0] in ROOT_FILES)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_and_repository_paths_exist(path: Path):
    text = path.read_text(encoding="utf-8")
    missing = []
    for target in _link_targets(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the page (mkdocs checks anchors)
        if not (path.parent / target.split("#")[0]).exists():
            missing.append(target)
    for named in _repository_paths(text):
        file, _, test = named.partition("::")
        pattern = re.sub(r"<[^>]+>", "*", file)
        matches = list(REPO.glob(pattern.rstrip("/"))) if "*" in pattern else [REPO / file]
        if not any(m.exists() for m in matches):
            missing.append(named)
        elif test and not re.search(rf"^def {re.escape(test)}\(", matches[0].read_text(), re.M):
            missing.append(named)
    assert not missing, f"{path.relative_to(REPO)} names what does not exist: {missing}"


# ------------------------------------------------------------------------------------------ honest, short text
def test_readme_has_at_most_250_lines():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_no_text_talks_about_how_the_project_is_made():
    files = [*doc_files(), *sorted((REPO / "hf_lwsam").rglob("*.py")), *sorted((REPO / "hf_lwsam").rglob("*.j2"))]
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if PROCESS_WORDS.search(line)]
    assert not hits, "\n".join(hits)


# ---------------------------------------------------------------------- one recommendation, one name per mode
RECOMMENDING = ("README.md", "docs/index.md", "docs/guides/choosing-a-mode.md")


def _help_texts() -> dict[str, str]:
    from hf_lwsam.cli import args, sft

    return {"hf-lwsam-train --help": args.make_parser().format_help(),
            "hf-lwsam-sft --help": sft.make_parser().format_help()}


def _readme_recommendation() -> str:
    """The README's sentence that recommends a preset (in its first paragraph)."""
    from hf_lwsam.modes import RECOMMENDED_PRESET

    intro = (REPO / "README.md").read_text(encoding="utf-8").split("\n\n")[1]
    sentences = re.split(r"(?<=[.])\s+(?=[A-Z])", " ".join(intro.split()))
    return next(s for s in sentences if f'sam_preset="{RECOMMENDED_PRESET}"' in s)


def test_one_preset_is_recommended_everywhere_with_the_same_numbers():
    """README.md, the docs home, the choosing-a-mode guide and both CLIs' --help name the same preset first, by its
    mode's name and its radius, with the README's measured numbers; --help shows no other preset."""
    from hf_lwsam.config import SAM_PRESETS
    from hf_lwsam.modes import RECOMMENDED_PRESET, preset_mode, preset_options

    assert RECOMMENDED_PRESET in SAM_PRESETS
    numbers = re.findall(r"[+-]?\d+\.\d+|\d+%", _readme_recommendation())
    assert len(numbers) >= 6, numbers  # the gains, shares and throughputs the README states
    for name in RECOMMENDING:
        text = " ".join((REPO / name).read_text(encoding="utf-8").split())
        first = re.search(r'sam_preset="(\w+)"', text)
        assert first and first.group(1) == RECOMMENDED_PRESET, f"{name} first names sam_preset={first.group(1)!r}"
        assert preset_mode(RECOMMENDED_PRESET) in text and f"rho {preset_options(RECOMMENDED_PRESET).sam_rho}" in text
        missing = [n for n in numbers if n not in text]
        assert not missing, f"{name} lacks the README's numbers {missing}"
        bold = re.findall(r"^\| \*\*([^*|]+)\*\* \|", (REPO / name).read_text(encoding="utf-8"), re.M)
        assert set(bold) <= {preset_mode(RECOMMENDED_PRESET)}, f"{name} highlights {bold} in its mode table"
    for where, text in _help_texts().items():
        assert set(re.findall(r"--sam_preset (\w+)", text)) == {RECOMMENDED_PRESET}, where


def _mode_rows(path: Path) -> list[tuple[str, str]]:
    """The (mode, options) cells of a mode table: the rows under a header starting `| mode | options |`."""
    rows, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("| mode | options |"):
            inside = True
        elif inside and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.append((cells[0].strip("*"), cells[1]))
        elif inside and not line.startswith("|"):
            inside = False
    return rows


@pytest.mark.parametrize("name", ["README.md", "docs/guides/choosing-a-mode.md"])
def test_a_mode_table_names_each_mode_as_the_cards_and_summaries_do(name):
    """Each row's mode is `hf_lwsam.modes.sam_mode` of the options in its options cell (the name the model card and
    the CLI summary print), optionally followed by ': ' and which layers."""
    import ast

    from hf_lwsam.modes import preset_options, sam_mode

    rows = _mode_rows(REPO / name)
    assert len(rows) >= 6
    for mode, cell in rows:
        preset = re.search(r'sam_preset="(\w+)"', cell)
        options = {key: ast.literal_eval(value) for key, value in re.findall(r"(sam_\w+)=([^,`)]+)", cell)
                   if key != "sam_preset"}
        if "`sam_target_layers` =" in cell:  # layers named in words
            options["sam_target_layers"] = "named"
        expected = sam_mode(preset_options(preset.group(1) if preset else None, **options))
        assert mode == expected or mode.startswith(expected + ": "), f"{name}: {mode!r} is {expected!r}"


# -------------------------------------------------------------------------------- one source for every option
def _generator():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gen_docs
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return gen_docs


def test_generated_pages_equal_what_the_generator_writes():
    """The committed pages were written by another process (another hash seed): equal bytes here also show that the
    generator holds no timestamp and no set or hash order."""
    stale = _generator().stale_pages()
    assert not stale, f"run python scripts/gen_docs.py: {sorted(stale)} differ from what it writes"


def test_the_options_docstring_and_page_list_every_sam_field():
    from hf_lwsam import LWSAMConfig
    from hf_lwsam.config import sam_option_docs

    page = (DOCS / "reference" / "options.md").read_text(encoding="utf-8")
    for option in sam_option_docs():
        assert f"## `{option['name']}`" in page
        entry = re.search(rf"^        {option['name']} \(`{re.escape(option['type'])}`, \*optional\*.*?\):\n"
                          rf"((?:            .*\n)+)", LWSAMConfig.__doc__, re.M)
        assert entry, option["name"]
        assert " ".join(entry.group(1).split()).startswith(" ".join(option["help"].split()))


def test_api_reference_names_every_public_object():
    import hf_lwsam

    api = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    missing = [name for name in hf_lwsam.__all__ if f"::: hf_lwsam.{name}\n" not in api]
    assert not missing, f"docs/reference/api.md lacks ::: hf_lwsam.NAME for {missing}"


# ------------------------------------------------------------------------------ the strict build fails on errors
def _mkdocs(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(site / "mkdocs.yml"),
                           "-d", str(site / "site")], cwd=site, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def _small_site(root: Path) -> Path:
    """Two pages built with this repository's theme, Markdown extensions and `validation:` settings."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    small = {key: config[key] for key in ("theme", "validation", "markdown_extensions")}
    small.update(site_name="check", docs_dir="docs", nav=[{"Home": "index.md"}, {"Other": "other.md"}],
                 plugins=["search"])
    (root / "docs").mkdir(parents=True)
    (root / "mkdocs.yml").write_text(yaml.safe_dump(small), encoding="utf-8")
    (root / "docs" / "index.md").write_text("# Home\n\nSee [the section](other.md#a-section).\n", encoding="utf-8")
    (root / "docs" / "other.md").write_text("# Other\n\n## A section\n\nText.\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("breakage, expected", [
    (None, None),
    ("link", "missing.md"),
    ("anchor", "no-such-section"),
    ("page", "gone.md"),
])
def test_strict_build_fails_on_a_broken_link_anchor_or_page(breakage, expected, tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = _small_site(tmp_path)
    index, config = site / "docs" / "index.md", site / "mkdocs.yml"
    if breakage == "link":
        index.write_text("# Home\n\nSee [a page](missing.md).\n", encoding="utf-8")
    elif breakage == "anchor":
        index.write_text("# Home\n\nSee [the section](other.md#no-such-section).\n", encoding="utf-8")
    elif breakage == "page":
        config.write_text(config.read_text().replace("other.md", "gone.md"), encoding="utf-8")
        (site / "docs" / "other.md").unlink()
        index.write_text("# Home\n", encoding="utf-8")
    result = _mkdocs(site)
    if breakage is None:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-3000:]


@pytest.fixture(scope="module")
def real_site(tmp_path_factory) -> tuple[Path, str]:
    """A copy of the docs built once with the real mkdocs.yml (the API page imported by mkdocstrings, its docstrings
    read by docs/hooks/hf_docstrings.py), and the built API page's HTML."""
    pytest.importorskip("mkdocstrings")
    copy = tmp_path_factory.mktemp("site") / "repo"
    copy.mkdir()
    shutil.copy(REPO / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(DOCS, copy / "docs", symlinks=True)
    (copy / "benchmarks").symlink_to(REPO / "benchmarks")
    result = _mkdocs(copy)
    assert result.returncode == 0, result.stderr[-3000:]
    return copy, (copy / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")


@pytest.mark.slow  # the whole site, with the API pages imported by mkdocstrings
def test_the_real_site_builds_and_one_broken_link_fails_it(real_site):
    copy, _ = real_site
    page = copy / "docs" / "guides" / "trl.md"
    text = page.read_text(encoding="utf-8")
    page.write_text(text + "\n[broken](no-such-page.md)\n", encoding="utf-8")
    try:
        result = _mkdocs(copy)
    finally:
        page.write_text(text, encoding="utf-8")
    assert result.returncode != 0 and "no-such-page.md" in result.stderr


RAW_CROSS_REF = re.compile(r"\[(?:<code>|`)~?[A-Za-z_][\w.]*(?:</code>|`)\]")  # [`~transformers.Trainer`], rendered


def _parameter_rows(page: str) -> list[tuple[str, str]]:
    """(name, default cell) of every row of the page's Name | Type | Description | Default tables."""
    from html import unescape

    rows = []
    for row in re.findall(r'<tr class="doc-section-item">(.*?)</tr>', page, re.S):
        cells = [" ".join(unescape(re.sub(r"<[^>]+>", " ", cell)).split())
                 for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
        if len(cells) == 4:
            rows.append((cells[0], cells[3]))
    return rows


def _optional_parameters() -> set[str]:
    """The names our docstrings always document HF-style as `*optional*` (never without it)."""
    from hf_lwsam import LWSAMConfig

    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "hf_lwsam").rglob("*.py"))] + [LWSAMConfig.__doc__]
    entries = [m for t in texts for m in re.findall(r"^ +(\w+) \((.*)\):$", t, re.M)]
    return {n for n, kind in entries if "*optional*" in kind} - {n for n, kind in entries if "*optional*" not in kind}


@pytest.mark.slow  # uses the real site's build
def test_api_page_renders_hf_cross_references_as_links_and_optional_arguments_with_defaults(real_site):
    _, page = real_site
    article = page[page.index("<article"):page.index("</article>")]
    assert not RAW_CROSS_REF.findall(article), RAW_CROSS_REF.findall(article)[:5]
    links = set(re.findall(r'href="([^"]+)"', article))
    hf_docs = "https://huggingface.co/docs/transformers/main/en/main_classes/"
    assert {f"{hf_docs}trainer#transformers.Trainer", f"{hf_docs}callback#transformers.TrainerCallback"} <= links
    assert {"#hf_lwsam.LWSAMConfig", "#hf_lwsam.lwsam_config", "#hf_lwsam.lwsam_trainer"} <= links
    rows = _parameter_rows(article)
    # LWSAMConfig's default is the docstring's "defaults to" (the field itself is None until a preset resolves it);
    # LWSAMTrainer's and LWSAMMixin's args are *optional* without one: None, as in Trainer
    assert ("sam_rho", "0.05") in rows and ("sam_selection", '"pattern"') in rows and ("sam_preset", "None") in rows
    assert rows.count(("args", "None")) == 2
    assert ("config_cls", "required") in rows and ("trainer_cls", "required") in rows  # truly required: still so
    optional = _optional_parameters()
    assert {"sam_rho", "args"} <= optional
    shown_required = [name for name, default in rows if name in optional and default == "required"]
    assert not shown_required, f"*optional* arguments shown as required: {shown_required}"
    assert all(re.fullmatch(r"\*{0,2}\w+", name) for name, _ in rows), rows  # "*other arguments*" is a sentence
    assert "Other arguments: as for" in " ".join(re.sub(r"<[^>]+>", " ", article).split())
