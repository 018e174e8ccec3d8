"""The `hfmerge` command.

    hfmerge RECIPE [--output DIR] [--dry-run] [--overwrite] [-v | -q]
    hfmerge demo [--output DIR]
    hfmerge push DIR REPO_ID [--private] [--message M]

Errors from the `HfMergeError` family are printed as one message without a traceback
(add --verbose for it) and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from . import __version__
from .checkpoints.writer import plan_shards, write_report_file
from .errors import HfMergeError

SUBCOMMANDS = ("demo", "eval", "fisher", "push")

EPILOG = """\
examples:
  hfmerge recipe.yaml --dry-run           print the plan and exit
  hfmerge recipe.yaml --output ./merged   merge into ./merged (written atomically)
  hfmerge demo                            build small local checkpoints and merge them
  hfmerge eval recipe.yaml --model DIR    score a model on the recipe's tasks
  hfmerge fisher recipe.yaml              compute and cache the Fishers a recipe needs
  hfmerge push ./merged org/name          publish a merged folder in one commit, without merging again

The recipe format (mergekit-compatible keys) is documented in docs/recipes.md.
"""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hfmerge",
        description="Merge fine-tuned checkpoints of one pre-trained model as a YAML recipe says.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="the recipe YAML file (or a subcommand: demo, eval, fisher, push)")
    p.add_argument("-o", "--output", help="folder to write the merged model into (default: ./merged-<recipe name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (models, tensors, memory, output size, warnings) and exit without writing")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--max-shard-size", help="cut output shards at this size, e.g. 2GB (overrides the recipe)")
    p.add_argument("--json", metavar="PATH", help="also write the plan (with --dry-run) or the result as JSON")
    p.add_argument("--push-to-hub", nargs="?", const=True, default=None, metavar="REPO_ID",
                   help="upload the output folder to this Hub repo in one commit (default: the recipe's push_to_hub)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the output on the recipe's tasks")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="evaluation batch size (default: 32)")
    p.add_argument("--low-disk", action="store_true",
                   help="download Hub shards to a scratch folder, at most one per model at a time, instead of the Hugging Face cache")
    from .fisher.cli import add_device_arguments

    add_device_arguments(p)
    search = p.add_argument_group("coefficient search (merge_method: dfmerge)")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search (completed trials are kept)")
    search.add_argument("--storage", metavar="URL", help="Optuna storage shared by several workers, e.g. postgresql://user:pw@host/db (default: a journal file beside the output)")
    search.add_argument("--study-name", metavar="NAME", help="the Optuna study's name (workers sharing --storage use the same one)")
    search.add_argument("--n-trials", type=int, metavar="N", help="total trials of the search (overrides the recipe's n_trials)")
    _common(p)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors and the result")
    p.add_argument("--version", action="version", version=f"hfmerge {__version__}")


def plan_summary(plan) -> dict:
    """The plan as a JSON-friendly mapping (what --dry-run prints)."""
    recipe = plan.recipe
    merged = [t for t in plan.tensors if t.merge]
    return {
        "recipe": recipe.source,
        "method": recipe.method.name,
        "parameters": {k: v for k, v in recipe.parameters.items()},
        "base_model": None if plan.base is None else {"ref": plan.base.ref.text, "folder": str(plan.base.folder), "files": len(plan.base.files)},
        "models": [
            {"key": spec.key, "ref": ckpt.ref.text, "folder": str(ckpt.folder), "parameters": {k: (v if isinstance(v, (int, float, str, bool)) else repr(v)) for k, v in spec.parameters.items()}}
            for spec, ckpt in zip(recipe.models, plan.models)
        ],
        "tensors": len(plan.tensors),
        "tensors_merged": len(merged),
        "tensors_copied": len(plan.tensors) - len(merged),
        "parameters_count": plan.parameter_count,
        "output_bytes": plan.output_bytes,
        "output_shards": len(plan_shards(plan.output_tensors, recipe.max_shard_size)),
        "estimated_peak_memory_bytes": plan.estimated_peak_bytes(),
        "warnings": list(plan.warnings),
    }


def _print_plan(s: dict) -> None:
    print(f"Plan for {s['recipe']}")
    params = ", ".join(f"{k}={v}" for k, v in s["parameters"].items())
    print(f"  method:      {s['method']}" + (f" ({params})" if params else ""))
    if s["base_model"]:
        print(f"  base model:  {s['base_model']['ref']}  [{s['base_model']['folder']}]")
    print(f"  models:      {len(s['models'])}")
    for m in s["models"]:
        mp = ", ".join(f"{k}={v}" for k, v in m["parameters"].items())
        print(f"    {m['key']}: {m['ref']}" + (f"  ({mp})" if mp else ""))
    print(f"  tensors:     {s['tensors']} ({s['tensors_merged']} merged, {s['tensors_copied']} copied)")
    print(f"  parameters:  {_count(s['parameters_count'])}")
    print(f"  output:      {_human(s['output_bytes'])} in {s['output_shards']} shard(s)")
    print(f"  peak memory: about {_human(s['estimated_peak_memory_bytes'])} (estimated)")
    if s.get("fishers_to_compute"):
        print(f"  fishers:     computed (or read from the cache) for {len(s['fishers_to_compute'])} model(s) on their tasks")
    if s["warnings"]:
        print("  warnings:")
        for w in s["warnings"]:
            print(f"    - {w}")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def run_recipe(args: argparse.Namespace) -> int:
    from .merge import check_free_space, check_not_input, check_output, clean_stale_temp_folders, recipe_input_paths, run_merge
    from .plan import build_plan
    from .recipe import RecipeError, load_recipe, parse_size

    recipe = load_recipe(args.recipe)
    if getattr(args, "n_trials", None) is not None and args.n_trials < 1:
        raise RecipeError(f"--n-trials: got {args.n_trials}; expected a positive number of trials")
    if args.max_shard_size:
        recipe.max_shard_size = parse_size(args.max_shard_size, field="--max-shard-size")
    output = Path(args.output) if args.output else Path.cwd() / f"merged-{Path(args.recipe).stem}"
    push_repo = None
    if args.push_to_hub is not None:
        push_repo = args.push_to_hub if isinstance(args.push_to_hub, str) else recipe.push_to_hub
        if not push_repo:
            raise RecipeError("--push-to-hub needs a repo id: give one after the flag or set push_to_hub in the recipe")
        _check_repo_id(push_repo)
        from .publish import check_push_access

        # A missing or read-only token fails here, in seconds, not after a long merge or search.
        check_push_access(push_repo)
    # Nothing the recipe reads may be replaced by what this run writes: refused before any reading.
    inputs = recipe_input_paths(recipe, low_disk=args.low_disk, storage=getattr(args, "storage", None))
    if args.json:
        check_not_input(Path(args.json), inputs, what="--json file", remedy="choose another --json path")
    if not args.dry_run:
        check_not_input(output, inputs)
        # Temporary folders of killed runs on this output go first (a killed --overwrite may
        # have left the old output in one, which is put back).
        clean_stale_temp_folders(output)
        check_output(output, args.overwrite, inputs)
    elif args.output:
        check_not_input(output, inputs)
    plan = build_plan(recipe, low_disk=args.low_disk)
    if not args.dry_run:
        try:
            check_free_space(output, plan.output_bytes)
        except BaseException:
            plan.release()
            raise
    summary = plan_summary(plan)
    needs_fishers = recipe.method.needs_importance and not recipe.method.search and plan.fishers is None
    if needs_fishers:
        summary["fishers_to_compute"] = [m.ref.text for m in recipe.models if m.fisher is None]
    if args.dry_run:
        plan.release()
        _print_plan(summary)
        if args.json:
            write_report_file(args.json, json.dumps(summary, indent=2) + "\n", what="the --json report")
        return 0
    if not args.quiet:
        _print_plan(summary)
    evaluate = None
    if recipe.tasks and not args.no_eval:
        from .evaluation.evaluate_model import prepare_tasks
        from .evaluation.evaluate_model import evaluate_model as _evaluate_model

        # Task data and metrics are loaded and checked before any weight moves.
        prepared = prepare_tasks(recipe.tasks, "validation", progress=not args.quiet)

        def evaluate(folder: Path):
            return _evaluate_model(folder, prepared, "validation", batch_size=args.batch_size, progress=not args.quiet,
                                   model_name=output.name)
    if recipe.method.search:
        from .dfmerge import run_dfmerge

        result = run_dfmerge(plan, output, args, evaluate=evaluate)
    else:
        if needs_fishers:
            from .fisher.cli import device_options
            from .fisher.engine import ensure_fishers

            try:
                for r in ensure_fishers(plan, progress=not args.quiet, **device_options(args)):
                    logging.getLogger("hfmerge").info("Fisher of %s: %s (%s)", r.model, r.path, r.source)
            except BaseException:
                plan.release()
                raise
        result = run_merge(plan, output, overwrite=args.overwrite, progress=not args.quiet, evaluate=evaluate)
    if result.evaluation is not None:
        print(result.evaluation.to_table())
    for w in result.warnings[len(plan.warnings):]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"Merged model written to {result.output} ({len(result.files)} files)")
    if push_repo:
        from .publish import push_folder

        pushed = push_folder(result.output, push_repo, private=args.private, message=f"Merge with hfmerge ({recipe.method.name})")
        print(f"Pushed to {pushed.repo_id}: {pushed.commit_url}")
    if args.json:
        write_report_file(args.json, json.dumps({**summary, "output": str(result.output), "files": result.files, "warnings": result.warnings}, indent=2) + "\n",
                          what="the --json report")
    return 0


def _check_repo_id(repo_id: str, field: str = "--push-to-hub") -> None:
    from .recipe import RecipeError
    from .refs import parse_model_ref

    ref = parse_model_ref(repo_id, field=field) if "/" in repo_id and not repo_id.startswith((".", "/", "~")) else None
    if ref is None or ref.repo_id is None or ref.revision is not None:
        raise RecipeError(f"{field}: {repo_id!r} is not a Hub repo id; expected org/name")


def _push_parser() -> argparse.ArgumentParser:
    from .publish import DEFAULT_COMMIT_MESSAGE

    p = argparse.ArgumentParser(
        prog="hfmerge push",
        description="Publish a folder that a merge wrote to a Hub repo in one commit, without merging again. "
                    "The folder is checked to be a complete hfmerge output and the token to have write access first.",
    )
    p.add_argument("folder", help="the merged model folder (a merge's --output)")
    p.add_argument("repo_id", help="the Hub repo to push to, org/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("-m", "--message", default=DEFAULT_COMMIT_MESSAGE, help=f"the commit message (default: {DEFAULT_COMMIT_MESSAGE!r})")
    _common(p)
    return p


def run_push(args: argparse.Namespace) -> int:
    """`hfmerge push DIR REPO_ID`: check the folder and the token, then push one commit."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from .publish import push

    _check_repo_id(args.repo_id, field="REPO_ID")
    was_disabled = are_progress_bars_disabled()
    if args.quiet:
        disable_progress_bars()
    try:
        pushed = push(Path(args.folder), args.repo_id, private=args.private, message=args.message)
    finally:
        if not was_disabled:
            enable_progress_bars()
    print(f"Pushed to {pushed.repo_id}: {pushed.commit_url}")
    return 0


