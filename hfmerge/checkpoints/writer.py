"""A streaming writer for sharded safetensors checkpoints.

`save_file` needs every tensor at once. Here the shapes and dtypes are known from the plan, so
each shard's header is written first and the tensors follow one at a time as they are merged:
memory holds one output tensor, never the model. Files and index follow the Hugging Face
conventions (``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json``) so ``from_pretrained`` loads them.
"""

from __future__ import annotations

import hashlib
import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import HfMergeError, OutputWriteError
from ..fileio import output_write_error
from .base import SAFE_INDEX, SAFE_SINGLE
from .reader import safe_dtype_names
from .safetensors_header import DTYPE_SIZES

if TYPE_CHECKING:
    import torch


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
    """Cut tensors, in order, into shards of at most `max_shard_size` bytes (a larger tensor gets its own shard).

    huggingface_hub's `split_torch_state_dict_into_shards` cuts the same way until a tensor is
    larger than a shard: it then sets that tensor aside in a shard of its own and keeps filling
    the open shard after it, so files no longer follow the tensor order (``[a, BIG, c]`` becomes
    ``[BIG], [a, c]``) and a writer streaming tensors in plan order would need two files open at
    once; for an empty model it names no file at all. Here every shard is a contiguous run of the
    plan, which the streaming writer needs.

    Args:
        tensors: Every output tensor, in plan order.
        max_shard_size: Bytes per shard at most.

    Returns:
        The shards, each a non-empty run of `tensors` in order (one empty shard for no tensors).
    """
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

    Use as a context manager; call `write` once per planned tensor, in plan order. A failed
    write (full disk, read-only folder, no permission) raises `OutputWriteError` naming the
    file; removing the half-written folder is the caller's job (it owns the folder). Each
    weights file is hashed as it is written: `sha256` maps the file names to their digests
    once they are closed.

    With ``background=True`` the file work (opening shards, writing, hashing) runs on one
    thread of its own, in order, while the caller prepares the next tensor: `write` returns
    once the previous tensor is written, so at most one tensor waits. A failure of that
    thread is raised by the next `write` or by `finish`.
    """

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_size: int, metadata: dict[str, str] | None = None,
                 *, shown_folder: Path | None = None, background: bool = False):
        """
        Args:
            folder: Where the files are written (usually a temporary folder).
            tensors: Every tensor, in the order `write` will receive them.
            max_shard_size: Bytes per shard at most (a larger tensor gets its own shard).
            metadata: Extra ``__metadata__`` strings of every shard.
            shown_folder: The folder named in error messages, when `folder` is a temporary
                folder that becomes it (default: `folder`).
            background: Write on a thread of the writer's own (see the class).
        """
        self.folder = Path(folder)
        self.shown_folder = Path(shown_folder) if shown_folder is not None else self.folder
        self.shards = plan_shards(tensors, max_shard_size)
        self.file_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._shard = -1
        self._hash = hashlib.sha256()
        self.sha256: dict[str, str] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hfmerge-writer") if background else None
        self._pending: Future | None = None

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in all shards (headers add a little)."""
        return sum(t.nbytes for _, t in self._order)

    def _failed(self, exc: OSError, name: str) -> OutputWriteError:
        return output_write_error(exc, self.shown_folder / name, needed=self.total_bytes, what="the model")

    def __enter__(self) -> "ShardedSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
            else:
                try:
                    self._settle()
                    self._close_shard()
                except OutputWriteError:
                    pass  # the error already on its way says what went wrong first
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _settle(self) -> None:
        """Wait for the background write in flight, if any, and raise its error."""
        job, self._pending = self._pending, None
        if job is not None:
            job.result()

    def _close_shard(self) -> None:
        """Close the open shard, if any; a close that flushes into a full disk fails here."""
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError as exc:
            raise self._failed(exc, self.file_names[self._shard]) from exc
        finally:
            self._file = None
        self.sha256[self.file_names[self._shard]] = self._hash.hexdigest()

    @property
    def expected(self) -> OutputTensor | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def _open_shard(self, index: int) -> None:
        self._close_shard()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for t in self.shards[index]:
            header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
        self._shard = index
        self._hash = hashlib.sha256()
        try:
            self._file = open(self.folder / self.file_names[index], "wb")
            for part in (struct.pack("<Q", len(raw)), raw):
                self._file.write(part)
                self._hash.update(part)
        except OSError as exc:
            raise self._failed(exc, self.file_names[index]) from exc

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must be the one the plan expects, with its shape and dtype."""
        if self._next >= len(self._order):
            raise HfMergeError(f"internal error: tensor {name!r} written after the last planned tensor")
        shard, planned = self._order[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or safe_dtype_names().get(tensor.dtype) != planned.dtype:
            raise HfMergeError(
                f"internal error: writer expected {planned.name} {list(planned.shape)} {planned.dtype}, "
                f"got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        self._next += 1
        if self._pool is None:
            self._put(shard, planned, tensor)
        else:
            self._settle()
            self._pending = self._pool.submit(self._put, shard, planned, tensor)

    def _put(self, shard: int, planned: OutputTensor, tensor: torch.Tensor) -> None:
        """Append one checked tensor to its shard (opening the shard first) and hash it."""
        import torch

        if shard != self._shard:
            self._open_shard(shard)
        assert self._file is not None
        if planned.nbytes:
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
            try:
                self._file.write(data)
            except OSError as exc:
                raise self._failed(exc, self.file_names[shard]) from exc
            self._hash.update(data)

    def finish(self) -> list[str]:
        """Close the last shard and write the index (for more than one shard). Returns the files written."""
        self._settle()
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise HfMergeError(f"internal error: writer closed before tensor {missing!r} was written")
        if not self._order and self._file is None:  # an empty model still gets a valid file
            self._open_shard(0)
        self._close_shard()
        files = list(self.file_names)
        if len(self.shards) > 1:
            weight_map = {t.name: self.file_names[si] for si, t in self._order}
            try:
                (self.folder / SAFE_INDEX).write_text(json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")
            except OSError as exc:
                raise self._failed(exc, SAFE_INDEX) from exc
            files.append(SAFE_INDEX)
        return files
