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


def test_help_version_and_cache_list_start_without_torch(tmp_path):
    """The quick commands must not pay for importing torch (seconds on a cold machine)."""
    import os

    script = ("import sys\nfrom hfmerge.cli import main\n"
              "for argv in (['--help'], ['--version'], ['demo', '--help'], ['fisher', '--help'], ['eval', '--help'], ['push', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "main(['cache', 'list'])\n"
              "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    env = {**os.environ, "HFMERGE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip().splitlines()[-1] == "False False", result.stdout[-500:]
