"""Publishing a merged model folder to the Hub in one commit.

Three guarantees, in the order a push needs them:

- `check_push_access` asks the Hub who the token belongs to (``/api/whoami-v2``) and refuses a
  missing, invalid or read-only token, or a namespace the token cannot write to, in seconds and
  before anything is merged or downloaded (transient whoami failures are retried with the
  policy of every Hub call, `checkpoints.hub.call_with_retries`).
- `check_output_folder` refuses a folder that is not a complete hfmerge output (weights, config,
  model card; every shard the index lists; no leftovers of an unfinished write).
- `push_folder` uploads the folder as one commit (all files or none); when the commit fails or is
  interrupted and the repo was created by this push, the repo is deleted again, so a failed push
  leaves the Hub as it was.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HubAccessError, IncompleteOutputError, PublishError

log = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload merged model (hfmerge)"
# Markers of a write that did not finish: hfmerge's own temporary folders
# (`.<name>.hfmerge-XXXX`) and the suffixes downloaders and editors use for partial files.
TEMP_MARKER = ".hfmerge-"
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".lock", ".swp")


@dataclass
class PublishResult:
    repo_id: str
    commit_url: str
    commit_oid: str


@dataclass(frozen=True)
class PushAccess:
    """Who a push writes as, once `check_push_access` has accepted the token."""

    user: str
    namespace: str
    token_role: str | None  # "write", "fineGrained", or None when the Hub does not say
    repo_id: str = ""  # the full ``namespace/name`` (a bare name gets the token's user as namespace)


def check_push_access(repo_id: str, *, token: str | None = None) -> PushAccess:
    """Check that a Hub token is present and can write to `repo_id`'s namespace.

    Reads ``/api/whoami-v2`` once (retrying transient failures) and checks: the token is valid;
    its role is ``write``, or it is fine-grained with ``repo.write`` on the namespace or on the
    repo itself; the namespace is the token's user or one of its organizations (where the user's
    role is not ``read``). An existing repo belongs to its namespace, so the same check covers it.

    Args:
        repo_id: The target ``namespace/name``, or a bare ``name``: then the namespace is the
            token's user, as the Hub's own command line does.
        token: A token; by default the one huggingface_hub finds (``HF_TOKEN``, ``hf auth login``).

    Returns:
        The user the push will write as, and the full repo id.

    Raises:
        HubAccessError: No token, an invalid or read-only token, a namespace the token cannot
            write to, offline mode, or a Hub that does not answer after the retries.
    """
    from huggingface_hub import get_token

    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else "your account"
    token = token or get_token()
    if not token:
        raise HubAccessError(f"push to {repo_id}: no Hugging Face token found; {_token_help(namespace)}")
    info = _whoami(repo_id, namespace, token)
    if "/" not in repo_id:
        namespace = str(info.get("name"))
        repo_id = f"{namespace}/{repo_id}"
    reason = _write_denied(info, namespace, repo_id)
    if reason is not None:
        raise HubAccessError(f"push to {repo_id} refused: {reason}; {_token_help(namespace)}")
    access = (info.get("auth") or {}).get("accessToken") or {}
    result = PushAccess(user=str(info.get("name")), namespace=namespace, token_role=access.get("role"), repo_id=repo_id)
    log.info("Hub token of %s can write to %s", result.user, namespace)
    return result


def _whoami(repo_id: str, namespace: str, token: str) -> dict[str, Any]:
    """The ``/api/whoami-v2`` answer for `token`, with transient failures retried."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub import errors as e

    from .checkpoints.hub import HubRetriesExhausted, call_with_retries

    try:
        return call_with_retries(lambda: HfApi().whoami(token=token))
    except e.OfflineModeIsEnabled:
        raise HubAccessError(f"push to {repo_id}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to push") from None
    except HubRetriesExhausted as exc:
        raise HubAccessError(f"push to {repo_id}: could not check the token: the Hub did not answer ({exc}); retry later") from None
    except e.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubAccessError(f"push to {repo_id}: the Hugging Face token is invalid or expired (HTTP 401); {_token_help(namespace)}") from None
        raise HubAccessError(f"push to {repo_id}: could not check the token (whoami answered HTTP {status}: {_first_line(exc)}); retry later") from None
    except (httpx2.HTTPError, OSError, ValueError) as exc:
        raise HubAccessError(f"push to {repo_id}: could not reach the Hub to check the token ({type(exc).__name__}: {_first_line(exc)}); check the connection and retry") from None


