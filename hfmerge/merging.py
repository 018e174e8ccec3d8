"""Run a plan: stream every tensor position through the method into the shard writer.

Memory stays bounded by the tensors of one position times the number of models. The output
is written into a temporary folder beside the target and renamed into place only when
complete; on any failure the temporary folder is removed and the target is untouched.

The output may never be, contain or lie inside anything the run reads (model folders, Fisher
files, task data, the caches, the recipe itself): `check_output` refuses it before anything is
read. A full, read-only or forbidden disk is reported as one `OutputWriteError` naming the
path. Each temporary folder records its owner, so the next run on the same output removes
those of killed runs.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, TypeVar

import yaml
from tqdm.auto import tqdm

from . import __version__
from .checkpoints.reader import torch_dtypes
from .checkpoints.writer import ShardedSafetensorsWriter
from .fileio import WRITE_ERRNOS, current_umask, free_bytes, human_size, output_write_error
from .constants import TORCH_DTYPE_NAMES
from .errors import (
    HfMergeError, IncompatibleCheckpointsError, NonFiniteTensorError, OutputExistsError, OutputIsInputError, OutputWriteError,
)
from .planning import MergePlan, TensorPlan
from .tokenizer import align_rows

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# Files copied from the config source and the tokenizer source when present.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
RECIPE_FILE = "hfmerge_recipe.yaml"


@dataclass
class MergeResult:
    """What a merge produced.

    Attributes:
        output: The output folder.
        files: The files written into it.
        warnings: The plan's warnings, then those of the merge.
        evaluation: The validation `EvalReport` when the recipe has tasks and evaluation ran.
        summary: The plan summary (`hfmerge.plan_summary`), set by `hfmerge.merge`.
        search: A DF-Merge search's `SearchResult` (None when the coefficients were fixed).
        test_evaluation: A DF-Merge output's test-split `EvalReport`, when its tasks have one.
        pushed: The Hub commit (`PublishResult`) when the output was pushed.
    """

    output: Path
    files: list[str]
    warnings: list[str]
    evaluation: Any = None
    summary: dict[str, Any] | None = None
    search: Any = None
    test_evaluation: Any = None
    pushed: Any = None


def dare_seed(seed: int, alias_key: str, model_index: int) -> int:
    """The seed of one model's random mask on one tensor: independent of processing order, and
    the same for tied aliases so that they stay identical."""
    digest = hashlib.blake2b(f"{seed}\0{alias_key}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (also inside lists, tuples and dicts) moved to `device`."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a float32 tensor is finite.

    The sum is one pass without a temporary: NaN or ±Inf anywhere makes it non-finite. Only
    then (or when finite entries overflow the float32 sum) is the exact, slower test run.
    """
    import torch

    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class TensorMerger:
    """Turns one planned tensor position into its merged tensor (reads, checks, calls the method).

    Inputs are read and checked on the CPU; the method's arithmetic runs on `device` (its
    inputs, importances and pre-pass results are moved there for the call) and the result
    comes back to the CPU in the output dtype, ready to be written. Random draws stay on the
    CPU generators, so a seeded merge gives the same masks on every device.
    """

    def __init__(self, plan: MergePlan, device: str | torch.device = "cpu"):
        import torch

        self.plan = plan
        self.device = torch.device(device)
        self.recipe = plan.recipe
        self.method = plan.recipe.method
        self.warnings: list[str] = []
        self.prepared: dict[str, Any] = {}  # the method's pre-pass results, passed to every call
        self._node_fishers: list[dict[str, torch.Tensor]] | None = None
        self._preloaded: tuple[TensorPlan, Any] | None = None

    def _float(self, tensor: torch.Tensor, label: str, name: str) -> torch.Tensor:
        import torch

        t = tensor.to(torch.float32)
        if not _all_finite(t):
            msg = f"{label}: tensor {name!r} contains NaN or Inf values"
            if not self.recipe.allow_nonfinite:
                raise NonFiniteTensorError(msg + "; the checkpoint is damaged. Set `allow_nonfinite: true` in the recipe to merge it anyway")
            if msg not in self.warnings:  # a pre-pass may read the same tensor again
                self.warnings.append(msg)
        return t

    def read_inputs(self, t: TensorPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        plan = self.plan
        base = self._float(plan.base.read(t.base_source), plan.base.label, t.base_source) if plan.base is not None and t.base_source else None
        tensors = [self._float(m.read(src), m.label, src) for m, src in zip(plan.inputs_of(t), t.sources)]
        if t.vocabulary and plan.vocabulary is not None:
            aligned = align_rows(([base] if base is not None else []) + tensors, plan.vocabulary, plan.vocabulary_group(t))
            base, tensors = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
        return base, tensors

    def params_for(self, t: TensorPlan) -> dict:
        recipe = self.recipe
        slice_spec = recipe.slices[t.slice] if t.slice is not None else None
        specs = slice_spec.sources if slice_spec is not None else recipe.models
        params = {name: recipe.tensor_param(name, t.name, t.depth, slice_spec) for name in recipe.parameters}
        for p in self.method.per_model:
            params[p.name] = [recipe.model_param(m, p.name, t.name, t.depth) for m in specs]
        return params

    def load(self, t: TensorPlan) -> Any:
        """Everything `merge` reads from the checkpoints for `t`: the checked inputs of a merged
        position, the value of a copied one. `run_merge` calls it for the next position on a
        reader thread while the current one merges (reads stay in plan order, on one thread)."""
        return self.read_inputs(t) if t.merge else self._copy_unmergeable(t)

    def preload(self, t: TensorPlan, loaded: Any) -> None:
        """Hand the next `merge(t)` what `load(t)` returned, read ahead of it."""
        self._preloaded = (t, loaded)

    def merge(self, t: TensorPlan) -> torch.Tensor:
        """The merged tensor of `t`, from what `preload` handed over for it, else read now."""
        import torch

        out_dtype = torch_dtypes()[t.out_dtype]
        ahead, self._preloaded = self._preloaded, None
        loaded = ahead[1] if ahead is not None and ahead[0] is t else self.load(t)
        del ahead
        if not t.merge:
            return loaded
        base, tensors = loaded
        kwargs = self.params_for(t)
        if self.method.needs_importance:
            kwargs["importances"] = self.importances(t)
        if self.method.random:
            seed = int(self.recipe.parameters.get("seed", 0))
            kwargs["generators"] = [torch.Generator().manual_seed(dare_seed(seed, t.alias_key, i)) for i in range(len(tensors))]
        kwargs.update(self.prepared)
        if self.device.type != "cpu":
            base, tensors, kwargs = _to_device((base, tensors, kwargs), self.device)
        merged = self.method.func(base, tensors, **kwargs)
        return merged.to(dtype=out_dtype).cpu()

    def importances(self, t: TensorPlan) -> list[torch.Tensor] | None:
        """Per model, the importance of every entry of `t` (None: the method runs without)."""
        plan = self.plan
        if plan.fishers is None:
            if self.method.importance_optional:
                return None
            raise HfMergeError(f"{self.recipe.source}: merge_method {self.method.name!r} needs the models' Fishers; "
                               "compute them first (hfmerge.compute_fishers, or the `hfmerge fisher` command)")
        if self.method.importance == "nodes":
            if self._node_fishers is None:
                from safetensors.torch import load_file

                self._node_fishers = [load_file(str(f.path)) for f in plan.fishers]
            return [plan.node_layout.importance(nf, t.name, t.shape) for nf in self._node_fishers]
        if self.method.importance == "gram" and t.fisher_sources is None:
            return None  # a tensor without Gram matrices: the method averages it
        return [self._float(f.read(src), f.label, src) for f, src in zip(plan.fishers, t.fisher_sources)]  # type: ignore[arg-type]

    def _copy_unmergeable(self, t: TensorPlan) -> torch.Tensor:
        import torch

        models = self.plan.inputs_of(t)
        ref, name = (self.plan.base, t.base_source) if t.base_source else (models[0], t.sources[0])
        value = ref.read(name)
        for m, src in zip(models, t.sources):
            if not torch.equal(m.read(src), value):
                raise IncompatibleCheckpointsError(
                    f"tensor {t.name!r} has dtype {value.dtype} (not floating point) and differs between {ref.label} and {m.label}; "
                    "it cannot be merged. Check that these models are fine-tunes of one checkpoint"
                )
        return value

    # -- whole-model pre-pass ------------------------------------------------------------

    def prepare(self, progress: bool) -> None:
        """Run the method's `prepare` hook once, before the per-tensor merge."""
        self.prepared = self.method.prepared_kwargs(_PrepareContext(self, progress))


class _PrepareContext:
    """The read-only view of a plan that a method's `prepare` hook gets (`methods.registry.PrepareContext`)."""

    def __init__(self, merger: TensorMerger, progress: bool):
        self._merger = merger
        self._progress = progress
        self.recipe = merger.recipe
        self.positions = [t for t in merger.plan.tensors if t.merge]

    def inputs(self, position: TensorPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self._merger.read_inputs(position)

    def importances(self, position: TensorPlan) -> list[torch.Tensor]:
        fishers = self._merger.plan.fishers
        if fishers is None or self.recipe.method.importance != "diagonal":
            raise HfMergeError(f"{self.recipe.source}: merge_method {self.recipe.method.name!r} reads diagonal Fishers in its pre-pass; "
                               "it must declare needs_importance with importance 'diagonal' and the plan must have them")
        return [f.read(src) for f, src in zip(fishers, position.fisher_sources)]  # type: ignore[arg-type]

    def progress(self, items: Iterable[_T], desc: str) -> Iterator[_T]:
        return iter(tqdm(items, desc=desc, disable=not self._progress, unit="tensor"))


# -- what the output may not touch -----------------------------------------------------------


@dataclass(frozen=True)
class InputPath:
    """A local path a run reads, with the recipe field (or setting) that names it.

    Attributes:
        path: The file or folder as given.
        field: Where it comes from, for messages: ``recipe.yaml: models[0].model``,
            ``HF_HUB_CACHE``, ...
        output_may_lie_inside: True for a folder of which the run reads only some parts or
            only fresh subfolders it creates (``HF_HOME``, the temporary-files folder): an
            output inside it harms nothing, one that is or contains it does.
    """

    path: Path
    field: str
    output_may_lie_inside: bool = False


def _real(path: Path | str) -> Path:
    # realpath resolves every symlink of the part that exists, so a link to an input (or a
    # folder reached through a linked parent) compares equal to the input itself.
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def cache_input_paths(*, datasets: bool = False) -> list[InputPath]:
    """The cache folders a run reads: the Hugging Face Hub cache, ``HF_HOME``, hfmerge's own
    cache (Fishers, tie groups) and, when tasks are loaded, the datasets cache."""
    from huggingface_hub import constants

    from .constants import cache_root, hf_home

    paths = [
        InputPath(Path(constants.HF_HUB_CACHE), "HF_HUB_CACHE, the Hugging Face Hub cache"),
        InputPath(cache_root(), "HFMERGE_CACHE, hfmerge's cache"),
        # HF_HOME also holds the token and settings; only the caches inside it are read, so an
        # output in another subfolder of it is harmless, but HF_HOME itself must survive.
        InputPath(hf_home(), "HF_HOME, the Hugging Face home folder", output_may_lie_inside=True),
    ]
    if datasets:
        from datasets import config as datasets_config  # the folder `datasets` itself uses

        paths.append(InputPath(Path(datasets_config.HF_DATASETS_CACHE), "HF_DATASETS_CACHE, the datasets cache"))
    return paths


def _data_file_paths(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in _data_file_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _data_file_paths(v)]
    # Local files were made absolute when the task was validated; a relative name belongs to a
    # Hub dataset or a dataset folder (and a URL to the network), not to this file system.
    if isinstance(value, str) and os.path.isabs(value):
        # A glob names the files it matches (existing ones; nothing is opened).
        return sorted(glob.glob(value)) if glob.has_magic(value) else [value]
    return []


def task_input_paths(tasks: list, source: str | None = None) -> list[InputPath]:
    """The local files and folders the tasks read: ``data_files``, ``data_dir``, a local
    ``dataset_path`` folder, metric modules given as paths and the task files they include.

    Args:
        tasks: Validated `TaskSpec`s (paths already absolute).
        source: Prefix of the field names (the recipe's path); default each task's own.
    """
    found: list[InputPath] = []
    for task in tasks:
        where = f"{source or task.source}: {task.key}"
        kwargs = dict(task.dataset_kwargs or {})
        for path in _data_file_paths(kwargs.get("data_files")):
            found.append(InputPath(Path(path), f"{where}.dataset_kwargs.data_files"))
        if isinstance(kwargs.get("data_dir"), str) and os.path.isabs(kwargs["data_dir"]):
            found.append(InputPath(Path(kwargs["data_dir"]), f"{where}.dataset_kwargs.data_dir"))
        if Path(task.dataset_path).is_absolute():
            found.append(InputPath(Path(task.dataset_path), f"{where}.dataset_path"))
        for metric in task.metrics:
            if Path(metric.module).is_absolute():
                found.append(InputPath(Path(metric.module), f"{where}.metric_list ({metric.name})"))
        for included in sorted(set(task.origins.values())):
            found.append(InputPath(included, f"{where}.include"))
    return found


def recipe_input_paths(recipe: Any, *, low_disk: bool = False, storage: str | None = None) -> list[InputPath]:
    """Every local path a run of `recipe` reads, found without reading any of them.

    The recipe file, local model folders (base, models, PEFT adapters, tokenizer and config
    sources), Fisher files, the tasks' data and metric modules, the caches, the low-disk
    scratch root and a search's storage file.

    Args:
        recipe: A validated `Recipe`.
        low_disk: The run downloads into a scratch folder under the temporary-files folder.
        storage: The DF-Merge search storage (a journal file path or an ``sqlite:///`` URL).
    """
    source = recipe.source
    found: list[InputPath] = []
    if recipe.path is not None:
        found.append(InputPath(Path(recipe.path), "the recipe file"))
    refs = [("base_model", recipe.base)] + [(f"{m.key}.model", m.ref) for m in recipe.models]
    refs += [("tokenizer_source", recipe.tokenizer_source), ("config_source", recipe.config_source)]
    for field_name, ref in refs:
        for part in ref.parts if ref is not None else ():
            if part.is_local and part.path is not None:
                found.append(InputPath(part.path, f"{source}: {field_name}"))
    for m in recipe.models:
        if m.fisher is not None:
            found.append(InputPath(Path(m.fisher), f"{source}: {m.key}.fisher"))
    found += task_input_paths(recipe.tasks, source)
    found += cache_input_paths(datasets=bool(recipe.tasks))
    if low_disk:
        found.append(InputPath(Path(tempfile.gettempdir()), "TMPDIR, where a low-disk run downloads", output_may_lie_inside=True))
    if storage:
        if storage.startswith("sqlite:///"):
            found.append(InputPath(Path(storage[len("sqlite:///"):]), "the search's storage database"))
        elif "://" not in storage:
            found.append(InputPath(Path(storage), "the search's storage journal"))
    return found


def plan_input_paths(plan: MergePlan) -> list[InputPath]:
    """`recipe_input_paths` plus what the plan resolved: the opened folders (Hub snapshots
    included), the Fisher files of a derived plan (computed ones, a search's) and the low-disk
    scratch folder."""
    found = recipe_input_paths(plan.recipe)
    source = plan.recipe.source
    for ckpt in ([plan.base] if plan.base is not None else []) + list(plan.models) + [plan.config_source]:
        found.append(InputPath(Path(ckpt.folder), f"{source}: {ckpt.label}"))
    found.append(InputPath(Path(plan.tokenizer_folder), f"{source}: tokenizer_source"))
    for f in plan.fishers or []:
        found.append(InputPath(Path(f.path), f.label))
    if plan.scratch is not None:
        found.append(InputPath(Path(plan.scratch), "the low-disk scratch folder"))
    return found


def check_not_input(path: Path, inputs: list[InputPath], *, what: str = "output folder", remedy: str = "choose another output folder",
                    may_contain: bool = False) -> None:
    """Refuse an output path that is, contains or lies inside an input (real paths compared).

    Args:
        path: The output folder or file.
        inputs: From `recipe_input_paths` / `plan_input_paths` / `task_input_paths`.
        what: How the message names the output ("output folder", "report file").
        remedy: What to do, for the message.
        may_contain: The output only gains new files and never replaces the folder, so
            holding an input (e.g. beside the model folders) is harmless.

    Raises:
        OutputIsInputError: Naming the input and the field it comes from.
    """
    out = _real(path)
    for inp in inputs:
        real = _real(inp.path)
        if out == real:
            relation = "is"
        elif real.is_relative_to(out) and not may_contain:
            relation = "contains"
        elif out.is_relative_to(real) and not inp.output_may_lie_inside:
            relation = "lies inside"
        else:
            continue
        resolved = f" (resolved: {out})" if out != Path(path).absolute() else ""
        raise OutputIsInputError(
            f"{what} {path}{resolved} {relation} {inp.path} ({inp.field}); an output may not be, contain or lie inside anything "
            f"the run reads, whether or not it may be overwritten: {remedy}"
        )


def check_output(output: Path, overwrite: bool, inputs: list[InputPath] | None = None) -> None:
    """Fail early (in the plan step, before anything is read) when the output cannot be written,
    and clear what killed runs left beside it.

    In this order: the output may not touch an input; stale temporary folders of killed runs
    on this output are removed (a killed overwrite may have left the old output in one, which
    is put back, so this comes before the existence check); then an existing output needs
    `overwrite`.

    Args:
        output: The output folder.
        overwrite: Whether an existing folder may be replaced.
        inputs: What the run reads (`recipe_input_paths`); the output may be, contain or lie
            inside none of them.

    Raises:
        OutputIsInputError: The output is, contains or lies inside an input.
        OutputExistsError: It exists and `overwrite` is false, or it is not a folder.
    """
    output = Path(output)
    check_not_input(output, inputs or [])
    clean_stale_temp_folders(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output folder {output} already exists; choose another output folder or allow replacing it",
                                options=("output", "overwrite"))
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a folder; remove it or choose another output folder")


def check_free_space(output: Path, needed: int) -> None:
    """Refuse up front when the disk of `output` clearly cannot hold `needed` bytes.

    When overwriting, the old folder stays until the new one is complete, so the whole size
    is needed either way.

    Raises:
        OutputWriteError: With the bytes needed and free.
    """
    free = free_bytes(Path(output).absolute())
    if free is not None and free < needed:
        raise OutputWriteError(
            f"not enough space for {output}: the merged model needs {human_size(needed)}, {human_size(free)} is free on that disk; "
            "free some space or choose an output folder on another disk", path=str(output), errno=errno.ENOSPC)


# -- temporary folders beside the output ------------------------------------------------------

OWNER_FILE = ".hfmerge-owner.json"
_SEARCH_SUFFIX = "search"  # dfmerge's study folder `.NAME.hfmerge-search`: not a temporary folder


def _temp_prefix(output: Path) -> str:
    return f".{output.name}.hfmerge-"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from ``/proc/PID/stat`` (Linux); the start time, in
    clock ticks after boot, tells a reused pid apart.

    Raises:
        FileNotFoundError: No such process.
        OSError: ``/proc`` cannot be read here.
    """
    stat = Path(f"/proc/{pid}/stat").read_text()
    try:
        fields = stat[stat.rindex(")") + 2:].split()
        return fields[0], fields[19]
    except (ValueError, IndexError):
        return None


def _start_time(pid: int) -> str | None:
    try:
        stat = _proc_stat(pid)
    except OSError:
        return None
    return stat[1] if stat is not None else None


def _owner_alive(pid: int, started: str | None) -> bool:
    try:
        stat = _proc_stat(pid)
    except FileNotFoundError:
        return False
    except OSError:
        try:  # no /proc: ask the kernel whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if stat is None:
        return True  # unreadable: assume it runs rather than delete its work
    state, start = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return started is None or start == started


def make_temp_folder(output: Path, kind: str = "") -> Path:
    """Create ``.NAME.hfmerge-[kind-]XXXX`` beside `output`, with the umask's mode and a record
    of its owner (pid, host, process start time) so that a later run can tell it is stale."""
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(output) + (f"{kind}-" if kind else ""), dir=output.parent))
    try:
        # mkdtemp makes the folder 0700 whatever the umask; the output must be readable like
        # any folder mkdir creates.
        os.chmod(tmp, 0o777 & ~current_umask())
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
        # A truncated record is treated like a missing one (the folder is left alone), so a
        # plain write is enough.
        (tmp / OWNER_FILE).write_text(json.dumps(record))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def clean_stale_temp_folders(output: Path) -> list[Path]:
    """Remove the temporary folders beside `output` left by runs that were killed.

    A folder is stale when its owner record names this host and a process that no longer
    runs (or a reused pid with another start time). Folders of live processes, of other hosts
    and without a record are left alone. A backup of an old output (``--overwrite`` killed
    between its two renames) is put back in place when the output is missing.

    Returns:
        The folders removed.
    """
    output = Path(output).absolute()
    prefix = _temp_prefix(output)
    try:
        candidates = sorted(p for p in output.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    host = socket.gethostname()
    removed: list[Path] = []
    restored = False
    for folder in candidates:
        if folder.name[len(prefix):] == _SEARCH_SUFFIX or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if owner_host != host or _owner_alive(pid, owner.get("started")):
            continue
        old = folder / "old"
        if folder.name[len(prefix):].startswith("old-") and old.is_dir() and not os.path.lexists(output):
            try:
                os.rename(old, output)
            except OSError:
                continue  # left for the user: it holds the only copy of the old output
            restored = True
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d temporary folder(s) left beside %s by killed runs: %s%s", len(removed), output,
                    ", ".join(p.name for p in removed), "; the old output folder was put back" if restored else "")
    return removed


def _written_path(exc: OSError, tmp: Path | None, output: Path) -> Path | None:
    """The output-side path an `OSError` concerns, as the user knows it, or None when it is
    not about writing the output (a read of an input, say). The temporary folders beside the
    output are never shown: they are gone when the message is read."""
    output_side = [output, *output.parents]
    for name in (exc.filename2, exc.filename):
        if not name:
            continue
        p = Path(os.fsdecode(name)).absolute()
        if tmp is not None and p.is_relative_to(tmp):
            return output / p.relative_to(tmp)
        if p.parent == output.parent and p.name.startswith(_temp_prefix(output)):
            return output
        if p.is_relative_to(output) or p in output_side:
            return p
    if exc.filename is None and exc.errno in WRITE_ERRNOS:
        return output  # a write into an open file in the temporary folder names no file
    return None


def run_merge(plan: MergePlan, output: Path, *, overwrite: bool = False, progress: bool = True,
              evaluate: Callable[[Path], Any] | None = None,
              extra: Callable[[Path, Any], tuple[list[str], str]] | None = None, title: str | None = None,
              repo_id: str | None = None, device: str = "cpu", copy_tokenizer: bool = True,
              model_card: bool = True) -> MergeResult:
    """Merge according to `plan` and write a loadable model folder at `output` atomically.

    The model is written into a temporary folder beside `output` and renamed into place when
    complete. Temporary folders left there by killed runs are removed first. The folder gets
    the mode the umask gives any new folder.

    Args:
        plan: From `build_plan`.
        output: The folder to create.
        overwrite: Replace `output` if it exists (only once the new folder is complete).
        progress: Show progress bars.
        evaluate: Called with the finished (not yet renamed) folder; its report goes into the
            model card and ``eval_results.json``.
        extra: Called with the folder and the report before the card is written; writes more
            files there (e.g. a search's plot) and returns their names and a markdown section
            for the card.
        title: The model's name in its card (default: the output folder's name).
        repo_id: The Hub repo the model will be pushed to, for the card's usage snippet.
        device: Where the method's arithmetic runs (``"cpu"``, ``"cuda"``); inputs are
            read on the CPU and results written from it.
        copy_tokenizer: Copy the tokenizer files of the tokenizer source (the base, or the
            recipe's ``tokenizer_source``), or save the tokenizer the plan built. False writes
            none unless the recipe names a tokenizer (``tokenizer_source`` or ``tokenizer``); a
            ``chat_template`` alone is then not written either, as in mergekit.
        model_card: Write ``README.md``, the model card.

    Raises:
        OutputIsInputError: `output` is, contains or lies inside an input of the plan.
        OutputExistsError: `output` exists and `overwrite` is false.
        OutputWriteError: The disk is full, read-only or not writable (nothing is left behind).
        HfMergeError: Any problem found while merging (nothing is left behind).
    """
    output = Path(output).absolute()
    try:
        check_output(output, overwrite, plan_input_paths(plan))
        check_free_space(output, plan.output_bytes)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_folder(output)
        except OSError as exc:
            raise output_write_error(exc, _written_path(exc, None, output) or output, needed=plan.output_bytes,
                                     what="the merged model") from exc
        merger = TensorMerger(plan, device)
        try:
            merger.prepare(progress)
            files, hashes = write_weights(plan, merger, tmp, progress, shown=output)
            # As in mergekit, a tokenizer the recipe names (tokenizer_source, a tokenizer block) is
            # part of the merge and written whatever copy_tokenizer says.
            named = plan.recipe.tokenizer_source is not None or plan.recipe.tokenizer is not None
            files += copy_side_files(plan, tmp, copy_tokenizer=copy_tokenizer or named)
            report = evaluate(tmp) if evaluate is not None else None
            if report is not None:
                (tmp / "eval_results.json").write_text(report.to_json())
                files.append("eval_results.json")
            section = ""
            if extra is not None:
                more, section = extra(tmp, report)
                files += more
            if model_card:
                from .card import build_card

                build_card(plan, tmp, title or output.name, report, section, repo_id=repo_id, known_hashes=hashes).save(tmp / "README.md")
                files.append("README.md")
            _finalize(output, tmp, overwrite)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                written = _written_path(exc, tmp, output)
                if written is not None:
                    raise output_write_error(exc, written, needed=plan.output_bytes, what="the merged model") from exc
            raise
    finally:
        plan.release()
    return MergeResult(output, sorted(files), plan.warnings + merger.warnings, report)


def write_weights(plan: MergePlan, merger: TensorMerger, folder: Path, progress: bool,
                  shown: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """Merge every position into the shards in `folder`; returns the files written and the
    SHA-256 of each weights file (hashed as written, for the model card).

    Three things overlap: a reader thread reads and checks the next position's inputs, this
    thread merges the current one, and the writer's thread writes and hashes the previous
    result. Memory holds at most the inputs of two positions and two results.
    """
    from concurrent.futures import ThreadPoolExecutor

    # A reference that stores tied copies under several names (e.g. `shared` and
    # `encoder.embed_tokens`) gets each copy merged from identical inputs with the same seed
    # (TensorPlan.alias_key), so the copies stay identical.
    metadata = {"hfmerge_version": __version__, "merge_method": plan.recipe.method.name}
    bar = tqdm(total=plan.output_bytes, desc="Merging", unit="B", unit_scale=True, disable=not progress)
    positions = plan.tensors
    with ThreadPoolExecutor(1, thread_name_prefix="hfmerge-reader") as reader, \
            ShardedSafetensorsWriter(folder, plan.output_tensors, plan.recipe.max_shard_size, metadata, shown_folder=shown,
                                     background=True) as writer:
        ahead = reader.submit(merger.load, positions[0]) if positions else None
        try:
            for i, t in enumerate(positions):
                assert ahead is not None
                merger.preload(t, ahead.result())
                ahead = reader.submit(merger.load, positions[i + 1]) if i + 1 < len(positions) else None
                merged = merger.merge(t)
                writer.write(t.name, merged)
                bar.update(merged.numel() * merged.element_size())
                del merged
        finally:
            if ahead is not None:
                ahead.cancel()
    bar.close()
    return writer.file_names + (["model.safetensors.index.json"] if len(writer.shards) > 1 else []), dict(writer.sha256)


def copy_side_files(plan: MergePlan, folder: Path, *, copy_tokenizer: bool = True) -> list[str]:
    copied = []
    config_folder = plan.config_source.folder
    for name in CONFIG_FILES:
        src = config_folder / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    # Record the output dtype in config.json so from_pretrained picks it by default, and what
    # the plan changed (a stacked model's layer count, a re-indexed vocabulary's size).
    if (folder / "config.json").is_file() and (plan.recipe.out_dtype is not None or plan.config_overrides):
        config = json.loads((folder / "config.json").read_text())
        if plan.recipe.out_dtype is not None:
            dtype_name = TORCH_DTYPE_NAMES[plan.recipe.out_dtype]
            config["dtype"] = dtype_name
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype_name
        for path, value in plan.config_overrides:
            scope = config
            for key in path[:-1]:
                scope = scope[key]
            scope[path[-1]] = value
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if plan.output_tokenizer is not None and copy_tokenizer:
        # A built vocabulary or a chat template: saved the way transformers saves a tokenizer.
        saved = plan.output_tokenizer.save_pretrained(str(folder))
        copied += sorted({Path(f).name for f in saved if (folder / Path(f).name).is_file()})
    else:
        for name in TOKENIZER_FILES if copy_tokenizer else ():
            src = plan.tokenizer_folder / name
            if src.is_file():
                shutil.copyfile(src, folder / name)
                copied.append(name)
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(plan.recipe.raw, sort_keys=False))
    copied.append(RECIPE_FILE)
    return copied


def _finalize(output: Path, tmp: Path, overwrite: bool) -> None:
    # The owner record belongs to the temporary folder, not to the model.
    (tmp / OWNER_FILE).unlink(missing_ok=True)
    if os.path.lexists(output):
        if not overwrite:  # appeared while we were merging
            raise OutputExistsError(f"output folder {output} appeared while merging; nothing was replaced (the result was discarded)")
        # The old folder waits in an owned backup folder until the new one is in place: a run
        # killed in between leaves it there, and the next run on this output puts it back.
        backup = make_temp_folder(output, "old")
        os.rename(output, backup / "old")
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(backup / "old", output)
            shutil.rmtree(backup, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, output)
