"""A streaming writer for sharded safetensors checkpoints.

`save_file` needs every tensor at once. Here the shapes and dtypes are known from the plan, so
each shard's header is written first and the tensors follow one at a time as they are merged:
memory holds one output tensor, never the model. Files and index follow the Hugging Face
conventions (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``) so ``from_pretrained`` loads them.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import HfMergeError
from .reader import SAFE_DTYPE_NAMES, SAFE_INDEX, SAFE_SINGLE
from .safetensors_header import DTYPE_SIZES

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, *, field: str = "max_shard_size") -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1000000`` (GB = 10^9 as in transformers)."""
    if isinstance(value, bool):
        raise HfMergeError(f"{field}: expected a size such as '5GB' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise HfMergeError(f"{field}: expected a size such as '5GB', '500MiB' or a number of bytes, got {value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if n <= 0:
        raise HfMergeError(f"{field}: must be positive, got {value!r}")
    return n


@dataclass(frozen=True)
class OutputTensor:
    """A tensor the writer expects: its name, shape and safetensors dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return int(n * DTYPE_SIZES[self.dtype])


def plan_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Cut tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its own shard)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return [SAFE_SINGLE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class ShardedSafetensorsWriter:
    """Writes tensors in a fixed order into shards whose headers are written up front.

    Use as a context manager; call `write` once per planned tensor, in plan order.
    """

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_size: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_size)
        self.file_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard = -1

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if exc_type is None:
            self.finish()

    @property
    def expected(self) -> OutputTensor | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in self.shards[index]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        self._file = open(self.folder / self.file_names[index], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the one the plan expects, with its shape and dtype."""
        if self._next >= len(self._order):
            raise HfMergeError(f"internal error: tensor {name!r} written after the last planned tensor")
        shard, planned = self._order[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or SAFE_DTYPE_NAMES.get(tensor.dtype) != planned.dtype:
            raise HfMergeError(
                f"internal error: writer expected {planned.name} {list(planned.shape)} {planned.dtype}, "
                f"got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        assert self._file is not None
        if planned.nbytes:
            self._file.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def finish(self) -> list[str]:
        """Close the last shard and write the index (for more than one shard). Returns the files written."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise HfMergeError(f"internal error: writer closed before tensor {missing!r} was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._order:  # an empty model still gets a valid file
            self._open_shard(0)
            self._file.close()  # type: ignore[union-attr]
            self._file = None
        files = list(self.file_names)
        if len(self.shards) > 1:
            weight_map = {t.name: self.file_names[si] for si, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            (self.folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
            files.append(SAFE_INDEX)
        return files
