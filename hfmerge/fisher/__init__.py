"""The Fisher engine: diagonal Fisher information and Fisher Mask Nodes of live models, their
files and cache. See `diagonal` (the computation), `nodes` (per head / neuron), `cache` (files)
and `engine` (what a recipe needs; import it as ``hfmerge.fisher.engine``: the package does not
import it, since importing any submodule runs this file and the engine works on merge plans)."""

from ..errors import FisherError
from .diagonal import IMPLEMENTATIONS, MODES, FisherStats, diagonal_fisher

__all__ = ["IMPLEMENTATIONS", "MODES", "FisherError", "FisherStats", "diagonal_fisher"]
