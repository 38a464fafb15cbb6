"""The model card written by `hf-lwsam-train`: from a real short run, with Hub-parsable YAML front matter."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401
from transformers import AutoModelForSequenceClassification

from hf_lwsam import select_layers
from hf_lwsam.config import sam_option_docs
from hf_lwsam.model_card import TEMPLATE_PATH, ModelCardInfo, build_model_card

REPO = Path(__file__).resolve().parent.parent


def assert_hub_accepts_the_metadata(card_text: str, *private_paths: Path) -> dict:
    """The checks the Hub makes of a card's metadata on upload that can run offline: YAML that `huggingface_hub`
    parses into `ModelCardData` (model-index included), every `base_model` and `datasets` entry a valid repo id; and
    no local path of the user's in the card. Returns the metadata."""
    data = ModelCard(card_text).data.to_dict()
    base = data.get("base_model") or []
    for name in ([base] if isinstance(base, str) else base) + list(data.get("datasets") or []):
        validate_repo_id(name)
    leaked = [str(path) for path in private_paths if str(path) in card_text]
    assert not leaked, f"the card shows local paths: {leaked}"
    return data


def test_a_card_of_local_folders_has_only_hub_ids_in_its_metadata(tmp_path, sgd_args):
    """Local folders passed as the base model (even flagged as a Hub id) and as datasets stay out of `base_model` and
    `datasets`; the text names the model folder, not its path."""
    from conftest import tiny_bert
    from hf_lwsam import LWSAMTrainer

    model_dir, data_dir = tmp_path / "my-model", tmp_path / "my-data"
    model_dir.mkdir(), data_dir.mkdir()
    trainer = LWSAMTrainer(model=tiny_bert(), args=sgd_args())
    info = ModelCardInfo(task="classification", base_model=str(model_dir), base_model_is_hub_id=True,
                         dataset_ids=[str(data_dir), "stanfordnlp/imdb"], dataset_description="local tweets")
    text = str(build_model_card(trainer, info, "my-run"))
    data = assert_hub_accepts_the_metadata(text, tmp_path)
    assert "base_model" not in data and data["datasets"] == ["stanfordnlp/imdb"]
    assert "fine-tuned version of the local model `my-model`" in text
    hub = str(build_model_card(trainer, ModelCardInfo(task="classification", base_model="google-bert/bert-base-uncased",
                                                      base_model_is_hub_id=True), "my-run"))
    assert assert_hub_accepts_the_metadata(hub)["base_model"] == "google-bert/bert-base-uncased"
    assert "[google-bert/bert-base-uncased](https://huggingface.co/google-bert/bert-base-uncased)" in hub


def test_a_local_dataset_folder_stays_out_of_the_cards_metadata(tmp_path):
    """`hf-lwsam-train --dataset_name` with a local folder: the card names the folder, not its path, and lists no
    dataset."""
    model_dir = make_tiny_bert_dir(tmp_path / "tiny-bert")
    write_tweet_csvs(tmp_path / "tweet-folder", n_train=32, n_validation=16)
    out = tmp_path / "run"
    code, _, stderr = run_cli(["--model_name_or_path", model_dir, "--dataset_name", tmp_path / "tweet-folder",
                               "--label_column", "sentiment", "--max_length", "16", "--output_dir", out, *FAST])
    assert code == 0, stderr
    text = (out / "README.md").read_text(encoding="utf-8")
    data = assert_hub_accepts_the_metadata(text, tmp_path)
    assert "datasets" not in data and "base_model" not in data
    assert "local data files (folder `tweet-folder`)" in text and "the local model `tiny-bert`" in text


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
    assert_hub_accepts_the_metadata(text, tmp_path)
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
    assert "- LW-SAM step time relative to plain training steps of the same run:" in text and "tokens/s" in text
    # the run's train_loss (the mean over its 3 steps), not the loss logged last (at step 2)
    assert f"Training loss (`train_loss`, the mean over the run's steps): {round(results['train_loss'], 4)}\n" in text
    logged = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logged and round(logged[-1], 4) != round(results["train_loss"], 4)
    assert 'pipeline("text-classification", model="tweet-bert-lwsam")' in text
    assert "arXiv" in text and "2503.14205" in text and "Lee, Sunwoo" in text and "KDD" in text
    assert "shipped in hf_lwsam/metrics" in text
