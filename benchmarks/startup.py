#!/usr/bin/env python
"""Start-up time of the quick commands: ``--help``, recipe validation and a local ``--dry-run``.

Builds a tiny Llama base and two fine-tuned copies (``hfmerge.testing``) under
``benchmarks/_work/startup/`` and a ``ties`` recipe over them, then times fresh processes
(``python -m hfmerge ...``), each copy of hfmerge given with ``--src`` in turn, interleaved so
that the machine's load falls on both alike. The dry run is timed with the tie-group cache
filled (every dry run after the first of an architecture) and empty (the first).

Examples::

    python benchmarks/startup.py                                   # the installed hfmerge
    python benchmarks/startup.py --src before=/tmp/old after=.     # two copies of the package's parent folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work" / "startup"


def build_inputs() -> Path:
    """The tiny models and the recipe (built once; reused by later runs)."""
    recipe = WORK / "ties.yaml"
    if recipe.is_file():
        return recipe
    from hfmerge.testing import build_base, build_finetuned

    base = build_base(WORK / "base", "llama")
    models = [build_finetuned(base, WORK / f"ft{i}", seed=i) for i in (1, 2)]
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.5}}" for m in models]
    recipe.write_text("\n".join(lines + ["dtype: float32", ""]))
    return recipe


def timed(src: Path | None, args: list[str], cache: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HFMERGE_CACHE": str(cache)}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=WORK, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", nargs="*", default=[], metavar="NAME=FOLDER", help="copies of hfmerge to compare (the folder holding the package)")
    p.add_argument("--repeat", type=int, default=7, help="runs per case (the empty-cache case: at most 3)")
    args = p.parse_args()
    recipe = build_inputs()
    sources = {name: Path(folder).resolve() for name, folder in (s.split("=", 1) for s in args.src)} or {"installed": None}
    cases = {
        "hfmerge --help": (["-m", "hfmerge", "--help"], "warm"),
        "load_recipe(path)": (["-c", f"from hfmerge.recipe import load_recipe; load_recipe({str(recipe)!r})"], "warm"),
        "--dry-run, tie groups cached": (["-m", "hfmerge", str(recipe), "--dry-run"], "warm"),
        "--dry-run, empty cache": (["-m", "hfmerge", str(recipe), "--dry-run"], "cold"),
    }
    times: dict[tuple[str, str], list[float]] = {(c, s): [] for c in cases for s in sources}
    for name, src in sources.items():
        timed(src, cases["--dry-run, tie groups cached"][0], WORK / f"cache-{name}-warm")  # fill the cache
    for i in range(args.repeat):
        for case, (argv, kind) in cases.items():
            if kind == "cold" and i >= 3:
                continue
            for name, src in sources.items():
                cache = WORK / f"cache-{name}-{kind}"
                if kind == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                times[(case, name)].append(timed(src, argv, cache))
    print("| command | " + " | ".join(f"{name}: min / median (s)" for name in sources) + " | runs |")
    print("|---|" + "---|" * len(sources) + "---|")
    for case in cases:
        cells = [f"{min(times[(case, n)]):.2f} / {statistics.median(times[(case, n)]):.2f}" for n in sources]
        print(f"| {case} | " + " | ".join(cells) + f" | {len(times[(case, next(iter(sources)))])} |")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
