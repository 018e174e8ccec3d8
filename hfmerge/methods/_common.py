"""Building blocks shared by the task-vector methods (TIES, DARE, task arithmetic)."""

from __future__ import annotations

from typing import Sequence

import torch


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """τ_i = θ_i − θ_pre, stacked on a new first dimension (M, *shape)."""
    return torch.stack([t - base for t in tensors])


def per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model scalars shaped (M, 1, ..., 1) to broadcast against a stack of M tensors."""
    return torch.tensor(list(values), dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def trim_top_magnitude(delta: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """TIES step 1: keep the largest-magnitude entries of one task vector.

    With `threshold` (whole-model trim) keep entries with |δ| >= threshold; otherwise keep the
    top ``int(density * numel)`` entries of this tensor (per-tensor trim, as mergekit does).
    """
    if threshold is not None:
        return delta * (delta.abs() >= threshold)
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return (flat * keep).reshape(delta.shape)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (= 1 − p), rescale survivors by 1/density."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    out = delta * keep
    return out / density if rescale else out


def elect_sign_mask(weighted: torch.Tensor) -> torch.Tensor:
    """TIES step 2: elect a sign per entry by total mass; mask the entries that agree with it.

    The elected sign is + where the sum is >= 0 (an exact tie goes to +, as in mergekit).
    Zero entries never agree, so they do not count in the disjoint mean.
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    return weighted.sign() == elected


def combine(base: torch.Tensor, deltas: torch.Tensor, weight: Sequence[float], *, lambda_: float, normalize: bool, consensus: bool) -> torch.Tensor:
    """θ_pre + λ · mix(w_i τ_i): the shared last step of task arithmetic, TIES and DARE.

    Without consensus: Σ w_i τ_i (divided by Σ w_i when `normalize`). With consensus (TIES
    steps 2–3): the entries agreeing with the elected sign, divided by the sum of their
    weights when `normalize` (the disjoint mean for unit weights).
    """
    w = per_model(weight, deltas)
    weighted = deltas * w
    if consensus:
        mask = elect_sign_mask(weighted)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    return base + lambda_ * mixed
