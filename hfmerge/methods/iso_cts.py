"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al. 2025).

For each 2-D tensor (r = min(m, n) singular directions, M models):

1. Split r into k common directions and M blocks of d task-specific ones, k + M·d = r:
   k = ⌊r · common_space_fraction⌋, then M·d = round((r − k) / M) · M (at most r) and k = r − M·d.
2. Common subspace: the top k singular triplets of Δ = Σ_i w_i τ_i = U Σ Vᵀ.
3. Task-specific subspaces: each w_i τ_i with its component in the common left subspace removed,
   (I − U_k U_kᵀ) w_i τ_i, keeps its top d singular triplets.
4. The r left and the r right singular vectors are concatenated and each set replaced by its
   nearest orthonormal set (orthogonal Procrustes); the spectrum becomes isotropic: every
   singular value the mean σ̄ of the r kept ones.
5. θ = θ_pre + α · σ̄ · Û⊥ V̂⊥ᵀ.

Triplets with a singular value at rounding level are left out of step 4 (their vectors are
arbitrary) but count in σ̄. With d = 0 (``common_space_fraction: 1``, or r < M) it is Iso-C. Other tensors take
θ_pre + α · mean_i(w_i τ_i), as the reference implementation does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

from ._svd import ALPHA, WEIGHT, decorrelated, is_matrix, mean_update, weighted_sum, weighted_task_vectors
from .iso_c import PAPER, isotropic
from .registry import Param, merge_method

COMMON = Param("common_space_fraction", 0.8, low=0.0, high=1.0,
               help="fraction of each matrix's singular directions given to the common subspace")


def subspace_sizes(r: int, m: int, fraction: float) -> tuple[int, int]:
    """(k common directions, d directions per task) with k + m·d = r, as the reference splits them.

    The task-specific total is rounded to a multiple of `m` (Python's round, halves to even), and
    kept at most r; the reference can exceed r on very small matrices (r = 3, m = 2, fraction 0
    gives 4 task-specific directions and k = −1), which is never meant.
    """
    common = int(r * fraction)
    task_total = min(round((r - common) / m) * m, (r // m) * m)
    return r - task_total, task_total // m


@merge_method(
    "iso_cts",
    per_model=(WEIGHT,),
    params=(ALPHA, COMMON),
    paper=PAPER,
    summary="per matrix: common subspace of the sum plus each task's own top directions, orthogonalised, isotropic spectrum, scaled by α",
)
def iso_cts(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], alpha: float = 1.0,
            common_space_fraction: float = 0.8, **_: object) -> torch.Tensor:
    import torch

    if not tensors or not is_matrix(base):
        return mean_update(base, tensors, weight, float(alpha))
    total = weighted_sum(base, tensors, weight)
    k, d = subspace_sizes(min(base.shape), len(tensors), float(common_space_fraction))
    if d == 0:
        return isotropic(total).mul_(float(alpha)).add_(base)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    u_c, s_c, vh_c = u[:, :k], s[:k], vh[:k, :]
    del total, u, s, vh
    us, ss, vhs = [u_c], [s_c], [vh_c]
    for delta in weighted_task_vectors(base, tensors, weight):
        delta.sub_(u_c @ (u_c.T @ delta))
        u_i, s_i, vh_i = torch.linalg.svd(delta, full_matrices=False)
        us.append(u_i[:, :d])
        ss.append(s_i[:d])
        vhs.append(vh_i[:d, :])
        del delta, u_i, s_i, vh_i
    sigma = torch.cat(ss).mean()
    u, _, vh = decorrelated(us, ss, vhs)
    return (u @ vh).mul_(sigma * float(alpha)).add_(base)
