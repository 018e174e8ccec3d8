"""Task arithmetic (Ilharco et al. 2023) and General Task Arithmetic (one λ per model).

θ = θ_pre + λ Σ_i w_i τ_i — the unified form (DF-Merge paper, eq. 7) with C_i = I.
A per-model ``weight`` is the per-model coefficient λ_i of General Task Arithmetic.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._common import combine, task_vectors
from .registry import Param, merge_method

WEIGHT = Param("weight", 1.0, help="per-model coefficient (λ_i of General Task Arithmetic)")
LAMBDA = Param("lambda", 1.0, low=0.0, high=10.0, help="global scale λ of the merged task vector")


@merge_method(
    "task_arithmetic",
    per_model=(WEIGHT,),
    params=(LAMBDA, Param("normalize", False, kind=bool, help="divide the sum by Σ w_i")),
    paper="https://arxiv.org/abs/2212.04089",
    summary="θ_pre + λ Σ w_i τ_i",
)
def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool = False, **params: object) -> torch.Tensor:
    return combine(base, task_vectors(base, tensors), weight, lambda_=float(params.get("lambda", 1.0)), normalize=normalize, consensus=False)
