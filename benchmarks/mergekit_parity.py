#!/usr/bin/env python
"""Merge mergekit's test-suite configurations with hfmerge and with mergekit, and compare.

The configurations are those of ``tests/test_mergekit_suite.py`` (mergekit's own merge tests)
that hfmerge runs today, on the tiny models of ``tests/mergekit_fixtures.py``, in float32
(``--dtype`` for another).
mergekit is never installed into hfmerge's virtualenv; pass the python of a separate one::

    python benchmarks/mergekit_parity.py --mergekit-python /path/to/mk-venv/bin/python

For each configuration the table gives the tensors both outputs hold, those only one of them
holds, and the largest |hfmerge - mergekit| over the common tensors (for the configurations in
``MERGEKIT_DIFFERS``, where mergekit renames tensors, under the checkpoint's names). Methods with random
masks (DARE) are listed without a comparison: the two tools draw different masks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from mergekit_fixtures import build_all  # noqa: E402
from test_mergekit_suite import MERGEKIT_DIFFERS, RUNNABLE, compare_outputs, deterministic, run_case, run_mergekit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit-python", required=True, help="python of a virtualenv where mergekit is installed")
    parser.add_argument("--work", type=Path, default=None, help="folder for the models and outputs (default: a temporary one)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="the recipes' dtype (default float32)")
    parser.add_argument("-k", dest="match", default="", help="only configurations whose name contains this")
    args = parser.parse_args(argv)
    logging.getLogger("hfmerge").setLevel(logging.ERROR)

    work = args.work or Path(tempfile.mkdtemp(prefix="mergekit-parity-"))
    models = build_all(work / "models")
    rows = []
    for i, case in enumerate(c for c in RUNNABLE if args.match in c.name):
        label = f"`{case.name.split('::')[-1]}`"
        if not deterministic(case):
            why = "a refused recipe" if case.raises is not None else "random masks"
            rows.append((label, case.method, "", "", "", f"{why}: not compared"))
            continue
        folder = work / f"case-{i:02d}"
        try:
            ours, recipe = run_case(case, models, folder, args.dtype)
            # Where mergekit renames tensors (MERGEKIT_DIFFERS), compare what it wrote under the
            # checkpoint's names.
            rename = (lambda n: n.removeprefix("model.")) if case.name in MERGEKIT_DIFFERS else None
            d = compare_outputs(ours, run_mergekit(args.mergekit_python, recipe, folder), rename=rename)
        except Exception as exc:  # noqa: BLE001  (one failing configuration does not stop the table)
            traceback.print_exc()
            rows.append((label, case.method, "", "", "", f"failed: {type(exc).__name__}"))
            continue
        note = "mergekit's names without the leading `model.`; see MERGEKIT_DIFFERS" if rename else ""
        rows.append((label, case.method, str(d.common), f"{len(d.only_ours)} / {len(d.only_theirs)}",
                     f"{d.max_abs:.3g}" if d.common else "n/a", note))
        print(f"{case.name}: {rows[-1][2:5]}", file=sys.stderr)
    print("| configuration | method | common tensors | only hfmerge / only mergekit | max abs diff | note |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmodels and outputs: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
