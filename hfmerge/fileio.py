"""Files and sizes, without torch: writing a small file whole, turning a failed write into one
clear line, free space and the umask, and reading and printing sizes.

The merge command imports this for its reports; it stays light so that ``hfmerge --help`` and
a dry run do not load torch.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from pathlib import Path

from .errors import OutputWriteError, RecipeError, short_repr

# What the operating system says when a write cannot succeed here at all (as opposed to a bug):
# no space, quota, a file-size limit, a read-only file system, no permission.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
# A path that cannot hold the file (missing folder, a file where a folder should be): also
# reported in one line, like the disk and permission errors above.
PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def human_size(n: float) -> str:
    """``1234567`` → ``1.2 MB`` (powers of 1000, as ``max_shard_size`` reads them)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable: the loop returns at TB")


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (its nearest existing folder), or None."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere the only way is to set it and put it back (briefly process-wide).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_write_error(exc: OSError, path: Path | str, *, needed: int | None = None, what: str = "the output",
                       remedy: str | None = None) -> OutputWriteError:
    """Turn an `OSError` from writing `path` into a one-line `OutputWriteError`.

    The message names the path, what went wrong in words, for a full disk the space needed
    and what is free, and what to do.

    Args:
        exc: The error the write raised.
        path: The file or folder being written (as the user knows it).
        needed: Bytes the whole write needs, when known.
        what: What is being written, for the message ("the merged model", "the Fisher cache").
        remedy: What to do instead of the default advice for a full or read-only disk.

    Returns:
        The error to raise (``from exc``).
    """
    code = exc.errno
    free = free_bytes(Path(path))
    if code in _SPACE_ERRNOS:
        reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EFBIG: "file too large for this file system or this process's file-size limit (ulimit -f)"}[code]
        numbers = []
        if needed is not None:
            numbers.append(f"{what} needs {human_size(needed)}")
        if free is not None:
            numbers.append(f"{human_size(free)} free there")
        detail = f" ({', '.join(numbers)})" if numbers else ""
        advice = remedy or "free some space or write to another disk"
        if code == errno.EFBIG:
            advice = "raise the file-size limit or set a smaller max_shard_size"
        return OutputWriteError(f"cannot write {path}: {reason}{detail}; {advice}", path=str(path), errno=code)
    if code == errno.EROFS:
        return OutputWriteError(f"cannot write {path}: the file system is read-only; {remedy or 'write to a folder on a writable disk'}", path=str(path), errno=code)
    if code in (errno.EACCES, errno.EPERM):
        return OutputWriteError(f"cannot write {path}: permission denied; {remedy or 'write to a folder you may write to, or fix its permissions'}", path=str(path), errno=code)
    reason = exc.strerror or str(exc)
    return OutputWriteError(f"cannot write {path}: {reason}; check the path and the disk", path=str(path), errno=code)


def write_report_file(path: Path | str, text: str, *, what: str = "the report") -> None:
    """Write a small report file (``--json``) whole or not at all.

    The text goes to a hidden temporary file beside `path` that is renamed over it, so a full
    disk or a kill never leaves a truncated report.

    Raises:
        OutputWriteError: The write failed for a disk or permission reason (one line naming `path`).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in WRITE_ERRNOS | PATH_ERRNOS:
            raise output_write_error(exc, path, needed=len(text.encode()), what=what) from exc
        raise


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, *, field: str = "max_shard_size") -> int:
    """Parse a byte size such as ``5GB``, ``500MiB`` or ``1000000`` (GB = 10^9 as in transformers).

    Args:
        value: A number of bytes, or a number with a unit (B, KB, MB, GB, TB, KiB, ..., TiB).
        field: The recipe key or CLI flag messages name.

    Returns:
        The size in bytes.

    Raises:
        RecipeError: Not a size, or not positive (the value is quoted short).
    """
    expected = "expected a size such as '5GB', '500MiB' or a number of bytes"
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 32):
        raise RecipeError(f"{field}: {expected}, got {short_repr(value)}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        size = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()] if m else math.nan
        if not math.isfinite(size):
            raise RecipeError(f"{field}: {expected}, got {short_repr(value)}")
        n = int(size)
    if n <= 0:
        raise RecipeError(f"{field}: must be positive, got {short_repr(value)}")
    return n
