"""Checkpoints on the Hugging Face Hub, pinned to a commit and streamed shard by shard.

The plan step resolves ``org/name@revision`` to a commit SHA and reads only the safetensors
headers (HTTP range reads of a few KB per shard), so a missing repo, revision or file, a gated
repo or incompatible checkpoints are reported before any weight moves. Every later read uses
that SHA, so a push to the repo during a merge cannot change the result. Shards are downloaded
through the standard Hugging Face cache when a tensor of theirs is first needed (a second run
downloads nothing; ``HF_HUB_OFFLINE=1`` works from the cache).

Every Hub call goes through `call_with_retries` (one policy: transient failures are retried
with bounded exponential backoff, permanent ones fail at once), and every downloaded file is
hashed while it streams and checked against the hash the Hub announces for it before it is
used or kept (`_fetch`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from ..errors import CheckpointError, DownloadIntegrityError, HfMergeError
from ..refs import ModelRef
from .base import ADAPTER_CONFIG, PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, SIDE_FILES
from .reader import LocalCheckpoint, safe_relative_path
from .safetensors_header import TensorInfo, check_header_length, parse_header_bytes, read_header


logger = logging.getLogger(__name__)

T = TypeVar("T")

# Full commit SHAs and the content hashes the Hub sends as ETags: sha256 for LFS files, the git
# blob sha1 for regular files.
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1 = re.compile(r"[0-9a-f]{40}")


# -- Retries: one policy for every Hub call --------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How a Hub call that failed for a transient reason is retried.

    Transient: HTTP 408, 429, 500, 502, 503, 504, a timeout, a refused or reset connection, a
    body cut short. Anything else (401, 403, 404, a missing repo, revision or file) is final
    and fails at once.

    Attributes:
        attempts: Tries per call, the first included.
        base_wait_s: Wait before the first retry; it doubles after each retry up to `max_wait_s`.
        max_wait_s: The longest wait between two tries.
        max_retry_after_s: The longest wait a ``Retry-After`` header (429, 503) is obeyed for.
    """

    attempts: int = 5
    base_wait_s: float = 1.0
    max_wait_s: float = 8.0
    max_retry_after_s: float = 60.0


# Read at each call, so a caller (or a test) can set it once for the whole process.
RETRY_POLICY = RetryPolicy()

_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class HubRetriesExhausted(Exception):
    """A transient failure that lasted through every attempt (mapped to a message by `hub_error`)."""

    def __init__(self, last: Exception, attempts: int) -> None:
        super().__init__(f"{attempts} attempts; last: {type(last).__name__}: {_first_line(last)}")
        self.last = last
        self.attempts = attempts


class _IncompleteBody(Exception):
    """The server closed a download before the announced size: transient, resumed on retry."""


