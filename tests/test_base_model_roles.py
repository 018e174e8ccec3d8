"""What `base_model` is for each method: averaged with its weight when listed under `models` by
`linear` / `average` (as mergekit does), skipped there by methods on task vectors (τ = 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.recipe import load_recipe
from hfmerge.testing import load_base_state
from test_merge import write_recipe


@pytest.mark.parametrize("method", ["linear", "average"])
def test_a_base_listed_among_the_models_is_averaged_with_its_weight(t5, tmp_path, method):
    """mergekit's own linear test shape: the base once as base_model, once as a weighted model."""
    weights = [0.3, 0.5, 0.9]  # not summing to 1, so the normalisation shows
    inputs = [t5.base, t5.finetuned[0], t5.finetuned[1]]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method=method, base_model=t5.base,
                          models=[{"model": p, "parameters": {"weight": w}} for p, w in zip(inputs, weights)])

    listed = hfmerge.plan_summary(hfmerge.plan(recipe))["models"]
    assert [m["ref"] for m in listed] == [str(p) for p in inputs]
    assert [m["parameters"]["weight"] for m in listed] == weights

    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    states = [load_base_state(p) for p in inputs]
    got = load_base_state(out)
    assert set(got) == set(states[0])
    for name, merged in got.items():
        if not merged.is_floating_point():
            continue
        expected = sum(w * s[name].float() for w, s in zip(weights, states)) / sum(weights)
        torch.testing.assert_close(merged.float(), expected, rtol=1e-5, atol=1e-6)


def test_linear_averages_an_unlisted_base_with_the_global_weight(t5, tmp_path):
    """mergekit's linear averages an unlisted base_model too, with the global weight."""
    inputs = [t5.base, t5.finetuned[0], t5.finetuned[1]]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="linear", base_model=t5.base, parameters={"weight": 0.5},
                          models=[{"model": t5.finetuned[0], "parameters": {"weight": 1.0}}, {"model": t5.finetuned[1]}])
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    weights = [0.5, 1.0, 0.5]
    states = [load_base_state(p) for p in inputs]
    for name, merged in load_base_state(out).items():
        if merged.is_floating_point():
            expected = sum(w * s[name].float() for w, s in zip(weights, states)) / sum(weights)
            torch.testing.assert_close(merged.float(), expected, rtol=1e-5, atol=1e-6)


def test_linear_asks_for_the_weight_of_an_unlisted_base(folders_recipe):
    """Without a global weight mergekit fails on an unlisted base; hfmerge says what to set.
    `average` takes an unlisted base as the reference only."""
    with pytest.raises(RecipeError, match=r"r.yaml: base_model: merge_method 'linear' averages base_model .* parameters.weight is not set"):
        load_recipe(folders_recipe(merge_method="linear", models=["./a", "./b"]))
    recipe = load_recipe(folders_recipe(merge_method="average", models=["./a", "./b"]))
    assert [m.ref.text for m in recipe.models] == ["./a", "./b"] and recipe.base is not None


def test_methods_on_task_vectors_skip_a_listed_base(folders_recipe):
    recipe = load_recipe(folders_recipe(merge_method="task_arithmetic", models=["./base", "./a"]))
    assert [m.ref.text for m in recipe.models] == ["./a"]
    with pytest.raises(RecipeError, match="lists only the base model"):
        load_recipe(folders_recipe(merge_method="ties", models=["./base"]))


@pytest.fixture
def folders_recipe(tmp_path: Path):
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()

    def write(merge_method: str, models: list[str]) -> Path:
        return write_recipe(tmp_path / "r.yaml", merge_method=merge_method, base_model="./base", models=[{"model": m} for m in models])

    return write


def test_a_tasks_model_index_counts_the_listed_models_when_linear_adds_the_base(folders_recipe):
    import yaml

    path = folders_recipe(merge_method="linear", models=["./a", "./b"])
    data = yaml.safe_load(path.read_text())
    data["parameters"] = {"weight": 0.5}
    task = {"dataset_path": "nyu-mll/glue", "dataset_name": "rte", "validation_split": "validation",
            "doc_to_text": "{{sentence1}}", "doc_to_choice": ["yes", "no"], "doc_to_target": "label"}
    data["tasks"] = [{**task, "task": "second", "model": 1}]
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert [m.key for m in recipe.models] == ["base_model", "models[0]", "models[1]"]
    owner = [m for m in recipe.models if m.task is not None]
    assert [m.key for m in owner] == ["models[1]"] and recipe.tasks[owner[0].task].name == "second"
