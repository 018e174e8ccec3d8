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

Two opt-in departures from equation 8 (the default, ``fisher_weighting: paper`` and
``fisher_temperature: 1``, is the paper's):

- ``fisher_weighting: capped``: θ = θ_pre + Σ_{i ∈ A} w_i λ_i τ_i with A the models with
  λ_i ≠ 0, M′ = |A| and w_i = min(M′ · F_i / Σ_{j ∈ A} F_j, 1). A model the search switched
  off brings no Fisher (in equation 8 its F_i, taken at θ_pre, still dilutes the others'
  weights), and no task vector is stretched beyond λ_i τ_i (equation 8's weight M F_i / Σ F_j
  reaches M). Equal Fishers still give task arithmetic.
- ``fisher_weighting: kept``: equation 8 over A only, θ = θ_pre + M′ Σ_{i ∈ A} F_i λ_i τ_i /
  Σ_{j ∈ A} F_j: the switched-off models' Fishers leave the denominator, the weights are not
  capped (the first half of ``capped`` alone, to tell the two effects apart).
- ``fisher_temperature`` α: every F_i (with its 1e-12) is raised to the power α before
  weighting; α = 0 gives equal weights (General Task Arithmetic), α < 1 flattens the Fishers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..errors import RecipeError, short_repr
from .fisher import FISHER_DATA_PARAMS, FISHER_IMPLEMENTATION
from .registry import Param, merge_method

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

FISHER_EPS = 1e-12
FISHER_WEIGHTINGS = ("paper", "kept", "capped")


def _weighting_fisher(fisher: torch.Tensor | None, like: torch.Tensor, temperature: float) -> torch.Tensor:
    """The F_i a weighting uses: ones without a Fisher, else (F_i + 1e-12) ** α."""
    import torch

    if fisher is None:
        return torch.ones_like(like)
    f = fisher + FISHER_EPS
    return f if temperature == 1.0 else f.pow_(temperature)


class Equation8:
    """Equation (8) accumulated one model at a time, so that only one Fisher is held at once.

    ``add(τ_i, λ_i, F_i)`` for every model, then ``result(θ_pre)``. `F_i` None means F_i = 1.
    The search (on a live model) and the streaming merge (on checkpoint tensors) both use it,
    so a trial's candidate and the written model are computed by the same arithmetic.

    Args:
        temperature: α: each F_i + 1e-12 is raised to this power (1: the paper's equation).
        kept_only: Leave out the models with λ_i = 0 (M′ of them remain; ``fisher_weighting:
            kept``); their Fisher may then be None and need not be computed.
    """

    def __init__(self, temperature: float = 1.0, kept_only: bool = False) -> None:
        self.temperature = float(temperature)
        self.kept_only = kept_only
        self.numerator: torch.Tensor | None = None
        self.denominator: torch.Tensor | None = None
        self.count = 0

    def add(self, task_vector: torch.Tensor, lam: float, fisher: torch.Tensor | None) -> None:
        import torch

        if self.kept_only and lam == 0:
            return
        f = _weighting_fisher(fisher, task_vector, self.temperature)
        if self.numerator is None:
            self.numerator = torch.zeros_like(task_vector)
            self.denominator = torch.zeros_like(task_vector)
        self.numerator.add_(f * task_vector, alpha=float(lam))
        self.denominator.add_(f)  # type: ignore[union-attr]
        self.count += 1

    def result(self, base: torch.Tensor) -> torch.Tensor:
        if self.numerator is None:  # every model left out
            return base.clone()
        assert self.denominator is not None
        return self.numerator.div_(self.denominator).mul_(self.count).add_(base)


class CappedWeights:
    """The capped weighting: θ_pre + Σ_{λ_i ≠ 0} min(M′ F_i / Σ_{λ_j ≠ 0} F_j, 1) λ_i τ_i.

    Same interface as `Equation8`. A model with λ_i = 0 is ignored (its Fisher may be None and
    need not be computed, see `needs_fisher`). The weights need the sum of every Fisher before
    any of them is applied, so the Fishers of the models with λ_i ≠ 0 are held until
    ``result``: M′ Fishers at once, where equation 8 holds one.

    Args:
        temperature: α: each F_i + 1e-12 is raised to this power.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = float(temperature)
        self.terms: list[tuple[torch.Tensor, float, torch.Tensor | None]] = []

    def add(self, task_vector: torch.Tensor, lam: float, fisher: torch.Tensor | None) -> None:
        if lam != 0:
            self.terms.append((task_vector, float(lam), fisher))

    def result(self, base: torch.Tensor) -> torch.Tensor:
        import torch

        out = base.clone()
        if not self.terms:
            return out
        fishers = [_weighting_fisher(f, tv, self.temperature) for tv, _, f in self.terms]
        total = torch.zeros_like(base)
        for f in fishers:
            total.add_(f)
        for (tv, lam, _), f in zip(self.terms, fishers):
            w = f.mul_(len(self.terms)).div_(total).clamp_(max=1.0)
            out.add_(w.mul_(tv), alpha=lam)
        return out


def fisher_accumulator(weighting: str = "paper", temperature: float = 1.0) -> Equation8 | CappedWeights:
    """The accumulator of one tensor position for ``fisher_weighting`` (``paper``, ``kept`` or ``capped``)."""
    if weighting in ("paper", "kept"):
        return Equation8(temperature, kept_only=weighting == "kept")
    if weighting == "capped":
        return CappedWeights(temperature)
    raise ValueError(f"unknown fisher_weighting {weighting!r}; expected one of {', '.join(FISHER_WEIGHTINGS)}")


def needs_fisher(weighting: str, lam: float) -> bool:
    """Whether model i's Fisher enters the merge: always in equation 8, only for λ_i ≠ 0 otherwise."""
    return weighting == "paper" or lam != 0


def dfmerge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], lambdas: Sequence[float],
                   importances: Sequence[torch.Tensor] | None, weighting: str = "paper", temperature: float = 1.0) -> torch.Tensor:
    """One tensor position; ``importances=None`` means every F_i = 1 (General Task Arithmetic).

    ``weighting`` ``paper`` is equation (8), ``kept`` equation 8 over the models with λ_i ≠ 0,
    ``capped`` the capped weights (module docstring);
    ``temperature`` is α in (F_i + 1e-12) ** α.
    """
    acc = fisher_accumulator(weighting, temperature)
    for i, (lam, theta) in enumerate(zip(lambdas, tensors)):
        acc.add(theta - base, lam, None if importances is None else importances[i])
    return acc.result(base)


