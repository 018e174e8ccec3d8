"""Task arithmetic (Ilharco et al. 2023) and General Task Arithmetic (one λ per model).

θ = θ_pre + λ Σ_i w_i τ_i — the unified form (DF-Merge paper, eq. 7) with C_i = I.
A per-model ``weight`` is the per-model coefficient λ_i of General Task Arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

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
    # Accumulate w_i (θ_i − θ_pre) model by model: no stacked copy of the M task vectors.
    import torch

    mixed = torch.zeros_like(base)
    tau = torch.empty_like(base)  # one work tensor for every τ_i, not a fresh one per model
    for w, theta in zip(weight, tensors):
        mixed.add_(torch.sub(theta, base, out=tau), alpha=w)
    del tau
    total = float(sum(weight))
    if normalize:
        mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    return mixed.mul_(float(params.get("lambda", 1.0))).add_(base)
