"""NearSwap: take the fine-tuned model's value only where it is already close to the base's.

With the base θ_pre and one fine-tuned model θ_1, per entry:

    w = clamp(t / max(|θ_1 − θ_pre|, 1e-6), 0, 1)
    θ = w · θ_1 + (1 − w) · θ_pre

Entries that differ by at most ``t`` are swapped to the fine-tuned value; entries that differ
more move toward it by t / |θ_1 − θ_pre|, so every entry moves by at most t. t → 0 keeps the
base, a t larger than every difference gives the fine-tuned model. As in mergekit, ``t`` has no
default and may vary by tensor (a gradient or a filter list); it must not be negative (mergekit
would clamp a negative t to the base).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import RecipeError
from ._model_count import require_models
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe


def validate(recipe: "Recipe", source: str) -> list[str]:
    """NearSwap compares one model with the base and needs ``t`` for every tensor.

    Raises:
        RecipeError: Not exactly one fine-tuned model, ``t`` missing, or a filter list for
            ``t`` without a last entry that applies to every tensor.
    """
    require_models(recipe, source, at_least=1, at_most=1)
    t = recipe.parameters.get("t")
    if t is None:
        raise RecipeError(f"{source}: parameters.t: missing; merge_method 'nearswap' needs t, the largest difference "
                          "swapped to the fine-tuned value (mergekit's example uses 0.0001)")
    entries = getattr(t, "entries", None)
    if entries is not None and not any(flt is None or flt == "*" for flt, _ in entries):
        raise RecipeError(f"{source}: parameters.t: t has no default, so its filter list needs a last entry without "
                          "a filter, e.g. {value: 0.0001}, for the tensors no filter matches")
    return []


@merge_method(
    "nearswap",
    params=(Param("t", None, low=0.0, tensor=True, help="entries closer than t take the fine-tuned value; others move by t"),),
    validate=validate,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    summary="per entry, move from the base toward the fine-tuned model by at most t",
)
def nearswap(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, t: float, **_: object) -> torch.Tensor:
    model = tensors[0]
    weight = (t / (model - base).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return weight * model + (1 - weight) * base
