"""Summarise table runs made with several search seeds: mean ± sd per row.

    python -m benchmarks.lab seeds DIR DIR ... [--out FILE]

Each DIR is the ``--results`` folder of one ``table --search-seed N`` run (its
``results.json``). For every row that ran in all of them, the table gives each seed's mean
test accuracy, best validation score and wall time, then their mean and sample standard
deviation (n − 1), so a difference between two rows can be read against how much each row
moves with its search seed alone. Rows that do not depend on the seed (the grid rows) come out
with sd 0.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def load_runs(folders: list[Path]) -> list[dict]:
    """The ``results.json`` of each folder, in the order given."""
    runs = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no results.json (run `python -m benchmarks.lab table --results {folder}` first)")
        runs.append(json.loads(path.read_text()))
    return runs


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: list[dict]) -> list[dict]:
    """Per row that every run has, with status ok: the seeds' values and their mean ± sd.

    Returns:
        One dict per row in the first run's order: ``key``, ``label``, ``seeds`` (the runs'
        ``search_seed``), ``test``, ``validation``, ``seconds`` (lists, one value per run;
        validation and seconds may hold None) and ``test_mean``, ``test_sd``,
        ``validation_mean``, ``validation_sd``, ``seconds_mean`` (None where a run lacks the value).
    """
    seeds = [r["settings"].get("search_seed") for r in runs]
    by_run = [{row["key"]: row for row in r["rows"] if row.get("status") == "ok"} for r in runs]
    out = []
    for key in [row["key"] for row in runs[0]["rows"]]:
        rows = [b.get(key) for b in by_run]
        if any(r is None or r.get("average") is None for r in rows):
            continue
        test = [r["average"] for r in rows]
        validation = [r.get("validation_average") for r in rows]
        seconds = [r.get("seconds") for r in rows]
        t_mean, t_sd = mean_sd(test)
        entry = {"key": key, "label": rows[0]["label"], "seeds": seeds, "test": test, "validation": validation,
                 "seconds": seconds, "test_mean": t_mean, "test_sd": t_sd,
                 "validation_mean": None, "validation_sd": None, "seconds_mean": None}
        if all(v is not None for v in validation):
            entry["validation_mean"], entry["validation_sd"] = mean_sd(validation)
        if all(v is not None for v in seconds):
            entry["seconds_mean"] = statistics.fmean(seconds)
        out.append(entry)
    return out


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _pm(m: float | None, sd: float | None) -> str:
    if m is None:
        return ""
    return _pct(m) if sd is None else f"{100 * m:.2f} ± {100 * sd:.2f}"


def seeds_table(summary: list[dict]) -> str:
    """Markdown: per row, test and best validation (%) per seed and mean ± sd, and wall time."""
    if not summary:
        return "(no row ran in every run)"
    seeds = summary[0]["seeds"]
    head = ("| Method | " + " | ".join(f"test, seed {s}" for s in seeds) + " | test mean ± sd | "
            + " | ".join(f"valid., seed {s}" for s in seeds) + " | valid. mean ± sd | wall s (mean) |")
    lines = [head, "|---|" + "---:|" * (2 * len(seeds) + 3)]
    for e in summary:
        secs = "" if e["seconds_mean"] is None else f"{e['seconds_mean']:.0f}"
        lines.append(f"| {e['label']} | " + " | ".join(_pct(v) for v in e["test"]) + f" | {_pm(e['test_mean'], e['test_sd'])} | "
                     + " | ".join(_pct(v) for v in e["validation"]) + f" | {_pm(e['validation_mean'], e['validation_sd'])} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.lab seeds",
                                description="Mean ± sd over table runs with different --search-seed values.")
    p.add_argument("folders", nargs="+", type=Path, help="--results folders of the table runs (each with results.json)")
    p.add_argument("--out", type=Path, help="also write the summary as JSON to this file")
    args = p.parse_args(argv)
    summary = summarise(load_runs(args.folders))
    print(seeds_table(summary))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
