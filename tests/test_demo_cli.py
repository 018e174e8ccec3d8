"""The README's first command and the CLI's help."""

from __future__ import annotations

import subprocess
import sys

from hfmerge.cli import main


def test_demo_builds_merges_and_reloads(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "task_arithmetic" in out and "ties" in out and "ok, logits" in out
    for method in ("task_arithmetic", "ties"):
        assert (tmp_path / "demo" / f"merged-{method}" / "model.safetensors").is_file()
    # A second run reuses the built models and replaces the merged folders.
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q"]) == 0


def test_console_script_help_explains_the_commands():
    result = subprocess.run([sys.executable, "-m", "hfmerge.cli", "--help"], capture_output=True, text=True, check=True)
    assert "--dry-run" in result.stdout and "--output" in result.stdout and "hfmerge demo" in result.stdout
