"""Accuracy: the fraction of predictions equal to their reference.

A local `evaluate` module shipped with hfmerge, so `evaluate.load(<this folder>)` works
offline (the Hub's `accuracy` script is fetched over the network). Inputs and outputs match
the Hub module's: ``compute(predictions, references, normalize=True, sample_weight=None)``
returns ``{"accuracy": float}``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels (for rank classification: the index of the best option).
    references (`list` of `int`): Ground truth labels.
    normalize (`bool`): If False, return the number of correct predictions instead of the fraction. Defaults to True.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    accuracy (`float` or `int`): In [0, 1] when normalize is True, else the (weighted) count.

Examples:
    >>> accuracy = evaluate.load("hfmerge/evaluation/metric_modules/accuracy")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = np.asarray(predictions) == np.asarray(references)
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        total = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": total}
        return {"accuracy": total / float(np.sum(weights)) if len(correct) else 0.0}
