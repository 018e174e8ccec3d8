"""Parsing tasks: a recipe's ``tasks:`` list or a tasks file checked key by key, with
``include:`` resolved first (include.py); no data is read, only the existence of local data
files is checked. Also which fine-tuned model each task belongs to."""

from __future__ import annotations

import glob
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...constants import REPO_ID
from ...errors import short_repr
from ...yamlio import PythonFunctionTag, load_yaml_file
from ..metrics import MetricSpec, resolve_metric
from .include import IncludeBudget, resolve_includes
from .schema import (
    DATA_FILE_SUFFIXES,
    DEFAULT_GENERATION_METRICS,
    DEFAULT_MAX_GEN_TOKS,
    DEFAULT_METRICS,
    DEFAULT_UNTIL,
    FILE_BUILDERS,
    GENERATION_KEY_HINTS,
    GENERATION_KEYS,
    IGNORED_HARNESS_KEYS,
    NORMALIZATIONS,
    OUTPUT_TYPES,
    TASK_KEYS,
    UNSUPPORTED_HARNESS_KEYS,
    TaskError,
    TaskSpec,
    base_split_name,
    fail,
    is_remote,
    suggest,
    with_origin,
)



def _positive_int(source: str, path: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(source, path, f"got {short_repr(value)}; expected a positive whole number (or null for all examples)")
    return value


def _fraction(source: str, path: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise fail(source, path, f"got {short_repr(value)}; expected a fraction in (0, 1]")
    return float(value)


def _string(source: str, path: str, value: Any, what: str = "a string") -> str:
    if isinstance(value, PythonFunctionTag):
        raise fail(source, path, f"'!function {value}' is not supported: hfmerge runs no Python code from recipes; write it as a Jinja template")
    if not isinstance(value, str):
        raise fail(source, path, f"got {short_repr(value)}; expected {what}")
    return value


def _resolve_local(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def _resolve_data_files(source: str, path: str, value: Any, base_dir: Path | None, check: bool = True) -> Any:
    """data_files with local paths made absolute and, with `check`, checked to exist (globs
    must match)."""
    if isinstance(value, dict):
        if not value:
            raise fail(source, path, "got an empty mapping; expected {split: file or list of files}")
        return {str(k): _resolve_data_files(source, f"{path}.{k}", v, base_dir, check) for k, v in value.items()}
    if isinstance(value, list):
        if not value:
            raise fail(source, path, "got an empty list; expected one or more files")
        return [_resolve_data_files(source, f"{path}[{i}]", v, base_dir, check) for i, v in enumerate(value)]
    text = _string(source, path, value, "a file path, a list of them, or {split: files}")
    if is_remote(text):
        return text
    resolved = _resolve_local(text, base_dir)
    if not check:
        return str(resolved)
    where = f" (relative paths are resolved against {base_dir}, the folder of the file that sets them)" if base_dir is not None and not Path(text).expanduser().is_absolute() else ""
    if glob.has_magic(str(resolved)):
        if not glob.glob(str(resolved)):
            raise fail(source, path, f"no file matches {short_repr(str(resolved))}{where}")
    elif not resolved.is_file():
        raise fail(source, path, f"data file not found: {resolved}{where}")
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
        raise fail(source, path, f"got {short_repr(value)}; expected a non-empty list of {{metric: <name>}}")
    specs = []
    seen = set()
    for j, entry in enumerate(value):
        here = f"{path}[{j}]"
        if isinstance(entry, str):  # shorthand: a bare name
            entry = {"metric": entry}
        if not isinstance(entry, dict) or "metric" not in entry:
            raise fail(source, here, f"got {short_repr(entry)}; expected {{metric: <name>}} (e.g. accuracy, f1, matthews_correlation, spearmanr, pearsonr)")
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
            raise fail(source, f"{here}.metric", str(exc)) from None
        if spec.name in seen:
            raise fail(source, f"{here}.metric", f"{short_repr(name)} is listed twice")
        if spec.uses_text:
            _exact_match_kwargs(source, here, kwargs)
        if generates and spec.uses_indices:
            raise fail(source, f"{here}.metric", f"{short_repr(name)} compares chosen options (rank classification, output_type: multiple_choice); "
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
        raise fail(source, path, f"got {short_repr(value)}; expected a mapping such as {{until: ['\\n'], max_gen_toks: 10, do_sample: false}}")
    for k in value:
        if k not in GENERATION_KEYS:
            hint = GENERATION_KEY_HINTS.get(str(k), f"unknown key{suggest(k, GENERATION_KEYS)}")
            raise fail(source, f"{path}.{k}", f"{hint} (hfmerge reads {', '.join(GENERATION_KEYS)}; decoding is greedy)")
    until = value.get("until", list(DEFAULT_UNTIL))
    if isinstance(until, str):  # the harness accepts one string
        until = [until]
    if not isinstance(until, list):
        raise fail(source, f"{path}.until", f"got {short_repr(until)}; expected a list of stop strings (or [] for none)")
    for j, stop in enumerate(until):
        if not isinstance(stop, str) or not stop:
            raise fail(source, f"{path}.until[{j}]", f"got {short_repr(stop)}; expected a non-empty stop string")
    max_gen_toks = value.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
        raise fail(source, f"{path}.max_gen_toks", f"got {short_repr(max_gen_toks)}; expected a positive whole number (the most new tokens)")
    do_sample = value.get("do_sample", False)
    if do_sample is not False:
        raise fail(source, f"{path}.do_sample", f"got {short_repr(do_sample)}; only greedy decoding is supported: do_sample: false")
    temperature = value.get("temperature", 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature != 0:
        raise fail(source, f"{path}.temperature", f"got {short_repr(temperature)}; only greedy decoding is supported: temperature: 0 (or leave it out)")
    return tuple(until), max_gen_toks


EXACT_MATCH_KWARGS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore")


def _exact_match_kwargs(source: str, path: str, kwargs: Mapping[str, Any]) -> None:
    """Check exact_match's options now rather than after the model has generated."""
    for k, v in kwargs.items():
        if k not in EXACT_MATCH_KWARGS:
            raise fail(source, f"{path}.{k}", f"unknown exact_match option{suggest(k, EXACT_MATCH_KWARGS)} (expected one of: {', '.join(EXACT_MATCH_KWARGS)})")
        if k == "regexes_to_ignore":
            patterns = [v] if isinstance(v, str) else v
            if not isinstance(patterns, list) or not all(isinstance(x, str) for x in patterns):
                raise fail(source, f"{path}.{k}", f"got {short_repr(v)}; expected a list of regular expressions")
            for j, pattern in enumerate(patterns):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise fail(source, f"{path}.{k}" + (f"[{j}]" if isinstance(v, list) else ""), f"not a valid regular expression: {exc}") from None
        elif not isinstance(v, bool):
            raise fail(source, f"{path}.{k}", f"got {short_repr(v)}; expected true or false")


def _parse_task(entry: Any, key: str, *, source: str, base_dir: Path | None, origins: Mapping[str, Path]) -> TaskSpec:
    if not isinstance(entry, dict):
        raise fail(source, key, f"got {short_repr(entry)}; expected a task mapping with task, dataset_path, doc_to_text, doc_to_choice and doc_to_target")
    for k in entry:
        if k in UNSUPPORTED_HARNESS_KEYS:
            raise fail(source, f"{key}.{k}", f"not supported: {UNSUPPORTED_HARNESS_KEYS[k]}")
        if k not in TASK_KEYS and k not in IGNORED_HARNESS_KEYS:
            raise fail(source, f"{key}.{k}", f"unknown key{suggest(k, TASK_KEYS)} (expected one of: {', '.join(TASK_KEYS)})")

    def req(k: str) -> Any:
        if entry.get(k) is None:
            raise fail(source, f"{key}.{k}", "missing; " + {
                "task": "expected the task's name",
                "dataset_path": "expected a Hub dataset id, a datasets builder with dataset_kwargs.data_files (e.g. json), or a local folder",
                "doc_to_text": "expected a Jinja template of the prompt (or a field name)",
                "doc_to_choice": "expected the answer options: a list of strings, a field holding each example's options, or a Jinja template rendering a list",
                "doc_to_target": "expected the label: a field (an index or the option's text), a Jinja template, or a fixed index",
            }[k])
        return entry[k]

    name = _string(source, f"{key}.task", req("task"), "the task's name (a string)")
    if not name.strip():
        raise fail(source, f"{key}.task", "got an empty name; expected the task's name")

    output_type = entry.get("output_type")
    if output_type is None:
        output_type = "multiple_choice"
    if output_type not in OUTPUT_TYPES:
        raise fail(source, f"{key}.output_type", f"got {short_repr(output_type)}; expected multiple_choice (rank classification over options, the default) "
                    "or generate_until (greedy generation compared with the reference text)")
    generates = output_type == "generate_until"
    if entry.get("num_fewshot") not in (None, 0):
        raise fail(source, f"{key}.num_fewshot", f"got {short_repr(entry['num_fewshot'])}; expected 0: few-shot prompts are not supported")
    if entry.get("repeats") not in (None, 1):
        raise fail(source, f"{key}.repeats", f"got {short_repr(entry['repeats'])}; expected 1 (rank classification and greedy generation are deterministic)")
    if entry.get("generation_kwargs") is not None and not generates:
        raise fail(source, f"{key}.generation_kwargs", "only used with output_type: generate_until; a multiple_choice task is scored "
                    "by rank classification and generates nothing")
    until, max_gen_toks = _generation_kwargs(source, f"{key}.generation_kwargs", entry.get("generation_kwargs")) if generates \
        else (DEFAULT_UNTIL, DEFAULT_MAX_GEN_TOKS)

    # Where the data is. A relative path is resolved against the folder of the file that sets
    # it: the recipe's, or that of the file a key was included from.
    def folder(k: str) -> Path | None:
        return origins[k].parent if k in origins else base_dir

    dataset_path = _string(source, f"{key}.dataset_path", req("dataset_path"))
    dataset_name = entry.get("dataset_name")
    if dataset_name is not None:
        dataset_name = _string(source, f"{key}.dataset_name", dataset_name, "a dataset configuration name")
    dataset_kwargs = entry.get("dataset_kwargs") or {}
    if not isinstance(dataset_kwargs, dict):
        raise fail(source, f"{key}.dataset_kwargs", f"got {short_repr(dataset_kwargs)}; expected a mapping of datasets.load_dataset arguments (e.g. data_files)")
    dataset_kwargs = dict(dataset_kwargs)
    # Data that must be downloaded by hand (Story Cloze, ...): a missing file is reported when
    # the task is loaded, with the instructions, so the recipe itself still validates.
    manual = entry.get("manual_download_instructions")
    if manual is not None:
        manual = _string(source, f"{key}.manual_download_instructions", manual, "text saying how to obtain the data")
        if not manual.strip():
            raise fail(source, f"{key}.manual_download_instructions", "got empty text; say how to obtain the data, or remove the key")
    for forbidden in ("trust_remote_code", "split", "path", "name"):
        if forbidden in dataset_kwargs:
            hint = {"trust_remote_code": "dataset scripts are never run", "split": "use validation_split / test_split",
                    "path": "use dataset_path", "name": "use dataset_name"}[forbidden]
            raise fail(source, f"{key}.dataset_kwargs.{forbidden}", f"not allowed here: {hint}")
    # data_files of a file builder are local paths (relative to the recipe); those of a Hub
    # dataset or a local dataset folder are relative to that dataset, as in datasets.
    if "data_files" in dataset_kwargs and dataset_path in FILE_BUILDERS:
        dataset_kwargs["data_files"] = _resolve_data_files(source, f"{key}.dataset_kwargs.data_files", dataset_kwargs["data_files"], folder("dataset_kwargs"),
                                                           check=manual is None)
    if isinstance(dataset_kwargs.get("data_dir"), str) and not is_remote(dataset_kwargs["data_dir"]) and dataset_path in FILE_BUILDERS:
        data_dir = _resolve_local(dataset_kwargs["data_dir"], folder("dataset_kwargs"))
        if not data_dir.is_dir() and manual is None:
            raise fail(source, f"{key}.dataset_kwargs.data_dir", f"folder not found: {data_dir}")
        dataset_kwargs["data_dir"] = str(data_dir)

    from_disk = False
    local = _resolve_local(dataset_path, folder("dataset_path"))
    if dataset_path in FILE_BUILDERS:
        if "data_files" not in dataset_kwargs and "data_dir" not in dataset_kwargs:
            raise fail(source, f"{key}.dataset_kwargs.data_files", f"missing; dataset_path {short_repr(dataset_path)} reads local files: "
                        f"give dataset_kwargs: {{data_files: {{validation: path/to/file}}}}")
    elif local.is_file() or Path(dataset_path).suffix.lower() in DATA_FILE_SUFFIXES:
        builder = DATA_FILE_SUFFIXES.get(local.suffix.lower(), "json")
        raise fail(source, f"{key}.dataset_path", f"got the file {short_repr(dataset_path)}; write dataset_path: {builder} with "
                    f"dataset_kwargs: {{data_files: {{validation: {dataset_path}}}}} (as in datasets.load_dataset)")
    elif local.is_dir():
        dataset_path = str(local.resolve())
        # A folder written by save_to_disk is read with load_from_disk; any other folder of
        # data files goes to load_dataset, which infers the splits from the file names.
        from_disk = (local / "dataset_info.json").is_file() and (local / "state.json").is_file() or (local / "dataset_dict.json").is_file()
    elif dataset_path.startswith((".", "/", "~")) or "\\" in dataset_path or not REPO_ID.match(dataset_path):
        raise fail(source, f"{key}.dataset_path", f"folder not found: {local}" + (
            f" (relative paths are resolved against {folder('dataset_path')}, the folder of the file that sets it)"
            if folder("dataset_path") is not None else ""))
    # Otherwise a Hub dataset id: it can only be checked when loaded (which needs the network).

    # Splits.
    validation_split = entry.get("validation_split")
    test_split = entry.get("test_split")
    for k, v in (("validation_split", validation_split), ("test_split", test_split)):
        if v is not None:
            _string(source, f"{key}.{k}", v, "a split name")
    if validation_split is None and test_split is None:
        raise fail(source, f"{key}.validation_split", "missing; give validation_split and/or test_split (split names of the dataset)")
    known = _split_names_of(dataset_kwargs.get("data_files"))
    if known is not None:
        for k, v in (("validation_split", validation_split), ("test_split", test_split)):
            if v is not None and base_split_name(v) not in known:
                raise fail(source, f"{key}.{k}", f"got {short_repr(v)}; data_files defines the split(s) {', '.join(map(repr, known))}{suggest(v, known)}")
    validation_fraction = _fraction(source, f"{key}.validation_fraction", entry.get("validation_fraction"))
    test_fraction = _fraction(source, f"{key}.test_fraction", entry.get("test_fraction"))
    if validation_fraction is not None and validation_split is None:
        raise fail(source, f"{key}.validation_fraction", "needs validation_split: the split the fraction is carved from")
    if test_fraction is not None and test_split is None:
        raise fail(source, f"{key}.test_fraction", "needs test_split: the split the fraction is carved from")
    if validation_split is not None and validation_split == test_split and validation_fraction and test_fraction \
            and validation_fraction + test_fraction > 1 + 1e-9:
        raise fail(source, f"{key}.test_fraction", f"validation_fraction + test_fraction = {validation_fraction + test_fraction:g} > 1; "
                    f"both are carved from split {short_repr(validation_split)} and must not overlap")

    num_validation = _positive_int(source, f"{key}.num_validation_examples", entry.get("num_validation_examples"))
    num_test = _positive_int(source, f"{key}.num_test_examples", entry.get("num_test_examples"))
    limit = _positive_int(source, f"{key}.limit", entry.get("limit"))
    if limit is not None and (num_validation is not None or num_test is not None):
        raise fail(source, f"{key}.limit", "give either limit (the first N examples of each split) or num_validation_examples / num_test_examples (a seeded random subset), not both")
    seed = entry.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail(source, f"{key}.seed", f"got {short_repr(seed)}; expected a whole number")

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
            raise fail(source, f"{key}.doc_to_choice", f"got {short_repr(choice)}; expected at least {'one option' if generates else 'two options'}")
        for j, c in enumerate(choice):
            if isinstance(c, bool) or not isinstance(c, (str, int, float)):
                raise fail(source, f"{key}.doc_to_choice[{j}]", f"got {short_repr(c)}; expected an option's text")
        doc_to_choice = tuple(str(c) for c in choice)
    else:
        doc_to_choice = _string(source, f"{key}.doc_to_choice", choice, "a list of options, a field name or a Jinja template rendering a list")
    target = req("doc_to_target")
    if isinstance(target, bool) or not isinstance(target, (str, int)):
        _string(source, f"{key}.doc_to_target", target, "a field name, a Jinja template or a fixed option index")
    if isinstance(target, int) and doc_to_choice is not None:
        if target < 0 or (isinstance(doc_to_choice, tuple) and target >= len(doc_to_choice)):
            bound = f"0..{len(doc_to_choice) - 1}" if isinstance(doc_to_choice, tuple) else "0 or more"
            raise fail(source, f"{key}.doc_to_target", f"label {target} is out of range; expected an option index {bound}")
    if generates and entry.get("normalization") is not None:
        raise fail(source, f"{key}.normalization", "compares option log-likelihoods (rank classification, output_type: multiple_choice); "
                    "a generate_until task generates its answer: remove the key")
    normalization = entry.get("normalization", "token")
    if normalization not in NORMALIZATIONS:
        raise fail(source, f"{key}.normalization", f"got {short_repr(normalization)}; expected one of {', '.join(NORMALIZATIONS)}")

    metrics = _metric_list(source, f"{key}.metric_list", entry.get("metric_list"), folder("metric_list"), output_type)
    model = entry.get("model")
    if model is not None and (isinstance(model, bool) or not isinstance(model, (int, str)) or (isinstance(model, int) and model < 0)):
        raise fail(source, f"{key}.model", f"got {short_repr(model)}; expected the index of a model in models (0, 1, ...) or its reference as written")
    return TaskSpec(
        name=name, key=key, source=source, dataset_path=dataset_path, dataset_name=dataset_name, dataset_kwargs=dataset_kwargs,
        from_disk=from_disk, validation_split=validation_split, test_split=test_split, validation_fraction=validation_fraction,
        test_fraction=test_fraction, num_validation_examples=num_validation, num_test_examples=num_test, limit=limit, seed=seed,
        doc_to_text=doc_to_text, doc_to_choice=() if doc_to_choice is None else doc_to_choice, doc_to_target=target,
        description=description, target_delimiter=target_delimiter, normalization=normalization, metrics=metrics, model=model,
        raw=entry, output_type=output_type, until=until, max_gen_toks=max_gen_toks, manual_download_instructions=manual,
        origins=dict(origins),
    )


def parse_tasks(data: list | None, *, source: str = "recipe", base_dir: Path | None = None) -> list[TaskSpec]:
    """Validate a recipe's ``tasks:`` list. Reads no data; checks that local data files exist.

    An entry's ``include:`` is resolved first (include.py): the included task files supply
    defaults that the entry's own keys override, as in lm-evaluation-harness.

    Args:
        data: The ``tasks`` value as parsed from YAML (None or missing means no tasks).
        source: Name of the recipe for messages (usually its path).
        base_dir: Folder that relative includes and data paths are resolved against (the
            recipe's folder); None: the working folder.

    Returns:
        One `TaskSpec` per entry, in order; its `raw` is the entry with its includes merged.

    Raises:
        TaskError: Naming the key path (``tasks[i].key``), what was given and what is expected;
            for a key an included file set, that file too.
    """
    if data is None:
        return []
    if not isinstance(data, list):
        raise fail(source, "tasks", f"got {short_repr(data)}; expected a list of tasks, each a mapping with task, dataset_path, doc_to_text, doc_to_choice and doc_to_target")
    specs = []
    names: dict[str, str] = {}
    budget = IncludeBudget()
    for i, entry in enumerate(data):
        key = f"tasks[{i}]"
        origins: dict[str, Path] = {}
        try:
            if isinstance(entry, dict) and "include" in entry:
                entry, origins = resolve_includes(entry, folder=base_dir if base_dir is not None else Path.cwd(), source=source, key=key,
                                                  budget=budget)
            spec = _parse_task(entry, key, source=source, base_dir=base_dir, origins=origins)
        except TaskError as exc:
            raise with_origin(exc, key, origins) from None
        except OSError as exc:  # a path the OS refuses to look at (too long, no permission)
            raise fail(source, key, f"a path in this task cannot be checked: {exc.strerror or type(exc).__name__}; "
                       f"{short_repr(exc.filename) if exc.filename else 'check its paths'}") from None
        if spec.name in names:
            raise fail(source, f"{spec.key}.task", f"the name {short_repr(spec.name)} is already used by {names[spec.name]}; task names must be unique")
        names[spec.name] = spec.key
        specs.append(spec)
    return specs


def load_tasks_file(path: str | Path) -> list[TaskSpec]:
    """Read the tasks of a YAML file: a recipe (its ``tasks:`` key; other keys are ignored), a
    bare list of tasks, or one harness task mapping. Relative paths (``include:``, data files)
    are resolved against the file's folder.

    Args:
        path: The YAML file.

    Returns:
        The validated tasks.

    Raises:
        TaskError: The file is missing, is not YAML, has no tasks, or a task is malformed.
    """
    path = Path(path)
    data = load_yaml_file(path, error=TaskError)
    # A task mapping may take its name from a file it includes.
    if isinstance(data, dict) and ("task" in data or "include" in data) and "tasks" not in data:
        data = [data]
    elif isinstance(data, dict):
        if not data.get("tasks"):
            raise fail(str(path), "tasks", "missing; add a tasks: list (see docs/tasks.md) to evaluate on")
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
                raise fail(source, f"{t.key}.model", f"index {t.model} is out of range; the recipe has {len(model_refs)} model(s) (0..{len(model_refs) - 1})")
            index = t.model
        else:
            matches = [j for j, ref in enumerate(model_refs) if ref == t.model or ref.split("@")[0] == t.model]
            if not matches:
                raise fail(source, f"{t.key}.model", f"{short_repr(t.model)} is not one of the recipe's models ({', '.join(map(repr, model_refs))}){suggest(t.model, model_refs)}")
            index = matches[0]
        if index in claimed:
            raise fail(source, f"{t.key}.model", f"model {index} ({short_repr(model_refs[index])}) already has task {short_repr(claimed[index])}; give each model one task")
        claimed[index] = t.name
        owners.append(index)
    return owners
