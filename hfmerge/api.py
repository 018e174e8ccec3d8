"""The Python API: every verb of the `hfmerge` command as a typed function.

    import hfmerge

    result = hfmerge.merge("recipe.yaml", hfmerge.RunOptions(output="merged"))
    plan = hfmerge.plan("recipe.yaml")                   # the dry run: nothing is written
    report = hfmerge.evaluate("merged", "recipe.yaml")   # score a model on a recipe's tasks
    hfmerge.push("merged", "org/name")                   # publish a merged folder

These functions return data and never print: progress goes to tqdm bars (``progress``) and
messages to the ``hfmerge`` logger. The `hfmerge` command (`hfmerge.cli`) only turns its
arguments into a `RunOptions`, calls them and prints what they return. Errors are of the
`HfMergeError` family; one about a `RunOptions` field is an `OptionError` naming the field.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .errors import OptionError, RecipeError, short_repr
from .options import RunOptions, device_settings, output_settings

if TYPE_CHECKING:
    from .dfmerge import WorkerResult
    from .evaluation.evaluate_model import EvalReport
    from .evaluation.tasks import TaskData, TaskSpec
    from .fisher.engine import FisherRecord
    from .merging import InputPath, MergeResult
    from .planning import MergePlan
    from .recipe import Recipe
    from .searching import SearchResult

logger = logging.getLogger("hfmerge")

__all__ = ["merge", "plan", "plan_summary", "evaluate", "compute_fishers", "search", "check_report_path", "default_output"]


def _options(options: RunOptions | None, overrides: dict[str, Any]) -> RunOptions:
    options = options or RunOptions()
    unknown = sorted(set(overrides) - {f.name for f in fields(RunOptions)})
    if unknown:
        raise TypeError(f"unknown RunOptions field(s): {', '.join(unknown)}")
    return replace(options, **overrides) if overrides else options


def _load(recipe: str | Path | Recipe, options: RunOptions) -> Recipe:
    from .fileio import parse_size
    from .recipe import Recipe, load_recipe

    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    # Copies: a Recipe given by the caller is left as it was.
    if options.max_shard_size is not None:
        loaded = replace(loaded, max_shard_size=parse_size(options.max_shard_size, field="max_shard_size"))
    if options.random_seed is not None:
        loaded = _with_seed(loaded, options.random_seed)
    if options.hub_ids is not None:
        loaded = _with_hub_ids(loaded, options.hub_ids)
    return loaded


def _with_hub_ids(recipe: Recipe, hub_ids: dict[str, str]) -> Recipe:
    """`recipe` with the Hub ids `hub_ids` gives its local inputs (over the recipe's own)."""
    from .recipe import named_hub_ids, recipe_inputs

    def fail(where: str, message: str) -> OptionError:
        return OptionError(f"{where[1:-1]}: {message}" if where else message, options=("hub_ids",))

    named = named_hub_ids(hub_ids, recipe_inputs(recipe), base_dir=None, fail=fail)
    return replace(recipe, hub_ids={**recipe.hub_ids, **named})


def _with_seed(recipe: Recipe, seed: int) -> Recipe:
    """`recipe` with ``parameters.seed`` replaced by `seed` (also in the echoed YAML, so the
    output's recipe reproduces it), and the ``search:`` block's seed when the recipe searches
    parameters; with a warning when neither the method nor a search draws at random."""
    if recipe.search is not None:
        # The seed of a recipe's search (its `search:` block), and of the method's draws below.
        raw = {**recipe.raw, "search": {**(recipe.raw.get("search") or {}), "seed": seed}}
        recipe = replace(recipe, search=replace(recipe.search, seed=seed), raw=raw)
        if recipe.method.param("seed") is None:
            return recipe
    if recipe.method.param("seed") is None:
        note = f"random_seed {seed}: merge_method {recipe.method.name!r} has no seed (it draws no random numbers); the seed has no effect"
        return replace(recipe, warnings=[*recipe.warnings, note])
    raw = dict(recipe.raw)
    raw["parameters"] = {**(raw.get("parameters") or {}), "seed": seed}
    return replace(recipe, parameters={**recipe.parameters, "seed": seed}, raw=raw)


def default_output(recipe: Recipe) -> Path:
    """``./merged-<recipe file stem>``: where a merge writes when no output is given."""
    return Path.cwd() / f"merged-{Path(recipe.path).stem if recipe.path else 'recipe'}"


def plan_summary(plan: MergePlan, options: RunOptions | None = None) -> dict[str, Any]:
    """The plan as a JSON-friendly mapping (what a dry run reports).

    Args:
        plan: From `build_plan` or `hfmerge.plan`.
        options: The run's options, where they override the recipe (a search's `n_trials`).

    Returns:
        The recipe, method, models, tensor counts, sizes, estimated peak memory, warnings,
        ``vocabulary`` when the embeddings are re-indexed to an output vocabulary (its tokens,
        rows and the re-indexed tensors) and, when the method needs Fishers not yet computed,
        ``fishers_to_compute``.
    """
    from .checkpoints.writer import plan_shards
    from .recipe import recipe_syntax

    recipe = plan.recipe
    merged = [t for t in plan.tensors if t.merge]
    summary: dict[str, Any] = {
        "recipe": recipe.source,
        "method": recipe.method.name,
        # What will run, as the recipe's `parameters:` would say it: values in recipe syntax,
        # per-model defaults given there included, and options that override the recipe applied.
        "parameters": {k: recipe_syntax(v) for k, v in {**recipe.parameters, **recipe.model_defaults}.items()},
        "base_model": None if plan.base is None else {"ref": plan.base.ref.text, "folder": str(plan.base.folder), "files": len(plan.base.files)},
        "models": [
            {"key": spec.key, "ref": ckpt.ref.text, "folder": str(ckpt.folder),
             "parameters": {k: recipe_syntax(v) for k, v in spec.parameters.items()}}
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
    if options is not None and options.n_trials is not None and "n_trials" in summary["parameters"]:
        summary["parameters"]["n_trials"] = options.n_trials
    spec = recipe.search
    if spec is not None:
        # The search space and budget, as the run will use them.
        n_trials = spec.n_trials if options is None or options.n_trials is None else options.n_trials
        summary["search"] = {
            "n_trials": n_trials, "n_startup_trials": min(spec.n_startup_trials, n_trials), "seed": spec.seed, "patience": spec.patience,
            "space": [{**r.describe(), "path": r.path} for r in spec.space],
            "enqueue": [dict(p) for p in spec.enqueue],
        }
    if plan.vocabulary is not None:
        # The output vocabulary the embeddings and heads are re-indexed to.
        summary["vocabulary"] = {"tokens": plan.vocabulary.tokens, "rows": plan.vocabulary.rows,
                                 "tensors": [t.name for t in plan.tensors if t.vocabulary]}
    if _needs_fishers(plan):
        summary["fishers_to_compute"] = [m.ref.text for m in recipe.models if m.fisher is None]
    return summary


def _needs_fishers(plan: MergePlan) -> bool:
    method = plan.recipe.method
    return method.needs_importance and not method.search and plan.fishers is None


def _push_target(recipe: Recipe, options: RunOptions) -> str | None:
    if options.push_to_hub is None or options.push_to_hub is False:
        return None
    repo_id = options.push_to_hub if isinstance(options.push_to_hub, str) else recipe.push_to_hub
    if not repo_id:
        raise OptionError("needs a repo id: give one or set push_to_hub in the recipe", options=("push_to_hub",))
    check_repo_id(repo_id, field="push_to_hub")
    return repo_id


def _check_push(recipe: Recipe, options: RunOptions) -> str | None:
    """The full id of the repo a run pushes to, once the token is known to write there (None:
    no push); a bare name gets the token's user as namespace."""
    repo_id = _push_target(recipe, options)
    if not repo_id:
        return None
    from .publish import check_push_access

    # A missing or read-only token fails here, in seconds, not after a long merge or search.
    return check_push_access(repo_id).repo_id


def check_repo_id(repo_id: str, field: str = "repo_id") -> None:
    """Refuse anything but a Hub repo id to push to: ``org/name``, or a bare ``name`` (which
    goes to the token's user); no revision, no local path.

    Raises:
        RecipeError: Naming `field`.
    """
    from .refs import is_hub_repo_id

    if not is_hub_repo_id(repo_id, field=field):
        raise RecipeError(f"{field}: {short_repr(repo_id)} is not a Hub repo id; expected org/name or a name of your own")


def _inputs(recipe: Recipe, options: RunOptions) -> list[InputPath]:
    from .merging import recipe_input_paths

    return recipe_input_paths(recipe, low_disk=options.low_disk, storage=options.storage)


def check_report_path(path: str | Path, recipe: str | Path | Recipe, options: RunOptions | None = None, *, what: str = "report file",
                      remedy: str = "choose another report path") -> None:
    """Refuse a report file (e.g. a JSON summary) that would replace or lie inside an input.

    Args:
        path: The file to be written.
        recipe: The recipe whose inputs it must not touch.
        options: The run's options (low-disk scratch and search storage are inputs too).
        what: How messages name the file.
        remedy: What to do, for the message.

    Raises:
        OutputIsInputError: It is, contains or lies inside something the run reads.
    """
    from .merging import check_not_input

    options = options or RunOptions()
    check_not_input(Path(path), _inputs(_load(recipe, options), options), what=what, remedy=remedy)


def plan(recipe: str | Path | Recipe, options: RunOptions | None = None, **overrides: Any) -> MergePlan:
    """The dry run: validate the recipe, pin the models, read the safetensors headers and
    check that everything fits, without merging or writing anything.

    Args:
        recipe: A recipe file or a parsed `Recipe`.
        options: Run options (`low_disk`, `max_shard_size`, `output` and `push_to_hub` are
            used: the push target's token is checked as a merge would).
        **overrides: `RunOptions` fields replacing those of `options`.

    Returns:
        The `MergePlan` (its files closed, low-disk downloads removed); `plan_summary` turns
        it into a report.

    Raises:
        RecipeError: The recipe is malformed.
        CheckpointError: A checkpoint cannot be read or the checkpoints disagree.
        HubAccessError: `push_to_hub` is set and the token cannot write the repo.
        OutputIsInputError: `output` is given and is, contains or lies inside an input.
    """
    from .merging import check_not_input
    from .planning import build_plan

    options = _options(options, overrides)
    loaded = _load(recipe, options)
    _check_push(loaded, options)
    if options.output is not None:
        check_not_input(Path(options.output), _inputs(loaded, options))
    built = build_plan(loaded, low_disk=options.low_disk)
    built.release()
    return built


def merge(recipe: str | Path | Recipe, options: RunOptions | None = None, *, on_plan: Callable[[dict[str, Any]], None] | None = None,
          **overrides: Any) -> MergeResult | WorkerResult:
    """Run a recipe's whole job: plan, Fishers or DF-Merge search, merge, evaluate, push.

    Everything that can be refused is refused before any weight is read: the output path
    (never an input, nor an existing folder without `overwrite`), the Hub token when pushing,
    the free disk space, the tasks' data and metrics.

    Args:
        recipe: A recipe file or a parsed `Recipe` (left unchanged).
        options: Run options; default `RunOptions()`.
        on_plan: Called with the plan summary (`plan_summary`) once the plan is built and
            checked, before any weight is read: a caller can show it while the merge runs.
        **overrides: `RunOptions` fields replacing those of `options`, e.g. ``output="merged"``.

    A ``dfmerge`` search with a shared `storage` makes this call one worker of the study
    (docs/search.md): it runs trials until the study has ``n_trials`` completed ones; exactly
    one worker then builds (and pushes) the final merge from the best trial.

    Returns:
        The `MergeResult`: the output folder and its files, warnings, the plan summary, the
        validation (and a search's test) evaluation, the search result and the push's commit.
        A `WorkerResult` instead when another worker of a shared search builds the final
        merge, or built it already (then nothing is loaded).

    Raises:
        RecipeError: The recipe is malformed.
        OptionError: A `RunOptions` field does not fit the recipe or this machine.
        HubAccessError: Pushing, and the token is missing or cannot write the repo.
        OutputIsInputError: `output` is, contains or lies inside something the run reads.
        OutputExistsError: `output` exists and `overwrite` is false.
        OutputWriteError: The disk is full, read-only or not writable (nothing is left behind).
        HfMergeError: Any other problem found while planning or merging.
    """
    from .merging import MergeResult, check_output
    from .planning import build_plan

    options = _options(options, overrides)
    loaded = _load(recipe, options)
    output = Path(options.output) if options.output is not None else default_output(loaded)
    push_repo = _check_push(loaded, options)
    # Nothing the recipe reads may be replaced by what this run writes: refused before any reading.
    # Also clears temporary folders that killed runs left on this output.
    if options.device == "cuda":
        device_settings(options)  # no CUDA device here: an error now, whatever the method
    if _shared_search(loaded, options):
        from .recipe_search import check_shared_search

        # The database reached (or one clear error) and the study's state read before any model is loaded.
        late = check_shared_search(loaded, options, output)
        if late is not None:
            return late
    check_output(output, options.overwrite, _inputs(loaded, options))
    built = build_plan(loaded, low_disk=options.low_disk)
    threads = None
    try:
        if options.num_threads is not None:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(options.num_threads)
        result = _merge_planned(built, loaded, output, options, on_plan, push_repo)
    finally:
        built.release()  # run_merge releases it too; a second release does nothing
        if threads is not None:
            torch.set_num_threads(threads)
    if push_repo and isinstance(result, MergeResult):
        from .publish import push_folder

        result.pushed = push_folder(result.output, push_repo, private=options.private, message=f"Merge with hfmerge ({loaded.method.name})")
    return result


def _shared_search(recipe: Recipe, options: RunOptions) -> bool:
    """True for a recipe that searches its coefficients in a shared study (or finalises one)."""
    searches = (recipe.method.search and not all("weight" in m.parameters for m in recipe.models)) or recipe.search is not None
    if options.finalize and not searches:
        raise OptionError(f"{recipe.source} does not search coefficients; there is no search to finalise", options=("finalize",))
    return searches and (options.storage is not None or options.finalize)


def _merge_planned(built: MergePlan, loaded: Recipe, output: Path, options: RunOptions,
                   on_plan: Callable[[dict], None] | None, push_repo: str | None = None) -> MergeResult | WorkerResult:
    from .merging import MergeResult, check_free_space, run_merge

    check_free_space(output, built.output_bytes)  # before a long search or Fisher computation
    summary = plan_summary(built, options)
    if on_plan is not None:
        on_plan(summary)
    # The model's name: the repo it is published as, else its folder.
    title = push_repo.split("/")[-1] if push_repo else output.name
    evaluate_output = None
    if loaded.tasks and options.evaluate:
        from .evaluation.evaluate_model import evaluate_model, prepare_tasks

        # Task data and metrics are loaded and checked before any weight moves.
        prepared = prepare_tasks(loaded.tasks, "validation", progress=options.progress)

        def evaluate_output(folder: Path) -> EvalReport:
            return evaluate_model(folder, prepared, "validation", batch_size=options.batch_size, progress=options.progress, model_name=title)
    if loaded.method.search:
        from .dfmerge import run_dfmerge

        result = run_dfmerge(built, output, options, evaluate=evaluate_output, title=title, repo_id=push_repo)
        if not isinstance(result, MergeResult):
            return result
    else:
        built = _with_needed_fishers(built, options)
        if loaded.search is not None:
            from .recipe_search import run_parameter_search

            result = run_parameter_search(built, output, options, evaluate=evaluate_output, title=title, repo_id=push_repo)
            if not isinstance(result, MergeResult):
                return result
        else:
            result = run_merge(built, output, overwrite=options.overwrite, progress=options.progress, evaluate=evaluate_output,
                               title=title, repo_id=push_repo, **output_settings(options))
    result.summary = summary
    return result


def _with_needed_fishers(built: MergePlan, options: RunOptions) -> MergePlan:
    """`built` with the Fishers its method needs, computed or read from the cache (itself when
    it needs none). They do not depend on searched parameters: computed once, before a search."""
    if not _needs_fishers(built):
        return built
    from .fisher.engine import ensure_fishers
    from .planning import with_fishers

    records = ensure_fishers(built, progress=options.progress, **device_settings(options))
    for r in records:
        logger.info("Fisher of %s: %s (%s)", r.model, r.path, r.source)
    return with_fishers(built, [r.path for r in records])  # shares the checkpoints `merge` releases


def search(recipe: str | Path | Recipe, options: RunOptions | None = None, **overrides: Any) -> SearchResult:
    """Run a recipe's search only, without merging: a ``dfmerge`` recipe's coefficients, or
    the parameters any other recipe gives as ``{search: [low, high]}``.

    The study and its trial log stay beside `options.output` (or in `options.storage`): a
    later `merge` to the same output with ``resume=True`` continues from them instead of
    searching again.

    Args:
        recipe: A ``dfmerge`` recipe, or one with searched ranges: a file or a parsed `Recipe`.
        options: Run options (`output`, `storage`, `study_name`, `n_trials`, `resume`,
            `device`, `batch_size`, `low_disk`, `progress` are used).
        **overrides: `RunOptions` fields replacing those of `options`.

    Returns:
        The `SearchResult`: the best values (`best_params`, and by name `best`), its
        validation score (`best_value`), its trial number and every completed trial.

    Raises:
        RecipeError: The recipe searches nothing (no ``{search: ...}`` range; for ``dfmerge``,
            every model's λ fixed).
        OptionError: A device map was asked for, or the device is not available.
        SearchError: A previous study is in the way (continue it with ``resume=True``), or
            the storage cannot be opened.
    """
    from .dfmerge import search_coefficients
    from .planning import build_plan

    options = _options(options, overrides)
    loaded = _load(recipe, options)
    if not loaded.method.search and loaded.search is None:
        raise RecipeError(f"{loaded.source}: nothing is searched: merge_method {loaded.method.name!r} has no coefficient search and no "
                          "parameter is given a range such as {search: [0.1, 0.9]}; merge the recipe instead")
    if loaded.method.search and all("weight" in m.parameters for m in loaded.models):
        raise RecipeError(f"{loaded.source}: every model has its weight (λ) fixed; there is nothing to search")
    output = Path(options.output) if options.output is not None else default_output(loaded)
    if options.storage is not None:
        from .recipe_search import check_shared_search

        check_shared_search(loaded, replace(options, finalize=False), output)  # the database reached, before any model
    built = build_plan(loaded, low_disk=options.low_disk)
    try:
        if loaded.search is not None:
            from .recipe_search import search_parameters

            built = _with_needed_fishers(built, options)
            return search_parameters(built, output, options)
        return search_coefficients(built, output, options)
    finally:
        built.release()


def compute_fishers(recipe: str | Path | Recipe, options: RunOptions | None = None, **overrides: Any) -> list[FisherRecord]:
    """Compute and cache the Fishers a ``fisher`` or ``fisher_nodes`` recipe needs (for a
    ``regmean`` recipe, the Gram matrices of the linear layers' inputs).

    Every model without a ``fisher:`` file gets its Fisher on its task at θ_i, read from the
    cache when the same inputs were seen before; a later `merge` then only reads them.

    Args:
        recipe: A recipe file or a parsed `Recipe`.
        options: Run options (`device`, `max_memory`, `offload_folder`, `progress` are used).
        **overrides: `RunOptions` fields replacing those of `options`.

    Returns:
        One `FisherRecord` per model (task, where the Fisher came from, seconds, file), in the
        recipe's order.

    Raises:
        RecipeError: The method uses no Fisher, or computes its own during a search.
        OptionError: The device asked for is not available.
        FisherError: A Fisher cannot be computed.
    """
    from .fisher.engine import ensure_fishers
    from .planning import build_plan, with_fishers

    options = _options(options, overrides)
    loaded = _load(recipe, options)
    if not loaded.method.needs_importance:
        raise RecipeError(f"{loaded.source}: merge_method {loaded.method.name!r} uses no Fisher; nothing to compute")
    if loaded.method.search:
        raise RecipeError(f"{loaded.source}: merge_method {loaded.method.name!r} computes its Fishers at each searched coefficient during the search; "
                          "run the recipe itself")
    settings = device_settings(options)
    built = build_plan(loaded)
    try:
        records = ensure_fishers(built, progress=options.progress, **settings)
        with_fishers(built, [r.path for r in records])  # checked against the checkpoints as a merge will read them
        return records
    finally:
        built.release()


def evaluate(model: str | Path | Any, tasks: str | Path | Recipe | Sequence[TaskSpec | TaskData], *, split: str = "validation",
             task_names: Sequence[str] | None = None, batch_size: int = 32, device: str | None = "auto", dtype: str | None = None,
             tokenizer: Any = None, progress: bool = True) -> EvalReport:
    """Score a model on tasks by rank classification over the answer options (or generation).

    Args:
        model: A model folder, a Hub repo id, or a loaded `transformers` model (then give
            `tokenizer`).
        tasks: A YAML file with a ``tasks:`` list (a recipe, a list of tasks or one
            lm-evaluation-harness task), a parsed `Recipe`, parsed tasks, or tasks already
            loaded with their data (`prepare_tasks`), so that repeated evaluations read the
            data once.
        split: ``"validation"`` or ``"test"``.
        task_names: Evaluate only these tasks.
        batch_size: (example, option) pairs per forward pass.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        dtype: Model dtype (default: float32 on CPU, the checkpoint's on GPU).
        tokenizer: The tokenizer, when `model` is a loaded model.
        progress: Show progress bars.

    Returns:
        The `EvalReport` (per-task metrics and their average; ``to_table()``, ``to_json()``).

    Raises:
        TaskError: A task is malformed or its data does not fit it.
        OptionError: A name in `task_names` is not one of the tasks, or `batch_size` < 1.
        EvaluationError: The model cannot be loaded or evaluated.
    """
    from .evaluation.evaluate_model import evaluate_model
    from .evaluation.tasks import load_tasks_file
    from .recipe import Recipe

    if batch_size < 1:
        raise OptionError(f"got {batch_size}; expected a positive number", options=("batch_size",))
    where = "the tasks"
    if isinstance(tasks, Recipe):
        specs, where = list(tasks.tasks), tasks.source
    elif isinstance(tasks, (str, Path)):
        specs, where = load_tasks_file(tasks), str(tasks)
    else:
        specs = list(tasks)
    if task_names:
        names = [t.name for t in specs]
        unknown = [w for w in task_names if w not in names]
        if unknown:
            raise OptionError(f"{', '.join(map(repr, unknown))} not in {where} (tasks: {', '.join(names)})", options=("task_names",))
        specs = [t for t in specs if t.name in task_names]
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    return evaluate_model(model, specs, split, tokenizer=tokenizer, batch_size=batch_size, device=device, dtype=dtype, progress=progress,
                          model_name=name)
