"""The `hfmerge` command.

    hfmerge RECIPE [OUT_PATH] [--output DIR] [--dry-run] [--overwrite] [-v | -q] ...
    hfmerge fisher RECIPE [--device ...] [--copy-to DIR] [--json PATH]
    hfmerge eval RECIPE --model PATH [--split validation|test] [--json PATH] ...
    hfmerge demo [--output DIR]
    hfmerge push DIR REPO_ID [--private] [--message M]
    hfmerge cache list|clean ...

Every command and option is described in docs/cli.md (a test checks that none is missing).

`hfmerge CONFIG OUT_PATH` and mergekit-yaml's flags are accepted too (`--cuda`,
`--out-shard-size`, `--no-copy-tokenizer`, `--random-seed`...): each maps to a `RunOptions`
field, is accepted without effect where hfmerge already behaves that way, or is refused with
the reason (docs/cli.md lists them all).

Errors from the `HfMergeError` family are printed as one message without a traceback
(add --verbose for it) and the exit code is non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Callable

from . import __version__
from .api import check_report_path, check_repo_id, merge, plan, plan_summary
from .fileio import human_size, parse_size, write_report_file
from .errors import HfMergeError, OptionError
from .options import RunOptions
from .publish import push

SUBCOMMANDS = ("demo", "eval", "fisher", "push")

EPILOG = """\
examples:
  hfmerge recipe.yaml --dry-run           print the plan and exit
  hfmerge recipe.yaml --output ./merged   merge into ./merged (written atomically)
  hfmerge recipe.yaml ./merged --cuda     the same, as mergekit-yaml writes it (arithmetic on the GPU)
  hfmerge demo                            build small local checkpoints and merge them
  hfmerge eval recipe.yaml --model DIR    score a model on the recipe's tasks
  hfmerge fisher recipe.yaml              compute and cache the Fishers a recipe needs
  hfmerge push ./merged org/name          publish a merged folder in one commit, without merging again

