"""docs/cli.md documents every option of every subcommand (the docs cannot drift silently)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from hfmerge import cli
from hfmerge.evaluation import cli as eval_cli
from hfmerge.fisher import cache_cli
from hfmerge.fisher import cli as fisher_cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _options(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _parsers() -> dict[str, argparse.ArgumentParser]:
    fisher = argparse.ArgumentParser()
    fisher_cli.add_arguments(fisher)
    evaluation = argparse.ArgumentParser()
    eval_cli.add_arguments(evaluation)
    cache = argparse.ArgumentParser()
    cache_cli.add_arguments(cache)
    return {"merge": cli._merge_parser(), "demo": cli._demo_parser(), "push": cli._push_parser(), "fisher": fisher, "eval": evaluation, "cache": cache}


def test_every_option_of_every_subcommand_is_in_docs_cli_md():
    text = DOCS.read_text()
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    missing = {name: sorted(_options(p) - documented - {"--help"}) for name, p in _parsers().items()}
    assert not any(missing.values()), f"options missing from docs/cli.md: { {k: v for k, v in missing.items() if v} }"


def test_every_subcommand_has_its_synopsis_in_docs_cli_md():
    synopsis = DOCS.read_text().split("```", 2)[1]
    for command in ("hfmerge RECIPE", "hfmerge fisher", "hfmerge eval", "hfmerge demo", "hfmerge push", "hfmerge cache list", "hfmerge cache clean"):
        assert command in synopsis, command
