"""Checkpoints on the Hugging Face Hub, pinned to a commit and streamed shard by shard.

The plan step resolves ``org/name@revision`` to a commit SHA and reads only the safetensors
headers (HTTP range reads of a few KB per shard), so a missing repo, revision or file, a gated
repo or incompatible checkpoints are reported before any weight moves. Every later read uses
that SHA, so a push to the repo during a merge cannot change the result. Shards are downloaded
through the standard Hugging Face cache when a tensor of theirs is first needed (a second run
downloads nothing; ``HF_HUB_OFFLINE=1`` works from the cache).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError
from ..refs import ModelRef
from .lora import ADAPTER_CONFIG, open_hub_adapter
from .reader import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, LocalCheckpoint, safe_relative_path
from .safetensors_header import MAX_HEADER_BYTES, TensorInfo, parse_header_bytes

# Small files fetched in the plan step (config, tokenizer, generation config) when present.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "spiece.model", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "README.md",
)


def hub_error(exc: Exception, ref: ModelRef, label: str, what: str = "") -> CheckpointError:
    """Turn a huggingface_hub exception into one message naming the repo, the revision and what to do."""
    from huggingface_hub import errors as e

    rev = ref.revision or "main"
    repo_where = f"{label}: {ref.repo_id}@{rev}"
    where = repo_where + (f" {what}" if what else "")
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
    if status in (401, 403):
        return CheckpointError(f"{where}: access denied (HTTP {status}); log in with `hf auth login` or set HF_TOKEN to a token that can read this repo")
    return CheckpointError(f"{where}: Hub request failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(constants.HF_HUB_OFFLINE)


@dataclass
class HubCheckpoint(LocalCheckpoint):
    """A checkpoint in a Hub repo pinned to `commit`. Tensor files are repo-relative paths until downloaded."""

    commit: str = ""
    scratch: Path | None = None  # low-disk mode: shards go here, one at a time, not to the cache
    _downloaded: dict[str, Path] = field(default_factory=dict, repr=False)

    def local_file(self, info: TensorInfo) -> Path:
        key = str(info.file)
        path = self._downloaded.get(key)
        if path is None:
            if self.scratch is not None:
                self.release()  # at most one shard of this model on disk
            path = _download(self.ref, self.label, key, self.commit, local_dir=self.scratch)
            size = path.stat().st_size
            if size < info.end:
                raise CheckpointError(f"{self.label}: {key} downloaded with {size} bytes but the header needs {info.end}; delete it from the cache and retry")
            self._downloaded[key] = path
        return path

    def release(self) -> None:
        """Low-disk mode: delete the shards downloaded so far (the cache is never touched)."""
        if self.scratch is None:
            return
        for name, path in self._downloaded.items():
            path.unlink(missing_ok=True)
            (self.scratch / ".cache" / "huggingface" / "download" / f"{name}.metadata").unlink(missing_ok=True)
        self._downloaded.clear()


def _download(ref: ModelRef, label: str, filename: str, revision: str, local_dir: Path | None = None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=revision, local_dir=local_dir))
    except Exception as exc:  # noqa: BLE001 - mapped to one clear message
        raise hub_error(exc, ref, label, filename) from None


# First range read per shard: the length prefix plus most headers in one request.
_FIRST_READ = 64 * 1024


def _range_get(ref: ModelRef, label: str, commit: str, filename: str, start: int, end: int) -> bytes:
    """GET bytes [start, end] (inclusive) of a repo file, retried on 5xx and network errors."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    url = hf_hub_url(ref.repo_id, filename, revision=commit)
    try:
        response = http_backoff("GET", url, headers={**build_hf_headers(), "Range": f"bytes={start}-{end}"}, max_retries=4)
        hf_raise_for_status(response)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref, label, filename) from None
    data = response.content
    if response.status_code == 200:  # a server without range support sent the whole file
        data = data[start:end + 1]
    return data


