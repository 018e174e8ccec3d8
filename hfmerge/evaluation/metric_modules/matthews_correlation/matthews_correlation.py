"""Matthews correlation coefficient (the GLUE CoLA metric).

A local `evaluate` module shipped with hfmerge (works offline). Same interface as the Hub's
`matthews_correlation` module: ``compute(predictions, references, sample_weight=None)``
returns ``{"matthews_correlation": float}``; the multi-class generalisation (Gorodkin's R_K,
as scikit-learn computes it) is used, which is the usual MCC for two classes.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
The Matthews correlation coefficient measures the quality of binary and multi-class
classifications, from -1 (total disagreement) through 0 (chance) to +1 (perfect). It is 0
when predictions or references are constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground truth labels.
    sample_weight (`list` of `float`): Sample weights. Defaults to None.

Returns:
    matthews_correlation (`float`): In [-1, 1].

Examples:
    >>> mcc = evaluate.load("hfmerge/evaluation/metric_modules/matthews_correlation")
    >>> mcc.compute(references=[1, 3, 2, 0, 3, 2], predictions=[1, 2, 2, 0, 3, 3])
    {'matthews_correlation': 0.5384615384615384}
"""

_CITATION = """
@article{matthews1975comparison,
  title={Comparison of the predicted and observed secondary structure of T4 phage lysozyme},
  author={Matthews, Brian W}, journal={Biochimica et Biophysica Acta (BBA) - Protein Structure},
  volume={405}, number={2}, pages={442--451}, year={1975}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            reference_urls=["https://en.wikipedia.org/wiki/Phi_coefficient"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        weights = np.ones(len(pred)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        classes = sorted(set(pred.tolist()) | set(ref.tolist()))
        index = {c: i for i, c in enumerate(classes)}
        confusion = np.zeros((len(classes), len(classes)))
        for p, r, w in zip(pred.tolist(), ref.tolist(), weights.tolist()):
            confusion[index[r], index[p]] += w
        true_per_class = confusion.sum(axis=1)
        pred_per_class = confusion.sum(axis=0)
        correct = np.trace(confusion)
        total = confusion.sum()
        cov_ytyp = correct * total - np.dot(true_per_class, pred_per_class)
        cov_ypyp = total**2 - np.dot(pred_per_class, pred_per_class)
        cov_ytyt = total**2 - np.dot(true_per_class, true_per_class)
        if cov_ypyp * cov_ytyt == 0:
            return {"matthews_correlation": 0.0}
        return {"matthews_correlation": float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))}
