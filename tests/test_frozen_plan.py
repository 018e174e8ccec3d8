"""The plan is built once and never changed: `Recipe` and `MergePlan` are frozen, no module
assigns to a plan's or recipe's attributes, and what a run learns later makes a new plan."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

import hfmerge
from hfmerge.planning import MergePlan, TensorPlan, build_plan, with_coefficients
from hfmerge.recipe import ModelSpec, Recipe, load_recipe

PACKAGE_ROOT = Path(hfmerge.__file__).parent
# Names the package gives plans and recipes (and their checks): `plan`, `built`, `recipe`, `loaded`, ...
PLAN_OR_RECIPE = {"plan", "built", "derived", "recipe", "loaded", "fixed"}
MUTATORS = {"append", "extend", "insert", "remove", "pop", "clear", "update", "setdefault", "sort", "reverse", "__setitem__"}


def _is_plan_or_recipe(node: ast.AST) -> bool:
    """`plan`, `recipe`, `self.plan`, `objective.recipe`, ... (a name or an attribute so named)."""
    if isinstance(node, ast.Name):
        return node.id in PLAN_OR_RECIPE
    return isinstance(node, ast.Attribute) and node.attr in PLAN_OR_RECIPE


def _reaches_into(target: ast.AST) -> bool:
    """Whether `target` is an attribute of a plan or recipe, or an item of one of its fields."""
    while isinstance(target, ast.Subscript):
        target = target.value
    return isinstance(target, ast.Attribute) and _is_plan_or_recipe(target.value)


def _mutations(tree: ast.Module) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = [node.target] if not isinstance(node, ast.Delete) else list(node.targets)
        flat = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
        if any(_reaches_into(t) for t in flat):
            lines.append(node.lineno)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "setattr" and node.args and _is_plan_or_recipe(node.args[0]):
                lines.append(node.lineno)
            if isinstance(func, ast.Attribute) and func.attr == "__setattr__" and node.args and _is_plan_or_recipe(node.args[0]):
                lines.append(node.lineno)
            if isinstance(func, ast.Attribute) and func.attr in MUTATORS and _reaches_into(func.value):
                lines.append(node.lineno)
    return lines


def test_no_module_changes_a_plan_or_recipe_after_building_it():
    found = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        for line in _mutations(ast.parse(path.read_text(), filename=str(path))):
            found.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}")
    assert not found, "a plan or recipe is changed after it was built: " + ", ".join(found)


def test_the_check_sees_the_ways_a_plan_could_be_changed():
    source = """
plan.fishers = []
self.plan.recipe = r
recipe.models[0] = m
plan.tensors, other = [], 1
plan.warnings.append("x")
setattr(recipe, "path", p)
object.__setattr__(plan, "fishers", f)
own.fishers = []
"""
    assert _mutations(ast.parse(source)) == [2, 3, 4, 5, 6, 7, 8]


def test_recipe_and_plan_are_frozen(t5, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(t5.base),
                                    "models": [{"model": str(p)} for p in t5.finetuned[:2]], "parameters": {"lambda": 0.5}}))
    recipe = load_recipe(path)
    assert recipe.path == path and recipe.source == str(path)
    plan = build_plan(recipe)
    try:
        with pytest.raises(dataclasses.FrozenInstanceError):
            recipe.path = None  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            recipe.models[0].parameters = {}  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.fishers = []  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.recipe = recipe  # type: ignore[misc]
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.tensors[0].fisher_sources = ()  # type: ignore[misc]
        for cls in (Recipe, ModelSpec, MergePlan, TensorPlan):
            assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]

        # Fixed coefficients make a new plan and recipe; the first stays as it was.
        fixed = with_coefficients(plan, [0.25, 0.75])
        assert fixed is not plan and fixed.models is plan.models and fixed.base is plan.base
        assert [m.parameters["weight"] for m in fixed.recipe.models] == [0.25, 0.75]
        assert [m["parameters"] for m in fixed.recipe.raw["models"]] == [{"weight": 0.25}, {"weight": 0.75}]
        assert all("weight" not in m.parameters for m in plan.recipe.models) and plan.recipe is recipe
    finally:
        plan.release()
