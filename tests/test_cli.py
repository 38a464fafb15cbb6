"""`hf-lwsam-train`: real short runs (tiny models built from configs, the shipped tweets and Shakespeare), the config
file (bad input: tests/test_cli_bad_input.py; resume and preemption: tests/test_cli_resume.py)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from hf_lwsam import select_layers
from hf_lwsam.cli.args import OFFLINE_DEFAULTS, parse_args
from hf_lwsam.cli.train import main
from hf_lwsam.data import TWEET_LABELS, load_tweets, minilm_path, shakespeare_files

REPO = Path(__file__).resolve().parent.parent
FAST = ["--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "32", "--num_train_epochs", "1",
        "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "2",
        "--use_cpu", "true", "--measure_plain_steps", "2"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spinning makes them
    10x slower; restored afterwards so other test modules keep their setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ real assets
def make_tiny_bert_dir(path: Path) -> Path:
    """A tiny randomly initialised BERT classifier with the shipped MiniLM tokenizer, saved as a model directory."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_gpt2_dir(path: Path) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer trained in-process on Hamlet, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = Path(shakespeare_files()["hamlet"][0]).read_text(encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        model_max_length=64)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tweet_csvs(path: Path, n_train: int = 64, n_validation: int = 32) -> tuple[Path, Path]:
    """Real tweets as csv files with string labels (`sentiment`), as a user would have them."""
    tweets = load_tweets()
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for split, n in (("train", n_train), ("validation", n_validation)):
        rows = tweets[split].select(range(n))
        # A bare carriage return inside a tweet is left unquoted by to_csv and read back as a line break.
        texts = [t.replace("\r", " ") for t in rows["text"]]
        Dataset.from_dict({"text": texts, "sentiment": [TWEET_LABELS[i] for i in rows["label"]]}).to_csv(
            path / f"{split}.csv", index=False)
        files.append(path / f"{split}.csv")
    return files[0], files[1]


def write_play_texts(path: Path) -> tuple[Path, Path]:
    """The first 8 kB of Hamlet for training and the next 3 kB for validation, as .txt files."""
    text = Path(shakespeare_files()["hamlet"][0]).read_text(encoding="utf-8")
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.txt").write_text(text[:8_000], encoding="utf-8")
    (path / "validation.txt").write_text(text[8_000:11_000], encoding="utf-8")
    return path / "train.txt", path / "validation.txt"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    train_csv, validation_csv = write_tweet_csvs(root / "tweets")
    train_txt, validation_txt = write_play_texts(root / "plays")
    return {"bert": make_tiny_bert_dir(root / "tiny-bert"), "gpt2": make_tiny_gpt2_dir(root / "tiny-gpt2"),
            "train_csv": train_csv, "validation_csv": validation_csv, "train_txt": train_txt,
            "validation_txt": validation_txt, "root": root}


# ------------------------------------------------------------------------------------------------- real runs
def test_classification_from_csv_files_saves_a_reloadable_model(assets, tmp_path):
    out = tmp_path / "clf"
    code, stdout, stderr = run_cli(["--model_name_or_path", assets["bert"], "--train_file", assets["train_csv"],
                                    "--validation_file", assets["validation_csv"], "--label_column", "sentiment",
                                    "--max_length", "32", "--learning_rate", "1e-3", "--output_dir", out, *FAST])
    assert code == 0, stderr
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "all_results.json"} <= {
        p.name for p in out.iterdir()}
    assert not (out / ".hf-lwsam-final.tmp").exists(), "the final artefacts must be renamed into place"
    results = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and 0.0 <= results["eval_f1"] <= results["eval_accuracy"] + 1
    # String labels become sorted class ids, stored in the config so the pipeline prints names.
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert f"eval accuracy      : {results['eval_accuracy']:.4f}" in stdout
    assert f"eval macro-F1      : {results['eval_f1']:.4f}" in stdout
    assert "tokens/s" in stdout and f"perturbed layers   : {len(select_layers(model))} " in stdout
    assert "layer-wise SAM on the output side vs plain: " in stdout
    assert "x step time (median over 2 of the run's 4 SAM steps, of 4" in stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(64 / 16)
    assert all("sam/loss_perturbed" in log for log in state["log_history"] if "loss" in log)


def test_the_speed_line_times_the_sam_steps_of_the_mode_that_ran(assets, tmp_path):
    """`--sam_preset fast`: full SAM on the last 20% of the steps only; the timed pairs are SAM steps (the earlier,
    plain steps would time plain against plain), and the line names full SAM."""
    out = tmp_path / "fast"
    code, stdout, stderr = run_cli(["--model_name_or_path", assets["bert"], "--train_file", assets["train_csv"],
                                    "--validation_file", assets["validation_csv"], "--label_column", "sentiment",
                                    "--max_length", "16", "--output_dir", out, *FAST, "--max_steps", "15",
                                    "--sam_preset", "fast"])
    assert code == 0, stderr
    line = next(line for line in stdout.splitlines() if "vs plain" in line)
    assert line.startswith("  full SAM, last 20% of the run vs plain: ")
    assert "median over 2 of the run's 3 SAM steps, of 15 steps" in line
    card = (out / "README.md").read_text()
    assert "- SAM step time (full SAM, last 20% of the run) relative to plain training steps of the same run: " in card
    assert "(median over 2 of the run's 3 SAM steps, each also timed as a plain step)" in card


