"""Metrics of a task, computed with `evaluate` from modules shipped inside the package.

`evaluate.load("accuracy")` fetches the metric's script from the Hub and fails offline, so the
metrics hfmerge's recipes use are shipped as local `evaluate` modules under
``metric_modules/<name>/<name>.py`` and loaded by path. Their inputs and outputs match the Hub
modules of the same name. Any other name is passed to `evaluate.load` as is (a Hub metric
needs the network; a folder path is a local module of your own).

lm-evaluation-harness's multiple-choice metric names are accepted as aliases: ``acc`` and
``acc_norm`` (accuracy; ``acc_norm`` compares option log-likelihoods divided by the option's
length in characters, as the harness does), ``mcc`` (Matthews correlation).

Rank classification (`compute_metric`) gives each metric option indices; correlations get
the options' numbers and ``exact_match`` the options' texts. Greedy generation
(`compute_generation_metric`) gives each metric the generated and reference texts;
correlations get the numbers parsed from them (`parse_number`; a generated text that is not a
number counts as `NUMBER_FALLBACK`, 0.0, as in FusionBench).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MetricError

__all__ = ["MetricSpec", "LOCAL_METRICS", "METRIC_ALIASES", "NUMBER_FALLBACK", "resolve_metric", "load_metric",
           "compute_metric", "compute_generation_metric", "parse_number", "metric_module_path"]

MODULES_DIR = Path(__file__).parent / "metric_modules"
LOCAL_METRICS = ("accuracy", "f1", "matthews_correlation", "spearmanr", "pearsonr", "exact_match")
# name as written -> (local module, normalization it forces or None)
METRIC_ALIASES: dict[str, tuple[str, str | None]] = {
    "acc": ("accuracy", None),
    "acc_norm": ("accuracy", "char"),
    "mcc": ("matthews_correlation", None),
    "matthews_corrcoef": ("matthews_correlation", None),
    "pearson": ("pearsonr", None),
    "spearman": ("spearmanr", None),
}
# These compare values, not classes: a prediction is the chosen option's number when every
# option is a number (STS-B's "0.0" ... "5.0"), else the option's index.
VALUE_METRICS = ("spearmanr", "pearsonr")
# These compare class indices: they need options to choose from (rank classification).
INDEX_METRICS = ("accuracy", "f1", "matthews_correlation")
# These compare texts: the chosen option's (rank classification) or the generated one.
TEXT_METRICS = ("exact_match",)
# What a generated text that is not a number counts as, for correlation metrics: FusionBench's
# choice (its STS-B evaluation parses the generated text with float() and falls back to 0.0).
NUMBER_FALLBACK = 0.0


@dataclass(frozen=True)
class MetricSpec:
    """One entry of a task's ``metric_list``.

    Attributes:
        name: The name as written (the key of the figure in reports).
        module: A local module name (one of `LOCAL_METRICS`), an absolute folder path of a
            module, or an `evaluate` Hub id.
        kwargs: Extra arguments for ``compute`` (e.g. ``average: macro`` for f1).
        normalization: A score normalisation this metric forces (``acc_norm``: ``char``), or
            None for the task's own.
    """

    name: str
    module: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    normalization: str | None = None

    @property
    def is_local(self) -> bool:
        """Shipped with hfmerge (works offline)."""
        return self.module in LOCAL_METRICS

    @property
    def uses_values(self) -> bool:
        """A correlation metric, fed option values rather than option indices."""
        return Path(self.module).name in VALUE_METRICS

    @property
    def uses_indices(self) -> bool:
        """A class metric, fed option indices (rank classification only)."""
        return self.module in INDEX_METRICS or self.normalization is not None

    @property
    def uses_text(self) -> bool:
        """A text metric (exact_match), fed the chosen option's text in rank classification."""
        return self.module in TEXT_METRICS

    @property
    def result_key(self) -> str:
        """The key of the module's result that is this metric's figure."""
        return Path(self.module).name


def metric_module_path(name: str) -> Path:
    """The folder of a shipped metric module (what `evaluate.load` is given)."""
    return MODULES_DIR / name


def resolve_metric(name: str, kwargs: Mapping[str, Any] | None = None, *, base_dir: Path | None = None) -> MetricSpec:
    """Map a metric name as written in a task to the module that computes it.

    Args:
        name: A shipped metric, a harness alias (acc, acc_norm, mcc), a folder holding an
            `evaluate` module (relative to `base_dir`), or an `evaluate` Hub id.
        kwargs: Extra ``compute`` arguments.
        base_dir: Folder relative module paths are resolved against.

    Returns:
        The metric's spec (nothing is loaded).

    Raises:
        ValueError: An empty name, or a path that is not a folder with a module script.
    """
    kwargs = dict(kwargs or {})
    if not name.strip():
        raise ValueError("got an empty metric name")
    if name in LOCAL_METRICS:
        return MetricSpec(name, name, kwargs)
    if name in METRIC_ALIASES:
        module, normalization = METRIC_ALIASES[name]
        return MetricSpec(name, module, kwargs, normalization)
    if "/" in name or name.startswith(".") or name.endswith(".py"):
        folder = Path(name).expanduser()
        if not folder.is_absolute() and base_dir is not None:
            folder = base_dir / folder
        if folder.is_dir() and (folder / f"{folder.name}.py").is_file():
            return MetricSpec(name, str(folder.resolve()), kwargs)
        if folder.suffix == ".py" and folder.is_file():
            return MetricSpec(name, str(folder.resolve()), kwargs)
        if name.startswith((".", "/", "~")) or folder.exists():
            raise ValueError(f"{name!r} is not an evaluate module: expected a folder <name>/ holding <name>.py (resolved to {folder})")
    # An evaluate Hub id such as "bleu" or "org/metric": loaded (with the network) before any model.
    return MetricSpec(name, name, kwargs)


