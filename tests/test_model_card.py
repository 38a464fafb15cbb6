"""The model card written by `hf-lwsam-train`: from a real short run, with Hub-parsable YAML front matter."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401
from transformers import AutoModelForSequenceClassification

from hf_lwsam import select_layers
from hf_lwsam.config import sam_option_docs
from hf_lwsam.model_card import TEMPLATE_PATH

REPO = Path(__file__).resolve().parent.parent


def test_the_template_has_one_source_that_packaging_ships():
    import tomllib

    copies = [p for p in REPO.rglob("model_card.md.j2") if ".git" not in p.parts and "build" not in p.parts]
    assert copies == [TEMPLATE_PATH], f"one template, no drifting copies: {copies}"
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p for pattern in package_data["hf_lwsam"] for p in (REPO / "hf_lwsam").glob(pattern)]
    assert TEMPLATE_PATH in shipped


def test_card_of_a_real_run_has_the_runs_values(tmp_path):
    model_dir = make_tiny_bert_dir(tmp_path / "tiny-bert")
    train_csv, validation_csv = write_tweet_csvs(tmp_path / "tweets", n_train=48, n_validation=32)
    out = tmp_path / "tweet-bert-lwsam"
    code, _, stderr = run_cli(["--model_name_or_path", model_dir, "--train_file", train_csv, "--validation_file",
                               validation_csv, "--label_column", "sentiment", "--max_length", "24", "--sam_rho", "0.07",
                               "--sam_adaptive", "--eval_strategy", "epoch", "--output_dir", out, *FAST])
    assert code == 0, stderr
    text = (out / "README.md").read_text(encoding="utf-8")
    results = json.loads((out / "all_results.json").read_text())

    # YAML front matter, parsed both as plain YAML and by huggingface_hub (as the Hub does).
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-classification"
    assert {"hf-lwsam", "sharpness-aware-minimization"} <= set(front["tags"])
    assert "base_model" not in front  # a local directory is not a Hub id
    card = ModelCard.load(out / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"accuracy": results["eval_accuracy"], "f1": results["eval_f1"]}
    assert card.data.eval_results[0].task_type == "text-classification"
    assert front["model-index"][0]["name"] == "tweet-bert-lwsam"

    # Body: the run's LW-SAM setup, the resolved layers, results, throughput, usage and the citation.
    # one row per sam_* option, from the same fields as the docstring and the options page
    rows = dict(line.strip("| ").replace("`", "").split(" | ") for line in text.splitlines()
                if line.startswith("| `sam_"))
    assert list(rows) == [option["name"] for option in sam_option_docs()]
    assert rows["sam_rho"] == "0.07" and rows["sam_adaptive"] == "True" and rows["sam_selection"] == "pattern"
    assert rows["sam_preset"] == "None" and rows["sam_ascent"] == "exact" and rows["sam_interval"] == "1"
    assert rows["sam_target_layers"] == "default (output side)" and rows["sam_start"] == "0"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    layers = select_layers(model)
    assert f"| perturbed layers | {len(layers)} (" in text and all(f"`{layer}`" in text for layer in layers)
    assert f"| {round(results['eval_loss'], 4)} | {round(results['eval_accuracy'], 4)} |" in text
    assert "| learning_rate |" in text and "| train_batch_size | 16 |" in text
    assert "- Labels: negative, neutral, positive" in text and "48 training examples, 32 evaluation examples" in text
    assert "relative to plain training steps of the same run:" in text and "tokens/s" in text
    assert 'pipeline("text-classification", model="tweet-bert-lwsam")' in text
    assert "arXiv" in text and "2503.14205" in text and "Lee, Sunwoo" in text and "KDD" in text
    assert "shipped in hf_lwsam/metrics" in text
