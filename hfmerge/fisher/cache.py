"""Fisher files and the Fisher cache.

A Fisher file is safetensors with the checkpoint's tensor names (each stored alias of a tied
parameter gets the parameter's Fisher) and string metadata saying exactly what it is the
Fisher of: model reference and commit (or a fingerprint of a local folder's weight files),
λ and the base when the model was λ-scaled, the task, the hash of the examples used, N, the
mode, the seed and the hfmerge version.

The cache keys a file by the SHA-256 of exactly that metadata, so a rerun, a later search or
another recipe with the same inputs reuses it. Files are written to a temporary name and
renamed into place; on use a file is checked (header parses, size matches, key matches, every
value finite and non-negative) and an entry that fails is deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import torch

from ..checkpoints.safetensors_header import read_header
from ..constants import cache_root
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "hfmerge-fisher-1"
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
    from safetensors.torch import save_file

    from ..checkpoints.writer import PATH_ERRNOS, WRITE_ERRNOS, current_umask, output_write_error

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
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                    return f"tensor {name!r} holds negative, NaN or Inf values"
    except Exception as exc:  # noqa: BLE001 - any read failure means "do not use"
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def cached_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{key}.safetensors"


def lookup(key: str, names: set[str] | None = None, root: Path | None = None) -> Path | None:
    """The cached file for `key` if present and sound; a damaged entry is deleted."""
    path = cached_path(key, root)
    if not path.exists():
        return None
    problem = check_fisher_file(path, key, names)
    if problem is None:
        return path
    logger.warning("Fisher cache entry %s is damaged (%s); recomputing it", path, problem)
    path.unlink(missing_ok=True)
    return None
