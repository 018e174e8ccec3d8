"""``hfmerge fisher``: compute and cache the Fishers a recipe needs.

    hfmerge fisher RECIPE [--device cpu|cuda|auto] [--max-memory DEV=SIZE,...] [--offload-folder DIR]
                   [--copy-to DIR] [--json PATH]

For ``fisher`` and ``fisher_nodes`` recipes (and ``regmean``, whose Gram matrices it computes
the same way): every model without a ``fisher:`` file gets its Fisher on its task at θ_i,
from the cache when the same inputs were seen before. A later ``hfmerge RECIPE`` then only
reads them. Prints one row per model (task, where the Fisher came from, seconds, file).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..errors import RecipeError

__all__ = ["add_arguments", "add_device_arguments", "run", "parse_max_memory"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``fisher`` arguments to `parser` (not -v/-q)."""
    parser.add_argument("recipe", help="a fisher, fisher_nodes or regmean recipe with a task per model")
    add_device_arguments(parser)
    parser.add_argument("--copy-to", metavar="DIR", help="also copy the Fisher files into DIR as <model-index>-<name>.fisher.safetensors")
    parser.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    return parser


def add_device_arguments(parser: argparse.ArgumentParser, device_help: str = "where Fisher models run (default: cuda if available, else cpu)") -> None:
    """Where Fisher models run: shared by ``hfmerge fisher`` and the merge command (which says more in `device_help`)."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=device_help)
    parser.add_argument("--max-memory", metavar="DEV=SIZE[,...]",
                        help="load Fisher models with an accelerate device map within these budgets, e.g. 0=20GiB,cpu=60GiB (layers beyond go to disk)")
    parser.add_argument("--offload-folder", metavar="DIR", help="where a device map offloads layers that fit nowhere else (with --max-memory)")


def parse_max_memory(text: str | None) -> dict | None:
    """``0=20GiB,cpu=60GiB`` → ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's ``max_memory``)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        if "=" not in part:
            raise RecipeError(f"--max-memory: {part!r} is not DEVICE=SIZE (e.g. 0=20GiB or cpu=60GiB)")
        dev, size = (s.strip() for s in part.split("=", 1))
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def run(args: argparse.Namespace) -> int:
    """Run ``hfmerge fisher`` with parsed arguments."""
    from ..api import compute_fishers
    from ..options import RunOptions

    check_outputs(args)
    options = RunOptions(device=args.device, max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder,
                         progress=not args.quiet)
    records = compute_fishers(args.recipe, options)
    if args.copy_to:
        target = Path(args.copy_to)
        target.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(records):
            dest = target / f"{i}-{Path(r.model).name}.fisher.safetensors"
            shutil.copyfile(r.path, dest)
            r.path = dest
    rows = [("model", "task", "source", "seconds", "file")] + [(r.model, r.task or "", r.source, f"{r.seconds:.1f}", str(r.path)) for r in records]
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    for j, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        from ..fileio import write_report_file

        write_report_file(args.json, json.dumps([{"model": r.model, "task": r.task, "source": r.source, "seconds": round(r.seconds, 3),
                                                  "path": str(r.path)} for r in records], indent=2) + "\n", what="the --json report")
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """`hfmerge fisher`: --json and --copy-to may not replace or land inside what the recipe reads."""
    if not (getattr(args, "json", None) or getattr(args, "copy_to", None)):
        return
    from ..merging import InputPath, check_not_input, recipe_input_paths
    from ..recipe import load_recipe

    inputs = recipe_input_paths(load_recipe(args.recipe))
    if args.json:
        check_not_input(Path(args.json), inputs, what="--json file", remedy="choose another --json path")
    if args.copy_to:
        # Copies are added beside whatever the folder holds (nothing is deleted), so it may
        # hold inputs; but not be one, lie inside one, or be where a Fisher file of the recipe
        # lies (a copy could take its name).
        folders = [i for i in inputs if i.path.is_dir()]
        folders += [InputPath(i.path.parent, f"the folder of {i.field}", output_may_lie_inside=True) for i in inputs if i.field.endswith(".fisher")]
        check_not_input(Path(args.copy_to), folders, what="--copy-to folder", remedy="choose another --copy-to folder", may_contain=True)
