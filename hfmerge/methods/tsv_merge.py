"""TSV-Merge, Task Singular Vectors (Gargiulo et al. 2025).

For each 2-D task matrix (m × n, r = min(m, n)) and M models:

1. Compress: each w_i τ_i = U_i Σ_i V_iᵀ (thin SVD) keeps its top k = ⌊r / M⌋ singular triplets.
2. Concatenate: Û = [U_1,:k … U_M,:k] (m × Mk), ŝ = [σ_1,:k … σ_M,:k], V̂ᵀ = [V_1,:kᵀ; …] (Mk × n).
3. Decorrelate: replace Û and V̂ᵀ by their nearest (semi-)orthogonal matrices (orthogonal
   Procrustes, P Qᵀ of their own SVDs), so the tasks' directions stop interfering.
4. θ = θ_pre + α · Û⊥ diag(ŝ) V̂⊥ᵀ.

Triplets with a singular value at rounding level (a zero or rank-deficient task vector) are
left out before step 3: their vectors are arbitrary and would steer the orthogonalisation.
Other tensors, and matrices too small to give each model a direction (r < M), take
θ_pre + α · mean_i(w_i τ_i).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from ._svd import ALPHA, WEIGHT, decorrelated, from_factors, is_matrix, mean_update, weighted_task_vectors
from .registry import merge_method

PAPER = "https://arxiv.org/abs/2412.00081"


@merge_method(
    "tsv_merge",
    per_model=(WEIGHT,),
    params=(ALPHA,),
    paper=PAPER,
    summary="per matrix: top 1/M singular triplets of each task vector, decorrelated by orthogonal Procrustes, scaled by α",
)
def tsv_merge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], alpha: float = 1.0, **_: object) -> torch.Tensor:
    import torch

    m = len(tensors)
    k = min(base.shape) // m if m and is_matrix(base) else 0
    if k == 0:
        return mean_update(base, tensors, weight, float(alpha))
    us, ss, vhs = [], [], []
    for delta in weighted_task_vectors(base, tensors, weight):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
        del delta, u, s, vh
    return from_factors(*decorrelated(us, ss, vhs)).mul_(float(alpha)).add_(base)