def _read_remote_header(ref: ModelRef, label: str, commit: str, filename: str, size: int | None) -> dict[str, TensorInfo]:
    """Read a safetensors header with HTTP range requests (a few KB), never the weights."""
    source = f"{label}: {ref.repo_id}@{commit} {filename}"
    last = _FIRST_READ - 1 if size is None else min(_FIRST_READ, size) - 1
    head = _range_get(ref, label, commit, filename, 0, max(last, 7))
    if len(head) < 8:
        raise CheckpointError(f"{source}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES or (size is not None and 8 + n > size):
        raise CheckpointError(f"{source}: the safetensors header claims {n} bytes; the file is truncated or not safetensors")
    raw = head[8:8 + n]
    if len(raw) < n:
        raw += _range_get(ref, label, commit, filename, 8 + len(raw), 8 + n - 1)
    infos, _ = parse_header_bytes(raw, source=source, file_size=size, file=Path(filename))
    return infos


def open_hub_checkpoint(ref: ModelRef, *, label: str, allow_pickle: bool = False, base: LocalCheckpoint | None = None) -> HubCheckpoint:
    """Pin a Hub reference to a commit and read its headers (no weight bytes).

    A repo with ``adapter_config.json`` is a PEFT adapter, opened as a `LoraCheckpoint` applied
    to `base` (the recipe's opened base checkpoint).

    Raises:
        CheckpointError: Missing or gated repo, unknown revision, missing files, unsafe shard
            names, corrupted headers, or (offline) files missing from the cache.
    """
    assert ref.repo_id is not None
    if _offline():
        return _open_from_cache(ref, label=label, allow_pickle=allow_pickle, base=base)
    from huggingface_hub import HfApi

    # Resolve the revision with the config download: it pins the commit and records the
    # branch or tag in the cache, so a later offline run resolves it the same way.
    config_path = _download_config(ref, label, ref.revision or "main")
    commit = config_path.parent.name
    try:
        info = HfApi().model_info(ref.repo_id, revision=commit, files_metadata=True)
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref, label) from None
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    return _assemble(ref, label, commit, sizes, allow_pickle, remote=True, base=base)


def _download_config(ref: ModelRef, label: str, revision: str) -> Path:
    """``config.json``, or ``adapter_config.json`` in a PEFT adapter repo (which has no config.json)."""
    from huggingface_hub import errors as e
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, "config.json", revision=revision))
    except Exception as exc:  # noqa: BLE001 - mapped to one clear message
        missing = isinstance(exc, e.RemoteEntryNotFoundError) or (isinstance(exc, e.EntryNotFoundError) and _offline())
        if not missing:
            raise hub_error(exc, ref, label, "config.json") from None
        first = exc
    try:
        return Path(hf_hub_download(ref.repo_id, ADAPTER_CONFIG, revision=revision))
    except Exception:  # noqa: BLE001 - neither file: report the config.json problem
        raise hub_error(first, ref, label, "config.json") from None


def _open_from_cache(ref: ModelRef, *, label: str, allow_pickle: bool, base: LocalCheckpoint | None = None) -> HubCheckpoint:
    path = _download_config(ref, label, ref.revision or "main")
    commit = path.parent.name  # snapshots/<commit>/config.json
    snapshot = path.parent
    sizes = {p.relative_to(snapshot).as_posix(): p.stat().st_size for p in snapshot.rglob("*") if p.is_file()}
    return _assemble(ref, label, commit, sizes, allow_pickle, remote=False, base=base)


def _assemble(ref: ModelRef, label: str, commit: str, sizes: dict[str, int | None], allow_pickle: bool, *, remote: bool,
              base: LocalCheckpoint | None = None) -> HubCheckpoint:
    pinned = ModelRef(text=ref.text, repo_id=ref.repo_id, revision=commit)
    if ADAPTER_CONFIG in sizes:
        # A PEFT adapter (as for transformers' from_pretrained, adapter_config.json decides). Its
        # small side files come along: a tokenizer_source may name the adapter.
        side = {name: _download(ref, label, name, commit) for name in (ADAPTER_CONFIG, *SIDE_FILES) if name in sizes}
        return open_hub_adapter(pinned, label=label, commit=commit, folder=side[ADAPTER_CONFIG].parent, sizes=sizes,  # type: ignore[return-value]
                                base=base, allow_pickle=allow_pickle, remote=remote)
    if "config.json" not in sizes:
        raise CheckpointError(f"{label}: {ref.repo_id}@{ref.revision or 'main'} has no config.json; it is not a transformers checkpoint")
    side = {name: _download(ref, label, name, commit) for name in SIDE_FILES if name in sizes}
    folder = side["config.json"].parent
    try:
        config = json.loads(side["config.json"].read_text())
    except ValueError as exc:
        raise CheckpointError(f"{label}: {ref.repo_id}@{commit} config.json is not valid JSON ({exc})") from None

    def header(fname: str) -> dict[str, TensorInfo]:
        if remote:
            return _read_remote_header(ref, label, commit, fname, sizes.get(fname))
        from .safetensors_header import read_header

        infos, _ = read_header(folder / fname)
        return {n: TensorInfo(i.name, i.dtype, i.shape, Path(fname), i.begin, i.end) for n, i in infos.items()}

    if SAFE_INDEX in sizes:
        index_path = _download(ref, label, SAFE_INDEX, commit)
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
