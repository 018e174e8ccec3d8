"""Each method against hand-computed results on small tensors."""

from __future__ import annotations

import pytest
import torch

from hfmerge.methods import METHODS
from hfmerge.merging import dare_seed

t = torch.tensor


def run(name, base, tensors, **params):
    method = METHODS[name]
    full = {p.name: p.default for p in method.params}
    full.update(method.fixed)
    m = len(tensors)
    for p in method.per_model:
        full[p.name] = [p.default] * m
    full.update(params)
    return method.func(base, tensors, **full)


def test_average_is_the_mean_and_weights_give_a_weighted_mean():
    a, b = t([1.0, 3.0]), t([3.0, 5.0])
    assert torch.equal(run("average", None, [a, b]), t([2.0, 4.0]))
    assert torch.allclose(run("linear", None, [a, b], weight=[3.0, 1.0]), t([1.5, 3.5]))


def test_task_arithmetic_at_one_over_m_equals_averaging():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=gen)
    models = [base + torch.randn(4, 5, generator=gen) for _ in range(3)]
    ta = run("task_arithmetic", base, models, **{"lambda": 1 / 3})
    assert torch.allclose(ta, run("average", None, models), atol=1e-6)


def test_general_task_arithmetic_uses_one_coefficient_per_model():
    base = t([1.0, 1.0])
    a, b = t([2.0, 3.0]), t([4.0, 0.0])  # τ_a = [1, 2], τ_b = [3, -1]
    out = run("task_arithmetic", base, [a, b], weight=[0.5, 2.0], **{"lambda": 1.0})
    assert torch.allclose(out, t([1 + 0.5 + 6.0, 1 + 1.0 - 2.0]))
    scaled = run("task_arithmetic", base, [a, b], weight=[0.5, 2.0], **{"lambda": 0.5})
    assert torch.allclose(scaled, t([1 + 0.5 * 6.5, 1 + 0.5 * -1.0]))


def test_ties_sign_election_with_ties_and_all_zero_entries():
    base = torch.zeros(5)
    tv = [t([1.0, -1.0, 0.0, 2.0, 0.5]), t([-1.0, -2.0, 0.0, 2.0, -0.2]), t([0.0, 0.0, 0.0, -1.0, -0.2])]
    # sums: [0 (tie: +), -3, 0 (all zero), 3, 0.1]; disjoint mean over entries agreeing with the sign
    out = run("ties", base, tv, density=[1.0] * 3)
    assert torch.allclose(out, t([1.0, -1.5, 0.0, 2.0, 0.5]))
    out = run("ties", base, tv, density=[1.0] * 3, **{"lambda": 2.0})
    assert torch.allclose(out, t([2.0, -3.0, 0.0, 4.0, 1.0]))


def test_ties_trims_each_task_vector_to_its_top_magnitudes():
    base = t([1.0, 1.0, 1.0, 1.0])
    a = base + t([0.1, -3.0, 2.0, 0.5])  # keep -3 and 2
    b = base + t([1.0, 0.2, -0.1, 0.3])  # keep 1 and 0.3
    out = run("ties", base, [a, b], density=[0.5, 0.5])
    assert torch.allclose(out, base + t([1.0, -3.0, 2.0, 0.3]))


def test_ties_trim_equals_a_descending_stable_sort_on_many_ties():
    from hfmerge.methods._common import trim_top_magnitude_

    assert torch.equal(trim_top_magnitude_(t([1.0, -1.0, 1.0, -1.0]), 0.5), t([1.0, -1.0, 0.0, 0.0]))  # earlier ties first
    gen = torch.Generator().manual_seed(3)
    for trial in range(300):
        shape = (int(torch.randint(1, 10, (1,), generator=gen)), int(torch.randint(1, 10, (1,), generator=gen)))
        delta = torch.randint(-3, 4, shape, generator=gen).float() if trial % 2 else torch.randn(shape, generator=gen)
        delta = delta.to((torch.float32, torch.float64, torch.bfloat16)[trial % 3])
        density = float(torch.rand(1, generator=gen))
        k = int(density * delta.numel())
        expected = torch.zeros(delta.numel(), dtype=delta.dtype)
        index = torch.sort(delta.abs().reshape(-1), descending=True, stable=True).indices[:k]
        expected[index] = delta.reshape(-1)[index]
        assert torch.equal(trim_top_magnitude_(delta.clone(), density), expected.view(shape)), (trial, delta, density)


def test_ties_whole_model_threshold_keeps_entries_at_or_above_it():
    base = torch.zeros(4)
    a = t([0.1, -3.0, 2.0, 0.5])
    out = run("ties", base, [a], density=[0.5], thresholds=[0.5])
    assert torch.allclose(out, t([0.0, -3.0, 2.0, 0.5]))


def _dare(base, models, seed, **params):
    gens = [torch.Generator().manual_seed(dare_seed(seed, "w", i)) for i in range(len(models))]
    return run("dare", base, models, generators=gens, **params)


def test_dare_is_reproducible_for_a_seed_and_changes_with_it():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(200)
    models = [base + torch.randn(200, generator=gen) for _ in range(2)]
    a = _dare(base, models, 7, density=[0.5, 0.5])
    assert torch.equal(a, _dare(base, models, 7, density=[0.5, 0.5]))
    assert not torch.equal(a, _dare(base, models, 8, density=[0.5, 0.5]))


