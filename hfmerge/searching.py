"""The coefficient search: Bayesian optimisation of merging coefficients with Optuna.

DF-Merge's M coefficients λ_i by default; any named parameters with their own ranges (float
or integer, log scale, step: `search_space.Dimension`) for a recipe's ``{search: ...}`` ranges.

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
  ``n_trials``; the count and the ask happen under the study lock (`study_lock`), so two
  workers with ``n_trials=8`` complete exactly 8, not 16. Failed trials do not use up the
  budget; a worker gives up after ``n_trials`` failures of its own so that a broken
  objective cannot loop forever.
- Resume (``resume=True``) of a local study marks trials left RUNNING by the crashed run as
  FAIL. Joining a shared study (``join=True``, the default when ``settings.storage`` is
  given) leaves RUNNING trials alone: they may belong to live workers. On a database
  storage every RUNNING trial has a heartbeat; a trial whose worker stopped beating for
  ``grace_period`` seconds is marked FAIL by any other worker and queued again with the same
  λ (Optuna's `RetryHeartbeatStaleTrialCallback`), so a killed worker's trial is redone and
  the study still reaches ``n_trials`` completed trials.
- Early stopping (``patience=K``) stops once K completed trials after the random start have
  not improved the best score. It is computed from the study, so it holds across workers
  and resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from .errors import SearchError
from .search_space import Dimension

logger = logging.getLogger(__name__)

JOURNAL_FILE = "study.journal"
TRIALS_LOG = "trials.jsonl"
STUDY_ATTR = "hfmerge_search"  # study user attr: the search space, checked on resume
FINAL_ATTR = "hfmerge_final"  # study user attr: who builds / built the final merge (see `claim_final`)
MODELS_ATTR = "lambda_models"  # study and trial user attr: parameter name -> its label (DF-Merge: the model its λ scales)
# The user attributes a trial record carries over from the study, in this order.
RECORD_ATTRS = ("worker", "sample_s", "trial_s", "task_scores", "timings", "error")


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
        heartbeat_interval: Seconds between the heartbeats of a RUNNING trial (database
            storages only; journal files have no heartbeat).
        grace_period: A RUNNING trial whose last heartbeat is older than this many seconds
            belongs to a dead worker: it is marked FAIL and run again. None: 4 ×
            `heartbeat_interval`.
        max_retry: How many times one λ is run again after its workers died (a λ that kills
            every worker that tries it is not retried forever).
        dimensions: The searched parameters, one per name, each with its own range and
            distribution; empty (the default): DF-Merge's coefficients ``lambda_i``, all in
            [`low`, `high`].
        title: The progress bar's label.

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
    heartbeat_interval: int = 30
    grace_period: int | None = None
    max_retry: int = 2
    dimensions: list[Dimension] = field(default_factory=list)
    title: str = "DF-Merge search"

    def __post_init__(self) -> None:
        where = "search settings (recipe `parameters`)"
        self.named = bool(self.dimensions)  # parameters with their own names and ranges, not DF-Merge's λ
        if not self.dimensions:
            self.dimensions = [Dimension(param_name(i), self.low, self.high) for i in range(len(self.names))]
        elif len(self.dimensions) != len(self.names):
            raise SearchError(f"search settings: {len(self.dimensions)} dimensions for {len(self.names)} names; give one name per dimension")
        if self.heartbeat_interval < 1 or (self.grace_period is not None and self.grace_period <= self.heartbeat_interval):
            raise SearchError(f"search settings: heartbeat_interval={self.heartbeat_interval}, grace_period={self.grace_period}; expected a "
                              "positive whole number of seconds and a grace period longer than it")
        if not self.names:
            raise SearchError(f"{where}: no coefficient to search; the recipe needs at least one model")
        for d in self.dimensions:
            if not d.low < d.high:
                raise SearchError(f"{where}: {d.name}: low={d.low} is not below high={d.high}; give bounds with low < high")
        if self.n_trials < 1:
            raise SearchError(f"{where}: n_trials={self.n_trials}; expected a positive number of trials")
        if self.n_startup_trials < 0:
            raise SearchError(f"{where}: n_startup_trials={self.n_startup_trials}; expected 0 or more")
        if self.patience is not None and self.patience < 1:
            raise SearchError(f"{where}: patience={self.patience}; expected a positive number of trials, or leave it out")
        for i, point in enumerate(self.enqueue):
            if len(point) != len(self.names):
                raise SearchError(f"{where}: enqueue[{i}] has {len(point)} values; expected one per model ({len(self.names)})")
            for j, (v, d) in enumerate(zip(point, self.dimensions)):
                if not d.low <= v <= d.high:
                    raise SearchError(f"{where}: enqueue[{i}][{j}] = {v} is outside [{d.low}, {d.high}]; move it inside the bounds or widen them")

    @property
    def keys(self) -> list[str]:
        """The parameters' names in the study, in order."""
        return [d.name for d in self.dimensions]

    def space(self) -> dict[str, Any]:
        """The search space as the study records it (``hfmerge_search``), compared when a run
        continues the study."""
        if not self.named:
            return {"names": list(self.names), "low": self.low, "high": self.high}
        return {"names": list(self.names), "params": [d.describe() for d in self.dimensions]}

    def described(self) -> dict[str, str]:
        """What each parameter of the study is (the ``lambda_models`` attribute)."""
        return {key: name for key, name in zip(self.keys, self.names)}


