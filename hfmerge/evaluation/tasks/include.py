"""lm-evaluation-harness's ``include:`` key: a task takes its defaults from other task files.

``include: path/to/base.yaml`` (or a list of paths) in a task mapping reads each file, a task
mapping itself, and the including mapping's own keys override the included ones, key by key
(a whole ``dataset_kwargs`` or ``metric_list`` is replaced, not merged), as the harness's
``load_yaml_config`` does. With a list, files earlier in it override later ones, again as in
the harness. Included files may include others. A relative path is resolved against the
folder of the file that says it (a recipe's ``tasks:`` entry: the recipe's folder); unlike the
harness, never against the working folder, so a recipe means the same from anywhere.

Every included file is read with `load_yaml_file` (the same size and alias bounds as a
recipe), each at most once per recipe, and at most `MAX_INCLUDES` includes are followed in all,
so a file including a long list of files that include long lists cannot multiply the work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import short_repr
from .schema import TaskError, fail
from ...yamlio import load_yaml_file

# A task includes one or two files (a shared definition, maybe a family's template); a
# tasks file of a hundred such tasks stays far below this.
MAX_INCLUDES = 1000


@dataclass
class IncludeBudget:
    """The included files read while parsing one recipe or tasks file.

    Attributes:
        followed: How many includes have been followed (a file included twice counts twice).
        documents: Each included file's parsed YAML, by resolved path: read once.
    """

    followed: int = 0
    documents: dict[Path, Any] = field(default_factory=dict)


def resolve_includes(entry: Mapping[str, Any], *, folder: Path, source: str, key: str,
                     budget: IncludeBudget | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """A task mapping with its ``include:`` resolved, and where each included key came from.

    Args:
        entry: The task mapping as written; without an ``include`` key it is returned as is.
        folder: The folder of the file holding `entry`; relative includes start there.
        source: That file's name for messages (usually its path).
        key: The key path of `entry` in it, e.g. ``tasks[0]`` (empty for a file's root).
        budget: The includes already followed for the same recipe or tasks file (a fresh one
            if None).

    Returns:
        The merged mapping (no ``include`` key), and for each key an included file supplied
        (not overridden by `entry`), that file's path.

    Raises:
        TaskError: An include is not a path or a list of paths, names a missing file or one
            that does not hold a mapping, is refused by `load_yaml_file`'s bounds, closes a
            cycle, or passes `MAX_INCLUDES`; the message names the file and the key path of
            the include.
    """
    return _expand(entry, folder, source, key, (), budget if budget is not None else IncludeBudget())


def _expand(entry: Mapping[str, Any], folder: Path, source: str, key: str, chain: tuple[Path, ...],
            budget: IncludeBudget) -> tuple[dict[str, Any], dict[str, Path]]:
    if "include" not in entry:
        return dict(entry), {}
    where = f"{key}.include" if key else "include"
    value = entry["include"]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise fail(source, where, f"got {short_repr(value)}; expected the path of a task YAML file (relative to {folder}), or a list of them")
    merged: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    # The harness applies the last file listed first, so earlier files override later ones.
    for j in reversed(range(len(names))):
        here = where if isinstance(value, str) else f"{where}[{j}]"
        path = Path(names[j]).expanduser()
        if not path.is_absolute():
            path = folder / path
        real = path.resolve()
        if real in chain:
            cycle = " -> ".join(str(p) for p in (*chain[chain.index(real):], real))
            raise fail(source, here, f"{names[j]!r} closes an include cycle: {cycle}; a file cannot include itself, directly or not")
        if not path.is_file():
            raise fail(source, here, f"included file not found: {path} (relative paths are resolved against {folder}, "
                       "the folder of the file that includes it)")
        budget.followed += 1
        if budget.followed > MAX_INCLUDES:
            raise fail(source, here, f"refused: more than {MAX_INCLUDES} includes in all; a task includes a file or two")
        if real not in budget.documents:
            budget.documents[real] = load_yaml_file(path, error=TaskError)
        document = budget.documents[real]
        if not isinstance(document, dict):
            raise fail(source, here, f"{path} holds {type(document).__name__ if document is not None else 'nothing'}; "
                       "an included file holds one task mapping (an lm-evaluation-harness task YAML)")
        keys, key_origins = _expand(document, path.parent, str(path), "", (*chain, real), budget)
        for k, v in keys.items():
            merged[k] = v
            origins[k] = key_origins.get(k, path)
    for k, v in entry.items():
        if k != "include":
            merged[k] = v
            origins.pop(k, None)
    return merged, origins
