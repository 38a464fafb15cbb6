"""Every input a user can get wrong, through `hf-lwsam-train`: exit code 2, exactly one line on stderr that says what
to pass instead, nothing written or deleted (the output directory is not created, the input files are untouched).

The table runs `main(argv)` in-process (fast); two cases run as real processes to prove that the real stderr holds
that one line and nothing else (no traceback, progress bar or load report).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from test_cli import make_tiny_bert_dir, make_tiny_gpt2_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
FIXES = (" pass ", " drop ", " add ", " use ", " fix ", " save ", " fill ", " re-save ", "pip install", " must be ",
         " set ", " unset ")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input_assets")
    train_csv, validation_csv = write_tweet_csvs(root / "data", n_train=48, n_validation=16)
    data = root / "data"
    files = {
        "zero.csv": b"",
        "header_only.csv": b"text,sentiment\n",
        "blank_lines.csv": b"\n\r\n \n\n",
        "latin1.csv": "text,sentiment\ncaf\u00e9 au lait,positive\nbad day,negative\n".encode("latin-1"),
        "ragged.csv": b"text,sentiment\ngood,positive\nbad,negative,extra,fields\nok,neutral\n",
        "tabs.csv": b"text\tsentiment\ngood day\tpositive\nbad day\tnegative\n",
        "broken.jsonl": b'{"text": "good", "sentiment": "positive"}\n{"text": "bad", "sentiment": \n',
        "nan_labels.csv": b"text,sentiment\ngood day,positive\nbad day,\nok day,neutral\nawful,negative\n",
        "numeric_text.csv": b"text,sentiment\n1,positive\n2,negative\n3,neutral\n4,positive\n",
        "unseen.csv": b"text,sentiment\ngood day,positive\nbad day,ecstatic\n",
        "one_class.csv": b"text,sentiment\ngood day,pos\nnice,pos\nfine,pos\n",
        "blank_texts.csv": b'text,sentiment\n" ",positive\n" ",negative\n',
        "train.xlsx": b"not really a spreadsheet",
        "train.jsonl": b'{"text": "good", "sentiment": "positive"}\n',
        "int_labels.csv": b"text,sentiment\ngood day,0\nbad day,1\nok day,2\nfine,0\n",
        "int_labels_gaps.csv": b"text,sentiment\ngood day,0\nbad day,\nok day,2\nmeh,\nfine,1\n",
        "glue_test.csv": b"text,sentiment\ngood day,-1\nbad day,-1\nok day,-1\n",
        "short.txt": b"Too short.\n",
        "plays.txt": b"To be, or not to be, that is the question.\n",
    }
    for name, content in files.items():
        (data / name).write_bytes(content)
    (data / "a_directory.csv").mkdir()
    (root / "a_file").write_text("not a directory")
    (root / "not_a_model").mkdir()
    (root / "not_a_checkpoint").mkdir()
    configs = {
        "unknown_key.yaml": "learning_rate: 1e-3\nlearnin_rate: 2e-3\n",
        "list_value.yaml": "learning_rate: [1, 2]\n",
        "bad_int.yaml": "per_device_train_batch_size: eight\n",
        "bad_choice.yaml": "sam_selection: everything\n",
        "invalid.yaml": "learning_rate: [1, 2\n",
        "not_mapping.yaml": "- learning_rate\n- 1e-3\n",
        "bad.json": '{"learning_rate": }',
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    return {"root": root, "data": data, "train_csv": train_csv, "validation_csv": validation_csv,
            "bert": make_tiny_bert_dir(root / "tiny-bert"), "gpt2": make_tiny_gpt2_dir(root / "tiny-gpt2")}


def _cases(a: dict[str, Path]) -> dict[str, tuple[list, str]]:
    """name -> (argv after the base flags, a substring of the error line)."""
    d, root = a["data"], a["root"]

    def train(name: str) -> list:
        return ["--train_file", d / name, "--validation_file", a["validation_csv"]]

    def both(name: str) -> list:
        return ["--train_file", d / name, "--validation_file", d / name]

    def config(name: str) -> list:
        return ["__config__", root / name]

    return {
        # training options
        "learning_rate -1": (["--learning_rate", "-1"], "--learning_rate -1.0 is invalid"),
        "learning_rate nan": (["--learning_rate", "nan"], "--learning_rate nan"),
        "learning_rate inf": (["--learning_rate", "inf"], "--learning_rate inf"),
        "learning_rate not a number": (["--learning_rate", "fast"], "--learning_rate"),
        "train batch 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
        "eval batch -1": (["--per_device_eval_batch_size", "-1"], "--per_device_eval_batch_size -1"),
        "batch not an int": (["--per_device_train_batch_size", "abc"], "--per_device_train_batch_size"),
        "accumulation 0": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0"),
        "epochs nan": (["--max_steps", "-1", "--num_train_epochs", "nan"], "--num_train_epochs nan"),
        "epochs 0": (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs 0"),
        "epochs -1": (["--max_steps", "-1", "--num_train_epochs", "-1"], "--num_train_epochs -1"),
        "max_steps 0": (["--max_steps", "0"], "--max_steps 0"),
        "max_steps -5": (["--max_steps", "-5"], "--max_steps -5"),
        "seed -1": (["--seed", "-1"], "--seed -1"),
        "seed 2**32": (["--seed", str(2**32)], "--seed 4294967296"),
        "data_seed -3": (["--data_seed", "-3"], "--data_seed -3"),
        "weight_decay -1": (["--weight_decay", "-1"], "--weight_decay -1"),
        "max_grad_norm -1": (["--max_grad_norm", "-1"], "--max_grad_norm -1"),
        "warmup_steps -1": (["--warmup_steps", "-1"], "--warmup_steps -1"),
        "adam_beta1 1.5": (["--adam_beta1", "1.5"], "--adam_beta1 1.5"),
        "adam_beta2 -0.1": (["--adam_beta2", "-0.1"], "--adam_beta2 -0.1"),
        "adam_epsilon 0": (["--adam_epsilon", "0"], "--adam_epsilon 0"),
        "label_smoothing 1": (["--label_smoothing_factor", "1"], "--label_smoothing_factor 1"),
        "logging_steps 0": (["--logging_steps", "0"], "--logging_steps 0"),
        "save_steps 0": (["--save_strategy", "steps", "--save_steps", "0"], "--save_steps 0"),
        "eval_steps -1": (["--eval_strategy", "steps", "--eval_steps", "-1"], "--eval_steps -1"),
        "save_total_limit 0": (["--save_total_limit", "0"], "--save_total_limit 0"),
        "dataloader workers -1": (["--dataloader_num_workers", "-1"], "--dataloader_num_workers -1"),
        "measure_plain_steps -1": (["--measure_plain_steps", "-1"], "--measure_plain_steps -1"),
        "abbreviated flag": (["--sam_rh", "0.1"], "--sam_rh"),  # not taken for --sam_rho
        "unknown save_strategy": (["--save_strategy", "sometimes"], "sometimes"),
        "report_to wandb, not installed": (["--report_to", "wandb"], "wandb is not installed"),
        "report_to unknown": (["--report_to", "myboard"], "myboard"),
        "fsdp without a distributed launch": (["--fsdp", "full_shard"], "needs a distributed launch"),
        "optim lomo": (["--optim", "lomo"], "lomo"),
        "unknown flag": (["--sam_rhoo", "0.1"], "--sam_rhoo"),
        # LW-SAM options
        "sam_rho -0.5": (["--sam_rho", "-0.5"], "sam_rho=-0.5"),
        "sam_rho nan": (["--sam_rho", "nan"], "sam_rho=nan"),
        "sam_selection unknown": (["--sam_selection", "everything"], "everything"),
        "sam_top_k 0": (["--sam_selection", "probe", "--sam_top_k", "0"], "sam_top_k=0"),
        "sam_top_ratio 2": (["--sam_selection", "probe", "--sam_top_ratio", "2"], "sam_top_ratio=2"),
        "sam_probe_interval -1": (["--sam_selection", "probe", "--sam_probe_interval", "-1"], "sam_probe_interval=-1"),
        "sam_probe_batches 0": (["--sam_selection", "probe", "--sam_probe_batches", "0"], "sam_probe_batches=0"),
        "sam_probe_metric unknown": (["--sam_probe_metric", "hessian"], "hessian"),
        "sam_probe_granularity unknown": (["--sam_probe_granularity", "module"], "module"),
        "sam_target_layers invalid regex": (["--sam_target_layers", "["], "not a valid regular expression"),
        "sam_target_layers match nothing": (["--sam_target_layers", "blocks.9"], "matches no module"),
        "sam_target_layers names match nothing": (["--sam_target_layers", "h.11", "lm_head"], "matches no module"),
        "sam_exclude_layers match nothing": (["--sam_exclude_layers", "nothing.*"], "sam_exclude_layers"),
        # model and LoRA options
        "unknown task": (["--task", "translation"], "--task 'translation'"),
        "causal_lm on an encoder": (["--task", "causal_lm", "--label_column", None], "needs a causal language model"),
        "model path missing": (["--model_name_or_path", root / "no-model"], "does not exist"),
        "model path is a file": (["--model_name_or_path", root / "a_file"], "is a file"),
        "model dir without config": (["--model_name_or_path", root / "not_a_model"], "not a model directory"),
        "hub model offline": (["--model_name_or_path", "hf-lwsam-test/not-cached"], "offline"),
        "lora_r 0": (["--use_peft", "--lora_r", "0"], "--lora_r 0"),
        "lora_alpha 0": (["--use_peft", "--lora_alpha", "0"], "--lora_alpha 0"),
        "lora_dropout 1": (["--use_peft", "--lora_dropout", "1"], "--lora_dropout 1"),
        "lora_target_modules without use_peft": (["--lora_target_modules", "query"], "without --use_peft"),
        "lora_r without use_peft": (["--lora_r", "4"], "without --use_peft"),
        "use_lora (the former name) is use_peft": (["--use_lora", "--lora_r", "-2"], "--lora_r -2"),
        # data options
        "max_length 1": (["--max_length", "1"], "--max_length 1"),
        "max_length above the positions": (["--max_length", "1000000"], "positions"),
        "max_train_samples 0": (["--max_train_samples", "0"], "--max_train_samples 0"),
        "max_eval_samples -1": (["--max_eval_samples", "-1"], "--max_eval_samples -1"),
        "validation_split_percentage 0": (["--validation_split_percentage", "0"], "--validation_split_percentage 0"),
        "validation_split_percentage 100": (["--validation_split_percentage", "100"], "100"),
        "preprocessing workers 0": (["--preprocessing_num_workers", "0"], "--preprocessing_num_workers 0"),
        "dataset_config_name alone": (["--dataset_config_name", "cola"], "--dataset_config_name"),
        "both dataset sources": (["--dataset_name", "glue"], "one data source"),
        "hub dataset offline": (["--train_file", None, "--validation_file", None, "--dataset_name",
                                 "hf-lwsam-test/not-cached"], "offline"),
        "test_file without do_predict": (["--test_file", a["validation_csv"]], "--do_predict"),
        "do_predict without a test file": (["--do_predict"], "--test_file"),
        "metric_for_best_model misspelt": (["--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy",
                                            "steps", "--save_steps", "1", "--load_best_model_at_end", "true",
                                            "--metric_for_best_model", "acuracy"], "--metric_for_best_model 'acuracy'"),
        "metric_for_best_model not reported": (["--metric_for_best_model", "eval_perplexity"],
                                               "pass one of ['loss', 'accuracy', 'f1']"),
        "lr_scheduler_kwargs not JSON": (["--lr_scheduler_kwargs", "{bad"],
                                         "--lr_scheduler_kwargs '{bad' is not valid JSON"),
        "same text and label column": (["--text_column", "sentiment"], "both 'sentiment'"),
        "label_column with causal_lm": (["--task", "causal_lm", "--model_name_or_path", a["gpt2"]],
                                        "--label_column is not used"),
        "text and label columns swapped": (["--text_column", "sentiment", "--label_column", "text"], "looks like text"),
        "unknown text column": (["--text_column", "body"], "--text_column 'body'"),
        "unknown label column": (["--label_column", "stars"], "--label_column 'stars'"),
        "unlabelled text for an encoder": (["--label_column", None, "--train_file", d / "plays.txt",
                                            "--validation_file", d / "plays.txt"], "--task causal_lm"),
        # data files
        "train file missing": (["--train_file", d / "nope.csv"], "does not exist"),
        "validation file without train file": (["--train_file", None], "without --train_file"),
        "train file is a directory": (["--train_file", d / "a_directory.csv"], "is a directory"),
        "zero-byte csv": (train("zero.csv"), "empty (0 bytes)"),
        "header-only csv": (train("header_only.csv"), "no data rows"),
        "csv of blank lines": (train("blank_lines.csv"), "has only blank lines"),
        "latin-1 csv": (train("latin1.csv"), "not UTF-8"),
        "ragged csv": (train("ragged.csv"), "Expected 2 fields"),
        "tab-separated csv": (train("tabs.csv"), "tab-separated"),
        "broken jsonl": (["--train_file", d / "broken.jsonl", "--validation_file", None], "could not read"),
        "missing and NaN labels": (train("nan_labels.csv"), "has no 'sentiment' label in 1 of 4 rows (data row 2 "),
        "empty cells in a training file of int labels, text labels in validation": (
            train("int_labels_gaps.csv"),
            "int_labels_gaps.csv' has an empty 'sentiment' cell in 2 of 5 rows (data rows 2, 4 "),
        "numeric text column": (both("numeric_text.csv"), "not text"),
        "numeric text in train, words in validation": (train("numeric_text.csv"), "every 'text' cell is a number"),
        "GLUE-style -1 validation labels": (["--train_file", d / "int_labels.csv", "--validation_file",
                                             d / "glue_test.csv"], "3 with the label -1"),
        "GLUE-style -1 test labels with do_predict": (["--train_file", d / "int_labels.csv", "--validation_file",
                                                       d / "int_labels.csv", "--test_file", d / "glue_test.csv",
                                                       "--do_predict"], "drop --do_predict"),
        "validation label unseen in training": (["--validation_file", d / "unseen.csv"], "'ecstatic'"),
        "one class": (train("one_class.csv"), "at least 2"),
        "only blank texts": (both("blank_texts.csv"), "no non-empty text"),
        "unsupported extension": (["--train_file", d / "train.xlsx"], "unsupported extension"),
        "mixed formats": (["--train_file", d / "train.jsonl"], "mix formats"),
        "causal LM text shorter than a block": (["--model_name_or_path", a["gpt2"], "--label_column", None,
                                                 "--train_file", d / "short.txt", "--validation_file", d / "short.txt",
                                                 "--max_length", "64"], "shorter than one block"),
        # output directory and checkpoints
        "output_dir is the data folder, --overwrite_output_dir": (["--output_dir", d, "--overwrite_output_dir"],
                                                                  "did not write"),
        "output_dir holds other files": (["--output_dir", d], "did not write"),
        "output_dir under /proc": (["--output_dir", "/proc/hf-lwsam-out"], "not writable"),
        "output_dir under a file": (["--output_dir", root / "a_file" / "out"], "under the file"),
        "output_dir is a file": (["--output_dir", root / "a_file"], "is a file"),
        "resume_from_checkpoint missing": (["--resume_from_checkpoint", "/nonexistent"], "does not exist"),
        "resume_from_checkpoint not a checkpoint": (["--resume_from_checkpoint", root / "not_a_checkpoint"],
                                                    "not a complete checkpoint"),
        # config files
        "config unknown key": (config("unknown_key.yaml"), "learnin_rate"),
        "config list for a float": (config("list_value.yaml"), "learning_rate is a list"),
        "config word for an int": (config("bad_int.yaml"), "'eight' is not a valid int"),
        "config value not a choice": (config("bad_choice.yaml"), "'everything' is not one of"),
        "config invalid yaml": (config("invalid.yaml"), "not valid YAML"),
        "config not a mapping": (config("not_mapping.yaml"), "mapping"),
        "config invalid json": (config("bad.json"), "not valid JSON"),
        "config file missing": (config("missing.yaml"), "does not exist"),
    }


def _argv(assets: dict, out: Path, case: list) -> list[str]:
    """Base flags (tiny model, real tweets, a tiny budget), then the case's flags (later flags win; `None` drops the
    flag from the base; `__config__ PATH` puts a config file first)."""
    base = {"--model_name_or_path": assets["bert"], "--train_file": assets["train_csv"],
            "--validation_file": assets["validation_csv"], "--label_column": "sentiment", "--max_length": "32",
            "--max_steps": "2", "--per_device_train_batch_size": "8", "--report_to": "none", "--use_cpu": "true",
            "--disable_tqdm": "true", "--measure_plain_steps": "0", "--output_dir": out}
    first, rest = [], list(case)
    if rest and rest[0] == "__config__":
        first, rest = [str(rest[1])], rest[2:]
        base.pop("--report_to")
    return first + _merge_flags(base, rest)


def _merge_flags(base: dict, rest: list) -> list[str]:
    """`base` (flag -> value) with the flags of `rest`: a flag of `base` takes the new value (`None` drops it),
    others are appended."""
    extra = []
    i = 0
    while i < len(rest):
        flag = rest[i]
        values = []
        i += 1
        while i < len(rest) and not (isinstance(rest[i], str) and rest[i].startswith("--")):
            values.append(rest[i])
            i += 1
        if flag in base and values == [None]:
            del base[flag]
        elif flag in base and len(values) == 1:
            base[flag] = values[0]
        else:
            extra += [flag, *values]
    return [str(x) for kv in base.items() for x in kv] + [str(x) for x in extra]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root`, with the content hash of files."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


CASE_NAMES = list(_cases({k: Path("/x") for k in ("data", "root", "train_csv", "validation_csv", "bert", "gpt2")}))


def test_the_table_covers_at_least_a_hundred_inputs():
    assert len(CASE_NAMES) == len(set(CASE_NAMES)) >= 100


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_nothing_written(assets, tmp_path, case):
    argv_case, expected = _cases(assets)[case]
    out = tmp_path / "out"
    argv = _argv(assets, out, argv_case)
    before = _snapshot(assets["root"])
    code, stdout, stderr = run_cli(argv)
    lines = stderr.splitlines()
    assert code == 2, f"exit {code}: {stderr[-2000:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-2000:]}"
    assert lines[0].startswith("hf-lwsam-train: error: ") and expected in lines[0], lines[0]
    assert any(fix in lines[0].lower() for fix in FIXES), f"the line must say what to pass instead: {lines[0]}"
    assert stdout == ""
    assert not out.exists(), "nothing may be written"
    assert _snapshot(assets["root"]) == before, "the inputs must be untouched and nothing written next to them"


@pytest.mark.parametrize("case, expected", [
    (["--learning_rate", "-1"], "hf-lwsam-train: error: --learning_rate -1.0 is invalid: pass a finite learning rate "
                                ">= 0 (e.g. 5e-5)."),
    (["--validation_file", "unseen.csv"], "hf-lwsam-train: error: the validation split has label(s) ['ecstatic'] "
                                          "that the training data lacks"),
    # datasets logs these parsers' errors itself before raising: the one line carries them instead
    pytest.param(["--train_file", "broken.jsonl", "--validation_file", None], "hf-lwsam-train: error: could not "
                 "read --train_file", marks=pytest.mark.slow),
    pytest.param(["--train_file", "ragged.csv"], "hf-lwsam-train: error: could not read --train_file",
                 marks=pytest.mark.slow),
])
def test_real_process_stderr_is_exactly_one_line(assets, tmp_path, case, expected):
    """Through a real interpreter, so logging handlers, progress bars and load reports would all show."""
    case = [assets["data"] / x if isinstance(x, str) and x.endswith((".csv", ".jsonl")) else x for x in case]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hf_lwsam.cli.train", *_argv(assets, out, case)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(expected), proc.stderr[-3000:]
    assert proc.stdout == "" and not out.exists() and os.listdir(tmp_path) == []


def test_config_values_are_typed_like_flags(tmp_path):
    from hf_lwsam.cli.args import parse_args

    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1e-3\nuse_lora: true\nlora_target_modules: [query, value]\nmax_steps: 3\n"
                    "train_file: t.csv\n")
    model_args, _, args, _ = parse_args([str(path)])
    # YAML reads `1e-3` as a string: it is converted as the flag would be, not passed on as text.
    assert args.learning_rate == 1e-3 and isinstance(args.learning_rate, float)
    # `use_lora`, the former name of `use_peft`, is still read
    assert model_args.use_peft is True and model_args.lora_target_modules == ["query", "value"]
    assert args.max_steps == 3 and json.loads(json.dumps(args.max_steps)) == 3


def test_push_to_hub_while_offline_exits_2_with_one_error_line(assets, tmp_path):
    """The Hub repo is created with the Trainer, after the weights are loaded, so their progress bar comes first."""
    out = tmp_path / "out"
    code, _, stderr = run_cli(_argv(assets, out, ["--push_to_hub"]))
    errors = [line for line in stderr.splitlines() if "hf-lwsam-train" in line]
    assert code == 2 and len(errors) == 1 and "--push_to_hub could not create the Hub repo" in errors[0]
    assert "Traceback" not in stderr and not out.exists()


# ------------------------------------------------------------------------------------------------ hf-lwsam-sft
# The same promise for the SFT command: every case exits 2 with one line, before any weights load, and writes nothing.
# `main(argv)` runs in-process; besides stderr, the records of the libraries' loggers are checked (their handlers
# write to the real stderr, which redirect_stderr does not see), so a warning or load report before the line fails.
LIBRARY_LOGGERS = ("transformers", "datasets", "trl", "peft", "accelerate", "hf_lwsam")


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


@pytest.fixture(scope="module")
def sft_assets(tmp_path_factory) -> dict[str, Path]:
    from conftest import shakespeare_paragraphs

    root = tmp_path_factory.mktemp("sft_bad_input_assets")
    model = make_tiny_gpt2_dir(root / "tiny-gpt2")
    (root / "no-tokenizer").mkdir()
    for name in ("config.json", "model.safetensors"):
        (root / "no-tokenizer" / name).write_bytes((model / name).read_bytes())
    texts = shakespeare_paragraphs(12)

    def chat(user: str, assistant: str, roles=("user", "assistant"), keys=("role", "content")) -> list[dict]:
        return [{keys[0]: roles[0], keys[1]: user}, {keys[0]: roles[1], keys[1]: assistant}]

    datasets = {
        "text": {"train.jsonl": _jsonl([{"text": t} for t in texts])},
        "no_text_column": {"train.jsonl": _jsonl([{"body": t, "id": i} for i, t in enumerate(texts)])},
        "numeric_text": {"train.jsonl": _jsonl([{"text": i} for i in range(12)])},
        "empty_texts": {"train.jsonl": _jsonl([{"text": " "}, {"text": ""}] * 6)},
        "messages": {"train.jsonl": _jsonl([{"messages": chat(t[:30], t[30:])} for t in texts])},
        "roles_human_bot": {"train.jsonl": _jsonl([{"messages": chat(t[:30], t[30:], ("human", "bot"))}
                                                   for t in texts])},
        "messages_from_value": {"train.jsonl": _jsonl([{"messages": chat(t[:30], t[30:], ("user", "assistant"),
                                                                         ("from", "value"))} for t in texts])},
        "sharegpt": {"train.jsonl": _jsonl([{"conversations": chat(t[:30], t[30:], ("human", "gpt"),
                                                                   ("from", "value"))} for t in texts])},
        "conversations_role_content": {"train.jsonl": _jsonl([{"conversations": chat(t[:30], t[30:])}
                                                              for t in texts])},
        "prompt_only": {"train.jsonl": _jsonl([{"prompt": t} for t in texts])},
        "prompt_text_completion_messages": {"train.jsonl": _jsonl([{"prompt": t[:30], "completion": chat("a", "b")}
                                                                   for t in texts])},
        "zero_byte": {"train.jsonl": b""},
        "broken_json": {"train.jsonl": b'{"text": "good"}\n{"text": \n'},
        "text_train_messages_test": {"train.jsonl": _jsonl([{"text": t} for t in texts]),
                                     "test.jsonl": _jsonl([{"messages": chat("a", "b")}] * 3)},
    }
    for name, files in datasets.items():
        (root / name).mkdir()
        for file, content in files.items():
            (root / name / file).write_bytes(content)
    configs = {
        "invalid.yaml": "learning_rate: [1, 2\n",
        "unknown_key.yaml": f"model_name_or_path: {model}\ndataset_name: {root / 'text'}\nlearnin_rate: 2e-3\n",
        "bad_int.yaml": f"model_name_or_path: {model}\ndataset_name: {root / 'text'}\nmax_length: long\n",
        "accumulation_0.yaml": f"model_name_or_path: {model}\ndataset_name: {root / 'text'}\n"
                               "gradient_accumulation_steps: 0\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    (root / "a_file").write_text("not a directory")
    return {"root": root, "model": model}


def _sft_cases(a: dict[str, Path]) -> dict[str, tuple[list, str]]:
    """name -> (flags after the base flags, a substring of the error line)."""
    root = a["root"]

    def data(name: str) -> list:
        return ["--dataset_name", root / name]

    return {
        # the model
        "model path missing": (["--model_name_or_path", root / "no-model"], "does not exist"),
        "model path is a file": (["--model_name_or_path", root / "a_file"], "is a file"),
        "hub model offline": (["--model_name_or_path", "hf-lwsam-test/not-cached"], "offline"),
        "model folder without tokenizer": (["--model_name_or_path", root / "no-tokenizer"], "no tokenizer files"),
        "max_length above the positions": (["--max_length", "1024"], "positions"),
        # options
        "max_length 0": (["--max_length", "0"], "--max_length 0"),
        "max_length -1": (["--max_length", "-1"], "--max_length -1"),
        "train batch 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0"),
        "eval batch 0": (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size 0"),
        "learning_rate -1": (["--learning_rate", "-1"], "--learning_rate -1"),
        "max_steps 0": (["--max_steps", "0"], "--max_steps 0"),
        "report_to wandb, not installed": (["--report_to", "wandb"], "wandb is not installed"),
        "report_to unknown": (["--report_to", "myboard"], "myboard"),
        "unknown flag": (["--sam_rhoo", "0.1"], "--sam_rhoo"),
        "abbreviated flag": (["--sam_rh", "0.1"], "--sam_rh"),  # not taken for --sam_rho
        "empty dataset_text_field": (["--dataset_text_field", ""], "--dataset_text_field is empty"),
        "bf16 (SFTConfig's default) without a bf16 device": (["--bf16", None], "--bf16 false"),
        "chat_template_path missing": (["--chat_template_path", root / "no_template.jinja"], "does not exist"),
        "dataset_streaming": (["--dataset_streaming", "true"], "--dataset_streaming is not supported"),
        "load_in_4bit without bitsandbytes": (["--use_peft", "--load_in_4bit"], "bitsandbytes"),
        "sam_rho -1": (["--sam_rho", "-1"], "sam_rho=-1"),
        "sam_target_layers match nothing": (["--sam_target_layers", "nothing.here"], "matches no module"),
        "sam_target_layers match nothing with LoRA": (["--use_peft", "--sam_target_layers", "nothing.here"],
                                                      "matches no module"),
        "lora_target_modules match nothing": (["--use_peft", "--lora_target_modules", "no_such_proj"],
                                              "LoRA could not be added"),
        "lora_r without use_peft": (["--lora_r", "4"], "without --use_peft"),
        "lora_r 0": (["--use_peft", "--lora_r", "0"], "--lora_r 0"),
        "lora_dropout 1": (["--use_peft", "--lora_dropout", "1"], "--lora_dropout 1"),
        "eval_strategy without an eval split": (["--eval_strategy", "steps", "--eval_steps", "1"],
                                                "--eval_strategy steps needs a 'test' split"),
        "missing train split": (["--dataset_train_split", "nope"], "has no 'nope' split"),
        # the dataset
        "dataset folder missing": (data("nope"), "does not exist"),
        "dataset is a file": (data("a_file"), "is a file"),
        "hub dataset offline": (["--dataset_name", "hf-lwsam-test/not-cached"], "offline"),
        "zero-byte train.jsonl": (data("zero_byte"), "train.jsonl' is empty (0 bytes)"),
        "broken json": (data("broken_json"), "JSON"),
        "no text or messages column": (data("no_text_column"), "has the columns ['body', 'id']"),
        "wrong dataset_text_field": (["--dataset_text_field", "body"], "--dataset_text_field 'body'"),
        "numeric text column": (data("numeric_text"), "not text"),
        "all texts empty": (data("empty_texts"), "no non-empty text"),
        "roles human/bot": (data("roles_human_bot"), "unknown role(s) ['bot', 'human']"),
        "ShareGPT from/value in messages": (data("messages_from_value"), "ShareGPT-style"),
        "ShareGPT conversations human/gpt": (data("sharegpt"), "ShareGPT-style with the role(s) ['gpt', 'human']"),
        "conversations with role/content": (data("conversations_role_content"), "rename 'conversations'"),
        "prompt without completion": (data("prompt_only"), "needs a 'completion' column"),
        "prompt text, completion messages": (data("prompt_text_completion_messages"), "one text and one list"),
        "train and test in different formats": (data("text_train_messages_test"), "different columns"),
        "messages without a chat template": (data("messages"), "no chat template"),
        "assistant_only_loss on text": (["--assistant_only_loss", "true"],
                                        "--assistant_only_loss needs conversational"),
        "completion_only_loss on text": (["--completion_only_loss", "true"],
                                         "--completion_only_loss needs prompt/completion data"),
        "dataset_kwargs not JSON": (["--dataset_kwargs", "{bad"], "--dataset_kwargs '{bad' is not valid JSON"),
        # output directory and config files
        "output_dir holds other files": (["--output_dir", root / "text"], "did not write"),
        "resume_from_checkpoint missing": (["--resume_from_checkpoint", "/nonexistent"], "does not exist"),
        "config invalid yaml": (["__config__", root / "invalid.yaml"], "not valid YAML"),
        "config unknown key": (["__config__", root / "unknown_key.yaml"], "learnin_rate"),
        "config word for an int": (["__config__", root / "bad_int.yaml"], "'long' is not a valid int"),
        "config accumulation 0": (["__config__", root / "accumulation_0.yaml"], "--gradient_accumulation_steps 0"),
        "config file missing": (["__config__", root / "missing.yaml"], "--config needs an existing YAML file"),
    }


def _sft_argv(a: dict, out: Path, case: list) -> list[str]:
    """Base flags (tiny local GPT-2, a local text dataset, two steps), then the case's (later flags win; a
    `__config__ PATH` case names model and data in the config file instead)."""
    base = {"--model_name_or_path": a["model"], "--dataset_name": a["root"] / "text", "--max_steps": "2",
            "--per_device_train_batch_size": "4", "--max_length": "32", "--bf16": "false", "--report_to": "none",
            "--disable_tqdm": "true", "--output_dir": out}
    if case and case[0] == "__config__":
        del base["--model_name_or_path"], base["--dataset_name"]
        base["--config"], case = case[1], case[2:]
    return _merge_flags(base, list(case))


def run_sft(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """`hf-lwsam-sft`'s main in-process: exit code, stdout, stderr, and the library log records at WARNING and up
    with the Python warnings raised."""
    import logging

    from hf_lwsam.cli.sft import main as sft_main

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # a real process prints each to stderr
            code = sft_main([str(a) for a in argv])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return code, out.getvalue(), err.getvalue(), [r.getMessage() for r in records] + [str(w.message) for w in warned]


SFT_CASE_NAMES = list(_sft_cases({"root": Path("/x"), "model": Path("/x")}))


@pytest.mark.parametrize("case", SFT_CASE_NAMES)
def test_sft_bad_input_is_one_line_exit_2_nothing_written(sft_assets, tmp_path, case):
    pytest.importorskip("trl")
    if case == "bf16 (SFTConfig's default) without a bf16 device" and torch.cuda.is_available():
        pytest.skip("this machine supports bf16")
    argv_case, expected = _sft_cases(sft_assets)[case]
    out = tmp_path / "out"
    argv = _sft_argv(sft_assets, out, argv_case)
    before = _snapshot(sft_assets["root"])
    code, stdout, stderr, logged = run_sft(argv)
    lines = stderr.splitlines()
    assert code == 2, f"exit {code}: {stderr[-2000:]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-2000:]}"
    assert lines[0].startswith("hf-lwsam-sft: error: ") and expected in lines[0], lines[0]
    assert any(fix in lines[0].lower() for fix in FIXES + (" rename ", " convert ")), lines[0]
    assert "Strategy." not in lines[0], "an enum's repr is not what the user typed"
    assert not logged, f"library warnings before the error line: {logged}"
    assert stdout == ""
    assert not out.exists(), "nothing may be written"
    assert _snapshot(sft_assets["root"]) == before, "the inputs must be untouched and nothing written next to them"


@pytest.mark.parametrize("case", [
    "broken json",  # datasets logs the parser's error itself before raising
    pytest.param("eval_strategy without an eval split", marks=pytest.mark.slow),
    pytest.param("sam_target_layers match nothing with LoRA", marks=pytest.mark.slow),  # PEFT warns on GPT-2
])
def test_sft_real_process_stderr_is_exactly_one_line(sft_assets, tmp_path, case):
    """Through a real interpreter, so logging handlers, progress bars and load reports would all show."""
    pytest.importorskip("trl")
    argv_case, expected = _sft_cases(sft_assets)[case]
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "hf_lwsam.cli.sft", *_sft_argv(sft_assets, out, argv_case)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-lwsam-sft: error: ") and expected in lines[0], \
        proc.stderr[-3000:]
    assert proc.stdout == "" and not out.exists() and os.listdir(tmp_path) == []


def test_an_unreachable_hub_fails_at_once_with_one_complete_line(tmp_path):
    """A Hub model id that is not cached, with no connection to the Hub (a real refused connection): one request,
    no retries, and the whole message on one line (nothing cut inside a URL)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": str(REPO)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "hf_lwsam.cli.train", "--model_name_or_path",
                           "hf-lwsam-test/not-cached", "--dataset_name", "hf-lwsam-test/no-data", "--output_dir",
                           tmp_path / "out"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    assert proc.stderr == ("hf-lwsam-train: error: --model_name_or_path 'hf-lwsam-test/not-cached' is not a local "
                           "directory nor in the Hub cache, and the Hub cannot be reached (ConnectError: [Errno 111] "
                           "Connection refused): check the network, or pass a local model directory (HF_HUB_OFFLINE=1 "
                           "uses cached models only).\n")


def test_long_library_messages_are_shortened_at_a_word_not_inside_a_url():
    from hf_lwsam.cli.args import brief

    message = ("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
               "cached files.\nCheck your internet connection or see how to run the library in offline mode at "
               "'https://huggingface.co/docs/transformers/installation#offline-mode'.")
    assert brief(message, 500) == " ".join(message.split())
    short = brief(message, 200)
    assert short == ("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
                     "cached files.")
    assert brief(message, 60) == "We couldn't connect to 'https://huggingface.co' to load the ..."
    assert brief(message, 240) == " ".join(message.split()[:-1]) + " ..."  # the offline-mode URL: whole or not at all
    url = "https://example.org/" + "a" * 300
    assert brief(url, 50) == url and brief(f"{url} and more words", 50) == f"{url} ..."