@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        best_params: λ of the best trial, one per name.
        best_value: Its score.
        best_trial: Its trial number.
        trials: The study's COMPLETE trials in trial order, each a dict with ``number``,
            ``params`` (list), ``score``, ``task_scores``, ``timings``, ``worker`` and
            ``trial_s`` (its wall time).
        storage: Where the study lives (journal path, or URL with the password hidden).
        study_name: Name of the study in that storage.
        stopped_early: True when `patience` ended the search before `n_trials`.
        records: The trial log rebuilt from the study (`trial_record`): every finished trial
            of every worker, COMPLETE and FAIL, by number.
        keys: The parameters' names in the study, in the order of `best_params`.
        named: True for a search of named recipe parameters, False for DF-Merge's λ.
    """

    best_params: list[float]
    best_value: float
    best_trial: int
    trials: list[dict]
    storage: str
    study_name: str
    stopped_early: bool = False
    records: list[dict] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    named: bool = False

    @property
    def best(self) -> dict[str, float]:
        """The best trial's values by parameter name."""
        return dict(zip(self.keys, self.best_params))

    def best_text(self) -> str:
        """The best values in one line: ``density = 0.42, ...``, or ``λ = [...]`` for DF-Merge."""
        if self.named:
            return ", ".join(f"{k} = {v:.4g}" for k, v in self.best.items())
        return "λ = [" + ", ".join(f"{v:.4f}" for v in self.best_params) + "]"


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

    The same as ``open_search(settings, ...).run(objective)``.

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
            worker left RUNNING are not touched (a database storage's heartbeat fails those
            of dead workers). None (default) means True when ``settings.storage`` is given (a
            shared storage) and False for the local journal. Joining also allows an existing
            study without `resume`.
        progress: Show a progress bar.

    Returns:
        The best coefficients and every completed trial of the study.

    Raises:
        SearchError: The study exists and neither `resume` nor `join` is set; the stored study
            was made for other coefficients or bounds; the storage cannot be opened; no trial
            completed.
    """
    search = open_search(settings, workdir=workdir, resume=resume, join=join)
    assert search is not None
    return search.run(objective, progress=progress)


def open_search(settings: SearchSettings, *, workdir: Path, resume: bool = False, join: bool | None = None,
                create: bool = True) -> SearchStudy | None:
    """Open the storage and the study, without running anything: a worker's handle on the search.

    This is where an unreachable database or a wrong password is reported (one `SearchError`
    line), before any model is loaded.

    Args:
        settings, workdir, resume, join: As for `run_search`.
        create: False: only look; return None when the study does not exist yet (nothing is
            created, not even the local journal's folder).

    Returns:
        The `SearchStudy`, or None (``create=False`` and no such study).

    Raises:
        SearchError: As `run_search`, before any trial.
    """
    workdir = Path(workdir)
    shared = join if join is not None else settings.storage is not None
    if not create and settings.storage is None and not (workdir / JOURNAL_FILE).exists():
        return None
    if create:
        workdir.mkdir(parents=True, exist_ok=True)
    opened = _open_storage(settings, workdir)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with _quiet_optuna():
        if not create:
            try:
                study = optuna.load_study(study_name=settings.study_name, storage=opened.storage)
            except KeyError:
                return None
            search = SearchStudy(study, opened, settings, workdir, worker)
            search.check_space()
            return search
        study = _open_study(settings, opened, workdir, may_continue=resume or shared, reseed_salt=worker if shared else "")
        search = SearchStudy(study, opened, settings, workdir, worker)
        if resume and not shared:
            search.fail_left_running()
        # skip_if_exists makes enqueueing idempotent: a resumed or joined study never runs a
        # known point twice, whatever state its earlier copy is in.
        with search.lock():
            for point in settings.enqueue:
                study.enqueue_trial({d.name: (int(v) if d.integer else float(v)) for d, v in zip(settings.dimensions, point)}, skip_if_exists=True)
    return search


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    # Optuna's per-trial INFO lines would interleave with the progress bar; trials.jsonl has
    # them. Its experimental-feature warnings (heartbeat) say nothing to a user of hfmerge.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # hfmerge runs the heartbeat itself around ask/tell (SearchStudy._optimize).
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


@dataclass
class _Storage:
    storage: optuna.storages.BaseStorage
    label: str
    rdb: optuna.storages.RDBStorage | None  # the database storage (heartbeat, advisory locks)
    lock_file: Path | None  # the file locked around critical sections when there is no database lock


class SearchStudy:
    """One worker's handle on a search's Optuna study (from `open_search`).

    Attributes:
        study: The `optuna.Study`.
        settings: The search settings.
        label: Where the study lives (journal path, or URL with the password hidden).
        worker: This process, as trials record it: ``host:pid``.
        heartbeat: True on a database storage, where RUNNING trials send heartbeats and the
            trials of dead workers are failed and retried.
    """

    def __init__(self, study: optuna.Study, opened: _Storage, settings: SearchSettings, workdir: Path, worker: str) -> None:
        self.study = study
        self.settings = settings
        self.label = opened.label
        self.worker = worker
        self._opened = opened
        self._log_path = Path(workdir) / TRIALS_LOG
        self.heartbeat = opened.rdb is not None

    def close(self) -> None:
        """Close the database connections this handle holds (a later call reconnects)."""
        if self._opened.rdb is not None:
            self._opened.rdb.engine.dispose()

    # -- the study's state ----------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(COMPLETE, RUNNING) trials of the study now."""
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        return complete, len(trials) - complete

    def stopped_early(self) -> bool:
        """True when `patience` completed trials after the random start brought no improvement."""
        if self.settings.patience is None:
            return False
        complete = sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        return _trials_without_improvement(complete, self.settings.n_startup_trials) >= self.settings.patience

    def complete(self) -> bool:
        """True when the search is over: ``n_trials`` completed trials, or stopped early."""
        return self.counts()[0] >= self.settings.n_trials or self.stopped_early()

    def final(self) -> dict[str, Any] | None:
        """The record of the final merge (`claim_final`), or None when nobody has claimed it."""
        return self.study.user_attrs.get(FINAL_ATTR)

    def check_space(self) -> None:
        """Refuse a study made for other coefficients or bounds."""
        space = self.settings.space()
        stored = self.study.user_attrs.get(STUDY_ATTR)
        if stored is not None and stored != space and ("params" in stored or "params" in space):
            raise SearchError(
                f"the search {self.settings.study_name!r} in {self.label} was made for the search space {_space_text(stored)}; "
                f"this recipe searches {_space_text(space)}. Start a new search (another study name, or remove the old study) instead of resuming"
            )
        if stored is not None and stored != space:
            raise SearchError(
                f"the search {self.settings.study_name!r} in {self.label} was made for coefficients {stored['names']} in "
                f"[{stored['low']}, {stored['high']}]; this recipe has {space['names']} in [{space['low']}, {space['high']}]. "
                "Start a new search (another study name, or remove the old study) instead of resuming"
            )

    # -- exclusion between workers ----------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the study's lock: one worker at a time in the block, on every machine.

        PostgreSQL: a session advisory lock (``pg_advisory_lock``) on a key derived from the
        study name; MySQL: ``GET_LOCK``; SQLite and journal files: an ``fcntl`` lock on a file
        beside them. The database releases its lock by itself when the holder's connection
        dies, so a killed worker never leaves it held.
        """
        rdb = self._opened.rdb
        dialect = rdb.engine.dialect.name if rdb is not None else None
        key = zlib.crc32(f"hfmerge:{self.settings.study_name}".encode())
        if dialect == "postgresql":
            from sqlalchemy import text

            with rdb.engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
            return
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy import text

            with rdb.engine.connect() as conn:
                conn.execute(text("SELECT GET_LOCK(:k, -1)"), {"k": f"hfmerge-{key}"})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT RELEASE_LOCK(:k)"), {"k": f"hfmerge-{key}"})
            return
        path = self._opened.lock_file
        if path is None:
            yield
            return
        import fcntl

        with open(path, "a") as handle:
            fcntl.lockf(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)

    def claim_final(self, output: str, *, force: bool = False) -> dict[str, Any] | None:
        """Claim the final merge for this worker: exactly one worker of a study gets it.

        Under `lock`, the study's ``hfmerge_final`` user attribute is read and, when nobody
        holds the claim, set to ``{"state": "building", "worker": ..., "output": ...}``: a
        second worker inside the lock sees that record and gets no claim. A claim whose build
        failed (``"failed"``) can be taken again; `force` also takes a ``"building"`` claim
        over (its worker died mid-merge).

        Returns:
            None when this worker has the claim; else the record of the claim in force.
        """
        with self.lock():
            current = self.final()
            if current is not None and (current.get("state") == "done" or (current.get("state") == "building" and not force)):
                return current
            self.study.set_user_attr(FINAL_ATTR, {"state": "building", "worker": self.worker, "output": output, "since": _now()})
            return None

    def set_final(self, state: str, **details: Any) -> None:
        """Record the end of this worker's final merge: ``"done"`` (with details such as the
        output and the Hub commit) or ``"failed"`` (another worker may then build it)."""
        with self.lock():
            current = self.final() or {}
            self.study.set_user_attr(FINAL_ATTR, {**current, "state": state, "worker": self.worker, "finished": _now(), **details})

    # -- running trials ---------------------------------------------------------------------------

    def run(self, objective: Objective, *, progress: bool = True) -> SearchResult:
        """Run trials until the study has ``n_trials`` completed ones (over all workers), or
        patience stops it; then return the result. See `run_search`."""
        with _quiet_optuna():
            stopped_early = self._optimize(objective, progress)
        return self.result(stopped_early)

    def _optimize(self, objective: Objective, progress: bool) -> bool:
        """The ask/evaluate/tell loop; returns True when patience stopped it."""
        settings = self.settings
        distributions = {d.name: d.distribution() for d in settings.dimensions}
        n_failed = 0
        # Polling for the last trials of other workers: often enough to pick up a retry soon
        # after the grace period, rarely enough to cost the database nothing.
        poll_s = min(float(settings.heartbeat_interval), 5.0)
        bar = tqdm(total=settings.n_trials, desc=settings.title, unit="trial", disable=not progress)
        try:
            while True:
                if self.heartbeat:
                    # Fails the RUNNING trials of dead workers; the retry callback queues each again.
                    optuna.storages.fail_stale_trials(self.study)
                trial = None
                with self.lock():
                    complete, running = self.counts()
                    bar.n = min(complete, settings.n_trials)
                    if complete:
                        bar.set_postfix(best=f"{self.study.best_value:.4f}", refresh=False)
                    bar.refresh()
                    if complete >= settings.n_trials:
                        return False
                    if self.stopped_early():
                        logger.info("no improvement of the best score in %d trials after the random start; stopping early", settings.patience)
                        return True
                    if n_failed >= settings.n_trials:
                        logger.warning("%d trials of this worker failed; giving up", n_failed)
                        return False
                    # RUNNING trials count: whoever runs them will complete them, and n_trials is a total.
                    if complete + running < settings.n_trials:
                        start = time.perf_counter()
                        trial = self.study.ask(distributions)  # the sampler (GP fit + acquisition search) runs here
                        sample_s = time.perf_counter() - start
                        beat = _Heartbeat(self._opened.rdb, trial._trial_id, settings.heartbeat_interval)
                        beat.start()  # the first beat is recorded before the lock is released
                    elif not self.heartbeat:
                        # Without heartbeats a RUNNING trial of a dead worker is never failed: waiting could last forever.
                        return False
                if trial is None:
                    time.sleep(poll_s)  # another worker runs the last trials; if it dies, its trial comes back
                    continue
                try:
                    ok = self._run_trial(trial, objective, start, sample_s)
                finally:
                    beat.stop()
                if not ok:
                    n_failed += 1
        finally:
            bar.close()

    def _run_trial(self, trial: optuna.Trial, objective: Objective, start: float, sample_s: float) -> bool:
        """Evaluate one asked trial and tell the result. Returns False when the trial failed."""
        lambdas = [trial.params[d.name] if d.integer else float(trial.params[d.name]) for d in self.settings.dimensions]
        # Who runs it, visible while it runs (a retried trial came with its dead worker's name).
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr(MODELS_ATTR, self.settings.described())
        attrs: dict[str, Any] = {"sample_s": round(sample_s, 4)}
        try:
            outcome = objective(lambdas)
            if not isinstance(outcome, TrialOutcome):
                raise TypeError(f"the search objective returned {type(outcome).__name__}; expected a TrialOutcome")
            score = float(outcome.score)
        except BaseException as exc:
            # Tell before propagating: a trial left RUNNING would count as pending in the study.
            self._finish(trial, TrialState.FAIL, None, {**attrs, "trial_s": round(time.perf_counter() - start, 4), "error": f"{type(exc).__name__}: {exc}"})
            raise
        attrs.update(task_scores={k: _finite_or_none(v) for k, v in outcome.task_scores.items()}, timings=dict(outcome.timings))
        # The trial's whole wall time (sampling and objective): what the stages' timings add up to, plus overhead.
        attrs["trial_s"] = round(time.perf_counter() - start, 4)
        if not math.isfinite(score):
            logger.warning("trial %d: the objective returned %s for λ = %s; the trial is marked FAIL and the search goes on", trial.number, score, lambdas)
            return self._finish(trial, TrialState.FAIL, None, {**attrs, "error": f"non-finite score {score}"}) and False
        return self._finish(trial, TrialState.COMPLETE, score, attrs)

    def _finish(self, trial: optuna.Trial, state: TrialState, value: float | None, attrs: dict[str, Any]) -> bool:
        """Store the attrs (so the study alone has them), tell Optuna, append to the log.

        Returns True when the trial ended as `state`; False when another worker had already
        failed it as stale (this worker's heartbeats came too late): its result is dropped and
        the retry queued for it runs the λ again."""
        try:
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            self.study.tell(trial, value, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            logger.warning("trial %d was marked FAIL by another worker while this one ran it (no heartbeat for %s s: raise the grace "
                           "period); its result is dropped and the λ is run again", trial.number, self._grace_period())
            self._append(trial._trial_id)
            return False
        self._append(trial._trial_id)
        return True

    def _grace_period(self) -> int:
        return self.settings.grace_period or 4 * self.settings.heartbeat_interval

    def _append(self, trial_id: int) -> None:
        _append_log(self._log_path, trial_record(self.study._storage.get_trial(trial_id), self.settings.names, self.settings.keys))

    def fail_left_running(self) -> None:
        """Mark FAIL the trials an interrupted run left RUNNING; Optuna would treat them as pending forever."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study._storage.set_trial_user_attr(t._trial_id, "error", "left RUNNING by an interrupted run; marked FAIL on resume")
            self.study.tell(t.number, state=TrialState.FAIL)
            logger.info("trial %d was left RUNNING by an interrupted run; marked FAIL", t.number)
            self._append(t._trial_id)

    # -- results ------------------------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """The trial log rebuilt from the study: every finished trial of every worker, by number."""
        finished = (TrialState.COMPLETE, TrialState.FAIL)
        return [trial_record(t, self.settings.names, self.settings.keys) for t in sorted(self.study.get_trials(deepcopy=False, states=finished), key=lambda t: t.number)]

    def result(self, stopped_early: bool | None = None) -> SearchResult:
        """The study's result now (see `SearchResult`).

        Raises:
            SearchError: No trial completed.
        """
        settings = self.settings
        trials = [
            {
                "number": t.number,
                "params": [t.params[key] for key in settings.keys],
                "score": t.value,
                "task_scores": t.user_attrs.get("task_scores", {}),
                "timings": t.user_attrs.get("timings", {}),
                "worker": t.user_attrs.get("worker"),
                "trial_s": t.user_attrs.get("trial_s"),
            }
            for t in sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        ]
        if not trials:
            raise SearchError(
                f"no trial of the search {settings.study_name!r} completed (every score was NaN or the trials failed); "
                f"see {self.label} and the trial log for the errors, and check the evaluation tasks"
            )
        best = max(trials, key=lambda r: r["score"])  # max keeps the earliest of equal scores
        return SearchResult(
            best_params=list(best["params"]), best_value=best["score"], best_trial=best["number"], trials=trials, storage=self.label,
            study_name=settings.study_name, stopped_early=self.stopped_early() if stopped_early is None else stopped_early, records=self.records(),
            keys=settings.keys, named=settings.named,
        )


class _Heartbeat:
    """Record a trial's heartbeat now and then every `interval` seconds in a thread, until `stop`.

    A failed beat (the database briefly unreachable) is logged, not raised: the trial goes on,
    and only a silence longer than the grace period lets other workers fail it.
    """

    def __init__(self, storage: optuna.storages.RDBStorage | None, trial_id: int, interval: int) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._storage is None:
            return
        self._storage.record_heartbeat(self._trial_id)
        self._thread = threading.Thread(target=self._beat, name=f"hfmerge-heartbeat-{self._trial_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        assert self._storage is not None
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception as exc:  # noqa: BLE001 - any database error; the next beat may succeed
                logger.warning("heartbeat of trial id %d failed: %s", self._trial_id, _one_line(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def trial_record(trial: FrozenTrial, names: list[str], keys: list[str] | None = None) -> dict[str, Any]:
    """One line of the trial log, from the study's trial: what a worker appends to its
    ``trials.jsonl`` and what the output's ``trials.jsonl`` is rebuilt from.

    Keys: ``number``, ``params`` (the values of the study's parameters `keys`, by default DF-Merge's
    ``lambda_i``, in the order of `names`), ``names``, the trial's user
    attributes ``worker``, ``sample_s``, ``trial_s``, ``task_scores``, ``timings``, ``error``
    (when set), ``retry_of`` (the first trial of the same λ whose worker died), ``score``
    (COMPLETE trials) and ``state``.
    """
    keys = keys if keys is not None else [param_name(i) for i in range(len(names))]
    record: dict[str, Any] = {"number": trial.number, "params": [trial.params.get(k) for k in keys], "names": list(names)}
    for key in RECORD_ATTRS:
        if key in trial.user_attrs:
            record[key] = trial.user_attrs[key]
    if "failed_trial" in trial.system_attrs:
        record["retry_of"] = trial.system_attrs["failed_trial"]
    if trial.state == TrialState.COMPLETE:
        record["score"] = trial.value
    record["state"] = trial.state.name
    return record


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _trials_without_improvement(complete: list[FrozenTrial], n_startup_trials: int) -> int:
    """Completed trials after the random start since the best score last rose."""
    best, since = -math.inf, 0
    for i, t in enumerate(complete):
        if t.value > best:
            best, since = t.value, 0
        elif i >= n_startup_trials:
            since += 1
    return since


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (a database driver's is often several)."""
    cause = getattr(exc, "orig", None) or exc  # SQLAlchemy wraps the driver's error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip() and not line.strip().startswith("(Background on this error")]
    return " ".join(lines) or type(cause).__name__


def _database_url(url: str) -> str:
    """`url` for SQLAlchemy: ``postgres://`` spelled ``postgresql://``, and a plain
    ``postgresql://`` sent to psycopg 3 when psycopg2 (SQLAlchemy 2.0's default) is missing."""
    import importlib.util

    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


@contextlib.contextmanager
def _schema_lock(address: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """On PostgreSQL, hold an advisory lock while Optuna creates its tables: workers started
    together on an empty database would otherwise collide creating the same types and tables."""
    if not address.startswith("postgresql"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(address, **engine_kwargs)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": zlib.crc32(b"hfmerge:optuna-schema")})
            conn.commit()
            yield
    finally:
        engine.dispose()  # closing the connection releases the lock


def storage_label(url: str) -> str:
    """A storage URL as messages show it: the password replaced by ``***``."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def _open_storage(settings: SearchSettings, workdir: Path) -> _Storage:
    """The storage (with heartbeat and retry on a database), a printable label (path, or URL
    without its password) and what to lock."""
    url = settings.storage
    if url is None or "://" not in url:
        path = Path(url) if url is not None else workdir / JOURNAL_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        return _Storage(JournalStorage(JournalFileBackend(str(path))), str(path), None, path.with_name(path.name + ".hfmerge-lock"))
    label = storage_label(url)
    address = _database_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}  # a connection idle through a long trial may have been dropped
    if address.startswith("postgresql") and "connect_timeout" not in address:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails in seconds, not minutes
    try:
        from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    except ImportError:  # Optuna before 4.9
        from optuna.storages import RetryFailedTrialCallback as Retry
    callback = "heartbeat_stale_trial_callback" if Retry.__name__.startswith("RetryHeartbeat") else "failed_trial_callback"
    try:
        with warnings.catch_warnings(), _schema_lock(address, engine_kwargs):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                address, engine_kwargs=engine_kwargs, heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period or 4 * settings.heartbeat_interval, **{callback: Retry(max_retry=settings.max_retry)},
            )
    except Exception as exc:  # SQLAlchemy raises many kinds for a bad URL, a missing driver or an unreachable server
        detail = _one_line(exc).replace(url, label).replace(address, label)
        hint = ("install the database driver (pip install 'hfmerge[postgres]' for PostgreSQL)" if isinstance(exc, ImportError)
                else "check the address, user and password, and that the server is running")
        raise SearchError(
            f"cannot open the search storage {label}: {detail}; {hint}. Give an SQLAlchemy URL such as "
            "postgresql://user:pass@host/db or sqlite:///study.db, or the path of a journal file"
        ) from None
    lock_file = None
    if rdb.engine.dialect.name == "sqlite" and rdb.engine.url.database not in (None, "", ":memory:"):
        lock_file = Path(str(rdb.engine.url.database) + ".hfmerge-lock")
    return _Storage(rdb, label, rdb, lock_file)


def _open_study(settings: SearchSettings, opened: _Storage, workdir: Path, *, may_continue: bool, reseed_salt: str) -> optuna.Study:
    """Create the study, or load the existing one when allowed."""
    space = settings.space()
    try:
        # Creating is the existence test that is atomic across workers starting together.
        study = optuna.create_study(storage=opened.storage, study_name=settings.study_name, direction="maximize", sampler=_sampler(settings, settings.seed))
    except optuna.exceptions.DuplicatedStudyError:
        pass
    else:
        study.set_user_attr(STUDY_ATTR, space)
        study.set_user_attr(MODELS_ATTR, settings.described())
        return study
    if not may_continue:
        where = f"remove {workdir} to start a new one" if settings.storage is None else "pick another study name to start a new one"
        raise SearchError(
            f"a previous search (study {settings.study_name!r}) exists in {opened.label}, perhaps interrupted; "
            f"resume it to continue it, or {where}"
        )
    study = optuna.load_study(study_name=settings.study_name, storage=opened.storage)
    SearchStudy(study, opened, settings, workdir, "").check_space()
    # A sampler seeded as the first run would replay its random start, so derive another seed
    # from the study's progress (a resumed run stays reproducible) and, for workers joining a
    # shared study together, from the worker so that they do not draw the same points.
    salt = f"{len(study.get_trials(deepcopy=False))}:{reseed_salt}"
    study.sampler = _sampler(settings, zlib.crc32(f"{settings.seed}:{salt}".encode()))
    return study


def _sampler(settings: SearchSettings, seed: int) -> optuna.samplers.BaseSampler:
    # logEI (qLogEI while other workers' trials are RUNNING); the random start uses the same seed.
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.n_startup_trials)


def _space_text(space: dict[str, Any]) -> str:
    """A stored search space in one line."""
    if "params" not in space:
        return f"coefficients {space['names']} in [{space['low']}, {space['high']}]"
    return ", ".join(f"{p['name']} in [{p['low']}, {p['high']}]" + (" (log)" if p.get("log") else "") for p in space["params"])


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


def plot_trajectory(trials: list[dict], n_startup_trials: int, path: Path, names: list[str], *, symbol: str | None = "λ") -> Path:
    """Draw the search like Figure 4 of the DF-Merge paper and save it as a PNG.

    Top: every trial's score (dots) and the best score so far (line). Bottom: each coefficient
    λ_i by trial. The random start (the first `n_startup_trials` completed trials) is shaded.

    Args:
        trials: ``SearchResult.trials`` (dicts with ``number``, ``params``, ``score``).
        n_startup_trials: The search's random start length.
        path: Output file (``.png``); its folder is created if missing.
        names: One label per coefficient, for the legend.
        symbol: The coefficients' symbol (legend ``λ0: name``); None for named parameters
            (legend ``name``, axis "searched value").

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
        bottom.plot(x, [r["params"][i] for r in trials], "o-", ms=3, lw=1, label=f"{symbol}{i}: {name}" if symbol else name)
    bottom.set_xlabel("trial")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_ylabel(f"coefficient {symbol}" if symbol else "searched value")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
