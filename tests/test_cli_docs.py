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


def test_library_info_lines_show_only_with_verbose_and_quiet_silences_progress_bars():
    """Default output: hfmerge's own lines; -v: the libraries' INFO too; -q: no progress bars,
    and everything put back afterwards (main may run inside a longer process)."""
    import logging
    import warnings

    from huggingface_hub.utils import are_progress_bars_disabled

    seen = {}

    def probe(verbose: bool, quiet: bool) -> None:
        filters = list(warnings.filters)
        restore = cli._setup_logging(verbose, quiet)
        seen[(verbose, quiet)] = (logging.getLogger("httpx").getEffectiveLevel(), logging.getLogger("hfmerge").getEffectiveLevel(),
                                  are_progress_bars_disabled(), logging.getLogger("some.unlisted.package").getEffectiveLevel())
        restore()
        assert warnings.filters == filters
        assert (root.level, root.handlers) == root_before  # a NOTSET library logger inherits nothing from the run

    root = logging.getLogger()
    root_before = (root.level, list(root.handlers))
    before = (logging.getLogger("httpx").level, are_progress_bars_disabled())
    for verbose, quiet in ((False, False), (True, False), (False, True)):
        probe(verbose, quiet)
        assert (logging.getLogger("httpx").level, are_progress_bars_disabled()) == before  # restored
    assert seen[(False, False)][0] == logging.WARNING and seen[(False, False)][1] == logging.INFO
    assert seen[(True, False)][0] == logging.DEBUG
    # A library the list does not name: its warnings by default, its INFO lines only with -v.
    assert seen[(False, False)][3] == logging.WARNING and seen[(True, False)][3] == logging.DEBUG
    assert seen[(False, True)][2] is True and seen[(False, False)][2] is before[1]


def test_a_harmless_library_warning_is_hidden_unless_verbose():
    import warnings

    for verbose, shown in ((False, 0), (True, 1)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restore = cli._setup_logging(verbose, False)
            try:
                warnings.warn("There is a performance drop because we have not yet implemented the batching rule for aten::x", UserWarning)
                warnings.warn("something a user should see", UserWarning)
            finally:
                restore()
        texts = [str(w.message) for w in caught]
        assert "something a user should see" in texts
        assert sum("performance drop" in t for t in texts) == shown
