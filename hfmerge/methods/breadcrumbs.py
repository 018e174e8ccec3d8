"""Model Breadcrumbs (Davari & Belilovsky 2023): cut both tails of each task vector, then combine.

Per tensor and per model, the entries of τ_i are ranked by |τ|. The largest ``gamma``
fraction (outliers) and the smallest ones are dropped so that ``density`` of the entries
remain: with N entries, ``int(density · N)`` are kept, the ``int(gamma · N)`` largest are
removed, and the rest are the smallest. When the two do not fit (density + gamma > 1), fewer
outliers are removed so that the kept count stays ``int(density · N)``. ``density: 1`` (the
default) keeps everything, whatever ``gamma`` says (mergekit's rule).

Then task arithmetic (``breadcrumbs``) or TIES sign election (``breadcrumbs_ties``), both
summing (``normalize: false``) by default as in mergekit. ``rescale: true`` scales the kept
entries so the task vector keeps its L1 norm (mergekit's ``rescale``; off by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._common import combine as combine_deltas
from ._common import keep_matching_l1_, task_vectors, warn_without_density
from .registry import Param, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

if TYPE_CHECKING:
    import torch

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="fraction of entries kept; 1 keeps all")
GAMMA = Param("gamma", 0.01, low=0.0, high=1.0, help="fraction of the largest-magnitude entries removed as outliers")


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The kept band of one task vector: 1 where kept, 0 elsewhere (None: keep everything).

    Entries are ordered by |δ| with a stable sort, so among equal magnitudes the earlier
    position (in row-major order) counts as the smaller one.

    Args:
        delta: One task vector (any shape).
        density: Fraction of entries kept.
        gamma: Fraction of the largest entries removed first.

    Returns:
        A float mask of `delta`'s shape, or None when `density` >= 1.
    """
    import torch

    if density >= 1:
        return None
    n = delta.numel()
    kept = int(density * n)
    outliers = int(gamma * n)
    start = max(0, n - kept - outliers)  # the count of small entries dropped
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=delta.dtype)
    mask[order[start:start + kept]] = 1
    return mask.view(delta.shape)


@merge_method(
    "breadcrumbs",
    per_model=(WEIGHT, DENSITY, GAMMA),
    params=(
        LAMBDA,
        Param("combine", "task_arithmetic", kind=str, choices=("task_arithmetic", "ties"), help="what runs on the masked task vectors"),
        Param("normalize", False, kind=bool, help="divide by the (agreeing) weights"),
        Param("rescale", False, kind=bool, help="scale the kept entries to keep each task vector's L1 norm"),
    ),
    validate=warn_without_density("{name} without density removes nothing: density 1.0 (mergekit's default) keeps every entry "
                                  "and ignores gamma; set density, the fraction of each task vector kept, below 1"),
    paper="https://arxiv.org/abs/2312.06795",
    summary="drop the largest gamma and the smallest entries of each task vector (keep density), then task arithmetic or TIES",
    aliases={"breadcrumbs_ties": {"combine": "ties"}},
)
def breadcrumbs(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], density: Sequence[float],
                gamma: Sequence[float], combine: str = "task_arithmetic", normalize: bool = False, rescale: bool = False,
                **params: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    for i in range(len(tensors)):
        keep = band_mask(deltas[i], density[i], gamma[i])
        if keep is not None:
            keep_matching_l1_(deltas[i], keep, rescale)
    return combine_deltas(base, deltas, weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=combine == "ties")
