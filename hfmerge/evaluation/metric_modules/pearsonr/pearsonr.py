"""Pearson correlation coefficient (the GLUE STS-B metric, with Spearman).

A local `evaluate` module shipped with hfmerge (works offline). Same interface as the Hub's
`pearsonr` module: ``compute(predictions, references, return_pvalue=False)`` returns
``{"pearsonr": float}`` (plus ``"p-value"`` when asked).
"""

import datasets
import evaluate
from scipy.stats import pearsonr

_DESCRIPTION = """
The Pearson correlation coefficient measures the linear relation between two samples, from
-1 through 0 (no linear relation) to +1. NaN when either input is constant.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): Predicted values (for rank classification: the chosen
        option's numeric value, or its index when the options are not numbers).
    references (`list` of `float`): Ground truth values.
    return_pvalue (`bool`): Also return the two-sided p-value. Defaults to False.

Returns:
    pearsonr (`float`): In [-1, 1].
    p-value (`float`): Only when return_pvalue is True.

Examples:
    >>> pearsonr = evaluate.load("hfmerge/evaluation/metric_modules/pearsonr")
    >>> round(pearsonr.compute(references=[10, 9, 2.5, 6, 4], predictions=[1, 2, 3, 4, 5])["pearsonr"], 2)
    -0.74
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pearsonr(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"), "references": datasets.Value("float64")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.pearsonr.html"],
        )

    def _compute(self, predictions, references, return_pvalue=False):
        if len(set(predictions)) < 2 or len(set(references)) < 2:
            # scipy warns and returns NaN for a constant input; say NaN without the warning.
            return {"pearsonr": float("nan"), **({"p-value": float("nan")} if return_pvalue else {})}
        result = pearsonr(references, predictions)
        if return_pvalue:
            return {"pearsonr": float(result[0]), "p-value": float(result[1])}
        return {"pearsonr": float(result[0])}
