"""A Hugging Face Hub protocol server for tests (standard library only).

The real `huggingface_hub` client (and `transformers.from_pretrained`) talk to it through
`HF_ENDPOINT=http://127.0.0.1:PORT`. It implements the endpoint set documented in
`shared/reference/hub-protocol.md`: repo info, tree listing, paths-info, `/resolve` with
HEAD/Range, repo creation, YAML validation, preupload, the LFS batch/PUT/verify dance, the
NDJSON commit, commit listing, refs, tags, branches and whoami.

Storage is git-like: every commit is an immutable snapshot ``{path: FileEntry}`` with a random
40-hex SHA and a parent; branches, tags and PR refs point at commits; old SHAs keep resolving.
File contents live once on disk, addressed by sha256; ETags follow the Hub (sha256 for LFS
files, git-blob sha1 for regular files).

Tests steer it through plain attributes (``tokens``, ``require_auth_for_writes``, ...), token
identities that whoami reports and the write endpoints enforce (``add_token``: read, write or
fine-grained tokens, organizations), a thread-safe fault list (``faults`` / ``fail_next`` /
``drop_connection_after`` / ``set_delay`` / ``fail_commits``),
a request log (``requests``) and helpers that seed repos without HTTP (``create_repo_direct``,
``commit_direct``, ``tag``, ``head_sha``...).

Run standalone for manual poking: ``python tests/hub_server.py --root /tmp/hub --port 8765``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "Commit",
    "Fault",
    "FaultSet",
    "FileEntry",
    "HubError",
    "HubServer",
    "RequestRecord",
    "TokenProfile",
    "git_blob_sha1",
]

REPO_TYPES = ("model", "dataset", "space")
# URL prefix of a repo type in /resolve and .git URLs (models have none).
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HEX40 = re.compile(r"[0-9a-f]{40}")
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
_CHUNK = 64 * 1024

# Extensions that the Hub's default .gitattributes routes to LFS.
LFS_SUFFIXES = frozenset(
    ".7z .arrow .bin .bz2 .ckpt .ftz .gz .h5 .joblib .lfs .mlmodel .model .msgpack .npy .npz .onnx"
    " .ot .parquet .pb .pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz .zip .zst".split()
)
DEFAULT_GITATTRIBUTES = (
    "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in sorted(LFS_SUFFIXES))
    + "saved_model/**/* filter=lfs diff=lfs merge=lfs -text\n"
    + "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
).encode()


def git_blob_sha1(data: bytes) -> str:
    """Git blob id of `data` (what the Hub reports as `oid`/ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    """UTC timestamp in the Hub's format (`%Y-%m-%dT%H:%M:%S.%fZ` with milliseconds)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


# ----------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. Content is the blob `sha256` in the server's blob store."""

    sha256: str
    size: int
    lfs: bool
    oid: str  # git blob id: of the content (regular) or of the LFS pointer (LFS), as the Hub reports

    @property
    def etag(self) -> str:
        """ETag the Hub sends: sha256 for LFS files, git-blob sha1 for regular files."""
        return self.sha256 if self.lfs else self.oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass(frozen=True)
class Commit:
    """An immutable snapshot of a repo."""

    sha: str
    parent: str | None
    files: Mapping[str, FileEntry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class Repo:
    """A repo: commits (never deleted), refs and access flags."""

    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False  # False, "auto" or "manual" (as the Hub reports it)
    disabled: bool = False
    gated_allow: set[str] = field(default_factory=set)  # tokens granted access to a gated repo
    created_at: str = field(default_factory=_now_iso)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit SHA of a branch, tag, PR ref (`refs/pr/N`) or full SHA; None when unknown."""
        rev = revision
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        for prefix, table in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in table:
                return table[rev[len(prefix) :]]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m.group(1)) in self.prs:
            return self.prs[int(m.group(1))]
        if _HEX40.fullmatch(rev) and rev in self.commits:
            return rev
        return None

    def history(self, sha: str) -> Iterator[Commit]:
        """Commits from `sha` back to the root, newest first."""
        cur: str | None = sha
        while cur is not None:
            commit = self.commits[cur]
            yield commit
            cur = commit.parent


class HubError(Exception):
    """An HTTP error answer. Always carries `X-Error-Code` and `X-Error-Message`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.body = body


# ----------------------------------------------------------------------------------------------
# Faults and request log
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Fault:
    """An injected misbehaviour, matched on method and a substring of the request path.

    - `status`: answer with this error status instead of handling the request
      (with `error_code`/`message`/`headers`; defaults derive from the status).
    - `drop_after`: handle the request, send the headers and the first `drop_after` body bytes,
      then close the socket (the client sees a truncated body).
    - `delay`: sleep this many seconds before answering (combines with the above).
    - `corrupt`: serve a `/resolve` body with one byte flipped (same length, same headers),
      as if damaged in transit.
    - `ranged`: True matches only requests with a `Range` header, False only those without
      (e.g. a whole-file download but not a header range read of the same file); None: both.
    `times` is how many requests it applies to (None: forever); `hits` counts them.
    """

    method: str | None = None
    path_contains: str | None = None
    status: int | None = None
    error_code: str | None = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    delay: float = 0.0
    corrupt: bool = False
    ranged: bool | None = None
    times: int | None = 1
    hits: int = 0

    @property
    def is_action(self) -> bool:
        """True for faults that change the answer (status or dropped body), not just its timing."""
        return self.status is not None or self.drop_after is not None or self.corrupt

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str, target: str, ranged: bool = False) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.ranged is not None and self.ranged != ranged:
            return False
        # A dropped body needs a body: never let a HEAD consume a drop fault.
        if self.drop_after is not None and self.method is None and method == "HEAD":
            return False
        if self.path_contains is not None and self.path_contains not in path and self.path_contains not in target:
            return False
        return True


class FaultSet:
    """Thread-safe list of faults. Delay faults all apply; the first matching action fault wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def pending(self) -> list[Fault]:
        """Faults that can still fire."""
        with self._lock:
            return [f for f in self._faults if not f.exhausted]

    def take(self, method: str, path: str, target: str, ranged: bool = False) -> tuple[float, Fault | None]:
        """Consume the faults matching a request: (total delay, action fault or None)."""
        delay = 0.0
        action: Fault | None = None
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(method, path, target, ranged):
                    continue
                if fault.is_action:
                    if action is not None:
                        continue
                    action = fault
                elif fault.delay <= 0:
                    continue
                fault.hits += 1
                delay += fault.delay
        return delay, action


@dataclass
class RequestRecord:
    """One request as the server saw it. Unpacks as `(method, path, headers, range)`.

    `headers` has lower-case names and never the `authorization` header (only `has_auth` says
    whether one was sent), so the log can be printed or searched for secrets safely.
    The record enters the log before the answer is sent, and `status`/`body_bytes` are updated
    before the corresponding bytes go out, so a client that got its answer always finds it.
    """

    method: str
    path: str  # percent-decoded, without the query string
    headers: dict[str, str]
    range: str | None
    query: str = ""
    status: int = 0
    body_bytes: int = 0  # response body bytes written (or attempted, when the client went away)
    request_bytes: int = 0  # request body size
    has_auth: bool = False

    def __iter__(self) -> Iterator[Any]:
        return iter((self.method, self.path, self.headers, self.range))

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]


# ----------------------------------------------------------------------------------------------
# Token identities (whoami) for publishing tests
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenProfile:
    """What `/api/whoami-v2` says about a token, and what the write endpoints then allow.

    - `role`: "read", "write" or "fineGrained" (the Hub's access-token roles).
    - `orgs`: (organization, roleInOrg) pairs; roleInOrg is "admin", "write", "contributor" or "read".
    - `scoped`: for fine-grained tokens, (entity type, entity name, permissions) triples, the
      entity being a "user", an "org" or a repo ("model" with `ns/name`); `repo.write` grants writes.
    """

    user: str
    role: str = "write"
    orgs: tuple[tuple[str, str], ...] = ()
    scoped: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def can_write(self, repo_id: str | None = None) -> bool:
        """Whether this token may write to `repo_id` (None: anywhere, judging by the role alone)."""
        if self.role == "read":
            return False
        namespace = repo_id.split("/", 1)[0] if repo_id else None
        if namespace is not None:
            org_roles = dict(self.orgs)
            if namespace != self.user and org_roles.get(namespace, "read") == "read":
                return False
        if self.role == "fineGrained":
            return any(
                "repo.write" in perms
                and (namespace is None or name in (namespace, repo_id))
                for _, name, perms in self.scoped
            )
        return True


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


class HubServer:
    """Hub-protocol server on 127.0.0.1, run in a daemon thread. Usable as a context manager."""

    def __init__(self, root_dir: Path | str, port: int = 0, *, username: str = "test-user") -> None:
        self.root = Path(root_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "blobs").mkdir(exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self._requested_port = port
        self.username = username
        self.faults = FaultSet()
        self.requests: list[RequestRecord] = []
        self.internal_errors: list[str] = []  # tracebacks of handler crashes (a test should see none)
        self._lock = threading.RLock()
        self._log_lock = threading.Lock()
        self._stop_event = threading.Event()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._uploads: dict[str, tuple[str, int]] = {}  # LFS upload nonce -> (oid, size)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset_config()
        self._load_state()

    # -- configuration ----------------------------------------------------------------------

    def reset_config(self) -> None:
        """Restore the default behaviour knobs."""
        # None: any bearer token is valid. A set: only those tokens; others get 401.
        self.tokens: set[str] | None = None
        # Who a token is and what it may do (see `add_token`); tokens not listed are write
        # tokens of `username`.
        self.token_profiles: dict[str, TokenProfile] = {}
        self.require_auth_for_writes: bool = True
        # Files at least this big (or with an LFS extension, or binary) are uploaded as LFS.
        self.lfs_threshold: int = 10 * 1024 * 1024
        # When set, LFS objects at least this big are uploaded in parts of this size (multipart).
        self.multipart_chunk_size: int | None = None
        self.tree_page_size: int = 1000
        self.tree_expand_page_size: int = 50
        self.commits_page_size: int = 50

    def reset(self) -> None:
        """Clear faults, the request log, recorded internal errors and configuration (not repos)."""
        self.faults.clear()
        self.clear_requests()
        self.internal_errors.clear()
        self.reset_config()

    def clear_requests(self) -> None:
        with self._log_lock:
            self.requests.clear()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        self._stop_event.clear()
        httpd = ThreadingHTTPServer(("127.0.0.1", self._requested_port), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop_event.set()  # wakes handlers sleeping on an injected delay
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection --------------------------------------------------------------------

    def fail_next(
        self,
        method: str | None = None,
        path_contains: str | None = None,
        status: int = 503,
        times: int | None = 1,
        *,
        error_code: str | None = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """Answer the next `times` matching requests with `status` (e.g. 503, 401, 403, 429)."""
        return self.faults.add(
            Fault(
                method=method,
                path_contains=path_contains,
                status=status,
                error_code=error_code,
                message=message,
                headers=dict(headers or {}),
                times=times,
            )
        )

    def inject_auth_error(
        self,
        status: int = 401,
        method: str | None = "POST",
        path_contains: str | None = "/commit/",
        times: int | None = 1,
    ) -> Fault:
        """401/403 on an endpoint (default: the commit POST)."""
        if status not in (401, 403):
            raise ValueError("status must be 401 or 403")
        return self.fail_next(method, path_contains, status, times)

    def drop_connection_after(
        self, path_contains: str | None = None, nbytes: int = 0, times: int | None = 1, method: str | None = "GET"
    ) -> Fault:
        """Send the headers and the first `nbytes` of the body of matching answers, then close the socket."""
        return self.faults.add(Fault(method=method, path_contains=path_contains, drop_after=nbytes, times=times))

    def corrupt_next(
        self, path_contains: str | None = None, times: int | None = 1, *, ranged: bool | None = False
    ) -> Fault:
        """Serve the next `times` matching file downloads (GET `/resolve`, by default whole-file ones
        only, not range reads) with one byte flipped: same length and headers, wrong content."""
        return self.faults.add(Fault(method="GET", path_contains=path_contains, corrupt=True, times=times, ranged=ranged))

    def set_delay(
        self, seconds: float, path_contains: str | None = None, method: str | None = None, times: int | None = None
    ) -> Fault:
        """Delay matching answers by `seconds` (forever unless `times`); remove with `faults.remove(fault)`."""
        return self.faults.add(Fault(method=method, path_contains=path_contains, delay=seconds, times=times))

    # -- request log helpers ----------------------------------------------------------------

    def requests_matching(self, method: str | None = None, path_contains: str | None = None) -> list[RequestRecord]:
        with self._log_lock:
            log = list(self.requests)
        return [
            r
            for r in log
            if (method is None or r.method == method.upper()) and (path_contains is None or path_contains in r.path)
        ]

    def _record(self, record: RequestRecord) -> None:
        with self._log_lock:
            self.requests.append(record)

    # -- auth -------------------------------------------------------------------------------

    def token_is_valid(self, token: str | None) -> bool:
        return bool(token) and (self.tokens is None or token in self.tokens)

    # -- publishing: token identities and failed commits ---------------------------------------

    def add_token(
        self,
        token: str,
        *,
        user: str | None = None,
        role: str = "write",
        orgs: Mapping[str, str] | None = None,
        scoped: Iterable[tuple[str, str, Iterable[str]]] = (),
    ) -> str:
        """Register `token` as belonging to `user` (default: `username`) with a role, orgs and scopes.

        whoami then describes it accordingly, and commits, repo creation and the other write
        endpoints answer 403 where it has no write access. Returns the token.
        """
        if role not in ("read", "write", "fineGrained"):
            raise ValueError(f"unknown token role {role!r}")
        self.token_profiles[token] = TokenProfile(
            user=user or self.username,
            role=role,
            orgs=tuple((orgs or {}).items()),
            scoped=tuple((kind, name, tuple(perms)) for kind, name, perms in scoped),
        )
        if self.tokens is not None:
            self.tokens.add(token)
        return token

    def token_profile(self, token: str) -> TokenProfile:
        return self.token_profiles.get(token) or TokenProfile(user=self.username)

    def whoami_answer(self, token: str) -> dict[str, Any]:
        """The `/api/whoami-v2` body for a valid token, shaped like the Hub's."""
        profile = self.token_profile(token)
        access: dict[str, Any] = {"displayName": "hfmerge-tests", "role": profile.role, "createdAt": "2024-01-01T00:00:00.000Z"}
        if profile.role == "fineGrained":
            access["fineGrained"] = {
                "canReadGatedRepos": True,
                "global": [],
                "scoped": [
                    {"entity": {"_id": hashlib.sha1(name.encode()).hexdigest()[:24], "type": kind, "name": name}, "permissions": list(perms)}
                    for kind, name, perms in profile.scoped
                ],
            }
        return {
            "type": "user",
            "id": hashlib.sha1(profile.user.encode()).hexdigest()[:24],
            "name": profile.user,
            "fullname": "Test User",
            "email": None,
            "canPay": False,
            "isPro": False,
            "orgs": [
                {"type": "org", "id": hashlib.sha1(org.encode()).hexdigest()[:24], "name": org, "fullname": org, "roleInOrg": role}
                for org, role in profile.orgs
            ],
            "auth": {"type": "access_token", "accessToken": access},
        }

    def fail_commits(self, status: int = 500, repo_id: str | None = None, times: int | None = None) -> Fault:
        """Make the commit POST fail with `status` (every time by default), e.g. on a repo a push just created.

        Repo creation and the LFS uploads before the commit still succeed, which is what a push
        sees when the Hub breaks mid-way: a new, empty repo and a refused commit.
        """
        where = f"/api/models/{repo_id}/commit/" if repo_id else "/commit/"
        return self.fail_next("POST", where, status, times)

    # -- blob store -------------------------------------------------------------------------

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self._blob_path(sha256).is_file()

    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob_path(sha)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha

    def _adopt_file(self, tmp_path: Path, sha256: str) -> None:
        """Move a fully written temp file into the blob store under `sha256`."""
        path = self._blob_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_path, path)

    def read_blob(self, sha256: str) -> bytes:
        return self._blob_path(sha256).read_bytes()

    def _entry_for(self, path: str, data: bytes, lfs: bool | None = None) -> FileEntry:
        """Store `data` and describe it; `lfs=None` decides like the Hub's preupload."""
        sha = self._store_bytes(data)
        if lfs is None:
            lfs = self.should_use_lfs(path, len(data), data[:512])
        oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha256=sha, size=len(data), lfs=lfs, oid=oid)

    def should_use_lfs(self, path: str, size: int, sample: bytes) -> bool:
        """The preupload decision: big, LFS-extension or binary files go to LFS (empty files never)."""
        if size == 0:
            return False
        suffix = Path(path).suffix.lower()
        return size >= self.lfs_threshold or suffix in LFS_SUFFIXES or "tfevents" in path or b"\0" in sample

    # -- persistence ------------------------------------------------------------------------

    def _state_path(self, repo: Repo) -> Path:
        return self.root / "repos" / f"{repo.repo_type}s" / f"{repo.repo_id}.json"

    def _save(self, repo: Repo) -> None:
        """Write a repo's state to disk (called under the lock after every change)."""
        state = {
            "repo_type": repo.repo_type,
            "repo_id": repo.repo_id,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": repo.disabled,
            "created_at": repo.created_at,
            "branches": repo.branches,
            "tags": repo.tags,
            "prs": {str(k): v for k, v in repo.prs.items()},
            "commits": [
                {
                    **{k: v for k, v in asdict(c).items() if k != "files"},
                    "files": {p: asdict(e) for p, e in c.files.items()},
                }
                for c in repo.commits.values()
            ],
        }
        path = self._state_path(repo)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def _load_state(self) -> None:
        """Reload repos persisted by an earlier server on the same root."""
        for path in sorted((self.root / "repos").glob("*/*/*.json")):
            state = json.loads(path.read_text())
            repo = Repo(
                repo_type=state["repo_type"],
                repo_id=state["repo_id"],
                private=state["private"],
                gated=state["gated"],
                disabled=state["disabled"],
                created_at=state["created_at"],
                branches=state["branches"],
                tags=state["tags"],
                prs={int(k): v for k, v in state["prs"].items()},
            )
            for c in state["commits"]:
                files = {p: FileEntry(**e) for p, e in c.pop("files").items()}
                repo.commits[c["sha"]] = Commit(files=files, **c)
            self._repos[(repo.repo_type, repo.repo_id)] = repo

    # -- repo operations (shared by HTTP handlers and direct helpers) -----------------------

    def _new_sha(self, repo: Repo) -> str:
        while True:
            sha = secrets.token_hex(20)
            if sha not in repo.commits:
                return sha

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The repo object (raises KeyError). Mutate flags through the helpers below."""
        return self._repos[(repo_type, repo_id)]

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self._repos

    def _create_repo(self, repo_id: str, repo_type: str, private: bool) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise KeyError(repo_id)
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            # Like the real Hub: a new repo starts with one commit holding .gitattributes.
            entry = self._entry_for(".gitattributes", DEFAULT_GITATTRIBUTES, lfs=False)
            sha = self._new_sha(repo)
            repo.commits[sha] = Commit(
                sha=sha,
                parent=None,
                files={".gitattributes": entry},
                title="initial commit",
                message="",
                author=self.username,
                date=_now_iso(),
            )
            repo.branches["main"] = sha
            self._repos[(repo_type, repo_id)] = repo
            self._save(repo)
            return repo

    def _apply_commit(
        self,
        repo: Repo,
        branch: str,
        additions: Mapping[str, FileEntry],
        deletions: Iterable[tuple[str, bool]],
        title: str,
        message: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
        ops_order: list[tuple[str, str]] | None = None,
    ) -> tuple[str, int | None]:
        """Build and record a commit atomically; returns (sha, pr number or None).

        `ops_order` lists ("add"|"delete_file"|"delete_folder", path) in request order so that
        deletions and additions apply in sequence like on the Hub; without it, deletions run first.
        Raises HubError without touching the repo when any operation is invalid.
        """
        deletions = list(deletions)
        if ops_order is None:
            ops_order = [("delete_folder" if folder else "delete_file", p) for p, folder in deletions]
            ops_order += [("add", p) for p in additions]
        with self._lock:
            head = repo.resolve(branch) if branch.startswith("refs/pr/") else repo.branches.get(branch)
            if head is None:
                if repo.resolve(branch) is not None:
                    raise HubError(400, "InvalidRevision", f"Cannot commit to '{branch}': not a branch")
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            if parent_commit is not None and parent_commit != head and not head.startswith(parent_commit):
                raise HubError(
                    412,
                    "ParentCommitMismatch",
                    f"A commit has happened since. Parent commit {parent_commit} is not the head of {branch} ({head})",
                )
            files = dict(repo.commits[head].files)
            for kind, path in ops_order:
                if kind == "add":
                    files[path] = additions[path]
                elif kind == "delete_file":
                    if path not in files:
                        raise HubError(
                            404,
                            "EntryNotFound",
                            f"A file with this name doesn't exist: {path}",
                            {"X-Repo-Commit": head},
                        )
                    del files[path]
                else:
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)] if prefix != "/" else list(files)
                    if not doomed:
                        raise HubError(
                            404,
                            "EntryNotFound",
                            f"A folder with this name doesn't exist: {path}",
                            {"X-Repo-Commit": head},
                        )
                    for p in doomed:
                        del files[p]
            sha = self._new_sha(repo)
            repo.commits[sha] = Commit(
                sha=sha, parent=head, files=files, title=title, message=message, author=self.username, date=_now_iso()
            )
            pr_num: int | None = None
            if create_pr:
                pr_num = max(repo.prs, default=0) + 1
                repo.prs[pr_num] = sha
            elif branch.startswith("refs/pr/"):
                repo.prs[int(branch.rsplit("/", 1)[1])] = sha
            else:
                repo.branches[branch] = sha
            self._save(repo)
            return sha, pr_num

    # -- direct helpers for tests (no HTTP) -------------------------------------------------

    def create_repo_direct(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path] | None = None,
        repo_type: str = "model",
        private: bool = False,
        gated: bool | str = False,
        *,
        message: str = "Upload files",
        exist_ok: bool = False,
    ) -> str:
        """Create a repo (initial .gitattributes commit) and commit `files` in a second commit; returns head SHA."""
        _check_repo_id(repo_id, repo_type)
        with self._lock:
            if self.repo_exists(repo_id, repo_type):
                if not exist_ok:
                    raise ValueError(f"{repo_type} repo {repo_id} already exists")
                repo = self.get_repo(repo_id, repo_type)
            else:
                repo = self._create_repo(repo_id, repo_type, private)
            repo.gated = "auto" if gated is True else gated
            self._save(repo)
        if files:
            return self.commit_direct(repo_id, files, message, repo_type=repo_type)
        return self.head_sha(repo_id, repo_type=repo_type)

    def commit_direct(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path] | None = None,
        message: str = "Update files",
        *,
        repo_type: str = "model",
        branch: str = "main",
        delete: Iterable[str] = (),
        lfs: bool | None = None,
    ) -> str:
        """Commit files (bytes, text or a local Path) and deletions (paths; a trailing '/' deletes a folder)."""
        repo = self.get_repo(repo_id, repo_type)
        additions: dict[str, FileEntry] = {}
        for path, content in (files or {}).items():
            if isinstance(content, Path):
                data = content.read_bytes()
            elif isinstance(content, str):
                data = content.encode()
            else:
                data = bytes(content)
            additions[path] = self._entry_for(path, data, lfs)
        deletions = [(p, p.endswith("/")) for p in delete]
        title, _, body = message.partition("\n")
        sha, _ = self._apply_commit(repo, branch, additions, deletions, title, body.strip())
        return sha

    def upload_folder_direct(
        self, repo_id: str, folder: Path | str, message: str = "Upload folder", **kwargs: Any
    ) -> str:
        """Commit every file under a local folder (paths relative to it)."""
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.commit_direct(repo_id, files, message, **kwargs)

    def tag(self, repo_id: str, tag: str, sha: str | None = None, *, repo_type: str = "model") -> None:
        """Point tag `tag` at `sha` (a commit SHA or any revision; default: head of main)."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            target = repo.resolve(sha or "main")
            if target is None:
                raise ValueError(f"unknown revision {sha}")
            repo.tags[tag] = target
            self._save(repo)

    def branch(self, repo_id: str, name: str, sha: str | None = None, *, repo_type: str = "model") -> None:
        """Create or move branch `name` to `sha` (default: head of main)."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            target = repo.resolve(sha or "main")
            if target is None:
                raise ValueError(f"unknown revision {sha}")
            repo.branches[name] = target
            self._save(repo)

    def head_sha(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            sha = self.get_repo(repo_id, repo_type).resolve(branch)
        if sha is None:
            raise KeyError(branch)
        return sha

    def commit_history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[Commit]:
        """Commits reachable from `revision`, newest first."""
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(revision)
            return list(repo.history(sha))

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, FileEntry]:
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(revision)
            return dict(repo.commits[sha].files)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        return self.read_blob(self.list_files(repo_id, revision, repo_type=repo_type)[path].sha256)

    def set_repo_flags(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool | None = None,
        gated: bool | str | None = None,
        disabled: bool | None = None,
    ) -> None:
        with self._lock:
            repo = self.get_repo(repo_id, repo_type)
            if private is not None:
                repo.private = private
            if gated is not None:
                repo.gated = "auto" if gated is True else gated
            if disabled is not None:
                repo.disabled = disabled
            self._save(repo)

    def grant_access(self, repo_id: str, token: str, *, repo_type: str = "model") -> None:
        """Let `token` read a gated repo."""
        with self._lock:
            self.get_repo(repo_id, repo_type).gated_allow.add(token)

    def delete_repo_direct(self, repo_id: str, *, repo_type: str = "model") -> None:
        with self._lock:
            repo = self._repos.pop((repo_type, repo_id))
            self._state_path(repo).unlink(missing_ok=True)

    def unique_repo_id(self, stem: str = "repo") -> str:
        """A fresh `username/stem-xxxxxxxx` id (repos persist across tests on a shared server)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:60] or "repo"
        while True:
            repo_id = f"{self.username}/{safe}-{secrets.token_hex(4)}"
            if not any(rid == repo_id for _, rid in self._repos):
                return repo_id

    # -- URL helpers ------------------------------------------------------------------------

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"


