"""Tied-tensor groups: found from the architecture, cached per config and transformers version."""

from __future__ import annotations

import json

from hfmerge.checkpoints import aliases
from hfmerge.testing import tiny_config


def t5_config(**overrides) -> dict:
    config = tiny_config("t5").to_dict()
    config["architectures"] = ["T5ForConditionalGeneration"]
    config.update(overrides)
    return config


def test_tie_groups_are_cached_and_a_damaged_entry_is_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path))
    config = t5_config()
    groups, warning = aliases.tied_groups(config)
    assert warning is None
    assert frozenset({"shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}) in groups
    path = aliases._cache_path(config)
    assert path.is_file() and sorted(map(sorted, groups)) == json.loads(path.read_text())["groups"]
    # A cached answer is used as is (no architecture is built) ...
    calls = []
    monkeypatch.setattr(aliases, "meta_model", lambda cfg: calls.append(cfg) or (None, "unused"))
    assert aliases.tied_groups(config) == (groups, None) and not calls
    # ... a damaged one is recomputed, and another config has its own entry.
    path.write_text("{not json")
    assert aliases.tied_groups(config)[1] == "unused; tied tensors must be stored under the same names in every model" and calls
    monkeypatch.undo()
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path))
    untied = t5_config(tie_word_embeddings=False)
    assert aliases._cache_path(untied) != path
    untied_groups, _ = aliases.tied_groups(untied)
    assert all("lm_head.weight" not in g for g in untied_groups)
