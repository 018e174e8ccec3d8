"""The package's import structure, read from the source with `ast` (nothing is imported).

Two rules keep the modules of ``hfmerge`` separable:

- **No import cycle.** The graph has an edge A → B for every ``import`` / ``from ... import``
  of B in A, at module level *and* inside functions: a function-level import only defers a
  cycle, it does not remove the tangle. ``if TYPE_CHECKING:`` blocks do not count (they never
  run). An import of a package names its ``__init__`` module; ``from pkg import sub`` names the
  submodule ``pkg.sub`` when it is one; importing ``pkg.sub`` also runs ``pkg/__init__``, so it
  adds an edge to that package as well.
- **No private name across modules.** A module uses another hfmerge module's names only when
  they are public: no ``from X import _name`` and no ``X._name`` where X is another hfmerge
  module, at any level. A package ``__init__`` re-exporting a submodule's private name counts
  as cross-module too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import hfmerge

PACKAGE_ROOT = Path(hfmerge.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        found[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name][0].name == "__init__.py"


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported hfmerge module, names taken from it, line) for every import in `module`."""
    tree = MODULES[module][1]
    skipped = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "hfmerge" and alias.name in MODULES:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            if source.split(".")[0] != "hfmerge" or source not in MODULES:
                continue
            names = []
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    found.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            if names or not node.names:
                found.append((source, names, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES:
        for target, _, _ in _imports(module):
            # Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first: edges to those
            # packages too (but not to the importer's own packages, which are already running).
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join(parts[:depth])
                if name in MODULES and name != module and not module.startswith(name + "."):
                    graph[module].add(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_package_is_parsed() -> None:
    assert "hfmerge.checkpoints.reader" in MODULES and "hfmerge.evaluation.scoring" in MODULES


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles among hfmerge modules:\n" + "\n".join(" ↔ ".join(c) for c in cycles)


def test_no_private_name_from_another_module() -> None:
    problems = []
    for module, (path, tree) in MODULES.items():
        where = path.relative_to(PACKAGE_ROOT.parent)
        aliases: dict[str, str] = {}  # local name -> hfmerge module it stands for
        for target, names, line in _imports(module):
            if target == module:
                continue
            problems += [f"{where}:{line}: from {target} import {n}" for n in names if _private(n)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in MODULES and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(module, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain = []
                value: ast.expr = node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if not isinstance(value, ast.Name):
                    continue
                head = aliases.get(value.id) or (value.id if value.id == "hfmerge" else None)
                if head is None:
                    continue
                target = ".".join([head, *reversed(chain)])
                if target in MODULES and target != module:
                    problems.append(f"{where}:{node.lineno}: {target}.{node.attr}")
    assert not problems, "private names used across hfmerge modules:\n" + "\n".join(problems)
