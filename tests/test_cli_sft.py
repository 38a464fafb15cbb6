"""`hf-lwsam-sft`: a run trains, saves the final model with the LW-SAM card and `all_results.json` last, refuses to
overwrite a finished run, and reports bad input as one line with exit 2, writing nothing.

The fast tests run a tiny GPT-2 saved to a local folder with a local dataset (`--model_name_or_path` /
`--dataset_name`); the offline default (a LoRA SFT of SmolLM2-135M-Instruct) is the slow test at the end."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("trl")
from hf_lwsam.cli.sft import main  # noqa: E402

TINY = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def local(local_model, tmp_path_factory) -> list[str]:
    """Flags naming the tiny local GPT-2 (`local_model`, below) and Shakespeare paragraphs in a local folder (and bf16
    off: SFTConfig turns it on, this CPU has none)."""
    from datasets import Dataset

    from conftest import shakespeare_paragraphs

    data = tmp_path_factory.mktemp("local_data")
    paragraphs = shakespeare_paragraphs(48)
    Dataset.from_dict({"text": paragraphs[:32]}).to_json(data / "train.jsonl")
    Dataset.from_dict({"text": paragraphs[32:]}).to_json(data / "test.jsonl")
    return ["--model_name_or_path", str(local_model), "--dataset_name", str(data), "--bf16", "false"]


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
    stdout = capsys.readouterr().out  # the summary, laid out as hf-lwsam-train's
    assert "***** hf-lwsam-sft summary *****" in stdout
    assert f"  train loss         : {results['train_loss']:.4f}" in stdout
    assert "  perturbed layers   : " in stdout and f"  output             : {out.resolve()} (model card" in stdout
    # the speed rows of hf-lwsam-train (the same function renders them), with positive values
    seconds = re.search(r"^  train time         : (\d+\.\d) s \(\d+ examples, 2 steps\)$", stdout, re.M)
    tokens = re.search(r"^  tokens/s           : ([\d,]+)$", stdout, re.M)
    ratio = re.search(r"^  .+ vs plain: (\d+\.\d\d)x step time \(median over 1 of the run's 2 SAM steps, of 2 steps "
                      r"in all; each also timed as a plain step\)$", stdout, re.M)
    assert seconds and tokens and ratio, stdout
    assert float(seconds[1]) > 0 and int(tokens[1].replace(",", "")) > 0 and float(ratio[1]) > 0
    assert "tokens/s" in card
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
    assert not out.exists()


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


# ---------------------------------------------------------------------------------- a named model, all weights
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
FULL = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--bf16", "false",
        "--report_to", "none", "--disable_tqdm", "true", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A saved tiny GPT-2 with its own byte-level BPE (and a chat template), as a user's local model folder."""
    from transformers import AutoTokenizer

    from test_cli import make_tiny_gpt2_dir

    path = make_tiny_gpt2_dir(tmp_path_factory.mktemp("sft_local") / "tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(folder, rows):
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def _assert_full_parameter_run(out, model_dir):
    """Every weight was trained and saved as a full model (no adapter); the card names the local base model by its
    folder name, and its metadata lists no local path."""
    from safetensors.torch import load_file

    from test_model_card import assert_hub_accepts_the_metadata

    assert not (out / "adapter_config.json").exists()
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if before[name].equal(after[name])]
    assert not unchanged, f"full-parameter SFT left weights untouched: {unchanged}"
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((out / "all_results.json").read_text())["train_loss"] > 0
    card = (out / "README.md").read_text()
    data = assert_hub_accepts_the_metadata(card, model_dir.parent.parent, out.parent)
    assert "base_model" not in data and "datasets" not in data and f"the local model `{model_dir.name}`" in card


def test_full_parameter_sft_with_flags_on_a_local_model(local_model, tmp_path, capsys, caplog):
    """The README's Hub example without --use_peft, on a saved local model and a local text dataset; the rows with
    empty text are counted in a warning and dropped."""
    from conftest import shakespeare_paragraphs

    texts = shakespeare_paragraphs(20)
    data = _write_jsonl(tmp_path / "ds_text", [{"text": t} for t in texts] + [{"text": ""}, {"text": "  "}])
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        code = main(["--output_dir", str(out), "--model_name_or_path", str(local_model), "--dataset_name", str(data),
                     *FULL])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert "2 of 22 train rows have no text in 'text' (empty or missing) and are dropped" in caplog.text
    _assert_full_parameter_run(out, local_model)
    assert "(20 training examples" in (out / "README.md").read_text()  # the rows trained on, after the drop


