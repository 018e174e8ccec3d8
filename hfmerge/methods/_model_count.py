"""The recipe check shared by methods that take a fixed number of fine-tuned models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..recipe import Recipe


def require_models(recipe: "Recipe", source: str, *, at_least: int, at_most: int | None = None) -> None:
    """Refuse a recipe whose fine-tuned models (base_model not counted) are too few or too many.

    Args:
        recipe: The parsed recipe; a base_model listed under ``models`` is already left out.
        source: The recipe's name for messages.
        at_least: Fewest models the method takes.
        at_most: Most models it takes (None: no limit).

    Raises:
        RecipeError: Naming the ``models`` key, how many were given and how many are needed.
    """
    n = len(recipe.models)
    if at_least <= n and (at_most is None or n <= at_most):
        return
    if at_most is None:
        wanted = f"at least {at_least} fine-tuned models"
    elif at_most == at_least:
        wanted = f"exactly {at_least} fine-tuned model" + ("s" if at_least != 1 else "")
    else:
        wanted = f"{at_least} to {at_most} fine-tuned models"
    raise RecipeError(f"{source}: models: merge_method {recipe.method.name!r} takes {wanted} besides base_model, got {n} "
                      "(a base_model listed under models is not counted)")
