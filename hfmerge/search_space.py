"""One searched parameter: a name, a range and how to sample it (shared by the recipe and the
search driver; Optuna is imported only when a distribution is asked for)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: its Optuna name and distribution.

    Attributes:
        name: The parameter's name in the study (e.g. ``lambda_0``, ``density``, ``models[1].weight``).
        low, high: Its range, both ends included.
        log: Sample on a log scale (low > 0).
        step: Sample on the grid low, low + step, ... (None: continuous; 1 for integers).
        integer: An integer parameter (`IntDistribution`), else a float (`FloatDistribution`).
    """

    name: str
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False

    def distribution(self) -> BaseDistribution:
        from optuna.distributions import FloatDistribution, IntDistribution

        if self.integer:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def describe(self) -> dict[str, Any]:
        """The dimension as the study records it (and compares on resume) and reports show it."""
        return {"name": self.name, "low": self.low, "high": self.high, "log": self.log, "step": self.step,
                "type": "int" if self.integer else "float"}
