"""Validation and test tasks, rank-classification and generation scoring, metrics and model evaluation.

    tasks/             the recipe's ``tasks:`` (lm-evaluation-harness keys, ``include:``), data loading, templates
    scoring.py         batched rank classification (encoder-decoder and decoder-only) + naive reference
    generation.py      batched greedy generation (output_type: generate_until)
    metrics.py         metrics through `evaluate`, from modules shipped in ``metric_modules/`` (offline)
    evaluate_model.py  `evaluate_model` / `TaskEvaluator` -> `EvalReport` (table, JSON, model-index)
    cli.py             ``hfmerge eval``

Importing this package does not import torch, transformers, datasets or evaluate; the names
below are loaded on first use. The function `evaluate_model` is imported from its module
(``from hfmerge.evaluation.evaluate_model import evaluate_model``): the package attribute of
that name is the submodule.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TaskError": "..errors", "TaskSpec": "tasks", "TaskData": "tasks", "Example": "tasks", "parse_tasks": "tasks",
    "load_task_data": "tasks", "load_tasks_file": "tasks", "match_tasks_to_models": "tasks",
    "MetricError": "..errors", "MetricSpec": "metrics", "load_metric": "metrics", "compute_metric": "metrics",
    "compute_generation_metric": "metrics", "parse_number": "metrics",
    "generate_texts": "generation", "generate_encoded": "generation", "encode_prompts": "generation",
    "postprocess_generation": "generation",
    "OptionScores": "scoring", "score_options": "scoring", "score_options_naive": "scoring", "encode_examples": "scoring",
    "score_encoded": "scoring",
    "EvaluationError": "..errors", "EvalReport": "evaluate_model", "TaskResult": "evaluate_model",
    "TaskEvaluator": "evaluate_model", "load_model_for_eval": "evaluate_model",
    "prepare_tasks": "evaluate_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]  # a submodule, or "..errors" for the exception classes
        return getattr(importlib.import_module(module if module.startswith(".") else f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