def is_transient(exc: BaseException) -> bool:
    """Whether a Hub call that raised `exc` may succeed when tried again."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, (_IncompleteBody, httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)):
        return True
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return isinstance(exc, HfHubHTTPError) and status in _TRANSIENT_STATUS


def _retry_after_s(exc: BaseException) -> float | None:
    """Seconds from a ``Retry-After: <seconds>`` header of the failed answer (the date form is ignored)."""
    response = getattr(exc, "response", None)
    value = (getattr(response, "headers", None) or {}).get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def call_with_retries(call: Callable[[], T], *, policy: RetryPolicy | None = None) -> T:
    """Run one Hub call, retrying transient failures with bounded exponential backoff.

    The client's own retries are switched off where hfmerge calls lower-level pieces, so this is
    the one place that decides how often and how long to wait; ``Retry-After`` is obeyed up to
    `RetryPolicy.max_retry_after_s`.

    Args:
        call: The call; it must be safe to repeat.
        policy: Defaults to the module's `RETRY_POLICY`.

    Returns:
        What `call` returns.

    Raises:
        HubRetriesExhausted: Every attempt failed transiently (`last` holds the final error).
        Exception: The first permanent error, unchanged.
    """
    policy = policy or RETRY_POLICY
    wait = policy.base_wait_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - sorted into transient and final below
            if not is_transient(exc):
                raise
            if attempt >= policy.attempts:
                raise HubRetriesExhausted(exc, attempt) from exc
            retry_after = _retry_after_s(exc)
            delay = min(retry_after, policy.max_retry_after_s) if retry_after is not None else wait
            logger.warning("Hub call failed (%s: %s); retrying in %.1f s (attempt %d of %d)",
                           type(exc).__name__, _first_line(exc), delay, attempt + 1, policy.attempts)
            time.sleep(delay)
            wait = min(wait * 2, policy.max_wait_s)
    raise AssertionError("unreachable")  # the loop returns or raises


def hub_error(exc: Exception, ref: ModelRef, label: str, what: str = "") -> CheckpointError:
    """Turn a huggingface_hub exception into one message naming the repo, the revision and what to do."""
    from huggingface_hub import errors as e

    rev = ref.revision or "main"
    repo_where = f"{label}: {ref.repo_id}@{rev}"
    where = repo_where + (f" {what}" if what else "")
    if isinstance(exc, HubRetriesExhausted):
        last = exc.last
        failed = "could not be downloaded" if what else "could not be read from the Hub"
        return CheckpointError(f"{where}: {failed}: the Hub did not answer or answered with an error "
                               f"({type(last).__name__}: {_first_line(last)}) on all {exc.attempts} attempts; retry later")
    if isinstance(exc, e.GatedRepoError):
        return CheckpointError(f"{repo_where}: the repo is gated; accept its conditions on the model page, then log in (`hf auth login` or HF_TOKEN)")
    if isinstance(exc, e.RevisionNotFoundError):
        return CheckpointError(f"{repo_where}: revision {rev!r} not found; check the branch, tag or commit after '@'")
    if isinstance(exc, e.DisabledRepoError):
        return CheckpointError(f"{repo_where}: access to this repo has been disabled by its owner or the Hub")
    if isinstance(exc, e.RepositoryNotFoundError):
        return CheckpointError(f"{repo_where}: repo not found; check the name, or log in (`hf auth login` or HF_TOKEN) if it is private")
    if isinstance(exc, e.OfflineModeIsEnabled) or (isinstance(exc, e.LocalEntryNotFoundError) and _offline()):
        return CheckpointError(f"{where}: not in the local cache and HF_HUB_OFFLINE is set; run once online first")
    if isinstance(exc, e.LocalEntryNotFoundError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__}: {_first_line(cause)})" if cause else ""
        return CheckpointError(f"{where}: could not be downloaded: the Hub did not answer or answered with an error{detail}, and the file is not in the local cache; retry later")
    if isinstance(exc, (e.RemoteEntryNotFoundError, e.EntryNotFoundError)):
        return CheckpointError(f"{where}: file not found in the repo at this revision")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return CheckpointError(f"{where}: access denied (HTTP 401, not authenticated); log in with `hf auth login` or set HF_TOKEN to a token that can read this repo")
    if status == 403:
        return CheckpointError(f"{where}: access forbidden (HTTP 403); the token in use may not read this repo: "
                               "check its permissions (a fine-grained token needs read access to it) or log in with another account")
    if status == 404:
        return CheckpointError(f"{where}: not found on the Hub (HTTP 404); check the repo name, the revision and the file, "
                               "or log in (`hf auth login` or HF_TOKEN) if the repo is private")
    return CheckpointError(f"{where}: Hub request failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)


@dataclass
class HubCheckpoint(LocalCheckpoint):
    """A checkpoint in a Hub repo pinned to `commit`; a `Checkpoint`. Tensor files are
    repo-relative paths until downloaded; reading works as for a local folder once they are."""

    scratch: Path | None = None  # low-disk mode: shards go here, one at a time, not to the cache
    _downloaded: dict[str, Path] = field(default_factory=dict, repr=False)

    def _download_roots(self) -> list[Path]:
        # Low-disk mode downloads into the scratch folder instead of the cache.
        return [Path(os.path.realpath(self.scratch))] if self.scratch is not None else []

    def local_file(self, info: TensorInfo) -> Path:
        key = str(info.file)
        path = self._downloaded.get(key)
        if path is None:
            if self.scratch is not None:
                self.release()  # at most one shard of this model on disk
            path = download_file(self.ref, self.label, key, self.commit, local_dir=self.scratch)
            size = path.stat().st_size
            if size < info.end:
                raise CheckpointError(f"{self.label}: {key} downloaded with {size} bytes but the header needs {info.end}; delete it from the cache and retry")
            self._check_header(key, path)
            self._downloaded[key] = path
        return path

    def _check_header(self, key: str, path: Path) -> None:
        """The plan read this file's header with range requests, which no hash covers; the
        downloaded (verified) file must describe the same tensors at the same offsets."""
        planned = {n: i for n, i in self.tensors.items() if str(i.file) == key}
        if not planned:
            return
        infos, _ = read_header(path)
        for name, want in planned.items():
            got = infos.get(want.name)
            if got is None or (got.dtype, tuple(got.shape), got.begin, got.end) != (want.dtype, tuple(want.shape), want.begin, want.end):
                raise CheckpointError(f"{self.label}: {self.ref.repo_id}@{self.commit} {key}: the downloaded file's header disagrees with the one "
                                      f"read in the plan for tensor {name!r}; the header read was damaged in transit, run the merge again")

    def release(self) -> None:
        """Low-disk mode: delete the shards downloaded so far into the scratch folder (the cache is never touched)."""
        if self.scratch is None:
            return
        for path in self._downloaded.values():
            if path.is_relative_to(self.scratch):  # a shard found in the cache was read in place
                path.unlink(missing_ok=True)
        self._downloaded.clear()


def download_file(ref: ModelRef, label: str, filename: str, revision: str, local_dir: Path | None = None) -> Path:
    """Download one repo file (verified; see `_fetch`) and map failures to one clear message.

    Args:
        ref: A Hub reference.
        label: How messages name the model.
        filename: The path in the repo.
        revision: The commit (or branch or tag) to read.
        local_dir: Low-disk mode: download into this folder instead of the cache.

    Returns:
        The file on local disk.

    Raises:
        CheckpointError: The file cannot be had (missing, forbidden, the Hub down through every
            retry, offline and not cached), or `DownloadIntegrityError` when two downloads in a
            row did not match the announced hash.
    """
    assert ref.repo_id is not None
    try:
        return _fetch(ref.repo_id, filename, revision, where=f"{label}: {ref.repo_id}@{revision} {filename}", local_dir=local_dir)
    except HfMergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one clear message
        raise hub_error(exc, ref, label, filename) from None


# -- Verified downloads -----------------------------------------------------------------------
#
# huggingface_hub's `hf_hub_download` checks a download's size but not its content, and offers
# no hook on the bytes it streams. So hfmerge downloads with the client's lower-level pieces:
# `get_hf_file_metadata` (the HEAD: commit, ETag, size, location), one streamed GET through the
# client's HTTP session, hashing each chunk as it is written (no second read), and places the
# file in the cache exactly where and how `hf_hub_download` would (`blobs/<etag>`, the
# `snapshots/<commit>/<path>` link made by the client's own `_create_symlink`, `refs/<revision>`,
# the same lock file), so transformers, `scan_cache_dir` and later runs see an ordinary cache.
# The download is written to a temporary file next to its destination and renamed into place
# only once its hash equals the ETag, so a blob whose content disagrees with its name is never
# created. A mismatch deletes the file and downloads it once more; a second mismatch is an error.


class _HashingFile:
    """A download target that hashes the bytes while writing them, in the ETag's algorithm."""

    def __init__(self, path: Path, etag: str, size: int | None) -> None:
        self.path = path
        self.etag = etag
        self.size = size
        self.written = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by `close`
        self._hash = self._new_hash()

    def _new_hash(self) -> hashlib._Hash:
        if _SHA256.fullmatch(self.etag):
            return hashlib.sha256()
        # A regular (non-LFS) file: the ETag is its git blob id, sha1 of "blob <size>\0" + content.
        h = hashlib.sha1()  # noqa: S324 - git's object id, not a security hash on its own
        h.update(b"blob %d\0" % (self.size or 0))
        return h

    def restart(self) -> None:
        self._file.seek(0)
        self._file.truncate()
        self.written = 0
        self._hash = self._new_hash()

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.written += len(chunk)

    def close(self) -> None:
        self._file.close()

    def problem(self) -> str | None:
        """Why the bytes received are not the announced file, or None when they are."""
        if self.size is not None and self.written != self.size:
            return f"{self.written} bytes received where the Hub announces {self.size}"
        if self.size is None and not _SHA256.fullmatch(self.etag):
            # No announced size to start the git blob id with: hash the (small, regular) file now.
            self._hash = hashlib.sha1(b"blob %d\0" % self.written)  # noqa: S324
            self._hash.update(self.path.read_bytes())
        digest = self._hash.hexdigest()
        if digest != self.etag:
            kind = "sha256" if _SHA256.fullmatch(self.etag) else "git blob sha1"
            return f"{kind} of the bytes received is {digest}, the Hub announces {self.etag}"
        return None


