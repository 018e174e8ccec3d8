"""DF-Merge (Lee et al. 2025): Fisher-weighted task arithmetic with searched coefficients.

The merge for given coefficients λ (paper, equation 8):

    θ = θ_pre + M · Σ_i (F_i ⊙ λ_i τ_i) / Σ_i F_i,      τ_i = θ_i − θ_pre

with F_i the diagonal Fisher of the λ-scaled model θ_pre + λ_i τ_i on task i, plus 1e-12
everywhere (where every F ≈ 0 the result is General Task Arithmetic). With all F_i equal it is
exactly General Task Arithmetic θ_pre + Σ_i λ_i τ_i, which is why the factor M is there; with
``fisher: false`` the F_i are ones (the paper's "without Fisher" ablation: Bayesian
optimisation over GTA coefficients). The λ themselves come from a Bayesian-optimisation
search (`hfmerge.search`, driven by `hfmerge.dfmerge`); this function is the merge of one
tensor position once they are known.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .fisher import FISHER_DATA_PARAMS, FISHER_IMPLEMENTATION
from .registry import Param, merge_method

FISHER_EPS = 1e-12


class Equation8:
    """Equation (8) accumulated one model at a time, so that only one Fisher is held at once.

    ``add(τ_i, λ_i, F_i)`` for every model, then ``result(θ_pre)``. `F_i` None means F_i = 1.
    The search (on a live model) and the streaming merge (on checkpoint tensors) both use it,
    so a trial's candidate and the written model are computed by the same arithmetic.
    """

    def __init__(self) -> None:
        self.numerator: torch.Tensor | None = None
        self.denominator: torch.Tensor | None = None
        self.count = 0

    def add(self, task_vector: torch.Tensor, lam: float, fisher: torch.Tensor | None) -> None:
        f = torch.ones_like(task_vector) if fisher is None else fisher + FISHER_EPS
        if self.numerator is None:
            self.numerator = torch.zeros_like(task_vector)
            self.denominator = torch.zeros_like(task_vector)
        self.numerator.add_(f * task_vector, alpha=float(lam))
        self.denominator.add_(f)  # type: ignore[union-attr]
        self.count += 1

    def result(self, base: torch.Tensor) -> torch.Tensor:
        assert self.numerator is not None and self.denominator is not None
        return self.numerator.div_(self.denominator).mul_(self.count).add_(base)


def dfmerge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], lambdas: Sequence[float],
                   importances: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """Equation (8) for one tensor position; ``importances=None`` means every F_i = 1 (GTA)."""
    acc = Equation8()
    for i, (lam, theta) in enumerate(zip(lambdas, tensors)):
        acc.add(theta - base, lam, None if importances is None else importances[i])
    return acc.result(base)


@merge_method(
    "dfmerge",
    per_model=(Param("weight", 1.0, help="the coefficient λ_i: found by the search; given for every model, the search is skipped"),),
    params=(
        Param("fisher", True, kind=bool, help="weigh by the Fisher of the λ-scaled models (false: BO over General Task Arithmetic)"),
        Param("n_trials", 60, kind=int, low=1, help="trials of the search in total, random start included (Optuna's n_trials)"),
        Param("n_startup_trials", 10, kind=int, low=0, help="random trials before the Gaussian process guides the search"),
        Param("seed", 0, kind=int, low=0, help="seed of the search"),
        Param("low", 0.0, help="lower bound of every λ_i"),
        Param("high", 1.0, help="upper bound of every λ_i"),
        Param("patience", 0, kind=int, low=0, help="stop after this many trials without improvement (0: never)"),
        Param("enqueue", [], kind=list, help="known λ points tried first, e.g. [0.3, 0.3] or [[0.3, 0.3], [1, 1]]"),
        *FISHER_DATA_PARAMS,
        FISHER_IMPLEMENTATION,
    ),
    needs_importance=True,
    importance_optional=True,
    search=True,
    paper="Lee et al. 2025, Dynamic Fisher-weighted Model Merging via Bayesian Optimization",
    summary="θ_pre + M Σ F_i λ_i τ_i / Σ F_i with λ found by Bayesian optimisation (equation 8)",
)
def dfmerge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float],
            importances: Sequence[torch.Tensor] | None = None, **_: object) -> torch.Tensor:
    return dfmerge_tensor(base, tensors, weight, importances)
