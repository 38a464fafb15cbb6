"""The model card written by `hf-lwsam-train` and `hf-lwsam-sft`: from real short runs, with Hub-parsable YAML front
matter, the mode that ran named from its options, the perturbed modules counted by name pattern, what the data
collator did, and an adapter that names the card's base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForSequenceClassification

from hf_lwsam import select_layers
from hf_lwsam.config import sam_option_docs
from hf_lwsam.model_card import TEMPLATE_PATH, ModelCardInfo, build_model_card, layer_groups, perturbed_layers
from hf_lwsam.modes import sam_mode
from test_cli import FAST, make_tiny_bert_dir, one_torch_thread, run_cli, write_tweet_csvs  # noqa: F401

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
    assert f"| perturbed modules | {len(layers)} (" in text and all(f"| `{layer}` | 1 |" in text for layer in layers)
    assert f"| {round(results['eval_loss'], 4)} | {round(results['eval_accuracy'], 4)} |" in text
    assert "| learning_rate |" in text and "| train_batch_size | 16 |" in text
    assert "- Labels: negative, neutral, positive" in text and "48 training examples, 32 evaluation examples" in text
    assert "- SAM step time (layer-wise ASAM on the output side) relative to plain training steps of the same run:" \
        in text
    assert "tokens/s" in text
    # the run's train_loss (the mean over its 3 steps), not the loss logged last (at step 2)
    assert f"Training loss (`train_loss`, the mean over the run's steps): {round(results['train_loss'], 4)}\n" in text
    logged = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert logged and round(logged[-1], 4) != round(results["train_loss"], 4)
    assert 'pipeline("text-classification", model="tweet-bert-lwsam")' in text
    assert "arXiv" in text and "2503.14205" in text and "Lee, Sunwoo" in text and "KDD" in text
    assert "shipped in hf_lwsam/metrics" in text


# ------------------------------------------------------------------------------------ the card names what ran
# options -> the mode's name and a phrase of its formula or schedule that only that mode's card has
MODES = {
    "free": ({"sam_preset": "free"}, "Momentum-SAM on every parameter", "e_S = -rho * m_S / ||m_S||"),
    "exact": ({"sam_preset": "exact"}, "full SAM every step", "g_S the gradient of S at w on the same micro-batch"),
    "fast": ({"sam_preset": "fast"}, "full SAM, last 20% of the run",
             "SAM steps are the optimizer steps of the last 20% of the run"),
    "default": ({}, "layer-wise SAM on the output side", "S is only the output-side layers"),
    "stale": ({"sam_ascent": "stale", "sam_target_layers": "classifier"},
              "layer-wise SAM on the selected layers, stale ascent", "kept from the previous SAM step"),
    "random": ({"sam_selection": "all", "sam_ascent": "random"}, "full random perturbation", "Gaussian noise"),
    "exact excluding": ({"sam_preset": "exact", "sam_exclude_layers": "classifier"},
                        "full SAM every step, excluding classifier",
                        "S is every trainable parameter but those of the modules that "
                        "`sam_exclude_layers='classifier'`"),
    "free excluding": ({"sam_preset": "free", "sam_exclude_layers": ["classifier", "pooler"]},
                       "Momentum-SAM on every parameter, excluding classifier pooler",
                       "S is every trainable parameter but those of the modules that "
                       "`sam_exclude_layers=['classifier',"),
}


@pytest.mark.parametrize("mode", MODES)
def test_the_card_says_which_mode_ran(mode, sgd_args):
    """A run's card names its mode (derived from its options) in the first sentence and the SAM section, says where
    e_S came from, and tags and cites the method that ran: a full-model run's card says nothing of layer-wise SAM."""
    from conftest import tiny_bert, tweet_bytes_dataset
    from hf_lwsam import LWSAMTrainer

    options, name, formula = MODES[mode]
    trainer = LWSAMTrainer(model=tiny_bert(), train_dataset=tweet_bytes_dataset(8),
                           args=sgd_args(max_steps=2, optim="adamw_torch", learning_rate=1e-3, **options))
    trainer.train()
    info = ModelCardInfo(task="classification", base_model="google-bert/bert-base-uncased", base_model_is_hub_id=True)
    text = str(build_model_card(trainer, info, "run"))
    assert sam_mode(trainer.args) == name
    assert f"trained with sharpness-aware minimization, {name}" in text
    assert f"## Sharpness-aware minimization: {name}\n" in text and formula in text
    assert f"- SAM step time ({name}) relative to plain training" in text
    layer_wise = trainer.args.sam_selection != "all"
    assert ("layer-wise-sam" in ModelCard(text).data.tags) == layer_wise
    assert ("Lee, Sunwoo" in text) == layer_wise and ("Becker" in text) == mode.startswith("free") != ("Foret" in text)
    if not layer_wise:
        assert "layer-wise" not in text.lower() and "LW-SAM" not in text and "perturbs only" not in text
        assert "| `sam_target_layers` | None |" in text  # not the output-side default: the selection is 'all'
        assert "S is every trainable parameter" in text


