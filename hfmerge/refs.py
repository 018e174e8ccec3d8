"""Model references: ``org/name``, ``org/name@revision`` or a local folder, optionally followed
by ``+ADAPTER`` (mergekit's syntax for a PEFT LoRA adapter applied to that model).

The syntax is fixed here; resolving a Hub reference to a commit happens in the plan step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
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
        adapter: For ``BASE+ADAPTER``, the adapter's reference; `repo_id`, `revision` and
            `path` are then BASE's, and `text` the whole reference.
    """

    text: str
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    adapter: ModelRef | None = None

    @property
    def is_local(self) -> bool:
        """Whether the model (BASE, for ``BASE+ADAPTER``) is a local folder."""
        return self.path is not None

    @property
    def model(self) -> ModelRef:
        """The model alone: BASE of ``BASE+ADAPTER``, else this reference itself."""
        if self.adapter is None:
            return self
        return replace(self, text=self.text.split("+", 1)[0].strip(), adapter=None)

    @property
    def parts(self) -> tuple[ModelRef, ...]:
        """The plain references this one reads: the model, then the adapter if there is one."""
        return (self.model,) if self.adapter is None else (self.model, self.adapter)

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

    ``BASE+ADAPTER`` (one ``+``, each side a reference as above, e.g.
    ``org/base+org/lora@v2`` or ``./base+./adapter``) is a LoRA adapter applied to BASE, as in
    mergekit. A text that names an existing folder is that folder, ``+`` or not.

    Args:
        text: The reference.
        base_dir: Folder that relative local paths are resolved against first.
        field: The recipe key path, for error messages.

    Returns:
        The parsed reference.

    Raises:
        ModelReferenceError: If the text is neither a local path nor a valid repo id, or a
            ``BASE+ADAPTER`` reference with an empty side or more than one ``+``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ModelReferenceError(f"{field}: expected a model reference (org/name, org/name@revision or a folder), got {short_repr(text)}")
    text = text.strip()
    if "+" in text and not _names_folder(text, base_dir):
        return _parse_with_adapter(text, base_dir=base_dir, field=field)
    return _parse_plain(text, base_dir=base_dir, field=field)


def is_hub_repo_id(text: str, *, field: str = "repo_id") -> bool:
    """Whether `text` is a Hub repo id alone: ``org/name``, or a bare ``name`` (a canonical
    repo, or one of the token's user); no revision, no adapter, no local folder.

    Raises:
        ModelReferenceError: `text` looks like a reference but is malformed (e.g. an empty
            revision), naming `field`.
    """
    if "/" not in text and "@" not in text and not text.startswith((".", "~")):
        return bool(REPO_ID.match(text)) and "--" not in text and ".." not in text
    if text.startswith((".", "/", "~")):
        return False
    ref = parse_model_ref(text, field=field)
    return ref.repo_id is not None and ref.revision is None and ref.adapter is None


def _candidates(text: str, base_dir: Path | None) -> list[Path]:
    """Where a local reference may be: relative to `base_dir` first, then as written."""
    expanded = Path(os.path.expanduser(text))
    return ([base_dir / expanded] if base_dir is not None and not expanded.is_absolute() else []) + [expanded]


def _names_folder(text: str, base_dir: Path | None) -> bool:
    return any(_is_dir(c) for c in _candidates(text, base_dir))


def _parse_with_adapter(text: str, *, base_dir: Path | None, field: str) -> ModelRef:
    sides = text.split("+")
    shown = short_repr(text)
    if len(sides) > 2:
        raise ModelReferenceError(f"{field}: {shown} has {len(sides) - 1} '+'; expected BASE+ADAPTER, one model and one LoRA adapter "
                                  "(a folder whose name contains '+' must exist to be read as a folder)")
    base_text, adapter_text = (side.strip() for side in sides)
    if not base_text or not adapter_text:
        missing = "base model before" if not base_text else "adapter after"
        raise ModelReferenceError(f"{field}: {shown} has no {missing} the '+'; expected BASE+ADAPTER, e.g. org/base+org/lora-adapter")
    base = _parse_plain(base_text, base_dir=base_dir, field=f"{field} (the model before '+')")
    adapter = _parse_plain(adapter_text, base_dir=base_dir, field=f"{field} (the adapter after '+')")
    return replace(base, text=f"{base_text}+{adapter_text}", adapter=adapter)


def _parse_plain(text: str, *, base_dir: Path | None, field: str) -> ModelRef:
    explicit_path = text.startswith(("/", "./", "../", "~")) or text in (".", "..")
    candidates = _candidates(text, base_dir)
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