def test_causal_lm_is_inferred_packs_blocks_and_reports_perplexity(assets, tmp_path):
    out = tmp_path / "clm"
    code, stdout, stderr = run_cli(["--model_name_or_path", assets["gpt2"], "--train_file", assets["train_txt"],
                                    "--validation_file", assets["validation_txt"], "--max_length", "32",
                                    "--learning_rate", "3e-3", "--output_dir", out, *FAST])
    assert code == 0, stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    assert 0.0 < results["eval_accuracy"] < 1.0  # next-token accuracy
    # Packing: every block is --max_length tokens, so one epoch is ceil(blocks / batch) steps.
    tokenizer = AutoTokenizer.from_pretrained(assets["gpt2"])
    from datasets import DatasetDict, load_dataset

    from hf_lwsam.cli.data import pack_for_causal_lm

    raw = load_dataset("text", data_files={"train": str(assets["train_txt"])}, sample_by="paragraph")
    packed = pack_for_causal_lm(DatasetDict(raw), tokenizer, "text", 32, None)["train"]
    assert {len(ids) for ids in packed["input_ids"]} == {32} and packed["labels"] == packed["input_ids"]
    n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in raw["train"]["text"]
                   if t.strip())
    assert len(packed) == n_tokens // 32
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == math.ceil(len(packed) / 16)
    assert "eval perplexity" in stdout
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2


def test_lora_classification_saves_an_adapter(assets, tmp_path):
    out = tmp_path / "lora"
    code, stdout, stderr = run_cli(["--model_name_or_path", assets["bert"], "--train_file", assets["train_csv"],
                                    "--validation_file", assets["validation_csv"], "--label_column", "sentiment",
                                    "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules",
                                    "query", "value", "--max_train_samples", "32", "--max_length", "32",
                                    "--output_dir", out, *FAST])
    assert code == 0, stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"query", "value"}
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()
    assert "lora_" in stdout  # the perturbed layers of the last block are its adapters
    assert "(32 examples, " in stdout  # what was trained: --max_train_samples of the 64 rows


def test_embedded_default_runs_offline(tmp_path):
    out = tmp_path / "default"
    code, stdout, stderr = run_cli(["--max_train_samples", "32", "--max_eval_samples", "32", "--max_length", "16",
                                    "--output_dir", out, "--disable_tqdm", "true", "--measure_plain_steps", "0"])
    assert code == 0, stderr
    card = (out / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "negative, neutral, positive" in card
    assert "bert.encoder.layer.5.attention.self.query" in stdout and "shipped in hf_lwsam/metrics" in stdout


@pytest.mark.slow
def test_embedded_default_full_run_learns(tmp_path):
    """The README's main command as is (2,000 tweets, one epoch): it must learn the 3-class task."""
    out = tmp_path / "default"
    code, stdout, stderr = run_cli(["--output_dir", out])
    assert code == 0, stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_accuracy"] > 0.6 and results["eval_f1"] > 0.5, results
    assert "layer-wise SAM on the output side vs plain" in stdout and "x step time" in stdout


# ----------------------------------------------------------------------------------------- config file, flags
def test_yaml_config_with_flags_overriding(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "some/dir", "train_file": "t.csv", "learning_rate": 1e-3,
                                      "sam_rho": 0.1, "sam_target_layers": ["classifier"], "use_peft": True}))
    model_args, data_args, args, embedded = parse_args([str(config), "--learning_rate", "2e-3", "--task", "clm"])
    assert not embedded and model_args.model_name_or_path == "some/dir" and data_args.train_file == "t.csv"
    assert args.learning_rate == 2e-3 and args.sam_rho == 0.1 and model_args.use_peft
    assert args.sam_target_layers == "classifier"  # one name: a regex, as on the command line
    assert model_args.task == "causal_lm" and args.per_device_train_batch_size == 8  # stock default, not embedded
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "num_train_epochs": 2}))
    _, _, args, embedded = parse_args([str(json_config)])
    assert embedded and args.num_train_epochs == 2 and args.per_device_train_batch_size == 32
    assert args.output_dir == str(tmp_path / "o")


