"""DELLA, Model Breadcrumbs and SCE: hand-computed small cases, recipe checks, and end-to-end merges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import RecipeError
from hfmerge.merging import dare_seed
from hfmerge.methods import METHODS
from hfmerge.methods.della import keep_probabilities, magprune_
from hfmerge.recipe import parse_recipe
from hfmerge.testing import load_base_state

t = torch.tensor


def run(name, base, tensors, **params):
    method = METHODS[name]
    full = {p.name: p.default for p in method.params}
    full.update(method.fixed)
    for p in method.per_model:
        full[p.name] = [p.default] * len(tensors)
    full.update(params)
    return method.func(base, tensors, **full)


# -- Model Breadcrumbs -------------------------------------------------------------------


TAU = t([0.3, -0.9, 0.1, 0.7, -0.5, 1.0, -0.2, 0.6, -0.8, 0.4])  # magnitudes 0.1 .. 1.0, each once


def test_breadcrumbs_keeps_the_band_below_the_outliers():
    base = torch.ones(10)
    # N = 10: keep int(0.5 N) = 5, drop the int(0.2 N) = 2 largest (1.0, 0.9) and the 3 smallest.
    out = run("breadcrumbs", base, [base + TAU], density=[0.5], gamma=[0.2])
    kept = t([0.0, 0.0, 0.0, 0.7, -0.5, 0.0, 0.0, 0.6, -0.8, 0.4])
    torch.testing.assert_close(out, base + kept)
    # gamma 0 keeps the top 5 (plain magnitude pruning)
    out = run("breadcrumbs", base, [base + TAU], density=[0.5], gamma=[0.0])
    torch.testing.assert_close(out, base + t([0.0, -0.9, 0.0, 0.7, 0.0, 1.0, 0.0, 0.6, -0.8, 0.0]))


def test_breadcrumbs_removes_fewer_outliers_when_density_and_gamma_do_not_fit():
    base = torch.zeros(10)
    # keep 9, remove 2 outliers: impossible, so only the largest goes (the kept count wins)
    out = run("breadcrumbs", base, [TAU], density=[0.9], gamma=[0.2])
    torch.testing.assert_close(out, torch.where(TAU.abs() == 1.0, 0.0, TAU))


def test_breadcrumbs_density_one_ignores_gamma_and_a_tiny_density_keeps_nothing():
    base = torch.zeros(10)
    torch.testing.assert_close(run("breadcrumbs", base, [TAU], density=[1.0], gamma=[0.5]), TAU)
    assert torch.equal(run("breadcrumbs", base, [TAU], density=[0.05], gamma=[0.0]), torch.zeros(10))  # int(0.5) = 0


def test_breadcrumbs_breaks_magnitude_ties_by_position():
    base = torch.zeros(4)
    # four equal magnitudes: keep 2, remove 1 outlier, so ranks 1 and 2 stay: positions 1 and 2
    out = run("breadcrumbs", base, [t([1.0, -1.0, 1.0, -1.0])], density=[0.5], gamma=[0.25])
    assert torch.equal(out, t([0.0, -1.0, 1.0, 0.0]))


def test_breadcrumbs_band_equals_a_stable_sort_on_many_ties():
    """The band is found by selection, not a sort; it must keep exactly the entries a stable
    sort of |δ| puts in the band, also where many magnitudes are equal (integer deltas, zeros)."""
    from hfmerge.methods.breadcrumbs import band_mask

    gen = torch.Generator().manual_seed(0)
    for trial in range(400):
        shape = (int(torch.randint(1, 12, (1,), generator=gen)), int(torch.randint(1, 12, (1,), generator=gen)))
        delta = torch.randint(-3, 4, shape, generator=gen).float() if trial % 2 else torch.randn(shape, generator=gen)
        delta = delta.to((torch.float32, torch.float64, torch.bfloat16)[trial % 3])
        density, gamma = float(torch.rand(1, generator=gen)), 0.5 * float(torch.rand(1, generator=gen))
        n = delta.numel()
        kept, start = int(density * n), max(0, n - int(density * n) - int(gamma * n))
        expected = torch.zeros(n, dtype=delta.dtype)
        expected[torch.sort(delta.abs().reshape(-1), stable=True).indices[start:start + kept]] = 1
        assert torch.equal(band_mask(delta, density, gamma), expected.view(shape)), (trial, delta, density, gamma)


def test_breadcrumbs_rescale_keeps_the_l1_norm_of_each_task_vector():
    base = torch.zeros(10)
    out = run("breadcrumbs", base, [TAU], density=[0.5], gamma=[0.2], rescale=True)
    scale = TAU.abs().sum() / t([0.7, 0.5, 0.6, 0.8, 0.4]).sum()  # 5.5 / 3.0
    torch.testing.assert_close(out, scale * t([0.0, 0.0, 0.0, 0.7, -0.5, 0.0, 0.0, 0.6, -0.8, 0.4]))
    torch.testing.assert_close(out.abs().sum(), TAU.abs().sum())


def test_breadcrumbs_ties_elects_signs_on_the_weighted_masked_vectors():
    base = torch.zeros(4)
    a, b = t([1.0, -2.0, 3.0, 0.5]), t([-3.0, -1.0, 2.0, -0.25])
    # density 1: nothing masked; weights 1 and 0.5 give weighted sums -0.5, -2.5, 4, 0.375
    out = run("breadcrumbs_ties", base, [a, b], weight=[1.0, 0.5], density=[1.0, 1.0])
    torch.testing.assert_close(out, t([-1.5, -2.5, 4.0, 0.5]))  # agreeing weighted entries summed (normalize false)
    out = run("breadcrumbs_ties", base, [a, b], weight=[1.0, 0.5], density=[1.0, 1.0], normalize=True, **{"lambda": 2.0})
    torch.testing.assert_close(out, 2 * t([-1.5 / 0.5, -2.5 / 1.5, 4.0 / 1.5, 0.5]))
    # without consensus the weighted task vectors are simply added
    torch.testing.assert_close(run("breadcrumbs", base, [a, b], weight=[1.0, 0.5], density=[1.0, 1.0]), a + 0.5 * b)


def test_ties_rescale_restores_each_trimmed_task_vectors_l1_norm():
    base = torch.zeros(4)
    a = t([0.1, -3.0, 2.0, 0.5])  # top half: -3 and 2; L1 5.6 before, 5 after
    torch.testing.assert_close(run("ties", base, [a], density=[0.5], rescale=True), 1.12 * t([0.0, -3.0, 2.0, 0.0]))
    assert torch.equal(run("ties", base, [a], density=[0.5]), t([0.0, -3.0, 2.0, 0.0]))  # off by default


# -- SCE -----------------------------------------------------------------------------------


def test_sce_weights_by_mean_square_and_erases_minority_signs():
    base = torch.zeros(4)
    a, b = t([2.0, -1.0, 0.0, 1.0]), t([1.0, 1.0, -3.0, 0.0])
    # η ∝ mean squares 1.5 and 2.75; sums 3, 0 (elects +), -3, 1
    expected = t([(1.5 * 2 + 2.75 * 1) / 4.25, 1.0, -3.0, 1.0])
    torch.testing.assert_close(run("sce", base, [a, b]), expected)
    torch.testing.assert_close(run("sce", base + 1, [a + 1, b + 1]), expected + 1)


def test_sce_selects_the_entries_of_largest_variance():
    base = torch.zeros(4)
    a, b = t([2.0, -1.0, 0.0, 1.0]), t([1.0, 1.0, -3.0, 0.0])
    # variances across the two: 0.25, 1, 2.25, 0.25; keep int(0.75 · 4) = 3: entries 2, 1, then 0
    # (entries 0 and 3 tie; the earlier position is taken). Then η ∝ 5/4 and 11/4.
    torch.testing.assert_close(run("sce", base, [a, b], select_topk=0.75), t([(5 * 2 + 11 * 1) / 16, 1.0, -3.0, 0.0]))
    # keep int(0.5 · 4) = 2: entries 2 and 1
    torch.testing.assert_close(run("sce", base, [a, b], select_topk=0.5), t([0.0, 1.0, -3.0, 0.0]))
    assert torch.equal(run("sce", base, [a, b], select_topk=0.0), base)


def test_sce_selection_equals_a_descending_stable_sort_on_many_ties():
    from hfmerge.methods.sce import select_mask

    gen = torch.Generator().manual_seed(1)
    for trial in range(300):
        shape = (int(torch.randint(1, 10, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen)))
        models = int(torch.randint(2, 4, (1,), generator=gen))
        deltas = torch.randint(-2, 3, (models, *shape), generator=gen).float() if trial % 2 else torch.randn(models, *shape, generator=gen)
        deltas = deltas.to((torch.float32, torch.float64)[trial % 2])
        fraction = float(torch.rand(1, generator=gen))
        var = deltas.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * fraction)
        expected = torch.zeros(var.numel(), dtype=var.dtype)
        expected[torch.sort(var.reshape(-1), descending=True, stable=True).indices[:k]] = 1
        assert torch.equal(select_mask(deltas, fraction), expected.view(shape)), (trial, deltas, fraction)


def test_sce_counts_only_entries_whose_variance_is_not_zero():
    base = torch.zeros(6)
    a = t([5.0, 5.0, 5.0, 1.0, 2.0, 0.0])
    b = t([5.0, 5.0, 5.0, 0.0, 0.0, 3.0])
    # three entries have zero variance, so int(0.5 · 3) = 1 entry is kept: the last (variance 2.25)
    torch.testing.assert_close(run("sce", base, [a, b], select_topk=0.5), t([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]))


def test_sce_is_scale_invariant_even_for_tiny_task_vectors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    taus = [torch.randn(6, 5, generator=gen) * s for s in (1.0, 0.3, 3.0)]
    zero = torch.zeros(6, 5)
    unit = run("sce", zero, taus, select_topk=0.6)
    tiny = run("sce", zero, [1e-4 * x for x in taus], select_topk=0.6)
    # mean squares of order 1e-8 still weight the models (mergekit falls back to 1/M below a sum of 1e-6)
    torch.testing.assert_close(tiny, 1e-4 * unit, rtol=1e-5, atol=0.0)
    shifted = run("sce", base, [base + x for x in taus], select_topk=0.6)
    torch.testing.assert_close(shifted, base + unit, rtol=1e-5, atol=1e-5)


# -- DELLA ---------------------------------------------------------------------------------


def test_della_keep_probabilities_rise_linearly_with_magnitude_rank():
    row = t([0.3, -0.05, 2.0, -1.0, 0.5])  # ranks 1, 0, 4, 3, 2
    probs = keep_probabilities(row, 0.5, 0.2)
    torch.testing.assert_close(probs, 0.3 + 0.4 * t([1.0, 0.0, 4.0, 3.0, 2.0]) / 4)
    # a matrix is ranked row by row
    probs = keep_probabilities(torch.stack([row, -row.flip(0)]), 0.5, 0.2)
    torch.testing.assert_close(probs[1], 0.3 + 0.4 * t([2.0, 3.0, 4.0, 0.0, 1.0]) / 4)
    # equal magnitudes rank by position; a row of one entry gets the density
    torch.testing.assert_close(keep_probabilities(t([1.0, -1.0, 1.0]), 0.5, 0.2), t([0.3, 0.5, 0.7]))
    torch.testing.assert_close(keep_probabilities(t([[4.0], [-2.0]]), 0.4, 0.1), t([[0.4], [0.4]]))


def test_della_keeps_by_rank_and_preserves_the_expectation():
    tau = t([0.8, -0.1, 0.4, -1.6, 0.2, 3.2, -0.05, 1.0])
    p = keep_probabilities(tau, 0.5, 0.3)  # from 0.2 (smallest) to 0.8 (largest)
    draws = 20000
    rows = tau.expand(draws, 8)  # each row is ranked alone: one independent draw per row
    pruned = magprune_(rows.clone(), 0.5, 0.3, torch.Generator().manual_seed(11))
    kept = pruned != 0
    assert (kept.float().mean(dim=0) - p).abs().max() < 0.03  # binomial std at most 0.0036
    # survivors divided by their own p: unbiased
    torch.testing.assert_close(pruned[kept], (rows / p)[kept])
    assert ((pruned.mean(dim=0) - tau) / tau).abs().max() < 0.08  # relative std at most 0.015
    plain = magprune_(tau.expand(draws, 8).clone(), 0.5, 0.3, torch.Generator().manual_seed(11), rescale=False)
    assert ((plain.mean(dim=0) - p * tau) / tau).abs().max() < 0.03


def test_della_linear_is_task_arithmetic_in_expectation_and_della_is_seeded():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(1, 10, generator=gen)
    models = [base + torch.randn(1, 10, generator=gen) for _ in range(2)]
    draws = 40000
    stacked_base, stacked = base.expand(draws, 10), [m.expand(draws, 10) for m in models]
    gens = [torch.Generator().manual_seed(dare_seed(0, "w", i)) for i in range(2)]
    out = run("della_linear", stacked_base, stacked, weight=[0.7, 0.5], density=[0.4, 0.6], epsilon=[0.1, 0.3], generators=gens)
    expected = run("task_arithmetic", base, models, weight=[0.7, 0.5])
    assert (out.mean(dim=0) - expected[0]).abs().max() < 0.03  # per-entry std of the mean at most 0.005

    def seeded(seed):
        g = [torch.Generator().manual_seed(dare_seed(seed, "w", i)) for i in range(2)]
        return run("della", base, models, density=[0.5, 0.5], generators=g)

    assert torch.equal(seeded(1), seeded(1)) and not torch.equal(seeded(1), seeded(2))


def test_della_density_one_keeps_everything_and_a_bad_window_is_refused():
    base = torch.zeros(5)
    a, b = TAU[:5], -TAU[5:]
    # density 1: plain TIES election with the disjoint mean (della) or a sum (della_linear)
    assert torch.equal(run("della", base, [a, b], density=[1.0, 1.0], epsilon=[0.9, 0.9]), run("ties", base, [a, b]))
    assert torch.equal(run("della_linear", base, [a, b], density=[1.0, 1.0]), a + b)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        magprune_(a.clone(), 0.66, 1.35, None)
    with pytest.raises(ValueError, match="below 0.15"):
        magprune_(a.clone(), 0.85, 0.15, None)  # 0.85 + 0.15 = 1 is refused too, as in mergekit


# -- recipes -------------------------------------------------------------------------------


def _recipe(method, base, models, per_model=None, **parameters):
    models = [{"model": str(m), "parameters": dict(p)} for m, p in zip(models, per_model or [{}] * len(models))]
    return {"merge_method": method, "base_model": str(base), "models": models, "parameters": parameters}


def test_della_refuses_density_and_epsilon_that_leave_zero_one(tmp_path):
    base, a, b = tmp_path / "base", tmp_path / "a", tmp_path / "b"
    with pytest.raises(RecipeError, match=r"parameters\.epsilon: density 0\.66 with epsilon 1\.35"):
        parse_recipe(_recipe("della", base, [a, b], density=0.66, epsilon=1.35))
    with pytest.raises(RecipeError, match=r"models\[1\]\.parameters\.epsilon: .*below 0\.2"):
        parse_recipe(_recipe("della_linear", base, [a, b], [{"density": 0.5}, {"density": 0.8, "epsilon": 0.25}]))
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.density: density 0\.1 with epsilon 0\.15"):
        parse_recipe(_recipe("della", base, [a, b], [{"density": 0.1}, {}]))  # the default epsilon 0.15
    fine = parse_recipe(_recipe("della", base, [a, b], [{"density": 1.0, "epsilon": 0.5}, {"density": 0.3, "epsilon": 0.25}]))
    assert fine.method.name == "della" and not fine.warnings
    unset = parse_recipe(_recipe("della", base, [a, b]))
    assert any("without density" in w for w in unset.warnings)


def test_sparsifying_methods_keep_mergekits_defaults_under_mergekits_names():
    defaults = {name: {p.name: p.default for p in METHODS[name].params + METHODS[name].per_model}
                for name in ("della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce")}
    assert defaults["della"]["epsilon"] == 0.15 and defaults["della"]["rescale"] is True and defaults["della"]["density"] == 1.0
    assert defaults["della_linear"]["normalize"] is False and METHODS["della_linear"].fixed == {"combine": "task_arithmetic"}
    assert defaults["breadcrumbs"]["gamma"] == 0.01 and defaults["breadcrumbs"]["rescale"] is False
    assert defaults["breadcrumbs_ties"]["normalize"] is False and METHODS["breadcrumbs_ties"].fixed == {"combine": "ties"}
    assert defaults["sce"] == {"select_topk": 1.0}
    assert METHODS["della"].random and not METHODS["breadcrumbs"].random and not METHODS["sce"].random


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_della_checks_filtered_epsilon_per_tensor_before_merging(families, tmp_path):
    llama = families["llama"]
    epsilon = [{"filter": "mlp", "value": 0.6}, {"value": 0.1}]
    recipe = _write(tmp_path / "r.yaml", _recipe("della", llama.base, llama.finetuned[:2], [{"epsilon": epsilon}, {}], density=0.5))
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.epsilon: on tensor '[^']*mlp[^']*' \(models\[0\]\), density 0\.5 with epsilon 0\.6"):
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# -- end to end ----------------------------------------------------------------------------


def test_breadcrumbs_ties_merge_of_tiny_llamas_equals_the_function(families, tmp_path):
    llama = families["llama"]
    per_model = [{"weight": 0.7, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.4, "gamma": 0.1}]
    recipe = _write(tmp_path / "r.yaml", _recipe("breadcrumbs_ties", llama.base, llama.finetuned[:2], per_model, normalize=True))
    result = hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    base, a, b = (load_base_state(p) for p in (llama.base, *llama.finetuned[:2]))
    got = load_base_state(result.output)
    assert set(got) == set(base)
    differs = 0
    for name, theta in base.items():
        assert torch.isfinite(got[name]).all()
        expected = run("breadcrumbs_ties", theta.float(), [a[name].float(), b[name].float()], weight=[0.7, 0.5], density=[0.6, 0.4],
                       gamma=[0.05, 0.1], normalize=True).to(theta.dtype)
        assert torch.equal(got[name], expected), name
        differs += not torch.equal(got[name], theta)
    assert differs == len(base)


def test_della_merge_of_tiny_llamas_is_finite_seeded_and_moves_every_tensor(families, tmp_path):
    llama = families["llama"]
    data = _recipe("della", llama.base, llama.finetuned[:3], [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.8}],
                   density=0.5, epsilon=0.2, seed=7)
    first = hfmerge.merge(_write(tmp_path / "r.yaml", data), output=tmp_path / "one", progress=False)
    again = hfmerge.merge(_write(tmp_path / "r.yaml", data), output=tmp_path / "two", progress=False)
    base = load_base_state(llama.base)
    one, two = load_base_state(first.output), load_base_state(again.output)
    assert set(one) == set(base)
    for name, theta in base.items():
        assert torch.isfinite(one[name]).all()
        assert not torch.equal(one[name], theta), name
        assert torch.equal(one[name], two[name]), name  # the seed fixes the masks
    # each model keeps an entry with probability 0.3 to 0.7 (0.5 on average), so about 1/8 of
    # the entries lose all three task vectors and keep the base value
    big = max(base, key=lambda n: base[n].numel())
    untouched = (one[big] == base[big]).float().mean()
    assert 0.02 < untouched < 0.4  # all three dropped: 1/8 on average


def test_sce_merge_of_tiny_llamas_follows_a_select_topk_gradient(families, tmp_path):
    llama = families["llama"]
    data = _recipe("sce", llama.base, llama.finetuned[:3], select_topk=[0.2, 0.9])
    result = hfmerge.merge(_write(tmp_path / "r.yaml", data), output=tmp_path / "out", progress=False)
    base, *models = (load_base_state(p) for p in (llama.base, *llama.finetuned[:3]))
    got = load_base_state(result.output)
    layers = len({n.split(".")[2] for n in base if n.startswith("model.layers.")})
    assert layers > 1
    for name, theta in base.items():
        # mergekit's gradient: layer i of L at t = i / (L - 1); tensors outside the layers at t = 0
        t_ = int(name.split(".")[2]) / (layers - 1) if name.startswith("model.layers.") else 0.0
        expected = run("sce", theta, [m[name] for m in models], select_topk=(1 - t_) * 0.2 + t_ * 0.9)
        assert torch.equal(got[name], expected), name
        assert not torch.equal(got[name], theta), name
