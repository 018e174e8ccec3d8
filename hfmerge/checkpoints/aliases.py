"""Tied (aliased) tensors, found from the model's config without reading any weight.

T5 stores one embedding that `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and
(original T5) `lm_head` all point to; checkpoints on the Hub hold any subset of those names.
Rather than keep per-architecture tables, hfmerge instantiates the architecture named in
``config.json`` on the meta device (no memory, no weights, never remote code) and lets
accelerate's `find_tied_parameters` group the state-dict names that share one parameter object.
The meta model stays hfmerge's own because accelerate needs a model to look at and hfmerge
never loads one to plan; on top of accelerate's groups it unties the output embeddings that a
checkpoint's config declares untied (see `_tied_groups`).

The groups are cached per config and transformers version (`tied_groups`), so torch and
transformers are imported only on a cache miss: a dry run of an architecture seen before
starts without them. The plan never falls back to a rule read from the config, which could
disagree with the merge.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING

from ..constants import cache_root

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TIES_FORMAT = 3  # bump when the grouping rule or the cached entry below changes


def meta_model(config: dict) -> tuple[torch.nn.Module | None, str | None]:
    """The architecture named in `config` instantiated on the meta device (no memory, no weights).

    Only classes that transformers itself defines are used; remote code is never run.

    Returns:
        The model, or ``None`` and a text saying why it could not be built.
    """
    import torch
    import transformers

    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    model_type = config.get("model_type")
    if cls is None or not isinstance(model_type, str):
        return None, f"architecture {arch!r} is not one transformers knows (custom code is never run)"
    try:
        cfg_kwargs = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
        cfg = transformers.AutoConfig.for_model(model_type, **cfg_kwargs)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return cls(cfg), None
    except Exception as exc:  # noqa: BLE001 - any failure only means "no architecture information"
        return None, f"could not instantiate {arch} ({type(exc).__name__}: {exc})"


def _cache_path(config: dict):
    """Where the tie groups (and state-dict order) of `config` are cached: keyed by the config and the transformers
    version (which decides the architecture), so no stale answer is ever read."""
    import hashlib
    import json
    from importlib.metadata import version

    key = hashlib.sha256(json.dumps([config, version("transformers"), TIES_FORMAT], sort_keys=True, default=str).encode()).hexdigest()
    return cache_root() / "tied" / f"{key}.json"


def tied_groups(config: dict) -> tuple[list[frozenset[str]], str | None]:
    """Groups of state-dict names that are one tensor in the architecture of `config`.

    Building the architecture needs transformers' modelling code, whose import costs seconds;
    the answer is cached per config and transformers version, so later merges of the same
    architecture skip it.

    Returns:
        The groups (each with at least two names), and a warning text when the architecture
        could not be instantiated (then no aliases are known and names must match exactly).
    """
    entry = _architecture(config)
    return [frozenset(g) for g in entry["groups"]], entry["warning"]


def state_dict_order(config: dict) -> list[str]:
    """The state-dict names of the architecture of `config`, in its order (empty when it
    cannot be built); cached with the tie groups."""
    return list(_architecture(config)["order"])


def _architecture(config: dict) -> dict:
    """What the plan needs from the architecture (``groups``, ``warning``, ``order``), from the
    cache, or built once on the meta device and cached."""
    import json

    path = _cache_path(config)
    try:
        cached = json.loads(path.read_text())
        if isinstance(cached["groups"], list) and isinstance(cached["order"], list) and "warning" in cached:
            return cached
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: compute it again
    model, problem = meta_model(config)
    if model is None:
        entry = {"groups": [], "warning": f"{problem}; tied tensors must be stored under the same names in every model", "order": []}
    else:
        entry = {"groups": sorted(sorted(g) for g in _tied_groups(model, config)), "warning": None, "order": list(model.state_dict())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entry))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache only costs time
        logger.debug("could not cache tie groups in %s: %s", path, exc)
    return entry


def _tied_groups(model: torch.nn.Module, config: dict) -> list[frozenset[str]]:
    from accelerate.utils import find_tied_parameters

    untied: set[str] = set()
    if config.get("tie_word_embeddings") is False:
        # Some configs (T5 in transformers 5) force tying whatever config.json says; a checkpoint
        # that declares untied output embeddings (flan-T5's lm_head) keeps them separate.
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if out is not None:
            prefix = next((n for n, mod in model.named_modules(remove_duplicate=False) if mod is out), None)
            if prefix is not None:
                untied = {f"{prefix}.{n}" for n, _ in out.named_parameters(remove_duplicate=False)}
    groups = [frozenset(n for n in names if n not in untied) for names in find_tied_parameters(model)]
    return [g for g in groups if len(g) > 1]
