"""Spearman rank correlation (the GLUE STS-B metric, with Pearson).

A local `evaluate` module shipped with hfmerge (works offline). Same interface as the Hub's
`spearmanr` module: ``compute(predictions, references, return_pvalue=False)`` returns
``{"spearmanr": float}`` (plus ``"spearmanr_pvalue"`` when asked).
"""

import datasets
import evaluate
from scipy.stats import spearmanr

_DESCRIPTION = """
The Spearman rank-order correlation coefficient is the Pearson correlation of the ranks of two
samples, from -1 through 0 (no monotonic relation) to +1. NaN when either input is constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted values (for rank classification: the chosen
        option's numeric value, or its index when the options are not numbers).
    references (`list` of `float`): Ground truth values.
    return_pvalue (`bool`): Also return the p-value. Defaults to False.

Returns:
    spearmanr (`float`): In [-1, 1].
    spearmanr_pvalue (`float`): Only when return_pvalue is True.

Examples:
    >>> spearmanr = evaluate.load("hfmerge/evaluation/metric_modules/spearmanr")
    >>> spearmanr.compute(references=[1, 2, 3, 4, 5], predictions=[10, 9, 2.5, 6, 4])
    {'spearmanr': -0.7}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearmanr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        if len(set(predictions)) < 2 or len(set(references)) < 2:
            # scipy warns and returns NaN for a constant input (e.g. a model that answers the
            # same number every time); say NaN without the warning.
            return {"spearmanr": float("nan"), **({"spearmanr_pvalue": float("nan")} if return_pvalue else {})}
        result = spearmanr(references, predictions)
        if return_pvalue:
            return {"spearmanr": float(result[0]), "spearmanr_pvalue": float(result[1])}
        return {"spearmanr": float(result[0])}
