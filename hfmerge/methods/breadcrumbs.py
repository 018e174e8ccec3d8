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
from ._common import keep_matching_l1_, order_statistics, task_vectors, warn_without_density
from .registry import Param, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

if TYPE_CHECKING:
    import torch

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="fraction of entries kept; 1 keeps all")
GAMMA = Param("gamma", 0.01, low=0.0, high=1.0, help="fraction of the largest-magnitude entries removed as outliers")


def band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """The kept band of one task vector: 1 where kept, 0 elsewhere (None: keep everything).

    Entries are ranked by |δ| as a stable sort would rank them: among equal magnitudes the
    earlier position (in row-major order) counts as the smaller one. The band is found without
    a sort: :func:`._common.order_statistics` gives the magnitudes at the band's two ends, every entry
    strictly between them is kept, and of the entries equal to either end only those whose
    stable rank falls inside the band.

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
    if kept == 0:
        return torch.zeros_like(delta)
    magnitude = delta.detach().abs().reshape(-1)
    if magnitude.dtype != torch.float64:
        magnitude = magnitude.float()  # exact for half precision
    (low, low_below, low_ties), (high, high_below, high_ties) = order_statistics(magnitude, (start, start + kept - 1))
    if low_below == start and high_below + high_ties == start + kept:  # no tie straddles an end of the band
        # 1/0 in float written directly (cheaper on the CPU than boolean masks converted).
        keep = torch.ge(magnitude, low, out=torch.empty(n, dtype=delta.dtype, device=delta.device))
        keep.mul_(torch.le(magnitude, high, out=torch.empty_like(keep)))
        return keep.view(delta.shape)
    keep = torch.gt(magnitude, low, out=torch.empty(n, dtype=delta.dtype, device=delta.device))
    keep.mul_(torch.lt(magnitude, high, out=torch.empty_like(keep)))
    for end, below in {low: low_below, high: high_below}.items():
        # The entries equal to `end`, in position order, have the stable ranks below + 1,
        # below + 2, ...; the band holds the ranks start + 1 ... start + kept.
        ties = torch.nonzero(magnitude == end).squeeze(1)
        keep[ties[max(start - below, 0):max(start + kept - below, 0)]] = 1
    return keep.view(delta.shape)


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
