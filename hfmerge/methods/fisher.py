"""Fisher-weighted averaging (Matena & Raffel 2022).

θ = Σ_i c_i F_i θ_i / Σ_i c_i F_i per entry, with F_i the diagonal Fisher of model i.
As in the reference implementation, F is floored at ``fisher_floor`` (1e-6) — for the first
model only when ``favor_target_model`` (the default), so the denominator is never zero and
entries no model cares about take the first model's value — and with ``normalize_fishers``
each c_i is divided by ‖F_i‖₂ over the whole model (the `prepare` hook computes the norms in
a streaming pre-pass).

F_i comes from the model's ``fisher:`` file, or is computed at θ_i on the model's task
(`hfmerge.fisher`) and cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .registry import Param, PrepareContext, merge_method

if TYPE_CHECKING:
    import torch

# How Fishers are computed from the recipe's tasks (models without a `fisher:` file).
FISHER_DATA_PARAMS = (
    Param("fisher_examples", 30, kind=int, low=1, help="N: validation examples per task the Fisher is computed on"),
    Param("fisher_mode", "exact", kind=str, choices=("exact", "sampled", "empirical"),
          help="expectation over the options (exact), one sampled option, or the label (empirical)"),
    Param("fisher_seed", 0, kind=int, low=0, help="seed of the example draw and of sampled options"),
)
FISHER_IMPLEMENTATION = Param("fisher_implementation", "auto", kind=str, choices=("auto", "hooks", "vmap", "loop"),
                              help="per-example gradients from layer hooks, vectorised (vmap) or one by one (loop); same result")


def prepare(context: PrepareContext) -> dict[str, Any]:
    """For ``normalize_fishers``, each model's Fisher L2 norm over the whole model.

    Args:
        context: The recipe and the plan's merged positions with their Fishers.

    Returns:
        ``{"fisher_norms": [one float per model]}`` with ``normalize_fishers``, else nothing.
    """
    import torch

    if not context.recipe.parameters.get("normalize_fishers"):
        return {}
    sq = [0.0] * len(context.recipe.models)
    for t in context.progress(context.positions, "Fisher norms"):
        for i, f in enumerate(context.importances(t)):
            sq[i] += float(f.to(torch.float64).pow(2).sum())
    # A floor keeps an all-zero Fisher from dividing by zero.
    return {"fisher_norms": [max(s ** 0.5, 1e-30) for s in sq]}


@merge_method(
    "fisher",
    per_model=(Param("weight", 1.0, low=0.0, help="coefficient c_i"),),
    params=(
        Param("fisher_floor", 1e-6, low=0.0, help="lower bound applied to the Fisher"),
        Param("favor_target_model", True, kind=bool, help="apply the floor to the first model only"),
        Param("normalize_fishers", False, kind=bool, help="divide each c_i by the model's Fisher L2 norm"),
        *FISHER_DATA_PARAMS,
        FISHER_IMPLEMENTATION,
    ),
    needs_base=False,
    needs_importance=True,
    prepare=prepare,
    paper="https://arxiv.org/abs/2111.09832",
    summary="per-parameter weighted average with diagonal Fisher weights",
)
def fisher(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, importances: Sequence[torch.Tensor], weight: Sequence[float],
           fisher_floor: float = 1e-6, favor_target_model: bool = True, fisher_norms: Sequence[float] | None = None, **_: object) -> torch.Tensor:
    import torch

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