def _stream_into(url: str, headers: dict[str, str], target: _HashingFile, desc: str) -> None:
    """One GET of `url` into `target`, resuming after the bytes it already holds (one attempt)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status
    from huggingface_hub.utils import tqdm as hf_tqdm

    if target.size is not None and target.written >= target.size:
        return  # an earlier attempt got every byte and failed only after
    request_headers = dict(headers)
    resume = target.written
    if resume:
        request_headers["Range"] = f"bytes={resume}-"
    with get_session().stream("GET", url, headers=request_headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                              follow_redirects=True) as response:
        hf_raise_for_status(response)
        if resume and not (response.status_code == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {resume}-")):
            target.restart()
            if response.status_code != 200:
                raise _IncompleteBody(f"the server answered a resumed download with HTTP {response.status_code}")
        with hf_tqdm(total=target.size, initial=target.written, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
            for chunk in response.iter_bytes(constants.DOWNLOAD_CHUNK_SIZE):
                target.write(chunk)
                bar.update(len(chunk))
    if target.size is not None and target.written < target.size:
        raise _IncompleteBody(f"the connection closed after {target.written} of {target.size} bytes")


def _download_verified(url: str, headers: dict[str, str], dest: Path, etag: str, size: int | None, where: str, desc: str) -> None:
    """Stream `url` to `dest`; `dest` appears only holding bytes whose hash is `etag` (`desc`: progress bar label).

    Raises:
        DownloadIntegrityError: Two downloads in a row did not match (nothing is left behind).
        HubRetriesExhausted: The Hub kept failing transiently.
    """
    problem = ""
    for round_ in (1, 2):  # a corrupt copy is deleted and downloaded once more
        tmp = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:8]}.incomplete")
        try:
            target = _HashingFile(tmp, etag, size)
            try:
                call_with_retries(lambda: _stream_into(url, headers, target, desc if round_ == 1 else f"{desc} (again)"))
            finally:
                target.close()
            problem = target.problem() or ""
            if not problem:
                os.replace(tmp, dest)
                return
        finally:
            tmp.unlink(missing_ok=True)
        logger.warning("%s: %s; the copy was deleted", where, problem)
    raise DownloadIntegrityError(f"{where}: downloaded twice and both copies were damaged ({problem}); nothing was kept. "
                                 "Retry later; if it persists, the file on the Hub or a proxy on the way is broken")


def _fetch(repo_id: str, filename: str, revision: str, *, where: str, local_dir: Path | None = None) -> Path:
    """A repo file on local disk, downloaded and verified if needed; raises the client's errors.

    Args:
        repo_id: The model repo.
        filename: The path in the repo.
        revision: A commit SHA, or a branch or tag (then recorded in the cache's ``refs/``).
        where: The file named for messages ("label: repo@rev file").
        local_dir: Low-disk mode: download into this folder instead of the cache (a copy
            already in the cache is used in place).

    Raises:
        DownloadIntegrityError: See `_download_verified`.
        CheckpointError: The Hub's answer names no usable commit or content hash.
        HubRetriesExhausted: The Hub kept failing transiently.
        Exception: The client's errors (missing repo, revision or file; 401/403; offline).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.file_download import _create_symlink, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    if _COMMIT.fullmatch(revision):
        cached = try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
    if _offline():
        # The client's cache lookup (refs, snapshots) is the whole job; it raises when missing.
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    url = hf_hub_url(repo_id, filename, revision=revision)
    meta = call_with_retries(lambda: get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT))
    commit, etag = (meta.commit_hash or "").lower(), (meta.etag or "").lower()
    if not _COMMIT.fullmatch(commit) or not (_SHA256.fullmatch(etag) or _GIT_SHA1.fullmatch(etag)):
        raise CheckpointError(f"{where}: the Hub's answer names no commit or no content hash (X-Repo-Commit {meta.commit_hash!r}, "
                              f"ETag {meta.etag!r}), so the file cannot be verified; check HF_ENDPOINT")
    headers = build_hf_headers()
    headers["Accept-Encoding"] = "identity"  # the hash covers the stored bytes; resumed ranges need them as stored
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        download_url = meta.location  # a storage host the Hub redirects to: the token stays on the Hub
        headers.pop("authorization", None)
    else:
        download_url = hf_hub_url(repo_id, filename, revision=commit)  # the commit the HEAD saw, even if the branch moves
    if local_dir is not None:
        dest = local_dir / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        _download_verified(download_url, headers, dest, etag, meta.size, where, filename)
        return dest
    cache = Path(constants.HF_HUB_CACHE)
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    storage = cache / folder
    if revision != commit:
        _record_ref(storage, revision, commit)
    pointer = storage / "snapshots" / commit / filename
    if pointer.exists():
        return pointer
    blob = storage / "blobs" / etag
    lock = cache / ".locks" / folder / f"{etag}.lock"
    for directory in (blob.parent, pointer.parent, lock.parent):
        directory.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):  # the lock hf_hub_download takes: concurrent downloads of this blob wait
        if not blob.exists():
            _download_verified(download_url, headers, blob, etag, meta.size, where, filename)
        if not pointer.exists():
            _create_symlink(str(blob), str(pointer), new_blob=False)
    return pointer


