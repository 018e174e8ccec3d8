"""Building blocks shared by the singular-value methods (TSV-Merge, Iso-C, Iso-CTS).

These methods decompose each 2-D task matrix; every other tensor (biases, norms, 0-D and
higher-dimensional tensors) is merged as the reference implementations do: the mean of the
(weighted) task vectors, scaled by α. Only one task vector beyond the output is held at a time,
and every SVD is a thin one (``full_matrices=False``) of a single matrix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:
    import torch

from .registry import Param

ALPHA = Param("alpha", 1.0, low=0.0, high=10.0, help="global scale α of the merged task vector")
WEIGHT = Param("weight", 1.0, help="per-model factor w_i on the task vector before the decomposition")


def weighted_task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor], weight: Sequence[float]) -> Iterator[torch.Tensor]:
    """w_i (θ_i − θ_pre), one fresh tensor at a time."""
    import torch

    for w, theta in zip(weight, tensors):
        yield (theta - base).mul_(float(w))


def weighted_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], weight: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i τ_i, the task-arithmetic sum, accumulated model by model."""
    import torch

    total = torch.zeros_like(base)
    for delta in weighted_task_vectors(base, tensors, weight):
        total.add_(delta)
    return total


def mean_update(base: torch.Tensor, tensors: Sequence[torch.Tensor], weight: Sequence[float], alpha: float) -> torch.Tensor:
    """θ_pre + α · (1/M) Σ_i w_i τ_i: how the reference implementations merge what they do not decompose."""
    import torch

    return weighted_sum(base, tensors, weight).div_(max(len(tensors), 1)).mul_(alpha).add_(base)


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix nearest to `a` in Frobenius norm (orthogonal Procrustes):
    P Qᵀ for the thin SVD a = P Σ Qᵀ. Columns (or rows, for a wide `a`) come out orthonormal."""
    import torch

    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def from_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U diag(s) Vᴴ without building the diagonal matrix."""
    import torch

    return (u * s.unsqueeze(0)) @ vh


def significant(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The triplets of (u, s, vh) whose singular value exceeds max(s) · max(m, n) · ε_float32.

    A singular value at rounding level has arbitrary singular vectors (any basis of a null space
    will do), and the orthogonalisation would let them steer the other directions; dropping them
    makes the result depend only on the inputs. Full-rank task matrices keep every triplet.
    """
    import torch

    if s.numel() == 0:
        return u, s, vh
    tol = float(s.max()) * max(u.shape[0], vh.shape[1]) * torch.finfo(torch.float32).eps
    keep = s > tol
    return u[:, keep], s[keep], vh[keep, :]


def decorrelated(us: Sequence[torch.Tensor], ss: Sequence[torch.Tensor], vhs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate blocks of singular triplets (U blocks side by side, Vᴴ blocks stacked), drop
    the insignificant ones (`significant`) and replace the left and the right vectors by their
    nearest orthonormal sets (`polar_factor`); returns (U⊥, s, V⊥ᴴ)."""
    import torch

    u, s, vh = significant(torch.cat(list(us), dim=1), torch.cat(list(ss)), torch.cat(list(vhs), dim=0))
    if s.numel() == 0:
        return u, s, vh
    return polar_factor(u), s, polar_factor(vh)


def is_matrix(base: torch.Tensor) -> bool:
    """Whether the position is decomposed: a 2-D tensor with at least one entry."""
    import torch

    return base.dim() == 2 and base.numel() > 0
