"""slerp, nuslerp and multislerp against hand-computed small tensors, their recipe checks, and
one slerp merge of tiny llama models through the public API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hfmerge
from hfmerge.errors import HfMergeError, RecipeError
from hfmerge.methods import METHODS
from hfmerge.methods.slerp import slerp_pair
from hfmerge.planning import relative_depths
from hfmerge.recipe import parse_recipe
from hfmerge.testing import build_base, build_finetuned, load_base_state

t = torch.tensor
R = math.sqrt(0.5)  # sin 45° = cos 45°


def slerp(base, other, tv):
    return METHODS["slerp"].func(base, [other], t=tv)


def nuslerp(base, tensors, weight=(1.0, 1.0), flatten=True, row_wise=False):
    return METHODS["nuslerp"].func(base, tensors, weight=list(weight), nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)


def multislerp(base, tensors, weight=None, normalize=True, eps=1e-8):
    weight = [1.0] * len(tensors) if weight is None else weight
    return METHODS["multislerp"].func(base, tensors, weight=weight, normalize_weights=normalize, eps=eps)


# -- slerp ------------------------------------------------------------------------------------

def test_slerp_endpoints_give_the_base_and_the_other_model():
    gen = torch.Generator().manual_seed(0)
    base, other = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    assert torch.allclose(slerp(base, other, 0.0), base, atol=1e-6)
    assert torch.allclose(slerp(base, other, 1.0), other, atol=1e-6)


def test_slerp_of_orthogonal_unit_vectors_at_one_half_is_the_45_degree_point():
    assert torch.allclose(slerp(t([1.0, 0.0]), t([0.0, 1.0]), 0.5), t([R, R]))
    # at t = 1/3 the angle is 30°
    assert torch.allclose(slerp(t([1.0, 0.0]), t([0.0, 1.0]), 1 / 3), t([math.cos(math.pi / 6), 0.5]))
    # a 2-D tensor is one flat vector: [[1, 0], [0, 0]] and [[0, 0], [0, 1]] are orthogonal
    assert torch.allclose(slerp(t([[1.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 1.0]]), 0.5), t([[R, 0.0], [0.0, R]]))


def test_slerp_scales_the_vectors_as_they_are_not_their_directions():
    # orthogonal, norms 2 and 4: sin(π/4)/sin(π/2) · each
    assert torch.allclose(slerp(t([2.0, 0.0]), t([0.0, 4.0]), 0.5), t([2 * R, 4 * R]))


def test_slerp_falls_back_to_lerp_for_colinear_and_antipodal_vectors():
    assert torch.equal(slerp(t([1.0, 2.0]), t([3.0, 6.0]), 0.25), t([1.5, 3.0]))
    assert torch.equal(slerp(t([1.0, 2.0]), t([-2.0, -4.0]), 0.5), t([-0.5, -1.0]))
    # cos Ω = 0.9996 > 0.9995: still the lerp
    a, b = t([1.0, 0.0]), t([0.9996, math.sqrt(1 - 0.9996 ** 2)])
    assert torch.allclose(slerp(a, b, 0.5), (a + b) / 2, atol=0)
    # cos Ω = 0.999 < 0.9995: spherical, which keeps unit norm where the lerp would not
    b = t([0.999, math.sqrt(1 - 0.999 ** 2)])
    assert abs(float(slerp(a, b, 0.5).norm()) - 1.0) < 1e-6 and float(((a + b) / 2).norm()) < 1 - 1e-4


def test_slerp_leaves_a_zero_vector_unnormalised():
    # ‖base‖ = 0 <= 1e-8: not divided, so cos Ω = 0 and Ω = 90°: sin(45°) · other, not other / 2
    assert torch.allclose(slerp(t([0.0, 0.0]), t([1.0, 2.0]), 0.5), t([R, 2 * R]))
    assert torch.equal(slerp(t([0.0, 0.0]), t([0.0, 0.0]), 0.3), t([0.0, 0.0]))


def test_slerp_takes_the_base_and_exactly_one_model():
    with pytest.raises(ValueError, match="exactly one other tensor"):
        METHODS["slerp"].func(t([1.0]), [t([1.0]), t([2.0])], t=0.5)
    with pytest.raises(ValueError, match="no base"):
        METHODS["slerp"].func(None, [t([1.0])], t=0.5)


# -- nuslerp ----------------------------------------------------------------------------------

def test_nuslerp_t_is_the_second_weight_over_the_sum():
    e1, e2 = t([1.0, 0.0]), t([0.0, 1.0])
    assert torch.allclose(nuslerp(None, [e1, e2]), t([R, R]))
    # weights 3 and 1: t = 1/4, so 22.5° from e1
    assert torch.allclose(nuslerp(None, [e1, e2], weight=(3.0, 1.0)), t([math.cos(math.pi / 8), math.sin(math.pi / 8)]))
    assert torch.allclose(nuslerp(None, [e1, e2], weight=(1.0, 0.0)), e1, atol=1e-6)


def test_nuslerp_with_a_base_interpolates_the_task_vectors():
    base = t([1.0, 1.0, 1.0])
    a, b = base + t([2.0, 0.0, 0.0]), base + t([0.0, 2.0, 0.0])
    assert torch.allclose(nuslerp(base, [a, b]), base + t([2 * R, 2 * R, 0.0]))


def test_nuslerp_weights_that_sum_to_zero_give_t_one_half():
    e1, e2 = t([1.0, 0.0]), t([0.0, 1.0])
    half = nuslerp(None, [e1, e2])
    assert torch.equal(nuslerp(None, [e1, e2], weight=(1.0, -1.0)), half)
    assert torch.equal(nuslerp(None, [e1, e2], weight=(0.5, -0.5 + 1e-7)), half)  # |Σ w| < 1e-6
    # |Σ w| = 1e-3 is not zero: t = w_2 / Σ w extrapolates far past the second model
    assert not torch.allclose(nuslerp(None, [e1, e2], weight=(0.5, -0.499)), half)


def test_nuslerp_colinear_vectors_are_interpolated_linearly():
    assert torch.allclose(nuslerp(None, [t([1.0, 2.0]), t([3.0, 6.0])], weight=(3.0, 1.0)), t([1.5, 3.0]))


def test_nuslerp_flattened_row_and_column_slices_differ_as_computed_by_hand():
    v0 = t([[1.0, 0.0], [1.0, 0.0]])
    v1 = t([[0.0, 1.0], [2.0, 0.0]])
    # one vector each: [1, 0, 1, 0] and [0, 1, 2, 0], cos Ω = 2 / √10; at t = 1/2 both
    # coefficients are sin(Ω/2) / sin Ω = 1 / (2 cos(Ω/2))
    k = 1 / (2 * math.sqrt((1 + 2 / math.sqrt(10)) / 2))
    assert torch.allclose(nuslerp(None, [v0, v1]), k * (v0 + v1))
    # slices along the last dimension (rows): [1, 0] vs [0, 1] orthogonal; [1, 0] vs [2, 0] colinear
    assert torch.allclose(nuslerp(None, [v0, v1], flatten=False), t([[R, R], [1.5, 0.0]]))
    # nuslerp_row_wise: slices along the first dimension (columns): [1, 1] vs [0, 2] at 45°,
    # so sin(22.5°) / sin(45°) · ([1, 1] + [0, 2]); [0, 0] vs [1, 0]: a zero vector, Ω = 90°
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    assert torch.allclose(nuslerp(None, [v0, v1], flatten=False, row_wise=True), t([[c, R], [3 * c, 0.0]]))
    # nuslerp_row_wise only matters without flattening
    assert torch.equal(nuslerp(None, [v0, v1], row_wise=True), nuslerp(None, [v0, v1]))


def test_nuslerp_takes_exactly_two_models():
    with pytest.raises(ValueError, match="exactly two tensors, got 3"):
        nuslerp(None, [t([1.0])] * 3, weight=(1.0, 1.0, 1.0))


# -- multislerp -------------------------------------------------------------------------------

def test_multislerp_of_one_model_is_that_model():
    a = t([1.0, 2.0])
    assert multislerp(t([5.0, 5.0]), [a]) is a


def test_multislerp_of_two_equal_norm_models_at_equal_weights_is_the_slerp_midpoint():
    assert torch.allclose(multislerp(None, [t([1.0, 0.0]), t([0.0, 1.0])]), t([R, R]))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    b = b * a.norm() / b.norm()
    assert torch.allclose(multislerp(None, [a, b]), slerp_pair(0.5, a, b), atol=1e-6)
    # with a base, around it
    base = torch.randn(6, generator=gen)
    assert torch.allclose(multislerp(base, [base + a, base + b]), base + slerp_pair(0.5, a, b), atol=1e-6)


def test_multislerp_points_along_the_weighted_mean_direction_with_the_weighted_mean_norm():
    # norms 2 and 4 at equal weights: direction (1, 1)/√2, norm (2 + 4)/2
    assert torch.allclose(multislerp(None, [t([2.0, 0.0]), t([0.0, 4.0])]), t([3 * R, 3 * R]))
    # weights 1 and 3: the direction of e1 + 3 e2 (not slerp's 67.5°)
    assert torch.allclose(multislerp(None, [t([1.0, 0.0]), t([0.0, 1.0])], weight=[1.0, 3.0]), t([1.0, 3.0]) / math.sqrt(10))
    # unnormalised weights 1 and 1 double the norm
    assert torch.allclose(multislerp(None, [t([1.0, 0.0]), t([0.0, 1.0])], normalize=False), t([2 * R, 2 * R]))


def test_multislerp_of_many_models_follows_the_formula_and_leaves_its_inputs_alone():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 5, generator=gen)
    models = [base + torch.randn(3, 5, generator=gen) for _ in range(4)]
    before = [m.clone() for m in models]
    w = torch.tensor([0.1, 0.4, 0.2, 0.3])
    out = multislerp(base, models, weight=[0.2, 0.8, 0.4, 0.6])  # normalised: w
    assert all(torch.equal(a, b) for a, b in zip(models, before))
    v = torch.stack([m - base for m in models]).reshape(4, -1).double()
    n = v.norm(dim=1)
    u = v / n[:, None]
    m = (w.double() @ u) / (w.double() @ u).norm()
    g = w.double() @ (u - (u @ m)[:, None] * m)
    a = g.norm()
    expected = base + ((w.double() @ n) * (torch.cos(a) * m + torch.sin(a) / a * g)).reshape(3, 5).float()
    assert torch.allclose(out, expected, atol=1e-5)


def test_multislerp_eps_enters_the_norms_and_the_exponential_map():
    e1, e2 = t([1.0, 0.0]), t([0.0, 1.0])
    # eps 0.1: the tangent vectors cancel, the map's angle is ‖0‖ + eps, so cos(0.1) · m
    assert torch.allclose(multislerp(None, [e1, e2], eps=0.1), math.cos(0.1) * t([R, R]))
    # eps 1: u_i = e_i / 2, ‖Σ w u‖ = 0.354 < 1, so two models fall back to the weighted sum
    assert torch.allclose(multislerp(None, [e1, e2], eps=1.0), t([0.5, 0.5]))


def test_multislerp_directions_that_cancel_fall_back_for_two_models_and_fail_for_more():
    base = t([1.0, 1.0])
    a = t([1.0, 2.0])
    assert torch.allclose(multislerp(base, [base + a, base - a]), base)  # ½ a − ½ a
    # unequal weights do not cancel: the direction of a, with the mean norm ‖a‖ (the lerp gives ½ a)
    assert torch.allclose(multislerp(None, [a, -a], weight=[3.0, 1.0]), a)
    thirds = [t([math.cos(k * 2 * math.pi / 3), math.sin(k * 2 * math.pi / 3)]) for k in range(3)]
    with pytest.raises(HfMergeError, match="weighted mean of the models' directions is zero"):
        multislerp(None, thirds)


def test_multislerp_of_task_vectors_all_zero_gives_the_base():
    base = t([1.0, -2.0, 3.0])
    assert torch.equal(multislerp(base, [base.clone() for _ in range(3)]), base)
    assert torch.equal(multislerp(None, [torch.zeros(3) for _ in range(3)]), torch.zeros(3))


def test_multislerp_normalised_weights_that_sum_to_zero_are_an_error():
    with pytest.raises(HfMergeError, match="weights sum to 0"):
        multislerp(None, [t([1.0, 0.0]), t([0.0, 1.0]), t([1.0, 1.0])], weight=[1.0, -2.0, 1.0])
    # unnormalised they are used as given: ‖e1 − e2‖-direction, Σ w n = 0 scales it to zero
    out = multislerp(None, [t([1.0, 0.0]), t([0.0, 1.0])], weight=[1.0, -1.0], normalize=False)
    assert torch.allclose(out, t([0.0, 0.0]))


# -- recipes ----------------------------------------------------------------------------------

@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).mkdir()
    return tmp_path


def parse(folders: Path, **data):
    return parse_recipe({k: v for k, v in data.items() if v is not None}, source="r.yaml", base_dir=folders)


def test_slerp_recipe_with_the_base_listed_or_not(folders):
    listed = parse(folders, merge_method="slerp", base_model="./base", models=["./base", "./a"], parameters={"t": [0.0, 1.0]})
    unlisted = parse(folders, merge_method="slerp", base_model="./base", models=["./a"], parameters={"t": 0.3})
    assert [m.ref.path.name for m in listed.models] == ["a"] == [m.ref.path.name for m in unlisted.models]
    assert listed.tensor_param("t", "model.layers.1.mlp.up_proj.weight", 0.25) == 0.25
    assert unlisted.tensor_param("t", "anything", 0.9) == 0.3


@pytest.mark.parametrize("data, match", [
    ({"models": ["./a", "./b"]}, r"r.yaml: base_model: missing; merge_method 'slerp' interpolates from base_model"),
    ({"base_model": "./base", "models": ["./a", "./b"]},
     r"r.yaml: models: merge_method 'slerp' takes exactly 1 fine-tuned model besides base_model, got 2"),
    ({"base_model": "./base", "models": ["./base", "./a", "./b"]}, r"models: .* besides base_model, got 2"),
    ({"base_model": "./base", "models": ["./a"], "parameters": None}, r"r.yaml: parameters.t: missing; merge_method 'slerp' needs t"),
    ({"base_model": "./base", "models": [{"model": "./a", "parameters": {"t": 0.5}}], "parameters": None}, r"parameters.t: missing"),
    ({"base_model": "./base", "models": ["./a"], "parameters": {"t": 1.5}}, r"r.yaml: parameters.t: got 1.5; expected a number in \[0.0, 1.0\]"),
    ({"base_model": "./base", "models": ["./a"], "parameters": {"t": [0.0, -0.5]}}, r"r.yaml: parameters.t\[1\]: got -0.5"),
    ({"base_model": "./base", "models": ["./a"], "parameters": {"t": [{"filter": "mlp", "value": 2}]}}, r"parameters.t\[0\].value: got 2"),
    ({"base_model": "./base", "models": ["./a"], "parameters": {"t": [{"filter": "mlp", "value": 0.2}, {"filter": "self_attn", "value": 0.8}]}},
     r"r.yaml: parameters.t: t has no default, so its filter list needs a last entry without a filter"),
])
def test_slerp_recipe_errors_name_the_key_path(folders, data, match):
    data = {"merge_method": "slerp", "parameters": {"t": 0.5}, **data}
    with pytest.raises(RecipeError, match=match):
        parse(folders, **data)


def test_nuslerp_recipe_takes_two_models_with_an_optional_base(folders):
    without = parse(folders, merge_method="nuslerp", models=["./a", "./b"])
    with_base = parse(folders, merge_method="nuslerp", base_model="./base", models=["./base", "./a", "./b"],
                      parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True, "weight": 0.5})
    assert without.base is None and len(without.models) == 2 and without.parameters == {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert with_base.base is not None and len(with_base.models) == 2 and with_base.parameters["nuslerp_row_wise"] is True
    for data in ({"models": ["./a"]}, {"models": ["./a", "./b", "./c"]}):
        with pytest.raises(RecipeError, match=rf"r.yaml: models: merge_method 'nuslerp' takes exactly 2 fine-tuned models besides base_model, got {len(data['models'])}"):
            parse(folders, merge_method="nuslerp", **data)
    with pytest.raises(RecipeError, match=r"exactly 2 fine-tuned models besides base_model, got 1"):
        parse(folders, merge_method="nuslerp", base_model="./base", models=["./base", "./a"])
    with pytest.raises(RecipeError, match=r"parameters.nuslerp_flatten: got 'no'; expected true or false"):
        parse(folders, merge_method="nuslerp", models=["./a", "./b"], parameters={"nuslerp_flatten": "no"})


def test_multislerp_recipe_checks_weights_and_eps(folders):
    r = parse(folders, merge_method="multislerp", models=["./a", "./b", "./c"])
    assert r.base is None and r.parameters == {"normalize_weights": True, "eps": 1e-8}
    zero = [{"model": "./a", "parameters": {"weight": 1.0}}, {"model": "./b", "parameters": {"weight": -1.0}}]
    with pytest.raises(RecipeError, match=r"r.yaml: models: the weights sum to 0, .* set parameters.normalize_weights: false"):
        parse(folders, merge_method="multislerp", base_model="./base", models=zero)
    assert parse(folders, merge_method="multislerp", models=zero, parameters={"normalize_weights": False}).models
    # weights that vary by tensor are checked while merging
    assert parse(folders, merge_method="multislerp", models=[zero[0], {"model": "./b", "parameters": {"weight": [-1.0, 0.0]}}]).models
    sliced = [{"sources": [{"model": "./a", "layer_range": [0, 1], "parameters": {"weight": 2.0}},
                           {"model": "./b", "layer_range": [0, 1]}], "parameters": {"weight": -2.0}}]
    with pytest.raises(RecipeError, match=r"r.yaml: slices\[0\].sources: the weights sum to 0"):
        parse(folders, merge_method="multislerp", slices=sliced)
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.eps: got 0; expected a number > 0.0"):
        parse(folders, merge_method="multislerp", models=["./a", "./b"], parameters={"eps": 0})


def test_spherical_keys_on_another_method_are_ignored_with_a_warning(folders):
    r = parse(folders, merge_method="task_arithmetic", base_model="./base", models=["./a"],
              parameters={"t": 0.5, "nuslerp_flatten": False, "normalize_weights": True, "eps": 1e-3})
    assert not {"t", "nuslerp_flatten", "normalize_weights", "eps"} & set(r.parameters)
    assert any("parameters.t, parameters.nuslerp_flatten, parameters.normalize_weights, parameters.eps" in w for w in r.warnings)


# -- end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("spherical")
    base = build_base(root / "base", "llama", layers=3)
    return base, build_finetuned(base, root / "ft", seed=7, scale=0.5)


def write_recipe(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}))
    return path


def test_slerp_merge_of_tiny_llamas_follows_the_filter_list_and_gradient(llama, tmp_path):
    base, ft = llama
    t_setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.25}, {"value": [0.6, 0.2]}]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="slerp", base_model=base, models=[{"model": str(base)}, {"model": str(ft)}],
                          parameters={"t": t_setting}, dtype="float32")
    result = hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert result.summary["parameters"] == {"t": t_setting}  # the plan shows t as the recipe writes it
    merged = load_file(str(result.output / "model.safetensors"))
    theta_base, theta_ft = load_base_state(base), load_base_state(ft)
    assert set(merged) == set(theta_base)
    depths = relative_depths(sorted(theta_base))
    used = set()
    for name, tensor in merged.items():
        d = depths[name]
        tv = d if "self_attn" in name else 0.25 if "mlp" in name else 0.6 + (0.2 - 0.6) * d
        used.add(round(tv, 6))
        expected = slerp_pair(tv, theta_base[name].float(), theta_ft[name].float())
        assert torch.allclose(tensor, expected, atol=1e-6), name
    assert {0.0, 0.5, 1.0, 0.25, 0.6} <= used  # each filter, and the gradients' ends and middle, were exercised
    # t = 0 tensors are the base's: the first layer's attention and everything outside the layers
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], theta_base["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)


def test_slerp_slices_take_one_source_besides_the_base_and_a_t_per_slice(folders):
    def slices(*sources, **parameters):
        entry = {"sources": [{"model": m, "layer_range": [0, 2]} for m in sources]}
        return [{**entry, "parameters": parameters} if parameters else entry]

    r = parse(folders, merge_method="slerp", base_model="./base", slices=slices("./base", "./a", t=0.3))
    assert [s.ref.path.name for s in r.slices[0].sources] == ["a"] and r.parameters["t"] is None
    with pytest.raises(RecipeError, match=r"r.yaml: slices\[0\].sources: merge_method 'slerp' takes exactly 1 source besides base_model in "
                                          r"each slice, got 2"):
        parse(folders, merge_method="slerp", base_model="./base", slices=slices("./base", "./a", "./b", t=0.3))
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.t: missing"):
        parse(folders, merge_method="slerp", base_model="./base", slices=slices("./base", "./a"))
    partial = [{"filter": "mlp", "value": 0.2}]
    with pytest.raises(RecipeError, match=r"r.yaml: slices\[0\].parameters.t: t has no default"):
        parse(folders, merge_method="slerp", base_model="./base", slices=slices("./base", "./a", t=partial))
    # the top-level t covers what the slice's filter list leaves out
    assert parse(folders, merge_method="slerp", base_model="./base", parameters={"t": 0.5}, slices=slices("./base", "./a", t=partial)).slices
    with pytest.raises(RecipeError, match=r"r.yaml: slices\[0\].sources: merge_method 'nuslerp' takes exactly 2 sources besides base_model"):
        parse(folders, merge_method="nuslerp", slices=slices("./a"))


def test_slerp_of_tiny_llamas_by_slices_uses_each_slice_t(llama, tmp_path):
    base, ft = llama
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="slerp", base_model=base, dtype="float32", parameters={"t": 0.7}, slices=[
        {"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(ft), "layer_range": [0, 2]}], "parameters": {"t": 0.2}},
        {"sources": [{"model": str(base), "layer_range": [2, 3]}, {"model": str(ft), "layer_range": [2, 3]}]},
    ])
    merged = load_file(str(hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output / "model.safetensors"))
    theta_base, theta_ft = load_base_state(base), load_base_state(ft)
    assert set(merged) == set(theta_base)
    for name, tensor in merged.items():
        # the first slice gives layers 0-1 and the tensors before the layers, the last one layer 2 and those after
        tv = 0.2 if name.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens")) else 0.7
        assert torch.allclose(tensor, slerp_pair(tv, theta_base[name].float(), theta_ft[name].float()), atol=1e-6), name
