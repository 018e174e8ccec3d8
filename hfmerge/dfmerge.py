"""DF-Merge end to end: search the coefficients λ, then merge and publish like any recipe.

For a candidate λ (one trial):

1. for each model i: put θ_pre + λ_i τ_i into the one working model (in place), compute its
   diagonal Fisher F_i on task i's N Fisher examples (drawn once, reused by every trial) and
   add F_i ⊙ λ_i τ_i and F_i into two running sums (equation 8; F_i is then dropped);
2. put θ = θ_pre + M · Σ F_i λ_i τ_i / Σ F_i into the working model;
3. score it on the tasks' validation splits: the mean of the tasks' metrics is the objective.

The task vectors τ_i are read once from the checkpoints and kept; nothing else is copied per
trial. Memory: the base and the working model, M task vectors, the two sums, and one Fisher
computation (its squared-gradient buffers): about (M + 6) × the model's float32 size (see
docs/search.md). With ``fisher_weighting: capped`` no Fisher is computed for a model with
λ_i = 0, and the Fishers of the others are held until the trial's merge (M more model sizes
at most), since each weight needs the sum of all of them.

The best λ then goes through the ordinary streaming merge (`hfmerge.methods.dfmerge`, the same
arithmetic) with the Fishers at the best λ, saved as Fisher files in the cache; the output is
evaluated on validation (and test when the tasks have one), and the coefficients, the trial
log, the study and a plot of the search go into the output folder and its model card.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .errors import OptionError
from .fisher.cache import cache_key, lookup, store
from .fisher.diagonal import diagonal_fisher
from .fisher.engine import FisherSettings, encode_for_model, fisher_examples, fisher_metadata, settings_from_recipe, to_checkpoint_names
from .methods.dfmerge import fisher_accumulator, needs_fisher
from .options import RunOptions, device_settings, output_settings
from .searching import SearchResult, SearchSettings, SearchStudy, TrialOutcome, open_search, plot_trajectory, storage_label

if TYPE_CHECKING:
    from .merging import MergeResult

logger = logging.getLogger(__name__)

# Fishers of recent (model, λ) pairs kept in memory for reuse, in bytes (0 for large models).
FISHER_MEMORY_BYTES = 256 * 2**20


class DFMergeObjective:
    """The search objective: λ → merged candidate in the working model → validation score.

    Args:
        plan: The merge plan (base and fine-tuned checkpoints opened).
        tasks: Per model, its task with the validation split loaded (`TaskData`).
        tokenizer: The models' tokenizer.
        use_fisher: False for the "without Fisher" ablation (F_i = 1: General Task Arithmetic).
        batch_size: Evaluation batch size.
        device: Where the working model runs.
        progress: Show progress bars for Fishers and scoring.
    """

    def __init__(self, plan: Any, tasks: list, tokenizer: Any, *, use_fisher: bool = True, batch_size: int = 32,
                 device: str | torch.device = "cpu", progress: bool = False) -> None:
        from .evaluation.evaluate_model import TaskEvaluator
        from .fisher.models import checkpoint_name_map, load_model

        self.plan = plan
        self.recipe = plan.recipe
        self.settings: FisherSettings = settings_from_recipe(self.recipe)
        self.use_fisher = use_fisher
        self.weighting = str(self.recipe.parameters.get("fisher_weighting", "paper"))
        self.temperature = float(self.recipe.parameters.get("fisher_temperature", 1.0))
        self.tasks = tasks
        self.tokenizer = tokenizer
        self.progress = progress
        self.model = load_model(plan.base, device=device)
        self.params = dict(self.model.named_parameters())
        self.base = {name: p.detach().clone() for name, p in self.params.items()}
        # τ_i = θ_i − θ_pre, read once per model.
        self.task_vectors: list[dict[str, torch.Tensor]] = []
        for ckpt in plan.models:
            names = checkpoint_name_map(self.model, ckpt.tensors, ckpt.label)
            self.task_vectors.append({name: ckpt.read(stored[0]).to(device=self.base[name].device, dtype=torch.float32) - self.base[name]
                                      for name, stored in names.items()})
        self.fisher_data = [fisher_examples(data, self.settings.num_examples, self.settings.seed) for data in tasks]
        self.fisher_inputs = [encode_for_model(self.model, tokenizer, ex, target_delimiter=data.spec.target_delimiter, label=data.spec.name)
                              for ex, data in zip(self.fisher_data, tasks)]
        self.evaluator = TaskEvaluator(tasks, tokenizer, split="validation", batch_size=batch_size, progress=False)
        self.last_report = None
        self._recent: OrderedDict[tuple[int, float], dict[str, torch.Tensor]] = OrderedDict()

    # -- the working model -------------------------------------------------------------------

    @torch.no_grad()
    def set_scaled(self, i: int, lam: float) -> None:
        """Working model ← θ_pre + λ τ_i."""
        for name, p in self.params.items():
            p.copy_(self.base[name]).add_(self.task_vectors[i][name], alpha=float(lam))

    def fisher_at(self, i: int, lam: float) -> dict[str, torch.Tensor]:
        """F_i at θ_pre + λ τ_i (parameter names): reused when this (model, λ) was seen before.

        A search proposes the same λ_i again more often than one might think (the bounds, the
        enqueued points, a resumed study), so recent Fishers stay in memory within
        `FISHER_MEMORY_BYTES`, and the Fisher cache on disk is consulted before computing.
        """
        remembered = self._recent.get((i, float(lam)))
        if remembered is not None:
            self._recent.move_to_end((i, float(lam)))
            return remembered
        fisher = self._fisher_at(i, lam)
        size = sum(t.numel() * t.element_size() for t in fisher.values())
        if size <= FISHER_MEMORY_BYTES:
            self._recent[(i, float(lam))] = fisher
            while sum(sum(t.numel() * t.element_size() for t in f.values()) for f in self._recent.values()) > FISHER_MEMORY_BYTES:
                self._recent.popitem(last=False)
        return fisher

    def _fisher_at(self, i: int, lam: float) -> dict[str, torch.Tensor]:
        key = cache_key(self._metadata(i, lam))
        hit = lookup(key)
        if hit is not None:
            from safetensors.torch import load_file

            stored = load_file(str(hit))
            names = self._names(i)
            return {name: stored[names[name][0]] for name in self.params}
        self.set_scaled(i, lam)
        labels = [e.label for e in self.fisher_data[i]]
        return diagonal_fisher(self.model, self.fisher_inputs[i], labels, mode=self.settings.mode, implementation=self.settings.implementation,
                               seed=self.settings.seed, progress=self.progress, desc=f"Fisher {self.tasks[i].spec.name}")

    @torch.no_grad()
    def build(self, lambdas: list[float], timings: dict[str, float] | None = None) -> None:
        """Working model ← the DF-Merge candidate for `lambdas` (equation 8, or the recipe's weighting)."""
        begin = time.perf_counter()
        sums = {name: fisher_accumulator(self.weighting, self.temperature) for name in self.params}
        fisher_s = 0.0
        for i, lam in enumerate(lambdas):
            fisher = None
            if self.use_fisher and needs_fisher(self.weighting, lam):
                start = time.perf_counter()
                with torch.enable_grad():
                    fisher = self.fisher_at(i, lam)
                fisher_s += time.perf_counter() - start
            for name, acc in sums.items():
                acc.add(self.task_vectors[i][name], lam, None if fisher is None else fisher[name].to(self.base[name].device))
            del fisher
        for name, p in self.params.items():
            p.copy_(sums[name].result(self.base[name]))
        if timings is not None:
            # merge: the λ-scaling, the running sums and the final division; Fisher: the rest.
            timings["fisher_s"] = fisher_s
            timings["merge_s"] = time.perf_counter() - begin - fisher_s

    def __call__(self, lambdas: list[float]) -> TrialOutcome:
        timings: dict[str, float] = {}
        self.build(lambdas, timings)
        start = time.perf_counter()
        report = self.evaluator.evaluate(self.model, model_name="candidate")
        timings["eval_s"] = time.perf_counter() - start
        self.last_report = report
        return TrialOutcome(report.search_score, report.scores, timings)

    # -- Fisher files for the final merge ----------------------------------------------------------

    def _metadata(self, i: int, lam: float) -> dict[str, str]:
        return fisher_metadata(self.plan.models[i], self.tasks[i].spec.name, self.fisher_data[i], self.settings, scale=lam, base=self.plan.base,
                               tokenizer=self.tokenizer, target_delimiter=self.tasks[i].spec.target_delimiter)

    def _names(self, i: int) -> dict[str, list[str]]:
        from .fisher.models import checkpoint_name_map

        return checkpoint_name_map(self.model, self.plan.models[i].tensors, self.plan.models[i].label)

    def fisher_files(self, lambdas: list[float]) -> list[Path]:
        """Fisher files (checkpoint names, in the cache) of every model at its λ."""
        paths = []
        for i, lam in enumerate(lambdas):
            meta = self._metadata(i, lam)
            key = cache_key(meta)
            hit = lookup(key)
            if hit is None:
                with torch.enable_grad():
                    fisher = self.fisher_at(i, lam)
                hit = store(key, to_checkpoint_names(fisher, self._names(i)), meta)
            paths.append(hit)
        return paths


def search_workdir(output: Path) -> Path:
    """Where an unfinished search keeps its study and trial log: beside the output folder."""
    output = Path(output).absolute()
    return output.parent / f".{output.name}.hfmerge-search"


def search_settings(recipe: Any, options: RunOptions) -> SearchSettings:
    """The search's settings: the recipe's parameters, with the options' trials and storage."""
    p = recipe.parameters
    enqueue = p.get("enqueue") or []
    points = [enqueue] if enqueue and not isinstance(enqueue[0], list) else enqueue
    n_trials = int(p["n_trials"]) if options.n_trials is None else int(options.n_trials)
    return SearchSettings(names=[m.ref.text for m in recipe.models], low=float(p["low"]), high=float(p["high"]), n_trials=n_trials,
                          n_startup_trials=min(int(p["n_startup_trials"]), n_trials), seed=int(p["seed"]),
                          enqueue=[[float(v) for v in pt] for pt in points], patience=int(p["patience"]) or None,
                          storage=options.storage, study_name=options.study_name or "hfmerge-dfmerge",
                          heartbeat_interval=options.heartbeat_interval, grace_period=options.grace_period)


@dataclass
class WorkerResult:
    """What a worker of a shared search returns when another worker builds the final merge.

    Attributes:
        study_name: The study's name.
        storage: Where it lives (URL with the password hidden).
        message: One paragraph for the user: the study's state and who builds the merge where.
        final: The study's ``hfmerge_final`` record (`SearchStudy.claim_final`).
        search: The study's result when this worker ran the search until the end; None for a
            worker that found the study already finished.
        trials_here: Trials this worker completed.
    """

    study_name: str
    storage: str
    message: str
    final: dict
    search: SearchResult | None = None
    trials_here: int = 0


def final_message(search: SearchStudy, final: dict) -> str:
    complete = search.counts()[0]
    head = f"the search {search.settings.study_name!r} in {search.label} is complete ({complete} completed trials)"
    if final.get("state") == "done":
        return f"{head}; its final merge was built by {final.get('worker')} into {final.get('output')} at {final.get('finished')}; nothing to do"
    return (f"{head}; its final merge is being built by {final.get('worker')} into {final.get('output')} since {final.get('since')} "
            "(if that worker died, build it with the `finalize` option, --finalize on the command line)")


def _objective(plan: Any, options: RunOptions) -> DFMergeObjective:
    from .evaluation.evaluate_model import prepare_tasks
    from .fisher.models import load_tokenizer

    recipe = plan.recipe
    tasks = prepare_tasks([recipe.tasks[m.task] for m in recipe.models], "validation")
    tokenizer = load_tokenizer(plan.tokenizer_folder, f"{recipe.source}: tokenizer_source")
    if options.max_memory is not None or options.offload_folder is not None:
        raise OptionError("a dfmerge search keeps its working model, the task vectors and the running sums on the one device chosen "
                          "(see docs/search.md, Memory); device maps apply to the fisher and fisher_nodes methods",
                          options=("max_memory", "offload_folder"))
    return DFMergeObjective(plan, tasks, tokenizer, use_fisher=bool(recipe.parameters.get("fisher", True)), batch_size=options.batch_size,
                            device=device_settings(options)["device"], progress=False)


def _search(objective: DFMergeObjective, workdir: Path, options: RunOptions) -> SearchResult:
    return run_study(open_study(search_settings(objective.recipe, options), workdir, options), objective, options)


def open_study(settings: SearchSettings, workdir: Path, options: RunOptions) -> SearchStudy:
    """Open (or create, or with `options.resume` continue) a search's study."""
    search = open_search(settings, workdir=workdir, resume=options.resume)
    assert search is not None
    return search


def run_study(search: SearchStudy, objective: Callable[[list[float]], TrialOutcome], options: RunOptions) -> SearchResult:
    """Run the study's trials (none with `options.finalize`: its result as it stands) and log the best."""
    result = search.result() if options.finalize else search.run(objective, progress=options.progress)
    logger.info("best of %d trials: trial %s, validation score %.4f, %s", len(result.trials), result.best_trial, result.best_value,
                result.best_text())
    return result


def search_coefficients(plan: Any, output: Path, options: RunOptions) -> SearchResult:
    """Search λ only: no Fisher files for the final merge, nothing written into `output`.

    The study and trial log stay in `search_workdir(output)` (or `options.storage`), so that a
    later merge to `output` with `options.resume` continues from them.

    Args:
        plan: From `build_plan` for a ``dfmerge`` recipe (left open; the caller releases it).
        output: The output folder a later merge will write.
        options: The run's options (`resume`, `storage`, `study_name`, `n_trials`,
            `batch_size`, `device`, `progress`).

    Returns:
        The `SearchResult`.

    Raises:
        OptionError: A device map (`max_memory`, `offload_folder`) was asked for.
        SearchError: The search cannot start or continue.
    """
    return _search(_objective(plan, options), search_workdir(output), options)


def run_dfmerge(plan: Any, output: Path, options: RunOptions, *, evaluate: Callable[[Path], Any] | None = None,
                title: str | None = None, repo_id: str | None = None) -> MergeResult | WorkerResult:
    """Search λ (unless the recipe fixes them), then merge, evaluate and write the output.

    With a shared study (`options.storage`) this process is one worker: it runs trials until
    the study has ``n_trials`` completed ones, then claims the final merge; exactly one worker
    gets the claim and merges, the others return a `WorkerResult`. `options.finalize` runs no
    trial and takes the claim over (a complete study whose finalising worker died).

    Args:
        plan: From `build_plan` for a ``dfmerge`` recipe.
        output: The output folder (written atomically, as every merge).
        options: The run's options (`overwrite`, `resume`, `storage`, `study_name`, `n_trials`,
            `batch_size`, `device`, `evaluate`, `progress`).
        evaluate: Validation evaluation of the written folder (the card's model-index).
        title, repo_id: The model's name and Hub repo for its card (see `run_merge`).

    Returns:
        The `MergeResult`, with the `SearchResult` (None when the recipe fixes every λ) and
        the test-split report when the tasks have a test split; or a `WorkerResult` when
        another worker of the shared study builds the final merge.

    Raises:
        OptionError: A device map (`max_memory`, `offload_folder`) was asked for.
        SearchError: The search cannot start or continue.
    """
    from .planning import with_coefficients

    recipe = plan.recipe
    output = Path(output).absolute()
    tasks_in_order = [recipe.tasks[m.task] for m in recipe.models]
    use_fisher = bool(recipe.parameters.get("fisher", True))
    workdir = search_workdir(output)
    fixed = all("weight" in m.parameters for m in recipe.models)
    shared = options.storage is not None or options.finalize
    search = None
    try:
        objective = _objective(plan, options)
        result = None
        if fixed:
            lambdas = [float(m.parameters["weight"]) for m in recipe.models]
        else:
            search = open_study(search_settings(recipe, options), workdir, options)
            result = run_study(search, objective, options)
            lambdas = result.best_params
            if shared:
                left = claim_or_leave(search, result, output, options, plan)
                if left is not None:
                    return left
        fisher_paths = objective.fisher_files(lambdas) if use_fisher else None
        del objective
    except BaseException as exc:
        plan.release()
        release_claim(search, exc, shared=shared)
        raise
    # The final merge is an ordinary recipe with the coefficients fixed: echoed that way, it
    # reproduces this model without searching again. A new plan, sharing the opened checkpoints.
    plan = with_coefficients(plan, lambdas, fisher_paths,
                             [f"Fisher of {m.key} at λ = {lam:.4f}" for m, lam in zip(recipe.models, lambdas)])

    def extra(folder: Path, test_reports: list[Any]) -> tuple[list[str], str]:
        return _write_search_outputs(folder, plan, result, lambdas, use_fisher, workdir, tasks_in_order, options, test_reports)

    return merge_final(plan, output, options, search, result, extra, evaluate=evaluate, title=title, repo_id=repo_id)


def merge_final(plan: Any, output: Path, options: RunOptions, search: SearchStudy | None, result: SearchResult | None,
                extra: Callable[[Path, list[Any]], tuple[list[str], str]], *, evaluate: Callable[[Path], Any] | None,
                title: str | None, repo_id: str | None) -> MergeResult:
    """The final merge of a search (the plan with the best values) into `output`, with the
    search's record: `extra(folder, test_reports)` writes its files and card section (and may
    append a test-split report). A shared study learns that the merge is done, or failed.

    Returns:
        The `MergeResult`, with the `SearchResult` and the test report (if any).
    """
    from .merging import run_merge

    test_reports: list[Any] = []
    shared = options.storage is not None or options.finalize
    try:
        merged = run_merge(plan, output, overwrite=options.overwrite, progress=options.progress, evaluate=evaluate,
                           extra=lambda folder, report: extra(folder, test_reports), title=title, repo_id=repo_id, **output_settings(options))
    except BaseException as exc:
        release_claim(search, exc, shared=shared)
        raise
    if search is not None and result is not None:
        close_search(search, result, output, Path(search_workdir(output)), options)
    merged.search = result
    merged.test_evaluation = test_reports[0] if test_reports else None
    return merged


def claim_or_leave(search: SearchStudy, result: SearchResult, output: Path, options: RunOptions, plan: Any) -> WorkerResult | None:
    """A worker of a shared study after its trials: claim the final merge (None: this worker
    builds it), or release the plan and say who builds it (`SearchStudy.claim_final`)."""
    final = search.claim_final(str(output), force=options.finalize)
    if final is None:
        return None
    plan.release()
    here = sum(t["worker"] == search.worker for t in result.trials)
    done = WorkerResult(search.settings.study_name, search.label, final_message(search, final), final, result, here)
    search.close()
    return done


def release_claim(search: SearchStudy | None, exc: BaseException, *, shared: bool) -> None:
    """After a failure: in a shared study whose final merge this worker claimed, record the
    claim as failed, so that another worker (or a rerun) may build it."""
    if search is not None and shared and search.final() and search.final().get("worker") == search.worker:
        search.set_final("failed", error=f"{type(exc).__name__}: {exc}")


def close_search(search: SearchStudy, result: SearchResult, output: Path, workdir: Path, options: RunOptions) -> None:
    """After the final merge is written: record it in a shared study, close the storage, and
    remove the local search folder (its study and log now live in the output folder)."""
    if options.storage is not None or options.finalize:
        search.set_final("done", output=str(output), best_trial=result.best_trial, best_value=result.best_value)
    search.close()
    if options.storage is None:
        shutil.rmtree(workdir, ignore_errors=True)


def test_section(folder: Path, tasks: list, options: RunOptions, test_reports: list[Any], summary: dict[str, Any]) -> tuple[list[str], str]:
    """Score a searched merge on the tasks' test splits (those that have one): the file, the
    card section, and ``summary["test"]``; nothing when no task has a test split."""
    if not (any(t.test_split for t in tasks) and options.evaluate):
        return [], ""
    from .evaluation.evaluate_model import evaluate_model

    with_test = [t for t in tasks if t.test_split]
    report = evaluate_model(folder, with_test, "test", batch_size=options.batch_size, progress=options.progress, model_name=folder.name)
    (folder / "eval_results_test.json").write_text(report.to_json())
    summary["test"] = report.to_dict()
    test_reports.append(report)
    return ["eval_results_test.json"], f"\n## Test\n\n```\n{report.to_table()}\n```\n"


def write_search_record(folder: Path, result: SearchResult, workdir: Path, n_startup_trials: int, names: list[str], *,
                        symbol: str | None = "λ") -> tuple[list[str], dict[str, float]]:
    """Write a search's record into the output folder: the plot, the trial log of every worker
    (rebuilt from the study: a worker's own log has only its trials) and the local study journal.

    Returns:
        The files written, and the mean seconds per trial of each stage (``fisher_s``,
        ``merge_s``, ``eval_s``; 0 for a stage the objective does not time).
    """
    files = ["search.png", "trials.jsonl"]
    plot_trajectory(result.trials, n_startup_trials, folder / "search.png", names, symbol=symbol)
    (folder / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.records), encoding="utf-8")
    if (workdir / "study.journal").is_file():
        shutil.copyfile(workdir / "study.journal", folder / "study.journal")
        files.append("study.journal")
    timings = [t.get("timings", {}) for t in result.trials]
    return files, {k: sum(t.get(k, 0.0) for t in timings) / max(len(timings), 1) for k in ("fisher_s", "merge_s", "eval_s")}


