"""benchmarks/gpu_check.py refuses at once, in one line, where there is no CUDA device."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_refuses_clearly_without_cuda():
    # No CUDA device visible to the script, on any machine (where there is one, run the script itself).
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device is available") and "Nothing was checked" in lines[0]
