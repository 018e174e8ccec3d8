"""Fisher Mask Nodes merging (Thennal et al. 2024): Fisher-weighted averaging with one
importance per attention head and FFN neuron instead of per parameter.

θ = Σ_j c_j F_j θ_j / Σ_j c_j F_j per entry, where F_j is model j's node Fisher spread to the
entry (`hfmerge.fisher.nodes.NodeLayout.importance`). Where every model's weight is zero the
entry takes the plain mean (the reference sets both masks to one there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .fisher import FISHER_DATA_PARAMS
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch


@merge_method(
    "fisher_nodes",
    per_model=(Param("weight", 1.0, low=0.0, help="coefficient c_j"),),
    params=FISHER_DATA_PARAMS,
    needs_base=False,
    needs_importance=True,
    importance="nodes",
    paper="Thennal et al. 2024, Fisher Mask Nodes for Language Model Merging",
    summary="weighted average with per-head / per-neuron Fisher weights (Fisher Mask Nodes)",
)
def fisher_nodes(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, importances: Sequence[torch.Tensor], weight: Sequence[float],
                 **_: object) -> torch.Tensor:
    import torch

    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros(torch.broadcast_shapes(*(f.shape for f in importances)), dtype=tensors[0].dtype, device=tensors[0].device)
    for c, theta, f in zip(weight, tensors, importances):
        numerator += (c * f) * theta
        denominator = denominator + c * f
    safe = denominator != 0
    mean = sum(tensors) / len(tensors)
    return torch.where(safe, numerator / torch.where(safe, denominator, torch.ones_like(denominator)), mean)
