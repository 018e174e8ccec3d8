"""Publishing a merged model folder to the Hub in one commit."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import HfMergeError


class PublishError(HfMergeError):
    """The upload failed; the repo is left as it was (a commit is all or nothing)."""


@dataclass
class PublishResult:
    repo_id: str
    commit_url: str
    commit_oid: str


def push_folder(folder: Path, repo_id: str, *, private: bool = False, message: str = "Upload merged model (hfmerge)") -> PublishResult:
    """Create `repo_id` if missing and upload every file of `folder` as one commit.

    The token comes from the usual places (``HF_TOKEN``, ``hf auth login``) and never appears in
    messages.

    Raises:
        PublishError: Authentication, permission or network failures, with what to do.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as e

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as exc:  # noqa: BLE001 - mapped to one message below
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, e.LocalTokenNotFoundError) or status == 401:
            raise PublishError(f"push to {repo_id} failed: not authenticated (HTTP 401). Log in with `hf auth login` or set HF_TOKEN to a token with write access; nothing was committed") from None
        if status == 403 or isinstance(exc, (e.GatedRepoError, e.DisabledRepoError)):
            raise PublishError(f"push to {repo_id} failed: permission denied (HTTP {status or 403}). Use a token with write access to this namespace; nothing was committed") from None
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise PublishError(f"push to {repo_id} failed: {type(exc).__name__}: {first}; nothing was committed") from None
    return PublishResult(repo_id, info.commit_url, info.oid)
