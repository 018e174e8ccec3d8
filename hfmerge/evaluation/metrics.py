"""Metrics of a task, computed with `evaluate` from modules shipped inside the package.

`evaluate.load("accuracy")` fetches the metric's script from the Hub and fails offline, so the
metrics hfmerge's recipes use are shipped as local `evaluate` modules under
``metric_modules/<name>/<name>.py`` and loaded by path. Their inputs and outputs match the Hub
modules of the same name. Any other name is passed to `evaluate.load` as is (a Hub metric
needs the network; a folder path is a local module of your own).

lm-evaluation-harness's multiple-choice metric names are accepted as aliases: ``acc`` and
``acc_norm`` (accuracy; ``acc_norm`` compares option log-likelihoods divided by the option's
length in characters, as the harness does), ``mcc`` (Matthews correlation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError

__all__ = ["MetricError", "MetricSpec", "LOCAL_METRICS", "METRIC_ALIASES", "resolve_metric", "load_metric", "compute_metric",
           "metric_module_path"]

MODULES_DIR = Path(__file__).parent / "metric_modules"
LOCAL_METRICS = ("accuracy", "f1", "matthews_correlation", "spearmanr", "pearsonr")
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


class MetricError(RecipeError):
    """A task's metric cannot be loaded or computed."""


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
    else:
        preds, refs = [int(p) for p in predictions], [int(r) for r in references]
    try:
        result = module.compute(predictions=preds, references=refs, **dict(spec.kwargs))
    except Exception as exc:  # noqa: BLE001
        raise MetricError(f"metric {spec.name!r} failed: {type(exc).__name__}: {exc}") from None
    if not result:
        raise MetricError(f"metric {spec.name!r} returned no result")
    value = result.get(spec.result_key, next(iter(result.values())))
    return float(value)