_LOADED: dict[str, Any] = {}


def load_metric(spec: MetricSpec):
    """Load the `evaluate` module of a metric (cached per process).

    Args:
        spec: The metric.

    Returns:
        The `evaluate.EvaluationModule`.

    Raises:
        MetricError: The module cannot be loaded (for a Hub metric: usually no network).
    """
    import evaluate

    target = str(metric_module_path(spec.module)) if spec.is_local else spec.module
    if target not in _LOADED:
        try:
            # keep_in_memory: predictions are not written to an Arrow cache file on disk.
            _LOADED[target] = evaluate.load(target, keep_in_memory=True)
        except Exception as exc:  # noqa: BLE001 - evaluate raises many kinds
            shipped = ", ".join(LOCAL_METRICS + tuple(METRIC_ALIASES))
            raise MetricError(f"metric {spec.name!r} could not be loaded ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                              f"metrics that work offline: {shipped}; other names are fetched from the Hub by evaluate") from None
    return _LOADED[target]


def _as_value(option: str, index: int, numeric: bool) -> float:
    return float(option) if numeric else float(index)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def compute_metric(spec: MetricSpec, predictions: Sequence[int], references: Sequence[int],
                   options: Sequence[Sequence[str]] | None = None) -> float:
    """Compute one metric from predicted and true option indices.

    Args:
        spec: The metric.
        predictions: Per example, the index of the chosen option.
        references: Per example, the index of the right option.
        options: Per example, the options' texts; correlation metrics use the options' numeric
            values when every option is a number.

    Returns:
        The metric's figure.

    Raises:
        MetricError: The module failed (e.g. binary f1 on three classes) or gave no figure.
    """
    module = load_metric(spec)
    if spec.uses_values:
        numeric = options is not None and all(_is_number(o) for opts in options for o in opts)
        preds: list = [_as_value(options[i][p] if options else "", p, numeric) for i, p in enumerate(predictions)]
        refs: list = [_as_value(options[i][r] if options else "", r, numeric) for i, r in enumerate(references)]
    elif spec.uses_text and options is not None:
        preds = [options[i][p] for i, p in enumerate(predictions)]
        refs = [options[i][r] for i, r in enumerate(references)]
    else:
        preds, refs = [int(p) for p in predictions], [int(r) for r in references]
    return _run(spec, module, preds, refs)


def parse_number(text: str) -> float | None:
    """The number a generated text states, or None.

    The whole text, stripped, must be a number as Python's `float` reads it ("3.8", "4",
    "-0.5", "1e-1"); infinities and NaN do not count. This is FusionBench's rule for STS-B,
    which parses the decoded answer with `float()`; "3.8 out of 5" is not a number.

    Args:
        text: A generated answer (or a reference).

    Returns:
        The number, or None when the text is not one.
    """
    try:
        value = float(text.strip())
    except (ValueError, AttributeError):
        return None
    return value if math.isfinite(value) else None


def compute_generation_metric(spec: MetricSpec, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Compute one metric from generated answers and reference answers.

    Args:
        spec: The metric (not a class metric such as accuracy; tasks are checked for that).
        predictions: Per example, the generated answer (cut at the first stop string, stripped).
        references: Per example, the reference answer.

    Returns:
        The metric's figure. Correlation metrics (spearmanr, pearsonr) compare the numbers the
        texts state (`parse_number`); a generated text that is not a number counts as
        `NUMBER_FALLBACK` (0.0). Other metrics get the texts (exact_match compares them as
        they are, or with its ignore_case / ignore_punctuation / ignore_numbers /
        regexes_to_ignore options).

    Raises:
        MetricError: A class metric, a reference that is not a number for a correlation, or the
            module failed.
    """
    if spec.uses_indices:
        raise MetricError(f"metric {spec.name!r} compares option indices (rank classification); use exact_match for generated text")
    module = load_metric(spec)
    if spec.uses_values:
        refs: list = []
        for r in references:
            value = parse_number(r)
            if value is None:
                raise MetricError(f"metric {spec.name!r}: the reference {r!r} is not a number")
            refs.append(value)
        parsed = [parse_number(p) for p in predictions]
        preds: list = [NUMBER_FALLBACK if v is None else v for v in parsed]
    else:
        preds, refs = [str(p) for p in predictions], [str(r) for r in references]
    return _run(spec, module, preds, refs)


def _run(spec: MetricSpec, module: Any, preds: list, refs: list) -> float:
    try:
        result = module.compute(predictions=preds, references=refs, **dict(spec.kwargs))
    except Exception as exc:  # noqa: BLE001
        raise MetricError(f"metric {spec.name!r} failed: {type(exc).__name__}: {exc}") from None
    if not result:
        raise MetricError(f"metric {spec.name!r} returned no result")
    value = result.get(spec.result_key, next(iter(result.values())))
    return float(value)