def test_a_card_of_many_perturbed_modules_counts_them_by_name_pattern(sgd_args):
    """Momentum-SAM on every LoRA tensor of a 30-layer model (420 modules, as SmolLM2-135M with all-linear LoRA): the
    card lists 14 name patterns with their counts and parameters instead of 420 names, and stays small."""
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama
    from hf_lwsam import LWSAMTrainer

    model = get_peft_model(tiny_llama(n_layer=30), LoraConfig(r=2, target_modules="all-linear"))
    trainer = LWSAMTrainer(model=model, args=sgd_args(sam_preset="free", optim="adamw_torch"))
    layers, _ = perturbed_layers(trainer)
    assert len(layers) == 420
    text = str(build_model_card(trainer, ModelCardInfo(task="causal_lm", base_model="m", lora={"r": 2}), "run"))
    rows = [line for line in text.splitlines() if line.startswith("| `base_model.model.")]
    assert len(rows) == 14 and all(" | 30 | " in row for row in rows)
    # q_proj's lora_A is r x hidden_size = 2 x 32 in each of the 30 layers
    assert f"| `base_model.model.model.layers.[0-29].self_attn.q_proj.lora_A.default` | 30 | {30 * 2 * 32:,} |" in text
    assert "layers.7.self_attn" not in text and len(text.encode()) < 8000


def test_layer_groups_keep_lone_names_and_count_the_rest():
    names = ["h.0.attn", "h.1.attn", "h.2.attn", "h.5.attn", "h.0.mlp", "h.3.mlp", "h.4.mlp", "h.9.mlp", "h.11.mlp",
             "ln_f", "head"]
    groups = layer_groups(names, dict.fromkeys(names, 2))
    assert [(g["pattern"], g["count"], g["parameters"]) for g in groups] == [
        ("h.[0,1,2,5].attn", 4, "8"), ("h.*.mlp", 5, "10"), ("ln_f", 1, "2"), ("head", 1, "2")]
    assert layer_groups(["h.3.mlp", "h.4.mlp"]) == [{"pattern": "h.[3-4].mlp", "count": 2, "parameters": "0"}]


