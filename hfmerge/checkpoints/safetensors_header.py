"""Read and validate safetensors headers without reading tensor data.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end]}}``,
then the data; a tensor occupies bytes ``[8 + N + begin, 8 + N + end)`` of the file.

`parse_header_bytes` accepts exactly the headers that the ``safetensors`` library itself
loads (its ``SafeTensors::read_metadata`` and ``Metadata::validate``), local and remote alike,
so no byte is ever read from a file that library would refuse. Its rules:

- the header is at most 100 MB and lies inside the file; it is UTF-8 JSON as serde_json reads
  it (no NaN/Infinity, no number beyond the double range, no unpaired UTF-16 surrogate escape,
  at most 127 levels of nesting, whitespace around it allowed);
- the top level is an object; ``__metadata__`` (once at most) is null or an object of strings;
- every other key is a tensor: an object with ``dtype``, ``shape`` and ``data_offsets`` (each
  once; other fields are ignored) or the array ``[dtype, shape, data_offsets]``; the dtype is a
  name the library knows; shape and offsets are unsigned 64-bit integers (not floats, not
  ``-0``); a name given twice keeps its last entry, as in the library;
- sorted by ``data_offsets``, the tensors tile the data exactly: the first begins at 0, each
  begins where the previous ended, none ends before it begins, each spans ``numel × bits / 8``
  bytes (a whole number of bytes, no 64-bit overflow on the way), and the last ends at the
  end of the file. The order of the entries in the JSON does not matter.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, short_repr

# safetensors dtype names -> bytes per element, for the dtypes hfmerge reads and writes.
DTYPE_SIZES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
# Every dtype the safetensors format defines (safetensors 0.8), in bits per element: a file
# holding one of the others is still validated exactly, then refused as unsupported.
DTYPE_BITS: dict[str, int] = {
    **{name: int(size * 8) for name, size in DTYPE_SIZES.items()},
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "C64": 64,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# A header larger than this is refused (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
_U64_MAX = 2**64 - 1
# serde_json's recursion limit: a 128th level of nested arrays or objects is refused.
_MAX_JSON_DEPTH = 128
_F64_MAX_INT = int(sys.float_info.max)
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


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


class _Pairs(list):
    """A JSON object as its (key, value) pairs in order, so that repeated keys stay visible."""

    def __repr__(self) -> str:
        shown = ", ".join(f"{k!r}: {v!r}" for k, v in self[:4])
        return "{" + shown + (", ..." if len(self) > 4 else "") + "}"


class _NegativeInt(int):
    """A JSON integer written with a minus sign: valid JSON, but never a valid size or offset
    (serde_json reads ``-0`` as a float, which the library refuses too)."""

    def __repr__(self) -> str:
        return f"-{abs(int(self))}"


def _json_int(text: str) -> int:
    value = int(text)
    if abs(value) > _F64_MAX_INT:  # serde_json falls back to a double, which overflows
        raise ValueError(f"number out of range: {text[:20]}...")
    return _NegativeInt(value) if text.startswith("-") else value


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _decode_json(raw: bytes, source: str) -> Any:
    """Decode the header as serde_json would, or raise `CheckpointError`."""
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_Pairs, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{source}: the safetensors header is not valid UTF-8 ({exc.reason} at byte {exc.start}); the file is corrupted, download it again") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{source}: the safetensors header is not valid JSON ({short_repr(str(exc), 120)}); the file is corrupted, download it again") from None
    # Walk every string and container once: unpaired surrogate escapes ("\ud800") and deep
    # nesting are accepted by Python's json module but refused by serde_json.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise CheckpointError(f"{source}: the safetensors header is not valid JSON (an unpaired UTF-16 surrogate escape in "
                                      f"{short_repr(item)}); the file is corrupted, download it again") from None
        elif isinstance(item, list):
            if depth >= _MAX_JSON_DEPTH:
                raise CheckpointError(f"{source}: the safetensors header nests arrays or objects {_MAX_JSON_DEPTH} levels deep, "
                                      "more than the safetensors library reads; the file is corrupted or not safetensors, download or save it again")
            children = [x for pair in item for x in pair] if isinstance(item, _Pairs) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def _is_u64(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _U64_MAX  # not bool, not float, not negative


def _tensor_entry(name: str, entry: Any, source: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, checked field by field."""
    where = f"{source}: tensor {short_repr(name)}"
    if isinstance(entry, _Pairs):
        fields: dict[str, Any] = {}
        for key, value in entry:
            if key in _TENSOR_FIELDS:
                if key in fields:
                    raise CheckpointError(f"{where}: the header gives {key!r} twice; the file is corrupted, download or save it again")
                fields[key] = value
        missing = [key for key in _TENSOR_FIELDS if key not in fields]
        if missing:
            raise CheckpointError(f"{where}: the header entry has no {missing[0]!r}; the file is corrupted, download or save it again")
        dtype, shape, offsets = (fields[key] for key in _TENSOR_FIELDS)
    elif type(entry) is list and len(entry) == 3:  # serde also reads a struct from [dtype, shape, data_offsets]
        dtype, shape, offsets = entry
    else:
        raise CheckpointError(f"{where}: the header entry {short_repr(entry)} is not an object with dtype, shape and data_offsets; the file is corrupted, download or save it again")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where}: unknown dtype {short_repr(dtype)}; the file is corrupted or uses a dtype the safetensors format does not define")
    if type(shape) is not list or not all(_is_u64(d) for d in shape):
        raise CheckpointError(f"{where}: shape {short_repr(shape)} is not a list of non-negative integers; the file is corrupted, download or save it again")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_u64(x) for x in offsets):
        raise CheckpointError(f"{where}: data_offsets {short_repr(offsets)} is not a pair of non-negative integers; the file is corrupted, download or save it again")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _byte_size(shape: tuple[int, ...], dtype: str, where: str) -> int:
    """numel × bits / 8, refused where the library's 64-bit arithmetic overflows or a
    sub-byte dtype does not fill whole bytes."""
    numel = 1
    for d in shape:  # the running product, as the library's checked multiplication sees it
        numel *= d
        if numel > _U64_MAX:
            raise CheckpointError(f"{where}: shape {list(shape)} overflows 64-bit sizes; the file is corrupted, download or save it again")
    bits = numel * DTYPE_BITS[dtype]
    if bits > _U64_MAX:
        raise CheckpointError(f"{where}: shape {list(shape)} with dtype {dtype} overflows 64-bit sizes; the file is corrupted, download or save it again")
    if bits % 8:
        raise CheckpointError(f"{where}: shape {list(shape)} with dtype {dtype} does not fill a whole number of bytes; the file is corrupted, download or save it again")
    return bits // 8


