"""mergekit's ``nuslerp``: spherical interpolation of two models, weighted, optionally around a base.

With per-model weights w_1, w_2 the factor is t = w_2 / (w_1 + w_2) (t = 0.5 when |w_1 + w_2| <
1e-6). Without base_model the two models' tensors are interpolated; with one their task vectors
τ_i = θ_i − θ_pre are, and θ = θ_pre + the result. For vectors v_1, v_2 with directions
u_i = v_i / max(‖v_i‖, 1e-7) and cos Ω = u_1 · u_2 clamped to [−1, 1]:

    slerp(v_1, v_2) = (sin((1 − t) Ω) v_1 + sin(t Ω) v_2) / sin Ω

and (1 − t) v_1 + t v_2 where the vectors are colinear (1 − cos² Ω <= 1e-16, so in float32 only
exactly parallel or antiparallel ones). Each tensor is one vector (``nuslerp_flatten``, the
default). With ``nuslerp_flatten: false`` each slice along the last dimension (each row of a
2-D [out, in] weight) is interpolated on its own; adding ``nuslerp_row_wise: true`` slices along
the first dimension instead (each column). That is what mergekit's code does; its docs name the
two the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ._model_count import require_models
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

NORM_FLOOR = 1e-7  # norms are clamped to at least this before dividing
COLINEAR = 1e-16  # 1 − cos² Ω at or below this interpolates linearly (mergekit's eps²)
ZERO_SUM = 1e-6  # |w_1 + w_2| below this gives t = 0.5

WEIGHT = Param("weight", 1.0, help="the model's weight; t = w_2 / (w_1 + w_2)")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos Ω of each pair of slices along the last dimension, shaped (..., 1), clamped to [−1, 1]."""
    import torch

    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    return (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1, 1)


def nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """Spherical interpolation of two tensors of one shape, over the whole tensor or per slice.

    Args:
        t: The factor: 0 gives `v0`, 1 gives `v1`.
        v0, v1: The end points (float32).
        flatten: One vector per tensor.
        row_wise: Without `flatten`: slices along dimension 0 rather than the last one.

    Returns:
        A new tensor of their shape.
    """
    import torch

    shape = v0.shape
    if flatten or v0.dim() == 0:  # a scalar has no slices: one vector of one entry
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    cos = _cosine(a, b)
    colinear = (1 - cos * cos) <= COLINEAR
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    merged = torch.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten and v0.dim() > 0:
        merged = merged.transpose(0, -1)
    return merged.reshape(shape)


def validate(recipe: "Recipe", source: str) -> list[str]:
    """nuslerp interpolates exactly two models (base_model, when given, is not one of them).

    Raises:
        RecipeError: Not exactly two models besides base_model.
    """
    require_models(recipe, source, at_least=2, at_most=2)
    return []


@merge_method(
    "nuslerp",
    per_model=(WEIGHT,),
    params=(
        Param("nuslerp_flatten", True, kind=bool, help="interpolate each tensor as one vector; false: per slice"),
        Param("nuslerp_row_wise", False, kind=bool, help="without nuslerp_flatten: slices along the first dimension, not the last"),
    ),
    needs_base=True,
    base_optional=True,
    validate=validate,
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp",
    summary="spherical interpolation of two models (or of their task vectors around base_model) at t = w_2 / (w_1 + w_2)",
)
def nuslerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], nuslerp_flatten: bool = True,
            nuslerp_row_wise: bool = False, **_: object) -> torch.Tensor:
    if len(tensors) != 2:
        raise ValueError(f"nuslerp interpolates between exactly two tensors, got {len(tensors)}")
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < ZERO_SUM else weight[1] / total
    if base is None:
        return nuslerp_pair(t, tensors[0], tensors[1], flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    merged = nuslerp_pair(t, tensors[0] - base, tensors[1] - base, flatten=nuslerp_flatten, row_wise=nuslerp_row_wise)
    return merged.add_(base)
