"""What a task is: the keys hfmerge reads, the parsed `TaskSpec`, rendered `Example`s and
`TaskData`, and `TaskError`, whose messages name the file and the key path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...constants import FILE_BUILDERS
from ...errors import TaskError
from ..metrics import MetricSpec


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
# datasets' split slicing: "validation[:50%]", "test[935:]", "train[10:20]".
_SPLIT_SLICE = re.compile(r"\s*([^\[\]]+?)\s*\[[^\[\]]*\]\s*")


def base_split_name(split: str) -> str:
    """The split a `datasets` split expression reads from: ``test`` for ``test[935:]``."""
    match = _SPLIT_SLICE.fullmatch(split)
    return match.group(1) if match else split


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
        origins: For each key that an ``include:`` supplied, the file it was read from; error
            messages about such a key name that file.
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
    origins: Mapping[str, Path] = field(default_factory=dict, compare=False, repr=False)

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


def is_remote(path: str) -> bool:
    """Whether a data path is a URL (``https://...``, ``hf://...``) rather than a local path."""
    return "://" in path


def fail(source: str, path: str, message: str) -> TaskError:
    """A `TaskError` reading ``source: path: message``.

    Args:
        source: The file (or name) the task comes from.
        path: The key path, e.g. ``tasks[0].doc_to_text``.
        message: What is wrong and what is expected.

    Returns:
        The error, its `key_path` set to `path`.
    """
    return TaskError(f"{source}: {path}: {message}", key_path=path)


def suggest(word: str, choices: Sequence[str]) -> str:
    """``; did you mean 'x'?`` for the closest of `choices` to `word`, or an empty string."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def with_origin(error: TaskError, key: str, origins: Mapping[str, Path]) -> TaskError:
    """`error`, naming the included file that set the task key it is about, if one did.

    A task's keys may come from files it includes, while messages name the including entry's
    key path; the note says where to edit.

    Args:
        error: An error about task `key` (its `key_path` under ``key.``).
        key: The task's key path, e.g. ``tasks[0]``.
        origins: The included file of each key that one supplied.

    Returns:
        `error` itself, or a copy with `` (doc_to_text is set in FILE)`` appended.
    """
    path = error.key_path or ""
    if not origins or not path.startswith(key + "."):
        return error
    top = re.split(r"[.\[]", path[len(key) + 1:], maxsplit=1)[0]
    if top not in origins:
        return error
    return TaskError(f"{error} ({top} is set in {origins[top]})", key_path=path)
