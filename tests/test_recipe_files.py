"""Every example recipe in recipes/ is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfmerge.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_example_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.models and recipe.method.name == path.read_text().split("merge_method:")[1].split()[0]


def test_there_are_example_recipes():
    assert len(RECIPES) >= 5


TASK_FILES = sorted((Path(__file__).parent.parent / "recipes" / "tasks").rglob("*.yaml"))


@pytest.mark.parametrize("path", TASK_FILES, ids=[p.name for p in TASK_FILES])
def test_shipped_task_file_loads(path):
    from hfmerge.evaluation.tasks import load_tasks_file

    assert load_tasks_file(path)
