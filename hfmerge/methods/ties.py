"""TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint mean, scale.

1. Trim: keep each task vector's top-k% entries by magnitude (``density`` = k/100).
   ``trim: tensor`` (default, as mergekit) ranks entries within each tensor;
   ``trim: model`` ranks over the whole flattened model as the reference code does
   (the engine finds each model's exact magnitude threshold in a streaming pre-pass).
2. Elect: sign per entry = sign of Σ_i w_i τ̂_i (mass-weighted; an exact tie elects +).
3. Disjoint mean over the entries that agree with the elected sign.
4. θ = θ_pre + λ · τ_merged.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import combine, task_vectors, trim_top_magnitude_
from .registry import Param, merge_method
from .task_arithmetic import LAMBDA, WEIGHT

DENSITY = Param("density", 1.0, low=0.0, high=1.0, low_open=True, help="fraction of entries kept (k of top-k%); 1 keeps all")


@merge_method(
    "ties",
    per_model=(WEIGHT, DENSITY),
    params=(
        LAMBDA,
        Param("normalize", True, kind=bool, help="disjoint mean (divide by the agreeing weights); false sums them"),
        Param("trim", "tensor", kind=str, choices=("tensor", "model"), help="rank magnitudes per tensor or over the whole model"),
    ),
    paper="https://arxiv.org/abs/2306.01708",
    summary="trim to top-k% by magnitude, elect sign by mass, disjoint mean, scale by λ",
)
def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], density: Sequence[float], normalize: bool = True,
         thresholds: Sequence[float] | None = None, **params: object) -> torch.Tensor:
    deltas = task_vectors(base, tensors)
    for i in range(len(tensors)):
        trim_top_magnitude_(deltas[i], density[i], None if thresholds is None else thresholds[i])
    return combine(base, deltas, weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=True)
