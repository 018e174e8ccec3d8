"""DF-Merge coefficient search: Bayesian optimisation of M merging coefficients with Optuna.

The driver knows nothing about models. It maximises a black-box objective
``f(λ_0, ..., λ_{M-1}) -> TrialOutcome`` (in DF-Merge: build the Fisher-weighted merge for λ
and score it on the validation tasks) with Optuna's ``GPSampler`` (Gaussian process,
Matérn-5/2 ARD kernel, logEI acquisition) after ``n_startup_trials`` random or enqueued
points. The study is an ordinary Optuna study: by default a journal file
``<workdir>/study.journal``, or any storage URL, which is how several workers on several
machines share one search (Optuna's own distributed mode).

Rules worth knowing (also in docs/search.md):

- ``n_trials`` is the study's total of COMPLETE trials, over every worker and every resume.
  A worker asks for a new trial only while COMPLETE + RUNNING trials are fewer than
  ``n_trials``, so two workers with ``n_trials=8`` stop at 8 (9 at worst when both ask at
  the same instant), not 16. Failed trials do not use up the budget; a worker gives up after
  ``n_trials`` failures of its own so that a broken objective cannot loop forever.
- Resume (``resume=True``) of a local study marks trials left RUNNING by the crashed run as
  FAIL. Joining a shared study (``join=True``, the default when ``settings.storage`` is
  given) leaves RUNNING trials alone: they may belong to live workers.
- Early stopping (``patience=K``) stops once K completed trials after the random start have
  not improved the best score. It is computed from the study, so it holds across workers
  and resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from .errors import SearchError

logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
TRIALS_LOG = "trials.jsonl"
STUDY_ATTR = "hfmerge_search"  # study user attr: the search space, checked on resume


def param_name(i: int) -> str:
    """The Optuna parameter name of coefficient `i` (``lambda_0``, ``lambda_1``, ...)."""
    return f"lambda_{i}"


@dataclass
class TrialOutcome:
    """What the objective returns for one candidate λ.

    Attributes:
        score: The value to maximise (DF-Merge: mean validation metric over the tasks).
        task_scores: One metric per task, logged and stored with the trial.
        timings: Seconds spent in each stage (e.g. ``fisher_s``, ``merge_s``, ``eval_s``),
            logged as given.
    """

    score: float
    task_scores: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class SearchSettings:
    """The search space and budget. Keys follow Optuna's names.

    Attributes:
        names: One label per coefficient (e.g. the models' references).
        low: Lower bound of every coefficient.
        high: Upper bound of every coefficient.
        n_trials: Total COMPLETE trials of the study, random start included, over all
            workers and resumes.
        n_startup_trials: Completed trials (enqueued ones included) before the Gaussian
            process takes over from random sampling.
        seed: Seed of the sampler; a fresh study with the same seed and objective runs the
            same trials.
        enqueue: Known points evaluated first (e.g. task arithmetic's λ); they count toward
            ``n_startup_trials``.
        patience: Stop after this many completed trials after the random start without
            improvement of the best score; None runs all ``n_trials``.
        storage: Optuna storage URL (``sqlite:///...``, ``postgresql://...``) or the path of a
            journal file; None keeps the study in ``<workdir>/study.journal``.
        study_name: Name of the study inside the storage.

    Raises:
        SearchError: A setting is out of range or an enqueued point does not fit.
    """

    names: list[str]
    low: float = 0.0
    high: float = 1.0
    n_trials: int = 60
    n_startup_trials: int = 10
    seed: int = 0
    enqueue: list[list[float]] = field(default_factory=list)
    patience: int | None = None
    storage: str | None = None
    study_name: str = "hfmerge-dfmerge"

    def __post_init__(self) -> None:
        where = "search settings (recipe `parameters`)"
        if not self.names:
            raise SearchError(f"{where}: no coefficient to search; the recipe needs at least one model")
        if not self.low < self.high:
            raise SearchError(f"{where}: low={self.low} is not below high={self.high}; give bounds with low < high")
        if self.n_trials < 1:
            raise SearchError(f"{where}: n_trials={self.n_trials}; expected a positive number of trials")
        if self.n_startup_trials < 0:
            raise SearchError(f"{where}: n_startup_trials={self.n_startup_trials}; expected 0 or more")
        if self.patience is not None and self.patience < 1:
            raise SearchError(f"{where}: patience={self.patience}; expected a positive number of trials, or leave it out")
        for i, point in enumerate(self.enqueue):
            if len(point) != len(self.names):
                raise SearchError(f"{where}: enqueue[{i}] has {len(point)} values; expected one per model ({len(self.names)})")
            for j, v in enumerate(point):
                if not self.low <= v <= self.high:
                    raise SearchError(f"{where}: enqueue[{i}][{j}] = {v} is outside [{self.low}, {self.high}]; move it inside the bounds or widen them")


@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        best_params: λ of the best trial, one per name.
        best_value: Its score.
        best_trial: Its trial number.
        trials: The study's COMPLETE trials in trial order, each a dict with ``number``,
            ``params`` (list), ``score``, ``task_scores`` and ``timings``.
        storage: Where the study lives (journal path, or URL with the password hidden).
        study_name: Name of the study in that storage.
        stopped_early: True when `patience` ended the search before `n_trials`.
    """

    best_params: list[float]
    best_value: float
    best_trial: int
    trials: list[dict]
    storage: str
    study_name: str
    stopped_early: bool = False


Objective = Callable[[list[float]], TrialOutcome]


def run_search(
    objective: Objective,
    settings: SearchSettings,
    *,
    workdir: Path,
    resume: bool = False,
    join: bool | None = None,
    progress: bool = True,
) -> SearchResult:
    """Maximise `objective` over the coefficients with Optuna's GPSampler.

    Args:
        objective: Called with one λ list (ordered as ``settings.names``) per trial. A NaN or
            infinite score marks the trial FAIL with a warning and the search goes on; an
            exception (KeyboardInterrupt and SystemExit included) marks the trial FAIL and
            propagates.
        settings: Search space, budget, seed, storage.
        workdir: Folder for ``trials.jsonl`` and, unless ``settings.storage`` is given, the
            study journal. Created if missing.
        resume: Continue a study that already exists in the storage instead of refusing.
        join: Work on an existing study together with other live workers: trials another
            worker left RUNNING are not touched. None (default) means True when
            ``settings.storage`` is given (a shared storage) and False for the local journal.
            ``join=True`` also allows an existing study without `resume`.
        progress: Show a progress bar.

    Returns:
        The best coefficients and every completed trial of the study.

    Raises:
        SearchError: The study exists and neither `resume` nor `join` is set; the stored study
            was made for other coefficients or bounds; the storage cannot be opened; no trial
            completed.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    shared = join if join is not None else settings.storage is not None
    storage, label = _open_storage(settings.storage, workdir)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    log_path = workdir / TRIALS_LOG
    verbosity = optuna.logging.get_verbosity()
    # Optuna's per-trial INFO lines would interleave with the progress bar; trials.jsonl has them.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = _open_study(settings, storage, label, workdir, may_continue=resume or join is True, reseed_salt=worker if shared else "")
        if resume and not shared:
            _fail_left_running(study, settings, log_path)
        # skip_if_exists makes enqueueing idempotent: a resumed or joined study never runs a
        # known point twice, whatever state its earlier copy is in.
        for point in settings.enqueue:
            study.enqueue_trial({param_name(i): float(v) for i, v in enumerate(point)}, skip_if_exists=True)
        stopped_early = _optimize(study, objective, settings, log_path, worker, progress)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return _result(study, settings, label, stopped_early)


def _optimize(study: optuna.Study, objective: Objective, settings: SearchSettings, log_path: Path, worker: str, progress: bool) -> bool:
    """The ask/evaluate/tell loop; returns True when patience stopped it."""
    distributions = {param_name(i): FloatDistribution(settings.low, settings.high) for i in range(len(settings.names))}
    n_failed = 0
    bar = tqdm(total=settings.n_trials, desc="DF-Merge search", unit="trial", disable=not progress)
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
            n_running = sum(t.state == TrialState.RUNNING for t in trials)
            bar.n = min(len(complete), settings.n_trials)
            if complete:
                bar.set_postfix(best=f"{max(t.value for t in complete):.4f}", refresh=False)
            bar.refresh()
            # RUNNING trials count: whoever runs them will complete them, and n_trials is a total.
            if len(complete) + n_running >= settings.n_trials:
                return False
            if settings.patience is not None and _trials_without_improvement(complete, settings.n_startup_trials) >= settings.patience:
                logger.info("no improvement of the best score in %d trials after the random start; stopping early", settings.patience)
                return True
            if n_failed >= settings.n_trials:
                logger.warning("%d trials of this worker failed; giving up", n_failed)
                return False
            if not _run_trial(study, objective, settings, distributions, log_path, worker):
                n_failed += 1
    finally:
        bar.close()


def _run_trial(
    study: optuna.Study, objective: Objective, settings: SearchSettings,
    distributions: dict[str, FloatDistribution], log_path: Path, worker: str,
) -> bool:
    """Ask for one candidate, evaluate it, tell the result. Returns False when the trial failed."""
    start = time.perf_counter()
    trial = study.ask(distributions)  # the sampler (GP fit + acquisition search) runs here
    lambdas = [float(trial.params[param_name(i)]) for i in range(len(settings.names))]
    sample_s = time.perf_counter() - start
    record: dict[str, Any] = {"number": trial.number, "params": lambdas, "names": list(settings.names), "worker": worker, "sample_s": round(sample_s, 4)}
    try:
        outcome = objective(lambdas)
        if not isinstance(outcome, TrialOutcome):
            raise TypeError(f"the search objective returned {type(outcome).__name__}; expected a TrialOutcome")
        score = float(outcome.score)
    except BaseException as exc:
        # Tell before propagating: a trial left RUNNING would count as pending in the study.
        _finish(study, trial, TrialState.FAIL, None, {**record, "error": f"{type(exc).__name__}: {exc}"}, log_path)
        raise
    record.update(task_scores={k: _finite_or_none(v) for k, v in outcome.task_scores.items()}, timings=dict(outcome.timings))
    if not math.isfinite(score):
        logger.warning("trial %d: the objective returned %s for λ = %s; the trial is marked FAIL and the search goes on", trial.number, score, lambdas)
        _finish(study, trial, TrialState.FAIL, None, {**record, "score": None, "error": f"non-finite score {score}"}, log_path)
        return False
    # The trial's whole wall time (sampling and objective): what the stages' timings add up to, plus overhead.
    record["trial_s"] = round(time.perf_counter() - start, 4)
    _finish(study, trial, TrialState.COMPLETE, score, {**record, "score": score}, log_path)
    return True


def _finish(study: optuna.Study, trial: optuna.Trial, state: TrialState, value: float | None, record: dict[str, Any], log_path: Path) -> None:
    """Store the record as user attrs (so the study alone has it), tell Optuna, append to the log."""
    for key in ("task_scores", "timings", "sample_s", "worker", "error"):
        if key in record:
            trial.set_user_attr(key, record[key])
    study.tell(trial, value, state=state)
    _append_log(log_path, {**record, "state": state.name})


def _fail_left_running(study: optuna.Study, settings: SearchSettings, log_path: Path) -> None:
    """Mark FAIL the trials an interrupted run left RUNNING; Optuna would treat them as pending forever."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        params = [t.params.get(param_name(i)) for i in range(len(settings.names))]
        logger.info("trial %d was left RUNNING by an interrupted run; marked FAIL", t.number)
        _append_log(log_path, {"number": t.number, "params": params, "names": list(settings.names), "state": "FAIL", "error": "left RUNNING by an interrupted run; marked FAIL on resume"})


def _trials_without_improvement(complete: list[FrozenTrial], n_startup_trials: int) -> int:
    """Completed trials after the random start since the best score last rose."""
    best, since = -math.inf, 0
    for i, t in enumerate(complete):
        if t.value > best:
            best, since = t.value, 0
        elif i >= n_startup_trials:
            since += 1
    return since


def _open_storage(url: str | None, workdir: Path) -> tuple[optuna.storages.BaseStorage, str]:
    """The storage object and a printable label (path, or URL without its password)."""
    if url is None or "://" not in url:
        path = Path(url) if url is not None else workdir / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), str(path)
    label = re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)
    try:
        return optuna.storages.RDBStorage(url), label
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise SearchError(
            f"cannot open the search storage {label}: {str(exc).replace(url, label)}. Give an SQLAlchemy URL such as sqlite:///study.db or "
            "postgresql://user:pass@host/db (its driver installed and the server reachable), or the path of a journal file"
        ) from exc


def _open_study(
    settings: SearchSettings, storage: optuna.storages.BaseStorage, label: str, workdir: Path, *, may_continue: bool, reseed_salt: str,
) -> optuna.Study:
    """Create the study, or load the existing one when allowed."""
    space = {"names": list(settings.names), "low": settings.low, "high": settings.high}
    try:
        # Creating is the existence test that is atomic across workers starting together.
        study = optuna.create_study(storage=storage, study_name=settings.study_name, direction="maximize", sampler=_sampler(settings, settings.seed))
    except optuna.exceptions.DuplicatedStudyError:
        pass
    else:
        study.set_user_attr(STUDY_ATTR, space)
        return study
    if not may_continue:
        where = f"remove {workdir} to start a new one" if settings.storage is None else "pick another study name to start a new one"
        raise SearchError(
            f"a previous search (study {settings.study_name!r}) exists in {label}, perhaps interrupted; "
            f"resume it to continue it, or {where}"
        )
    study = optuna.load_study(study_name=settings.study_name, storage=storage)
    stored = study.user_attrs.get(STUDY_ATTR)
    if stored is not None and stored != space:
        raise SearchError(
            f"the search {settings.study_name!r} in {label} was made for coefficients {stored['names']} in "
            f"[{stored['low']}, {stored['high']}]; this recipe has {space['names']} in [{space['low']}, {space['high']}]. "
            "Start a new search (another study name, or remove the old study) instead of resuming"
        )
    # A sampler seeded as the first run would replay its random start, so derive another seed
    # from the study's progress (a resumed run stays reproducible) and, for workers joining a
    # shared study together, from the worker so that they do not draw the same points.
    salt = f"{len(study.get_trials(deepcopy=False))}:{reseed_salt}"
    study.sampler = _sampler(settings, zlib.crc32(f"{settings.seed}:{salt}".encode()))
    return study


def _sampler(settings: SearchSettings, seed: int) -> optuna.samplers.BaseSampler:
    # logEI (qLogEI while other workers' trials are RUNNING); the random start uses the same seed.
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.n_startup_trials)