The recipe format (mergekit-compatible keys) is documented in docs/recipes.md.
"""


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
    p.add_argument("out_path", nargs="?", metavar="OUT_PATH", help="the output folder, as mergekit-yaml takes it (the same as --output)")
    p.add_argument("-o", "--output", help="folder to write the merged model into (default: ./merged-<recipe name>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (models, tensors, memory, output size, warnings) and exit without writing")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--max-shard-size", help="cut output shards at this size, e.g. 2GB (overrides the recipe)")
    p.add_argument("--json", metavar="PATH", help="also write the plan (with --dry-run) or the result as JSON")
    p.add_argument("--push-to-hub", nargs="?", const=True, default=None, metavar="REPO_ID",
                   help="upload the output folder to this Hub repo in one commit (default: the recipe's push_to_hub)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--base-model-id", action="append", metavar="PATH=ORG/NAME",
                   help="the Hub repo a local input folder is a copy of, for the model card's base_model metadata "
                        "(repeat per folder; adds to the recipe's hub_ids)")
    p.add_argument("--no-eval", action="store_true", help="do not evaluate the output on the recipe's tasks")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="evaluation batch size (default: 32)")
    p.add_argument("--low-disk", action="store_true",
                   help="download Hub shards to a scratch folder, at most one per model at a time, instead of the Hugging Face cache")
    from .fisher.cli import add_device_arguments

    add_device_arguments(p, device_help="where Fisher models and a search's working model run (default auto: cuda if available, "
                                         "else cpu); cuda also runs the merge arithmetic on the GPU")
    p.set_defaults(device=None)  # None: not given, so that --cuda / --no-cuda can decide (else auto)
    search = p.add_argument_group("search (merge_method: dfmerge, or parameters given as {search: [low, high]})")
    search.add_argument("--resume", action="store_true", help="continue an interrupted search (completed trials are kept)")
    search.add_argument("--storage", metavar="URL", help="Optuna storage shared by several workers, e.g. postgresql://user:pw@host/db (default: a journal file beside the output)")
    search.add_argument("--study-name", metavar="NAME", help="the Optuna study's name (workers sharing --storage use the same one)")
    search.add_argument("--n-trials", type=int, metavar="N", help="total trials of the search (overrides the recipe's n_trials)")
    search.add_argument("--finalize", action="store_true",
                        help="run no trial: build the final merge of a complete shared study (when the worker that claimed it died)")
    search.add_argument("--heartbeat-interval", type=int, default=30, metavar="S",
                        help="seconds between heartbeats of a running trial in a database storage (default 30)")
    search.add_argument("--grace-period", type=int, metavar="S",
                        help="seconds without heartbeat before another worker fails a running trial and runs its λ again (default 4 × the interval)")
    _common(p)
    p.add_argument("--no-quiet", dest="quiet", action="store_false", help="undo -q / --quiet (the default)")
    _mergekit_arguments(p)
    return p


class _Refused(argparse.Action):
    """A mergekit-yaml flag hfmerge refuses: using it is a usage error that gives the reason."""

    def __init__(self, option_strings, dest, reason: str = "", nargs=0, **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS, help=reason, **kwargs)
        self.reason = reason

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, self.reason)


def _no_op(group, *names: str, value: str | None = None, why: str) -> None:
    """Accept mergekit-yaml flags that change nothing here (hfmerge already works that way)."""
    if value is None:
        group.add_argument(*names, action="store_true", dest="_ignored", help=f"accepted, no effect: {why}")
    else:
        group.add_argument(*names, metavar=value, dest="_ignored", help=f"accepted, no effect: {why}")


def _mergekit_arguments(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's flags (mergekit 0.1.5), with their meaning where hfmerge has it."""
    g = p.add_argument_group("mergekit-yaml flags", "accepted so that a mergekit-yaml command line runs unchanged (docs/cli.md: the full table)")
    g.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                   help="--cuda: merge arithmetic on the GPU (--device cuda); --no-cuda: on the CPU (--device cpu)")
    g.add_argument("--gpu-rich", action="store_true", help="mergekit's alias for --cuda --low-cpu-memory --read-to-gpu --multi-gpu: here --cuda")
    g.add_argument("--multi-gpu", action=argparse.BooleanOptionalAction, default=False,
                   help="merge arithmetic on the GPU, as --cuda (hfmerge uses one GPU)")
    g.add_argument("--out-shard-size", metavar="SIZE",
                   help="output shard size as mergekit-yaml takes it: a whole number with an optional K, M or B (10^3, 10^6, 10^9), "
                        "compared with each shard's bytes as mergekit's writer does; 0: one shard")
    g.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer files into the output (default); a recipe's tokenizer_source is copied either way")
    g.add_argument("--write-model-card", action=argparse.BooleanOptionalAction, default=True, help="write README.md, the model card (default)")
    g.add_argument("--random-seed", type=int, metavar="N", help="seed of the random methods: replaces the recipe's parameters.seed")
    g.add_argument("-j", "--num-threads", type=int, metavar="N", help="threads torch uses for the merge arithmetic on the CPU")
    _no_op(g, "--allow-crimes", "--no-allow-crimes", why="hfmerge does not compare architecture names; models merge when their tensor names "
           "and shapes agree, and tensors that disagree cannot be merged with or without it")
    _no_op(g, "--low-cpu-memory", "--no-low-cpu-memory", why="the merge streams one tensor position at a time")
    _no_op(g, "--read-to-gpu", "--no-read-to-gpu", why="inputs are read and checked on the CPU and moved to the merge device per tensor")
    _no_op(g, "--lazy-unpickle", "--no-lazy-unpickle", why="safetensors are read tensor by tensor; pickles only with allow_pickle: true")
    _no_op(g, "--clone-tensors", "--no-clone-tensors", why="every output tensor is written from its own buffer")
    _no_op(g, "--async-write", "--no-async-write", why="shards are written as the merge streams")
    _no_op(g, "--write-threads", value="N", why="shards are written as the merge streams")
    _no_op(g, "--safe-serialization", why="the output is always safetensors")
    _no_op(g, "--no-trust-remote-code", why="hfmerge never runs remote code")
    _no_op(g, "--no-unsafe-truncate-embeddings", why="embeddings are never truncated")
    _no_op(g, "--lora-merge-cache", value="DIR", why="LoRA adapters are applied per tensor while reading; no merged copy is stored")
    _no_op(g, "--lora-merge-dtype", value="DTYPE", why="LoRA adapters are applied per tensor in float32")
    g.add_argument("--trust-remote-code", action=_Refused, reason="refused: hfmerge never runs code from a model repo; it reads only "
                   "config.json and safetensors, so models with custom code merge without it")
    g.add_argument("--unsafe-truncate-embeddings", action=_Refused, reason="refused: hfmerge never discards embedding rows; models whose "
                   "vocabularies differ in size cannot be merged tensor by tensor")
    g.add_argument("--no-safe-serialization", action=_Refused, reason="refused: hfmerge writes safetensors only (no pickled weights)")
    g.add_argument("--transformers-cache", action=_Refused, nargs=1, metavar="DIR",
                   reason="refused: hfmerge downloads through the Hugging Face cache; set HF_HUB_CACHE=DIR instead")
    p.set_defaults(_ignored=None)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="more logging, and tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only errors and the result")
    p.add_argument("--version", action="version", version=f"hfmerge {__version__}")


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
    print(f"  output:      {human_size(s['output_bytes'])} in {s['output_shards']} shard(s)")
    print(f"  peak memory: about {human_size(s['estimated_peak_memory_bytes'])} (estimated)")
    if s.get("search"):
        search = s["search"]
        print(f"  search:      {len(search['space'])} parameter(s), {search['n_trials']} trials ({search['n_startup_trials']} random start), "
              f"seed {search['seed']}" + (f", patience {search['patience']}" if search["patience"] else ""))
        for d in search["space"]:
            scale = ", ".join(x for x in ("log" if d["log"] else "", f"step {d['step']}" if d["step"] is not None else "", d["type"]) if x)
            print(f"    {d['name']}: [{d['low']}, {d['high']}] ({scale})  <- {d['path']}")
    if s.get("fishers_to_compute"):
        print(f"  fishers:     computed (or read from the cache) for {len(s['fishers_to_compute'])} model(s) on their tasks")
    if s["warnings"]:
        print("  warnings:")
        for w in s["warnings"]:
            print(f"    - {w}")


