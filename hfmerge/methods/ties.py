"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale.

1. Trim: keep each task vector's top-k% entries by magnitude (``density`` = k/100).
   ``trim: tensor`` (default, as mergekit) ranks entries within each tensor;
   ``trim: model`` ranks over the whole flattened model as the reference code does
   (the `prepare` hook below finds each model's exact magnitude threshold in a streaming
   pre-pass and hands the thresholds to every per-tensor call).
2. Elect: sign per entry = sign of Σ_i w_i τ̂_i (mass-weighted; an exact tie elects +).
3. Disjoint mean over the entries that agree with the elected sign.
4. θ = θ_pre + λ · τ_merged.

``rescale: true`` (mergekit's, off by default) scales each trimmed task vector back to its
L1 norm before step 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import RecipeError
from ._common import combine, density_unset, restore_l1_, task_vectors, trim_top_magnitude_
from .registry import Param, PrepareContext, TensorPosition, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="fraction of entries kept (k of top-k%); 1 keeps all")


def validate(recipe: "Recipe", source: str) -> list[str]:
    """A whole-model trim needs one plain density per model; no density at all is worth a warning.

    Args:
        recipe: The parsed recipe.
        source: The recipe's name for messages.

    Returns:
        The advice for the plan's warnings.

    Raises:
        RecipeError: ``trim: model`` with a density given as a filter list or gradient.
    """
    if recipe.parameters.get("trim") == "model":
        if recipe.slices:
            raise RecipeError(f"{source}: parameters.trim: trim: model ranks each model's whole task vector, which a slices: recipe "
                              "does not merge; use trim: tensor")
        given = [(f"{m.key}.parameters.density", m.parameters.get("density")) for m in recipe.models]
        for key, value in given + [("parameters.density", recipe.model_defaults.get("density"))]:
            if value is not None and not isinstance(value, float):
                raise RecipeError(f"{source}: {key}: trim: model needs one density per model, not a filter list or gradient")
    if density_unset(recipe):
        return ["ties without density keeps every entry (density 1.0, mergekit's default); the TIES paper trims to density: 0.2"]
    return []


def prepare(context: PrepareContext) -> dict[str, Any]:
    """For ``trim: model``, each model's exact magnitude threshold over the whole model.

    Non-negative float32 values order like their int32 bit patterns, so a radix select on the
    bits finds the k-th largest |τ| with two histograms (high 16 bits, then low 15) in two
    streaming passes instead of holding the whole model in memory.

    Args:
        context: The recipe and the plan's merged positions.

    Returns:
        ``{"thresholds": [one float per model]}`` for ``trim: model``, else nothing.
    """
    import torch

    recipe = context.recipe
    if recipe.parameters.get("trim") != "model":
        return {}
    m = len(recipe.models)
    densities = [recipe.model_param(spec, "density", "") for spec in recipe.models]
    merged = context.positions
    total = sum(t.numel for t in merged)
    ks = [int(d * total) for d in densities]

    def bits(t: TensorPosition) -> Iterator[tuple[int, torch.Tensor]]:
        base, tensors = context.inputs(t)
        for i, x in enumerate(tensors):
            yield i, (x - base).abs().reshape(-1).view(torch.int32)

    high = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(m)]
    for t in context.progress(merged, "TIES trim (1/2)"):
        for i, b in bits(t):
            high[i] += torch.bincount(b >> 15, minlength=1 << 16)
    chosen_bin, rank_in_bin = [], []
    for i in range(m):
        # Walk from the top bin down until k entries are covered.
        above = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0])  # entries in bins >= b
        k = max(ks[i], 1)
        b = int((above >= k).nonzero().max()) if bool((above >= k).any()) else 0
        chosen_bin.append(b)
        rank_in_bin.append(k - (int(above[b + 1]) if b + 1 < len(above) else 0))
    low = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(m)]
    for t in context.progress(merged, "TIES trim (2/2)"):
        for i, b in bits(t):
            sel = b[(b >> 15) == chosen_bin[i]]
            if sel.numel():
                low[i] += torch.bincount(sel & 0x7FFF, minlength=1 << 15)
    thresholds = []
    for i in range(m):
        if densities[i] >= 1:
            thresholds.append(0.0)
            continue
        if ks[i] == 0:
            thresholds.append(float("inf"))
            continue
        above = torch.flip(torch.cumsum(torch.flip(low[i], [0]), 0), [0])
        lo = int((above >= rank_in_bin[i]).nonzero().max())
        pattern = torch.tensor([(chosen_bin[i] << 15) | lo], dtype=torch.int32)
        thresholds.append(float(pattern.view(torch.float32)))
    return {"thresholds": thresholds}


@merge_method(
    "ties",
    per_model=(WEIGHT, DENSITY),
    params=(
        LAMBDA,
        Param("normalize", True, kind=bool, help="disjoint mean (divide by the agreeing weights); false sums them"),
        Param("trim", "tensor", kind=str, choices=("tensor", "model"), help="rank magnitudes per tensor or over the whole model"),
        Param("rescale", False, kind=bool, help="scale each trimmed task vector back to its L1 norm (mergekit's rescale)"),
    ),
    validate=validate,
    prepare=prepare,
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim to top-k% by magnitude, elect sign by mass, disjoint mean, scale by λ",
)
def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], density: Sequence[float], normalize: bool = True,
         thresholds: Sequence[float] | None = None, rescale: bool = False, **params: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    for i in range(len(tensors)):
        before = deltas[i].abs().sum() if rescale else None
        trim_top_magnitude_(deltas[i], density[i], None if thresholds is None else thresholds[i])
        if before is not None:
            restore_l1_(deltas[i], before)
    return combine(base, deltas, weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=True)
