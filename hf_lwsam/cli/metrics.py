"""Evaluation metrics through `evaluate`: the Hub modules when the Hub is reachable, else the copies shipped in
`hf_lwsam/metrics/<name>/<name>.py`."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import evaluate
import numpy as np

LOCAL_METRICS = Path(__file__).resolve().parent.parent / "metrics"


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_EVALUATE_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def load_metric(name: str) -> tuple[evaluate.EvaluationModule, str]:
    """`evaluate.load(name)` from the Hub, or the shipped module when offline or the Hub load fails.

    Returns the module and its source: `"hub"` or `"local"`.
    """
    if not _offline():
        try:
            return evaluate.load(name), "hub"
        except Exception:  # unreachable Hub, rate limit, ...: the local copy computes the same metric
            pass
    return evaluate.load(str(LOCAL_METRICS / name / f"{name}.py")), "local"


def describe_sources(sources: dict[str, str]) -> str:
    """A sentence naming where each metric module came from."""
    hub = sorted(n for n, s in sources.items() if s == "hub")
    local = sorted(n for n, s in sources.items() if s == "local")
    parts = []
    if hub:
        parts.append(f"`evaluate` Hub modules ({', '.join(hub)})")
    if local:
        parts.append(f"the `evaluate` modules shipped in hf_lwsam/metrics ({', '.join(local)}; the Hub was offline)")
    return " and ".join(parts) or "no `evaluate` metrics"


def classification_metrics() -> tuple[Callable[[Any], dict[str, float]], dict[str, str]]:
    """`compute_metrics` for the Trainer: accuracy and macro-F1 of the argmax predictions."""
    accuracy, accuracy_source = load_metric("accuracy")
    f1, f1_source = load_metric("f1")

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        return {
            **accuracy.compute(predictions=predictions, references=labels),
            "f1": f1.compute(predictions=predictions, references=labels, average="macro")["f1"],
        }

    return compute, {"accuracy": accuracy_source, "f1": f1_source}


def causal_lm_metrics() -> tuple[Callable[[Any], dict[str, float]], Callable[..., Any], dict[str, str]]:
    """`compute_metrics` and `preprocess_logits_for_metrics` for causal LM: next-token accuracy (as `run_clm.py`);
    perplexity is `exp(eval_loss)`, added by `add_perplexity`."""
    accuracy, source = load_metric("accuracy")

    def preprocess(logits: Any, labels: Any) -> Any:
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)

    def compute(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        predictions, labels = predictions[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    return compute, preprocess, {"accuracy": source}


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_perplexity = exp({prefix}_loss)` (inf on overflow), in place."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        try:
            metrics[f"{prefix}_perplexity"] = math.exp(loss)
        except OverflowError:
            metrics[f"{prefix}_perplexity"] = float("inf")
    return metrics
