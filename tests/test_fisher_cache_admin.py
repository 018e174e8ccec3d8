"""The Fisher cache can be listed and cleaned, and stays within its size cap by deleting the
least recently used entries, never one in use."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from hfmerge.cli import main
from hfmerge.errors import OptionError
from hfmerge.fisher import cache as fc


def _entry(root: Path, model: str, *, numel: int = 1000, age_days: float = 0.0) -> Path:
    meta = {"model": model, "task": "sst2", "lambda": "", "kind": "diagonal"}
    key = fc.cache_key(meta)
    path = fc.save_fisher(fc.cached_path(key, root), {"w": torch.ones(numel)}, {**meta, "cache_key": key})
    stamp = time.time() - age_days * 86400
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fc, "_IN_USE", set())
    return fc.cache_dir()


def test_scan_lists_entries_least_recently_used_first_with_what_they_are(cache):
    new = _entry(cache, "org/new", age_days=1)
    old = _entry(cache, "org/old", age_days=9)
    (cache / ".abc.safetensors.x.tmp").write_bytes(b"partial")
    entries = fc.scan_cache()
    assert [e.path for e in entries][:2] == [old, new]
    sound = [e for e in entries if e.problem is None]
    assert [(e.model, e.task) for e in sound] == [("org/old", "sst2"), ("org/new", "sst2")]
    assert [e.problem for e in entries if e.problem] == ["an unfinished write"]
    assert sound[0].size == old.stat().st_size


def test_eviction_deletes_least_recently_used_until_under_the_cap_and_keeps_recent_and_in_use(cache):
    paths = [_entry(cache, f"org/m{i}", age_days=10 - i) for i in range(4)]  # m0 oldest
    size = paths[0].stat().st_size
    entries = fc.scan_cache()
    chosen = fc.eviction_candidates(entries, max_bytes=2 * size)
    assert [e.path for e in chosen] == paths[:2]
    fc._IN_USE.add(paths[0].absolute())  # this process reads m0: it stays
    assert [e.path for e in fc.eviction_candidates(entries, max_bytes=2 * size)] == paths[1:3]
    # seen a minute after the oldest use, every entry was used within the hour: none may go
    assert fc.eviction_candidates(entries, max_bytes=0, now=entries[0].last_used + 60) == []


def test_storing_a_fisher_enforces_the_cap_from_the_environment(cache, monkeypatch):
    old = [_entry(cache, f"org/old{i}", age_days=5) for i in range(3)]
    size = old[0].stat().st_size
    monkeypatch.setenv("HFMERGE_FISHER_CACHE_MAX", str(2 * size + size // 2))
    meta = {"model": "org/fresh", "task": "sst2", "lambda": "", "kind": "diagonal"}
    fresh = fc.store(fc.cache_key(meta), {"w": torch.ones(1000)}, meta, cache)
    left = sorted(p.name for p in cache.glob("*.safetensors"))
    assert fresh.exists() and left == sorted([fresh.name, old[2].name])  # the two least recently used went
    assert fc.lookup(fc.cache_key(meta), root=cache) == fresh


def test_a_bad_cap_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("HFMERGE_FISHER_CACHE_MAX", "lots")
    with pytest.raises(OptionError, match="HFMERGE_FISHER_CACHE_MAX"):
        fc.cache_size_cap()
    monkeypatch.setenv("HFMERGE_FISHER_CACHE_MAX", "none")
    assert fc.cache_size_cap() is None


def test_cache_list_and_clean_commands(cache, capsys):
    old = _entry(cache, "org/old", age_days=30)
    new = _entry(cache, "org/new", age_days=0.5)
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "org/old on sst2" in out and "org/new on sst2" in out and "2 entries" in out
    assert main(["cache", "list", "--json"]) == 0
    assert [e["model"] for e in json.loads(capsys.readouterr().out)] == ["org/old", "org/new"]
    assert main(["cache", "clean", "--older-than", "7", "--dry-run"]) == 0
    assert f"would delete {old}" in capsys.readouterr().out and old.exists()
    assert main(["cache", "clean", "--older-than", "7"]) == 0
    assert not old.exists() and new.exists()
    assert main(["cache", "clean", "--max-size", "1"]) == 0
    assert not new.exists()
    _entry(cache, "org/again")
    assert main(["cache", "clean", "--all"]) == 0
    assert "deleted 1 entry" in capsys.readouterr().out and not list(cache.glob("*.safetensors"))


def test_cache_clean_needs_to_be_told_what(cache, capsys):
    with pytest.raises(SystemExit):
        main(["cache", "clean"])
    assert "one of the arguments --all --older-than --max-size is required" in capsys.readouterr().err


def test_clean_removes_damaged_entries_and_old_unfinished_writes_but_not_a_write_in_progress(cache, capsys):
    sound = _entry(cache, "org/sound")
    damaged = cache / ("0" * 64 + ".safetensors")
    damaged.write_bytes(b"\x00" * 20)
    stale, writing = cache / ".a.safetensors.1.tmp", cache / ".b.safetensors.2.tmp"
    stale.write_bytes(b"x")
    writing.write_bytes(b"x")
    past = time.time() - 2 * 3600
    os.utime(stale, (past, past))
    assert main(["cache", "clean", "--older-than", "365"]) == 0
    assert sound.exists() and writing.exists() and not damaged.exists() and not stale.exists()
