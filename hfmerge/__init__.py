"""hfmerge: merge fine-tuned checkpoints of one pre-trained model and publish them with provenance.

    import hfmerge

    result = hfmerge.merge("recipe.yaml", hfmerge.RunOptions(output="merged"))

The public API (documented in docs/python-api.md) is imported on first use, so that
``import hfmerge`` and ``hfmerge --help`` stay light: torch, transformers and the Hub client
load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import (
    CheckpointError, EvaluationError, FisherError, HfMergeError, HubAccessError, IncompatibleCheckpointsError, IncompleteOutputError,
    OptionError, OutputExistsError, OutputIsInputError, OutputWriteError, PublishError, RecipeError, SearchError, TaskError,
)

__version__ = "0.1.0"

# Public name → the module that defines it.
_LAZY = {
    "RunOptions": "options", "merge": "api", "plan": "api", "plan_summary": "api", "evaluate": "api", "compute_fishers": "api", "search": "api",
    "SearchResult": "searching",
    "MergeResult": "merging", "MergePlan": "planning", "EvalReport": "evaluation.evaluate_model", "FisherRecord": "fisher.engine",
    "push": "publish", "PublishResult": "publish",
}

if TYPE_CHECKING:
    from .api import compute_fishers, evaluate, merge, plan, plan_summary, search
    from .evaluation.evaluate_model import EvalReport
    from .fisher.engine import FisherRecord
    from .merging import MergeResult
    from .options import RunOptions
    from .planning import MergePlan
    from .publish import PublishResult, push
    from .searching import SearchResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__", "RunOptions", "merge", "plan", "plan_summary", "evaluate", "compute_fishers", "search", "push",
    "MergeResult", "MergePlan", "EvalReport", "FisherRecord", "SearchResult", "PublishResult", "errors",
    "HfMergeError", "RecipeError", "OptionError", "TaskError", "CheckpointError", "IncompatibleCheckpointsError", "FisherError",
    "EvaluationError", "SearchError", "OutputExistsError", "OutputIsInputError", "OutputWriteError", "HubAccessError",
    "IncompleteOutputError", "PublishError",
]
