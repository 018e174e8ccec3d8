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


def test_hub_ids_of_local_inputs_link_the_card_to_the_hub(t5, tmp_path, monkeypatch):
    path = _recipe(tmp_path / "r.yaml", t5)
    data = yaml.safe_load(path.read_text())
    data["hub_ids"] = {str(t5.base): "google/t5-tiny", str(t5.finetuned[1]): "org/t5-old"}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.chdir(t5.finetuned[0].parent)
    # --base-model-id / RunOptions.hub_ids: relative to the working directory, added to the
    # recipe's and replacing its id for the same folder.
    options = RunOptions(hub_ids={f"./{t5.finetuned[0].name}": "org/t5-rte", str(t5.finetuned[1]): "org/t5-mnli"}, progress=False)
    result = hfmerge.merge(path, options, output=tmp_path / "linked")
    card = ModelCard.load(result.output / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == ["google/t5-tiny", "org/t5-rte", "org/t5-mnli"] and meta["base_model_relation"] == "merge"
    assert f"| {t5.base} (Hub: google/t5-tiny) | `local` | base | |" in card.text
    assert f"| {t5.finetuned[0]} (Hub: org/t5-rte) | `local` | fine-tuned (models[0])" in card.text
    assert "org/t5-old" not in card.text.split("## Recipe")[0]  # replaced by the option
    assert f"of {t5.base} (Hub: google/t5-tiny), made with hfmerge" in card.text


def test_hub_ids_are_checked_with_the_key_path(t5, tmp_path, capsys):
    import pytest

    from hfmerge.cli import main
    from hfmerge.errors import OptionError, RecipeError
    from hfmerge.recipe import parse_recipe

    base = {"merge_method": "task_arithmetic", "base_model": str(t5.base), "models": [str(t5.finetuned[0])]}
    for hub_ids, match in [
        ({str(t5.finetuned[2]): "org/x"}, r"hub_ids\[.*ft2\]: .*ft2 is not one of the recipe's local inputs"),
        ({str(t5.base): "org/x@main"}, r"hub_ids\[.*base\]: 'org/x@main' is not a Hub repo id"),
        ({str(t5.base): "./somewhere/else"}, r"is not a Hub repo id"),
        ({"org/model": "org/x"}, r"hub_ids\[org/model\]: not a local folder"),
        ({str(t5.base): 3}, r"got 3; expected a Hub repo id"),
        (["org/x"], r"hub_ids: got \['org/x'\]; expected a mapping"),
    ]:
        with pytest.raises(RecipeError, match=match):
            parse_recipe({**base, "hub_ids": hub_ids}, source="r.yaml")
    assert parse_recipe({**base, "hub_ids": {str(t5.base): "gpt2"}}).hub_ids == {str(t5.base.resolve()): "gpt2"}  # a canonical name
    with pytest.raises(OptionError, match=r"^hub_ids: .*ft2 is not one of the recipe's local inputs"):
        hfmerge.plan(parse_recipe(base), hub_ids={str(t5.finetuned[2]): "org/x"})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    for flag, message in [("org-x", "--base-model-id: got 'org-x'; expected PATH=ORG/NAME"),
                          (f"{t5.finetuned[2]}=org/x", "--base-model-id: " + str(t5.finetuned[2]))]:
        assert main([str(path), "--dry-run", "--base-model-id", flag]) != 0
        assert message in capsys.readouterr().err
