"""Validation and test tasks: the recipe's ``tasks:`` section, parsed, checked and rendered.

A task is written with lm-evaluation-harness's task keys (``task``, ``dataset_path``,
``dataset_name``, ``dataset_kwargs``, ``validation_split``, ``test_split``, ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``metric_list``, ``description``, ``target_delimiter``,
``output_type``, ``generation_kwargs``), so a harness task can be pasted in; hfmerge adds a few
keys of its own (``validation_fraction``, ``test_fraction``, ``num_validation_examples``,
``num_test_examples``, ``limit``, ``seed``, ``model``, ``normalization``,
``manual_download_instructions``). docs/tasks.md is the reference.

A task is scored one of two ways, chosen by ``output_type`` as in the harness:
``multiple_choice`` (the default) ranks the options by log-likelihood (scoring.py);
``generate_until`` generates an answer greedily and compares it with the reference text
(generation.py). One task definition with ``doc_to_choice`` serves both: for generation the
label picks the option whose text is the reference.

Two steps, both before any model is loaded:

1. `parse_tasks` checks the keys, types and values and that every local data file exists
   (no data is read).
2. `load_task_data` reads the splits with `datasets`, carves and subsamples them with the
   task's seed, and renders every example into (prompt, options, label index); for a
   ``generate_until`` task without ``doc_to_choice`` the options are the one reference. Templates
   are checked against the data's fields first, so a typo in a field name is reported as
   such, naming the task, the key and the field.

Templates are Jinja2 run in `jinja2.sandbox.ImmutableSandboxedEnvironment` with
`StrictUndefined`, like the harness's (which adds a ``regex_replace`` filter; so does
hfmerge), but without the harness's ``!function`` Python hooks: a recipe runs no code.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import glob
import logging
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import FILE_BUILDERS, REPO_ID
from ..errors import TaskError
from ..yamlio import PythonFunctionTag, load_yaml_file, yaml_loader
from .metrics import METRIC_ALIASES, MetricSpec, resolve_metric
from .metrics import parse_number as _parse_number

logger = logging.getLogger(__name__)

__all__ = [
    "TaskSpec", "Example", "TaskData", "parse_tasks", "load_task_data", "load_tasks_file",
    "match_tasks_to_models", "yaml_loader", "load_yaml_file", "NORMALIZATIONS",
]


# The keys hfmerge reads. The first group is lm-evaluation-harness's; the second hfmerge's.
HARNESS_KEYS = (
    "task", "dataset_path", "dataset_name", "dataset_kwargs", "validation_split", "test_split", "doc_to_text",
    "doc_to_choice", "doc_to_target", "metric_list", "description", "target_delimiter", "output_type",
    "generation_kwargs", "num_fewshot", "repeats",
)
HFMERGE_KEYS = (
    "validation_fraction", "test_fraction", "num_validation_examples", "num_test_examples", "limit", "seed", "model",
    "normalization", "manual_download_instructions",
)
# Harness keys that do not change a zero-shot multiple-choice evaluation: accepted and ignored,
# so a harness task YAML can be pasted unchanged.
IGNORED_HARNESS_KEYS = (
    "training_split", "fewshot_split", "fewshot_delimiter", "fewshot_config", "tag", "group", "task_alias",
    "group_alias", "metadata", "should_decontaminate", "doc_to_decontamination_query", "dataset_name_alias",
)
# Harness keys hfmerge cannot honour, with what to do instead.
UNSUPPORTED_HARNESS_KEYS = {
    "process_docs": "Python hooks are not run from recipes; prepare the data file instead, or express the change in the templates",
    "process_results": "Python hooks are not run from recipes; use metric_list",
    "filter_list": "filters are not run; a generated answer is cut at the first generation_kwargs.until string and stripped, "
                   "and exact_match takes ignore_case, ignore_punctuation, ignore_numbers and regexes_to_ignore",
    "include": "paste the included task's keys into this task",
    "doc_to_image": "only text tasks are supported",
    "doc_to_audio": "only text tasks are supported",
    "use_prompt": "promptsource prompts are not supported; write doc_to_text as a Jinja template",
}
TASK_KEYS = HARNESS_KEYS + HFMERGE_KEYS

NORMALIZATIONS = ("token", "none", "char")
OUTPUT_TYPES = ("multiple_choice", "generate_until")
# lm-evaluation-harness's defaults for a generate_until task whose generation_kwargs do not say:
# stop at a blank line (its few-shot delimiter), at most 256 new tokens.
DEFAULT_UNTIL: tuple[str, ...] = ("\n\n",)
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_METRICS = ({"metric": "accuracy"},)
# The harness's default metric of a generate_until task.
DEFAULT_GENERATION_METRICS = ({"metric": "exact_match"},)
# generation_kwargs hfmerge reads (greedy decoding only), and what to write for others.
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")
GENERATION_KEY_HINTS = {
    "max_new_tokens": "write max_gen_toks (lm-evaluation-harness's name for it)",
    "max_length": "write max_gen_toks, the most new tokens (lm-evaluation-harness's name for it)",
    "num_beams": "only greedy decoding is supported (one beam)",
    "top_p": "only greedy decoding is supported; top_p applies to sampling",
    "top_k": "only greedy decoding is supported; top_k applies to sampling",
    "stop": "write until (lm-evaluation-harness's name for the stop strings)",
    "stop_strings": "write until (lm-evaluation-harness's name for the stop strings)",
}
# datasets' packaged builders that read files named by data_files.
DATA_FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# datasets' split slicing: "validation[:50%]", "test[935:]", "train[10:20]".
_SPLIT_SLICE = re.compile(r"\s*([^\[\]]+?)\s*\[[^\[\]]*\]\s*")


def base_split_name(split: str) -> str:
    """The split a `datasets` split expression reads from: ``test`` for ``test[935:]``."""
    match = _SPLIT_SLICE.fullmatch(split)
    return match.group(1) if match else split


# --------------------------------------------------------------------------------------------
# The parsed task
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One validated task: where its data is, how to render an example, how to score it.

    Attributes:
        name: The ``task`` key (unique within the recipe).
        key: Its key path in the recipe, e.g. ``tasks[0]``; messages are prefixed with it.
        source: The recipe's name for messages (usually its path).
        dataset_path: A `datasets` builder (``json``, ``csv``, ``parquet``, ...), a Hub dataset
            id, or an absolute local folder.
        dataset_name: The dataset configuration (Hub datasets), or None.
        dataset_kwargs: Extra `datasets.load_dataset` arguments; ``data_files`` paths are
            absolute.
        from_disk: True when `dataset_path` is a folder written by `Dataset.save_to_disk`.
        validation_split, test_split: Split names, or None.
        validation_fraction, test_fraction: Fractions carved from the split with `seed`.
        num_validation_examples, num_test_examples: Seeded random subset sizes (None: all).
        limit: At most this many examples of each split, the first ones (harness ``--limit``).
        seed: Seed of the carving and subsampling.
        doc_to_text, doc_to_choice, doc_to_target: As written (field names or templates;
            a fixed option list; a fixed label index). A generate_until task without options
            has ``doc_to_choice == ()``.
        description: A template prepended to every prompt.
        target_delimiter: Put between the prompt and each option for decoder-only models
            (rank classification only).
        normalization: How option log-likelihoods are compared: ``token`` (mean over tokens,
            the default), ``none`` (sum) or ``char`` (sum / characters).
        metrics: The metrics to report; the first one is the task's score.
        model: The fine-tuned model this task belongs to (index or reference), or None.
        raw: The mapping as written.
        output_type: ``multiple_choice`` (rank classification) or ``generate_until`` (greedy
            generation compared with the reference text).
        until: ``generate_until``: stop strings; the answer is cut at the first one.
        max_gen_toks: ``generate_until``: the most new tokens.
        manual_download_instructions: How to obtain data that cannot be downloaded
            automatically (datasets' name for it). When set, missing local data files are
            reported when the task is loaded, with these instructions, instead of when the
            recipe is read.
    """

    name: str
    key: str
    source: str
    dataset_path: str
    dataset_name: str | None = None
    dataset_kwargs: Mapping[str, Any] = field(default_factory=dict)
    from_disk: bool = False
    validation_split: str | None = None
    test_split: str | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    num_validation_examples: int | None = None
    num_test_examples: int | None = None
    limit: int | None = None
    seed: int = 0
    doc_to_text: str = ""
    doc_to_choice: str | tuple[str, ...] = ()
    doc_to_target: str | int = 0
    description: str = ""
    target_delimiter: str = " "
    normalization: str = "token"
    metrics: tuple[MetricSpec, ...] = ()
    model: int | str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    output_type: str = "multiple_choice"
    until: tuple[str, ...] = DEFAULT_UNTIL
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
    manual_download_instructions: str | None = None

    @property
    def generates(self) -> bool:
        """Scored by greedy generation (``output_type: generate_until``)."""
        return self.output_type == "generate_until"

    def split_name(self, which: str) -> str | None:
        """The dataset split `which` ("validation" or "test") is read from, or None."""
        return {"validation": self.validation_split, "test": self.test_split}[which]

    @property
    def dataset_label(self) -> str:
        """A short human description of the data source, for messages and model cards."""
        files = self.dataset_kwargs.get("data_files")
        if files is not None:
            return f"{self.dataset_path} files {files}"
        return self.dataset_path + (f" ({self.dataset_name})" if self.dataset_name else "")


