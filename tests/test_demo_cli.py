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


def test_demo_help_names_both_methods_and_the_output_explains_its_columns(tmp_path, capsys):
    import pytest
    from transformers import AutoTokenizer

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "task arithmetic" in help_text and "TIES" in help_text
    assert main(["demo", "-o", str(tmp_path / "demo"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "cos(τ, τ_a): cosine similarity between the merge's task vector" in out
    tok = AutoTokenizer.from_pretrained(tmp_path / "demo" / "merged-ties")  # the merged model carries the base's tokenizer
    assert tok("w5 w6")["input_ids"] == [5, 6, 1]
