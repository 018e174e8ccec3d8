"""Evaluate a model on a recipe's tasks: per-task metrics and their average.

Everything that can be wrong with the tasks (data, templates, labels, metrics) is checked
before the model is loaded. `TaskEvaluator` keeps the rendered and tokenised examples and the
loaded metrics, so a search that evaluates the same model object after each change of its
weights pays for them once.

A ``multiple_choice`` task is scored by rank classification (scoring.py), a ``generate_until``
task by greedy generation (generation.py); the report says which for each task.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..constants import FILE_BUILDERS, RECIPE_DTYPES, TORCH_DTYPE_NAMES
from ..errors import EvaluationError
from .generation import encode_prompts, generate_encoded
from .metrics import compute_generation_metric, compute_metric, load_metric, parse_number
from .lm import eos_id, is_encoder_decoder, max_positions
from .scoring import EncodedExample, OptionScores, encode_examples, score_encoded
from .tasks import TaskData, TaskSpec, load_task_data

__all__ = ["TaskResult", "EvalReport", "TaskEvaluator", "prepare_tasks", "load_model_for_eval", "evaluate_model"]

SPLITS = ("validation", "test")
logger = logging.getLogger(__name__)
# How each output type is named in model cards (model-index task type, metric name suffix).
TASK_TYPES = {"multiple_choice": "multiple-choice", "generate_until": "text-generation"}
SCORING = {"multiple_choice": "rank classification", "generate_until": "greedy generation"}


@dataclass
class TaskResult:
    """One task's figures.

    Attributes:
        task: The task's name.
        split: "validation" or "test".
        dataset_split: The dataset split the examples came from.
        num_examples: How many examples were scored.
        metrics: Figure per metric, keyed by the name as written in ``metric_list``.
        primary_metric: The first metric: the task's score, averaged across tasks.
        predictions: Per example, the index of the predicted option (multiple_choice) or the
            generated answer (generate_until).
        dataset_path, dataset_name: The data source (for model cards).
        metric_modules: Metric name as written -> the module's result key (for model cards).
        output_type: ``multiple_choice`` (rank classification) or ``generate_until`` (greedy
            generation).
    """

    task: str
    split: str
    dataset_split: str
    num_examples: int
    metrics: dict[str, float]
    primary_metric: str
    predictions: list[int] | list[str] = field(default_factory=list, repr=False)
    dataset_path: str = ""
    dataset_name: str | None = None
    metric_modules: dict[str, str] = field(default_factory=dict, repr=False)
    output_type: str = "multiple_choice"

    @property
    def score(self) -> float:
        """The primary metric's figure."""
        return self.metrics[self.primary_metric]


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # NaN / inf are not JSON