def test_full_parameter_sft_with_config_on_conversational_data(local_model, tmp_path, capsys):
    """The same through `--config` (model, data and options in the YAML file), on `messages` data rendered with the
    tokenizer's chat template."""
    from conftest import shakespeare_paragraphs

    rows = [{"messages": [{"role": "user", "content": t[:40]}, {"role": "assistant", "content": t[40:160]}]}
            for t in shakespeare_paragraphs(16)]
    data = _write_jsonl(tmp_path / "ds_messages", rows)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {local_model}\ndataset_name: {data}\nmax_steps: 2\n"
                      "per_device_train_batch_size: 4\nmax_length: 32\nbf16: false\nreport_to: none\n"
                      "learning_rate: 1e-2\ndisable_tqdm: true\n")
    out = tmp_path / "run"
    assert main(["--config", str(config), "--output_dir", str(out)]) == 0, capsys.readouterr().err[-3000:]
    _assert_full_parameter_run(out, local_model)


def test_checkpoints_and_the_final_model_carry_the_lwsam_card(local, tmp_path):
    """One model-card mechanism for both commands: the LW-SAM card is written with every save, checkpoints included
    (TRL's own card hook writes it too)."""
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *local, *TINY, "--save_strategy", "steps", "--save_steps", "1"]) == 0
    for folder in (out / "checkpoint-1", out / "checkpoint-2", out):
        card = (folder / "README.md").read_text()
        assert "hf-lwsam" in card and "sam_rho" in card.replace("`", ""), folder


def test_no_model_and_no_data_selects_the_offline_defaults_of_the_shared_table(tmp_path):
    """Both commands' offline defaults live in one table (`OFFLINE_DEFAULTS`, keyed by command); flags override."""
    from hf_lwsam.cli.args import OFFLINE_DEFAULTS
    from hf_lwsam.cli.sft import parse_args

    _, args, model_args, _, embedded = parse_args(["--output_dir", str(tmp_path / "o"), "--lora_r", "4"])
    table = OFFLINE_DEFAULTS["hf-lwsam-sft"]
    assert embedded and args.max_steps == table["max_steps"] and args.learning_rate == table["learning_rate"]
    assert model_args.use_peft and model_args.lora_alpha == table["lora_alpha"] and model_args.lora_r == 4
    _, args, _, _, embedded = parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--bf16", "false"])
    assert not embedded and args.max_steps == -1


@pytest.mark.parametrize("form", ["--config PATH", "leading", "--config=PATH"])
def test_a_config_file_after_config_or_leading(local_model, tmp_path, form):
    """The config file through TRL's `--config`, or as the leading argument as `hf-lwsam-train` takes it."""
    from hf_lwsam.cli.sft import parse_args

    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {local_model}\ndataset_name: {tmp_path}\nbf16: false\nsam_rho: 0.1\n")
    argv = {"--config PATH": ["--config", str(config), "--learning_rate", "2e-3"],
            "leading": [str(config), "--learning_rate", "2e-3"],
            "--config=PATH": ["--learning_rate", "2e-3", f"--config={config}"]}[form]
    script_args, args, model_args, _, embedded = parse_args(argv + ["--output_dir", str(tmp_path / "o")])
    assert not embedded and model_args.model_name_or_path == str(local_model)
    assert script_args.dataset_name == str(tmp_path) and args.sam_rho == 0.1 and args.learning_rate == 2e-3