# Libraries whose INFO lines (every HTTP request, every Optuna trial...) show only with -v.
THIRD_PARTY_LOGGERS = ("httpx", "httpcore", "urllib3", "huggingface_hub", "filelock", "fsspec", "datasets", "evaluate", "transformers",
                       "accelerate", "optuna", "torch", "sqlalchemy", "alembic")
# Warnings that say nothing a user can act on; shown with -v.
HARMLESS_WARNINGS = (
    r"There is a performance drop because we have not yet implemented the batching rule",  # torch.func on CPU attention
    r".* is experimental \(supported from v",  # Optuna's ExperimentalWarning for the GP sampler's options
)


def _setup_logging(verbose: bool, quiet: bool) -> Callable[[], None]:
    """Default: hfmerge's own INFO lines and every library's warnings; -v: everything, with the
    libraries' INFO and DEBUG lines; -q: warnings and errors only, and no progress bars from
    any library.

    Returns:
        A function that puts the loggers, warning filters and progress-bar switches back as they
        were (for callers of `main` inside a longer-lived process: tests, notebooks).
    """
    names = ("hfmerge", *THIRD_PARTY_LOGGERS)
    saved_levels = {name: logging.getLogger(name).level for name in names}
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    saved_filters = list(warnings.filters)
    saved_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    # huggingface_hub loads its submodules lazily: it may be imported without `utils` yet.
    hub_utils = importlib.import_module("huggingface_hub.utils") if "huggingface_hub" in sys.modules else None
    hub_bars_off = hub_utils.are_progress_bars_disabled() if hub_utils is not None else None
    tf_bars_on = sys.modules["transformers"].utils.logging.is_progress_bar_enabled() if "transformers" in sys.modules else None

    def restore() -> None:
        for name, old in saved_levels.items():
            logging.getLogger(name).setLevel(old)
        # The root logger too: a library logger left at NOTSET would otherwise inherit this run's
        # level, and print its INFO lines at interpreter exit (torch's atexit cache statistics).
        root.setLevel(saved_root[0])
        root.handlers[:] = saved_root[1]
        warnings.filters[:] = saved_filters
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved_env
        if hub_bars_off is False:
            importlib.import_module("huggingface_hub.utils").enable_progress_bars()
        if tf_bars_on:
            sys.modules["transformers"].utils.logging.enable_progress_bar()

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    # The root logger stays at WARNING (DEBUG with -v), so that a library logger this list does
    # not name shows its warnings only; hfmerge's own logger is set to `level` on its own.
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # a handler, unless the root has one
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("hfmerge").setLevel(level)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        for message in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
    if quiet:
        # huggingface_hub reads this when imported, and transformers takes its progress-bar
        # switch from the hub's; either may already be loaded, so switch them off directly too.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    return restore


