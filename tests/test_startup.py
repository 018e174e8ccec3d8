"""Start-up cost: validating a recipe and the plain dry run of a local recipe import neither
torch nor transformers (together seconds on a cold machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from hfmerge.checkpoints.aliases import tied_groups
from hfmerge.testing import build_base, build_finetuned

# Run in a fresh interpreter: prints, after each step, whether torch / transformers were imported.
_CHECK = """\
import sys

def loaded():
    return [m for m in ("torch", "transformers") if m in sys.modules]

print("start", loaded())
{steps}
"""


def _run(steps: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run([sys.executable, "-c", _CHECK.format(steps=steps)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if line.startswith(("start", "after "))]


def test_every_method_module_imports_without_torch():
    """A method module imports torch inside its functions (annotations under TYPE_CHECKING),
    so that `hfmerge.recipe`, which registers every method, stays quick to import."""
    steps = ("import importlib, pkgutil\nimport hfmerge.methods as pkg\n"
             "for info in pkgutil.iter_modules(pkg.__path__):\n"
             "    importlib.import_module(f'hfmerge.methods.{info.name}')\n"
             "    print(f'after {info.name}', loaded())\n")
    lines = _run(steps)
    assert len(lines) > 15, lines  # every method module was imported, not only the package
    first = next((line for line in lines if not line.endswith(" []")), None)
    assert first is None, (f"{first}: importing that method module (or one it imports) loaded torch; import torch inside "
                           "its functions and under `if TYPE_CHECKING:` at the top (hfmerge/methods/registry.py)")


def test_recipe_validation_and_local_dry_run_start_without_torch(tmp_path, monkeypatch):
    base = build_base(tmp_path / "base", "llama", layers=1)
    models = [build_finetuned(base, tmp_path / f"ft{i}", seed=i) for i in (1, 2)]
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32",
        "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models],
    }, sort_keys=False))
    stacked = tmp_path / "stack.yaml"  # a slices: recipe also places the tensors outside the layers
    stacked.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32",
                                       "slices": [{"sources": [{"model": str(models[0]), "layer_range": [0, 1]}]},
                                                  {"sources": [{"model": str(models[1]), "layer_range": [0, 1]}]}]}))
    # The tie groups and state-dict order of an architecture are found once (from
    # transformers' meta model) and cached; every later dry run of that architecture reads them.
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))
    groups, warning = tied_groups(json.loads((base / "config.json").read_text()))
    assert warning is None
    steps = (f"from hfmerge.recipe import load_recipe\nrecipe = load_recipe({str(recipe)!r})\n"
             "assert recipe.method.name == 'ties' and len(recipe.models) == 2\n"
             "print('after parse', loaded())\n"
             f"from hfmerge.cli import main\nassert main([{str(recipe)!r}, '--dry-run', '--json', {str(tmp_path / 'plan.json')!r}]) == 0\n"
             "print('after dry-run', loaded())\n"
             f"assert main([{str(stacked)!r}, '--dry-run', '--json', {str(tmp_path / 'stack.json')!r}]) == 0\n"
             "print('after slices dry-run', loaded())\n")
    lines = _run(steps, env={**os.environ, "HFMERGE_CACHE": str(tmp_path / "cache")})
    assert lines == ["start []", "after parse []", "after dry-run []", "after slices dry-run []"], lines
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["tensors_merged"] > 0 and len(plan["models"]) == 2, plan  # the dry run did plan the merge
    stack = json.loads((tmp_path / "stack.json").read_text())
    assert stack["tensors"] == 2 * (plan["tensors"] - 3) + 3, stack  # two one-layer slices around embeddings, norm and head