@dataclass
class EvalReport:
    """The figures of one model on a list of tasks.

    Attributes:
        model: What was evaluated (a folder, a repo id, or a description).
        split: "validation" or "test".
        results: One `TaskResult` per task, in the tasks' order.
        seconds: Wall time spent scoring.
    """

    model: str
    split: str
    results: list[TaskResult]
    seconds: float = 0.0

    @property
    def average(self) -> float:
        """The mean of the tasks' primary metrics (NaN if there are no tasks)."""
        if not self.results:
            return float("nan")
        return sum(r.score for r in self.results) / len(self.results)

    @property
    def search_score(self) -> float:
        """The mean of the tasks' primary metrics with an undefined (NaN) score counted as 0.0:
        the objective of a coefficient search. A correlation of constant answers (e.g. a merge
        that writes the same STS-B number for every pair) carries no information about the
        ranking, which is what a correlation of 0 says; as NaN it would void the whole trial
        although the other tasks were scored (NaN if there are no tasks)."""
        if not self.results:
            return float("nan")
        return sum(r.score if math.isfinite(r.score) else 0.0 for r in self.results) / len(self.results)

    @property
    def scores(self) -> dict[str, float]:
        """Task name -> primary metric."""
        return {r.task: r.score for r in self.results}

    def to_dict(self, *, predictions: bool = False) -> dict[str, Any]:
        """A JSON-friendly mapping (NaN becomes null).

        Args:
            predictions: Include each task's predicted option indices.
        """
        tasks = {}
        for r in self.results:
            entry: dict[str, Any] = {
                "split": r.split, "dataset_split": r.dataset_split, "output_type": r.output_type, "num_examples": r.num_examples,
                "primary_metric": r.primary_metric, "score": _json_number(r.score),
                "metrics": {k: _json_number(v) for k, v in r.metrics.items()},
            }
            if predictions:
                entry["predictions"] = r.predictions
            tasks[r.task] = entry
        return {"model": self.model, "split": self.split, "tasks": tasks, "average": _json_number(self.average),
                "seconds": round(self.seconds, 3)}

    def to_json(self, *, indent: int = 2, predictions: bool = False) -> str:
        """`to_dict` as a JSON document."""
        return json.dumps(self.to_dict(predictions=predictions), indent=indent) + "\n"

    def to_table(self, digits: int = 4) -> str:
        """A plain-text table: one row per task and metric, then the average. When a task was
        scored by generation, an ``output`` column says how each task was scored."""
        def fmt(v: float) -> str:
            return f"{v:.{digits}f}" if math.isfinite(v) else "nan"

        show_output = any(r.output_type != "multiple_choice" for r in self.results)
        rows = [("task", "split", "examples", "metric", "score")]
        for r in self.results:
            for j, (name, value) in enumerate(r.metrics.items()):
                rows.append((r.task if j == 0 else "", r.dataset_split if j == 0 else "", str(r.num_examples) if j == 0 else "", name, fmt(value)))
        rows.append(("average", "", "", self.results[0].primary_metric if len({r.primary_metric for r in self.results}) == 1 else "mixed", fmt(self.average))
                    if self.results else ("average", "", "", "", "nan"))
        if show_output:
            column = ["output"] + [r.output_type if j == 0 else "" for r in self.results for j in range(len(r.metrics))] + [""]
            rows = [row[:2] + (out,) + row[2:] for row, out in zip(rows, column)]
        width = len(rows[0])
        widths = [max(len(row[c]) for row in rows) for c in range(width)]
        right = {width - 3, width - 1}

        def line(row: Sequence[str]) -> str:
            return "  ".join(cell.rjust(w) if c in right else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))).rstrip()

        out = [line(rows[0]), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in rows[1:-1]]
        out += ["  ".join("-" * w for w in widths), line(rows[-1])]
        return "\n".join(out)

    def to_model_index(self, model_name: str) -> list[dict[str, Any]]:
        """The figures as a model card's ``model-index`` (the value of that YAML key).

        Args:
            model_name: The model's name in the card.
        """
        results = []
        for r in self.results:
            dataset: dict[str, Any] = {"name": r.task, "type": r.dataset_path, "split": r.dataset_split}
            if r.dataset_name:
                dataset["config"] = r.dataset_name
            scoring = SCORING.get(r.output_type, r.output_type)
            metrics = [{"type": r.metric_modules.get(name, name), "name": f"{name} ({scoring})", "value": _json_number(v)}
                       for name, v in r.metrics.items()]
            results.append({"task": {"type": TASK_TYPES.get(r.output_type, r.output_type), "name": r.task}, "dataset": dataset, "metrics": metrics})
        return [{"name": model_name, "results": results}]

    def to_eval_results(self) -> list:
        """The figures as `huggingface_hub.EvalResult`s (for `ModelCardData(eval_results=...)`)."""
        from huggingface_hub import EvalResult

        out = []
        for r in self.results:
            for name, value in r.metrics.items():
                if not math.isfinite(value):
                    continue
                # model-index groups results by (task type, dataset type, config, split): a local
                # file has no Hub dataset id, so the task's name identifies it there.
                local = r.dataset_path in FILE_BUILDERS or r.dataset_path.startswith("/")
                out.append(EvalResult(
                    task_type=TASK_TYPES.get(r.output_type, r.output_type), task_name=r.task, dataset_type=r.task if local else r.dataset_path,
                    dataset_name=r.task, dataset_config=r.dataset_name, dataset_split=r.dataset_split,
                    metric_type=r.metric_modules.get(name, name), metric_name=f"{name} ({SCORING.get(r.output_type, r.output_type)})",
                    metric_value=value,
                ))
        return out


