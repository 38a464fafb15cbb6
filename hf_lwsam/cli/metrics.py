"""Evaluation metrics through `evaluate`, always from the copies shipped in `hf_lwsam/metrics/<name>/<name>.py` (the
same code as the Hub's `accuracy` and `f1` modules): no metric code is downloaded and run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import evaluate
import numpy as np

LOCAL_METRICS = Path(__file__).resolve().parent.parent / "metrics"


def load_metric(name: str) -> evaluate.EvaluationModule:
    """`evaluate.load` of the shipped copy of the metric `name` (`accuracy` or `f1`)."""
    return evaluate.load(str(LOCAL_METRICS / name / f"{name}.py"))


def describe_metrics(names: list[str]) -> str:
    """A sentence naming the metrics and where their code comes from (for the model card and the summary)."""
    return f"the `evaluate` modules shipped in hf_lwsam/metrics ({', '.join(sorted(names))})"


def classification_metrics() -> tuple[Callable[[Any], dict[str, float]], list[str]]:
    """`compute_metrics` for the Trainer: accuracy and macro-F1 of the argmax predictions; and the metrics' names."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        return {
            **accuracy.compute(predictions=predictions, references=labels),
            "f1": f1.compute(predictions=predictions, references=labels, average="macro")["f1"],
        }

    return compute, ["accuracy", "f1"]


def causal_lm_metrics() -> tuple[Callable[[Any], dict[str, float]], Callable[..., Any], list[str]]:
    """`compute_metrics` and `preprocess_logits_for_metrics` for causal LM: next-token accuracy (as `run_clm.py`);
    perplexity is `exp(eval_loss)`, added by `add_perplexity`; and the metrics' names."""
    accuracy = load_metric("accuracy")

    def preprocess(logits: Any, labels: Any) -> Any:
        logits = logits[0] if isinstance(logits, tuple) else logits
        return logits.argmax(dim=-1)

    def compute(eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        predictions, labels = predictions[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
        keep = labels != -100
        return accuracy.compute(predictions=predictions[keep], references=labels[keep])

    return compute, preprocess, ["accuracy"]


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    """`{prefix}_perplexity = exp({prefix}_loss)` (inf on overflow), in place."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        try:
            metrics[f"{prefix}_perplexity"] = math.exp(loss)
        except OverflowError:
            metrics[f"{prefix}_perplexity"] = float("inf")
    return metrics
