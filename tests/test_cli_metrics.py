"""The `evaluate` metric modules shipped for offline use: loaded through `evaluate.load(<path>)` and checked against
counts done by hand."""

from __future__ import annotations

import pytest

from hf_lwsam.cli.metrics import LOCAL_METRICS, add_perplexity, load_metric

REFERENCES = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
PREDICTIONS = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]


def test_offline_load_uses_the_shipped_modules():
    for name in ("accuracy", "f1"):
        metric, source = load_metric(name)
        assert source == "local" and metric.name == name
        assert (LOCAL_METRICS / name / f"{name}.py").is_file()


def test_accuracy_and_f1_match_hand_counts():
    accuracy, _ = load_metric("accuracy")
    f1, _ = load_metric("f1")
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES) == {"accuracy": 0.7}
    assert accuracy.compute(predictions=PREDICTIONS, references=REFERENCES, normalize=False) == {"accuracy": 7}
    # Per class (tp, predicted, actual): 0: (2, 3, 3), 1: (2, 3, 3), 2: (3, 4, 4) -> F1 = 2tp / (predicted + actual).
    per_class = [4 / 6, 4 / 6, 6 / 8]
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="macro")["f1"] == pytest.approx(
        sum(per_class) / 3)
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="micro")["f1"] == pytest.approx(0.7)
    assert f1.compute(predictions=PREDICTIONS, references=REFERENCES, average="weighted")["f1"] == pytest.approx(
        (3 * per_class[0] + 3 * per_class[1] + 4 * per_class[2]) / 10)
    assert list(f1.compute(predictions=PREDICTIONS, references=REFERENCES, average=None)["f1"]) == pytest.approx(
        per_class)
    # Binary: positive class 1 of [1, 0, 1, 1] vs [1, 1, 0, 1]: tp 2, predicted 3, actual 3.
    assert f1.compute(predictions=[1, 0, 1, 1], references=[1, 1, 0, 1])["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="average='macro'"):
        f1.compute(predictions=PREDICTIONS, references=REFERENCES)  # three classes, binary default


def test_perplexity_is_exp_of_the_loss():
    assert add_perplexity({"eval_loss": 2.0})["eval_perplexity"] == pytest.approx(7.38905609893065)
    assert add_perplexity({"test_loss": 1e6}, prefix="test")["test_perplexity"] == float("inf")