def prepare_tasks(tasks: Sequence[TaskSpec | TaskData], split: str = "validation", *, progress: bool = False) -> list[TaskData]:
    """Load and render every task's `split` and load every metric: all checks that need no model.

    Args:
        tasks: Parsed tasks, or tasks whose data is already loaded.
        split: "validation" or "test".
        progress: Show `datasets`' progress bars.

    Returns:
        The tasks with `split` loaded.

    Raises:
        TaskError: A task's data does not fit it (see `load_task_data`).
        MetricError: A metric cannot be loaded.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    for t in tasks:
        data = t if isinstance(t, TaskData) else None
        if data is None or getattr(data, split) is None:
            data = load_task_data(t.spec if isinstance(t, TaskData) else t, (split,), progress=progress)
        for metric in data.spec.metrics:
            load_metric(metric)
        out.append(data)
    return out


class TaskEvaluator:
    """Scores one or many models on prepared tasks.

    Examples are rendered and tokenised once; metrics are loaded once. Use it when the same
    model object is evaluated repeatedly with new weights (a coefficient search).
    ``multiple_choice`` tasks are scored by rank classification (`scores`), ``generate_until``
    tasks by greedy generation (`generations`); `evaluate` does both and computes the metrics.

    Args:
        tasks: Parsed or loaded tasks (loaded here if needed; errors come before any scoring).
        tokenizer: The tokenizer of the models to evaluate.
        split: "validation" or "test".
        batch_size: (example, option) pairs per forward pass; prompts per `generate` call for
            generate_until tasks.
        progress: Show progress bars.
    """

    def __init__(self, tasks: Sequence[TaskSpec | TaskData], tokenizer: Any, *, split: str = "validation",
                 batch_size: int = 32, progress: bool = False) -> None:
        self.tasks = prepare_tasks(tasks, split, progress=progress)
        self.tokenizer = tokenizer
        self.split = split
        self.batch_size = batch_size
        self.progress = progress
        self._encoded: dict[tuple[bool, int | None, str], list[EncodedExample]] = {}
        self._prompts: dict[tuple[bool, int | None, str], list[tuple[int, ...]]] = {}

    def _encode_prompts(self, model: Any, data: TaskData) -> list[tuple[int, ...]]:
        encoder_decoder = is_encoder_decoder(model)
        max_length = max_positions(model.config)
        key = (encoder_decoder, max_length, data.spec.name)
        if key not in self._prompts:
            try:
                self._prompts[key] = encode_prompts(self.tokenizer, [e.prompt for e in data.examples(self.split)], encoder_decoder=encoder_decoder,
                                                    max_gen_toks=data.spec.max_gen_toks, max_length=max_length)
            except ValueError as exc:
                raise EvaluationError(f"task {data.spec.name!r}: {exc}") from None
        return self._prompts[key]

    def _encode(self, model: Any, data: TaskData) -> list[EncodedExample]:
        encoder_decoder = is_encoder_decoder(model)
        max_length = max_positions(model.config)
        key = (encoder_decoder, max_length, data.spec.name)
        if key not in self._encoded:
            try:
                self._encoded[key] = encode_examples(self.tokenizer, data.examples(self.split), encoder_decoder=encoder_decoder,
                                                     target_delimiter=data.spec.target_delimiter, eos_token_id=eos_id(self.tokenizer, model), max_length=max_length)
            except ValueError as exc:
                raise EvaluationError(f"task {data.spec.name!r}: {exc}") from None
        return self._encoded[key]

    def scores(self, model: Any, *, device: str | torch.device | None = None) -> dict[str, list[OptionScores]]:
        """Per multiple_choice task, the option scores of every example (no metrics)."""
        out = {}
        for data in self.tasks:
            if data.spec.generates:
                continue
            encoded = self._encode(model, data)
            try:
                out[data.spec.name] = score_encoded(model, encoded, self.batch_size, device, self.progress, desc=data.spec.name)
            except ValueError as exc:
                raise EvaluationError(f"task {data.spec.name!r}: {exc}") from None
        return out

    def generations(self, model: Any, *, device: str | torch.device | None = None) -> dict[str, list[str]]:
        """Per generate_until task, the greedy answer to every example (no metrics): new tokens
        decoded without special tokens, cut at the first ``until`` string and stripped."""
        out = {}
        for data in self.tasks:
            if not data.spec.generates:
                continue
            prompts = self._encode_prompts(model, data)
            try:
                out[data.spec.name] = generate_encoded(model, self.tokenizer, prompts, max_gen_toks=data.spec.max_gen_toks,
                                                       until=data.spec.until, batch_size=self.batch_size, device=device,
                                                       progress=self.progress, desc=data.spec.name)
            except ValueError as exc:
                raise EvaluationError(f"task {data.spec.name!r}: {exc}") from None
        return out

    def evaluate(self, model: Any, *, device: str | torch.device | None = None, model_name: str | None = None) -> EvalReport:
        """Score `model` on every task and compute the metrics.

        Args:
            model: A `transformers` encoder-decoder or causal LM, already on `device`.
            device: Where inputs go (default: the model's device).
            model_name: The name recorded in the report.

        Returns:
            The report.

        Raises:
            EvaluationError: The model cannot score the examples.
            MetricError: A metric failed.
        """
        start = time.perf_counter()
        all_scores = self.scores(model, device=device)
        all_generations = self.generations(model, device=device)
        results = []
        for data in self.tasks:
            spec, examples = data.spec, data.examples(self.split)
            if spec.generates:
                results.append(self._generation_result(data, all_generations[spec.name]))
                continue
            option_scores = all_scores[spec.name]
            references = [e.label for e in examples]
            options = [e.options for e in examples]
            metrics: dict[str, float] = {}
            predictions_by_norm: dict[str, list[int]] = {}
            for metric in spec.metrics:
                normalization = metric.normalization or spec.normalization
                if normalization not in predictions_by_norm:
                    predictions_by_norm[normalization] = [s.best(normalization, e.options) for s, e in zip(option_scores, examples)]
                metrics[metric.name] = compute_metric(metric, predictions_by_norm[normalization], references, options)
            primary = spec.metrics[0]
            results.append(TaskResult(
                task=spec.name, split=self.split, dataset_split=spec.split_name(self.split) or self.split, num_examples=len(examples),
                metrics=metrics, primary_metric=primary.name,
                predictions=predictions_by_norm[primary.normalization or spec.normalization],
                dataset_path=spec.dataset_path if not Path(spec.dataset_path).is_absolute() else "local",
                dataset_name=spec.dataset_name, metric_modules={m.name: m.result_key for m in spec.metrics},
            ))
        name = model_name or str(getattr(model, "name_or_path", "") or type(model).__name__)
        return EvalReport(name, self.split, results, time.perf_counter() - start)

    def _generation_result(self, data: TaskData, answers: list[str]) -> TaskResult:
        spec, examples = data.spec, data.examples(self.split)
        # Both sides stripped: the answers are, and a reference's surrounding whitespace
        # (" yes" as a harness target) is formatting, not content.
        references = [e.target.strip() for e in examples]
        if any(m.uses_values for m in spec.metrics):
            unparsed = sum(parse_number(a) is None for a in answers)
            if unparsed:
                logger.warning("task %s: %d of %d generated answers are not numbers; the correlation counts them as 0.0",
                               spec.name, unparsed, len(answers))
        metrics = {m.name: compute_generation_metric(m, answers, references) for m in spec.metrics}
        return TaskResult(
            task=spec.name, split=self.split, dataset_split=spec.split_name(self.split) or self.split, num_examples=len(examples),
            metrics=metrics, primary_metric=spec.metrics[0].name, predictions=list(answers),
            dataset_path=spec.dataset_path if not Path(spec.dataset_path).is_absolute() else "local",
            dataset_name=spec.dataset_name, metric_modules={m.name: m.result_key for m in spec.metrics}, output_type=spec.output_type,
        )


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("cuda: no CUDA device is available here; use cpu", options=("device",))
    return device


# Files that hold a tokenizer's vocabulary (one of them must be in a model folder to score it).
VOCABULARY_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def load_model_for_eval(model: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """Load a model and its tokenizer for scoring.

    The config decides the class: `AutoModelForSeq2SeqLM` for encoder-decoder models, else
    `AutoModelForCausalLM`. Remote code is never run.

    Args:
        model: A local folder (or a Hub repo id, which needs the network).
        device: "cpu", "cuda", "auto"/None (CUDA if available).
        dtype: "float32", "bfloat16", "float16", "auto" (the checkpoint's) or None (float32 on
            CPU, where half precision is slow; the checkpoint's on GPU).

    Returns:
        (model in eval mode on the device, tokenizer).

    Raises:
        EvaluationError: The folder is missing, or the model or tokenizer cannot be loaded.
        CheckpointError: A Hub model cannot be downloaded or does not verify.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    target = _device(device)
    text = str(model)
    path = Path(text).expanduser()
    if not path.is_dir() and (text.startswith((".", "/", "~")) or path.exists()):
        raise EvaluationError(f"folder not found: {path}", options=("model",))
    source = str(path) if path.is_dir() else text
    if dtype is None:
        torch_dtype: Any = torch.float32 if target.type == "cpu" else "auto"
    elif isinstance(dtype, torch.dtype) or dtype == "auto":
        torch_dtype = dtype
    elif dtype in RECIPE_DTYPES:
        torch_dtype = getattr(torch, TORCH_DTYPE_NAMES[RECIPE_DTYPES[dtype]])
    else:
        raise EvaluationError(f"got {dtype!r}; expected one of auto, {', '.join(RECIPE_DTYPES)}", options=("dtype",))
    if not path.is_dir():
        # A Hub id: fetched through hfmerge's reader (pinned, retried, every file verified), then loaded locally.
        from ..checkpoints.hub import download_hub_model
        from ..refs import parse_model_ref

        ref = parse_model_ref(text, field="model")
        if ref.adapter is not None:
            raise EvaluationError(f"{text!r} applies a LoRA adapter to a model (BASE+ADAPTER), which only a recipe reads; merge it "
                                  "(e.g. merge_method: passthrough with that one model) and evaluate the output folder", options=("model",))
        source = str(download_hub_model(ref, label="model"))
    vocabularies = [name for name in VOCABULARY_FILES if (Path(source) / name).is_file()]
    if not vocabularies:
        # transformers would build a tokenizer of special tokens only and every score would be
        # chance: refuse instead.
        raise EvaluationError(f"{source} has no tokenizer (none of {', '.join(VOCABULARY_FILES)}); copy the tokenizer files of its "
                              "base model into the folder (a merge copies them from its tokenizer_source)", options=("model",))
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        loaded = cls.from_pretrained(source, config=config, dtype=torch_dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise EvaluationError(f"could not load a model and tokenizer from {source!r}: {type(exc).__name__}: {first}") from None
    loaded.to(target)
    loaded.eval()
    return loaded, tokenizer


def evaluate_model(model_or_path: Any, tasks: Sequence[TaskSpec | TaskData], split: str = "validation", *,
                   tokenizer: Any = None, batch_size: int = 32, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, progress: bool = True, model_name: str | None = None) -> EvalReport:
    """Evaluate a model on tasks: per-task metrics and their average.

    The tasks' data and metrics are loaded and checked first; the model only after.

    Args:
        model_or_path: A folder or repo id (loaded with `load_model_for_eval`), or a loaded
            `transformers` model (then give `tokenizer`; it must already be on `device`).
        tasks: Parsed or loaded tasks.
        split: "validation" or "test".
        tokenizer: The tokenizer, when a model object is given.
        batch_size: (example, option) pairs per forward pass; prompts per `generate` call for
            generate_until tasks.
        device: "cpu", "cuda" or "auto"/None.
        dtype: See `load_model_for_eval`.
        progress: Show progress bars.
        model_name: The name recorded in the report (default: the path).

    Returns:
        The report (`to_table()`, `to_json()`, `to_model_index(name)`).

    Raises:
        TaskError: A task's data does not fit it (before the model is loaded).
        MetricError: A metric cannot be loaded or computed.
        EvaluationError: The model cannot be loaded or run.
    """
    prepared = prepare_tasks(tasks, split, progress=progress)
    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load_model_for_eval(model_or_path, device=device, dtype=dtype)
        model_name = model_name or str(model_or_path)
        run_device: Any = None
    else:
        if tokenizer is None:
            raise ValueError("evaluate_model: give tokenizer= with a model object")
        model = model_or_path
        run_device = None if device in (None, "auto") else device
    evaluator = TaskEvaluator(prepared, tokenizer, split=split, batch_size=batch_size, progress=progress)
    return evaluator.evaluate(model, device=run_device, model_name=model_name)
