"""Loading a task's data: `datasets` splits (Hub datasets, local files and folders, split
slices), data that must be downloaded by hand, the seeded carving of validation and test and
their subsets, then rendering (templates.py) into `TaskData`."""

from __future__ import annotations

import contextlib
import glob
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .schema import FILE_BUILDERS, TaskData, TaskError, TaskSpec, base_split_name, fail, is_remote, with_origin
from .templates import render_examples

logger = logging.getLogger(__name__)


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
        if is_remote(f):
            return []
        out += [Path(p) for p in glob.glob(f)] if glob.has_magic(f) else [Path(f)]
    return out


def _check_manual_download(spec: TaskSpec) -> None:
    """Raise, with the task's instructions, when data it must get by hand is not there yet."""
    missing = []
    data_dir = spec.dataset_kwargs.get("data_dir")
    if isinstance(data_dir, str) and not is_remote(data_dir) and spec.dataset_path in FILE_BUILDERS and not Path(data_dir).is_dir():
        missing.append(data_dir)
    files = spec.dataset_kwargs.get("data_files")
    if isinstance(files, dict):
        files = [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    elif isinstance(files, str):
        files = [files]
    for f in files or []:
        if not is_remote(f) and not (glob.glob(f) if glob.has_magic(f) else Path(f).is_file()):
            missing.append(f)
    if missing:
        where = "dataset_kwargs.data_dir" if missing[0] == data_dir else "dataset_kwargs.data_files"
        raise fail(spec.source, f"{spec.key}.{where}", f"the data of task {spec.name!r} is not there ({', '.join(missing)} not found) "
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
        raise fail(spec.source, key, f"split {split!r} of task {spec.name!r} is empty ({', '.join(map(str, files))} has no data)")
    try:
        if spec.from_disk:
            loaded = datasets.load_from_disk(spec.dataset_path)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise fail(spec.source, key, f"got {split!r}; the dataset of task {spec.name!r} has the split(s) {', '.join(map(repr, loaded))}")
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
        raise fail(spec.source, key, f"could not load split {split!r} of {spec.dataset_label} for task {spec.name!r}: "
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
    try:
        with _datasets_quiet(not progress):
            for which in wanted:
                if which not in ("validation", "test"):
                    raise ValueError(f"splits must name 'validation' or 'test', got {which!r}")
                split = spec.split_name(which)
                if split is None:
                    raise fail(spec.source, f"{spec.key}.{which}_split", f"missing; task {spec.name!r} has no {which} split to evaluate on")
                if split not in cache:
                    cache[split] = _load_split(spec, split, which)
                dataset = cache[split]
                if len(dataset) == 0:
                    raise fail(spec.source, f"{spec.key}.{which}_split", f"split {split!r} of task {spec.name!r} is empty")
                indices = _subsample(spec, which, _carve(spec, which, len(dataset)))
                if not indices:
                    fraction = spec.validation_fraction if which == "validation" else spec.test_fraction
                    raise fail(spec.source, f"{spec.key}.{which}_fraction" if fraction else f"{spec.key}.{which}_split",
                                f"leaves no {which} examples of task {spec.name!r} (split {split!r} has {len(dataset)})")
                setattr(data, which, render_examples(spec, which, dataset, indices))
    except TaskError as exc:
        raise with_origin(exc, spec.key, spec.origins) from None
    return data
