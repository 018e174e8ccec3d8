"""The Fisher engine: diagonal Fisher information and Fisher Mask Nodes of live models, their
files and cache. See `diagonal` (the computation), `nodes` (per head / neuron), `cache` (files)
and `engine` (what a recipe needs)."""

from ..errors import FisherError
from .diagonal import IMPLEMENTATIONS, MODES, FisherStats, diagonal_fisher
from .engine import FisherSettings, compute_fisher, fisher_examples

__all__ = ["IMPLEMENTATIONS", "MODES", "FisherError", "FisherSettings", "FisherStats", "compute_fisher", "diagonal_fisher", "fisher_examples"]
