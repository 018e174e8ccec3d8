"""mergekit's recipe conventions that hfmerge follows: keys another method reads are ignored with
one warning naming them, typos still fail with a suggestion, a method may take the base model
optionally, and a global tensor parameter may be a gradient or a filter list."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import pytest
import torch

from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS, Param, merge_method
from hfmerge.recipe import parse_recipe

NAME = "test_optional_base_lerp"


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


@pytest.fixture
def lerp() -> Iterator[None]:
    """A method with an optional base and a per-tensor global parameter, registered for one test."""

    @merge_method(NAME, params=(Param("t", 0.5, low=0.0, high=1.0, tensor=True),), needs_base=True, base_optional=True)
    def _lerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, t: float, **_: object) -> torch.Tensor:
        start = tensors[0] if base is None else base
        return torch.lerp(start, tensors[-1], t)

    try:
        yield
    finally:
        METHODS.pop(NAME)


def test_per_model_keys_another_method_reads_are_ignored_with_one_warning(folders):
    r = parse_recipe({"merge_method": "task_arithmetic", "base_model": "./base",
                      "models": [{"model": "./a", "parameters": {"weight": 1.0, "density": 0.5}},
                                 {"model": "./b", "parameters": {"density": 0.3}}],
                      "parameters": {"int8_mask": True, "lambda": 0.5}}, source="r.yaml", base_dir=folders)
    notes = [w for w in r.warnings if "ignored" in w]
    assert len(notes) == 1
    assert "models[0].parameters.density" in notes[0] and "models[1].parameters.density" in notes[0] and "parameters.int8_mask" in notes[0]
    assert "density" not in r.models[0].parameters and "int8_mask" not in r.parameters
    assert r.parameters["lambda"] == 0.5


def test_a_recipe_without_ignored_keys_has_no_such_warning(folders):
    r = parse_recipe({"merge_method": "task_arithmetic", "base_model": "./base", "models": ["./a", "./b"]}, source="r.yaml", base_dir=folders)
    assert not any("ignored" in w for w in r.warnings)


@pytest.mark.parametrize("models, parameters, match", [
    ([{"model": "./a", "parameters": {"densty": 0.5}}], {}, r"models\[0\].parameters.densty: not a per-model parameter of 'ties' \(did you mean 'density'\?\)"),
    ([{"model": "./a"}], {"lamda": 0.5}, r"parameters.lamda: not a parameter of 'ties' \(did you mean 'lambda'\?\)"),
    ([{"model": "./a", "parameters": {"zzz": 1}}], {}, r"models\[0\].parameters.zzz: not a per-model parameter of 'ties' \(expected one of: weight, density\)"),
])
def test_keys_no_method_knows_still_fail_with_a_suggestion(folders, models, parameters, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe({"merge_method": "ties", "base_model": "./base", "models": models, "parameters": parameters}, source="r.yaml", base_dir=folders)


def test_a_fixed_parameter_set_otherwise_still_fails(folders):
    with pytest.raises(RecipeError, match=r"'dare_linear' fixes combine"):
        parse_recipe({"merge_method": "dare_linear", "base_model": "./base", "models": ["./a"], "parameters": {"combine": "ties"}},
                     source="r.yaml", base_dir=folders)


def test_an_optional_base_may_be_omitted_or_given(folders, lerp):
    without = parse_recipe({"merge_method": NAME, "models": ["./a", "./b"]}, source="r.yaml", base_dir=folders)
    assert without.base is None and len(without.models) == 2
    with_base = parse_recipe({"merge_method": NAME, "base_model": "./base", "models": ["./base", "./a", "./b"]}, source="r.yaml", base_dir=folders)
    assert with_base.base is not None and [m.ref.path.name for m in with_base.models] == ["a", "b"]  # the listed base is not one of the M


def test_a_global_tensor_parameter_takes_gradients_and_filters(folders, lerp):
    r = parse_recipe({"merge_method": NAME, "models": ["./a", "./b"],
                      "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.25}]}}, source="r.yaml", base_dir=folders)
    assert r.tensor_param("t", "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert r.tensor_param("t", "model.layers.1.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert r.tensor_param("t", "model.layers.1.mlp.up_proj.weight", 1.0) == pytest.approx(0.25)
    with pytest.raises(RecipeError, match=r"parameters.t\[0\].value\[1\]: got 2.0; expected a number in \[0.0, 1.0\]"):
        parse_recipe({"merge_method": NAME, "models": ["./a"], "parameters": {"t": [{"filter": "x", "value": [0.0, 2.0]}]}}, source="r.yaml", base_dir=folders)


def test_a_plain_global_parameter_still_refuses_a_list(folders):
    with pytest.raises(RecipeError, match=r"parameters.lambda: got \[0.5, 1.0\]"):
        parse_recipe({"merge_method": "ties", "base_model": "./base", "models": ["./a"], "parameters": {"lambda": [0.5, 1.0]}}, source="r.yaml", base_dir=folders)


def test_passthrough_takes_one_model_and_a_filtered_scale(folders):
    r = parse_recipe({"merge_method": "passthrough", "models": [{"model": "./a", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
                     source="r.yaml", base_dir=folders)
    assert r.model_param(r.models[0], "scale", "model.layers.0.self_attn.o_proj.weight") == 0.0
    assert r.model_param(r.models[0], "scale", "lm_head.weight") == 1.0
    with pytest.raises(RecipeError, match=r"models: merge_method 'passthrough' copies one model, got 2"):
        parse_recipe({"merge_method": "passthrough", "models": ["./a", "./b"]}, source="r.yaml", base_dir=folders)


def test_passthrough_scale_zeroes_only_the_filtered_tensors_of_a_llama(families, tmp_path):
    import yaml
    from safetensors.torch import load_file

    import hfmerge
    from hfmerge.testing import load_base_state

    llama = families["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32",
                                      "models": [{"model": str(llama.finetuned[0]), "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}))
    result = hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    got, source = load_file(result.output / "model.safetensors"), load_base_state(llama.finetuned[0])
    assert any("o_proj" in n for n in got)
    for name, value in got.items():
        expected = torch.zeros_like(source[name]) if "o_proj" in name else source[name]
        assert torch.equal(value, expected), name
