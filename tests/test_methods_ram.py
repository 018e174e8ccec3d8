"""RAM and RAM+ (tensor-local): hand-computed cases, recipe checks, and one merge of tiny llama models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS
from hfmerge.recipe import load_recipe, parse_recipe
from hfmerge.testing import load_base_state, write_checkpoint

t = torch.tensor


def run(name, base, tensors, **params):
    full = {p.name: p.default for p in METHODS[name].params}
    full.update(params)
    return METHODS[name].func(base, tensors, **full)


# τ_a = [2, 0, 4, 1e-6, 0], τ_b = [0, 3, 2, 0, 0]: entry 0 unique to a, 1 unique to b, 2 shared,
# 3 below epsilon (dropped), 4 unchanged.
BASE = t([1.0, 1.0, 1.0, 1.0, 1.0])
A = BASE + t([2.0, 0.0, 4.0, 1e-6, 0.0])
B = BASE + t([0.0, 3.0, 2.0, 0.0, 0.0])


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    out = run("ram", BASE, [A, B])
    # unique entries as they are, the shared entry the mean (4 + 2) / 2, the tiny change dropped
    assert torch.equal(out, t([3.0, 4.0, 4.0, 1.0, 1.0]))


def test_ram_mean_of_shared_changes_counts_only_the_models_that_changed_the_entry():
    base = torch.zeros(3)
    a, b, c = t([3.0, 6.0, 1.0]), t([0.0, 3.0, -1.0]), t([0.0, 0.0, 0.0])
    # entry 0: only a (unique, kept); entry 1: a and b (÷2, c does not count); entry 2: a and b cancel
    assert torch.equal(run("ram", base, [a, b, c]), t([3.0, 4.5, 0.0]))


def test_ram_epsilon_is_a_strict_threshold_on_the_magnitude():
    base = torch.zeros(3)
    a = t([0.5, -0.5, 0.6])
    b = t([0.5, 0.0, -0.2])
    # epsilon 0.5: |0.5| is not above it (dropped), 0.6 is (unique to a); -0.2 is dropped
    assert torch.equal(run("ram", base, [a, b], epsilon=0.5), t([0.0, 0.0, 0.6]))
    # epsilon 0: every non-zero change counts; entry 0 shared (mean 0.5), entry 2 shared (mean 0.2)
    assert torch.allclose(run("ram", base, [a, b], epsilon=0.0), t([0.5, -0.5, 0.2]))


def test_ram_with_one_model_is_that_model_without_its_tiny_changes():
    out = run("ram", BASE, [A])
    assert torch.equal(out, t([3.0, 1.0, 5.0, 1.0, 1.0]))


def test_ramplus_rescales_each_models_unique_changes_by_its_shared_to_unique_ratio():
    base = torch.zeros(6)
    # a changes entries 0, 1 (unique) and 4, 5 (shared): ρ_a = 2/2 = 1
    # b changes entry 2 (unique) and 4, 5 (shared): ρ_b = 2/1 = 2
    a = t([1.0, 2.0, 0.0, 0.0, 4.0, 2.0])
    b = t([0.0, 0.0, 3.0, 0.0, 2.0, 2.0])
    out = run("ramplus_tl", base, [a, b], r=0.5, alpha=1.5)
    lam_a, lam_b = 1 + 0.5 * 1.0, 1 + 0.5 * 1.5  # ρ_b = 2 is clipped to α = 1.5
    assert torch.allclose(out, t([1.0 * lam_a, 2.0 * lam_a, 3.0 * lam_b, 0.0, 3.0, 2.0]))
    # the defaults r = 0.1, α = 0.2: both ratios are clipped to 0.2, λ = 1.02
    assert torch.allclose(run("ramplus_tl", base, [a, b]), t([1.02, 2.04, 3.06, 0.0, 3.0, 2.0]))


def test_ramplus_without_shared_changes_is_ram_and_r_zero_is_ram():
    base = torch.zeros(4)
    a, b = t([1.0, 0.0, 0.0, 0.0]), t([0.0, 2.0, 0.0, 0.0])  # ρ = 0 for both: λ = 1
    assert torch.equal(run("ramplus_tl", base, [a, b], r=5.0, alpha=5.0), run("ram", base, [a, b]))
    assert torch.equal(run("ramplus_tl", BASE, [A, B], r=0.0), run("ram", BASE, [A, B]))


def test_ramplus_ratio_uses_epsilon_as_the_least_unique_count():
    base = torch.zeros(3)
    # a changes only shared entries: ρ_a = 2 / max(0, ε) is huge and clipped to α; λ_a scales nothing
    a, b = t([1.0, 1.0, 0.0]), t([1.0, 3.0, 5.0])  # b: 2 shared, 1 unique: ρ_b = 2
    out = run("ramplus_tl", base, [a, b], r=1.0, alpha=3.0)
    assert torch.allclose(out, t([1.0, 2.0, 5.0 * 3.0]))


def test_ramplus_with_epsilon_zero_and_an_unchanged_model_stays_finite():
    # mergekit computes 0/0 for the unchanged model here and returns NaN for the whole tensor
    base = torch.zeros(4)
    out = run("ramplus_tl", base, [t([1.0, 0.0, 0.0, 0.0]), torch.zeros(4)], epsilon=0.0)
    assert torch.equal(out, t([1.0, 0.0, 0.0, 0.0]))


def test_inputs_are_left_unchanged_and_the_shape_is_kept():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, 5, generator=gen)
    models = [base + torch.randn(3, 4, 5, generator=gen) * (torch.rand(3, 4, 5, generator=gen) < 0.5) for _ in range(3)]
    copies = [m.clone() for m in models]
    base_copy = base.clone()
    for name in ("ram", "ramplus_tl"):
        out = run(name, base, models)
        assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.equal(base, base_copy) and all(torch.equal(m, c) for m, c in zip(models, copies))


def test_methods_are_registered_with_mergekits_parameters_and_defaults():
    ram, plus = METHODS["ram"], METHODS["ramplus_tl"]
    assert {p.name: p.default for p in ram.params} == {"epsilon": 1e-5}
    assert {p.name: p.default for p in plus.params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert ram.needs_base and plus.needs_base and not ram.per_model and not plus.per_model
    assert ram.paper == plus.paper == "https://arxiv.org/abs/2601.13572"


def recipe(method, **parameters):
    return {"merge_method": method, "base_model": "org/base", "models": [{"model": "org/a"}, {"model": "org/b"}], "parameters": parameters}


@pytest.mark.parametrize(("method", "key", "value", "message"), [
    ("ram", "epsilon", -1e-3, r"parameters.epsilon: got -0.001; expected a number >= 0.0"),
    ("ramplus_tl", "r", -0.1, r"parameters.r: got -0.1; expected a number >= 0.0"),
    ("ramplus_tl", "alpha", "big", r"parameters.alpha: got 'big'; expected a number >= 0.0"),
    ("ramplus_tl", "alpha", [{"filter": "mlp", "value": -1.0}, {"value": 0.2}], r"parameters.alpha\[0\].value: got -1.0; expected a number >= 0.0"),
    ("ram", "epsilom", 0.1, r"parameters.epsilom: not a parameter of 'ram' \(did you mean 'epsilon'\?\)"),
])
def test_bad_settings_are_refused_with_the_key_path(method, key, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe(method, **{key: value}))


def test_weights_and_ramplus_settings_are_ignored_by_ram_with_a_warning():
    data = recipe("ram", r=0.5)
    data["models"][0]["parameters"] = {"weight": 2.0}
    warnings = parse_recipe(data).warnings
    assert any("models[0].parameters.weight" in w and "parameters.r" in w and "ignored" in w for w in warnings)


def test_a_base_model_is_required():
    data = recipe("ramplus_tl")
    del data["base_model"]
    with pytest.raises(RecipeError, match=r"base_model: missing; merge_method 'ramplus_tl'"):
        parse_recipe(data)


def test_parameters_may_vary_by_tensor_as_in_mergekit():
    r = parse_recipe(recipe("ramplus_tl", r=[{"filter": "mlp", "value": 0.5}, {"value": 0.1}], epsilon=0.0))
    assert r.tensor_param("r", "model.layers.0.mlp.up_proj.weight") == 0.5
    assert r.tensor_param("r", "model.layers.0.self_attn.q_proj.weight") == 0.1
    assert r.tensor_param("alpha", "x") == 0.2 and r.tensor_param("epsilon", "x") == 0.0


def test_exponent_numbers_in_a_yaml_gradient_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-5 (no dot) as a string; mergekit takes it as a number, in a gradient too
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: ramplus_tl\nbase_model: org/base\nmodels:\n  - model: org/a\n"
                    "parameters:\n  epsilon: [1e-5, 5e-3]\n  r: [{filter: mlp, value: [1e-1, 2E-1]}, {value: 0.1}]\n")
    r = load_recipe(path)
    assert r.tensor_param("epsilon", "model.layers.0.x", 0.0) == pytest.approx(1e-5)
    assert r.tensor_param("epsilon", "model.layers.1.x", 1.0) == pytest.approx(5e-3)
    assert r.tensor_param("r", "model.layers.1.mlp.x", 1.0) == pytest.approx(0.2)
    path.write_text("merge_method: ram\nbase_model: org/base\nmodels:\n  - model: org/a\nparameters:\n  epsilon: [1e-5, small]\n")
    with pytest.raises(RecipeError, match=r"parameters.epsilon: got \['1e-5', 'small'\]; expected a number or a gradient"):
        load_recipe(path)


def _sparse_finetune(base: Path, finetuned: Path, folder: Path, keep: float, seed: int) -> Path:
    """`finetuned` with only a seeded fraction `keep` of its changes to `base`, so that some
    entries are changed by one model, some by both and some by none."""
    gen = torch.Generator().manual_seed(seed)
    base_state, state = load_base_state(base), load_base_state(finetuned)
    out = {}
    for name, w in state.items():
        if w.is_floating_point():
            mask = torch.rand(w.shape, generator=gen) < keep
            out[name] = torch.where(mask, w, base_state[name])
        else:
            out[name] = w
    return write_checkpoint(folder, out, base / "config.json")


def test_merge_of_tiny_llamas_equals_the_function_on_every_tensor(families, tmp_path):
    llama = families["llama"]
    a = _sparse_finetune(llama.base, llama.finetuned[0], tmp_path / "a", 0.5, seed=1)
    b = _sparse_finetune(llama.base, llama.finetuned[1], tmp_path / "b", 0.3, seed=2)
    parameters = {"r": [{"filter": "mlp", "value": 0.5}, {"value": 0.1}], "alpha": 1.0}
    data = {"merge_method": "ramplus_tl", "base_model": str(llama.base), "dtype": "float32",
            "models": [{"model": str(a)}, {"model": str(b)}], "parameters": parameters}
    result = hfmerge.merge(parse_recipe(data), hfmerge.RunOptions(output=tmp_path / "out", progress=False))
    merged = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_file(f))
    base_state, sa, sb = load_base_state(llama.base), load_base_state(a), load_base_state(b)
    checked = 0
    for name, w in base_state.items():
        if not w.is_floating_point() or name not in merged:
            continue
        r = 0.5 if "mlp" in name else 0.1
        expected = run("ramplus_tl", w.float(), [sa[name].float(), sb[name].float()], r=r, alpha=1.0)
        assert torch.equal(merged[name], expected), name
        checked += 1
    assert checked >= 10
    # the merge really rescaled something: an mlp weight differs from plain RAM
    name = next(n for n in merged if "mlp" in n and n.endswith("weight"))
    assert not torch.equal(merged[name], run("ram", base_state[name].float(), [sa[name].float(), sb[name].float()]))
    assert result.output == tmp_path / "out"