def validate(recipe: "Recipe", source: str) -> list[str]:
    """The search's data and settings: one task per model, λ searched for all models or fixed
    for all, and a non-empty search space that holds every enqueued point.

    These are the recipe's only checks of the search settings: `hfmerge.searching.SearchSettings`
    checks its own fields again only for callers that build it without a recipe.

    Args:
        recipe: The parsed recipe.
        source: The recipe's name for messages.

    Returns:
        No advice (an empty list).

    Raises:
        RecipeError: Naming the key path of the first problem.
    """
    name, models, parameters = recipe.method.name, recipe.models, recipe.parameters

    def fail(path: str, message: str) -> RecipeError:
        return RecipeError(f"{source}: {path}: {message}")

    if not recipe.tasks:
        raise fail("tasks", f"missing; merge_method {name!r} searches coefficients on validation data and needs one task per fine-tuned model")
    lacking = [m for m in models if m.task is None]
    if lacking:
        raise fail("tasks", f"merge_method {name!r} needs one task per fine-tuned model: {len(recipe.tasks)} task(s) for {len(models)} model(s), "
                   f"{lacking[0].key} ({short_repr(lacking[0].ref.text)}) has none; list the tasks in the models' order or give each task a `model:` key")
    if "weight" in recipe.model_defaults:
        raise fail("parameters.weight", f"merge_method {name!r} searches every λ_i; fix them per model (models[].parameters.weight, "
                   "then the search is skipped) rather than globally")
    given = [m for m in models if "weight" in m.parameters]
    if given and len(given) != len(models):
        missing = next(m for m in models if "weight" not in m.parameters)
        raise fail(f"{missing.key}.parameters.weight", f"missing; merge_method {name!r} searches every λ_i, or takes one for every model "
                   "(then the search is skipped): give a weight to every model or to none")
    for m in given:
        if not isinstance(m.parameters["weight"], float):
            raise fail(f"{m.key}.parameters.weight", f"merge_method {name!r} takes one number per model, not a filter list or gradient")
    low, high = parameters["low"], parameters["high"]
    if low >= high:
        raise fail("parameters.low", f"the search bounds are empty: low = {low} >= high = {high}; low must be below high")
    if parameters["n_startup_trials"] > parameters["n_trials"]:
        raise fail("parameters.n_startup_trials", f"{parameters['n_startup_trials']} random start trials exceed n_trials = {parameters['n_trials']}")
    enqueue = parameters.get("enqueue") or []
    points = [enqueue] if enqueue and not isinstance(enqueue[0], list) else enqueue
    for j, point in enumerate(points):
        if len(point) != len(models):
            raise fail("parameters.enqueue", f"point {j} has {len(point)} value(s) for {len(models)} model(s); give one λ per model")
        if any(not low <= v <= high for v in point):
            raise fail("parameters.enqueue", f"point {j} {short_repr(point)} leaves the bounds [{low}, {high}]")
    return []


@merge_method(
    "dfmerge",
    per_model=(Param("weight", 1.0, help="the coefficient λ_i: found by the search; given for every model, the search is skipped"),),
    params=(
        Param("fisher", True, kind=bool, help="weigh by the Fisher of the λ-scaled models (false: BO over General Task Arithmetic)"),
        Param("fisher_weighting", "paper", kind=str, choices=FISHER_WEIGHTINGS,
              help="paper: equation 8; kept: equation 8 over the models with λ_i ≠ 0; capped: min(M′ F_i / Σ F_j, 1) over those models"),
        Param("fisher_temperature", 1.0, low=0.0, help="α: weigh by (F_i + 1e-12) ** α (1: the paper; 0: equal weights)"),
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
    validate=validate,
    paper="Lee et al. 2025, Dynamic Fisher-weighted Model Merging via Bayesian Optimization",
    summary="θ_pre + M Σ F_i λ_i τ_i / Σ F_i with λ found by Bayesian optimisation (equation 8)",
)
def dfmerge(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float],
            importances: Sequence[torch.Tensor] | None = None, fisher_weighting: str = "paper", fisher_temperature: float = 1.0,
            **_: object) -> torch.Tensor:
    return dfmerge_tensor(base, tensors, weight, importances, fisher_weighting, fisher_temperature)
