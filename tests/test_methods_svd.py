"""TSV-Merge, Iso-C and Iso-CTS: hand-computed cases, recipe checks, and merges of tiny llama models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.methods import METHODS
from hfmerge.methods.iso_cts import subspace_sizes
from hfmerge.recipe import parse_recipe
from hfmerge.testing import load_base_state

t = torch.tensor


def run(name, base, tensors, **params):
    full = {p.name: p.default for p in METHODS[name].params}
    full.update({p.name: [p.default] * len(tensors) for p in METHODS[name].per_model})
    full.update(params)
    return METHODS[name].func(base, tensors, **full)


def rotation(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def svdvals(x):
    return torch.linalg.svdvals(x.double())


def polar64(a):
    """The nearest orthonormal-column matrix by A (AᵀA)^(-1/2), a different route than an SVD."""
    a = a.double()
    evals, evecs = torch.linalg.eigh(a.T @ a)
    return a @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


# ---------------------------------------------------------------------------------------- TSV


def test_tsv_keeps_each_tasks_top_directions_when_the_tasks_are_orthogonal():
    # 6 x 6, two models: each keeps its top 3 singular triplets. τ_a's fourth (1.0) is dropped; the
    # kept directions of both are orthonormal already, so the decorrelation changes nothing.
    p, q = rotation(6, 1), rotation(6, 2)
    base = torch.randn(6, 6, generator=torch.Generator().manual_seed(3))
    tau_a = p @ torch.diag(t([5.0, 4.0, 3.0, 1.0, 0.0, 0.0])) @ q.T
    tau_b = p @ torch.diag(t([0.0, 0.0, 0.0, 2.0, 1.5, 0.5])) @ q.T
    expected = p @ torch.diag(t([5.0, 4.0, 3.0, 2.0, 1.5, 0.5])) @ q.T
    out = run("tsv_merge", base, [base + tau_a, base + tau_b])
    assert torch.allclose(out, base + expected, atol=1e-5)
    out = run("tsv_merge", base, [base + tau_a, base + tau_b], alpha=0.5)
    assert torch.allclose(out, base + 0.5 * expected, atol=1e-5)


def test_tsv_orthogonalises_the_concatenated_singular_vectors():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(8, 5, generator=gen)
    taus = [torch.randn(8, 5, generator=gen) for _ in range(2)]
    k = 5 // 2
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].T)
    u_perp, v_perp = polar64(torch.cat(us, 1)), polar64(torch.cat(vs, 1))
    expected = u_perp @ torch.diag(torch.cat(ss)) @ v_perp.T
    out = run("tsv_merge", base, [base + x for x in taus], alpha=1.5)
    assert torch.allclose(out.double(), base.double() + 1.5 * expected, atol=2e-5)
    # the singular values of the update are not those of a plain sum of the truncations
    plain = sum(u[:, :k] @ torch.diag(s) @ v.T for u, s, v in zip(us, ss, vs))
    assert not torch.allclose(out.double() - base.double(), 1.5 * plain, atol=1e-3)


def test_tsv_of_one_model_is_that_model_and_weights_scale_the_task_vectors():
    gen = torch.Generator().manual_seed(6)
    base, tau = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    assert torch.allclose(run("tsv_merge", base, [base + tau]), base + tau, atol=1e-5)
    assert torch.allclose(run("tsv_merge", base, [base + tau], weight=[0.5], alpha=2.0), base + tau, atol=1e-5)
    # a model of weight 0 contributes nothing: the other keeps its top ⌊4 / 2⌋ = 2 triplets
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    top2 = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
    other = base + torch.randn(4, 6, generator=gen)
    assert torch.allclose(run("tsv_merge", base, [base + tau, other], weight=[1.0, 0.0]), base + top2, atol=1e-5)


def test_tsv_averages_vectors_and_matrices_too_small_to_split():
    base = t([1.0, 2.0])
    models = [t([3.0, 2.0]), t([1.0, 6.0])]  # τ = [2, 0], [0, 4]
    assert torch.allclose(run("tsv_merge", base, models, alpha=2.0), t([3.0, 6.0]))  # 1 + 2·1, 2 + 2·2
    assert torch.allclose(run("tsv_merge", base, models, weight=[1.0, 0.5]), t([2.0, 3.0]))
    # a 1 x 3 matrix has one direction for two models: the mean of the task vectors, as for a vector
    row = torch.zeros(1, 3)
    assert torch.allclose(run("tsv_merge", row, [t([[2.0, 0.0, 0.0]]), t([[0.0, 4.0, 0.0]])]), t([[1.0, 2.0, 0.0]]))


# -------------------------------------------------------------------------------------- Iso-C


def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    base = torch.ones(2, 2)
    # Δ = diag(3, 1): mean singular value 2, singular vectors e1, e2
    out = run("iso_c", base, [base + t([[3.0, 0.0], [0.0, 0.0]]), base + t([[0.0, 0.0], [0.0, 1.0]])])
    assert torch.allclose(out, base + 2.0 * torch.eye(2))
    out = run("iso_c", base, [base + t([[3.0, 0.0], [0.0, 0.0]]), base + t([[0.0, 0.0], [0.0, 1.0]])], alpha=0.5)
    assert torch.allclose(out, base + torch.eye(2))


def test_iso_c_keeps_the_singular_vectors_of_the_sum():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(5, 7, generator=gen)
    models = [base + torch.randn(5, 7, generator=gen) for _ in range(3)]
    total = sum(m - base for m in models)
    mean_sigma = float(svdvals(total).mean())
    update = run("iso_c", base, models, alpha=1.3) - base
    assert torch.allclose(svdvals(update), torch.full((5,), 1.3 * mean_sigma, dtype=torch.float64), atol=1e-4)
    # the same left and right singular subspaces, direction by direction: U diag(σ̄) Vᵀ
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    assert torch.allclose(update.double(), 1.3 * mean_sigma * (u @ vh), atol=1e-4)
    # per-model weights scale the task vectors before the sum
    weighted = run("iso_c", base, models, weight=[1.0, 2.0, 0.0])
    assert torch.allclose(weighted, run("iso_c", base, [models[0], base + 2 * (models[1] - base)]), atol=1e-5)


def test_iso_c_averages_non_matrices():
    assert torch.allclose(run("iso_c", torch.zeros(3), [t([3.0, 0.0, 1.0]), t([1.0, 2.0, 1.0])], alpha=2.0), t([4.0, 2.0, 2.0]))
    assert torch.allclose(run("iso_c", t(1.0), [t(2.0), t(4.0)]), t(3.0))


def test_iso_c_of_a_rank_deficient_sum_depends_only_on_its_inputs():
    # Δ = diag(2, 0): σ̄ = 1, and the null direction (whose vectors are arbitrary) is left out
    base = torch.zeros(2, 2)
    out = run("iso_c", base, [t([[1.0, 0.0], [0.0, 0.0]]), t([[1.0, 0.0], [0.0, 0.0]])])
    assert torch.allclose(out, t([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(run("iso_c", base, [base, base]), base)


# ------------------------------------------------------------------------------------ Iso-CTS


def test_subspace_sizes_split_the_directions_as_the_reference_does():
    assert subspace_sizes(768, 8, 0.8) == (616, 19)  # int(614.4) = 614; round(154 / 8) = 19 per task
    assert subspace_sizes(10, 3, 0.8) == (7, 1)
    assert subspace_sizes(4, 2, 0.5) == (2, 1)
    assert subspace_sizes(4, 2, 1.0) == (4, 0)
    assert subspace_sizes(6, 4, 0.5) == (2, 1)  # int(3) = 3 common; round(3 / 4) = 1 → 4 task directions
    assert subspace_sizes(6, 4, 0.8) == (6, 0)  # round(2 / 4) = 0: no task-specific block
    assert subspace_sizes(3, 2, 0.0) == (1, 1)  # the reference asks for 4 task directions of 3 here
    assert subspace_sizes(5, 2, 0.0) == (1, 2)  # round(2.5) = 2 (halves to even)


def test_iso_cts_adds_each_tasks_own_top_direction_to_the_common_subspace():
    # 4 x 4, two models, fraction 0.5: 2 common directions (e1, e2 of Δ = diag(4, 2, 1.3, 1.1)) and one
    # per task, from the task vector with the common part removed: τ_a → e3 (σ 1), τ_b → e4 (σ 0.8).
    # σ̄ = (4 + 2 + 1 + 0.8) / 4 = 1.95 on all four directions (Iso-C would take 2.1).
    p, q = rotation(4, 11), rotation(4, 12)
    base = torch.randn(4, 4, generator=torch.Generator().manual_seed(13))
    tau_a = p @ torch.diag(t([4.0, 0.0, 1.0, 0.3])) @ q.T
    tau_b = p @ torch.diag(t([0.0, 2.0, 0.3, 0.8])) @ q.T
    models = [base + tau_a, base + tau_b]
    out = run("iso_cts", base, models, common_space_fraction=0.5)
    assert torch.allclose(out, base + 1.95 * (p @ q.T), atol=1e-5)
    assert torch.allclose(run("iso_c", base, models), base + 2.1 * (p @ q.T), atol=1e-5)
    assert torch.allclose(run("iso_cts", base, models, common_space_fraction=0.5, alpha=2.0), base + 3.9 * (p @ q.T), atol=1e-5)


def test_iso_cts_spectrum_is_isotropic_at_the_mean_of_the_kept_singular_values():
    gen = torch.Generator().manual_seed(14)
    base = torch.randn(9, 6, generator=gen)
    taus = [torch.randn(9, 6, generator=gen) for _ in range(2)]
    k, d = subspace_sizes(6, 2, 0.4)  # int(2.4) = 2 common, 2 per task
    assert (k, d) == (2, 2)
    u, s, _ = torch.linalg.svd(sum(taus).double(), full_matrices=False)
    kept = [s[:k]]
    for tau in taus:
        rest = tau.double() - u[:, :k] @ (u[:, :k].T @ tau.double())
        kept.append(svdvals(rest)[:d])
    sigma = float(torch.cat(kept).mean())
    update = run("iso_cts", base, [base + x for x in taus], common_space_fraction=0.4) - base
    assert torch.allclose(svdvals(update), torch.full((6,), sigma, dtype=torch.float64), atol=1e-4)
    # the task-specific directions make it differ from Iso-C
    assert not torch.allclose(update, run("iso_c", base, [base + x for x in taus]) - base, atol=1e-3)


def test_iso_cts_with_everything_common_or_too_few_directions_is_iso_c():
    gen = torch.Generator().manual_seed(15)
    base = torch.randn(5, 8, generator=gen)
    models = [base + torch.randn(5, 8, generator=gen) for _ in range(3)]
    expected = run("iso_c", base, models, alpha=0.7, weight=[1.0, 0.5, 2.0])
    assert torch.equal(run("iso_cts", base, models, common_space_fraction=1.0, alpha=0.7, weight=[1.0, 0.5, 2.0]), expected)
    small = torch.zeros(2, 3)  # two directions for three models: no task-specific block
    tiny = [torch.randn(2, 3, generator=gen) for _ in range(3)]
    assert torch.equal(run("iso_cts", small, tiny, common_space_fraction=0.0), run("iso_c", small, tiny))
    assert torch.allclose(run("iso_cts", torch.zeros(2), [t([1.0, 3.0]), t([3.0, 1.0])]), t([2.0, 2.0]))


# -------------------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("name", ["tsv_merge", "iso_c", "iso_cts"])
def test_inputs_are_left_unchanged_and_zero_task_vectors_give_the_base(name):
    gen = torch.Generator().manual_seed(16)
    base = torch.randn(6, 4, generator=gen)
    models = [base + torch.randn(6, 4, generator=gen) for _ in range(3)]
    copies, base_copy = [m.clone() for m in models], base.clone()
    out = run(name, base, models)
    assert out.shape == base.shape and out.dtype == torch.float32 and not torch.equal(out, base)
    assert torch.equal(base, base_copy) and all(torch.equal(m, c) for m, c in zip(models, copies))
    assert torch.equal(run(name, base, [base.clone(), base.clone()]), base)


def test_methods_are_registered_with_the_reference_defaults():
    assert {p.name: p.default for p in METHODS["tsv_merge"].params} == {"alpha": 1.0}
    assert {p.name: p.default for p in METHODS["iso_c"].params} == {"alpha": 1.0}
    assert {p.name: p.default for p in METHODS["iso_cts"].params} == {"alpha": 1.0, "common_space_fraction": 0.8}
    for name in ("tsv_merge", "iso_c", "iso_cts"):
        method = METHODS[name]
        assert method.needs_base and not method.base_optional
        assert [(p.name, p.default) for p in method.per_model] == [("weight", 1.0)]
    assert METHODS["tsv_merge"].paper == "https://arxiv.org/abs/2412.00081"
    assert METHODS["iso_c"].paper == METHODS["iso_cts"].paper == "https://arxiv.org/abs/2502.04959"


def recipe(method, **parameters):
    return {"merge_method": method, "base_model": "org/base", "models": [{"model": "org/a"}, {"model": "org/b"}], "parameters": parameters}


@pytest.mark.parametrize(("method", "key", "value", "message"), [
    ("iso_cts", "common_space_fraction", 1.5, r"parameters.common_space_fraction: got 1.5; expected a number in \[0.0, 1.0\]"),
    ("iso_cts", "common_space_fraction", -0.1, r"parameters.common_space_fraction: got -0.1; expected a number in \[0.0, 1.0\]"),
    ("tsv_merge", "alpha", -1.0, r"parameters.alpha: got -1.0; expected a number in \[0.0, 10.0\]"),
    ("iso_c", "alpha", "big", r"parameters.alpha: got 'big'; expected a number in \[0.0, 10.0\]"),
    ("iso_cts", "common_fraction", 0.5, r"parameters.common_fraction: not a parameter of 'iso_cts' \(did you mean 'common_space_fraction'\?\)"),
])
def test_bad_settings_are_refused_with_the_key_path(method, key, value, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe(method, **{key: value}))


def test_iso_cts_settings_are_ignored_by_iso_c_with_a_warning():
    warnings = parse_recipe(recipe("iso_c", common_space_fraction=0.5)).warnings
    assert any("parameters.common_space_fraction" in w and "ignored" in w for w in warnings)


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts"])
def test_a_base_model_is_required(method):
    data = recipe(method)
    del data["base_model"]
    with pytest.raises(RecipeError, match=rf"base_model: missing; merge_method '{method}'"):
        parse_recipe(data)


@pytest.mark.parametrize(("method", "parameters"), [
    ("tsv_merge", {"alpha": 0.8}),
    ("iso_c", {"alpha": 1.2}),
    ("iso_cts", {"alpha": 1.1, "common_space_fraction": 0.5}),
])
def test_merge_of_tiny_llamas_equals_the_function_on_every_tensor(families, tmp_path, method, parameters):
    llama = families["llama"]
    weights = [1.0, 0.6, 1.4]
    data = {"merge_method": method, "base_model": str(llama.base), "dtype": "float32", "parameters": parameters,
            "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(llama.finetuned, weights)]}
    hfmerge.merge(parse_recipe(data), hfmerge.RunOptions(output=tmp_path / "out", progress=False))
    merged = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        merged.update(load_file(f))
    base_state = load_base_state(llama.base)
    states = [load_base_state(p) for p in llama.finetuned]
    matrices = vectors = 0
    for name, w in base_state.items():
        if not w.is_floating_point() or name not in merged:
            continue
        expected = run(method, w.float(), [s[name].float() for s in states], weight=weights, **parameters)
        assert torch.equal(merged[name], expected), name
        if w.dim() == 2:
            matrices += 1
            mean = w.float() + parameters["alpha"] * sum(wt * (s[name].float() - w.float()) for wt, s in zip(weights, states)) / 3
            assert not torch.allclose(merged[name], mean, atol=1e-4), name  # the decomposition ran
        else:
            vectors += 1
    assert matrices >= 10 and vectors >= 3
