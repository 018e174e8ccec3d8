"""Read checkpoints from local folders tensor by tensor.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` with its shards. Pickle checkpoints (``pytorch_model.bin``)
are refused unless the recipe sets ``allow_pickle: true``; even then they are loaded with
``torch.load(weights_only=True)``, which cannot run code.

Tensors are read one at a time, each by mapping its own byte range of the file
(copy-on-write), so memory holds only the tensors in flight (never the pages of the whole
file) and nothing is copied until a method computes with them.

Symbolic links are followed only where they stay inside the checkpoint (`confinement_root`):
a file that hfmerge reads or copies (weights, index, config, tokenizer, model card) and whose
real path lies outside the folder is refused, unless the recipe sets
``allow_external_symlinks: true``. A Hub checkpoint's files must lie inside that repo's folder
of the Hugging Face cache (whose snapshot files are links into its ``blobs/``) or in the
low-disk scratch folder; no recipe key relaxes that.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import TORCH_DTYPE_NAMES
from ..errors import CheckpointError
from ..refs import ModelRef
from .base import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, SIDE_FILES
from .safetensors_header import TensorInfo, read_header

if TYPE_CHECKING:
    import torch



@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype (the table is `constants.TORCH_DTYPE_NAMES`).

    A function so that reading headers and planning never import torch; only reading a
    tensor does."""
    import torch

    return {name: getattr(torch, attr) for name, attr in TORCH_DTYPE_NAMES.items()}


