"""F1: the harmonic mean of precision and recall, 2 * P * R / (P + R).

An offline copy of the `evaluate` Hub metric `f1` (same name, inputs, options and output), in numpy instead of
scikit-learn, so that `evaluate.load(<this file>)` works without the Hub.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "F1 = 2 * (precision * recall) / (precision + recall), per class and averaged."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): ground-truth labels.
    labels (`list[int]`, *optional*): the labels to include (defaults to every label seen in either input).
    pos_label (`int`, defaults to 1): the positive class for `average="binary"`.
    average (`str` or `None`, defaults to `"binary"`): `"binary"`, `"micro"`, `"macro"`, `"weighted"`, or `None`
        for per-class scores.
    sample_weight (`list[float]`, *optional*): per-example weights.
Returns:
    f1 (`float` or `numpy.ndarray`): in [0, 1]; an array of per-class scores when `average=None`.
Examples:
    >>> metric = evaluate.load("hf_lwsam/metrics/f1")
    >>> metric.compute(predictions=[0, 2, 1, 0], references=[0, 1, 2, 0], average="macro")
    {'f1': 0.3333333333333333}
"""
_CITATION = """@article{scikit-learn, title={Scikit-learn: Machine Learning in {P}ython},
author={Pedregosa, F. and others}, journal={Journal of Machine Learning Research},
volume={12}, pages={2825--2830}, year={2011}}"""

_AVERAGES = ("binary", "micro", "macro", "weighted", None)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator with 0 where the denominator is 0 (scikit-learn with zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator != 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/f1"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in _AVERAGES:
            raise ValueError(f"average={average!r} is unknown: use one of {_AVERAGES}.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        weights = np.ones(len(references)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        present = np.union1d(np.unique(predictions), np.unique(references))
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs two classes but the inputs have {len(present)}: pass average='macro', "
                    "'micro' or 'weighted'."
                )
            labels = [pos_label]
        elif labels is None:
            labels = present
        labels = np.asarray(labels)
        tp = np.array([weights[(predictions == c) & (references == c)].sum() for c in labels], dtype=np.float64)
        predicted = np.array([weights[predictions == c].sum() for c in labels], dtype=np.float64)
        actual = np.array([weights[references == c].sum() for c in labels], dtype=np.float64)
        if average == "micro":
            f1 = _safe_divide(2 * tp.sum(keepdims=True), predicted.sum(keepdims=True) + actual.sum(keepdims=True))
            return {"f1": float(f1[0])}
        per_class = _safe_divide(2 * tp, predicted + actual)
        if average is None:
            return {"f1": per_class}
        if average == "weighted":
            return {"f1": float((per_class * actual).sum() / actual.sum()) if actual.sum() > 0 else 0.0}
        return {"f1": float(per_class.mean())}  # macro, and binary (one label)
