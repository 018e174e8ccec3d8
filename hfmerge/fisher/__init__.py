"""The Fisher engine: diagonal Fisher information and Fisher Mask Nodes of live models, their
files and cache. See `diagonal` (the computation), `nodes` (per head / neuron), `cache` (files
and the cache's size cap), `engine` (what a recipe needs) and the command-line modules `cli`
and `cache_cli`.

The package itself imports nothing: importing any submodule runs this file, and the
command-line modules must load without torch (``hfmerge --help`` stays fast). Import the
submodules by name, e.g. ``from hfmerge.fisher.diagonal import diagonal_fisher``.
"""
