"""Iso-C, isotropic merging in the common subspace (Marczak et al. 2025).

For each 2-D tensor, the task-arithmetic sum Δ = Σ_i w_i τ_i = U Σ Vᵀ (thin SVD) keeps its
singular vectors, while its spectrum is flattened to the mean singular value σ̄ = mean(diag Σ):

    θ = θ_pre + α · σ̄ · U Vᵀ

Every direction of the sum then gets the same weight, so the tasks whose directions have small
singular values in Δ are not drowned by the dominant ones. Other tensors take
θ_pre + α · mean_i(w_i τ_i), as the reference implementation does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from ._svd import ALPHA, WEIGHT, is_matrix, mean_update, significant, weighted_sum
from .registry import merge_method

PAPER = "https://arxiv.org/abs/2502.04959"


def isotropic(delta: torch.Tensor) -> torch.Tensor:
    """σ̄ · U Vᵀ for delta = U Σ Vᵀ: the same singular vectors, every singular value their mean
    (σ̄ over all min(m, n) of them; directions whose singular value is at rounding level, whose
    vectors are arbitrary, are left out of U Vᵀ)."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    sigma = s.mean()
    u, _, vh = significant(u, s, vh)
    return (u @ vh).mul_(sigma)


@merge_method(
    "iso_c",
    per_model=(WEIGHT,),
    params=(ALPHA,),
    paper=PAPER,
    summary="per matrix: the task-arithmetic sum with its singular values flattened to their mean, scaled by α",
)
def iso_c(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], alpha: float = 1.0, **_: object) -> torch.Tensor:
    import torch

    if not tensors or not is_matrix(base):
        return mean_update(base, tensors, weight, float(alpha))
    total = weighted_sum(base, tensors, weight)
    return isotropic(total).mul_(float(alpha)).add_(base)
