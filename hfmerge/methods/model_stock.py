"""Model Stock (Jang et al. 2024): move from the base toward the models' average by an amount
set by the angle between their task vectors.

For N ≥ 2 fine-tuned models with task vectors τ_k = θ_k − θ_pre:

    cos θ = mean over pairs k < l of  (τ_k · τ_l) / max(‖τ_k‖ ‖τ_l‖, 1e-6)   (each clamped to [−1, 1])
    t     = N cos θ / (1 + (N − 1) cos θ)
    θ     = t · (1/N) Σ_k θ_k + (1 − t) · θ_pre

The paper derives t for two models with one angle; for more, mergekit (and hfmerge) average the
pairwise cosines. By default one angle is taken per tensor (all entries flattened);
``filter_wise: true`` takes one per row (each vector along the last dimension, e.g. an output
neuron's weights), and a 1-D tensor (a norm or bias) is then one row. Where
|1 + (N − 1) cos θ| < 1e-6 there is no finite ratio and t = 0 keeps the base, as in mergekit 0.1.5.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._model_count import require_models
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Model Stock needs an angle between task vectors, so at least two models besides the base.

    Raises:
        RecipeError: Fewer than two fine-tuned models.
    """
    require_models(recipe, source, at_least=2)
    return []


def stock_ratio(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The interpolation ratio t, one per row of `base` (the last dimension keeps size 1).

    Args:
        base: θ_pre, already shaped as the rows the angles are taken over.
        tensors: The N fine-tuned tensors, shaped like `base`.
    """
    import torch

    offsets = [x - base for x in tensors]
    lengths = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = [((offsets[k] * offsets[m]).sum(dim=-1) / (lengths[k] * lengths[m]).clamp(min=1e-6)).clamp(-1.0, 1.0)
               for k in range(len(offsets)) for m in range(k + 1, len(offsets))]
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(denominator), denominator))


@merge_method(
    "model_stock",
    params=(Param("filter_wise", False, kind=bool, help="one angle per row (last dimension) instead of one per tensor"),),
    validate=validate,
    paper="https://arxiv.org/abs/2403.19522",
    summary="interpolate from the base toward the models' mean by t = N cos θ / (1 + (N − 1) cos θ) of their task vectors",
)
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool = False, **_: object) -> torch.Tensor:
    import torch

    if not filter_wise:
        rows = base.reshape(-1)
    elif base.dim() <= 1:
        rows = base.reshape(1, -1)
    else:
        rows = base
    models = [x.reshape(rows.shape) for x in tensors]
    t = stock_ratio(rows, models)
    mean = torch.stack(models).mean(dim=0)
    return (t * mean + (1 - t) * rows).reshape(base.shape)
