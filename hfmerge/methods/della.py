"""DELLA (Deep et al. 2024): magnitude-ranked random drop (MagPrune), rescale, then combine.

MagPrune, per tensor and per model: the entries of τ_i are ranked by |τ| within each row (the
last dimension of a matrix; a vector is one row; for more dimensions, along dimension 1, as
mergekit ranks) and entry j of rank r_j (0 = smallest of n) is kept with probability

    p_j = density − epsilon + 2 · epsilon · r_j / (n − 1)

so keep probabilities rise linearly from density − epsilon to density + epsilon and average
``density``. Survivors are divided by their own p_j (``rescale: true``, the default), which
keeps the expectation: E[τ̃_i] = τ_i. Both ends must lie strictly inside (0, 1) (mergekit's
rule); ``density: 1`` keeps everything. Then TIES sign election and disjoint mean (``della``)
or task arithmetic (``della_linear``), with mergekit's defaults for ``normalize``.

Random masks come from the per-(model, tensor) generators, as for DARE.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ..errors import RecipeError
from ._common import combine as combine_deltas
from ._common import bernoulli_mask, task_vectors, warn_without_density
from .registry import Param, PrepareContext, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

if TYPE_CHECKING:
    import torch

    from ..recipe import ModelSpec, Recipe

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="mean keep probability; 1 keeps all")
EPSILON = Param("epsilon", 0.15, low=0.0, help="keep probabilities run from density − epsilon (smallest |τ|) to density + epsilon (largest)")


def window_problem(density: float, epsilon: float) -> str | None:
    """Why `density` ± `epsilon` cannot be used (None when it can, or when density >= 1 keeps all)."""
    if density >= 1 or (density - epsilon > 0 and density + epsilon < 1):
        return None
    return (f"density {density:g} with epsilon {epsilon:g} gives keep probabilities from {density - epsilon:g} to {density + epsilon:g}; "
            f"both must lie strictly between 0 and 1, so epsilon must be below {min(density, 1 - density):g} for this density")


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability of every entry of one task vector (`delta`'s shape).

    Ranks come from a stable sort of |δ| within each row, so among equal magnitudes the
    earlier position ranks lower. A row of one entry gets `density`.
    """
    import torch

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    shape = [1] * rows.dim()
    shape[1] = n
    ranks.scatter_(1, order, torch.arange(n).view(shape).expand_as(order))
    del order  # free the sort indices (8 bytes an entry) before the float work
    probs = (density - epsilon) + ranks.to(delta.dtype).div_(n - 1).mul_(2 * epsilon)
    return probs.view(delta.shape)


def magprune_(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """In place: keep each entry with its MagPrune probability p_j; divide survivors by p_j with `rescale`.

    Raises:
        ValueError: density ± epsilon leaves (0, 1).
    """
    if density >= 1:
        return delta
    problem = window_problem(density, epsilon)
    if problem is not None:
        raise ValueError(problem)
    probs = keep_probabilities(delta, density, epsilon)
    keep = bernoulli_mask(probs, probs.shape, probs.dtype, generator, probs.device)
    return delta.mul_(keep.div_(probs) if rescale else keep)


def _setting(recipe: "Recipe", model: "ModelSpec", name: str) -> tuple[str | None, Any]:
    """Where a per-model parameter is given for `model` (its key path, None for the default) and its setting."""
    if name in model.parameters:
        return f"{model.key}.parameters.{name}", model.parameters[name]
    if name in recipe.model_defaults:
        return f"parameters.{name}", recipe.model_defaults[name]
    spec = recipe.method.model_param(name)
    return None, None if spec is None else spec.default


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Refuse a density ± epsilon outside (0, 1) where both are plain numbers; warn without density.

    A gradient or filter list gives a value per tensor: those models are checked tensor by
    tensor by `prepare`, before any weight is read.

    Args:
        recipe: The parsed recipe.
        source: The recipe's name for messages.

    Returns:
        The advice for the plan's warnings.

    Raises:
        RecipeError: A model's density and epsilon leave (0, 1), naming the key.
    """
    for model in recipe.models:
        density_key, density = _setting(recipe, model, "density")
        epsilon_key, epsilon = _setting(recipe, model, "epsilon")
        if isinstance(density, float) and isinstance(epsilon, float):
            problem = window_problem(density, epsilon)
            if problem is not None:
                key = epsilon_key or density_key or f"{model.key}.parameters.epsilon"
                raise RecipeError(f"{source}: {key}: {problem} ({model.key})")
    return warn_without_density("{name} without density drops nothing (density 1.0, mergekit's default); "
                                "set density, the mean keep probability, below 1")(recipe, source)


def prepare(context: PrepareContext) -> dict[str, Any]:
    """Check density ± epsilon on every tensor for models that set either one by gradient or filter list.

    Raises:
        RecipeError: The values on some tensor leave (0, 1), naming the model and the tensor.
    """
    recipe = context.recipe
    varying = {}  # model -> the key path of its setting that varies by tensor (epsilon's first)
    for m in recipe.models:
        keys = [key for key, value in (_setting(recipe, m, "epsilon"), _setting(recipe, m, "density")) if not isinstance(value, float)]
        if keys:
            varying[m.key] = (m, keys[0])
    for t in context.positions if varying else ():
        for m, key in varying.values():
            density = recipe.model_param(m, "density", t.name, t.depth)
            epsilon = recipe.model_param(m, "epsilon", t.name, t.depth)
            problem = window_problem(density, epsilon)
            if problem is not None:
                raise RecipeError(f"{recipe.source}: {key}: on tensor {t.name!r} ({m.key}), {problem}")
    return {}


@merge_method(
    "della",
    per_model=(WEIGHT, DENSITY, EPSILON),
    params=(
        LAMBDA,
        Param("combine", "ties", kind=str, choices=("ties", "task_arithmetic"), help="what runs on the pruned task vectors"),
        Param("normalize", None, kind=bool, help="divide by the (agreeing) weights; default true for ties, false for task_arithmetic"),
        Param("rescale", True, kind=bool, help="divide survivors by their keep probability (keeps the expectation)"),
        Param("seed", 0, kind=int, low=0, help="seed of the random masks"),
    ),
    random=True,
    validate=validate,
    prepare=prepare,
    paper="https://arxiv.org/abs/2406.11617",
    summary="drop task-vector entries at random with keep probabilities rising with magnitude, rescale, then TIES or task arithmetic",
    aliases={"della_linear": {"combine": "task_arithmetic"}},
    alias_defaults={"della_linear": {"normalize": False}},
)
def della(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], density: Sequence[float], epsilon: Sequence[float],
          generators: Sequence[torch.Generator] | None = None, combine: str = "ties", normalize: bool | None = None, rescale: bool = True,
          **params: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    for i in range(len(tensors)):
        magprune_(deltas[i], density[i], epsilon[i], None if generators is None else generators[i], rescale)
    ties = combine == "ties"
    if normalize is None:
        normalize = ties
    return combine_deltas(base, deltas, weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=ties)