def test_dare_drops_about_p_and_is_unbiased_in_expectation():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(50)
    models = [base + torch.randn(50, generator=gen) for _ in range(2)]
    one = _dare(base, models[:1], 0, density=[0.3])
    kept = (one - base != 0).float().mean()
    assert 0.1 < kept < 0.5  # about 30% of 50 entries survive
    # Surviving entries are rescaled by 1 / density.
    nz = (one - base) != 0
    assert torch.allclose((one - base)[nz], (models[0] - base)[nz] / 0.3, atol=1e-5)
    draws = torch.stack([_dare(base, models, s, density=[0.3, 0.3]) for s in range(3000)])
    expected = run("task_arithmetic", base, models)
    assert torch.allclose(draws.mean(dim=0), expected, atol=0.25)
    assert (draws.mean(dim=0) - expected).abs().mean() < 0.05


def test_dare_ties_combines_with_sign_election():
    base = torch.zeros(3)
    models = [t([1.0, -2.0, 3.0]), t([-3.0, -2.0, 1.0])]
    # sums -2, -4, 4 elect -, -, +; `dare` with TIES takes the disjoint mean of agreeing entries
    out = run("dare", base, models, density=[1.0, 1.0], generators=None, combine="ties")
    assert torch.allclose(out, t([-3.0, -2.0, 2.0]))
    # mergekit's dare_ties sums them unless normalize is set
    assert torch.allclose(run("dare_ties", base, models, density=[1.0, 1.0], generators=None), t([-3.0, -4.0, 4.0]))
    assert torch.allclose(run("dare_ties", base, models, density=[1.0, 1.0], generators=None, normalize=True), t([-3.0, -2.0, 2.0]))
    linear = run("dare_linear", base, models, density=[1.0, 1.0], generators=None)
    assert torch.allclose(linear, t([-2.0, -4.0, 4.0]))


def test_fisher_with_equal_fishers_equals_averaging():
    gen = torch.Generator().manual_seed(3)
    models = [torch.randn(6, generator=gen) for _ in range(3)]
    f = torch.rand(6, generator=gen) + 0.1
    out = run("fisher", None, models, importances=[f, f, f])
    assert torch.allclose(out, torch.stack(models).mean(0), atol=1e-6)


def test_fisher_with_one_dominant_fisher_returns_that_model():
    models = [t([1.0, 2.0]), t([5.0, -7.0])]
    out = run("fisher", None, models, importances=[t([1e-9, 1e-9]), t([1e3, 1e3])])
    assert torch.allclose(out, models[1], atol=1e-4)


def test_fisher_floor_applies_to_the_first_model_only_by_default():
    models = [t([1.0]), t([3.0])]
    zero = [t([0.0]), t([0.0])]
    # Both Fishers zero: the first model's is floored, so it wins.
    assert torch.allclose(run("fisher", None, models, importances=zero), t([1.0]))
    # Floor on every model: equal floored weights give the mean.
    assert torch.allclose(run("fisher", None, models, importances=zero, favor_target_model=False), t([2.0]))


def test_fisher_floor_target_first_all_or_none_where_every_fisher_is_below_it():
    models = [t([1.0, 1.0]), t([3.0, 3.0])]
    tiny = [t([1e-8, 0.0]), t([1e-7, 0.0])]
    # First model only (the default): its floored 1e-6 outweighs 1e-7, and it alone counts where both are 0.
    first = run("fisher", None, models, importances=tiny)
    assert torch.allclose(first, t([(1e-6 * 1 + 1e-7 * 3) / 1.1e-6, 1.0]))
    # Every model: equal floored weights, the mean.
    assert torch.allclose(run("fisher", None, models, importances=tiny, favor_target_model=False), t([2.0, 2.0]))
    # No floor (fisher_floor 0): the Fisher-weighted mean however small, the plain mean where all are 0.
    none = run("fisher", None, models, importances=tiny, fisher_floor=0.0)
    assert torch.allclose(none, t([(1e-8 * 1 + 1e-7 * 3) / 1.1e-7, 2.0]))


def test_fisher_normalisation_divides_coefficients_by_fisher_norms():
    models = [t([0.0]), t([4.0])]
    f = [t([1.0]), t([3.0])]
    plain = run("fisher", None, models, importances=f)
    assert torch.allclose(plain, t([3.0]))  # (0*1 + 4*3) / 4
    normed = run("fisher", None, models, importances=f, fisher_norms=[1.0, 3.0])
    assert torch.allclose(normed, t([2.0]))  # weights 1 and 1


REQUIRED_PARAMETERS = {"nearswap": {"t": 0.5}, "slerp": {"t": 0.5}}  # global parameters without a default


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_pure_and_keeps_shape(name):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 4, generator=gen)
    models = [base + torch.randn(3, 4, generator=gen) for _ in range(2)]
    if name == "slerp":  # interpolates from the base to exactly one model
        models = models[:1]
    before = [m.clone() for m in models]
    kw = {"importances": [torch.ones(3, 4), torch.ones(3, 4)]} if METHODS[name].needs_importance else {}
    if METHODS[name].importance == "gram":  # one [in, in] Gram matrix per model
        kw["importances"] = [torch.eye(4), torch.eye(4) * 2]
    kw.update(REQUIRED_PARAMETERS.get(name, {}))
    out = run(name, base, models, **kw)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(models, before))


def test_passthrough_copies_its_one_model_scaled():
    a = t([1.0, -2.0])
    assert run("passthrough", None, [a]) is a
    assert torch.equal(run("passthrough", None, [a], scale=[0.5]), t([0.5, -1.0]))
    assert torch.equal(run("passthrough", None, [a], scale=[0.0]), t([0.0, 0.0]))
