"""Names and settings read in one place: environment variables, cache folders, dtype names,
the Hub's repo-id rule and the `datasets` builders that read local files.

Importing this module loads neither torch nor huggingface_hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# -- Environment variables and cache folders --------------------------------------------------

# hfmerge's own cache (Fisher files, tie groups); when unset, a folder inside HF_HOME.
HFMERGE_CACHE = "HFMERGE_CACHE"


def hf_home() -> Path:
    """The Hugging Face home folder as huggingface_hub resolves it (``HF_HOME``, default
    ``~/.cache/huggingface``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME)


def cache_root() -> Path:
    """hfmerge's cache folder, read at each call so a caller (or a test) can change it.

    Returns:
        ``$HFMERGE_CACHE``, else ``$HF_HOME/hfmerge`` (``~/.cache/huggingface/hfmerge``).
    """
    root = os.environ.get(HFMERGE_CACHE)
    return Path(root).expanduser() if root else hf_home() / "hfmerge"


# The Fisher cache's size cap (a size such as "50GB"; "0" or "none" for no cap). When a new
# Fisher makes the cache larger, the least recently used entries are deleted until it fits.
HFMERGE_FISHER_CACHE_MAX = "HFMERGE_FISHER_CACHE_MAX"
DEFAULT_FISHER_CACHE_MAX = "50GB"


# -- Dtypes -----------------------------------------------------------------------------------

# safetensors dtype name -> the torch dtype's attribute name (`getattr(torch, name)`), for
# every dtype hfmerge reads; the safetensors name is what headers, plans and the writer use.
TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}

# The recipe's ``dtype`` / ``out_dtype`` names (mergekit's, with their short forms) and the
# CLI's ``--dtype`` -> safetensors dtype name.
RECIPE_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}

# -- Names ------------------------------------------------------------------------------------

# A Hub repo id (model or dataset): ``name`` or ``org/name``, each part at most 96 characters of
# letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit.
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# `datasets`' packaged builders that read the files a task names (``data_files``, ``data_dir``)
# rather than a Hub dataset.
FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "xml")
