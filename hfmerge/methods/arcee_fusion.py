"""Arcee Fusion: keep only the fine-tuned model's outlying changes, scored by size and by how
much they shift the row's softmax.

With the base θ_pre and one fine-tuned model θ_1, per tensor:

    δ      = θ_1 − θ_pre
    p, q   = softmax(θ_1), softmax(θ_pre) along the last dimension, each + 1e-8
    KL     = Σ p log(p / q) along the last dimension (one value per row)
    s      = |δ| · KL                                  (the importance of each entry)
    s_thr  = median(s) + 1.5 · (Q3(s) − Q1(s))         (the upper Tukey fence)
    θ      = θ_pre + δ · [s ≥ s_thr]

The quartiles are order statistics: Q(q) is the entry at index ⌊q · (n − 1)⌋ of the sorted n
scores, as in mergekit. mergekit 0.1.5 takes them from a random sample of 1,000,000 scores for
larger tensors (embeddings, output heads), so its result there changes from run to run; hfmerge
uses every score, which is the same for smaller tensors and reproducible for larger ones.
Where the scores are all equal (e.g. θ_1 = θ_pre) the fence equals them and every entry of δ
is kept.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._model_count import require_models
from .registry import merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

EPS = 1e-8


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Arcee Fusion compares one model with the base.

    Raises:
        RecipeError: Not exactly one fine-tuned model besides base_model.
    """
    require_models(recipe, source, at_least=1, at_most=1)
    return []


def fusion_importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """s = |θ_1 − θ_pre| times the row's KL(softmax θ_1 ‖ softmax θ_pre), shaped like `base`."""
    import torch

    p = torch.softmax(model, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def upper_fence(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · IQR of `scores`, from the exact order statistics at ⌊q · (n − 1)⌋."""
    flat = scores.reshape(-1)
    n = flat.numel()
    q1, median, q3 = (flat.kthvalue(int(q * (n - 1)) + 1).values for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@merge_method(
    "arcee_fusion",
    validate=validate,
    paper="https://arcee.ai",
    summary="keep the fine-tuned changes whose |δ| · KL(softmax) score lies above median + 1.5 IQR",
)
def arcee_fusion(base: torch.Tensor, tensors: Sequence[torch.Tensor], **_: object) -> torch.Tensor:
    model = tensors[0]
    if model.numel() == 0:
        return model.clone()
    scores = fusion_importance(base, model)
    keep = scores >= upper_fence(scores)
    return base + (model - base) * keep