def _write_denied(info: dict[str, Any], namespace: str, repo_id: str) -> str | None:
    """Why the whoami answer `info` cannot write to `repo_id`, or None when it can."""
    user = str(info.get("name"))
    orgs = {str(o.get("name")): o for o in info.get("orgs") or []}
    if namespace != user and namespace not in orgs:
        member_of = f" ({', '.join(sorted(orgs))})" if orgs else ""
        return f"the token belongs to {user!r}, and {namespace!r} is neither that user nor one of its organizations{member_of}"
    if namespace in orgs and orgs[namespace].get("roleInOrg") == "read":
        return f"{user!r} has only the read role in the organization {namespace!r}, no write access"
    access = (info.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return f"the token of {user!r} is a read token, without write access"
    if role == "fineGrained":
        for scope in (access.get("fineGrained") or {}).get("scoped") or []:
            entity = scope.get("entity") or {}
            if "repo.write" not in (scope.get("permissions") or []):
                continue
            if entity.get("type") in ("user", "org") and entity.get("name") == namespace:
                return None
            if entity.get("type") == "model" and entity.get("name") == repo_id:
                return None
        return f"the fine-grained token of {user!r} has no write access (repo.write) to {namespace!r} or {repo_id!r}"
    # A write token, or a kind of authentication whose rights whoami does not spell out (the
    # commit then decides).
    return None


def check_output_folder(folder: Path) -> list[str]:
    """Check that `folder` is a complete hfmerge output and list its files.

    Complete means: safetensors weights (``model.safetensors``, or the index and every shard it
    lists) whose headers match their file sizes, a readable ``config.json``, the ``README.md``
    model card, and nothing left over from an unfinished write (hfmerge temporary folders or
    ``*.tmp``/``*.part``/``*.incomplete``... files).

    Args:
        folder: The folder to publish.

    Returns:
        The files that a push uploads, relative to `folder` (POSIX paths, sorted).

    Raises:
        IncompleteOutputError: What is missing or left over, and what to do.
    """
    from .checkpoints.safetensors_header import read_header

    folder = Path(folder)
    where = f"{folder} is not a complete hfmerge output"
    if not folder.is_dir():
        raise IncompleteOutputError(f"{folder}: no such folder; give the folder a merge wrote (its output folder)")
    if TEMP_MARKER in folder.name:
        raise IncompleteOutputError(f"{where}: it is the temporary folder of an unfinished merge; run the merge again (or resume a search)")
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, FORBIDDEN_FOLDERS, filter_repo_objects

    # What upload_folder sends: everything but the client's ignore patterns; a forbidden folder
    # left after that (`.cache/...` outside `.cache/huggingface`) would fail the upload itself.
    files = sorted(filter_repo_objects((p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
                                       ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    forbidden = [f for f in files if any(part in FORBIDDEN_FOLDERS for part in f.split("/"))]
    if forbidden:
        raise IncompleteOutputError(f"{where}: it holds {forbidden[0]}, in a folder the Hub refuses ({', '.join(FORBIDDEN_FOLDERS)}); "
                                    "remove that folder, then push again")
    leftovers = [f for f in files if TEMP_MARKER in f or f.lower().endswith(TEMP_SUFFIXES)]
    if leftovers:
        raise IncompleteOutputError(f"{where}: it holds files of an unfinished write ({', '.join(leftovers[:3])}); merge again into a new output folder")
    index_name = "model.safetensors.index.json"
    if index_name in files:
        try:
            weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IncompleteOutputError(f"{where}: {index_name} is unreadable ({type(exc).__name__}); merge again") from None
        missing = [s for s in shards if s not in files]
        if missing:
            raise IncompleteOutputError(f"{where}: shard(s) {', '.join(missing[:3])} listed in {index_name} are missing; merge again")
    elif "model.safetensors" in files:
        shards = ["model.safetensors"]
    else:
        raise IncompleteOutputError(f"{where}: no model.safetensors or {index_name}; give the folder a merge wrote")
    for shard in shards:
        try:
            read_header(folder / shard)
        except CheckpointError as exc:
            raise IncompleteOutputError(f"{where}: {exc}; merge again") from None
    for name, what in (("config.json", "the model config"), ("README.md", "the model card")):
        if name not in files:
            raise IncompleteOutputError(f"{where}: {name} ({what}) is missing; merge again")
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise IncompleteOutputError(f"{where}: config.json is not valid JSON ({type(exc).__name__}); merge again") from None
    return files


def push(folder: Path, repo_id: str, *, private: bool = False, message: str = DEFAULT_COMMIT_MESSAGE) -> PublishResult:
    """Publish an already written hfmerge output folder: check it, check the token, push one commit.

    Args:
        folder: A folder a merge wrote.
        repo_id: The target ``namespace/name`` (a bare ``name`` goes to the token's user); created
            when missing.
        private: Create the repo as private (an existing repo keeps its visibility).
        message: The commit message.

    Returns:
        The commit that was made.

    Raises:
        IncompleteOutputError: The folder is not a complete hfmerge output (nothing is sent).
        HubAccessError: The token is missing or cannot write to `repo_id` (nothing is sent).
        PublishError: The upload failed; nothing was committed.
    """
    check_output_folder(folder)
    access = check_push_access(repo_id)
    return push_folder(Path(folder), access.repo_id, private=private, message=message)


def push_folder(folder: Path, repo_id: str, *, private: bool = False, message: str = DEFAULT_COMMIT_MESSAGE) -> PublishResult:
    """Create `repo_id` if missing and upload every file of `folder` as one commit.

    The token comes from the usual places (``HF_TOKEN``, ``hf auth login``) and never appears in
    messages. When the upload fails or is interrupted (Ctrl-C) after this call created the repo,
    the repo is deleted again, so nothing of the push stays on the Hub.

    Raises:
        PublishError: Authentication, permission or network failures, with what to do.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    created = False
    try:
        created = _create_repo(api, repo_id, private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except BaseException as exc:
        # Also on KeyboardInterrupt: a repo this push created must not stay behind empty.
        cleanup = _delete_created_repo(api, repo_id) if created else ""
        if not isinstance(exc, Exception):
            raise
        raise _publish_error(exc, repo_id, cleanup) from None
    return PublishResult(repo_id, info.commit_url, info.oid)


def _create_repo(api: Any, repo_id: str, private: bool) -> bool:
    """Create `repo_id`; True when this call created it, False when it existed already."""
    from huggingface_hub import errors as e

    try:
        api.create_repo(repo_id, private=private, exist_ok=False)
        return True
    except e.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 409:
            return False
        if status in (401, 402, 403):
            # A token scoped to one existing repo may not create repos in its namespace; the
            # upload decides then (as huggingface_hub's own exist_ok does).
            try:
                exists = api.repo_exists(repo_id)
            except Exception:  # noqa: BLE001 - the creation error is the one to report
                exists = False
            if exists:
                return False
        raise


def _delete_created_repo(api: Any, repo_id: str) -> str:
    """Delete the repo this push created; the clause a failure message ends with."""
    try:
        api.delete_repo(repo_id, missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - reported in the message instead
        log.warning("could not delete %s after the failed push: %s", repo_id, _first_line(exc))
        return f"; the repo {repo_id} that this push created is still there, empty ({_first_line(exc)}): delete it in its settings on the Hub"
    return f"; the repo {repo_id} that this push created was deleted again"


def _publish_error(exc: BaseException, repo_id: str, cleanup: str) -> PublishError:
    from huggingface_hub import errors as e

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, e.LocalTokenNotFoundError) or status == 401:
        return PublishError(f"push to {repo_id} failed: not authenticated (HTTP 401). Log in with `hf auth login` or set HF_TOKEN to a token with write access; nothing was committed{cleanup}")
    if status == 403 or isinstance(exc, (e.GatedRepoError, e.DisabledRepoError)):
        return PublishError(f"push to {repo_id} failed: permission denied (HTTP {status or 403}). Use a token with write access to this namespace; nothing was committed{cleanup}")
    return PublishError(f"push to {repo_id} failed: {type(exc).__name__}: {_first_line(exc)}; nothing was committed{cleanup}")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _token_help(namespace: str) -> str:
    return f"set HF_TOKEN (or run `hf auth login`) to a token with write access to {namespace} (https://huggingface.co/settings/tokens)"
