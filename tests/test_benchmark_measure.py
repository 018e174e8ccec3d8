"""The merge benchmarks' peak-memory measurement (benchmarks/merge_memory.py, run_measured)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from merge_memory import run_measured  # noqa: E402

MiB = 2**20


def test_a_childs_peak_is_its_own_not_the_drivers():
    # Linux starts a forked child's ru_maxrss at its parent's high-water mark; the launcher keeps
    # the driver's peak (here at least 256 MiB) out of the figure.
    ballast = bytearray(256 * MiB)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    small = run_measured([sys.executable, "-c", "pass"])
    big = run_measured([sys.executable, "-c", "b = bytearray(150 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"])
    assert len(ballast) == 256 * MiB
    assert small.peak_rss_bytes < 100 * MiB
    assert 150 * MiB <= big.peak_rss_bytes < 256 * MiB
    assert big.cpu_s >= 0 and big.wall_s > 0


def test_a_failing_command_stops_with_its_exit_status():
    try:
        run_measured([sys.executable, "-c", "raise SystemExit(3)"])
    except SystemExit as e:
        assert "exit 3" in str(e)
    else:
        raise AssertionError("no error for a failing command")