def _record_ref(storage: Path, revision: str, commit: str) -> None:
    """``refs/<revision>`` → commit, as the client records it, so offline runs resolve the branch."""
    if any(part in ("", ".", "..") for part in revision.split("/")):
        return  # not a name the Hub accepts; never write outside refs/
    ref = storage / "refs" / revision
    if ref.is_file() and ref.read_text() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


# Timeout of metadata API calls: a stalled answer is retried instead of hanging (the client
# passes no timeout to most API calls); generous, as the file list of a large repo takes seconds.
_API_TIMEOUT_S = 60.0

# First range read per shard: the length prefix plus most headers in one request.
_FIRST_READ = 64 * 1024


def _range_get(ref: ModelRef, label: str, commit: str, filename: str, start: int, end: int) -> bytes:
    """GET bytes [start, end] (inclusive) of a repo file, with the retry policy of every Hub call."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(ref.repo_id, filename, revision=commit)
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}

    def get() -> bytes:
        # Streamed, and closed once the wanted bytes are in: a server that ignores Range (HTTP
        # 200) must not make this read a whole multi-GB shard into memory.
        want = end + 1 - start
        with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, follow_redirects=True) as response:
            hf_raise_for_status(response)
            skip = start if response.status_code == 200 else 0
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) >= skip + want:
                    break
        return bytes(data[skip:skip + want])

    try:
        return call_with_retries(get)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref, label, filename) from None


def read_remote_header(ref: ModelRef, label: str, commit: str, filename: str, size: int | None) -> dict[str, TensorInfo]:
    """Read a safetensors header with HTTP range requests (a few KB), never the weights.

    Args:
        ref: A Hub reference.
        label: How messages name the model.
        commit: The pinned commit.
        filename: The safetensors file in the repo.
        size: Its size from the file listing (the header's offsets are checked against it).

    Returns:
        Its tensors by name, with repo-relative file paths.

    Raises:
        CheckpointError: The Hub fails, the size is unknown, or the header is invalid.
    """
    source = f"{label}: {ref.repo_id}@{commit} {filename}"
    if size is None:  # the listing gives every file's size; without it the data end cannot be checked
        raise CheckpointError(f"{source}: the Hub's file listing gives no size for this file, so its header cannot be verified; retry later")
    last = min(_FIRST_READ, size) - 1
    head = _range_get(ref, label, commit, filename, 0, max(last, 7))
    if len(head) < 8:
        raise CheckpointError(f"{source}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    check_header_length(n, source=source, file_size=size)
    raw = head[8:8 + n]
    if len(raw) < n:
        raw += _range_get(ref, label, commit, filename, 8 + len(raw), 8 + n - 1)
    if len(raw) != n:
        raise CheckpointError(f"{source}: the Hub sent {len(raw)} header bytes instead of {n}; retry later")
    infos, _ = parse_header_bytes(raw, source=source, file_size=size, file=Path(filename))
    return infos


@dataclass(frozen=True)
class HubSnapshot:
    """A Hub repo pinned to a commit, before any header is read.

    Attributes:
        ref: The reference as written.
        commit: The commit SHA its revision resolved to.
        sizes: Every file of the repo at that commit, with its size (None where unknown).
        remote: Headers are read with range requests (online), else from the local cache.
    """

    ref: ModelRef
    commit: str
    sizes: dict[str, int | None]
    remote: bool

    @property
    def pinned(self) -> ModelRef:
        """The reference pinned to `commit`."""
        return ModelRef(text=self.ref.text, repo_id=self.ref.repo_id, revision=self.commit)

    @property
    def is_adapter(self) -> bool:
        """Whether the repo is a PEFT adapter (``adapter_config.json`` decides, as in transformers)."""
        return ADAPTER_CONFIG in self.sizes

    def download_small_files(self, label: str, names: tuple[str, ...]) -> dict[str, Path]:
        """Download (verified) those of `names` the repo has: config, tokenizer and such."""
        return {name: download_file(self.pinned, label, name, self.commit) for name in names if name in self.sizes}

    def read_header(self, fname: str, label: str, folder: Path) -> dict[str, TensorInfo]:
        """A safetensors file's header: by range requests online, else from the cached copy in
        `folder`; tensor files are named by their repo path either way."""
        if self.remote:
            return read_remote_header(self.pinned, label, self.commit, fname, self.sizes.get(fname))
        infos, _ = read_header(folder / fname)
        return {n: TensorInfo(i.name, i.dtype, i.shape, Path(fname), i.begin, i.end) for n, i in infos.items()}


def pin_hub_repo(ref: ModelRef, *, label: str) -> HubSnapshot:
    """Resolve a Hub reference's revision to a commit and list the repo's files at it.

    Online, the config download is the revision lookup (it also records the branch or tag in
    the cache, so a later offline run resolves it the same way); offline, the cache answers.

    Args:
        ref: A Hub reference.
        label: How messages name the model.

    Returns:
        The pinned repo.

    Raises:
        CheckpointError: Missing or gated repo, unknown revision, no ``config.json`` (nor
            ``adapter_config.json``), or (offline) files missing from the cache.
    """
    assert ref.repo_id is not None
    config_path = _download_config(ref, label, ref.revision or "main")
    commit = config_path.parent.name  # snapshots/<commit>/config.json
    if _offline():
        snapshot = config_path.parent
        sizes: dict[str, int | None] = {p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}
        return HubSnapshot(ref, commit, sizes, remote=False)
    from huggingface_hub import HfApi

    try:
        info = call_with_retries(lambda: HfApi().model_info(ref.repo_id, revision=commit, files_metadata=True, timeout=_API_TIMEOUT_S))
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref, label) from None
    return HubSnapshot(ref, commit, {s.rfilename: s.size for s in (info.siblings or [])}, remote=True)


def open_hub_checkpoint(ref: ModelRef, *, label: str, snapshot: HubSnapshot | None = None) -> HubCheckpoint:
    """Pin a Hub reference to a commit and read its headers (no weight bytes).

    Args:
        ref: A Hub reference.
        label: How messages name the model.
        snapshot: The repo already pinned by `pin_hub_repo` (pinned here when not given).

    Returns:
        The opened checkpoint; shards download when a tensor of theirs is first read.

    Raises:
        CheckpointError: Missing or gated repo, unknown revision, a PEFT adapter repo (opened by
            `lora.open_hub_adapter` over its base), missing files, unsafe shard names,
            corrupted headers, pickle-only weights, or (offline) files missing from the cache.
    """
    snapshot = snapshot or pin_hub_repo(ref, label=label)
    if snapshot.is_adapter:
        raise CheckpointError(
            f"{label}: {ref.repo_id}@{snapshot.commit} is a PEFT LoRA adapter ({ADAPTER_CONFIG}), not a full model; hfmerge applies "
            "an adapter to a recipe's base_model when it is a `models` entry"
        )
    return _assemble(snapshot, label)

def download_hub_model(ref: ModelRef, *, label: str) -> Path:
    """A Hub model as a local folder that ``from_pretrained`` loads: the pinned commit's config,
    tokenizer and generation files and its safetensors weights, each downloaded through the
    cache with retries and verified against the hash the Hub announces.

    Args:
        ref: A Hub reference (``org/name[@revision]``).
        label: Names the model in messages (e.g. the CLI flag).

    Returns:
        The cache's snapshot folder of the pinned commit.

    Raises:
        CheckpointError: As `open_hub_checkpoint` (an adapter repo needs its base and is refused
            here), and for downloads that fail or do not verify.
    """
    ckpt = open_hub_checkpoint(ref, label=label)
    for info in {str(i.file): i for i in ckpt.tensors.values()}.values():
        ckpt.local_file(info)
    return ckpt.folder


def _download_config(ref: ModelRef, label: str, revision: str) -> Path:
    """``config.json``, or ``adapter_config.json`` in a PEFT adapter repo (which has no config.json).

    Downloading it at a branch or tag is also the revision lookup: the answer names the commit.
    """
    from huggingface_hub import errors as e

    assert ref.repo_id is not None
    try:
        return _fetch(ref.repo_id, "config.json", revision, where=f"{label}: {ref.repo_id}@{revision} config.json")
    except HfMergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one clear message
        missing = isinstance(exc, e.RemoteEntryNotFoundError) or (isinstance(exc, e.EntryNotFoundError) and _offline())
        if not missing:
            raise hub_error(exc, ref, label, "config.json") from None
        first = exc
    try:
        return _fetch(ref.repo_id, ADAPTER_CONFIG, revision, where=f"{label}: {ref.repo_id}@{revision} {ADAPTER_CONFIG}")
    except HfMergeError:
        raise
    except Exception:  # noqa: BLE001 - neither file: report the config.json problem
        raise hub_error(first, ref, label, "config.json") from None


def _assemble(snapshot: HubSnapshot, label: str) -> HubCheckpoint:
    ref, commit, sizes, pinned = snapshot.ref, snapshot.commit, snapshot.sizes, snapshot.pinned
    if "config.json" not in sizes:
        raise CheckpointError(f"{label}: {ref.repo_id}@{ref.revision or 'main'} has no config.json; it is not a transformers checkpoint")
    side = snapshot.download_small_files(label, SIDE_FILES)
    folder = side["config.json"].parent
    try:
        config = json.loads(side["config.json"].read_text())
    except ValueError as exc:
        raise CheckpointError(f"{label}: {ref.repo_id}@{commit} config.json is not valid JSON ({exc})") from None

    def header(fname: str) -> dict[str, TensorInfo]:
        return snapshot.read_header(fname, label, folder)

    if SAFE_INDEX in sizes:
        index_path = download_file(ref, label, SAFE_INDEX, commit)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{label}: {ref.repo_id}@{commit} {SAFE_INDEX} is not a valid index (JSON with a 'weight_map' object)") from None
        tensors: dict[str, TensorInfo] = {}
        for fname in sorted(set(weight_map.values())):
            safe_relative_path(fname, source=f"{label}: {ref.repo_id}@{commit} {SAFE_INDEX}")
            if fname not in sizes:
                raise CheckpointError(f"{label}: {ref.repo_id}@{commit}: shard {fname} is listed in {SAFE_INDEX} but not in the repo")
            tensors.update(header(fname))
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise CheckpointError(f"{label}: {ref.repo_id}@{commit}: {SAFE_INDEX} maps {missing[0]!r} to a shard that does not hold it")
        return HubCheckpoint(pinned, label, folder, {n: tensors[n] for n in weight_map}, config, commit=commit)
    if SAFE_SINGLE in sizes:
        return HubCheckpoint(pinned, label, folder, header(SAFE_SINGLE), config, commit=commit)
    if PICKLE_SINGLE in sizes or PICKLE_INDEX in sizes:
        raise CheckpointError(
            f"{label}: {ref.repo_id}@{commit} holds only pickle weights ({PICKLE_SINGLE}); hfmerge reads safetensors from the Hub. "
            "Use a revision with safetensors weights (many repos have a 'refs/pr/N' conversion) or download and convert it"
        )
    others = sorted(n for n in sizes if n.endswith(".safetensors"))
    hint = f" (found {', '.join(others[:3])}; is this an adapter repo?)" if others else ""
    raise CheckpointError(f"{label}: {ref.repo_id}@{commit} has no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")
