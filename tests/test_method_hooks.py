"""The method interface's hooks: a method defined entirely outside hfmerge (here, in this test
module) runs end to end through the CLI, and no code outside ``hfmerge/methods/`` branches on a
method's name."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS, Param, merge_method
from hfmerge.testing import load_base_state

NAME = "unit_max_scaled"
ADVICE = f"{NAME}: every task vector is divided by its whole-model max |τ|"


@pytest.fixture
def throwaway_method() -> Iterator[None]:
    """Registers a method with a validate and a prepare hook for one test, then removes it."""
    calls = {"prepare": 0}

    def validate(recipe: Any, source: str) -> list[str]:
        if len(recipe.models) != 2:
            raise RecipeError(f"{source}: models: merge_method {recipe.method.name!r} takes exactly two models, got {len(recipe.models)}")
        return [ADVICE]

    def prepare(context: Any) -> dict[str, Any]:
        calls["prepare"] += 1
        peaks = [0.0] * len(context.recipe.models)
        for t in context.progress(context.positions, "peaks"):
            base, tensors = context.inputs(t)
            for i, x in enumerate(tensors):
                peaks[i] = max(peaks[i], float((x - base).abs().max()))
        return {"peaks": peaks}

    @merge_method(NAME, per_model=(Param("weight", 1.0),), validate=validate, prepare=prepare, summary="test-only method")
    def unit_max_scaled(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], peaks: Sequence[float],
                        **_: object) -> torch.Tensor:
        return base + sum(w * (x - base) / p for w, x, p in zip(weight, tensors, peaks))

    try:
        yield calls
    finally:
        METHODS.pop(NAME)


def _recipe(path: Path, base: Path, models: list[Path]) -> Path:
    data = {"merge_method": NAME, "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.5, 0.25, 1.0))]}
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_method_registered_outside_hfmerge_runs_end_to_end(throwaway_method, t5, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", t5.base, t5.finetuned[:2])
    assert ADVICE in hfmerge.plan_summary(hfmerge.plan(recipe, output=tmp_path / "dry"))["warnings"]

    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    assert throwaway_method["prepare"] == 1  # the pre-pass runs once per merge, not per tensor
    base, a, b = (load_base_state(p) for p in (t5.base, *t5.finetuned[:2]))
    peak_a = max(float((a[n] - t).abs().max()) for n, t in base.items())
    peak_b = max(float((b[n] - t).abs().max()) for n, t in base.items())
    got = load_base_state(out)
    for name, t in base.items():
        expected = t + 0.5 * (a[name] - t) / peak_a + 0.25 * (b[name] - t) / peak_b
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)


def test_a_methods_validate_hook_refuses_the_recipe_before_any_weight_is_read(throwaway_method, t5, tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", t5.base, t5.finetuned[:3])
    with pytest.raises(RecipeError) as refused:
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert "models: merge_method 'unit_max_scaled' takes exactly two models, got 3" in str(refused.value)
    assert throwaway_method["prepare"] == 0 and not (tmp_path / "out").exists()


def _names_a_method(node: ast.expr) -> bool:
    # `<...>method.name`, `<...>.merge_method` or `x["merge_method"]` / `x.get("merge_method")`.
    if isinstance(node, ast.Attribute):
        if node.attr == "name" and isinstance(node.value, (ast.Name, ast.Attribute)):
            inner = node.value.id if isinstance(node.value, ast.Name) else node.value.attr
            return inner.endswith("method")
        return node.attr == "merge_method"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "merge_method"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        return bool(node.args) and isinstance(node.args[0], ast.Constant) and node.args[0].value == "merge_method"
    return False


def test_no_code_outside_the_methods_package_branches_on_a_method_name():
    package = Path(hfmerge.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if package / "methods" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            if any(_names_a_method(o) for o in (node.left, *node.comparators)):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "method-specific branches belong in the method's hooks (hfmerge/methods/):\n" + "\n".join(found)


def test_fisher_norms_from_the_prepare_hook_reach_every_tensor(t5, tmp_path):
    # Constant Fishers 1 and 3: dividing each by its whole-model norm (√N and 3√N, whatever N
    # is) cancels the scale, so normalize_fishers turns (θ_0 + 3 θ_1) / 4 into the plain mean.
    from safetensors.torch import save_file

    states = [load_base_state(p) for p in t5.finetuned[:2]]
    paths = []
    for i, s in enumerate(states):
        save_file({n: torch.full_like(t, 1.0 + 2.0 * i) for n, t in s.items()}, tmp_path / f"f{i}.safetensors")
        paths.append(tmp_path / f"f{i}.safetensors")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher", "base_model": str(t5.base), "parameters": {"normalize_fishers": True},
                                      "models": [{"model": str(p), "fisher": str(f)} for p, f in zip(t5.finetuned[:2], paths)]}))
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    got = load_base_state(out)
    for name, t in got.items():
        torch.testing.assert_close(t, (states[0][name] + states[1][name]) / 2, rtol=1e-6, atol=1e-6)
