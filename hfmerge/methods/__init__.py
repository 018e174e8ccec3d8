"""Merge methods: one module per method, each registering a pure tensor function."""

from . import arcee_fusion, average, breadcrumbs, dare, della, dfmerge, fisher, fisher_nodes, iso_c, iso_cts, karcher, model_stock, multislerp, nearswap, nuslerp, passthrough, ram, regmean, sce, slerp, task_arithmetic, ties, tsv_merge  # noqa: F401  (registration)
from .registry import METHODS, MergeMethod, Param, known_parameter_names, merge_method

__all__ = ["METHODS", "MergeMethod", "Param", "known_parameter_names", "merge_method"]