@pytest.mark.parametrize("form", ["leading", "--config PATH", "--config=PATH"])
def test_a_config_file_leading_or_after_config(tmp_path, form):
    """The config file as the leading argument or through TRL's `--config`, before or after the flags."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": "some/dir", "train_file": "t.csv", "sam_rho": 0.1}))
    argv = {"leading": [str(config), "--learning_rate", "2e-3"],
            "--config PATH": ["--learning_rate", "2e-3", "--config", str(config)],
            "--config=PATH": [f"--config={config}", "--learning_rate", "2e-3"]}[form]
    model_args, data_args, args, embedded = parse_args(argv)
    assert not embedded and model_args.model_name_or_path == "some/dir" and data_args.train_file == "t.csv"
    assert args.sam_rho == 0.1 and args.learning_rate == 2e-3


def test_the_cli_modules_import_no_private_names_from_each_other():
    """What both commands share lives in public functions (`cli/core.py`, `cli/args.py`), not in one command's
    private helpers."""
    import ast

    import hf_lwsam.cli

    private = []
    for path in Path(hf_lwsam.cli.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                private += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert private == []


# Values the CLIs' own checks refuse, one per check, that `TrainingArguments` accepts: each check guards something the
# stock class lets through (to a traceback mid-run or a silently odd run), so none duplicates it.
STOCK_ACCEPTS = {
    "learning_rate": -1.0, "per_device_train_batch_size": 0, "per_device_eval_batch_size": 0,
    "gradient_accumulation_steps": 0, "max_steps": 0, "num_train_epochs": float("nan"), "seed": -1, "data_seed": 2**33,
    "weight_decay": -1.0, "max_grad_norm": -1.0, "warmup_steps": float("nan"), "adam_beta1": 1.5, "adam_beta2": -0.1,
    "label_smoothing_factor": 1.2, "adam_epsilon": 0.0, "logging_steps": -1, "save_steps": -1, "save_total_limit": 0,
    "dataloader_num_workers": -1, "report_to": "bogus",
}


@pytest.mark.parametrize("option", list(STOCK_ACCEPTS))
def test_each_training_option_check_guards_a_value_training_arguments_accepts(option, tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hf_lwsam.cli.args import UsageError, validate_training_args

    value = STOCK_ACCEPTS[option]
    TrainingArguments(output_dir=str(tmp_path), **{option: value})  # the stock class lets it through
    defaults = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    namespace = SimpleNamespace(**{**vars(defaults), option: value})
    with pytest.raises(UsageError, match=f"--{option}"):
        validate_training_args(namespace)


# Values `TrainingArguments` refuses itself (option: the value, the start of the CLI's error line): the CLIs' checks
# leave them to it, and its `ValueError` is reported as one line that starts with the flag and its value.
STOCK_REFUSES = {
    "warmup_steps": (-1.0, "--warmup_steps -1.0 is invalid (Got warmup_steps = -1.0"),
    "logging_steps": (0.0, "--logging_steps 0.0 is invalid (logging strategy"),
    "torch_empty_cache_steps": (0, "--torch_empty_cache_steps 0 is invalid ("),
    "lr_scheduler_type": ("reduce_lr_on_plateau", "--lr_scheduler_type reduce_lr_on_plateau is invalid ("),
}


@pytest.mark.parametrize("option", list(STOCK_REFUSES))
def test_a_value_training_arguments_refuses_is_its_one_line_error_naming_the_flag(option, tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hf_lwsam.cli.args import UsageError, validate_training_args

    value, start = STOCK_REFUSES[option]
    with pytest.raises(ValueError) as stock:
        TrainingArguments(output_dir=str(tmp_path), report_to="none", **{option: value})
    defaults = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    validate_training_args(SimpleNamespace(**{**vars(defaults), option: value}))  # left to TrainingArguments
    with pytest.raises(UsageError) as error:
        parse_args(["--train_file", "t.csv", "--model_name_or_path", "m", "--output_dir", str(tmp_path),
                    f"--{option}", str(value)])
    message = str(error.value)
    assert "\n" not in message and message.startswith(start)
    assert " ".join(str(stock.value).split()).rstrip(".") in message  # transformers' own words
    assert message.endswith(": pass a value that meets this.")


def test_no_flags_selects_the_embedded_default():
    _, data_args, args, embedded = parse_args([])
    assert embedded and data_args.max_length == OFFLINE_DEFAULTS["hf-lwsam-train"]["max_length"] == 64
    assert args.per_device_train_batch_size == 32 and args.num_train_epochs == 1
    model_args, data_args, args, embedded = parse_args(["--train-file", "t.csv", "--model-name-or-path", "m"])
    assert not embedded and data_args.max_length is None and args.per_device_train_batch_size == 8


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10 s on 2 cores
def test_script_wrapper_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--task", "nope", "--output_dir",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hf-lwsam-train: error: --task 'nope' is unknown: pass --task classification or --task causal_lm (or leave "
        "it out to infer it)."]
    assert not (tmp_path / "o").exists()


def test_a_dependencys_deprecation_warning_is_not_printed_above_the_one_line_error():
    """TRL and PEFT read transformers' deprecated `is_gradient_checkpointing`: that FutureWarning is filtered in the
    commands' entry point; other warnings are still shown."""
    script = """
import sys, warnings
from transformers import GPT2Config, GPT2LMHeadModel
from hf_lwsam.cli.args import UsageError
from hf_lwsam.cli.lifecycle import console_main

model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0,
                                   eos_token_id=0))

def run(argv):
    model.is_gradient_checkpointing  # as TRL and PEFT read it
    warnings.warn("another notice", FutureWarning)
    raise UsageError("bad input: pass a good one.")

sys.exit(console_main("hf-lwsam-train", run, []))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == "hf-lwsam-train: error: bad input: pass a good one."
    assert "is_gradient_checkpointing" not in proc.stderr and "FutureWarning: another notice" in proc.stderr