# How the command line names the options of `RunOptions` (and `evaluate`) in messages.
_FLAGS = {"evaluate": "--no-eval", "task_names": "--tasks", "model": "--model", "write_model_card": "--no-write-model-card",
          "copy_tokenizer": "--no-copy-tokenizer", "hub_ids": "--base-model-id"}


def _flag(option: str) -> str:
    return _FLAGS.get(option, "--" + option.replace("_", "-"))


def _error_text(exc: HfMergeError) -> str:
    """The message of `exc` as the command line shows it: options named by their flags."""
    if exc.options:
        return f"{' / '.join(_flag(o) for o in exc.options)}: {exc.detail}"
    return str(exc)


def parse_param_count(text: str, *, field: str = "--out-shard-size") -> int:
    """mergekit's size notation: a whole number with an optional suffix K, M or B
    (10^3, 10^6, 10^9, any case), e.g. ``5B`` = 5,000,000,000.

    Raises:
        OptionError: Anything else (mergekit-yaml refuses it too), naming `field`.
    """
    units = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}
    body, suffix = (text[:-1], text[-1].lower()) if text and text[-1].lower() in units else (text, "")
    if not body.isascii() or not body.isdigit():
        hint = "; for a size in bytes with units (5GB, 500MiB) use --max-shard-size" if any(c.isalpha() for c in text) else ""
        raise OptionError(f"expected a whole number with an optional K, M or B suffix (e.g. 5B), got {text!r}{hint}",
                          options=(field.lstrip("-").replace("-", "_"),))
    return int(body) * units[suffix]


def _output(args: argparse.Namespace) -> str | None:
    if args.out_path is None or args.output is None:
        return args.output if args.out_path is None else args.out_path
    if os.path.abspath(args.out_path) != os.path.abspath(args.output):
        raise OptionError(f"the output is given twice and differently: OUT_PATH {args.out_path!r} and --output {args.output!r}; give one",
                          options=("output",))
    return args.output


def _device(args: argparse.Namespace) -> str:
    """--device, or what mergekit's --cuda / --no-cuda / --gpu-rich / --multi-gpu ask for (a
    contradiction between them and --device is refused)."""
    if args.gpu_rich or args.multi_gpu:
        flag, implied = ("--gpu-rich" if args.gpu_rich else "--multi-gpu"), "cuda"
    elif args.cuda is not None:
        flag, implied = ("--cuda", "cuda") if args.cuda else ("--no-cuda", "cpu")
    else:
        return args.device or "auto"
    if args.device is not None and args.device != implied:
        raise OptionError(f"{flag} asks for {implied} but --device says {args.device}; give one", options=("device",))
    return implied


def _max_shard_size(args: argparse.Namespace) -> int | None:

    if args.out_shard_size is not None:
        if args.max_shard_size is not None:
            raise OptionError("--out-shard-size and --max-shard-size both set the shard size; give one", options=("max_shard_size",))
        size = parse_param_count(args.out_shard_size)
        # mergekit's writer cuts a shard when its bytes would pass the size (0: never).
        return size if size > 0 else sys.maxsize
    return parse_size(args.max_shard_size, field="--max-shard-size") if args.max_shard_size else None


def run_options(args: argparse.Namespace) -> RunOptions:
    """The `RunOptions` the merge command's arguments ask for."""
    from .fisher.cli import parse_max_memory

    return RunOptions(
        output=_output(args), overwrite=args.overwrite, max_shard_size=_max_shard_size(args),
        device=_device(args), max_memory=parse_max_memory(args.max_memory), offload_folder=args.offload_folder, low_disk=args.low_disk,
        evaluate=not args.no_eval, batch_size=args.batch_size, progress=not args.quiet, storage=args.storage, study_name=args.study_name,
        n_trials=args.n_trials, resume=args.resume, finalize=args.finalize, heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period, push_to_hub=args.push_to_hub, private=args.private,
        copy_tokenizer=args.copy_tokenizer, write_model_card=args.write_model_card, random_seed=args.random_seed, num_threads=args.num_threads,
        hub_ids=_hub_ids(args.base_model_id),
    )