def check_header_length(n: int, *, source: str, file_size: int | None) -> None:
    """Check the 8-byte length prefix of a safetensors file against the format and the file.

    Args:
        n: The header length the prefix gives.
        source: Name of the file, for error messages.
        file_size: Total file size, when known.

    Raises:
        CheckpointError: If the header is larger than 100 MB or runs past the end of the file.
    """
    if n > MAX_HEADER_BYTES or (file_size is not None and 8 + n > file_size):
        size = f"the file has {file_size}" if file_size is not None else f"the format allows at most {MAX_HEADER_BYTES}"
        raise CheckpointError(f"{source}: the safetensors header claims {n} bytes but {size}; the file is truncated or not safetensors")


def parse_header_bytes(raw: bytes, *, source: str, file_size: int | None = None, file: Path | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the JSON header of a safetensors file, as the safetensors library does.

    Args:
        raw: The header JSON bytes (without the 8-byte length prefix).
        source: Name of the file, for error messages.
        file_size: Total file size. When given, the tensors must end exactly at the end of the
            file; pass it wherever it is known (the Hub's file listing gives it for remote files).
        file: Path stored in each `TensorInfo`.

    Returns:
        The tensors by name, and the ``__metadata__`` mapping.

    Raises:
        CheckpointError: If the safetensors library would refuse the file (the message names
            the file and the tensor), or a tensor has a dtype hfmerge cannot read.
    """
    check_header_length(len(raw), source=source, file_size=file_size)
    header = _decode_json(raw, source)
    if not isinstance(header, _Pairs):
        raise CheckpointError(f"{source}: the safetensors header is not a JSON object; the file is corrupted or not safetensors, download or save it again")
    metadata: dict[str, str] = {}
    entries: dict[str, Any] = {}
    seen_metadata = False
    for key, value in header:
        if key != "__metadata__":
            entries[key] = value  # a repeated name keeps its last entry, as in the library
            continue
        if seen_metadata:
            raise CheckpointError(f"{source}: the safetensors header gives '__metadata__' twice; the file is corrupted, download or save it again")
        seen_metadata = True
        if value is not None:
            if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _, v in value):
                raise CheckpointError(f"{source}: the safetensors '__metadata__' {short_repr(value)} is not a mapping of strings to strings; the file is corrupted, download or save it again")
            metadata = dict(value)

    parsed = {name: _tensor_entry(name, entry, source) for name, entry in entries.items()}
    data_start = 8 + len(raw)
    tensors: dict[str, TensorInfo] = {}
    start, previous = 0, None
    # The library sorts by (begin, end) and requires the data to be tiled without gap or overlap.
    for name, (dtype, shape, begin, end) in sorted(parsed.items(), key=lambda item: (item[1][2], item[1][3])):
        where = f"{source}: tensor {short_repr(name)}"
        after = f"the end of tensor {short_repr(previous)}" if previous is not None else "the start of the data"
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin; the file is corrupted, download or save it again")
        if begin < start:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] overlap tensor {short_repr(previous)}, which ends at {start}; the file is corrupted, download or save it again")
        if begin > start:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] leave {begin - start} bytes unused after {after} (offset {start}); "
                                  "the file is corrupted, download or save it again")
        size = _byte_size(shape, dtype, where)
        if end - begin != size:
            raise CheckpointError(f"{where}: shape {list(shape)} and dtype {dtype} need {size} bytes but data_offsets [{begin}, {end}] "
                                  f"span {end - begin}; the file is corrupted, download or save it again")
        start, previous = end, name
        tensors[name] = TensorInfo(name, dtype, shape, file or Path(source), data_start + begin, data_start + end)
    if file_size is not None and data_start + start != file_size:
        last = f"tensor {short_repr(previous)}" if previous is not None else "the tensor data (none)"
        if data_start + start > file_size:
            raise CheckpointError(f"{source}: {last} ends at byte {data_start + start} but the file has only {file_size} bytes; "
                                  "the file is truncated, download it again")
        raise CheckpointError(f"{source}: {last} ends at byte {data_start + start} but the file has {file_size} bytes; "
                              f"the {file_size - data_start - start} bytes after it belong to no tensor, so the file is corrupted, download or save it again")
    unsupported = next((t for t in tensors.values() if t.dtype not in DTYPE_SIZES), None)
    if unsupported is not None:
        raise CheckpointError(f"{source}: tensor {short_repr(unsupported.name)} has dtype {unsupported.dtype}, which hfmerge cannot read "
                              f"(it reads {', '.join(DTYPE_SIZES)}); convert the checkpoint to one of these dtypes")
    return tensors, metadata


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of a local safetensors file (header bytes only).

    Raises:
        CheckpointError: If the safetensors library would refuse the file, or it is unreadable.
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)  # the size of the file actually open, not of a name that may change
            f.seek(0)
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: only {size} bytes, too short to be a safetensors file; the file is truncated or empty")
            (n,) = struct.unpack("<Q", prefix)
            check_header_length(n, source=str(path), file_size=size)
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc}); check the file") from None
    return parse_header_bytes(raw, source=str(path), file_size=size, file=path)
