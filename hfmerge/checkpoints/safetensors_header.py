"""Read and validate safetensors headers without reading tensor data.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``,
then the data; a tensor occupies bytes ``[8 + N + begin, 8 + N + end)`` of the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# safetensors dtype names -> bytes per element.
DTYPE_SIZES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# A header larger than this is certainly corrupt (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, as the header says."""

    name: str
    dtype: str  # safetensors dtype name, e.g. "F32"
    shape: tuple[int, ...]
    file: Path
    begin: int  # absolute byte offsets in `file`
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


def parse_header_bytes(raw: bytes, *, source: str, file_size: int | None = None, file: Path | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header of a safetensors file.

    Args:
        raw: The header JSON bytes (without the 8-byte length prefix).
        source: Name of the file, for error messages.
        file_size: Total file size when known: offsets are checked against it.
        file: Path stored in each `TensorInfo`.

    Returns:
        The tensors by name, and the ``__metadata__`` mapping.

    Raises:
        CheckpointError: If the header is not valid safetensors.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: the safetensors header is not valid JSON ({exc}); the file is corrupted, download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: the safetensors header is not a JSON object; the file is corrupted")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{source}: tensor {name!r} has a malformed header entry {entry!r}; the file is corrupted") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{source}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or end < begin or math.prod(shape) * DTYPE_SIZES[dtype] != end - begin:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {list(shape)} and dtype {dtype} but occupies bytes [{begin}, {end}); the file is corrupted")
        if file_size is not None and data_start + end > file_size:
            raise CheckpointError(
                f"{source}: tensor {name!r} ends at byte {data_start + end} but the file has only {file_size} bytes; "
                "the file is truncated, download it again"
            )
        tensors[name] = TensorInfo(name, dtype, shape, file or Path(source), data_start + begin, data_start + end)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of a local safetensors file (header bytes only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file; the file is truncated or empty")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: the safetensors header claims {n} bytes but the file has {size}; the file is truncated or not safetensors")
        raw = f.read(n)
    return parse_header_bytes(raw, source=str(path), file_size=size, file=path)