# ------------------------------------------------------------------------------- what the data collator did
@pytest.fixture(scope="module")
def sft_flags(tmp_path_factory) -> list[str]:
    """A tiny local GPT-2 and Shakespeare paragraphs as text data, for `hf-lwsam-sft` (bf16 off: no bf16 here)."""
    from datasets import Dataset

    from conftest import shakespeare_paragraphs
    from test_cli import make_tiny_gpt2_dir

    root = tmp_path_factory.mktemp("card_sft")
    model = make_tiny_gpt2_dir(root / "tiny-gpt2")
    Dataset.from_dict({"text": shakespeare_paragraphs(24)}).to_json(root / "data" / "train.jsonl")
    return ["--model_name_or_path", str(model), "--dataset_name", str(root / "data"), "--bf16", "false",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--max_length", "32", "--report_to", "none",
            "--disable_tqdm", "true", "--eval_strategy", "no"]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_an_sft_card_says_what_the_data_collator_did(packing, sft_flags, tmp_path):
    """TRL's SFT packs only with `--packing`: otherwise the card says each example was truncated and padded per batch,
    never that texts were packed into blocks."""
    pytest.importorskip("trl")
    from hf_lwsam.cli.sft import main

    out = tmp_path / "run"
    assert main([*sft_flags, "--output_dir", str(out), *(["--packing", "true"] if packing else [])]) == 0
    text = (out / "README.md").read_text(encoding="utf-8")
    if packing:
        assert "- Sequences: examples packed into sequences of 32 tokens (TRL packing, `bfd`)" in text
    else:
        assert ("- Sequences: each example truncated to its first 32 tokens, each batch padded to its longest example "
                "(no packing); loss on every token\n") in text
        assert "packed" not in text


# ------------------------------------------------------------------ the adapter names the card's base model
def test_the_adapter_of_a_hub_model_loaded_from_a_local_copy_names_the_hub_id(tmp_path):
    """The offline default loads the shipped copy of all-MiniLM-L6-v2: its LoRA adapter's `base_model_name_or_path`
    is the Hub id that the card's `base_model` names, not the copy's path; a user's local model keeps its path."""
    out = tmp_path / "default-lora"
    code, _, stderr = run_cli(["--max_train_samples", "32", "--max_eval_samples", "32", "--max_length", "16",
                               "--use_lora", "--output_dir", out, "--disable_tqdm", "true",
                               "--measure_plain_steps", "0"])
    assert code == 0, stderr
    adapter = json.loads((out / "adapter_config.json").read_text())
    card = ModelCard.load(out / "README.md").data.to_dict()
    assert adapter["base_model_name_or_path"] == card["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"

    model_dir = make_tiny_bert_dir(tmp_path / "tiny-bert")
    write_tweet_csvs(tmp_path / "tweets", n_train=16, n_validation=16)
    out = tmp_path / "local-lora"
    code, _, stderr = run_cli(["--model_name_or_path", model_dir, "--dataset_name", tmp_path / "tweets",
                               "--label_column", "sentiment", "--max_length", "16", "--use_lora", "--output_dir", out,
                               *FAST])
    assert code == 0, stderr
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)


def test_the_example_card_is_what_the_template_writes_for_its_own_options():
    """`model_cards/example-hf-lwsam-sft.md` has the template's sections and one row per `sam_*` option, and names
    the mode its own option table gives (`sam_mode`), as a card written now would."""
    from hf_lwsam.modes import preset_options

    text = (REPO / "model_cards" / "example-hf-lwsam-sft.md").read_text(encoding="utf-8")
    template = TEMPLATE_PATH.read_text(encoding="utf-8")
    sections = [line.split(":")[0] for line in template.splitlines() if line.startswith("## ")]
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("## ")] == sections
    rows = dict(line.strip("| ").replace("`", "").split(" | ")
                for line in text.splitlines() if line.startswith("| `sam_"))
    assert list(rows) == [option["name"] for option in sam_option_docs()]
    given = {"sam_ascent": rows["sam_ascent"], "sam_selection": rows["sam_selection"],
             "sam_start": float(rows["sam_start"]), "sam_interval": int(rows["sam_interval"])}
    mode = sam_mode(preset_options(None if rows["sam_preset"] == "None" else rows["sam_preset"], **given))
    assert f"## Sharpness-aware minimization: {mode}\n" in text and f"minimization, {mode}" in text
    assert "packed" not in text  # the offline default SFT does not pack
