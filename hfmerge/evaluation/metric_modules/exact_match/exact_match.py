"""Exact match: the fraction of predicted texts equal to their reference text.

A local `evaluate` module shipped with hfmerge (works offline). Same interface as the Hub's
`exact_match` module (and so lm-evaluation-harness's ``exact_match`` metric and its keyword
arguments): ``compute(predictions, references, regexes_to_ignore=None, ignore_case=False,
ignore_punctuation=False, ignore_numbers=False)`` returns ``{"exact_match": float}`` in [0, 1].
"""

import re
import string

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
A prediction scores 1 when it is the same string as its reference, else 0; the result is the
mean. Optional normalisations are applied to both sides first, in this order: removing every
match of each regex in `regexes_to_ignore`, lower-casing, removing punctuation, removing digits.
Whitespace is compared as is (hfmerge strips generated answers before they get here).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): Predicted texts.
    references (`list` of `str`): Reference texts.
    regexes_to_ignore (`list` of `str`): Regular expressions whose matches are removed from both
        texts before comparing. Defaults to None.
    ignore_case (`bool`): Compare lower-cased texts. Defaults to False.
    ignore_punctuation (`bool`): Remove the characters of `string.punctuation` first. Defaults to False.
    ignore_numbers (`bool`): Remove the digits 0-9 first. Defaults to False.

Returns:
    exact_match (`float`): In [0, 1]; 0.0 for no examples.

Examples:
    >>> exact_match = evaluate.load("hfmerge/evaluation/metric_modules/exact_match")
    >>> exact_match.compute(references=["yes", "no", "Yes."], predictions=["yes", "yes", "yes"], ignore_case=True, ignore_punctuation=True)
    {'exact_match': 0.6666666666666666}
"""

_CITATION = ""

_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NO_DIGITS = str.maketrans("", "", string.digits)


def _normalise(text, regexes, ignore_case, ignore_punctuation, ignore_numbers):
    for pattern in regexes:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_NO_PUNCTUATION)
    if ignore_numbers:
        text = text.translate(_NO_DIGITS)
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/exact_match"],
        )

    def _compute(self, predictions, references, regexes_to_ignore=None, ignore_case=False, ignore_punctuation=False, ignore_numbers=False):
        if isinstance(regexes_to_ignore, str):
            regexes_to_ignore = [regexes_to_ignore]
        regexes = list(regexes_to_ignore or [])
        matches = [
            _normalise(p, regexes, ignore_case, ignore_punctuation, ignore_numbers)
            == _normalise(r, regexes, ignore_case, ignore_punctuation, ignore_numbers)
            for p, r in zip(predictions, references)
        ]
        return {"exact_match": float(np.mean(matches)) if matches else 0.0}
