"""karcher, model_stock, nearswap and arcee_fusion: hand-computed small cases, their recipe
checks, and a merge of tiny llama models through the public API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS
from hfmerge.methods.arcee_fusion import fusion_importance
from hfmerge.recipe import parse_recipe
from hfmerge.testing import load_base_state

t = torch.tensor


def run(name, base, tensors, **params):
    method = METHODS[name]
    full = {p.name: p.default for p in method.params}
    full.update(params)
    return method.func(base, tensors, **full)


def unit_at(degrees: float) -> torch.Tensor:
    return t([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


# -- karcher ---------------------------------------------------------------------------------


def test_karcher_of_two_vectors_is_their_normalised_midpoint_times_their_mean_norm():
    out = run("karcher", None, [t([2.0, 0.0]), t([0.0, 4.0])])
    torch.testing.assert_close(out, 3.0 * unit_at(45))  # direction of (e1 + e2), norm (2 + 4) / 2


def test_karcher_takes_a_base_model_as_one_more_equally_weighted_point():
    e1, e2, e3 = torch.eye(3)
    torch.testing.assert_close(run("karcher", None, [e1, e2]), t([1.0, 1.0, 0.0]) / math.sqrt(2))
    torch.testing.assert_close(run("karcher", e3, [e1, e2]), t([1.0, 1.0, 1.0]) / math.sqrt(3))


def test_karcher_iterates_from_the_normalised_mean_to_the_geodesic_mean():
    # Three unit vectors at 0°, 0° and 90°: the Karcher mean on the circle is the mean angle, 30°;
    # the normalised arithmetic mean it starts from points to atan(1/2) = 26.57°.
    points = [unit_at(0), unit_at(0), unit_at(90)]
    torch.testing.assert_close(run("karcher", None, points), unit_at(30))
    torch.testing.assert_close(run("karcher", None, points, max_iter=0), unit_at(math.degrees(math.atan(0.5))))
    assert not torch.allclose(run("karcher", None, points, max_iter=1), run("karcher", None, points, max_iter=0), atol=1e-3)


def test_karcher_zero_tensors_have_no_direction_but_count_in_the_scale():
    torch.testing.assert_close(run("karcher", None, [torch.zeros(2), t([3.0, 4.0])]), t([1.5, 2.0]))  # (0 + 5) / 2 · (0.6, 0.8)
    assert torch.equal(run("karcher", None, [torch.zeros(2, 2), torch.zeros(2, 2)]), torch.zeros(2, 2))
    one = t([[1.0, 2.0]])
    assert run("karcher", None, [one]) is one


# -- model_stock -----------------------------------------------------------------------------


@pytest.mark.parametrize(("degrees", "ratio"), [(60, 2 / 3), (90, 0.0), (0, 1.0), (180, 0.0)])
def test_model_stock_moves_toward_the_mean_by_the_ratio_of_the_angle(degrees, ratio):
    # N = 2: t = 2 cos θ / (1 + cos θ); cos 60° = 1/2 gives 2/3. At 180° the ratio has no finite
    # value and the base is kept.
    base = t([1.0, -1.0])
    a, b = base + unit_at(0), base + 2.0 * unit_at(degrees)
    out = run("model_stock", base, [a, b])
    torch.testing.assert_close(out, base + ratio * (a + b - 2 * base) / 2)


def test_model_stock_averages_the_pairwise_cosines_of_three_models():
    base = torch.zeros(3)
    models = [t([1.0, 0.0, 0.0]), t([0.0, 1.0, 0.0]), t([1.0, 1.0, 0.0])]
    cos = (0.0 + 2 / math.sqrt(2)) / 3  # pairs: 90°, 45°, 45°
    ratio = 3 * cos / (1 + 2 * cos)
    torch.testing.assert_close(run("model_stock", base, models), ratio * t([2.0, 2.0, 0.0]) / 3)


def test_model_stock_filter_wise_takes_one_angle_per_row():
    base = torch.zeros(2, 2)
    a = torch.stack([unit_at(0), unit_at(0)])
    b = torch.stack([unit_at(60), unit_at(90)])  # row 0 at 60°, row 1 at 90°
    rows = run("model_stock", base, [a, b], filter_wise=True)
    torch.testing.assert_close(rows[0], (2 / 3) * (a[0] + b[0]) / 2)
    torch.testing.assert_close(rows[1], torch.zeros(2))
    # One angle for the whole tensor: cos = (1/2 + 0) / 2 over the two rows together.
    whole = run("model_stock", base, [a, b], filter_wise=False)
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    torch.testing.assert_close(whole, (2 * cos / (1 + cos)) * (a + b) / 2)
    # A 1-D tensor is one row: filter_wise changes nothing there.
    v0, v1, v2 = torch.zeros(3), t([1.0, 0.0, 2.0]), t([0.0, 1.0, 2.0])
    assert torch.equal(run("model_stock", v0, [v1, v2], filter_wise=True), run("model_stock", v0, [v1, v2]))


# -- nearswap --------------------------------------------------------------------------------


def test_nearswap_moves_each_entry_toward_the_model_by_at_most_t():
    base = torch.zeros(4)
    model = t([0.05, 0.5, -2.0, 0.0])
    # weights min(t / |δ|, 1): 1, 0.2, 0.05, and 1 where δ = 0
    torch.testing.assert_close(run("nearswap", base, [model], t=0.1), t([0.05, 0.1, -0.1, 0.0]))


def test_nearswap_with_t_near_zero_keeps_the_base_and_with_a_large_t_takes_the_model():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    model = base + torch.randn(3, 5, generator=gen)
    torch.testing.assert_close(run("nearswap", base, [model], t=1e-9), base)
    assert torch.equal(run("nearswap", base, [model], t=0.0), base)
    torch.testing.assert_close(run("nearswap", base, [model], t=1e6), model)


# -- arcee_fusion ----------------------------------------------------------------------------


def test_arcee_fusion_keeps_the_changes_above_the_upper_fence():
    # One row: the KL factor is one positive number, so the scores order like |δ|. Sorted |δ| =
    # 0.01 .. 0.18, 1, 2 (n = 20): Q1 = 0.05 (index 4), median = 0.10 (index 9), Q3 = 0.15
    # (index 14), fence = 0.10 + 1.5 · 0.10 = 0.25: only the two outliers pass.
    base = torch.zeros(20)
    delta = torch.cat([torch.arange(1, 19) * 0.01, t([1.0, 2.0])])
    delta = delta[torch.randperm(20, generator=torch.Generator().manual_seed(1))]
    out = run("arcee_fusion", base, [base + delta])
    expected = torch.where(delta.abs() >= 1.0, delta, torch.zeros(20))
    assert torch.equal(out, expected)


def test_arcee_fusion_scores_by_the_rows_softmax_shift_not_by_size_alone():
    base = torch.zeros(4, 5)
    delta = torch.zeros(4, 5)
    delta[0, 0] = 2.0  # one large change: a large KL for row 0
    delta[1] = t([0.01, -0.02, 0.03, -0.01, 0.02])
    delta[2] = t([-0.02, 0.01, 0.02, 0.03, -0.01])
    delta[3] = 5.0  # a constant shift leaves the row's softmax unchanged: KL 0, score 0
    scores = fusion_importance(base, base + delta)
    assert float(scores[3].abs().max()) == 0.0 and float(scores[0, 0]) > 10 * float(scores[1:3].max())
    out = run("arcee_fusion", base, [base + delta])
    assert torch.equal(out[0], delta[0]) and torch.equal(out[3], base[3])


def test_arcee_fusion_keeps_everything_when_all_scores_are_equal():
    base = t([0.5, -1.0, 2.0])
    assert torch.equal(run("arcee_fusion", base, [base.clone()]), base)
    shifted = base + 3.0  # KL 0: every score is 0, the fence is 0, every change is kept
    torch.testing.assert_close(run("arcee_fusion", base, [shifted]), shifted)
    assert run("arcee_fusion", torch.zeros(0, 3), [torch.zeros(0, 3)]).shape == (0, 3)  # no scores, no quantiles


# -- recipe checks ---------------------------------------------------------------------------


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("base", "a", "b", "c"):
        (tmp_path / name).mkdir()
    return tmp_path


def parse(folders: Path, method: str, models: list[str], base: str | None = "./base", **parameters):
    data = {"merge_method": method, "models": models}
    if base is not None:
        data["base_model"] = base
    if parameters:
        data["parameters"] = parameters
    return parse_recipe(data, source="r.yaml", base_dir=folders)


@pytest.mark.parametrize(("method", "models", "message"), [
    ("model_stock", ["./a"], "r.yaml: models: merge_method 'model_stock' takes at least 2 fine-tuned models besides base_model, got 1"),
    ("model_stock", ["./base", "./a"], "got 1 (a base_model listed under models is not counted)"),
    ("arcee_fusion", ["./a", "./b"], "r.yaml: models: merge_method 'arcee_fusion' takes exactly 1 fine-tuned model besides base_model, got 2"),
    ("nearswap", ["./a", "./b", "./c"], "r.yaml: models: merge_method 'nearswap' takes exactly 1 fine-tuned model besides base_model, got 3"),
])
def test_model_counts_are_checked_when_the_recipe_is_read(folders, method, models, message):
    params = {"t": 0.001} if method == "nearswap" else {}
    with pytest.raises(RecipeError) as info:
        parse(folders, method, models, **params)
    assert message in str(info.value)


@pytest.mark.parametrize("method", ["model_stock", "nearswap", "arcee_fusion"])
def test_the_methods_on_task_vectors_need_a_base_model(folders, method):
    with pytest.raises(RecipeError, match=rf"r.yaml: base_model: missing; merge_method '{method}'"):
        parse(folders, method, ["./a", "./b"], base=None, t=0.001)


def test_nearswap_needs_t_for_every_tensor(folders):
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.t: missing; merge_method 'nearswap' needs t"):
        parse(folders, "nearswap", ["./a"])
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.t: t has no default, so its filter list needs a last entry"):
        parse(folders, "nearswap", ["./a"], t=[{"filter": "mlp", "value": 0.1}])
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.t: got -0.5; expected a number >= 0.0"):
        parse(folders, "nearswap", ["./a"], t=-0.5)
    recipe = parse(folders, "nearswap", ["./base", "./a"], t=[{"filter": "mlp", "value": 0.1}, {"value": [0.0, 1.0]}])
    assert [m.ref.text for m in recipe.models] == ["./a"]  # the listed base is not a model
    assert recipe.tensor_param("t", "model.layers.1.mlp.up_proj.weight", 1.0) == 0.1
    assert recipe.tensor_param("t", "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5


def test_karcher_runs_without_a_base_and_ignores_weights_as_mergekit_does(folders):
    recipe = parse(folders, "karcher", [{"model": "./a", "parameters": {"weight": 0.7}}, "./b"], base=None, max_iter=5)
    assert recipe.base is None and len(recipe.models) == 2 and recipe.parameters == {"max_iter": 5, "tol": 1e-5}
    assert any("models[0].parameters.weight" in w for w in recipe.warnings)
    listed = parse(folders, "karcher", ["./base", "./a", "./b"])
    assert listed.base is not None and [m.ref.text for m in listed.models] == ["./a", "./b"]  # the base is counted once
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.max_iter: got -1; expected an integer >= 0"):
        parse(folders, "karcher", ["./a", "./b"], max_iter=-1)


def test_exponent_numbers_that_yaml_reads_as_strings_are_numbers_as_in_mergekit(folders):
    text = "merge_method: karcher\nmodels: [./a, ./b]\nparameters: {tol: 1e-3, max_iter: 3}\n"
    data = yaml.safe_load(text)
    assert data["parameters"]["tol"] == "1e-3"  # YAML 1.1
    assert parse_recipe(data, source="r.yaml", base_dir=folders).parameters["tol"] == 1e-3
    assert parse(folders, "nearswap", ["./a"], t="1E-4").tensor_param("t", "w", 0.0) == 1e-4
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.tol: got '1e-3x'; expected a number"):
        parse(folders, "karcher", ["./a", "./b"], tol="1e-3x")
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.max_iter: got '1e1'; expected an integer"):
        parse(folders, "karcher", ["./a", "./b"], max_iter="1e1")


def test_model_stock_filter_wise_must_be_a_boolean(folders):
    assert parse(folders, "model_stock", ["./a", "./b"], filter_wise=True).parameters["filter_wise"] is True
    with pytest.raises(RecipeError, match=r"r.yaml: parameters.filter_wise: got 'yes please'; expected true or false"):
        parse(folders, "model_stock", ["./a", "./b"], filter_wise="yes please")


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_merges_tiny_llama_models_through_the_api(families, tmp_path, filter_wise):
    llama = families["llama"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "model_stock", "base_model": str(llama.base),
        "models": [str(llama.base), str(llama.finetuned[0]), str(llama.finetuned[1])],  # the listed base is skipped
        "parameters": {"filter_wise": filter_wise},
    }))
    result = hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    base, a, b = (load_base_state(p) for p in (llama.base, *llama.finetuned[:2]))
    got = load_base_state(result.output)
    assert set(got) == set(base)
    rows_differ = 0
    for name, theta in base.items():
        expected = run("model_stock", theta.float(), [a[name].float(), b[name].float()], filter_wise=filter_wise)
        torch.testing.assert_close(got[name], expected.to(got[name].dtype), rtol=1e-6, atol=1e-6)
        assert not torch.equal(got[name], theta)  # the merge moved every tensor off the base
        if theta.dim() == 2:
            other = run("model_stock", theta.float(), [a[name].float(), b[name].float()], filter_wise=not filter_wise)
            rows_differ += not torch.allclose(expected, other)
    assert rows_differ > 0  # one angle per row and one per tensor give different merges
