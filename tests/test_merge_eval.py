"""A recipe with tasks: the merge evaluates its output, and the scores go into the model card."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

import hfmerge
from hfmerge.cli import main
from hfmerge.errors import TaskError
from hfmerge.evaluation.evaluate_model import evaluate_model
from hfmerge.recipe import load_recipe
from hfmerge.testing import build_finetuned
from test_evaluation import task, tiny_models  # noqa: F401  (fixture)


def _two_task_recipe(base, tmp_path):
    fts = [build_finetuned(base, tmp_path / f"ft{i}", seed=i, scale=0.05) for i in range(2)]
    entry = task(tmp_path)
    second = dict(entry, task="sentiment2", doc_to_text="Text: {{text}} Label:")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(p)} for p in fts], "parameters": {"lambda": 0.5}, "tasks": [entry, second],
    }))
    return recipe


def test_merge_with_tasks_records_evaluation_in_card_and_json(tiny_models, tmp_path):  # noqa: F811
    recipe = _two_task_recipe(tiny_models["t5"], tmp_path)
    out = tmp_path / "out"
    result = hfmerge.merge(recipe, output=out, progress=False)
    assert result.output == out and [r.task for r in result.evaluation.results] == ["sentiment", "sentiment2"]
    recorded = json.loads((out / "eval_results.json").read_text())
    assert recorded["average"] == result.evaluation.average
    fresh = evaluate_model(out, load_recipe(recipe).tasks, "validation", progress=False)
    assert recorded["average"] == fresh.average and 0.0 <= fresh.average <= 1.0
    card = ModelCard.load(out / "README.md")
    results = card.data.eval_results
    assert sorted(r.task_name for r in results) == ["sentiment", "sentiment2"]
    assert sorted(r.metric_value for r in results) == sorted(fresh.scores.values())
    assert "## Evaluation" in card.text
    # hfmerge.evaluate gives the same figures
    assert hfmerge.evaluate(out, recipe, progress=False).average == recorded["average"]


def test_the_commands_print_the_evaluation_and_eval_gives_the_same_figures(tiny_models, tmp_path, capsys):  # noqa: F811
    recipe = _two_task_recipe(tiny_models["t5"], tmp_path)
    out = tmp_path / "out"
    assert main([str(recipe), "-o", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "sentiment" in printed and "sentiment2" in printed and "average" in printed
    recorded = json.loads((out / "eval_results.json").read_text())
    assert main(["eval", str(recipe), "--model", str(out), "--json", str(tmp_path / "e.json"), "-q"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["average"] == recorded["average"]


def test_no_eval_skips_evaluation(tiny_models, tmp_path):  # noqa: F811
    base = tiny_models["t5"]
    ft = build_finetuned(base, tmp_path / "ft", seed=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "base_model": str(base), "models": [{"model": str(ft)}], "tasks": [task(tmp_path)]}))
    result = hfmerge.merge(recipe, output=tmp_path / "out", evaluate=False, progress=False)
    assert result.output == tmp_path / "out" and result.evaluation is None
    assert not (tmp_path / "out" / "eval_results.json").exists()


def test_bad_task_in_a_recipe_fails_before_merging(tiny_models, tmp_path):  # noqa: F811
    base = tiny_models["t5"]
    ft = build_finetuned(base, tmp_path / "ft", seed=4)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "base_model": str(base), "models": [{"model": str(ft)}],
                                      "tasks": [task(tmp_path, doc_to_text="{{missing_field}}")]}))
    with pytest.raises(TaskError, match="missing_field"):
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