def _check_repo_id(repo_id: str, repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ValueError(f"bad repo type {repo_type!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", repo_id):
        raise ValueError(f"repo id must be 'namespace/name': {repo_id!r}")


# ----------------------------------------------------------------------------------------------
# Request handling
# ----------------------------------------------------------------------------------------------


_DEFAULT_FAULT_CODES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    408: "RequestTimeout",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "GatewayTimeout",
}


class _DropConnection(Exception):
    """Raised after a deliberately truncated body: the connection must be closed."""


class _Handler(BaseHTTPRequestHandler):
    """One connection. HTTP/1.1 with keep-alive, as httpx expects; every answer has a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "hfmerge-test-hub/1.0"
    timeout = 300  # idle keep-alive connections give their thread back eventually

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence the default stderr access log; tests read `HubServer.requests` instead."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        """Read the whole request body (Content-Length or chunked) so keep-alive stays in sync."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline().strip().split(b";", 1)[0]
                size = int(size_line or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers up to the blank line
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def _handle(self, method: str) -> None:
        self._sent = 0
        self._logged = False
        self._drop_after: int | None = None
        self._corrupt = False
        self._method = method
        target = self.path
        split = urlsplit(target)
        path = unquote(split.path)
        self._entry = RequestRecord(
            method=method,
            path=path,
            headers={k.lower(): v for k, v in self.headers.items() if k.lower() not in ("authorization", "cookie")},
            range=self.headers.get("Range"),
            query=split.query,
            has_auth=self.headers.get("Authorization") is not None,
        )
        try:
            body = self._read_body()
            self._entry.request_bytes = len(body)
            # Logged before answering: once the client has its answer, the record is there.
            self.hub._record(self._entry)
            self._logged = True
            delay, fault = self.hub.faults.take(method, path, target, ranged=self._entry.range is not None)
            if delay > 0:
                self.hub._stop_event.wait(delay)
            if fault is not None and fault.status is not None:
                code = fault.error_code or _DEFAULT_FAULT_CODES.get(fault.status, "InjectedFault")
                raise HubError(fault.status, code, fault.message or f"Injected {fault.status} ({code})", fault.headers)
            if fault is not None and fault.drop_after is not None:
                self._drop_after = fault.drop_after
            self._corrupt = fault is not None and fault.corrupt
            self._dispatch(method, split.path, parse_qs(split.query, keep_blank_values=True), body)
        except HubError as err:
            try:
                self._send_error(err)
            except (_DropConnection, ConnectionError, TimeoutError):
                self.close_connection = True
        except _DropConnection:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            # The client went away (e.g. it timed out during an injected delay): nothing to answer.
            self.close_connection = True
        except Exception:  # a bug in the server: answer 500 and keep the traceback for the test
            self.hub.internal_errors.append(traceback.format_exc())
            try:
                crash = HubError(500, "InternalError", "Internal server error (see HubServer.internal_errors)")
                self._send_error(crash)
            except Exception:
                self.close_connection = True
        finally:
            if not self._logged:  # the body could not be read
                self.hub._record(self._entry)

    # -- answers ----------------------------------------------------------------------------

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        self._entry.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _write(self, data: bytes) -> None:
        """Write body bytes, honouring an injected connection drop."""
        if self._drop_after is not None:
            room = max(self._drop_after - self._sent, 0)
            if len(data) >= room:
                self._count(room)
                self.wfile.write(data[:room])
                self.wfile.flush()
                raise _DropConnection()
        self._count(len(data))
        self.wfile.write(data)

    def _count(self, n: int) -> None:
        """Account for body bytes before sending them (see RequestRecord)."""
        self._sent += n
        self._entry.body_bytes = self._sent

    def _send_bytes(
        self, status: int, data: bytes, headers: Mapping[str, str] | None = None, *, content_type: str
    ) -> None:
        all_headers = {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}
        self._start(status, all_headers)
        if self._method != "HEAD" and data:
            self._write(data)
            if self._drop_after is not None and self._sent <= self._drop_after:
                # Whole body fitted before the drop point: still cut the connection as asked.
                self.wfile.flush()
                raise _DropConnection()

    def _send_json(
        self,
        obj: Any,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), headers, content_type=content_type)

    def _send_error(self, err: HubError) -> None:
        # Header values must be one latin-1 line.
        msg = err.message.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace").decode("latin-1")
        headers = {"X-Error-Code": err.code, "X-Error-Message": msg, **err.headers}
        body = err.body if err.body is not None else {"error": err.message}
        self.close_connection = self.close_connection or err.status >= 500
        self._send_json(body, err.status, headers)

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, method: str, raw_path: str, query: dict[str, list[str]], body: bytes) -> None:
        # Split before unquoting: the client quotes revisions with safe="" so "refs/pr/1" or a
        # path with "/" arrives as one segment.
        segs = [unquote(s) for s in raw_path.lstrip("/").split("/")]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs[0] == "api":
            return self._dispatch_api(method, segs[1:], query, body)
        if segs[0] == "_lfs":
            return self._dispatch_lfs_storage(method, segs[1:], query, body)
        repo_type = "model"
        if segs[0] in ("datasets", "spaces") and len(segs) > 1:
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) >= 5 and segs[1].endswith(".git") and segs[2:5] == ["info", "lfs", "objects"]:
            if len(segs) == 6 and segs[5] == "batch" and method == "POST":
                return self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-4]}", body)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HubError(404, "NotFound", f"No route for {method} {raw_path}")

    def _dispatch_api(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        head = segs[0] if segs else ""
        if head == "whoami-v2" and method == "GET":
            return self._whoami()
        if head == "validate-yaml" and method == "POST":
            return self._validate_yaml(body)
        if head == "repos" and len(segs) == 2:
            if segs[1] == "create" and method == "POST":
                return self._create_repo(body)
            if segs[1] == "delete" and method == "DELETE":
                return self._delete_repo(body)
        if head in ("models", "datasets", "spaces") and len(segs) >= 3:
            repo_type = head[:-1]
            repo_id = f"{segs[1]}/{segs[2]}"
            rest = segs[3:]
            action = rest[0] if rest else ""
            arg = "/".join(rest[1:])
            if method == "GET" and action == "":
                return self._repo_info(repo_type, repo_id, "main", query)
            if method == "GET" and action == "revision" and arg:
                return self._repo_info(repo_type, repo_id, arg, query)
            if method == "GET" and action == "tree" and len(rest) >= 2:
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and action == "paths-info" and arg:
                return self._paths_info(repo_type, repo_id, arg, body)
            if method == "GET" and action == "commits" and arg:
                return self._commits(repo_type, repo_id, arg, query)
            if method == "GET" and action == "refs":
                return self._refs(repo_type, repo_id, query)
            if method == "POST" and action == "preupload" and arg:
                return self._preupload(repo_type, repo_id, arg, body)
            if method == "POST" and action == "commit" and arg:
                return self._commit(repo_type, repo_id, arg, query, body)
            if action == "tag" and arg and method in ("POST", "DELETE"):
                return self._tag(method, repo_type, repo_id, arg, body)
            if action == "branch" and arg and method in ("POST", "DELETE"):
                return self._branch(method, repo_type, repo_id, arg, body)
            if action == "settings" and method == "PUT":
                return self._settings(repo_type, repo_id, body)
        raise HubError(404, "NotFound", f"No API route for {method} /api/{'/'.join(segs)}")

    # -- access control ---------------------------------------------------------------------

    def _auth(self) -> str | None:
        """The request's valid token, None when anonymous; 401 for an invalid token (like the Hub)."""
        token = self._token()
        if token is None:
            return None
        if not self.hub.token_is_valid(token):
            raise HubError(401, "InvalidCredentials", "Invalid credentials in Authorization header")
        return token

    def _require_write(self) -> str | None:
        token = self._auth()
        if token is None and self.hub.require_auth_for_writes:
            raise HubError(401, "Unauthorized", "You must be authenticated to write to the Hub (no token sent)")
        return token

    def _repo(
        self, repo_type: str, repo_id: str, *, content: bool = False, write: bool = False
    ) -> tuple[Repo, str | None]:
        """Look up a repo and check access. `content` reads (file bytes) are also subject to gating."""
        token = self._require_write() if write else self._auth()
        if write:
            self._check_write_scope(token, repo_id)
        repo = self.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token is None):
            raise HubError(
                404 if token else 401,
                "RepoNotFound",
                f"Repository not found: {repo_type} {repo_id}",
            )
        if repo.disabled:
            raise HubError(403, "DisabledRepo", "Access to this resource is disabled.")
        if content and not write and repo.gated and token not in repo.gated_allow:
            raise HubError(
                401 if token is None else 403,
                "GatedRepo",
                f"Access to {repo_id} is restricted. You must have access to it and be authenticated to access it.",
            )
        return repo, token

    def _check_write_scope(self, token: str | None, repo_id: str) -> None:
        """403 when a token registered with `add_token` may not write to `repo_id`."""
        if token is not None and not self.hub.token_profile(token).can_write(repo_id):
            raise HubError(403, "Forbidden", f"You don't have the rights to write to {repo_id}")

    def _rev(self, repo: Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha

    # -- read endpoints ---------------------------------------------------------------------

    def _whoami(self) -> None:
        token = self._auth()
        if token is None:
            raise HubError(401, "Unauthorized", "Invalid credentials in Authorization header")
        self._send_json(self.hub.whoami_answer(token))

    def _repo_info(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        repo, _ = self._repo(repo_type, repo_id)
        with self.hub._lock:
            sha = self._rev(repo, revision)
            commit = repo.commits[sha]
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            entry = commit.files[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        ns = repo_id.split("/")[0]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": ns,
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": repo.disabled,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            if "config.json" in commit.files:
                info["library_name"] = "transformers"
        self._send_json(info)

    def _tree_entries(self, repo: Repo, sha: str, expand: bool) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """All entries of a commit, keyed by path (files and directories), and the dir oids."""
        files = repo.commits[sha].files
        dir_children: dict[str, list[str]] = {}
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                dir_children.setdefault("/".join(parts[:i]), []).append(path)
        dir_oids = {
            d: hashlib.sha1("\n".join(f"{p} {files[p].oid}" for p in sorted(children)).encode()).hexdigest()
            for d, children in dir_children.items()
        }
        entries: dict[str, dict[str, Any]] = {}
        for d, oid in dir_oids.items():
            entries[d] = {"type": "directory", "oid": oid, "size": 0, "path": d}
        for path, e in files.items():
            item: dict[str, Any] = {"type": "file", "oid": e.oid, "size": e.size, "path": path}
            if e.lfs:
                item["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
            entries[path] = item
        if expand:
            for path, item in entries.items():
                last = self._last_change(repo, sha, path, item["type"] == "directory")
                item["lastCommit"] = {"id": last.sha, "title": last.title, "date": last.date}
                if item["type"] == "file":
                    item["securityFileStatus"] = {
                        "status": "safe",
                        "avScan": {"virusFound": False},
                        "pickleImportScan": None,
                    }
        return entries, dir_oids

    def _last_change(self, repo: Repo, sha: str, path: str, is_dir: bool) -> Commit:
        """Newest commit in the history of `sha` that changed `path`."""

        def key(c: Commit) -> Any:
            if not is_dir:
                return c.files.get(path)
            prefix = path + "/"
            return tuple(sorted((p, e.oid) for p, e in c.files.items() if p.startswith(prefix)))

        history = list(repo.history(sha))
        for commit, parent in zip(history, history[1:] + [None]):
            if parent is None or key(commit) != key(parent):
                return commit
        return history[-1]

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> None:
        repo, _ = self._repo(repo_type, repo_id)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
        cursor = int(query.get("cursor", ["0"])[0] or 0)
        with self.hub._lock:
            sha = self._rev(repo, revision)
            entries, dir_oids = self._tree_entries(repo, sha, expand)
        path = path.strip("/")
        if path and path not in dir_oids:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
        prefix = path + "/" if path else ""
        selected = []
        for p, item in entries.items():
            if not p.startswith(prefix) or p == path:
                continue
            if not recursive and "/" in p[len(prefix) :]:
                continue
            selected.append(item)
        # Directories before files at each level, then by path: stable and Hub-like.
        selected.sort(key=lambda it: (it["path"].count("/"), it["type"] != "directory", it["path"]))
        page_size = self.hub.tree_expand_page_size if expand else self.hub.tree_page_size
        page = selected[cursor : cursor + page_size]
        headers: dict[str, str] = {}
        if cursor + page_size < len(selected):
            rev_q = quote(revision, safe="")
            path_q = "/" + quote(path, safe="") if path else ""
            base = f"{self.hub.url}/api/{repo_type}s/{repo_id}/tree/{rev_q}{path_q}"
            nxt = f"{base}?recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={cursor + page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo, _ = self._repo(repo_type, repo_id)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            payload = json.loads(body or b"{}")
            paths = payload.get("paths", [])
            expand = bool(payload.get("expand", False))
        else:
            form = parse_qs(body.decode(), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            sha = self._rev(repo, revision)
            entries, _ = self._tree_entries(repo, sha, expand)
        self._send_json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _commits(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]]) -> None:
        repo, _ = self._repo(repo_type, repo_id)
        page_num = int(query.get("p", ["0"])[0] or 0)
        with self.hub._lock:
            sha = self._rev(repo, revision)
            history = list(repo.history(sha))
        size = self.hub.commits_page_size
        items = []
        formatted = "formatted" in query.get("expand[]", [])
        for c in history[page_num * size : (page_num + 1) * size]:
            item: dict[str, Any] = {
                "id": c.sha,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
            if formatted:
                item["formatted"] = {"title": c.title, "message": c.message}
            items.append(item)
        headers: dict[str, str] = {}
        if (page_num + 1) * size < len(history):
            extra = "&expand[]=formatted" if formatted else ""
            base = f"{self.hub.url}/api/{repo_type}s/{repo_id}/commits/{quote(revision, safe='')}"
            nxt = f"{base}?p={page_num + 1}{extra}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(items, headers=headers)

    def _refs(self, repo_type: str, repo_id: str, query: dict[str, list[str]]) -> None:
        repo, _ = self._repo(repo_type, repo_id)
        with self.hub._lock:
            out: dict[str, Any] = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in repo.branches.items()
                ],
                "converts": [],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.tags.items()],
            }
            if query.get("include_prs"):
                out["pullRequests"] = [
                    {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s} for n, s in repo.prs.items()
                ]
        self._send_json(out)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo, _ = self._repo(repo_type, repo_id, content=True)
        with self.hub._lock:
            sha = self._rev(repo, revision)
            entry = repo.commits[sha].files.get(path)
        if entry is None:
            raise HubError(404, "EntryNotFound", f"Entry not found: {path} at {revision}", {"X-Repo-Commit": sha})
        blob = self.hub._blob_path(entry.sha256)
        size = entry.size
        name = path.rsplit("/", 1)[-1]
        ascii_name = name.encode("ascii", "replace").decode()
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.etag}"',
            "X-Repo-Commit": sha,
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}; filename=\"{ascii_name}\"",
            "Cache-Control": "private, max-age=0",
        }
        if entry.lfs:
            # What the Hub puts on LFS answers; the client prefers these over ETag/Content-Length.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header is not None:
            start, end = self._parse_range(range_header, size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)
        self._start(status, headers)
        if self._method == "HEAD" or length == 0:
            return
        with open(blob, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise RuntimeError(f"blob {entry.sha256} shorter than recorded size")
                if self._corrupt:
                    chunk = self._corrupted(chunk, length - remaining, length)
                self._write(chunk)
                remaining -= len(chunk)
        if self._drop_after is not None:
            self.wfile.flush()
            raise _DropConnection()

    @staticmethod
    def _corrupted(chunk: bytes, offset: int, length: int) -> bytes:
        """`chunk` (at `offset` in a body of `length` bytes) with the body's middle byte flipped."""
        middle = length // 2
        if not offset <= middle < offset + len(chunk):
            return chunk
        i = middle - offset
        return chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]

    @staticmethod
    def _parse_range(header: str, size: int) -> tuple[int, int]:
        """Inclusive (start, end) of a single `bytes=` range; 416 when unsatisfiable or malformed."""
        unsatisfiable = HubError(
            416,
            "RangeNotSatisfiable",
            f"Range not satisfiable: {header} (size {size})",
            {"Content-Range": f"bytes */{size}"},
        )
        m = _RANGE.fullmatch(header)
        if not m or (m.group(1) == "" and m.group(2) == ""):
            raise unsatisfiable
        first, last = m.group(1), m.group(2)
        if first == "":
            suffix = int(last)
            if suffix == 0 or size == 0:
                raise unsatisfiable
            return max(size - suffix, 0), size - 1
        start = int(first)
        end = int(last) if last else size - 1
        if start >= size or end < start:
            raise unsatisfiable
        return start, min(end, size - 1)

    # -- write endpoints --------------------------------------------------------------------

    def _create_repo(self, body: bytes) -> None:
        self._require_write()
        payload = json.loads(body or b"{}")
        name = payload.get("name")
        namespace = payload.get("organization") or self.hub.username
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, "BadRequest", f"Invalid repo type {repo_type!r}")
        repo_id = f"{namespace}/{name}"
        try:
            _check_repo_id(repo_id, repo_type)
        except ValueError as err:
            raise HubError(400, "BadRequest", str(err)) from None
        self._check_write_scope(self._token(), repo_id)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = self.hub.repo_url(repo_id, repo_type)
        try:
            self.hub._create_repo(repo_id, repo_type, private)
        except KeyError:
            # The client reads `url` even from the 409 when exist_ok=True.
            message = f"You already created this {repo_type} repo"
            raise HubError(409, "RepoExists", message, body={"error": message, "url": url}) from None
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, body: bytes) -> None:
        self._require_write()
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or self.hub.username}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        with self.hub._lock:
            if not self.hub.repo_exists(repo_id, repo_type):
                raise HubError(404, "RepoNotFound", f"Repository not found: {repo_type} {repo_id}")
            self.hub.delete_repo_direct(repo_id, repo_type=repo_type)
        self._send_json({})

    def _settings(self, repo_type: str, repo_id: str, body: bytes) -> None:
        self._repo(repo_type, repo_id, write=True)
        payload = json.loads(body or b"{}")
        private = payload.get("private")
        if "visibility" in payload:
            private = payload["visibility"] == "private"
        self.hub.set_repo_flags(repo_id, repo_type=repo_type, private=private, gated=payload.get("gated"))
        self._send_json({})

    def _validate_yaml(self, body: bytes) -> None:
        """Accept any README whose YAML front matter, when present, is closed by a `---` line."""
        payload = json.loads(body or b"{}")
        content = payload.get("content", "")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            raise HubError(
                400,
                "InvalidYaml",
                "Invalid YAML metadata",
                body={"errors": [{"message": "YAML front matter is not closed by '---'"}], "warnings": []},
            )
        self._send_json({"errors": [], "warnings": []})

    def _preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        repo, _ = self._repo(repo_type, repo_id, write=True)
        payload = json.loads(body or b"{}")
        with self.hub._lock:
            sha = self._rev(repo, revision)
            files = repo.commits[sha].files
        out = []
        for f in payload.get("files", []):
            path, size = f["path"], int(f.get("size", 0))
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.hub.should_use_lfs(path, size, sample)
            item: dict[str, Any] = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            existing = files.get(path)
            if existing is not None:
                # Compared client-side with sha256 (LFS) or git sha1 (regular) to skip unchanged files.
                item["oid"] = existing.sha256 if existing.lfs else existing.oid
            out.append(item)
        self._send_json({"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes) -> None:
        repo, _ = self._repo(repo_type, repo_id, write=True)
        create_pr = query.get("create_pr", ["0"])[0] in ("1", "true")
        header: dict[str, Any] | None = None
        additions: dict[str, FileEntry] = {}
        deletions: list[tuple[str, bool]] = []
        order: list[tuple[str, str]] = []
        # Parse and validate everything before touching the repo: the commit is all or nothing.
        for n, line in enumerate(body.splitlines()):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, "BadRequest", f"Malformed NDJSON line {n + 1}") from None
            if key == "header":
                header = value
            elif key == "file":
                enc = value.get("encoding", "base64")
                raw = value["content"]
                data = base64.b64decode(raw) if enc == "base64" else raw.encode()
                additions[value["path"]] = self.hub._entry_for(value["path"], data, lfs=False)
                order.append(("add", value["path"]))
            elif key == "lfsFile":
                oid = value["oid"]
                if value.get("algo", "sha256") != "sha256" or not self.hub.has_blob(oid):
                    raise HubError(422, "LfsFileNotFound", f"LFS object {oid} for {value['path']} was never uploaded")
                size = self.hub._blob_path(oid).stat().st_size
                if value.get("size") is not None and int(value["size"]) != size:
                    raise HubError(422, "LfsSizeMismatch", f"LFS object {oid}: size {value['size']} != stored {size}")
                pointer_oid = git_blob_sha1(lfs_pointer(oid, size))
                additions[value["path"]] = FileEntry(sha256=oid, size=size, lfs=True, oid=pointer_oid)
                order.append(("add", value["path"]))
            elif key in ("deletedFile", "deletedFolder"):
                folder = key == "deletedFolder"
                deletions.append((value["path"], folder))
                order.append(("delete_folder" if folder else "delete_file", value["path"]))
            else:
                raise HubError(400, "BadRequest", f"Unknown commit operation {key!r}")
        if header is None:
            raise HubError(400, "BadRequest", "Missing commit header line")
        summary = header.get("summary") or ""
        if not summary:
            raise HubError(400, "BadRequest", "Commit summary is required")
        sha, pr_num = self.hub._apply_commit(
            repo,
            revision,
            additions,
            deletions,
            summary,
            header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            create_pr=create_pr,
            ops_order=order,
        )
        base = self.hub.repo_url(repo_id, repo_type)
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{base}/commit/{sha}",
                "commitMessage": summary,
                "pullRequestUrl": f"{base}/discussions/{pr_num}" if pr_num is not None else None,
            }
        )

    def _tag(self, method: str, repo_type: str, repo_id: str, arg: str, body: bytes) -> None:
        repo, _ = self._repo(repo_type, repo_id, write=True)
        with self.hub._lock:
            if method == "DELETE":
                if arg not in repo.tags:
                    raise HubError(404, "RevisionNotFound", f"Tag {arg} not found")
                del repo.tags[arg]
            else:
                payload = json.loads(body or b"{}")
                tag = payload.get("tag")
                if not tag:
                    raise HubError(400, "BadRequest", "Missing tag name")
                if tag in repo.tags:
                    raise HubError(409, "TagExists", f"Tag {tag} already exists")
                repo.tags[tag] = self._rev(repo, arg)
            self.hub._save(repo)
        self._send_json({})

    def _branch(self, method: str, repo_type: str, repo_id: str, name: str, body: bytes) -> None:
        repo, _ = self._repo(repo_type, repo_id, write=True)
        with self.hub._lock:
            if method == "DELETE":
                if name not in repo.branches:
                    raise HubError(404, "RevisionNotFound", f"Branch {name} not found")
                if name == "main":
                    raise HubError(403, "Forbidden", "Cannot delete the default branch")
                del repo.branches[name]
            else:
                payload = json.loads(body or b"{}")
                if name in repo.branches:
                    raise HubError(409, "BranchExists", f"Branch {name} already exists")
                repo.branches[name] = self._rev(repo, payload.get("startingPoint") or "main")
            self.hub._save(repo)
        self._send_json({})

    # -- LFS --------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        operation = payload.get("operation")
        repo, _ = self._repo(repo_type, repo_id, write=operation == "upload", content=operation == "download")
        if operation != "upload":
            raise HubError(422, "UnsupportedOperation", f"LFS operation {operation!r} is not supported here")
        transfers = payload.get("transfers") or ["basic"]
        chunk = self.hub.multipart_chunk_size
        use_multipart = chunk is not None and "multipart" in transfers
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int):
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": str(oid), "size": int(size or 0), "error": error})
                continue
            if self.hub.has_blob(oid):
                objects.append({"oid": oid, "size": size})  # no actions: already stored
                continue
            nonce = secrets.token_hex(16)  # the upload URL is the credential: PUTs carry no auth
            with self.hub._lock:
                self.hub._uploads[nonce] = (oid, size)
            href = f"{self.hub.url}/_lfs/upload/{oid}/{nonce}"
            upload: dict[str, Any] = {"href": href}
            if use_multipart and chunk is not None and size >= chunk:
                n_parts = -(-size // chunk)
                parts = {str(i): f"{href}/part/{i}" for i in range(1, n_parts + 1)}
                upload["header"] = {"chunk_size": str(chunk), **parts}
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {"upload": upload, "verify": {"href": f"{self.hub.url}/_lfs/verify/{oid}"}},
                }
            )
        self._send_json(
            {"transfer": "multipart" if use_multipart else "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _dispatch_lfs_storage(self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes) -> None:
        # /_lfs/upload/{oid}/{nonce}            PUT (basic) or POST (multipart completion)
        # /_lfs/upload/{oid}/{nonce}/part/{n}   PUT (multipart part)
        # /_lfs/verify/{oid}                    POST
        if len(segs) >= 3 and segs[0] == "upload":
            oid, nonce = segs[1], segs[2]
            with self.hub._lock:
                pending = self.hub._uploads.get(nonce)
            if pending is None or pending[0] != oid:
                raise HubError(403, "InvalidUploadUrl", "Unknown or expired upload URL")
            size = pending[1]
            if len(segs) == 3 and method == "PUT":
                return self._lfs_store(nonce, oid, size, body)
            if len(segs) == 5 and segs[3] == "part" and method == "PUT":
                part_dir = self.hub.root / "tmp" / f"parts-{nonce}"
                part_dir.mkdir(exist_ok=True)
                (part_dir / segs[4]).write_bytes(body)
                etag = f'"{hashlib.md5(body).hexdigest()}"'
                return self._send_bytes(200, b"", {"ETag": etag}, content_type="text/plain")
            if len(segs) == 3 and method == "POST":
                payload = json.loads(body or b"{}")
                part_dir = self.hub.root / "tmp" / f"parts-{nonce}"
                data = bytearray()
                for part in sorted(payload.get("parts", []), key=lambda p: p["partNumber"]):
                    part_path = part_dir / str(part["partNumber"])
                    if not part_path.is_file():
                        raise HubError(400, "MissingPart", f"Part {part['partNumber']} was never uploaded")
                    chunk = part_path.read_bytes()
                    if part.get("etag", "").strip('"') != hashlib.md5(chunk).hexdigest():
                        raise HubError(400, "BadPartEtag", f"ETag mismatch for part {part['partNumber']}")
                    data += chunk
                shutil.rmtree(part_dir, ignore_errors=True)
                return self._lfs_store(nonce, oid, size, bytes(data))
        if len(segs) == 2 and segs[0] == "verify" and method == "POST":
            self._require_write()
            payload = json.loads(body or b"{}")
            oid = segs[1]
            path = self.hub._blob_path(oid)
            if not path.is_file() or path.stat().st_size != int(payload.get("size", -1)):
                raise HubError(422, "LfsVerifyFailed", f"LFS object {oid} is missing or has the wrong size")
            return self._send_json({"success": True})
        raise HubError(404, "NotFound", f"No LFS route for {method} /_lfs/{'/'.join(segs)}")

    def _lfs_store(self, nonce: str, oid: str, size: int, data: bytes) -> None:
        """Check an uploaded object against its announced oid and size, then keep it."""
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "LfsContentMismatch", f"Uploaded content does not match oid {oid} / size {size}")
        fd, tmp = tempfile.mkstemp(dir=self.hub.root / "tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.hub._adopt_file(Path(tmp), oid)
        with self.hub._lock:
            self.hub._uploads.pop(nonce, None)
        self._send_bytes(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description="Run the test Hub server")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with HubServer(args.root, args.port) as hub:
        print(f"HF_ENDPOINT={hub.url}", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