@dataclass(frozen=True)
class Example:
    """One rendered example: the prompt, its answer options and the index of the right one.

    For a ``generate_until`` task the options are the task's ``doc_to_choice`` options when it
    has them, else the one reference answer (label 0); `target` is the reference either way.
    """

    prompt: str
    options: tuple[str, ...]
    label: int

    @property
    def target(self) -> str:
        """The reference answer's text: the right option."""
        return self.options[self.label]


@dataclass
class TaskData:
    """A task with its examples rendered, per split ("validation", "test"); None = not loaded."""

    spec: TaskSpec
    validation: list[Example] | None = None
    test: list[Example] | None = None

    def examples(self, split: str) -> list[Example]:
        """The examples of `split`.

        Raises:
            TaskError: The split was not loaded or the task has none.
        """
        if split not in ("validation", "test"):
            raise ValueError(f"split must be 'validation' or 'test', got {split!r}")
        examples = getattr(self, split)
        if examples is None:
            raise TaskError(f"{self.spec.source}: {self.spec.key}.{split}_split: task {self.spec.name!r} has no {split} split"
                            + ("" if self.spec.split_name(split) is None else " loaded; call load_task_data with this split"))
        return examples


# --------------------------------------------------------------------------------------------
# Parsing (no data read)
# --------------------------------------------------------------------------------------------


