"""hfmerge: merge fine-tuned checkpoints of one pre-trained model and publish them with provenance.

    import hfmerge

    result = hfmerge.merge("recipe.yaml", hfmerge.RunOptions(output="merged"))

The public API (documented in docs/python-api.md) is imported on first use, so that
``import hfmerge`` and ``hfmerge --help`` stay light: torch, transformers and the Hub client
load only when a function that needs them runs.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "SearchResult": "search",
    "MergeResult": "merge", "MergePlan": "plan", "EvalReport": "evaluation.evaluate_model", "FisherRecord": "fisher.engine",
    "push": "publish", "PublishResult": "publish",
}

if TYPE_CHECKING:
    from .api import compute_fishers, evaluate, merge, plan, plan_summary, search
    from .evaluation.evaluate_model import EvalReport
    from .fisher.engine import FisherRecord
    from .merge import MergeResult
    from .options import RunOptions
    from .plan import MergePlan
    from .publish import PublishResult, push
    from .search import SearchResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`hfmerge.merge`, `hfmerge.plan` and `hfmerge.search` are the API functions, although
    modules of the same names exist (``hfmerge/merge.py``, ...): the import system would
    replace the functions by the modules when those are first imported, so such assignments
    are not made. The modules stay reachable by import statements (``from hfmerge.merge
    import ...``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "__version__", "RunOptions", "merge", "plan", "plan_summary", "evaluate", "compute_fishers", "search", "push",
    "MergeResult", "MergePlan", "EvalReport", "FisherRecord", "SearchResult", "PublishResult", "errors",
    "HfMergeError", "RecipeError", "OptionError", "TaskError", "CheckpointError", "IncompatibleCheckpointsError", "FisherError",
    "EvaluationError", "SearchError", "OutputExistsError", "OutputIsInputError", "OutputWriteError", "HubAccessError",
    "IncompleteOutputError", "PublishError",
]