def test_a_max_length_inside_every_prompt_is_one_line_naming_the_shortest_example(local_model, tmp_path, capsys):
    """TRL drops every prompt-completion example whose prompt fills --max_length; instead of the sampler's traceback
    on the empty split, one line names the shortest example's length, and that length trains."""
    import re

    from conftest import shakespeare_paragraphs

    rows = [{"prompt": [{"role": "user", "content": t[:30]}],
             "completion": [{"role": "assistant", "content": t[30:60]}]}
            for t in shakespeare_paragraphs(16, min_chars=60)]
    data = _write_jsonl(tmp_path / "ds_prompt_completion", rows)
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--model_name_or_path", str(local_model), "--dataset_name", str(data), *FULL]
    assert main([*argv, "--max_length", "8"]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-sft:")]  # after the weights' progress bar
    match = re.fullmatch(r"hf-lwsam-sft: error: --max_length 8 leaves no train example with a token to learn from "
                         r"\(.*; the shortest example is (\d+) tokens\): pass --max_length \1 or more\.", err[-1])
    assert len(err) == 1 and match and "Traceback" not in stderr, err
    assert not any(out.iterdir()), "nothing is written (the Trainer only creates the folder)"
    assert main([*argv, "--max_length", match.group(1)]) == 0, capsys.readouterr().err[-3000:]


@pytest.mark.slow  # SmolLM2-135M loaded and the 192 chats tokenized
def test_offline_default_with_a_max_length_inside_the_prompts_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), "--max_length", "32"]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-sft:")]
    assert len(err) == 1 and "Traceback" not in stderr, err
    assert err[0].startswith("hf-lwsam-sft: error: --max_length 32 leaves no train example"), err
    assert "the shortest example is" in err[0] and not any(out.iterdir())


