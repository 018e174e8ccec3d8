"""The model card of local merges and the plan summary speak the recipe's language: no Hub
relation without Hub inputs, the user's key order, gradients and filters as written."""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import ModelCard

import hfmerge
from hfmerge.api import plan_summary
from hfmerge.options import RunOptions


def _recipe(path: Path, t5) -> Path:
    data = {"merge_method": "ties", "base_model": str(t5.base),
            "models": [{"model": str(t5.finetuned[0]), "parameters": {"weight": [1.0, 0.5], "density": 0.5}},
                       {"model": str(t5.finetuned[1]), "parameters": {"weight": [{"filter": "SelfAttention", "value": 0.3}, {"value": 0.7}]}}],
                "parameters": {"lambda": 0.9, "density": [0.2, 0.8]}, "dtype": "float32"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_local_merge_card_has_no_hub_relation_and_keeps_the_recipe_as_written(t5, tmp_path):
    result = hfmerge.merge(_recipe(tmp_path / "r.yaml", t5), output=tmp_path / "my-merge", progress=False)
    card = ModelCard.load(result.output / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data  # local inputs have no Hub id to relate to
    assert "\n# my-merge\n" in card.text
    assert 'AutoModelForSeq2SeqLM.from_pretrained("my-merge")' in card.text and 'pipeline("text2text-generation"' in card.text
    embedded = yaml.safe_load(card.text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert list(embedded) == ["merge_method", "base_model", "models", "parameters", "dtype"]  # the user's order, not sorted
    assert "weight=[1.0, 0.5]" in card.text and "weight=[{'filter': 'SelfAttention', 'value': 0.3}, {'value': 0.7}]" in card.text
    assert "Gradient(" not in card.text and "FilteredValue(" not in card.text


def test_the_plan_summary_shows_values_in_recipe_syntax(t5, tmp_path):
    summary = plan_summary(hfmerge.plan(_recipe(tmp_path / "r.yaml", t5)))
    assert summary["parameters"]["density"] == [0.2, 0.8]  # a per-model default given under parameters
    assert summary["models"][0]["parameters"]["weight"] == [1.0, 0.5]
    assert summary["models"][1]["parameters"]["weight"] == [{"filter": "SelfAttention", "value": 0.3}, {"value": 0.7}]
    assert "Gradient(" not in repr(summary)


def test_the_plan_summary_shows_the_trial_count_that_will_run(t5, tmp_path):
    path = tmp_path / "d.yaml"
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a", "label": 0}\n')
    task = {"task": "t{}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(rows)}}, "validation_split": "validation",
            "doc_to_text": "{{text}}", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"}
    path.write_text(yaml.safe_dump({"merge_method": "dfmerge", "base_model": str(t5.base), "models": [str(t5.finetuned[0]), str(t5.finetuned[1])],
                                    "parameters": {"n_trials": 30}, "tasks": [{**task, "task": "t0"}, {**task, "task": "t1"}]}))
    built = hfmerge.plan(path)
    assert plan_summary(built)["parameters"]["n_trials"] == 30
    assert plan_summary(built, RunOptions(n_trials=5))["parameters"]["n_trials"] == 5
