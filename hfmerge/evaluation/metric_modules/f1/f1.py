"""F1: the harmonic mean of precision and recall.

A local `evaluate` module shipped with hfmerge (works offline). Same interface as the Hub's
`f1` module (which wraps scikit-learn): ``compute(predictions, references, labels=None,
pos_label=1, average="binary", sample_weight=None)`` returns ``{"f1": float}``; computed here
with numpy so scikit-learn is not needed.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 = 2 * (precision * recall) / (precision + recall). A class with no predicted and no true
examples contributes an F1 of 0 (scikit-learn's zero_division=0 behaviour, with no warning).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    labels (`list` of `int`): The labels to include when `average` is not "binary". Defaults to
        every label seen in predictions or references.
    pos_label (`int`): The positive class when `average="binary"`. Defaults to 1.
    average (`str`): "binary" (default; only two classes allowed), "micro", "macro" or "weighted".
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    f1 (`float`): In [0, 1].

Examples:
    >>> f1 = evaluate.load("hfmerge/evaluation/metric_modules/f1")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
"""

_CITATION = ""


def _counts(pred, ref, weights, label):
    """Weighted true positives, false positives and false negatives of one class."""
    tp = float(np.sum(weights * ((pred == label) & (ref == label))))
    fp = float(np.sum(weights * ((pred == label) & (ref != label))))
    fn = float(np.sum(weights * ((pred != label) & (ref == label))))
    return tp, fp, fn


def _f1(tp, fp, fn):
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator > 0 else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/f1"],
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        weights = np.ones(len(pred)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        seen = sorted(set(pred.tolist()) | set(ref.tolist()))
        if average == "binary":
            if len(seen) > 2:
                raise ValueError(f"average='binary' needs at most two classes, got labels {seen}; use average='macro', 'micro' or 'weighted'")
            return {"f1": _f1(*_counts(pred, ref, weights, pos_label))}
        classes = list(labels) if labels is not None else seen
        counts = [_counts(pred, ref, weights, c) for c in classes]
        if average == "micro":
            return {"f1": _f1(*(sum(c[i] for c in counts) for i in range(3)))}
        if average == "macro":
            return {"f1": float(np.mean([_f1(*c) for c in counts])) if counts else 0.0}
        if average == "weighted":
            support = [tp + fn for tp, _, fn in counts]
            total = sum(support)
            return {"f1": float(sum(_f1(*c) * s for c, s in zip(counts, support)) / total) if total > 0 else 0.0}
        raise ValueError(f"average={average!r} is not supported; expected 'binary', 'micro', 'macro' or 'weighted'")
