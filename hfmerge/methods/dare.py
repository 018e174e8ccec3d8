"""DARE (Yu et al. 2024): drop-and-rescale each task vector, then task arithmetic or TIES.

Each entry of τ_i is kept with probability ``density`` (= 1 − p) and survivors are rescaled by
1/density, so the result is unbiased: E[τ̃_i] = τ_i. Random masks come from one generator
per (model, tensor) seeded from ``seed``, the model's index and the tensor name, so a merge is
reproducible and does not depend on the order tensors are processed.

``combine: task_arithmetic`` is mergekit's ``dare_linear``; ``combine: ties`` (sign election
and disjoint mean on the dropped vectors, no magnitude trim) is ``dare`` + TIES. mergekit's
``dare_ties`` is the same with ``normalize: false`` by default (agreeing entries summed, not
averaged), kept here under that name so its recipes give the same tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._common import combine as combine_deltas
from ._common import density_unset, random_drop_, task_vectors
from .registry import Param, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="keep probability 1 − p")


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Warn when no density is set: mergekit's default 1.0 drops nothing.

    Args:
        recipe: The parsed recipe.
        source: The recipe's name for messages (unused: nothing here is an error).

    Returns:
        The advice for the plan's warnings.
    """
    if density_unset(recipe):
        return [f"{recipe.method.name} without density drops nothing (density 1.0, mergekit's default); "
                "the DARE paper uses density 0.1-0.9 (p = 1 - density)"]
    return []


@merge_method(
    "dare",
    per_model=(WEIGHT, DENSITY),
    params=(
        LAMBDA,
        Param("combine", "task_arithmetic", kind=str, choices=("task_arithmetic", "ties"), help="what runs on the dropped task vectors"),
        Param("normalize", None, kind=bool, help="divide by the (agreeing) weights; default false for task_arithmetic, true for ties"),
        Param("rescale", True, kind=bool, help="rescale survivors by 1/density (keeps the expectation)"),
        Param("seed", 0, kind=int, low=0, help="seed of the random masks"),
    ),
    random=True,
    validate=validate,
    paper="https://arxiv.org/abs/2311.03099",
    summary="drop each task-vector entry with probability p, rescale by 1/(1−p), then task arithmetic or TIES",
    aliases={"dare_linear": {"combine": "task_arithmetic"}, "dare_ties": {"combine": "ties"}},
    # mergekit's dare_ties sums the agreeing entries unless `normalize: true` is given.
    alias_defaults={"dare_linear": {"normalize": False}, "dare_ties": {"normalize": False}},
)
def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], density: Sequence[float],
         generators: Sequence[torch.Generator] | None = None, combine: str = "task_arithmetic", normalize: bool | None = None,
         rescale: bool = True, **params: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    for i in range(len(tensors)):
        random_drop_(deltas[i], density[i], None if generators is None else generators[i], rescale)
    ties = combine == "ties"
    if normalize is None:
        normalize = ties
    return combine_deltas(base, deltas, weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=ties)