@functools.cache
def safe_dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name (the inverse of `torch_dtypes`)."""
    return {v: k for k, v in torch_dtypes().items()}


def __getattr__(name: str) -> Any:
    # The tables under their former constant names, built (and torch imported) on first use.
    if name == "TORCH_DTYPES":
        return torch_dtypes()
    if name == "SAFE_DTYPE_NAMES":
        return safe_dtype_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def safe_relative_path(name: str, *, source: str) -> str:
    """Check that a file name from an index stays inside its folder.

    Raises:
        CheckpointError: For absolute paths, ``..`` components or backslashes.
    """
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name.split("/")[0]:
        raise CheckpointError(f"{source}: shard file name {name!r} is not a relative path inside the checkpoint; refusing it")
    if any(part in ("..", "") for part in name.split("/")):
        raise CheckpointError(f"{source}: shard file name {name!r} leaves the checkpoint folder; refusing it")
    return name


# The recipe key that lets a local checkpoint's symlinks lead out of its folder.
ALLOW_EXTERNAL_SYMLINKS = "allow_external_symlinks"


def confinement_root(folder: Path) -> Path:
    """The real folder that a checkpoint's files must resolve into.

    That is the folder itself, except for a snapshot of the Hugging Face cache
    (``models--org--name/snapshots/<commit>``, a Hub checkpoint or a local path into the cache),
    whose files are links to ``../../blobs/``: there it is the repo's cache folder.
    """
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--", "spaces--")):
        return real.parent.parent
    return real


def check_inside(path: Path, roots: list[Path], *, label: str, allow_external: bool = False, hub: bool = False) -> None:
    """Refuse a file whose real path (symlinks resolved) lies outside every one of `roots`.

    Args:
        path: The file as the checkpoint names it; a missing file passes (its reader reports it).
        roots: Real folders, as `confinement_root` gives them.
        label: How messages name the model.
        allow_external: The recipe's ``allow_external_symlinks`` (ignored for Hub checkpoints).
        hub: The file belongs to a Hub checkpoint.

    Raises:
        CheckpointError: The file leads outside, naming it, its target and the recipe key.
    """
    if not os.path.lexists(path):
        return
    real = Path(os.path.realpath(path))
    if any(real == root or root in real.parents for root in roots):
        return
    if hub:
        raise CheckpointError(
            f"{label}: {path} resolves to {real}, outside this repo's folder of the Hugging Face cache ({roots[0]}); "
            "the cache has been altered: delete that folder and run again to download the repo afresh"
        )
    if allow_external:
        return
    raise CheckpointError(
        f"{label}: {path} leads through a symbolic link to {real}, outside the model folder {roots[0]}; hfmerge follows links only inside "
        f"the folder. Copy the file into the folder, or set `{ALLOW_EXTERNAL_SYMLINKS}: true` in the recipe to follow it"
    )


@dataclass
class LocalCheckpoint:
    """A checkpoint in a local folder, opened header-only; a `Checkpoint`.

    Attributes:
        ref: The reference it was opened from.
        label: How messages name it (the recipe key path and the reference).
        folder: The folder.
        tensors: Every stored tensor by name (header information only).
        config: The parsed ``config.json``.
        format: ``"safetensors"`` or ``"pickle"``.
        commit: None: a local folder is not pinned to a commit (`HubCheckpoint` sets it).
    """

    ref: ModelRef
    label: str
    folder: Path
    tensors: dict[str, TensorInfo]
    config: dict
    format: str = "safetensors"
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    commit: str | None = None
    _confined_files: set[Path] = field(default_factory=set, repr=False)  # checked once each, not on every read

    def __post_init__(self) -> None:
        # A Hub checkpoint's folder is its cache snapshot: everything already there (config,
        # tokenizer, index; offline, the shards too) must resolve inside that repo's cache folder.
        # Local folders are checked file by file as they are opened (`open_local_checkpoint`).
        if self.ref.repo_id is None or not self.folder.is_dir():
            return
        for parent, dirs, files in os.walk(self.folder):
            for name in (*dirs, *files):
                self._confined(Path(parent) / name)

    def _confined(self, path: Path) -> Path:
        """`path`, after checking that a Hub checkpoint's file lies in its cache or scratch folder."""
        if self.ref.repo_id is not None and path not in self._confined_files:
            check_inside(path, [confinement_root(self.folder), *self._download_roots()], label=self.label, hub=True)
            self._confined_files.add(path)
        return path

    def _download_roots(self) -> list[Path]:
        """Folders besides the cache that a Hub checkpoint's files may lie in (`HubCheckpoint`)."""
        return []

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype.

        Raises:
            CheckpointError: If the tensor is missing or the file changed underneath.
        """
        import torch

        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.label}: tensor {name!r} is not in the checkpoint")
        if self.format == "pickle":
            return self._read_pickle(info)
        dtype = torch_dtypes()[info.dtype]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        # Map the tensor's bytes (copy-on-write: a method that writes into its inputs changes its
        # own pages, never the file): no copy and no fresh memory; the pages go when the tensor does.
        with open(self._confined(self.local_file(info)), "rb") as f:
            if os.fstat(f.fileno()).st_size < info.end:
                raise CheckpointError(f"{self.label}: {info.file.name} ended while reading tensor {name!r}; the file is truncated, download it again")
            if info.begin % dtype.itemsize:
                # Data not aligned to its element size (a writer that did not pad the header):
                # a view of the mapped bytes as `dtype` is impossible, so read a copy.
                buf = bytearray(info.nbytes)
                f.seek(info.begin)
                if f.readinto(buf) != info.nbytes:
                    raise CheckpointError(f"{self.label}: {info.file.name} ended while reading tensor {name!r}; the file is truncated, download it again")
                return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
            start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
            mapped = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_COPY, offset=start)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.begin - start).view(dtype).reshape(info.shape)

    def release(self) -> None:
        """Nothing to give back: a local folder's files are read in place."""

    def local_file(self, info: TensorInfo) -> Path:
        """The local path holding `info`'s bytes (a Hub checkpoint downloads it first)."""
        return info.file

    def _read_pickle(self, info: TensorInfo) -> torch.Tensor:
        state = self._pickle_cache.get(info.file)
        if state is None:
            state = load_pickle(self._confined(self.local_file(info)), self.label)
            self._pickle_cache.clear()  # keep one shard's state at a time
            self._pickle_cache[info.file] = state
        return state[info.name]


def load_pickle(path: Path, label: str) -> dict[str, torch.Tensor]:
    """Load a pickle state dict with ``torch.load(weights_only=True)`` (which cannot run code).

    Args:
        path: The ``.bin`` file.
        label: How messages name the model.

    Returns:
        The tensors by name, memory-mapped.

    Raises:
        CheckpointError: The file cannot be loaded or is not a plain dict of tensors.
    """
    import torch

    try:
        # weights_only=True: the restricted unpickler that cannot run code; mmap keeps memory low.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"{label}: cannot load {path.name} with torch.load(weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label}: {path.name} is not a plain state dict of tensors")
    return state