def _write_search_outputs(folder: Path, plan: Any, result: Any, lambdas: list[float], use_fisher: bool, workdir: Path, tasks: list,
                          options: RunOptions, test_reports: list[Any]) -> tuple[list[str], str]:
    recipe = plan.recipe
    files: list[str] = []
    weighting = f"{recipe.parameters.get('fisher_weighting', 'paper')}, α = {recipe.parameters.get('fisher_temperature', 1.0)}"
    summary: dict[str, Any] = {"method": "dfmerge", "fisher": use_fisher, "fisher_weighting": recipe.parameters.get("fisher_weighting", "paper"),
                               "fisher_temperature": recipe.parameters.get("fisher_temperature", 1.0),
                               "lambdas": {m.ref.text: lam for m, lam in zip(recipe.models, lambdas)}}
    section = "\n## Coefficients\n\n| model | λ |\n|---|---|\n" + "".join(f"| {m.ref.text} | {lam:.4f} |\n" for m, lam in zip(recipe.models, lambdas))
    if result is not None:
        summary.update({"best_trial": result.best_trial, "best_validation_score": result.best_value, "trials": result.trials,
                        "study_name": result.study_name, "storage": result.storage, "stopped_early": result.stopped_early,
                        "n_startup_trials": int(recipe.parameters["n_startup_trials"])})
        files, mean = write_search_record(folder, result, workdir, int(recipe.parameters["n_startup_trials"]), [m.ref.text for m in recipe.models])
        section += (f"\nFound by Bayesian optimisation (Optuna GPSampler, logEI) over {len(result.trials)} completed trials "
                    f"({recipe.parameters['n_startup_trials']} random start), λ in [{recipe.parameters['low']}, {recipe.parameters['high']}], "
                    f"seed {recipe.parameters['seed']}{f', Fisher-weighted ({weighting})' if use_fisher else ', without Fisher (General Task Arithmetic)'}. "
                    f"Best validation score {result.best_value:.4f} at trial {result.best_trial}. Mean seconds per trial: "
                    f"Fisher {mean['fisher_s']:.2f}, merge {mean['merge_s']:.2f}, evaluation {mean['eval_s']:.2f}. "
                    "The trial log is `trials.jsonl`" + (", the Optuna study `study.journal`" if "study.journal" in files else "") + ".\n\n"
                    "![Search trajectory: best score so far and the coefficients by trial; the random start is shaded](search.png)\n")
    more, test_text = test_section(folder, tasks, options, test_reports, summary)
    files += more
    section += test_text
    (folder / "dfmerge_search.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    files.append("dfmerge_search.json")
    return files, section


__all__ = ["DFMergeObjective", "WorkerResult", "run_dfmerge", "search_coefficients", "search_workdir"]
