"""The fast kernels shared by the sparsifying methods give the same bits as the plain torch
operations they replace (so merges, and agreement with mergekit, do not move)."""

from __future__ import annotations

import pytest
import torch

from hfmerge.methods._common import bernoulli_mask, combine, top_k_mask, variance_over_models


def _signed_bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN, and the same sign bit on zeros."""
    return bool(torch.equal(torch.signbit(a), torch.signbit(b)) and torch.equal(a.isnan(), b.isnan())
                and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("models", [1, 2, 3, 5])
def test_variance_over_models_equals_torch_var_bit_for_bit(dtype, models):
    g = torch.Generator().manual_seed(models)
    # Magnitudes over many orders (within each dtype's range), an offset that makes the
    # float32 mean lossy, and a few ties and repeated rows.
    scale = torch.logspace(-3, 3, 257, dtype=torch.float64)
    x = (torch.randn(models, 31, 257, generator=g, dtype=torch.float64) * scale + 0.5).to(dtype)
    if models > 2:
        x[1, :5] = x[0, :5]
    expected = x.var(dim=0, unbiased=False)
    before = x.clone()
    # A small chunk, so the chunked loop and its last partial chunk are exercised.
    assert _signed_bits_equal(variance_over_models(x, chunk=1000), expected)
    assert _signed_bits_equal(variance_over_models(x), expected)
    assert variance_over_models(x).dtype == dtype and variance_over_models(x).shape == (31, 257)
    assert torch.equal(x, before)  # the input is read, never written (float64 is not copied to float64)


def test_variance_over_models_propagates_non_finite_values_as_torch_var_does():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[1, 1], x[2, 2], x[3, 2] = float("inf"), float("nan"), float("inf"), float("-inf")
    assert _signed_bits_equal(variance_over_models(x), x.var(dim=0, unbiased=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (100,), (513, 17)])
def test_bernoulli_mask_draws_what_torch_bernoulli_draws(dtype, shape):
    for p in (0.1, 0.5, 0.77):
        expected = torch.bernoulli(torch.full(shape, p, dtype=dtype), generator=torch.Generator().manual_seed(3))
        got = bernoulli_mask(p, shape, dtype, torch.Generator().manual_seed(3), "cpu")
        assert got.dtype == dtype and torch.equal(got, expected), p
    # One probability per entry (DELLA's keep probabilities).
    probs = (0.2 + 0.6 * torch.rand(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    expected = torch.bernoulli(probs, generator=torch.Generator().manual_seed(4))
    assert torch.equal(bernoulli_mask(probs, shape, dtype, torch.Generator().manual_seed(4), "cpu"), expected)
    # The generator moves on by as many draws either way: the next draw is the same too.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.bernoulli(torch.full(shape, 0.3, dtype=dtype), generator=g1)
    bernoulli_mask(0.3, shape, dtype, g2, "cpu")
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def _consensus_reference(base, deltas, weight, lambda_, normalize, elected_positive=None):
    """TIES steps 2-4 written plainly with boolean masks (the formula mergekit uses)."""
    w = torch.tensor(weight, dtype=deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    if elected_positive is None:
        elected_positive = weighted.sum(dim=0) >= 0
    agree = torch.where(elected_positive, weighted > 0, weighted < 0)
    mixed = (weighted * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return mixed * lambda_ + base


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("given", [False, True])
def test_consensus_combine_equals_the_boolean_mask_formula_bit_for_bit(normalize, given):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(40, 50, generator=g)
    deltas = torch.randn(4, 40, 50, generator=g) * 0.01
    deltas[:, ::3] = 0                              # entries no model changes
    deltas[1, 1::3] = -deltas[0, 1::3]              # exact sign ties between two models
    deltas[2, 2::5] = torch.tensor(-0.0)            # negative zeros never agree
    weight = [1.0, 0.6, 0.0, 0.8]                   # a zero weight too
    elected = (deltas.sum(dim=0) >= 0) if given else None
    expected = _consensus_reference(base, deltas.clone(), weight, 0.7, normalize, elected)
    got = combine(base, deltas.clone(), weight, lambda_=0.7, normalize=normalize, consensus=True, elected_positive=elected)
    assert _signed_bits_equal(got, expected)


def test_top_k_mask_in_a_float_dtype_is_the_boolean_mask_as_ones_and_zeros():
    values = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 2.0, 4.0])
    for k in range(0, 9):
        as_bool = top_k_mask(values, k)
        as_float = top_k_mask(values, k, dtype=torch.float32)
        assert as_bool.dtype == torch.bool and as_float.dtype == torch.float32
        assert torch.equal(as_float, as_bool.float()) and int(as_bool.sum()) == k
    # Ties straddling the cut: the earlier positions are taken.
    assert top_k_mask(values, 3).tolist() == [True, False, True, False, False, False, False, True]