def _pickle_infos(folder: Path, label: str, inside: Callable[[Path], Path]) -> dict[str, TensorInfo]:
    index = folder / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_index(inside(index), label)
        files = sorted(set(weight_map.values()))
    else:
        files = [PICKLE_SINGLE]
    infos: dict[str, TensorInfo] = {}
    for fname in files:
        path = inside(folder / fname)
        if not path.is_file():
            raise CheckpointError(f"{label}: {fname} is listed in {PICKLE_INDEX} but missing from {folder}")
        for name, t in load_pickle(path, label).items():
            infos[name] = TensorInfo(name, safe_dtype_names()[t.dtype], tuple(t.shape), path, 0, t.numel() * t.element_size())
    return infos


def _read_index(path: Path, label: str) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{label}: {path} is not a valid index file (JSON with a 'weight_map' object)") from None
    for fname in set(weight_map.values()):
        safe_relative_path(fname, source=f"{label}: {path.name}")
    return weight_map


def open_local_checkpoint(ref: ModelRef, *, label: str, allow_pickle: bool = False,
                          allow_external_symlinks: bool = False) -> LocalCheckpoint:
    """Open a local checkpoint folder, reading headers only (a PEFT adapter folder is opened by
    `lora.open_local_adapter`; `hfmerge.checkpoints.open_checkpoint` chooses).

    Args:
        ref: A local model reference.
        label: How messages name the model (e.g. ``"models[1].model (./rte)"``).
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (loaded with ``weights_only=True``).
        allow_external_symlinks: Follow symlinks that lead out of the folder (the recipe key).

    Returns:
        The opened checkpoint.

    Raises:
        CheckpointError: Missing folder or config, no weights, a pickle-only folder without
            ``allow_pickle``, a corrupted header or index, a file that is a symlink out of the
            folder without ``allow_external_symlinks``.
    """
    assert ref.path is not None
    folder = ref.path
    if not folder.exists():
        raise CheckpointError(f"{label}: folder {folder} does not exist; check the path in the recipe")
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder} is a file, expected a checkpoint folder holding config.json and safetensors weights")
    roots = [confinement_root(folder)]

    def inside(path: Path) -> Path:
        # Checked before the file is first opened, so nothing outside the folder is read unless allowed.
        check_inside(path, roots, label=label, allow_external=allow_external_symlinks)
        return path

    for name in SIDE_FILES:
        inside(folder / name)
    config_path = inside(folder / "config.json")
    if not config_path.is_file():
        raise CheckpointError(f"{label}: {folder} has no config.json; a checkpoint folder needs the model's config.json beside its weights")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: {config_path} is not valid JSON ({exc})") from None

    index = folder / SAFE_INDEX
    single = folder / SAFE_SINGLE
    if index.is_file():
        weight_map = _read_index(inside(index), label)
        tensors: dict[str, TensorInfo] = {}
        for fname in sorted(set(weight_map.values())):
            path = inside(folder / fname)
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {fname} is listed in {SAFE_INDEX} but missing from {folder}")
            infos, _ = read_header(path)
            tensors.update(infos)
        missing = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file.name != os.path.basename(f)]
        if missing:
            raise CheckpointError(f"{label}: {SAFE_INDEX} maps {missing[0]!r} to a shard that does not hold it; the index or a shard is corrupted")
        return LocalCheckpoint(ref, label, folder, {n: tensors[n] for n in weight_map}, config)
    if single.is_file():
        infos, _ = read_header(inside(single))
        return LocalCheckpoint(ref, label, folder, infos, config)

    if (folder / PICKLE_SINGLE).is_file() or (folder / PICKLE_INDEX).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{label}: {folder} holds only pickle weights ({PICKLE_SINGLE}); loading pickle can run arbitrary code, so hfmerge refuses it. "
                "Convert the checkpoint to safetensors, or set `allow_pickle: true` in the recipe to load it with torch.load(weights_only=True)"
            )
        return LocalCheckpoint(ref, label, folder, _pickle_infos(folder, label, inside), config, format="pickle")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; is this an adapter folder?)" if others else ""
    raise CheckpointError(f"{label}: {folder} has no {SAFE_SINGLE} or {SAFE_INDEX}{hint}; a checkpoint folder needs safetensors weights")
