"""One exception family for everything a user can get wrong.

Every message names what is wrong (the recipe key path, the model, the tensor or the
file) and says what to do. The CLI prints these without a traceback and exits non-zero.
"""

from __future__ import annotations


class HfMergeError(Exception):
    """Base class of every error hfmerge reports to a user.

    Library messages never name command-line flags. An error about run options (`RunOptions`
    fields or function arguments) names them in `options`; its message then starts with them
    (``n_trials: got 0; ...``) and a command line shows its own flags in their place.

    Attributes:
        options: The names of the options the message is about (empty when none).
        detail: The message without the option names.
    """

    def __init__(self, message: str = "", *, options: tuple[str, ...] = ()) -> None:
        super().__init__(f"{' / '.join(options)}: {message}" if options else message)
        self.options = tuple(options)
        self.detail = message


class RecipeError(HfMergeError):
    """The recipe is malformed: unknown or missing key, wrong type, out-of-range value."""


class ModelReferenceError(RecipeError):
    """A model reference (``org/name``, ``org/name@revision`` or a local path) is malformed."""


class OptionError(HfMergeError):
    """A run option (a `RunOptions` field or an argument of `hfmerge.evaluate`) has a bad
    value or does not fit the recipe; `options` names it."""


class CheckpointError(HfMergeError):
    """A checkpoint cannot be read: missing folder, no safetensors, corrupted header, ..."""


class IncompatibleCheckpointsError(CheckpointError):
    """Checkpoints disagree on tensor names, shapes or dtypes."""


class NonFiniteTensorError(CheckpointError):
    """An input tensor holds NaN or Inf values."""


class FisherFileError(CheckpointError):
    """A Fisher file is missing, unreadable or does not match the checkpoint."""


class OutputExistsError(HfMergeError):
    """The output folder exists and overwriting was not asked for."""


class HubAccessError(HfMergeError):
    """No Hub token, an invalid one, or one that cannot write to the repo a push targets."""


class IncompleteOutputError(HfMergeError):
    """A folder given to publish is not a complete hfmerge output (missing or partial files)."""


def short_repr(value: object, limit: int = 80) -> str:
    """Render a user-given value for an error message: at most `limit` characters.

    A hostile recipe can hold a value of millions of nodes (a YAML alias bomb) or a
    megabyte-long string; quoting it whole would flood the terminal and exhaust memory.
    `reprlib` walks only a few levels and items of a container, so the cost is bounded
    whatever the value's size; the result is then cut with an ellipsis.

    Args:
        value: Any value taken from a recipe or task file.
        limit: The longest rendering returned.

    Returns:
        A ``repr``-like rendering, shortened with ``...`` when needed.
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxlevel = 3
    shortener.maxlist = shortener.maxtuple = shortener.maxset = shortener.maxdict = 4
    shortener.maxstring = shortener.maxother = shortener.maxlong = limit
    try:
        text = shortener.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OutputIsInputError(HfMergeError):
    """An output path (folder, ``--json`` file, copy target) is, contains or lies inside
    something the recipe reads; writing it could replace or delete an input."""


class OutputWriteError(HfMergeError):
    """The output cannot be written: no space left, quota exceeded, file too large, read-only
    file system or permission denied. Nothing is left behind.

    Attributes:
        path: The path that could not be written.
        errno: The operating system's error number.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = path
        self.errno = errno


class DownloadIntegrityError(CheckpointError):
    """A file downloaded from the Hub does not match the hash (or size) the Hub announces for it,
    again after one fresh download. Nothing of it is kept, in the cache or elsewhere."""


class TaskError(RecipeError):
    """A task of the recipe is malformed, or its data does not fit it (missing file, unknown
    template field, label out of range, too few options, empty split).

    Attributes:
        key_path: The key path the message is about (``tasks[0].doc_to_text``), or None.
    """

    def __init__(self, message: str, key_path: str | None = None) -> None:
        super().__init__(message)
        self.key_path = key_path


class MetricError(RecipeError):
    """A task's metric cannot be loaded or computed."""


class EvaluationError(HfMergeError):
    """The model cannot be loaded or evaluated (missing folder, unknown architecture, no GPU)."""


class FisherError(HfMergeError):
    """A Fisher cannot be computed (bad mode, no examples, a model kind that is not supported)."""


class NodeLayoutError(HfMergeError):
    """The architecture has no attention heads / FFN neurons that Fisher Mask Nodes knows."""


class SearchError(HfMergeError):
    """The coefficient search cannot start or continue: a previous study is in the way, the
    settings do not match the stored study, the storage cannot be opened, or no trial completed."""


class PublishError(HfMergeError):
    """The upload failed; the repo is left as it was (a commit is all or nothing)."""
