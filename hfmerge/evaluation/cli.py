"""``hfmerge eval``: evaluate a model on a recipe's tasks.

    hfmerge eval RECIPE --model PATH [--split validation|test] [--json PATH]
                 [--batch-size N] [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16]
                 [--tasks NAME,...]

RECIPE is any YAML file with a ``tasks:`` list (a recipe; its other keys are ignored), a bare
list of tasks, or one lm-evaluation-harness task. Prints one row per task and metric and the
average of the tasks' first metrics; ``--json`` also writes them.

`add_arguments` and `run` plug into the main ``hfmerge`` parser (hfmerge/cli.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` arguments to `parser` (not -v/-q, which the main parser adds).

    Args:
        parser: The subcommand's parser.

    Returns:
        The same parser.
    """
    parser.add_argument("recipe", help="a YAML file with a tasks: list (a recipe, a list of tasks or one harness task)")
    parser.add_argument("-m", "--model", required=True, help="the model to evaluate: a local folder (or a Hub repo id, with the network)")
    parser.add_argument("--split", choices=("validation", "test"), default="validation", help="which split of each task to score (default: validation)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="(example, option) pairs per forward pass; prompts per generate call for generate_until tasks (default: 32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                        help="model dtype (default: float32 on CPU, the checkpoint's on GPU)")
    parser.add_argument("--tasks", metavar="NAME[,NAME...]", help="evaluate only these tasks")
    parser.add_argument("--predictions", action="store_true", help="with --json: also write each example's predicted option (or generated answer)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``hfmerge eval`` with parsed arguments.

    Args:
        args: From a parser set up by `add_arguments` (``quiet`` is read if present).

    Returns:
        The exit code (0).

    Raises:
        HfMergeError: A task, metric or model problem (the caller prints it).
    """
    from ..api import evaluate
    from ..errors import TaskError

    if args.batch_size < 1:
        raise TaskError(f"--batch-size: got {args.batch_size}; expected a positive number")
    check_outputs(args)
    quiet = bool(getattr(args, "quiet", False))
    wanted = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    report = evaluate(args.model, args.recipe, split=args.split, task_names=wanted, batch_size=args.batch_size, device=args.device,
                      dtype=args.dtype, progress=not quiet)
    if not quiet:
        print(f"{report.model} on {len(report.results)} task(s), {report.split} split ({report.seconds:.1f} s)")
    print(report.to_table())
    if args.json:
        from ..fileio import write_report_file

        write_report_file(args.json, report.to_json(predictions=bool(getattr(args, "predictions", False))), what="the --json report")
        if not quiet:
            print(f"figures written to {args.json}")
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """`hfmerge eval`: --json may not replace or land inside the model, the tasks file or the task data."""
    if not getattr(args, "json", None):
        return
    from ..merging import InputPath, cache_input_paths, check_not_input, task_input_paths
    from .tasks import load_tasks_file

    inputs = [InputPath(Path(args.recipe), "the tasks file")] + task_input_paths(load_tasks_file(args.recipe))
    if Path(args.model).expanduser().exists():
        inputs.append(InputPath(Path(args.model).expanduser(), "--model"))
    inputs += cache_input_paths(datasets=True)
    check_not_input(Path(args.json), inputs, what="--json file", remedy="choose another --json path")