def _fail(source: str, path: str, message: str) -> TaskError:
    return TaskError(f"{source}: {path}: {message}")


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _positive_int(source: str, path: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(source, path, f"got {value!r}; expected a positive whole number (or null for all examples)")
    return value


def _fraction(source: str, path: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _fail(source, path, f"got {value!r}; expected a fraction in (0, 1]")
    return float(value)


def _string(source: str, path: str, value: Any, what: str = "a string") -> str:
    if isinstance(value, PythonFunctionTag):
        raise _fail(source, path, f"'!function {value}' is not supported: hfmerge runs no Python code from recipes; write it as a Jinja template")
    if not isinstance(value, str):
        raise _fail(source, path, f"got {value!r}; expected {what}")
    return value


def _resolve_local(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _is_remote(path: str) -> bool:
    return "://" in path


def _resolve_data_files(source: str, path: str, value: Any, base_dir: Path | None, check: bool = True) -> Any:
    """data_files with local paths made absolute and, with `check`, checked to exist (globs
    must match)."""
    if isinstance(value, dict):
        if not value:
            raise _fail(source, path, "got an empty mapping; expected {split: file or list of files}")
        return {str(k): _resolve_data_files(source, f"{path}.{k}", v, base_dir, check) for k, v in value.items()}
    if isinstance(value, list):
        if not value:
            raise _fail(source, path, "got an empty list; expected one or more files")
        return [_resolve_data_files(source, f"{path}[{i}]", v, base_dir, check) for i, v in enumerate(value)]
    text = _string(source, path, value, "a file path, a list of them, or {split: files}")
    if _is_remote(text):
        return text
    resolved = _resolve_local(text, base_dir)
    if not check:
        return str(resolved)
    where = f" (relative paths are resolved against the recipe's folder {base_dir})" if base_dir is not None and not Path(text).expanduser().is_absolute() else ""
    if glob.has_magic(str(resolved)):
        if not glob.glob(str(resolved)):
            raise _fail(source, path, f"no file matches {str(resolved)!r}{where}")
    elif not resolved.is_file():
        raise _fail(source, path, f"data file not found: {resolved}{where}")
    return str(resolved)


def _split_names_of(data_files: Any) -> list[str] | None:
    """The split names a data_files value defines (datasets names a bare file list 'train')."""
    if data_files is None:
        return None
    if isinstance(data_files, dict):
        return list(data_files)
    return ["train"]


def _metric_list(source: str, path: str, value: Any, base_dir: Path | None, output_type: str = "multiple_choice") -> tuple[MetricSpec, ...]:
    generates = output_type == "generate_until"
    if value is None:
        value = list(DEFAULT_GENERATION_METRICS if generates else DEFAULT_METRICS)
    if not isinstance(value, list) or not value:
        raise _fail(source, path, f"got {value!r}; expected a non-empty list of {{metric: <name>}}")
    specs = []
    seen = set()
    for j, entry in enumerate(value):
        here = f"{path}[{j}]"
        if isinstance(entry, str):  # shorthand: a bare name
            entry = {"metric": entry}
        if not isinstance(entry, dict) or "metric" not in entry:
            raise _fail(source, here, f"got {entry!r}; expected {{metric: <name>}} (e.g. accuracy, f1, matthews_correlation, spearmanr, pearsonr)")
        name = _string(source, f"{here}.metric", entry["metric"], "a metric name")
        # `aggregation` and `higher_is_better` tell the harness how to reduce per-example
        # values; hfmerge computes each metric over the whole split, so they change nothing.
        kwargs = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better")}
        for k, v in kwargs.items():
            if isinstance(v, PythonFunctionTag):
                _string(source, f"{here}.{k}", v)
        try:
            spec = resolve_metric(name, kwargs, base_dir=base_dir)
        except ValueError as exc:
            raise _fail(source, f"{here}.metric", str(exc)) from None
        if spec.name in seen:
            raise _fail(source, f"{here}.metric", f"{name!r} is listed twice")
        if spec.uses_text:
            _exact_match_kwargs(source, here, kwargs)
        if generates and spec.uses_indices:
            raise _fail(source, f"{here}.metric", f"{name!r} compares chosen options (rank classification, output_type: multiple_choice); "
                        "a generate_until task is scored on its generated text: use exact_match (with ignore_case / ignore_punctuation "
                        "if wanted), or spearmanr / pearsonr on generated numbers")
        seen.add(spec.name)
        specs.append(spec)
    return tuple(specs)


def _generation_kwargs(source: str, path: str, value: Any) -> tuple[tuple[str, ...], int]:
    """The (until, max_gen_toks) of a generate_until task's generation_kwargs; only greedy
    decoding is accepted."""
    if value is None:
        return DEFAULT_UNTIL, DEFAULT_MAX_GEN_TOKS
    if not isinstance(value, dict):
        raise _fail(source, path, f"got {value!r}; expected a mapping such as {{until: ['\\n'], max_gen_toks: 10, do_sample: false}}")
    for k in value:
        if k not in GENERATION_KEYS:
            hint = GENERATION_KEY_HINTS.get(str(k), f"unknown key{_suggest(k, GENERATION_KEYS)}")
            raise _fail(source, f"{path}.{k}", f"{hint} (hfmerge reads {', '.join(GENERATION_KEYS)}; decoding is greedy)")
    until = value.get("until", list(DEFAULT_UNTIL))
    if isinstance(until, str):  # the harness accepts one string
        until = [until]
    if not isinstance(until, list):
        raise _fail(source, f"{path}.until", f"got {until!r}; expected a list of stop strings (or [] for none)")
    for j, stop in enumerate(until):
        if not isinstance(stop, str) or not stop:
            raise _fail(source, f"{path}.until[{j}]", f"got {stop!r}; expected a non-empty stop string")
    max_gen_toks = value.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise _fail(source, f"{path}.max_gen_toks", f"got {max_gen_toks!r}; expected a positive whole number (the most new tokens)")
    do_sample = value.get("do_sample", False)
    if do_sample is not False:
        raise _fail(source, f"{path}.do_sample", f"got {do_sample!r}; only greedy decoding is supported: do_sample: false")
    temperature = value.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
        raise _fail(source, f"{path}.temperature", f"got {temperature!r}; only greedy decoding is supported: temperature: 0 (or leave it out)")
    return tuple(until), max_gen_toks


EXACT_MATCH_KWARGS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")


def _exact_match_kwargs(source: str, path: str, kwargs: Mapping[str, Any]) -> None:
    """Check exact_match's options now rather than after the model has generated."""
    for k, v in kwargs.items():
        if k not in EXACT_MATCH_KWARGS:
            raise _fail(source, f"{path}.{k}", f"unknown exact_match option{_suggest(k, EXACT_MATCH_KWARGS)} (expected one of: {', '.join(EXACT_MATCH_KWARGS)})")
        if k == "regexes_to_ignore":
            patterns = [v] if isinstance(v, str) else v
            if not isinstance(patterns, list) or not all(isinstance(x, str) for x in patterns):
                raise _fail(source, f"{path}.{k}", f"got {v!r}; expected a list of regular expressions")
            for j, pattern in enumerate(patterns):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise _fail(source, f"{path}.{k}" + (f"[{j}]" if isinstance(v, list) else ""), f"not a valid regular expression: {exc}") from None
        elif not isinstance(v, bool):
            raise _fail(source, f"{path}.{k}", f"got {v!r}; expected true or false")


def _parse_task(entry: Any, i: int, *, source: str, base_dir: Path | None) -> TaskSpec:
    key = f"tasks[{i}]"
    if not isinstance(entry, dict):
        raise _fail(source, key, f"got {entry!r}; expected a task mapping with task, dataset_path, doc_to_text, doc_to_choice and doc_to_target")
    for k in entry:
        if k in UNSUPPORTED_HARNESS_KEYS:
            raise _fail(source, f"{key}.{k}", f"not supported: {UNSUPPORTED_HARNESS_KEYS[k]}")
        if k not in TASK_KEYS and k not in IGNORED_HARNESS_KEYS:
            raise _fail(source, f"{key}.{k}", f"unknown key{_suggest(k, TASK_KEYS)} (expected one of: {', '.join(TASK_KEYS)})")

    def req(k: str) -> Any:
        if entry.get(k) is None:
            raise _fail(source, f"{key}.{k}", "missing; " + {
                "task": "expected the task's name",
                "dataset_path": "expected a Hub dataset id, a datasets builder with dataset_kwargs.data_files (e.g. json), or a local folder",
                "doc_to_text": "expected a Jinja template of the prompt (or a field name)",
                "doc_to_choice": "expected the answer options: a list of strings, a field holding each example's options, or a Jinja template rendering a list",
                "doc_to_target": "expected the label: a field (an index or the option's text), a Jinja template, or a fixed index",
            }[k])
        return entry[k]

    name = _string(source, f"{key}.task", req("task"), "the task's name (a string)")
    if not name.strip():
        raise _fail(source, f"{key}.task", "got an empty name; expected the task's name")

    output_type = entry.get("output_type")
    if output_type is None:
        output_type = "multiple_choice"
    if output_type not in OUTPUT_TYPES:
        raise _fail(source, f"{key}.output_type", f"got {output_type!r}; expected multiple_choice (rank classification over options, the default) "
                    "or generate_until (greedy generation compared with the reference text)")
    generates = output_type == "generate_until"
    if entry.get("num_fewshot") not in (None, 0):
        raise _fail(source, f"{key}.num_fewshot", f"got {entry['num_fewshot']!r}; expected 0: few-shot prompts are not supported")
    if entry.get("repeats") not in (None, 1):
        raise _fail(source, f"{key}.repeats", f"got {entry['repeats']!r}; expected 1 (rank classification and greedy generation are deterministic)")
    if entry.get("generation_kwargs") is not None and not generates:
        raise _fail(source, f"{key}.generation_kwargs", "only used with output_type: generate_until; a multiple_choice task is scored "
                    "by rank classification and generates nothing")
    until, max_gen_toks = _generation_kwargs(source, f"{key}.generation_kwargs", entry.get("generation_kwargs")) if generates \
        else (DEFAULT_UNTIL, DEFAULT_MAX_GEN_TOKS)

    # Where the data is.
    dataset_path = _string(source, f"{key}.dataset_path", req("dataset_path"))
    dataset_name = entry.get("dataset_name")
    if dataset_name is not None:
        dataset_name = _string(source, f"{key}.dataset_name", dataset_name, "a dataset configuration name")
    dataset_kwargs = entry.get("dataset_kwargs") or {}
    if not isinstance(dataset_kwargs, dict):
        raise _fail(source, f"{key}.dataset_kwargs", f"got {dataset_kwargs!r}; expected a mapping of datasets.load_dataset arguments (e.g. data_files)")
    dataset_kwargs = dict(dataset_kwargs)
    # Data that must be downloaded by hand (Story Cloze, ...): a missing file is reported when
    # the task is loaded, with the instructions, so the recipe itself still validates.
    manual = entry.get("manual_download_instructions")
    if manual is not None:
        manual = _string(source, f"{key}.manual_download_instructions", manual, "text saying how to obtain the data")
        if not manual.strip():
            raise _fail(source, f"{key}.manual_download_instructions", "got empty text; say how to obtain the data, or remove the key")
    for forbidden in ("trust_remote_code", "split", "path", "name"):
        if forbidden in dataset_kwargs:
            hint = {"trust_remote_code": "dataset scripts are never run", "split": "use validation_split / test_split",
                    "path": "use dataset_path", "name": "use dataset_name"}[forbidden]
            raise _fail(source, f"{key}.dataset_kwargs.{forbidden}", f"not allowed here: {hint}")
    # data_files of a file builder are local paths (relative to the recipe); those of a Hub
    # dataset or a local dataset folder are relative to that dataset, as in datasets.
    if "data_files" in dataset_kwargs and dataset_path in FILE_BUILDERS:
        dataset_kwargs["data_files"] = _resolve_data_files(source, f"{key}.dataset_kwargs.data_files", dataset_kwargs["data_files"], base_dir,
                                                           check=manual is None)
    if isinstance(dataset_kwargs.get("data_dir"), str) and not _is_remote(dataset_kwargs["data_dir"]) and dataset_path in FILE_BUILDERS:
        data_dir = _resolve_local(dataset_kwargs["data_dir"], base_dir)
        if not data_dir.is_dir() and manual is None:
            raise _fail(source, f"{key}.dataset_kwargs.data_dir", f"folder not found: {data_dir}")
        dataset_kwargs["data_dir"] = str(data_dir)

    from_disk = False
    local = _resolve_local(dataset_path, base_dir)
    if dataset_path in FILE_BUILDERS:
        if "data_files" not in dataset_kwargs and "data_dir" not in dataset_kwargs:
            raise _fail(source, f"{key}.dataset_kwargs.data_files", f"missing; dataset_path {dataset_path!r} reads local files: "
                        f"give dataset_kwargs: {{data_files: {{validation: path/to/file}}}}")
    elif local.is_file() or Path(dataset_path).suffix.lower() in DATA_FILE_SUFFIXES:
        builder = DATA_FILE_SUFFIXES.get(local.suffix.lower(), "json")
        raise _fail(source, f"{key}.dataset_path", f"got the file {dataset_path!r}; write dataset_path: {builder} with "
                    f"dataset_kwargs: {{data_files: {{validation: {dataset_path}}}}} (as in datasets.load_dataset)")
    elif local.is_dir():
        dataset_path = str(local.resolve())
        # A folder written by save_to_disk is read with load_from_disk; any other folder of
        # data files goes to load_dataset, which infers the splits from the file names.
        from_disk = (local / "dataset_info.json").is_file() and (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
    elif dataset_path.startswith((".", "/", "~")) or "\\" in dataset_path or not REPO_ID.match(dataset_path):
        raise _fail(source, f"{key}.dataset_path", f"folder not found: {local}" + (
            f" (relative paths are resolved against the recipe's folder {base_dir})" if base_dir is not None else ""))
    # Otherwise a Hub dataset id: it can only be checked when loaded (which needs the network).

    # Splits.
    validation_split = entry.get("validation_split")
    test_split = entry.get("test_split")
    for k, v in (("validation_split", validation_split), ("test_split", test_split)):
        if v is not None:
            _string(source, f"{key}.{k}", v, "a split name")
    if validation_split is None and test_split is None:
        raise _fail(source, f"{key}.validation_split", "missing; give validation_split and/or test_split (split names of the dataset)")
    known = _split_names_of(dataset_kwargs.get("data_files"))
    if known is not None:
        for k, v in (("validation_split", validation_split), ("test_split", test_split)):
            if v is not None and base_split_name(v) not in known:
                raise _fail(source, f"{key}.{k}", f"got {v!r}; data_files defines the split(s) {', '.join(map(repr, known))}{_suggest(v, known)}")
    validation_fraction = _fraction(source, f"{key}.validation_fraction", entry.get("validation_fraction"))
    test_fraction = _fraction(source, f"{key}.test_fraction", entry.get("test_fraction"))
    if validation_fraction is not None and validation_split is None:
        raise _fail(source, f"{key}.validation_fraction", "needs validation_split: the split the fraction is carved from")
    if test_fraction is not None and test_split is None:
        raise _fail(source, f"{key}.test_fraction", "needs test_split: the split the fraction is carved from")
    if validation_split is not None and validation_split == test_split and validation_fraction and test_fraction \
            and validation_fraction + test_fraction > 1 + 1e-9:
        raise _fail(source, f"{key}.test_fraction", f"validation_fraction + test_fraction = {validation_fraction + test_fraction:g} > 1; "
                    f"both are carved from split {validation_split!r} and must not overlap")

    num_validation = _positive_int(source, f"{key}.num_validation_examples", entry.get("num_validation_examples"))
    num_test = _positive_int(source, f"{key}.num_test_examples", entry.get("num_test_examples"))
    limit = _positive_int(source, f"{key}.limit", entry.get("limit"))
    if limit is not None and (num_validation is not None or num_test is not None):
        raise _fail(source, f"{key}.limit", "give either limit (the first N examples of each split) or num_validation_examples / num_test_examples (a seeded random subset), not both")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _fail(source, f"{key}.seed", f"got {seed!r}; expected a whole number")

    # Templates.
    doc_to_text = _string(source, f"{key}.doc_to_text", req("doc_to_text"), "a Jinja template or a field name")
    description = _string(source, f"{key}.description", entry.get("description", ""), "a Jinja template (prepended to the prompt)")
    target_delimiter = _string(source, f"{key}.target_delimiter", entry.get("target_delimiter", " "))
    # A generate_until task needs no options; given, they map a label index to its text.
    choice = entry.get("doc_to_choice") if generates else req("doc_to_choice")
    if isinstance(choice, dict):  # the harness accepts {key: option} and uses the values
        choice = list(choice.values())
    fewest = 1 if generates else 2
    if choice is None:
        doc_to_choice: str | tuple[str, ...] | None = None
    elif isinstance(choice, list):
        if len(choice) < fewest:
            raise _fail(source, f"{key}.doc_to_choice", f"got {choice!r}; expected at least {'one option' if generates else 'two options'}")
        for j, c in enumerate(choice):
            if isinstance(c, bool) or not isinstance(c, (str, int, float)):
                raise _fail(source, f"{key}.doc_to_choice[{j}]", f"got {c!r}; expected an option's text")
        doc_to_choice = tuple(str(c) for c in choice)
    else:
        doc_to_choice = _string(source, f"{key}.doc_to_choice", choice, "a list of options, a field name or a Jinja template rendering a list")
    target = req("doc_to_target")
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        _string(source, f"{key}.doc_to_target", target, "a field name, a Jinja template or a fixed option index")
    if isinstance(target, int) and doc_to_choice is not None:
        if target < 0 or (isinstance(doc_to_choice, tuple) and target >= len(doc_to_choice)):
            bound = f"0..{len(doc_to_choice) - 1}" if isinstance(doc_to_choice, tuple) else "0 or more"
            raise _fail(source, f"{key}.doc_to_target", f"label {target} is out of range; expected an option index {bound}")
    if generates and entry.get("normalization") is not None:
        raise _fail(source, f"{key}.normalization", "compares option log-likelihoods (rank classification, output_type: multiple_choice); "
                    "a generate_until task generates its answer: remove the key")
    normalization = entry.get("normalization", "token")
    if normalization not in NORMALIZATIONS:
        raise _fail(source, f"{key}.normalization", f"got {normalization!r}; expected one of {', '.join(NORMALIZATIONS)}")

    metrics = _metric_list(source, f"{key}.metric_list", entry.get("metric_list"), base_dir, output_type)
    model = entry.get("model")
    if model is not None and (isinstance(model, bool) or not isinstance(model, (int, str)) or (isinstance(model, int) and model < 0)):
        raise _fail(source, f"{key}.model", f"got {model!r}; expected the index of a model in models (0, 1, ...) or its reference as written")
    return TaskSpec(
        name=name, key=key, source=source, dataset_path=dataset_path, dataset_name=dataset_name, dataset_kwargs=dataset_kwargs,
        from_disk=from_disk, validation_split=validation_split, test_split=test_split, validation_fraction=validation_fraction,
        test_fraction=test_fraction, num_validation_examples=num_validation, num_test_examples=num_test, limit=limit, seed=seed,
        doc_to_text=doc_to_text, doc_to_choice=() if doc_to_choice is None else doc_to_choice, doc_to_target=target,
        description=description, target_delimiter=target_delimiter, normalization=normalization, metrics=metrics, model=model,
        raw=entry, output_type=output_type, until=until, max_gen_toks=max_gen_toks, manual_download_instructions=manual,
    )


def parse_tasks(data: list | None, *, source: str = "recipe", base_dir: Path | None = None) -> list[TaskSpec]:
    """Validate a recipe's ``tasks:`` list. Reads no data; checks that local data files exist.

    Args:
        data: The ``tasks`` value as parsed from YAML (None or missing means no tasks).
        source: Name of the recipe for messages (usually its path).
        base_dir: Folder that relative data paths are resolved against (the recipe's folder).

    Returns:
        One `TaskSpec` per entry, in order.

    Raises:
        TaskError: Naming the key path (``tasks[i].key``), what was given and what is expected.
    """
    if data is None:
        return []
    if not isinstance(data, list):
        raise _fail(source, "tasks", f"got {data!r}; expected a list of tasks, each a mapping with task, dataset_path, doc_to_text, doc_to_choice and doc_to_target")
    specs = []
    names: dict[str, str] = {}
    for i, entry in enumerate(data):
        spec = _parse_task(entry, i, source=source, base_dir=base_dir)
        if spec.name in names:
            raise _fail(source, f"{spec.key}.task", f"the name {spec.name!r} is already used by {names[spec.name]}; task names must be unique")
        names[spec.name] = spec.key
        specs.append(spec)
    return specs


def load_tasks_file(path: str | Path) -> list[TaskSpec]:
    """Read the tasks of a YAML file: a recipe (its ``tasks:`` key; other keys are ignored), a
    bare list of tasks, or one harness task mapping. Relative paths are resolved against the
    file's folder.

    Args:
        path: The YAML file.

    Returns:
        The validated tasks.

    Raises:
        TaskError: The file is missing, is not YAML, has no tasks, or a task is malformed.
    """
    path = Path(path)
    data = load_yaml_file(path, error=TaskError)
    if isinstance(data, dict) and "task" in data and "tasks" not in data:
        data = [data]
    elif isinstance(data, dict):
        if not data.get("tasks"):
            raise _fail(str(path), "tasks", "missing; add a tasks: list (see docs/tasks.md) to evaluate on")
        data = data["tasks"]
    return parse_tasks(data, source=str(path), base_dir=path.parent.resolve())


def match_tasks_to_models(tasks: Sequence[TaskSpec], model_refs: Sequence[str], *, source: str = "recipe") -> list[int | None]:
    """Which fine-tuned model each task belongs to.

    A task's ``model`` key is an index into ``models`` or a reference as written there. When no
    task has a ``model`` key and there are as many tasks as models, the i-th task belongs to the
    i-th model (the recipe lists one task per fine-tuned model); otherwise a task without the
    key belongs to none (it is evaluated only).

    Args:
        tasks: The parsed tasks.
        model_refs: The recipe's fine-tuned model references, as written, in order.
        source: Name of the recipe for messages.

    Returns:
        Per task, the model's index or None.

    Raises:
        TaskError: An index out of range, a reference not among the models, or two tasks
            claiming the same model.
    """
    if tasks and all(t.model is None for t in tasks) and len(tasks) == len(model_refs):
        return list(range(len(tasks)))
    owners: list[int | None] = []
    claimed: dict[int, str] = {}
    for t in tasks:
        if t.model is None:
            owners.append(None)
            continue
        if isinstance(t.model, int):
            if t.model >= len(model_refs):
                raise _fail(source, f"{t.key}.model", f"index {t.model} is out of range; the recipe has {len(model_refs)} model(s) (0..{len(model_refs) - 1})")
            index = t.model
        else:
            matches = [j for j, ref in enumerate(model_refs) if ref == t.model or ref.split("@")[0] == t.model]
            if not matches:
                raise _fail(source, f"{t.key}.model", f"{t.model!r} is not one of the recipe's models ({', '.join(map(repr, model_refs))}){_suggest(t.model, model_refs)}")
            index = matches[0]
        if index in claimed:
            raise _fail(source, f"{t.key}.model", f"model {index} ({model_refs[index]!r}) already has task {claimed[index]!r}; give each model one task")
        claimed[index] = t.name
        owners.append(index)
    return owners


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    """The harness's `regex_replace` filter."""
    return re.sub(pattern, repl, string, count=count)


_ENV = None


def template_environment():
    """The Jinja2 environment of task templates: sandboxed, immutable, strict about undefined
    names (a typo in a field is an error, not an empty string), with `regex_replace`."""
    global _ENV
    if _ENV is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
        _ENV.filters["regex_replace"] = _regex_replace
    return _ENV


class _Field:
    """A key whose value names a field of the data: the field's value is used as is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, doc: Mapping[str, Any]) -> Any:
        return doc[self.name]


class _Template:
    def __init__(self, source: str) -> None:
        self.source = source
        self.compiled = template_environment().from_string(source)

    def __call__(self, doc: Mapping[str, Any]) -> str:
        return self.compiled.render(doc)


def _compile(spec: TaskSpec, key: str, value: str, columns: Sequence[str], split: str) -> _Field | _Template:
    """A field reference or a compiled template, checked against the data's columns.

    Like the harness, a value equal to a field name is that field; anything else is a
    template. A bare word that is not a field is reported as a missing field rather than
    rendered as constant text, since that is nearly always a typo.
    """
    import jinja2
    from jinja2 import meta

    where = f"{spec.key}.{key}"
    fields = ", ".join(columns)
    if key != "description":  # the harness always renders the description as a template
        if value in columns:
            return _Field(value)
        if _IDENTIFIER.fullmatch(value):
            raise _fail(spec.source, where, f"field {value!r} is not in the data of task {spec.name!r} ({split} split fields: {fields}){_suggest(value, columns)}")
    env = template_environment()
    try:
        parsed = env.parse(value)
        template = _Template(value)
    except jinja2.TemplateSyntaxError as exc:
        raise _fail(spec.source, where, f"not a valid Jinja template (line {exc.lineno}): {exc.message}") from None
    missing = sorted(meta.find_undeclared_variables(parsed) - set(env.globals) - set(columns))
    if missing:
        name = missing[0]
        raise _fail(spec.source, where, f"template field {name!r} is not in the data of task {spec.name!r} ({split} split fields: {fields}){_suggest(name, columns)}")
    return template


def _render(spec: TaskSpec, key: str, fn: _Field | _Template, doc: Mapping[str, Any], where: str) -> Any:
    import jinja2

    try:
        return fn(doc)
    except jinja2.UndefinedError as exc:
        raise _fail(spec.source, f"{spec.key}.{key}", f"{where}: {exc.message} (fields: {', '.join(doc)})") from None
    except jinja2.TemplateError as exc:
        raise _fail(spec.source, f"{spec.key}.{key}", f"{where}: template error: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a template calling a method on a wrong type, ...
        raise _fail(spec.source, f"{spec.key}.{key}", f"{where}: template failed: {type(exc).__name__}: {exc}") from None


def _as_reference(spec: TaskSpec, value: Any, where: str) -> str:
    """The reference answer of a generate_until task without options: the target's text."""
    key = f"{spec.key}.doc_to_target"
    if isinstance(value, (list, tuple)):
        raise _fail(spec.source, key, f"{where}: got {value!r}; several reference answers are not supported, give one")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(spec.source, key, f"{where}: got {value!r}; expected the reference answer's text (or a number)")
    text = str(value)
    if not text.strip():
        raise _fail(spec.source, key, f"{where}: the reference answer is empty")
    return text


def _as_options(spec: TaskSpec, value: Any, where: str) -> tuple[str, ...]:
    key = f"{spec.key}.doc_to_choice"
    if isinstance(value, str):
        # A template renders text; the harness reads it as a Python literal list.
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise _fail(spec.source, key, f"{where}: rendered {value!r}, which is not a list literal such as ['no', 'yes']") from None
    if isinstance(value, dict):
        raise _fail(spec.source, key, f"{where}: got the mapping {value!r}; pick the list in a template, e.g. '{{{{ choices.text }}}}'")
    if not isinstance(value, (list, tuple)):
        raise _fail(spec.source, key, f"{where}: got {value!r}; expected a list of options")
    options = []
    for j, option in enumerate(value):
        if isinstance(option, bool) or not isinstance(option, (str, int, float)):
            raise _fail(spec.source, key, f"{where}: option {j} is {option!r}; expected text")
        options.append(str(option))
    fewest = 1 if spec.generates else 2  # for generation the options only name the labels
    if len(options) < fewest:
        raise _fail(spec.source, key, f"{where}: got {len(options)} option(s) {options!r}; expected at least {'one' if fewest == 1 else 'two'}")
    for j, option in enumerate(options):
        if not option.strip():
            raise _fail(spec.source, key, f"{where}: option {j} is empty")
    return tuple(options)


def _as_label(spec: TaskSpec, value: Any, options: tuple[str, ...], where: str) -> int:
    key = f"{spec.key}.doc_to_target"
    if isinstance(value, (list, tuple)):
        raise _fail(spec.source, key, f"{where}: got {value!r}; several correct answers are not supported, give one label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv columns with a missing value become floats
    if isinstance(value, str):
        text = value.strip()
        # The option's own text first; then, as the harness does, a number is an index.
        if value in options or text in options:
            return options.index(value if value in options else text)
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        else:
            raise _fail(spec.source, key, f"{where}: label {value!r} is not among the options {list(options)!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy integers and the like
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise _fail(spec.source, key, f"{where}: got the label {value!r}; expected an option index or an option's text") from None
    if not 0 <= value < len(options):
        raise _fail(spec.source, key, f"{where}: label {value} is out of range for {len(options)} options (0..{len(options) - 1})"
                    + ("; a test split without labels (e.g. GLUE's, labelled -1) cannot be scored" if value < 0 else ""))
    return value


# --------------------------------------------------------------------------------------------
# Loading and rendering
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _datasets_quiet(quiet: bool) -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    if quiet and not was_disabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            datasets.enable_progress_bars()


def _split_files(spec: TaskSpec, split: str) -> list[Path]:
    """The local data files of `split` (none for Hub datasets and folders)."""
    files = spec.dataset_kwargs.get("data_files")
    if files is None:
        return []
    if isinstance(files, dict):
        files = files.get(base_split_name(split), [])
    files = [files] if isinstance(files, str) else list(files)
    out = []
    for f in files:
        if _is_remote(f):
            return []
        out += [Path(p) for p in glob.glob(f)] if glob.has_magic(f) else [Path(f)]
    return out


def _check_manual_download(spec: TaskSpec) -> None:
    """Raise, with the task's instructions, when data it must get by hand is not there yet."""
    missing = []
    data_dir = spec.dataset_kwargs.get("data_dir")
    if isinstance(data_dir, str) and not _is_remote(data_dir) and spec.dataset_path in FILE_BUILDERS and not Path(data_dir).is_dir():
        missing.append(data_dir)
    files = spec.dataset_kwargs.get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    elif isinstance(files, str):
        files = [files]
    for f in files or []:
        if not _is_remote(f) and not (glob.glob(f) if glob.has_magic(f) else Path(f).is_file()):
            missing.append(f)
    if missing:
        where = "dataset_kwargs.data_dir" if missing[0] == data_dir else "dataset_kwargs.data_files"
        raise _fail(spec.source, f"{spec.key}.{where}", f"the data of task {spec.name!r} is not there ({', '.join(missing)} not found) "
                    f"and cannot be downloaded automatically: {spec.manual_download_instructions.strip()}")


def _load_split(spec: TaskSpec, split: str, which: str):
    """One split of the task's dataset as a `datasets.Dataset`."""
    import datasets

    key = f"{spec.key}.{which}_split"
    if spec.manual_download_instructions is not None:
        _check_manual_download(spec)
    files = _split_files(spec, split)
    if files and all(f.is_file() and f.stat().st_size == 0 for f in files):
        # datasets fails on an empty json file with a bare StopIteration; say what it means.
        raise _fail(spec.source, key, f"split {split!r} of task {spec.name!r} is empty ({', '.join(map(str, files))} has no data)")
    try:
        if spec.from_disk:
            loaded = datasets.load_from_disk(spec.dataset_path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise _fail(spec.source, key, f"got {split!r}; the dataset of task {spec.name!r} has the split(s) {', '.join(map(repr, loaded))}")
                return loaded[split]
            if split != "train":
                logger.info("task %s: %s holds one split; using it as %r", spec.name, spec.dataset_path, split)
            return loaded
        return datasets.load_dataset(spec.dataset_path, spec.dataset_name, split=split, **dict(spec.dataset_kwargs))
    except TaskError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds; report them as one
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if spec.dataset_path not in FILE_BUILDERS and not Path(spec.dataset_path).is_absolute():
            hint = ("; Hub datasets need the network (HF_HUB_OFFLINE is set?) or a local copy: "
                    "save it with save_to_disk and give its folder as dataset_path, or use dataset_path: json with data_files")
        raise _fail(spec.source, key, f"could not load split {split!r} of {spec.dataset_label} for task {spec.name!r}: "
                    f"{type(exc).__name__}: {message}{hint}") from None


def _carve(spec: TaskSpec, which: str, n: int) -> list[int]:
    """Row indices of split `which` after carving fractions (validation and test taken from
    opposite ends of one seeded shuffle, so they never overlap)."""
    split = spec.split_name(which)
    fraction = spec.validation_fraction if which == "validation" else spec.test_fraction
    other = "test" if which == "validation" else "validation"
    other_fraction = spec.test_fraction if which == "validation" else spec.validation_fraction
    shared = spec.split_name(other) == split
    if fraction is None and shared and other_fraction is not None:
        fraction = 1.0 - other_fraction  # the rest of the split
    if fraction is None:
        return list(range(n))
    order = list(range(n))
    random.Random(spec.seed).shuffle(order)
    count = int(round(fraction * n))
    if which == "validation" or not shared:
        chosen = order[:count]
    else:
        chosen = order[n - count:] if count else []
    return sorted(chosen)


def _subsample(spec: TaskSpec, which: str, indices: list[int]) -> list[int]:
    if spec.limit is not None:
        return indices[: spec.limit]
    wanted = spec.num_validation_examples if which == "validation" else spec.num_test_examples
    if wanted is None or wanted >= len(indices):
        if wanted is not None:
            logger.info("task %s: %s asks for %d examples; the split has %d, using all", spec.name, which, wanted, len(indices))
        return indices
    # A string seed is hashed with SHA-512 by `random`: stable across runs and Python builds.
    chosen = random.Random(f"{spec.seed}:{which}").sample(indices, wanted)
    return sorted(chosen)


def _render_split(spec: TaskSpec, which: str, dataset, indices: list[int]) -> list[Example]:
    split = spec.split_name(which)
    columns = list(dataset.column_names)
    text_fn = _compile(spec, "doc_to_text", spec.doc_to_text, columns, which)
    description_fn = _compile(spec, "description", spec.description, columns, which) if spec.description else None
    choice_fn = None if isinstance(spec.doc_to_choice, tuple) else _compile(spec, "doc_to_choice", spec.doc_to_choice, columns, which)
    target_fn = None if isinstance(spec.doc_to_target, int) else _compile(spec, "doc_to_target", spec.doc_to_target, columns, which)
    # A generate_until task without doc_to_choice: the target is the reference text itself.
    free_text = spec.generates and spec.doc_to_choice == ()
    numbers = [m.name for m in spec.metrics if m.uses_values] if spec.generates else []
    examples = []
    rows = dataset.select(indices) if len(indices) != len(dataset) else dataset
    for position, doc in zip(indices, rows):
        where = f"example {position} of split {split!r} of task {spec.name!r}"
        prompt = _render(spec, "doc_to_text", text_fn, doc, where)
        if not isinstance(prompt, str):
            prompt = str(prompt)
        if description_fn is not None:
            prompt = str(_render(spec, "description", description_fn, doc, where)) + prompt
        if free_text:
            target = spec.doc_to_target if target_fn is None else _render(spec, "doc_to_target", target_fn, doc, where)
            options, label = (_as_reference(spec, target, where),), 0
        else:
            options = spec.doc_to_choice if choice_fn is None else _as_options(spec, _render(spec, "doc_to_choice", choice_fn, doc, where), where)
            target = spec.doc_to_target if target_fn is None else _render(spec, "doc_to_target", target_fn, doc, where)
            label = _as_label(spec, target, options, where)
        if numbers and _parse_number(options[label]) is None:
            raise _fail(spec.source, f"{spec.key}.doc_to_target", f"{where}: the reference {options[label]!r} is not a number, which "
                        f"{numbers[0]} compares with the number in the generated text")
        examples.append(Example(prompt, options, label))
    return examples


def load_task_data(spec: TaskSpec, splits: Sequence[str] | None = None, *, progress: bool = False) -> TaskData:
    """Read a task's data and render its examples. Call it before loading any model: every
    problem with the data is raised here.

    Args:
        spec: A parsed task.
        splits: Which of "validation" and "test" to load; None loads every split the task
            names. A split the task does not name is an error.
        progress: Show `datasets`' progress bars while reading.

    Returns:
        The task with `validation` / `test` example lists (None for splits not loaded).

    Raises:
        TaskError: A split cannot be read or is empty, a template names a field the data lacks,
            an example has fewer than two options (one for generate_until), a label is out of
            range or not among the options, or a generate_until reference is empty (or not a
            number for a correlation metric). Messages name the task, the key and the example.
    """
    wanted = [s for s in ("validation", "test") if spec.split_name(s) is not None] if splits is None else list(splits)
    data = TaskData(spec)
    cache: dict[str, Any] = {}
    with _datasets_quiet(not progress):
        for which in wanted:
            if which not in ("validation", "test"):
                raise ValueError(f"splits must name 'validation' or 'test', got {which!r}")
            split = spec.split_name(which)
            if split is None:
                raise _fail(spec.source, f"{spec.key}.{which}_split", f"missing; task {spec.name!r} has no {which} split to evaluate on")
            if split not in cache:
                cache[split] = _load_split(spec, split, which)
            dataset = cache[split]
            if len(dataset) == 0:
                raise _fail(spec.source, f"{spec.key}.{which}_split", f"split {split!r} of task {spec.name!r} is empty")
            indices = _subsample(spec, which, _carve(spec, which, len(dataset)))
            if not indices:
                fraction = spec.validation_fraction if which == "validation" else spec.test_fraction
                raise _fail(spec.source, f"{spec.key}.{which}_fraction" if fraction else f"{spec.key}.{which}_split",
                            f"leaves no {which} examples of task {spec.name!r} (split {split!r} has {len(dataset)})")
            setattr(data, which, _render_split(spec, which, dataset, indices))
    return data


def metric_names() -> list[str]:
    """The metric names a task may use without a network (local modules and harness aliases)."""
    from .metrics import LOCAL_METRICS

    return sorted(set(LOCAL_METRICS) | set(METRIC_ALIASES))
