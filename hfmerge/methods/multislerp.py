"""mergekit's ``multislerp``: a weighted barycentre of any number of models on a hypersphere.

Each model's tensor (its task vector τ_i = θ_i − θ_pre when base_model is given) is one flat
vector v_i. With weights w_i (divided by Σ w_i when ``normalize_weights``, the default),
n_i = ‖v_i‖ and directions u_i = v_i / (n_i + ε):

1. mean direction m = Σ w_i u_i / ‖Σ w_i u_i‖;
2. tangent vectors at m: g_i = u_i − (u_i · m) m, and their weighted sum g = Σ w_i g_i;
3. back to the sphere (exponential map), with a = ‖g‖ + ε: d = cos(a) m + sin(a) / a · g;
4. scaled by the weighted mean norm: v = (Σ w_i n_i) · d, and θ = θ_pre + v (θ = v without a base).

One model gives its own tensor unchanged. When ‖Σ w_i u_i‖ < ε (directions that cancel out), two
models fall back to the weighted sum w_1 v_1 + w_2 v_2 (plus θ_pre); three or more are an
error, as in mergekit, unless every v_i is zero (a tensor no model changed), which gives θ_pre
(or zero) where mergekit fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from ..errors import HfMergeError, RecipeError
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

ZERO_SUM = 1e-6  # |Σ w_i| below this cannot be normalised

WEIGHT = Param("weight", 1.0, help="the model's weight in the spherical barycentre")


def _zero_sum_advice(total: float) -> str:
    return (f"the weights sum to {total:g}, and merge_method 'multislerp' with normalize_weights: true divides them by their sum; "
            "change the weights or set parameters.normalize_weights: false")


def validate(recipe: "Recipe", source: str) -> list[str]:
    """Weights given as plain numbers must not sum to zero when they are normalised.

    Raises:
        RecipeError: ``normalize_weights`` with two or more models (or sources of a slice)
            whose plain-number weights sum to zero (weights that vary by tensor are checked
            when merging).
    """
    if not recipe.parameters.get("normalize_weights", True):
        return []
    groups = [(f"{sl.key}.sources", sl.sources) for sl in recipe.slices] or [("models", tuple(recipe.models))]
    for key, entries in groups:
        # A model's own weight, else its slice's, else the global one, else the default.
        weights = [m.parameters.get("weight", m.slice_parameters.get("weight", recipe.model_defaults.get("weight", WEIGHT.default)))
                   for m in entries]
        if len(weights) > 1 and all(isinstance(w, float) for w in weights) and abs(sum(weights)) < ZERO_SUM:
            raise RecipeError(f"{source}: {key}: {_zero_sum_advice(sum(weights))}")
    return []


def _weighted_sum(w: torch.Tensor, rows: Iterator[torch.Tensor]) -> torch.Tensor:
    """Σ_i w_i · row_i, accumulated in order as a sum over the first dimension of a stack is."""
    total: torch.Tensor | None = None
    for weight, row in zip(w, rows):
        term = row * weight
        total = term if total is None else total.add_(term)
    assert total is not None
    return total


@merge_method(
    "multislerp",
    per_model=(WEIGHT,),
    params=(
        Param("normalize_weights", True, kind=bool, help="divide the weights by their sum"),
        Param("eps", 1e-8, low=0.0, low_open=True, help="added to norms before dividing by them"),
    ),
    needs_base=True,
    base_optional=True,
    validate=validate,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    summary="weighted barycentre of the models (or of their task vectors around base_model) on a hypersphere",
)
def multislerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize_weights: bool = True,
               eps: float = 1e-8, **_: object) -> torch.Tensor:
    import torch

    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked.sub_(base)
    vectors = stacked.reshape(len(tensors), -1)
    w = torch.tensor(list(weight), dtype=torch.float32)
    if normalize_weights:
        total = w.sum()
        if abs(float(total)) < ZERO_SUM:
            raise HfMergeError(f"multislerp: {_zero_sum_advice(float(total))}")
        w = w / total
    # Row by row, in mergekit's order of operations (so the numbers agree with it), without the
    # stacks of unit and tangent vectors: the work space is the M inputs and a few single tensors.
    norms = torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    # Beyond two models the inputs are not read again: they become the unit vectors in place.
    units = vectors / (norms + eps) if len(tensors) == 2 else vectors.div_(norms + eps)
    mean = _weighted_sum(w, (units[i] for i in range(len(units))))
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:
            merged = stacked[0] * w[0] + stacked[1] * w[1]
        elif not bool((norms > 0).any()):  # no model changed this tensor
            merged = torch.zeros(shape)
        else:
            raise HfMergeError("multislerp: the weighted mean of the models' directions is zero (antipodal models whose weights "
                               "balance out, e.g. a and −a with equal weights); change the weights")
        return merged if base is None else merged.add_(base)
    mean = mean / mean_norm
    tangent = _weighted_sum(w, (units[i] - (units[i] * mean).sum() * mean for i in range(len(units))))
    angle = torch.linalg.vector_norm(tangent) + eps
    direction = mean * torch.cos(angle) + tangent * (torch.sin(angle) / angle)
    merged = (direction * (norms.squeeze(-1) * w).sum()).reshape(shape)
    return merged if base is None else merged.add_(base)
