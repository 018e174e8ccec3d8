"""The recipe check shared by methods that take a fixed number of fine-tuned models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import RecipeError

if TYPE_CHECKING:
    from ..recipe import Recipe


def require_models(recipe: "Recipe", source: str, *, at_least: int, at_most: int | None = None) -> None:
    """Refuse a recipe whose fine-tuned models (base_model not counted) are too few or too many;
    with ``slices:``, the sources of each slice.

    Args:
        recipe: The parsed recipe; a base_model listed under ``models`` (or among a slice's
            sources) is already left out.
        source: The recipe's name for messages.
        at_least: Fewest models the method takes.
        at_most: Most models it takes (None: no limit).

    Raises:
        RecipeError: Naming the ``models`` key (or ``slices[i].sources``), how many were given
            and how many are needed.
    """
    def wanted(noun: str) -> str:
        if at_most is None:
            return f"at least {at_least} {noun}s"
        if at_most == at_least:
            return f"exactly {at_least} {noun}" + ("s" if at_least != 1 else "")
        return f"{at_least} to {at_most} {noun}s"

    def fits(n: int) -> bool:
        return at_least <= n and (at_most is None or n <= at_most)

    name = recipe.method.name
    for sl in recipe.slices:
        if not fits(len(sl.sources)):
            raise RecipeError(f"{source}: {sl.key}.sources: merge_method {name!r} takes {wanted('source')} besides base_model in each "
                              f"slice, got {len(sl.sources)}")
    n = len(recipe.models)
    if recipe.slices or fits(n):
        return
    raise RecipeError(f"{source}: models: merge_method {name!r} takes {wanted('fine-tuned model')} besides base_model, got {n} "
                      "(a base_model listed under models is not counted)")