def _hub_ids(pairs: list[str] | None) -> dict[str, str] | None:
    """--base-model-id PATH=ORG/NAME, given once per folder, as a mapping (checked by the API)."""
    if not pairs:
        return None
    named: dict[str, str] = {}
    for pair in pairs:
        folder, sep, repo_id = pair.rpartition("=")  # a repo id has no '='; a path might
        if not sep or not folder or not repo_id:
            raise OptionError(f"got {pair!r}; expected PATH=ORG/NAME (a local input folder and its Hub repo id)", options=("hub_ids",))
        if named.get(folder, repo_id) != repo_id:
            raise OptionError(f"{folder}: given twice, as {named[folder]} and {repo_id}; give one id", options=("hub_ids",))
        named[folder] = repo_id
    return named


def run_recipe(args: argparse.Namespace) -> int:
    """`hfmerge RECIPE`: the dry run (`hfmerge.plan`) or the whole job (`hfmerge.merge`), printed."""
    options = run_options(args)
    if args.json:
        check_report_path(args.json, args.recipe, options, what="--json file", remedy="choose another --json path")
    if args.dry_run:
        summary = plan_summary(plan(args.recipe, options), options)
        _print_plan(summary)
        if args.json:
            write_report_file(args.json, json.dumps(summary, indent=2) + "\n", what="the --json report")
        return 0
    from .dfmerge import WorkerResult

    result = merge(args.recipe, options, on_plan=None if args.quiet else _print_plan)
    if isinstance(result, WorkerResult):  # a worker of a shared search; another one builds the merge
        if result.search is not None and not args.quiet:
            print(f"This worker completed {result.trials_here} of the study's {len(result.search.trials)} trials.")
        message = result.message
        print(message[0].upper() + message[1:] + ".")
        return 0
    summary = result.summary
    if result.search is not None and not args.quiet:
        search = result.search
        print(f"Best of {len(search.trials)} trials: trial {search.best_trial}, validation score {search.best_value:.4f}, {search.best_text()}")
    if result.evaluation is not None:
        print(result.evaluation.to_table())
    if result.test_evaluation is not None and not args.quiet:
        print(result.test_evaluation.to_table())
    for w in result.warnings[len(summary["warnings"]):]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"Merged model written to {result.output} ({len(result.files)} files)")
    if result.pushed is not None:
        print(f"Pushed to {result.pushed.repo_id}: {result.pushed.commit_url}")
    if args.json:
        write_report_file(args.json, json.dumps({**summary, "output": str(result.output), "files": result.files, "warnings": result.warnings}, indent=2) + "\n",
                          what="the --json report")
    return 0


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

    check_repo_id(args.repo_id, field="REPO_ID")
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


def _demo_parser() -> argparse.ArgumentParser:
    from .demo import DESCRIPTION

    p = argparse.ArgumentParser(prog="hfmerge demo", description=DESCRIPTION)
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
    elif argv and argv[0] == "cache":
        from .fisher.cache_cli import add_arguments as add_cache_arguments

        p = argparse.ArgumentParser(prog="hfmerge cache", description="See and clean the Fisher cache.")
        add_cache_arguments(p)
        args = p.parse_args(argv[1:])
        command = "cache"
    else:
        # Intermixed: `hfmerge CONFIG --cuda OUT_PATH` puts OUT_PATH after a flag, as mergekit-yaml allows.
        args = _merge_parser().parse_intermixed_args(argv)
        command = "merge"
    restore_logging = _setup_logging(args.verbose, args.quiet)
    # A terminated run cleans up like an interrupted one (no half-written output folder).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        if command == "demo":
            from .demo import run_demo

            return run_demo(Path(args.output), progress=not args.quiet)
        if command == "eval":
            from .evaluation.cli import run

            return run(args)
        if command == "fisher":
            from .fisher.cli import run as run_fisher

            return run_fisher(args)
        if command == "push":
            return run_push(args)
        if command == "cache":
            from .fisher.cache_cli import run as run_cache

            return run_cache(args)
        return run_recipe(args)
    except HfMergeError as exc:
        if args.verbose:
            raise
        print(f"error: {_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        restore_logging()


if __name__ == "__main__":
    sys.exit(main())
