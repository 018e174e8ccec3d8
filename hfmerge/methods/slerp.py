"""Spherical linear interpolation (mergekit's ``slerp``) from base_model to one other model.

Each tensor is read as one flat vector. With u_0 and u_1 the two vectors divided by their norms
(a norm of at most 1e-8 is left undivided) and cos Ω = u_0 · u_1, clamped to [−1, 1]:

    θ = sin((1 − t) Ω) / sin Ω · θ_base + sin(t Ω) / sin Ω · θ_other

so t = 0 gives the base and t = 1 the other model. When |cos Ω| > 0.9995 (nearly colinear or
antipodal vectors, where sin Ω is too small to divide by) it is the plain lerp
(1 − t) θ_base + t θ_other instead. The coefficients multiply the vectors as they are, not
their directions: the norm along the path is interpolated as well as the angle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import RecipeError
from ._model_count import require_models
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

DOT_THRESHOLD = 0.9995  # |cos Ω| above this interpolates linearly (mergekit's value)
EPS = 1e-8  # a vector whose norm is at most this is not normalised

T = Param("t", None, low=0.0, high=1.0, tensor=True,
          help="interpolation factor: 0 = base_model, 1 = the other model (required; a number, gradient or filter list)")


def slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape, each read as a flat vector.

    Args:
        t: The factor: 0 gives `v0`, 1 gives `v1`.
        v0, v1: The end points (float32).

    Returns:
        A new tensor of their shape.
    """
    import torch

    a, b = v0.reshape(-1), v1.reshape(-1)
    if a.numel() == 0:
        return (1 - t) * v0 + t * v1
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > EPS, norm_b, torch.ones_like(norm_b))
    cos = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(cos) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    tt = torch.tensor(t, dtype=torch.float32)
    omega = torch.acos(torch.tensor(cos, dtype=torch.float32))
    sin_omega = torch.sin(omega)
    return torch.sin((1 - tt) * omega) / sin_omega * v0 + torch.sin(tt * omega) / sin_omega * v1


def _applies_everywhere(setting: object) -> bool:
    """Whether a ``t`` setting gives every tensor a value: a number or a gradient, or a filter
    list with an entry without filter (or ``*``)."""
    entries = getattr(setting, "entries", None)
    return setting is not None and (entries is None or any(flt is None or flt == "*" for flt, _ in entries))


def validate(recipe: "Recipe", source: str) -> list[str]:
    """slerp needs base_model, exactly one other model and ``t`` for every tensor, as in mergekit.

    Raises:
        RecipeError: base_model is missing, the models besides it (or a slice's sources) are not
            exactly one, or some tensor would have no ``t``: none given, or only filter lists
            without a last entry that applies to every tensor.
    """
    if recipe.base is None:
        raise RecipeError(f"{source}: base_model: missing; merge_method 'slerp' interpolates from base_model (t = 0) to one other "
                          "model (t = 1): set base_model to one of the two models")
    require_models(recipe, source, at_least=1, at_most=1)
    top = recipe.parameters.get("t")
    if _applies_everywhere(top):
        return []
    # A slice's own t comes first for its tensors; where none applies, the top-level one.
    for key, setting in [(f"{sl.key}.parameters.t", sl.parameters.get("t")) for sl in recipe.slices] or [("parameters.t", top)]:
        if _applies_everywhere(setting):
            continue
        if setting is None and top is None:
            raise RecipeError(f"{source}: parameters.t: missing; merge_method 'slerp' needs t (0 = base_model, 1 = the other model), "
                              "a number, a gradient or a filter list")
        given = key if setting is not None else "parameters.t"
        raise RecipeError(f"{source}: {given}: t has no default, so its filter list needs a last entry without a filter, "
                          "e.g. {value: 0.5}, for the tensors no filter matches")
    return []


@merge_method(
    "slerp",
    params=(T,),
    needs_base=True,
    # The base is required; `validate` says so itself, in slerp's own words.
    base_optional=True,
    validate=validate,
    paper="https://en.wikipedia.org/wiki/Slerp",
    summary="spherical linear interpolation from base_model (t = 0) to one other model (t = 1)",
)
def slerp(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, t: float, **_: object) -> torch.Tensor:
    if base is None or len(tensors) != 1:
        raise ValueError(f"slerp interpolates between a base and exactly one other tensor, got {'a' if base is not None else 'no'} base "
                         f"and {len(tensors)} other(s)")
    return slerp_pair(t, base, tensors[0])
