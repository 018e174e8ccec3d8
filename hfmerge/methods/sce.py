"""SCE (Wan et al. 2024, FuseChat): Select, Calculate, Erase, per tensor.

1. Select: with ``select_topk`` < 1, keep only the entries whose variance across the M task
   vectors is among the largest: ``int(select_topk · n)`` of them, n being the number of
   entries whose variance is not zero (mergekit's count). The same entries are kept in every
   task vector; the others become 0.
2. Calculate: each model's coefficient is the mean square of its (selected) task vector,
   normalised to sum to 1 over the models (1/M each when every task vector is zero).
3. Erase: the sign of Σ_i τ_i is elected per entry (+ on an exact tie); entries of the other
   sign (and zeros) are erased. θ = θ_pre + Σ_i η_i τ_i / Σ_i η_i over the surviving entries.

No per-model weight or λ: the coefficients come from the task vectors themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._common import combine, task_vectors, top_k_mask, variance_over_models
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

SELECT_TOPK = Param("select_topk", 1.0, low=0.0, high=1.0, tensor=True,
                    help="fraction of entries kept, those whose variance across the task vectors is largest")


def select_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """The entries SCE keeps: 1 for the top `fraction` by variance across models (None: keep all).

    Args:
        deltas: The M task vectors stacked (M, *shape).
        fraction: ``select_topk``.

    Returns:
        A float mask of one task vector's shape, or None when `fraction` >= 1. Among equal
        variances the earlier position (row-major) is taken first.
    """
    import torch

    if fraction >= 1:
        return None
    var = variance_over_models(deltas)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    if k == 0:
        return torch.zeros_like(var)
    keep = top_k_mask(var.reshape(-1), k)
    return keep.to(var.dtype).view(var.shape)


def coefficients(deltas: torch.Tensor) -> list[float]:
    """η_i: each task vector's mean square over the sum of them (1/M each when all are zero)."""
    squares = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(squares.sum())
    if not total > 0:
        return [1.0 / deltas.shape[0]] * deltas.shape[0]
    return (squares / total).tolist()


@merge_method(
    "sce",
    params=(SELECT_TOPK,),
    paper="https://arxiv.org/abs/2408.07990",
    summary="keep the entries of largest variance across models, weight models by mean square, erase minority signs",
)
def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float = 1.0, **_: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    mask = select_mask(deltas, select_topk)
    if mask is not None:
        deltas.mul_(mask)
    eta = coefficients(deltas)
    elected_positive = deltas.sum(dim=0) >= 0
    return combine(base, deltas, eta, lambda_=1.0, normalize=True, consensus=True, elected_positive=elected_positive)
