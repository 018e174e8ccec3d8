"""Fisher files and the Fisher cache.

A Fisher file is safetensors with the checkpoint's tensor names (each stored alias of a tied
parameter gets the parameter's Fisher) and string metadata saying exactly what it is the
Fisher of: model reference and commit (or a fingerprint of a local folder's weight files),
λ and the base when the model was λ-scaled, the task, the hash of the examples used, N, the
mode, the seed and the hfmerge version.

The cache keys a file by the SHA-256 of exactly that metadata, so a rerun, a later search or
another recipe with the same inputs reuses it. Files are written to a temporary name and
renamed into place; on use a file is checked (header parses, size matches, key matches, every
value finite and non-negative, of a Gram matrix the diagonal) and an entry that fails is
deleted and recomputed, never used.

The cache has a size cap (``HFMERGE_FISHER_CACHE_MAX``, default 50 GB): each use of an entry
marks it used (its modification time), and storing a new one deletes the least recently used
entries until the cache fits. Entries this process has used, and entries any process used in
the last `RECENT_USE_SECONDS`, are never deleted by the cap, so a merge reading them keeps them.
`scan_cache` lists the entries and `delete_cache_entries` removes them (``hfmerge cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..checkpoints.safetensors_header import read_header
from ..constants import DEFAULT_FISHER_CACHE_MAX, HFMERGE_FISHER_CACHE_MAX, cache_root
from ..errors import CheckpointError

if TYPE_CHECKING:  # torch loads only when a Fisher is read or written: `hfmerge cache` stays fast
    import torch

logger = logging.getLogger(__name__)

FORMAT = "hfmerge-fisher-1"
RECENT_USE_SECONDS = 3600.0  # entries used this recently (by any process) are kept by the cap
UNFINISHED = "an unfinished write"  # the problem of a temporary file left by a write
_IN_USE: set[Path] = set()  # entries this process looked up or stored: never evicted by it
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def cache_dir() -> Path:
    """``$HFMERGE_CACHE/fisher``, else ``$HF_HOME/hfmerge/fisher`` (``~/.cache/huggingface``)."""
    return cache_root() / "fisher"


def cache_key(metadata: dict[str, str]) -> str:
    """SHA-256 of the metadata that defines a Fisher (sorted keys, JSON)."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def save_fisher(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a Fisher file atomically: a temporary file in the same folder, then `os.replace`.

    A run killed mid-write leaves at most a hidden ``.NAME.*.tmp`` file, which no lookup reads;
    the entry's own name only ever holds a complete file. The file gets the umask's mode (as
    any file `open` creates) so that a shared cache stays readable.

    Raises:
        OutputWriteError: The cache folder's disk is full, read-only or not writable (the
            temporary file is removed).
    """
    import torch
    from safetensors.torch import save_file

    from ..fileio import PATH_ERRNOS, WRITE_ERRNOS, current_umask, output_write_error

    path = Path(path)
    data = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(data, tmp, metadata={"format": "pt", "hfmerge_format": FORMAT, **metadata})
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # safetensors reports the operating system's error inside its own exception's text.
        os_error = exc if isinstance(exc, OSError) else None
        found = None if os_error is not None or not isinstance(exc, Exception) else _OS_ERROR.search(str(exc))
        if found is not None:
            os_error = OSError(int(found.group(1)), os.strerror(int(found.group(1))))
        if os_error is not None and os_error.errno in WRITE_ERRNOS | PATH_ERRNOS:
            needed = sum(t.numel() * t.element_size() for t in data.values())
            raise output_write_error(os_error, path, needed=needed, what="the Fisher file",
                                     remedy="free some space there, or set HFMERGE_CACHE to a writable folder on a disk with space") from exc
        raise
    return path


def check_fisher_file(path: Path, key: str | None = None, names: set[str] | None = None) -> str | None:
    """Why the Fisher file at `path` cannot be used, or None when it is sound.

    Args:
        path: The file.
        key: The cache key it must carry (None: not checked).
        names: Tensor names it must hold (None: not checked).
    """
    try:
        infos, metadata = read_header(path)
    except CheckpointError as exc:
        return str(exc)
    if metadata.get("hfmerge_format") != FORMAT:
        return "not an hfmerge Fisher file"
    if key is not None and metadata.get("cache_key") != key:
        return "its metadata belongs to other inputs"
    if names is not None and not names <= set(infos):
        return f"it lacks {len(names - set(infos))} tensor(s)"
    import torch
    from safetensors import safe_open

    gram = metadata.get("kind") == "gram"  # Gram matrices have negative off-diagonal entries
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not bool(torch.isfinite(t).all()):
                    return f"tensor {name!r} holds NaN or Inf values"
                if bool(((torch.diagonal(t) if gram and t.dim() == 2 else t) < 0).any()):
                    return f"tensor {name!r} holds negative values" + (" on its diagonal" if gram else "")
    except Exception as exc:  # noqa: BLE001 - any read failure means "do not use"
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def cached_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{key}.safetensors"


def lookup(key: str, names: set[str] | None = None, root: Path | None = None) -> Path | None:
    """The cached file for `key` if present and sound (marked used); a damaged entry is deleted."""
    path = cached_path(key, root)
    if not path.exists():
        return None
    problem = check_fisher_file(path, key, names)
    if problem is None:
        _mark_used(path)
        return path
    logger.warning("Fisher cache entry %s is damaged (%s); recomputing it", path, problem)
    path.unlink(missing_ok=True)
    return None


def store(key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], root: Path | None = None) -> Path:
    """Save a Fisher into the cache under `key` (atomically, see `save_fisher`), then keep the
    cache within its size cap by deleting the least recently used entries (`enforce_size_cap`).

    Returns:
        The cached file.

    Raises:
        OutputWriteError: The cache folder's disk is full, read-only or not writable.
    """
    path = save_fisher(cached_path(key, root), tensors, {**metadata, "cache_key": key})
    _mark_used(path)
    enforce_size_cap(root)
    return path


def _mark_used(path: Path) -> None:
    _IN_USE.add(path.absolute())
    try:
        os.utime(path)  # the last use, for least-recently-used eviction
    except OSError:
        pass  # a read-only shared cache: the entry stays usable, only its recency is not kept


@dataclass(frozen=True)
class CacheEntry:
    """One Fisher file in the cache, as `scan_cache` reads it (header only).

    Attributes:
        path: The file.
        size: Its size in bytes.
        last_used: When it was last stored or used (seconds since the epoch).
        model: The model reference it is the Fisher of ("" when the header is unreadable).
        task: The task it was computed on.
        scale: The λ the model was scaled by (DF-Merge), "" for the model as is.
        kind: ``diagonal``, ``nodes`` or ``gram`` (RegMean's Gram matrices).
        problem: Why it cannot be used (unreadable header, not a Fisher file), None when sound.
    """

    path: Path
    size: int
    last_used: float
    model: str = ""
    task: str = ""
    scale: str = ""
    kind: str = ""
    problem: str | None = None


def scan_cache(root: Path | None = None) -> list[CacheEntry]:
    """The Fisher cache's entries, least recently used first (headers only, nothing loaded).

    Args:
        root: The cache folder (default `cache_dir()`).

    Returns:
        One `CacheEntry` per ``*.safetensors`` file, and one per temporary file a killed run left
        (its `problem` says so).
    """
    folder = Path(root) if root is not None else cache_dir()
    entries = []
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob(".*.tmp")):
        try:
            st = path.stat()
        except OSError:
            continue  # deleted meanwhile
        if path.name.startswith("."):
            entries.append(CacheEntry(path, st.st_size, st.st_mtime, problem=UNFINISHED))
            continue
        try:
            _, meta = read_header(path)
        except CheckpointError as exc:
            entries.append(CacheEntry(path, st.st_size, st.st_mtime, problem=str(exc)))
            continue
        problem = None if meta.get("hfmerge_format") == FORMAT else "not an hfmerge Fisher file"
        entries.append(CacheEntry(path, st.st_size, st.st_mtime, meta.get("model", ""), meta.get("task", ""), meta.get("lambda", ""),
                                  meta.get("kind", "diagonal"), problem))
    return sorted(entries, key=lambda e: e.last_used)


def delete_cache_entries(entries: list[CacheEntry]) -> int:
    """Delete cache entries; returns the bytes freed (entries already gone count nothing)."""
    freed = 0
    for entry in entries:
        try:
            entry.path.unlink()
            freed += entry.size
        except FileNotFoundError:
            pass
    return freed


def cache_size_cap() -> int | None:
    """The Fisher cache's size cap in bytes from ``HFMERGE_FISHER_CACHE_MAX`` (None: no cap).

    Raises:
        OptionError: The variable is not a size.
    """
    from ..errors import OptionError, RecipeError
    from ..fileio import parse_size

    value = os.environ.get(HFMERGE_FISHER_CACHE_MAX, DEFAULT_FISHER_CACHE_MAX).strip()
    if value.lower() in ("0", "none", "off", ""):
        return None
    try:
        return parse_size(value, field=HFMERGE_FISHER_CACHE_MAX)
    except RecipeError as exc:
        raise OptionError(f"environment variable {exc}") from None


def eviction_candidates(entries: list[CacheEntry], max_bytes: int, *, now: float | None = None) -> list[CacheEntry]:
    """The least recently used entries to delete so that the rest fit in `max_bytes`.

    Entries this process uses and entries used in the last `RECENT_USE_SECONDS` are kept even
    when the rest cannot be brought under the cap.
    """
    now = time.time() if now is None else now
    total = sum(e.size for e in entries)
    chosen = []
    for entry in sorted(entries, key=lambda e: e.last_used):
        if total <= max_bytes:
            break
        if entry.path.absolute() in _IN_USE or now - entry.last_used < RECENT_USE_SECONDS:
            continue
        chosen.append(entry)
        total -= entry.size
    return chosen


def enforce_size_cap(root: Path | None = None) -> list[CacheEntry]:
    """Delete the least recently used entries until the cache fits its cap; returns them."""
    cap = cache_size_cap()
    if cap is None:
        return []
    entries = scan_cache(root)
    evicted = eviction_candidates(entries, cap)
    if evicted:
        delete_cache_entries(evicted)
        logger.info("Fisher cache over %d bytes: deleted %d least recently used entr%s", cap, len(evicted), "y" if len(evicted) == 1 else "ies")
    if sum(e.size for e in entries) - sum(e.size for e in evicted) > cap:
        logger.warning("the Fisher cache (%s) holds more than its cap %s of entries in use; raise %s or clean it with `hfmerge cache clean`",
                       root or cache_dir(), cap, HFMERGE_FISHER_CACHE_MAX)
    return evicted
