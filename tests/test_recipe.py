"""Recipe validation: one clear error naming the key path, what was given and what is expected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hfmerge.cli import main
from hfmerge.errors import RecipeError
from hfmerge.recipe import FilteredValue, load_recipe, parse_recipe


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


def parse(folders: Path, **overrides):
    data = {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": "./a", "parameters": {"weight": 1.0, "density": 0.2}}, {"model": "./b", "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 1.0},
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    return parse_recipe(data, source="r.yaml", base_dir=folders)


def test_a_mergekit_ties_recipe_parses_with_mergekit_defaults(folders):
    r = parse(folders)
    assert r.method.name == "ties"
    assert r.parameters == {"lambda": 1.0, "normalize": True, "trim": "tensor", "rescale": False}
    assert r.base is not None and r.base.path == (folders / "base").resolve()
    assert r.model_param(r.models[1], "density", "x") == 1.0  # mergekit's default density
    assert r.model_param(r.models[0], "density", "x") == 0.2


def test_dare_aliases_fix_the_combination(folders):
    r = parse(folders, merge_method="dare_ties")
    assert r.method.name == "dare_ties" and r.parameters["combine"] == "ties"
    assert r.parameters["normalize"] is False  # mergekit's default for dare_ties
    assert parse(folders, merge_method="ties").parameters["normalize"] is True
    with pytest.raises(RecipeError, match=r"parameters.combine: not a parameter of 'dare_linear' \('dare_linear' fixes combine"):
        parse(folders, merge_method="dare_linear", parameters={"combine": "ties"})


def test_global_per_model_parameter_is_a_default_for_every_model(folders):
    r = parse(folders, parameters={"density": 0.3})
    assert [r.model_param(m, "density", "x") for m in r.models] == [0.2, 0.3]


def test_filter_lists_resolve_per_tensor_in_order(folders):
    models = [{"model": "./a", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 1.0}, {"filter": "attn", "value": 7.0}]}},
              {"model": "./b", "parameters": {"weight": [{"filter": "mlp", "value": 0.3}]}}]
    r = parse(folders, models=models, parameters={"weight": 0.9})
    assert isinstance(r.models[0].parameters["weight"], FilteredValue)
    assert r.model_param(r.models[0], "weight", "layers.0.mlp.up.weight") == 0.2
    # an entry without filter matches everything, so the later `attn` entry is never reached (mergekit)
    assert r.model_param(r.models[0], "weight", "layers.0.attn.q.weight") == 1.0
    # no match falls through to the global parameter, then to the method's default
    assert r.model_param(r.models[1], "weight", "layers.0.attn.q.weight") == 0.9
    assert parse(folders, models=models).model_param(r.models[1], "weight", "x") == 1.0


def test_gradients_interpolate_over_relative_depth(folders):
    models = [{"model": "./a", "parameters": {"weight": [0.0, 1.0, 0.5]}},
              {"model": "./b", "parameters": {"weight": [{"filter": "mlp", "value": [1.0, 3.0]}, {"value": 2.0}]}}]
    r = parse(folders, models=models)
    a, b = r.models
    assert [r.model_param(a, "weight", "x", t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.75, 0.5]
    assert r.model_param(b, "weight", "layers.1.mlp.w", 0.5) == 2.0 and r.model_param(b, "weight", "layers.1.attn", 0.5) == 2.0
    assert r.model_param(b, "weight", "layers.1.mlp.w", 0.25) == 1.5


def test_relative_depths_follow_mergekit_layer_positions():
    from hfmerge.planning import relative_depths

    names = ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.2.layer.1.DenseReluDense.wi.weight",
             "encoder.block.1.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.0.SelfAttention.q.weight",
             "decoder.block.1.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight", "lm_head.weight"]
    d = relative_depths(names)
    # outside the layers t = 0, before and after them alike (mergekit)
    assert d["shared.weight"] == 0.0 and d["lm_head.weight"] == 0.0 and d["encoder.final_layer_norm.weight"] == 0.0
    assert d["encoder.block.0.layer.0.SelfAttention.q.weight"] == 0.0 and d["encoder.block.1.layer.0.SelfAttention.q.weight"] == 0.5
    assert d["encoder.block.2.layer.1.DenseReluDense.wi.weight"] == 1.0 and d["decoder.block.1.layer.0.SelfAttention.q.weight"] == 1.0


def test_base_listed_among_models_contributes_no_task_vector(folders):
    r = parse(folders, models=[{"model": "./base"}, {"model": "./a"}])
    assert [m.ref.path.name for m in r.models] == ["a"]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"merge_methd": "ties"}, r"r.yaml: merge_methd: unknown key; did you mean 'merge_method'\?"),
        ({"merge_method": None}, r"merge_method: missing"),
        ({"merge_method": "tiez"}, r"merge_method: unknown method 'tiez' \(did you mean 'ties'\?\)"),
        ({"base_model": None}, r"base_model: missing; merge_method 'ties' works on task vectors"),
        ({"models": []}, r"models: got \[\]; expected a non-empty list"),
        ({"models": [{"model": "./a", "parmeters": {}}]}, r"models\[0\].parmeters: unknown key; did you mean 'parameters'"),
        ({"models": [{"parameters": {}}]}, r"models\[0\].model: missing"),
        ({"models": [{"model": "./a", "parameters": {"weight": "high"}}]}, r"models\[0\].parameters.weight: got 'high'; expected a number"),
        ({"models": [{"model": "./a", "parameters": {"density": 1.5}}]}, r"models\[0\].parameters.density: got 1.5; expected a number in \(0.0, 1.0\]"),
        ({"models": [{"model": "./a", "parameters": {"density": 0}}]}, r"density: got 0; expected a number in \(0.0, 1.0\]"),
        ({"models": [{"model": "./a", "parameters": {"zeta": 0.5}}]}, r"models\[0\].parameters.zeta: not a per-model parameter of 'ties'"),
        ({"models": [{"model": "./a"}, {"model": "./a"}]}, r"models\[1\].model: './a' is the same model as models\[0\].model"),
        ({"models": [{"model": "./a", "parameters": {"weight": float("inf")}}]}, r"models\[0\].parameters.weight: got inf; expected a number"),
        ({"parameters": {"lambda": -1}}, r"parameters.lambda: got -1; expected a number in \[0.0, 10.0\]"),
        ({"parameters": {"lambda": "x"}}, r"parameters.lambda: got 'x'"),
        ({"parameters": {"normalize": "yes"}}, r"parameters.normalize: got 'yes'; expected true or false"),
        ({"parameters": {"trim": "layer"}}, r"parameters.trim: got 'layer'; expected one of 'tensor', 'model'"),
        ({"dtype": "float8"}, r"dtype: got 'float8'; expected one of float32, float16, bfloat16"),
        ({"slices": [{"sources": [{"model": "./a", "layer_range": [0, 1]}]}]}, r"slices: give either models \(whole models merged\) or slices .*, not both"),
        ({"config_source": "union"}, r"config_source: 'union' applies to tokenizers"),
        ({"max_shard_size": "lots"}, r"max_shard_size: expected a size"),
        ({"allow_pickle": "yes"}, r"allow_pickle: got 'yes'; expected true or false"),
        ({"models": [{"model": "org//x"}]}, r"models\[0\].model: 'org//x' is neither an existing folder nor a Hub repo id"),
    ],
)
def test_bad_recipes_name_the_key_path(folders, overrides, pattern):
    with pytest.raises(RecipeError, match=pattern):
        parse(folders, **overrides)


def test_a_key_only_another_method_reads_is_ignored_with_a_warning(folders):
    # slerp's global `t`, given per model to ties: mergekit ignores it, and so does hfmerge.
    r = parse(folders, models=[{"model": "./a", "parameters": {"t": 0.5}}])
    assert "t" not in r.models[0].parameters
    assert any("models[0].parameters.t" in w and "ignored" in w for w in r.warnings)


def test_dare_seed_must_be_a_non_negative_integer(folders):
    with pytest.raises(RecipeError, match=r"parameters.seed: got 1.5; expected an integer >= 0"):
        parse(folders, merge_method="dare_ties", parameters={"seed": 1.5})


def test_fisher_method_requires_a_fisher_file_per_model(folders):
    with pytest.raises(RecipeError, match=r"models\[0\].fisher: missing; merge_method 'fisher' needs per-model Fisher information: give a Fisher file .* or a task"):
        parse(folders, merge_method="fisher", parameters={}, models=[{"model": "./a"}])
    with pytest.raises(RecipeError, match=r"models\[0\].fisher: merge_method 'ties' does not use Fisher files"):
        parse(folders, models=[{"model": "./a", "fisher": "f.safetensors"}])


def test_hub_references_keep_their_revision(folders):
    r = parse(folders, base_model="google/flan-t5-base@abc123", models=[{"model": "org/rte"}])
    assert (r.base.repo_id, r.base.revision) == ("google/flan-t5-base", "abc123")


def test_cli_prints_one_error_without_traceback_and_fails(folders, capsys):
    path = folders / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "./base", "models": [{"model": "./a", "parameters": {"density": 2}}]}))
    code = main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: ") and "models[0].parameters.density: got 2" in err
    assert "Traceback" not in err


def test_load_recipe_reports_yaml_errors_and_missing_files(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