def _result(study: optuna.Study, settings: SearchSettings, label: str, stopped_early: bool) -> SearchResult:
    trials = [
        {
            "number": t.number,
            "params": [t.params[param_name(i)] for i in range(len(settings.names))],
            "score": t.value,
            "task_scores": t.user_attrs.get("task_scores", {}),
            "timings": t.user_attrs.get("timings", {}),
        }
        for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    ]
    if not trials:
        raise SearchError(
            f"no trial of the search {settings.study_name!r} completed (every score was NaN or the trials failed); "
            f"see {label} and the trial log for the errors, and check the evaluation tasks"
        )
    best = max(trials, key=lambda r: r["score"])  # max keeps the earliest of equal scores
    return SearchResult(
        best_params=list(best["params"]), best_value=best["score"], best_trial=best["number"],
        trials=trials, storage=label, study_name=settings.study_name, stopped_early=stopped_early,
    )


def _finite_or_none(v: Any) -> Any:
    # NaN is not JSON; optuna-dashboard and strict readers reject it.
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _append_log(path: Path, record: dict[str, Any]) -> None:
    # One write per line in append mode: lines from workers sharing a workdir do not interleave.
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_trial_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``trials.jsonl`` file, in the order they were written.

    Args:
        path: The log file (``<workdir>/trials.jsonl``).

    Returns:
        One dict per line.
    """
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_trajectory(trials: list[dict], n_startup_trials: int, path: Path, names: list[str]) -> Path:
    """Draw the search like Figure 4 of the DF-Merge paper and save it as a PNG.

    Top: every trial's score (dots) and the best score so far (line). Bottom: each coefficient
    λ_i by trial. The random start (the first `n_startup_trials` completed trials) is shaded.

    Args:
        trials: ``SearchResult.trials`` (dicts with ``number``, ``params``, ``score``).
        n_startup_trials: The search's random start length.
        path: Output file (``.png``); its folder is created if missing.
        names: One label per coefficient, for the legend.

    Returns:
        `path`.

    Raises:
        SearchError: `trials` is empty.
    """
    # The object-oriented API with the Agg canvas: no display, no global pyplot state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not trials:
        raise SearchError(f"no completed trial to plot into {path}")
    trials = sorted(trials, key=lambda r: r["number"])
    x = [r["number"] for r in trials]
    scores = [r["score"] for r in trials]
    best_so_far = [max(scores[: i + 1]) for i in range(len(scores))]

    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
    n_start = min(n_startup_trials, len(trials))
    for ax in (top, bottom):
        if n_start:
            ax.axvspan(x[0] - 0.5, x[n_start - 1] + 0.5, color="0.9", zorder=0, label="random start" if ax is top else None)
        ax.grid(alpha=0.3)
    top.plot(x, scores, "o", ms=4, color="tab:gray", label="trial score")
    top.step(x, best_so_far, where="post", color="tab:blue", lw=2, label="best so far")
    best = scores.index(best_so_far[-1])
    top.plot([x[best]], [scores[best]], "*", ms=14, color="tab:red", label=f"best (trial {x[best]})")
    top.set_ylabel("validation score")
    top.legend(loc="lower right", fontsize="small")
    for i, name in enumerate(names):
        bottom.plot(x, [r["params"][i] for r in trials], "o-", ms=3, lw=1, label=f"λ{i}: {name}")
    bottom.set_xlabel("trial")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel("coefficient λ")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
