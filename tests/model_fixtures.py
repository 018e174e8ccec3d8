"""Session fixtures: tiny checkpoint families built once per test session (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from hfmerge.testing import FAMILIES, build_base, build_finetuned


@dataclass
class Family:
    name: str
    base: Path
    finetuned: list[Path]


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, fam in enumerate(FAMILIES):
        base = build_base(root / fam / "base", fam, seed=i)
        fts = [build_finetuned(base, root / fam / f"ft{j}", seed=100 * i + j) for j in range(3)]
        out[fam] = Family(fam, base, fts)
    return out


@pytest.fixture(scope="session")
def t5(families) -> Family:
    return families["t5"]