def _check_fisher_outputs(args: argparse.Namespace) -> None:
    """`hfmerge fisher`: --json and --copy-to may not replace or land inside what the recipe reads."""
    if not (getattr(args, "json", None) or getattr(args, "copy_to", None)):
        return
    from .merge import InputPath, check_not_input, recipe_input_paths
    from .recipe import load_recipe

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


def _check_eval_outputs(args: argparse.Namespace) -> None:
    """`hfmerge eval`: --json may not replace or land inside the model, the tasks file or the task data."""
    if not getattr(args, "json", None):
        return
    from .evaluation.tasks import load_tasks_file
    from .merge import InputPath, cache_input_paths, check_not_input, task_input_paths

    inputs = [InputPath(Path(args.recipe), "the tasks file")] + task_input_paths(load_tasks_file(args.recipe))
    if Path(args.model).expanduser().exists():
        inputs.append(InputPath(Path(args.model).expanduser(), "--model"))
    inputs += cache_input_paths(datasets=True)
    check_not_input(Path(args.json), inputs, what="--json file", remedy="choose another --json path")


def _demo_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hfmerge demo", description="Build small local checkpoints, merge them with task arithmetic and check that transformers loads the result. Offline.")
    p.add_argument("-o", "--output", default="hfmerge-demo", help="working folder for the demo (default: ./hfmerge-demo)")
    _common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        args = _demo_parser().parse_args(argv[1:])
        command = "demo"
    elif argv and argv[0] == "fisher":
        from .fisher.cli import add_arguments as add_fisher_arguments

        p = argparse.ArgumentParser(prog="hfmerge fisher", description="Compute and cache the Fishers a fisher or fisher_nodes recipe needs.")
        add_fisher_arguments(p)
        _common(p)
        args = p.parse_args(argv[1:])
        command = "fisher"
    elif argv and argv[0] == "eval":
        from .evaluation.cli import add_arguments

        p = argparse.ArgumentParser(prog="hfmerge eval", description="Score a model on a recipe's tasks by rank classification over the answer options.")
        add_arguments(p)
        _common(p)
        args = p.parse_args(argv[1:])
        command = "eval"
    elif argv and argv[0] == "push":
        args = _push_parser().parse_args(argv[1:])
        command = "push"
    else:
        args = _merge_parser().parse_args(argv)
        command = "merge"
    _setup_logging(args.verbose, args.quiet)
    # A terminated run cleans up like an interrupted one (no half-written output folder).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        if command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.output), progress=not args.quiet)
        if command == "eval":
            from .evaluation.cli import run

            _check_eval_outputs(args)
            return run(args)
        if command == "fisher":
            from .fisher.cli import run as run_fisher

            _check_fisher_outputs(args)
            return run_fisher(args)
        if command == "push":
            return run_push(args)
        return run_recipe(args)
    except HfMergeError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
