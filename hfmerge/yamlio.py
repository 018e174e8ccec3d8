"""Reading recipe and task YAML files safely.

Both kinds of file are read by `load_yaml_file`: bounded in size, refusing alias bombs and
recursive structures, with safe loading that keeps lm-evaluation-harness's ``!function`` tag
as a marker (`PythonFunctionTag`) so the task parser can say it is unsupported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import RecipeError, short_repr

__all__ = ["MAX_YAML_BYTES", "MAX_YAML_NODES", "PythonFunctionTag", "load_yaml_file", "yaml_loader"]


class PythonFunctionTag(str):
    """A harness ``!function module.name`` YAML value, kept only to be reported as unsupported."""


def yaml_loader():
    """A `yaml.SafeLoader` subclass that reads lm-evaluation-harness's ``!function`` tag as a
    `PythonFunctionTag` (so `parse_tasks` can report it) instead of failing to parse. Files are
    read through `load_yaml_file`, which uses it after bounding the file's size and aliases."""
    global _LOADER
    if _LOADER is None:  # built once: a class per file read would be wasted work
        import yaml

        class TaskYamlLoader(yaml.SafeLoader):
            """yaml.SafeLoader that reads the harness's ``!function`` tag as a marker instead of
            failing, so the message can say what is unsupported and why."""

        TaskYamlLoader.add_constructor("!function", lambda loader, node: PythonFunctionTag(loader.construct_scalar(node)))
        _LOADER = TaskYamlLoader
    return _LOADER


_LOADER: Any = None


# A recipe or task file is kilobytes and a few hundred values; these bounds leave ample room
# while refusing alias bombs ("billion laughs") and runaway files before they cost memory.
MAX_YAML_BYTES = 2**20
MAX_YAML_NODES = 100_000


class _YamlTooLarge(Exception):
    """Internal: the composed YAML would expand past `MAX_YAML_NODES`, or refers to itself."""


def _expanded_node_count(root: Any, limit: int) -> int:
    """How many values the YAML node graph holds once every alias is expanded, counted on the
    composed nodes (an alias is the very node object it names) without building anything.

    Each node's expanded size is computed once and shared by every alias of it, so the work is
    proportional to the composed nodes, not to the expansion. Merge keys (``<<``) are counted
    as the nodes they copy, which bounds their expansion too.

    Raises:
        _YamlTooLarge: The count passes `limit`, or an alias refers to a node that contains it.
    """
    import yaml

    def children(node: Any) -> list:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose children are being counted: the current path
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > limit:
                raise _YamlTooLarge(f"holds more than {limit} values once its aliases are expanded; a recipe or task file holds a few hundred")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise _YamlTooLarge("has an alias that refers to a value containing it (a recursive structure)")
        kids = children(node)
        if not kids:
            sizes[key] = 1
            continue
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in kids if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml_file(path: str | Path, *, error: type[RecipeError] = RecipeError) -> Any:
    """Read a recipe or task YAML file safely, refusing hostile or runaway input.

    The file is read as UTF-8 text of at most `MAX_YAML_BYTES`; its nodes are composed (cheap:
    an alias is a reference to the node it names) and counted as if every alias were expanded;
    only a document of at most `MAX_YAML_NODES` values is then built, with `yaml_loader`
    (safe loading, the harness's ``!function`` tag read as a marker).

    Args:
        path: The YAML file.
        error: The `RecipeError` subclass to raise.

    Returns:
        The parsed document (``None`` for an empty file).

    Raises:
        RecipeError: (or `error`) The file is missing, too large, not UTF-8, not valid YAML,
            nested too deeply, or expands past the bound; the message names the file.
    """
    import yaml

    path = Path(path)
    try:
        if not path.is_file():
            raise error(f"{path}: {'recipe file' if error is RecipeError else 'file'} not found")
        with path.open("rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # never more, whatever the file claims to be
    except OSError as exc:  # a name the OS refuses (too long), a permission, an I/O error
        raise error(f"{short_repr(str(path))}: cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise error(f"{path}: larger than {MAX_YAML_BYTES // 2**20} MiB; a recipe or task file is a few kilobytes, is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    loader = yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_node_count(node, MAX_YAML_NODES)
        return loader.construct_document(node)
    except _YamlTooLarge as exc:
        raise error(f"{path}: refused: the YAML {exc}") from None
    except RecursionError:
        raise error(f"{path}: refused: the YAML is nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        # A scalar YAML reads as a number or date that Python cannot build (a 5000-digit
        # integer, a 13th month); the exception's text is short and names the problem.
        raise error(f"{path}: a value cannot be read: {str(exc)[:200]}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
