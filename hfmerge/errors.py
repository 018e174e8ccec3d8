"""One exception family for everything a user can get wrong.

Every message names what is wrong (the recipe key path, the model, the tensor or the
file) and says what to do. The CLI prints these without a traceback and exits non-zero.
"""

from __future__ import annotations


class HfMergeError(Exception):
    """Base class of every error hfmerge reports to a user."""


class RecipeError(HfMergeError):
    """The recipe is malformed: unknown or missing key, wrong type, out-of-range value."""


class ModelReferenceError(RecipeError):
    """A model reference (``org/name``, ``org/name@revision`` or a local path) is malformed."""


class CheckpointError(HfMergeError):
    """A checkpoint cannot be read: missing folder, no safetensors, corrupted header, ..."""


class IncompatibleCheckpointsError(CheckpointError):
    """Checkpoints disagree on tensor names, shapes or dtypes."""


class NonFiniteTensorError(CheckpointError):
    """An input tensor holds NaN or Inf values."""


class FisherFileError(CheckpointError):
    """A Fisher file is missing, unreadable or does not match the checkpoint."""


class OutputExistsError(HfMergeError):
    """The output folder exists and ``--overwrite`` was not given."""
