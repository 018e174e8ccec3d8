"""Read checkpoints from local folders tensor by tensor.

A checkpoint folder holds ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` with its shards. Pickle checkpoints (``pytorch_model.bin``)
are refused unless the recipe sets ``allow_pickle: true``; even then they are loaded with
``torch.load(weights_only=True)``, which cannot run code.

Tensors are read with plain positioned reads, one at a time, so memory holds only the
tensors in flight (no memory-mapped pages of the whole file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..refs import ModelRef
from .safetensors_header import TensorInfo, read_header

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
SAFE_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


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


@dataclass
class LocalCheckpoint:
    """A checkpoint in a local folder, opened header-only.

    Attributes:
        ref: The reference it was opened from.
        label: How messages name it (the recipe key path and the reference).
        folder: The folder.
        tensors: Every stored tensor by name (header information only).
        config: The parsed ``config.json``.
        format: ``"safetensors"`` or ``"pickle"``.
    """

    ref: ModelRef
    label: str
    folder: Path
    tensors: dict[str, TensorInfo]
    config: dict
    format: str = "safetensors"
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype.

        Raises:
            CheckpointError: If the tensor is missing or the file changed underneath.
        """
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.label}: tensor {name!r} is not in the checkpoint")
        if self.format == "pickle":
            return self._read_pickle(info)
        dtype = TORCH_DTYPES[info.dtype]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = bytearray(info.nbytes)
        with open(self.local_file(info), "rb") as f:
            f.seek(info.begin)
            got = f.readinto(buf)
        if got != info.nbytes:
            raise CheckpointError(f"{self.label}: {info.file.name} ended while reading tensor {name!r}; the file is truncated, download it again")
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def local_file(self, info: TensorInfo) -> Path:
        """The local path holding `info`'s bytes (a Hub checkpoint downloads it first)."""
        return info.file

    def _read_pickle(self, info: TensorInfo) -> torch.Tensor:
        state = self._pickle_cache.get(info.file)
        if state is None:
            state = _load_pickle(self.local_file(info), self.label)
            self._pickle_cache.clear()  # keep one shard's state at a time
            self._pickle_cache[info.file] = state
        return state[info.name]


def _load_pickle(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: the restricted unpickler that cannot run code; mmap keeps memory low.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"{label}: cannot load {path.name} with torch.load(weights_only=True): {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{label}: {path.name} is not a plain state dict of tensors")
    return state


def _pickle_infos(folder: Path, label: str) -> dict[str, TensorInfo]:
    index = folder / PICKLE_INDEX
    if index.is_file():
        weight_map = _read_index(index, label)
        files = sorted(set(weight_map.values()))
    else:
        files = [PICKLE_SINGLE]
    infos: dict[str, TensorInfo] = {}
    for fname in files:
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"{label}: {fname} is listed in {PICKLE_INDEX} but missing from {folder}")
        for name, t in _load_pickle(path, label).items():
            infos[name] = TensorInfo(name, SAFE_DTYPE_NAMES[t.dtype], tuple(t.shape), path, 0, t.numel() * t.element_size())
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


def open_local_checkpoint(ref: ModelRef, *, label: str, allow_pickle: bool = False, base: LocalCheckpoint | None = None) -> LocalCheckpoint:
    """Open a local checkpoint folder, reading headers only.

    A folder with ``adapter_config.json`` is a PEFT adapter (as for transformers' own
    ``from_pretrained``): it is opened as a `LoraCheckpoint` applied to `base`.

    Args:
        ref: A local model reference.
        label: How messages name the model (e.g. ``"models[1].model (./rte)"``).
        allow_pickle: Accept ``pytorch_model.bin`` checkpoints (loaded with ``weights_only=True``).
        base: The recipe's opened base checkpoint, which an adapter is applied to.

    Raises:
        CheckpointError: Missing folder or config, no weights, a pickle-only folder without
            ``allow_pickle``, a corrupted header or index, an adapter without `base`.
    """
    assert ref.path is not None
    folder = ref.path
    if not folder.exists():
        raise CheckpointError(f"{label}: folder {folder} does not exist; check the path in the recipe")
    if not folder.is_dir():
        raise CheckpointError(f"{label}: {folder} is a file, expected a checkpoint folder holding config.json and safetensors weights")
    from .lora import is_adapter_folder, open_local_adapter

    if is_adapter_folder(folder):
        return open_local_adapter(ref, label=label, base=base, allow_pickle=allow_pickle)  # type: ignore[return-value]
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{label}: {folder} has no config.json; a checkpoint folder needs the model's config.json beside its weights")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: {config_path} is not valid JSON ({exc})") from None

    index = folder / SAFE_INDEX
    single = folder / SAFE_SINGLE
    if index.is_file():
        weight_map = _read_index(index, label)
        tensors: dict[str, TensorInfo] = {}
        for fname in sorted(set(weight_map.values())):
            path = folder / fname
            if not path.is_file():
                raise CheckpointError(f"{label}: shard {fname} is listed in {SAFE_INDEX} but missing from {folder}")
            infos, _ = read_header(path)
            tensors.update(infos)
        missing = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file.name != os.path.basename(f)]
        if missing:
            raise CheckpointError(f"{label}: {SAFE_INDEX} maps {missing[0]!r} to a shard that does not hold it; the index or a shard is corrupted")
        return LocalCheckpoint(ref, label, folder, {n: tensors[n] for n in weight_map}, config)
    if single.is_file():
        infos, _ = read_header(single)
        return LocalCheckpoint(ref, label, folder, infos, config)

    if (folder / PICKLE_SINGLE).is_file() or (folder / PICKLE_INDEX).is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{label}: {folder} holds only pickle weights ({PICKLE_SINGLE}); loading pickle can run arbitrary code, so hfmerge refuses it. "
                "Convert the checkpoint to safetensors, or set `allow_pickle: true` in the recipe to load it with torch.load(weights_only=True)"
            )
        return LocalCheckpoint(ref, label, folder, _pickle_infos(folder, label), config, format="pickle")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)}; is this an adapter folder?)" if others else ""
    raise CheckpointError(f"{label}: {folder} has no {SAFE_SINGLE} or {SAFE_INDEX}{hint}; a checkpoint folder needs safetensors weights")
