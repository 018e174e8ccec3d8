"""Fisher-weighted averaging (Matena & Raffel 2022).

θ = Σ_i c_i F_i θ_i / Σ_i c_i F_i per entry, with F_i the diagonal Fisher of model i.
As in the reference implementation, F is floored at ``fisher_floor`` (1e-6) — for the first
model only when ``favor_target_model`` (the default), so the denominator is never zero and
entries no model cares about take the first model's value — and with ``normalize_fishers``
each c_i is divided by ‖F_i‖₂ over the whole model (the engine computes the norms).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .registry import Param, merge_method


@merge_method(
    "fisher",
    per_model=(Param("weight", 1.0, low=0.0, help="coefficient c_i"),),
    params=(
        Param("fisher_floor", 1e-6, low=0.0, help="lower bound applied to the Fisher"),
        Param("favor_target_model", True, kind=bool, help="apply the floor to the first model only"),
        Param("normalize_fishers", False, kind=bool, help="divide each c_i by the model's Fisher L2 norm"),
    ),
    needs_base=False,
    needs_importance=True,
    paper="https://arxiv.org/abs/2111.09832",
    summary="per-parameter weighted average with diagonal Fisher weights",
)
def fisher(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, importances: Sequence[torch.Tensor], weight: Sequence[float],
           fisher_floor: float = 1e-6, favor_target_model: bool = True, fisher_norms: Sequence[float] | None = None, **_: object) -> torch.Tensor:
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for i, (theta, f) in enumerate(zip(tensors, importances)):
        if not favor_target_model or i == 0:
            f = torch.clamp(f, min=fisher_floor)
        c = weight[i] / (fisher_norms[i] if fisher_norms is not None else 1.0)
        numerator += c * f * theta
        denominator += c * f
    # Where every weight is zero (no floor reached it) fall back to the plain mean.
    safe = denominator != 0
    mean = torch.stack(list(tensors)).mean(dim=0)
    return torch.where(safe, numerator / torch.where(safe, denominator, torch.ones_like(denominator)), mean)
