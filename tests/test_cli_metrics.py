"""The `evaluate` metric modules shipped with the package, always the ones loaded (`evaluate.load(<path>)`), checked
against counts done by hand."""

from __future__ import annotations

import pytest

from hf_lwsam.cli.metrics import LOCAL_METRICS, add_perplexity, load_metric

REFERENCES = [0, 0, 0, 1, 1, 2, 2, 2, 2, 1]
PREDICTIONS = [0, 1, 0, 1, 2, 2, 2, 0, 2, 1]


def test_the_shipped_modules_are_used_even_when_the_hub_is_reachable(monkeypatch):
    """The shipped copies are always the ones loaded: no metric code is ever fetched from the Hub and run. The Hub
    boundary is faked: a load by name (the Hub route) is recorded and fails as an unreachable Hub would."""
    import evaluate
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "0")
    real_load, requested = evaluate.load, []

    def load(path, *args, **kwargs):
        requested.append(str(path))
        if not str(path).endswith(".py"):
            raise ConnectionError(f"would download {path!r} from the Hub")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(evaluate, "load", load)
    for name in ("accuracy", "f1"):
        assert load_metric(name).name == name
    assert requested == [str(LOCAL_METRICS / name / f"{name}.py") for name in ("accuracy", "f1")]


def test_accuracy_and_f1_match_hand_counts():
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")
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
