"""Model references: ``org/name``, ``org/name@revision`` or a local folder.

The syntax is fixed here; resolving a Hub reference to a commit happens in the plan step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .constants import REPO_ID
from .errors import ModelReferenceError, short_repr


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    Attributes:
        text: The reference as the user wrote it.
        repo_id: The Hub repo id, or ``None`` for a local folder.
        revision: Branch, tag or commit for a Hub reference (``None`` means the default branch).
        path: The local folder, or ``None`` for a Hub reference.
    """

    text: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.text


def _is_dir(path: Path) -> bool:
    """`Path.is_dir`, but False for a name the OS refuses (too long, say) instead of raising."""
    try:
        return path.is_dir()
    except OSError:
        return False


def parse_model_ref(text: str, *, base_dir: Path | None = None, field: str = "model") -> ModelRef:
    """Parse a model reference.

    A reference is local when it starts with ``/``, ``./``, ``../`` or ``~``, or when it names
    an existing folder (relative to ``base_dir``, the recipe's folder, then to the working
    directory). Otherwise it must be a Hub repo id, optionally followed by ``@revision``.

    Args:
        text: The reference.
        base_dir: Folder that relative local paths are resolved against first.
        field: The recipe key path, for error messages.

    Returns:
        The parsed reference.

    Raises:
        ModelReferenceError: If the text is neither a local path nor a valid repo id.
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelReferenceError(f"{field}: expected a model reference (org/name, org/name@revision or a folder), got {short_repr(text)}")
    text = text.strip()
    explicit_path = text.startswith(("/", "./", "../", "~")) or text in (".", "..")
    candidates = []
    expanded = Path(os.path.expanduser(text))
    if base_dir is not None and not expanded.is_absolute():
        candidates.append(base_dir / expanded)
    candidates.append(expanded)
    for candidate in candidates:
        if _is_dir(candidate):
            return ModelRef(text=text, path=candidate.resolve())
    if explicit_path:
        # Keep the path so that the reader reports "folder not found" with the full path.
        return ModelRef(text=text, path=candidates[0].absolute())
    repo_id, _, revision = text.partition("@")
    if not REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ModelReferenceError(
            f"{field}: {short_repr(text)} is neither an existing folder nor a Hub repo id "
            "(expected org/name, org/name@revision, or a path such as ./models/base)"
        )
    if "@" in text and not revision:
        raise ModelReferenceError(f"{field}: {short_repr(text)} has an empty revision after '@'")
    return ModelRef(text=text, repo_id=repo_id, revision=revision or None)