@pytest.mark.parametrize("command", ["hf_lwsam.cli.train", "hf_lwsam.cli.sft"])
def test_help_renders_every_help_string(command, capsys):
    """`--help` formats every option's help (a bare '%' in one would print the parser's internals instead)."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(command).main(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "(s - start) % sam_interval == 0" in " ".join(text.split())
    assert "option_strings" not in text and "--sam_interval" in text and "--learning_rate" in text
    # a description and examples first, then the sam_* options as their own group before the stock flags
    head, options = text.split("LW-SAM options (--sam_*):", 1)
    assert "layer-wise sharpness-aware minimization" in head and "examples:" in head and len(head.splitlines()) < 25
    assert options.index("--sam_start") < options.index("--learning_rate") < options.index("--seed")


@pytest.mark.parametrize("command", ["hf_lwsam.cli.train", "hf_lwsam.cli.sft"])
def test_help_states_each_presets_radius_and_recommends_hf_auth_login(command, capsys):
    """`--sam_rho`'s default under each preset, `hf auth login` instead of `--hub_token`, one LoRA flag name
    (`--use_peft`, as TRL's) and one `--overwrite_output_dir` help in both commands."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(command).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    rho = text.split("--sam_rho SAM_RHO", 1)[1].split("--sam_selection", 1)[0]
    assert "0.05" in rho and ("0.2 with --sam_preset free" in rho or "0.2 under sam_preset='free'" in rho), rho
    assert "(default: None)" not in rho
    assert "Prefer hf auth login (or HF_TOKEN in the environment)" in text and "/proc/PID/cmdline" in text
    assert "--use_peft" in text and "--use_lora " not in text
    assert "files it did not write are never touched" in text


def test_a_local_jsonl_file_as_dataset_name_trains_as_the_help_shows(local_model, tmp_path, capsys, monkeypatch):
    """The help's `--dataset_name ./my-chats.jsonl`: one local data file is the train split; the summary counts the
    examples trained on (after the empty rows are dropped)."""
    from conftest import shakespeare_paragraphs

    rows = [{"text": t} for t in shakespeare_paragraphs(20)] + [{"text": " "}, {"text": ""}]
    (tmp_path / "my-chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert "--dataset_name ./my-chats.jsonl" in importlib_help("hf_lwsam.cli.sft", capsys)
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    code = main(["--model_name_or_path", str(local_model), "--dataset_name", "./my-chats.jsonl", "--bf16", "false",
                 "--output_dir", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert re.search(r"^  train time         : \d+\.\d s \(20 examples, 2 steps\)$", captured.out, re.M)
    assert "a local data file (`my-chats.jsonl`)" in (out / "README.md").read_text()


def importlib_help(command: str, capsys) -> str:
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(command).main(["--help"])
    return capsys.readouterr().out


def test_a_trainer_check_naming_an_option_is_one_line_and_other_value_errors_are_not_hidden(local, tmp_path, capsys):
    """A ValueError of SFTTrainer's own checks that names the option at fault is one line, exit 2, nothing written;
    a ValueError naming no option is a bug, not the user's input: it is not turned into one line."""
    from hf_lwsam.cli.args import option_error

    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *local, *TINY, "--eos_token", "<nope>"]) == 2
    stderr = capsys.readouterr().err  # after the weights' load report: SFTTrainer checks this once it has them
    err = [line for line in stderr.splitlines() if line.startswith("hf-lwsam-sft:")]
    assert "Traceback" not in stderr and len(err) == 1, err
    assert err[0].startswith("hf-lwsam-sft: error: The specified `eos_token` ('<nope>') is not found in the vocabulary")
    assert not out.exists()
    options = {"eos_token", "padding_free", "max_length", "seed"}
    for message in ("not enough values to unpack (expected 2, got 1)", "invalid literal for int() with base 10: 'x'",
                    "Expected a 1D tensor, got 2D"):
        assert option_error(ValueError(message), options) is None
    named = option_error(ValueError("When `padding_free=True` without packing, `max_length` is not enforced."), options)
    assert str(named) == "When `padding_free=True` without packing, `max_length` is not enforced."


def test_a_refused_option_after_a_finished_run_is_one_line_and_touches_nothing(local, tmp_path, capsys):
    """The full config is built, and refused, before --overwrite_output_dir touches the finished run."""
    out = tmp_path / "run"
    assert main(["--output_dir", str(out), *local, *TINY]) == 0
    before = {p: (p.read_bytes() if p.is_file() else None, p.stat().st_ino, p.stat().st_mtime_ns)
              for p in sorted(out.rglob("*"))}
    capsys.readouterr()
    for refused, named in ((["--sam_rho", "-1"], "sam_rho=-1"), (["--sam_preset", "free", "--sam_momentum",
                                                                   "optimizer", "--optim", "adafactor"],
                                                                  "adafactor")):
        assert main(["--output_dir", str(out), *local, *TINY, "--overwrite_output_dir", *refused]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hf-lwsam-sft: error:") and named in err[0], err
        assert {p: (p.read_bytes() if p.is_file() else None, p.stat().st_ino, p.stat().st_mtime_ns)
                for p in sorted(out.rglob("*"))} == before


@pytest.mark.parametrize("form", [["--use_peft"], ["--use_lora"], ["--use_lora=true"]])
def test_one_lora_flag_in_both_commands_with_the_former_name_accepted(form, tmp_path):
    """`--use_peft` (TRL's name) switches LoRA on in both commands; `--use_lora`, hf-lwsam-train's former name, is
    read as it."""
    from hf_lwsam.cli.args import parse_args as train_args
    from hf_lwsam.cli.sft import parse_args

    model_args, _, _, _ = train_args(["--model_name_or_path", "m", "--train_file", "t.csv", *form, "--lora_r", "4"])
    assert model_args.use_peft is True and model_args.lora_r == 4
    _, _, model_args, _, _ = parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--bf16", "false",
                                         "--output_dir", str(tmp_path), *form, "--lora_r", "4"])
    assert model_args.use_peft is True and model_args.lora_r == 4


def test_the_same_command_resumes_and_a_changed_option_is_refused(local, tmp_path, capsys):
    """As for hf-lwsam-train: each checkpoint records the options it was trained with, the same command resumes,
    a changed one is refused in one line naming it."""
    out = tmp_path / "run"
    flags = ["--output_dir", str(out), *local, *TINY, "--save_strategy", "steps", "--save_steps", "1"]
    assert main(flags) == 0
    assert json.loads((out / "checkpoint-2" / "_hf-lwsam-run.json").read_text())["sam_rho"] == 0.05
    (out / "all_results.json").unlink()  # as if stopped in the final save
    capsys.readouterr()
    assert main([*flags, "--sam_rho", "0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained with other options (sam_rho: 0.05 -> 0.2)" in err[0], err
    assert main(flags) == 0 and (out / "all_results.json").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
