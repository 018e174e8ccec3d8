"""Searching any method's recipe parameters: Bayesian optimisation over ``{search: [low, high]}``.

A recipe may give any numeric parameter a range instead of a value (``density: {search: [0.1,
0.9]}``, ``weight: {search: [0, 1]}`` per model, a gradient's points); `hfmerge.recipe` checks
the ranges and collects them in ``Recipe.search`` with the ``search:`` block's settings. This
module runs that search with the same Optuna engine as DF-Merge (`hfmerge.searching`: study,
storage, resume, shared workers, trial log, early stopping):

1. a trial's values are written into the recipe (`with_search_values`): an ordinary recipe,
   and a plan that shares the opened checkpoints;
2. the candidate is merged one tensor position at a time, exactly as the final merge will be
   (same arithmetic, same seeds for methods with random draws): the first trial writes it into
   a scratch folder and loads it as the output is loaded for evaluation, later trials merge
   straight into that loaded model (`ParameterObjective`);
3. the candidate is scored on the recipe's validation tasks (the mean of their metrics,
   `EvalReport.search_score`).

The best trial's values then make the final plan, merged into the output folder like any
recipe; the card, the trial log, the study and the plot of the search go with it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from .dfmerge import (
    WorkerResult, claim_or_leave, final_message, merge_final, open_study, release_claim, run_study, search_workdir, test_section,
    write_search_record,
)
from .dfmerge import search_settings as dfmerge_settings
from .errors import OptionError
from .options import RunOptions, device_settings, merge_device
from .recipe import Recipe, with_search_values
from .searching import SearchResult, SearchSettings, TrialOutcome, open_search, storage_label

if TYPE_CHECKING:
    from .merging import MergeResult
    from .planning import MergePlan

DEFAULT_STUDY_NAME = "hfmerge-search"
SUMMARY_FILE = "hfmerge_search.json"


def search_settings(recipe: Recipe, options: RunOptions) -> SearchSettings:
    """The settings of a recipe's parameter search: its ranges and ``search:`` block, with the
    options' trials and storage.

    Args:
        recipe: A recipe with a search (`Recipe.search`).
        options: The run's options (`n_trials`, `storage`, `study_name`, heartbeats).

    Returns:
        The `SearchSettings`, one dimension per searched parameter, named as the recipe's
        ranges are (`SearchRange.name`).
    """
    spec = recipe.search
    assert spec is not None
    dims = list(spec.space)
    n_trials = spec.n_trials if options.n_trials is None else int(options.n_trials)
    return SearchSettings(names=[d.name for d in dims], dimensions=dims, n_trials=n_trials,
                          n_startup_trials=min(spec.n_startup_trials, n_trials), seed=spec.seed,
                          enqueue=[[point[d.name] for d in dims] for point in spec.enqueue], patience=spec.patience or None,
                          storage=options.storage, study_name=options.study_name or DEFAULT_STUDY_NAME,
                          heartbeat_interval=options.heartbeat_interval, grace_period=options.grace_period, title="Parameter search")


def plan_with_values(plan: MergePlan, values: dict[str, float]) -> MergePlan:
    """The plan of one candidate: `plan` with every searched parameter fixed (same checkpoints)."""
    from dataclasses import replace

    return replace(plan, recipe=with_search_values(plan.recipe, values))


class ParameterObjective:
    """The search objective: values → the candidate merged → validation score.

    The first trial writes its candidate into a scratch folder with the streaming merge and
    loads it for evaluation as the output will be loaded (`load_model_for_eval`). That model is
    then kept as the working model: each later trial merges its tensors one position at a time
    straight into it (the same arithmetic, cast to the output dtype and then to the model's,
    as loading the written file would), so a trial costs no write and no load. An
    architecture whose loaded parameters do not all carry the checkpoint's tensor names keeps
    the folder for every trial.

    Args:
        plan: The merge plan of the searched recipe (checkpoints opened; Fishers attached when
            the method needs them).
        tasks: The recipe's tasks with their validation split loaded (`prepare_tasks`).
        scratch: The folder the candidates are written into (emptied after each trial).
        options: The run's options (`device`, `batch_size`).
    """

    def __init__(self, plan: MergePlan, tasks: list, scratch: Path, options: RunOptions) -> None:
        self.plan = plan
        self.tasks = tasks
        self.scratch = Path(scratch)
        self.keys = [r.name for r in plan.recipe.search_space]
        self.merge_device = merge_device(options)
        self.eval_device = device_settings(options)["device"]
        self.batch_size = options.batch_size
        self.model: Any = None  # the working model, once a candidate was loaded and its tensors mapped
        self.tokenizer: Any = None
        self._targets: dict[str, list[Any]] = {}  # output tensor name -> the model's tensors it fills

    def _merger(self, values: list[float]) -> tuple[MergePlan, Any]:
        from .merging import TensorMerger

        candidate = plan_with_values(self.plan, dict(zip(self.keys, values)))
        merger = TensorMerger(candidate, self.merge_device)
        merger.prepare(False)
        return candidate, merger

    def write(self, values: list[float], folder: Path) -> MergePlan:
        """Merge the candidate for `values` into `folder` (weights, config, tokenizer); its plan."""
        from .merging import copy_side_files, write_weights

        candidate, merger = self._merger(values)
        folder.mkdir(parents=True, exist_ok=True)
        write_weights(candidate, merger, folder, False)
        copy_side_files(candidate, folder)
        return candidate

    def merge_into_model(self, values: list[float]) -> None:
        """Working model ← the candidate for `values`, one tensor position at a time."""
        import torch

        candidate, merger = self._merger(values)
        with torch.no_grad():
            for t in candidate.tensors:
                targets = self._targets.get(t.name)
                if targets:
                    merged = merger.merge(t)
                    for target in targets:
                        target.copy_(merged.to(device=target.device, dtype=target.dtype))

    def _load(self, folder: Path) -> tuple[Any, Any]:
        """Load the candidate in `folder`; keep it as the working model when each of its
        parameters is stored under one of its own names."""
        from .errors import CheckpointError
        from .evaluation.evaluate_model import load_model_for_eval
        from .fisher.models import checkpoint_name_map

        model, tokenizer = load_model_for_eval(folder, device=self.eval_device)
        written = {t.name for t in self.plan.tensors}
        try:
            names = checkpoint_name_map(model, written, "candidate")
        except CheckpointError:  # loaded under other names (a conversion on load): this trial only
            return model, tokenizer
        params = dict(model.named_parameters())
        targets: dict[str, list[Any]] = {}
        for name, stored in names.items():
            targets.setdefault(stored[0], []).append(params[name])  # tied copies are merged alike: one fills the parameter
        for name, buf in model.named_buffers():
            if name in written:
                targets.setdefault(name, []).append(buf)
        self.model, self.tokenizer, self._targets = model, tokenizer, targets
        return model, tokenizer

    def __call__(self, values: list[float]) -> TrialOutcome:
        from transformers.utils import logging as transformers_logging

        from .evaluation.evaluate_model import evaluate_model

        folder = self.scratch / f"candidate-{os.getpid()}"  # one per worker sharing this search folder
        shutil.rmtree(folder, ignore_errors=True)
        bars = transformers_logging.is_progress_bar_enabled()
        try:
            start = time.perf_counter()
            if self.model is not None:
                self.merge_into_model(values)
                model, tokenizer = self.model, self.tokenizer
            else:
                self.write(values, folder)
                transformers_logging.disable_progress_bar()  # one loading bar per trial would bury the search's own
                model, tokenizer = self._load(folder)
            merge_s = time.perf_counter() - start  # the first trial's load included
            report = evaluate_model(model, self.tasks, "validation", tokenizer=tokenizer, batch_size=self.batch_size, progress=False,
                                    model_name="candidate")
            eval_s = time.perf_counter() - start - merge_s
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
            shutil.rmtree(folder, ignore_errors=True)
        return TrialOutcome(report.search_score, report.scores, {"merge_s": merge_s, "eval_s": eval_s})


def check_shared_search(recipe: Any, options: RunOptions, output: Path) -> WorkerResult | None:
    """Before any model is loaded: open a search's storage and tell whether there is work here.

    Called for a recipe that searches (a ``dfmerge`` recipe, or any recipe with
    ``{search: ...}`` ranges), when `options.storage` is given or
    `options.finalize` is set. Opening the storage reports an unreachable database or a
    wrong password as one `SearchError` line.

    Returns:
        A `WorkerResult` when the study's final merge is built or being built by another
        worker (nothing to do here); None when this run has work: trials to run, or the
        final merge to build.

    Raises:
        SearchError: The storage cannot be opened, or the study was made for other models.
        OptionError: `finalize` with no study, or with one that is not complete yet.
    """
    settings = dfmerge_settings(recipe, options) if recipe.method.search else search_settings(recipe, options)
    search = open_search(settings, workdir=search_workdir(output), create=False)
    if search is None:
        if options.finalize:
            where = storage_label(settings.storage) if settings.storage else search_workdir(output)
            raise OptionError(f"there is no search {settings.study_name!r} in {where}; nothing to finalise",
                              options=("finalize",))
        return None
    try:
        final = search.final()
        if final is not None and (final.get("state") == "done" or (final.get("state") == "building" and not options.finalize)):
            return WorkerResult(settings.study_name, search.label, final_message(search, final), final)
        if options.finalize and not search.complete():
            complete, running = search.counts()
            raise OptionError(f"the search {settings.study_name!r} in {search.label} has {complete} of {settings.n_trials} completed trials "
                              f"({running} running); the final merge is built from a complete search: start workers without this option",
                              options=("finalize",))
        return None
    finally:
        search.close()


def _objective(plan: MergePlan, workdir: Path, options: RunOptions) -> ParameterObjective:
    from .evaluation.evaluate_model import prepare_tasks

    return ParameterObjective(plan, prepare_tasks(plan.recipe.tasks, "validation"), workdir, options)


def search_parameters(plan: MergePlan, output: Path, options: RunOptions) -> SearchResult:
    """Search the recipe's parameters only: nothing is written into `output`.

    The study and trial log stay in `search_workdir(output)` (or `options.storage`), so that a
    later merge to `output` with `options.resume` continues from them.

    Args:
        plan: From `build_plan` for a recipe with a search (left open; the caller releases it).
        output: The output folder a later merge will write.
        options: The run's options.

    Returns:
        The `SearchResult` (`best` maps each parameter to its best value).

    Raises:
        SearchError: The search cannot start or continue.
    """
    workdir = search_workdir(output)
    return run_study(open_study(search_settings(plan.recipe, options), workdir, options), _objective(plan, workdir, options), options)


def run_parameter_search(plan: MergePlan, output: Path, options: RunOptions, *, evaluate: Callable[[Path], Any] | None = None,
                         title: str | None = None, repo_id: str | None = None) -> MergeResult | WorkerResult:
    """Search the recipe's parameters, then merge the best trial, evaluate and write the output.

    With a shared study (`options.storage`) this process is one worker, exactly as for
    DF-Merge (`hfmerge.dfmerge.run_dfmerge`): it runs trials until the study has ``n_trials``
    completed ones; one worker then builds the final merge, the others return a `WorkerResult`.

    Args:
        plan: From `build_plan` for a recipe with a search (Fishers attached when needed).
        output: The output folder (written atomically, as every merge).
        options: The run's options.
        evaluate: Validation evaluation of the written folder (the card's model-index).
        title, repo_id: The model's name and Hub repo for its card (see `run_merge`).

    Returns:
        The `MergeResult` with the `SearchResult`, or a `WorkerResult`.

    Raises:
        SearchError: The search cannot start or continue.
    """
    searched = plan.recipe
    output = Path(output).absolute()
    workdir = search_workdir(output)
    shared = options.storage is not None or options.finalize
    search = None
    try:
        search = open_study(search_settings(searched, options), workdir, options)
        result = run_study(search, _objective(plan, workdir, options), options)
        if shared:
            left = claim_or_leave(search, result, output, options, plan)
            if left is not None:
                return left
    except BaseException as exc:
        plan.release()
        release_claim(search, exc, shared=shared)
        raise
    # The final merge is an ordinary recipe with the best values written in: echoed that way, it
    # reproduces this model without searching again.
    final = plan_with_values(plan, result.best)

    def extra(folder: Path, test_reports: list[Any]) -> tuple[list[str], str]:
        return _write_search_outputs(folder, searched, result, workdir, options, test_reports)

    return merge_final(final, output, options, search, result, extra, evaluate=evaluate, title=title, repo_id=repo_id)


def _range_text(r: Any) -> str:
    extras = [e for e in ("log" if r.log else "", f"step {r.step}" if r.step is not None else "", "integer" if r.integer else "") if e]
    return f"[{r.low}, {r.high}]" + (f" ({', '.join(extras)})" if extras else "")


def _write_search_outputs(folder: Path, searched: Recipe, result: SearchResult, workdir: Path, options: RunOptions,
                          test_reports: list[Any]) -> tuple[list[str], str]:
    spec = searched.search
    assert spec is not None
    files, mean = write_search_record(folder, result, workdir, spec.n_startup_trials, result.keys, symbol=None)
    rows = "".join(f"| `{r.name}` | `{r.path}` | {_range_text(r)} | {result.best[r.name]:.6g} |\n" for r in spec.space)
    section = (
        "\n## Search\n\n"
        f"The parameters below were searched by Bayesian optimisation (Optuna GPSampler, logEI) over {len(result.trials)} completed "
        f"trials ({min(spec.n_startup_trials, len(result.trials))} random start), seed {spec.seed}: each candidate was merged and scored "
        "on the validation tasks. The recipe further down has the chosen values written in; it reproduces this model without a search.\n\n"
        "| parameter | recipe key | searched range | chosen |\n|---|---|---|---|\n" + rows +
        f"\nBest validation score {result.best_value:.4f} at trial {result.best_trial}"
        + (" (stopped early: no improvement within the patience)" if result.stopped_early else "")
        + f". Mean seconds per trial: merge {mean['merge_s']:.2f}, evaluation {mean['eval_s']:.2f}. "
        "The trial log is `trials.jsonl`" + (", the Optuna study `study.journal`" if "study.journal" in files else "") + ".\n\n"
        "![Search trajectory: best score so far and the searched values by trial; the random start is shaded](search.png)\n\n"
        "The recipe as searched:\n\n```yaml\n" + yaml.safe_dump(searched.raw, sort_keys=False).rstrip() + "\n```\n"
    )
    summary: dict[str, Any] = {
        "method": searched.method.name,
        "space": [{**r.describe(), "path": r.path} for r in spec.space],
        "best": result.best, "best_trial": result.best_trial, "best_validation_score": result.best_value, "trials": result.trials,
        "study_name": result.study_name, "storage": result.storage, "stopped_early": result.stopped_early,
        "n_startup_trials": spec.n_startup_trials, "seed": spec.seed,
    }
    more, test_text = test_section(folder, searched.tasks, options, test_reports, summary)
    files += more
    section += test_text
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files.append(SUMMARY_FILE)
    return files, section


__all__ = ["ParameterObjective", "check_shared_search", "plan_with_values", "run_parameter_search", "search_parameters", "search_settings"]
