"""mergekit's ``passthrough``: copy one model's tensors, optionally scaled.

θ = s · θ_1, with ``scale`` s per model (1 by default; a filter list scales some tensors, e.g.
``scale: [{filter: o_proj, value: 0}, {value: 1}]`` zeroes the attention output projections).
Used to copy or re-type a model, and for layer stacking with ``slices:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import RecipeError
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Passthrough copies exactly one model, or with ``slices:`` one source per slice.

    Raises:
        RecipeError: More than one model, or more than one source in a slice.
    """
    for sl in recipe.slices:
        if len(sl.sources) != 1:
            raise RecipeError(f"{source}: {sl.key}.sources: merge_method 'passthrough' copies one source per slice, got {len(sl.sources)}; "
                              "give each layer range its own slice to stack them")
    if not recipe.slices and len(recipe.models) != 1:
        raise RecipeError(f"{source}: models: merge_method 'passthrough' copies one model, got {len(recipe.models)}; "
                          "list one model, or use slices: to stack layers of several")
    return []


@merge_method(
    "passthrough",
    per_model=(Param("scale", 1.0, help="factor the model's tensor is multiplied by"),),
    needs_base=False,
    validate=validate,
    summary="one model's tensors as they are, optionally scaled",
)
def passthrough(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, scale: Sequence[float], **_: object) -> torch.Tensor:
    if scale[0] == 1.0:
        return tensors[0]
    return tensors[0] * scale[0]
