"""The DF-Merge coefficient search: GP sampling, storage, resume, workers, early stop, plot.

Objectives here are cheap smooth functions of λ with a known optimum; no model is involved.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from hfmerge.errors import HfMergeError, SearchError
from hfmerge.searching import (
    SearchSettings, TrialOutcome, plot_trajectory, read_trial_log, run_search,
)

REPO = Path(__file__).resolve().parents[1]
OPTIMUM = (0.3, 0.7)


def smooth(lambdas: list[float]) -> TrialOutcome:
    """A concave bowl with its maximum 1.0 at OPTIMUM."""
    a, b = lambdas[0] - OPTIMUM[0], lambdas[1] - OPTIMUM[1]
    return TrialOutcome(score=1.0 - a * a - b * b, task_scores={"task_a": 1.0 - a * a, "task_b": 1.0 - b * b}, timings={"eval_s": 0.001})


def settings(**kw) -> SearchSettings:
    kw.setdefault("names", ["org/model-a", "org/model-b"])
    return SearchSettings(**kw)


def journal_study(workdir: Path, name: str = "hfmerge-dfmerge") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(workdir / "study.journal"))))


def run_script(code: str, *args: str, output: Path | None = None) -> subprocess.Popen:
    """Start `code` in a fresh interpreter; stdout and stderr go to `output` (a file) or a pipe."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *args]
    if output is None:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with output.open("w") as sink:  # the child has its own copy of the file descriptor
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)


# Only a guard against a hang (two scripts waiting for each other forever), not a speed
# requirement: the scripts below take seconds.
HANG_GUARD_S = 3600.0


def wait_all(procs: list[subprocess.Popen], outputs: list[Path]) -> None:
    """Wait, however long it takes, until every script exits; fail with its output if one fails.

    The first failure stops the others at once: a script waiting for a file from a crashed
    peer would otherwise wait forever.
    """
    start = time.monotonic()
    while True:
        codes = [proc.poll() for proc in procs]
        failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
        hung = not failed and None in codes and time.monotonic() - start > HANG_GUARD_S
        if failed or hung:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            shown = failed or range(len(procs))
            pytest.fail("\n".join(f"script {i} ({'exit ' + str(codes[i]) if codes[i] is not None else 'hung'}):\n{outputs[i].read_text()}"
                                  for i in shown))
        if all(code == 0 for code in codes):
            return
        time.sleep(0.05)


def test_finds_the_optimum_and_logs_every_trial(tmp_path):
    result = run_search(smooth, settings(n_trials=12, n_startup_trials=5, seed=0), workdir=tmp_path, progress=False)

    assert math.dist(result.best_params, OPTIMUM) < 0.1
    log = read_trial_log(tmp_path / "trials.jsonl")
    assert [r["number"] for r in log] == list(range(12)) and {r["state"] for r in log} == {"COMPLETE"}
    assert result.best_value == max(r["score"] for r in log)
    assert log[result.best_trial]["params"] == result.best_params
    first = log[0]
    assert first["names"] == ["org/model-a", "org/model-b"] and first["timings"] == {"eval_s": 0.001}
    assert set(first["task_scores"]) == {"task_a", "task_b"} and first["sample_s"] >= 0
    # The result lists the completed trials in order; the study alone holds the same record.
    assert [t["number"] for t in result.trials] == list(range(12))
    assert result.storage == str(tmp_path / "study.journal")
    study = journal_study(tmp_path)
    best = study.trials[result.best_trial]
    assert best.value == result.best_value and best.params == {"lambda_0": result.best_params[0], "lambda_1": result.best_params[1]}
    assert best.user_attrs["task_scores"] == log[result.best_trial]["task_scores"]
    assert best.user_attrs["timings"] == {"eval_s": 0.001} and "sample_s" in best.user_attrs
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_same_seed_same_trials(tmp_path):
    def lambdas(workdir: Path, seed: int) -> list[list[float]]:
        s = settings(names=["a", "b", "c"], n_trials=8, n_startup_trials=4, seed=seed)
        return [t["params"] for t in run_search(smooth, s, workdir=workdir, progress=False).trials]

    first = lambdas(tmp_path / "one", 7)
    assert lambdas(tmp_path / "two", 7) == first
    assert lambdas(tmp_path / "three", 8) != first


def test_enqueued_points_run_first(tmp_path):
    s = settings(n_trials=4, n_startup_trials=3, enqueue=[[0.25, 0.75], [1.0, 0.0]])
    result = run_search(smooth, s, workdir=tmp_path, progress=False)
    assert result.trials[0]["params"] == [0.25, 0.75]
    assert result.trials[1]["params"] == [1.0, 0.0]


def test_progress_bar_shows_trials_and_best(tmp_path, capsys):
    run_search(smooth, settings(n_trials=3, n_startup_trials=3), workdir=tmp_path / "on", progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "best=" in err
    run_search(smooth, settings(n_trials=3, n_startup_trials=3), workdir=tmp_path / "off", progress=False)
    assert capsys.readouterr().err == ""


def test_existing_study_needs_resume(tmp_path):
    run_search(smooth, settings(n_trials=2, n_startup_trials=2), workdir=tmp_path, progress=False)
    with pytest.raises(SearchError, match="previous search .*exists in .*resume it to continue it") as info:
        run_search(smooth, settings(n_trials=4, n_startup_trials=2), workdir=tmp_path, progress=False)
    assert isinstance(info.value, HfMergeError)
    assert str(tmp_path / "study.journal") in str(info.value)
    # Resuming with other coefficients would mix incomparable trials.
    with pytest.raises(SearchError, match=r"made for coefficients \['org/model-a', 'org/model-b'\]"):
        run_search(smooth, settings(names=["x", "y"], n_trials=4), workdir=tmp_path, resume=True, progress=False)
    result = run_search(smooth, settings(n_trials=4, n_startup_trials=2), workdir=tmp_path, resume=True, progress=False)
    assert [t["number"] for t in result.trials] == [0, 1, 2, 3]


def test_a_storage_given_is_joined_without_resume(tmp_path):
    # A study in a storage named explicitly is shared: a worker joins it (other coefficients still refused).
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run_search(smooth, settings(n_trials=2, n_startup_trials=2, storage=url), workdir=tmp_path, progress=False)
    with pytest.raises(SearchError, match=r"made for coefficients \['org/model-a', 'org/model-b'\]"):
        run_search(smooth, settings(names=["x", "y"], n_trials=4, storage=url), workdir=tmp_path, progress=False)
    result = run_search(smooth, settings(n_trials=4, n_startup_trials=2, storage=url), workdir=tmp_path, progress=False)
    assert [t["number"] for t in result.trials] == [0, 1, 2, 3]
    study = optuna.load_study(study_name="hfmerge-dfmerge", storage=url)
    assert study.user_attrs["lambda_models"] == {"lambda_0": "org/model-a", "lambda_1": "org/model-b"}
    assert all(t.user_attrs["lambda_models"] == study.user_attrs["lambda_models"] and t.user_attrs["trial_s"] >= 0 for t in study.trials)
    assert [r["number"] for r in result.records] == [0, 1, 2, 3] and {r["state"] for r in result.records} == {"COMPLETE"}


def test_nan_score_fails_the_trial_and_the_search_goes_on(tmp_path, caplog):
    calls = []

    def objective(lambdas):
        calls.append(lambdas)
        return TrialOutcome(score=float("nan")) if len(calls) == 2 else smooth(lambdas)

    with caplog.at_level(logging.WARNING, logger="hfmerge.searching"):
        result = run_search(objective, settings(n_trials=5, n_startup_trials=3), workdir=tmp_path, progress=False)
    assert "trial 1: the objective returned nan" in caplog.text
    states = [t.state for t in journal_study(tmp_path).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL] + [TrialState.COMPLETE] * 4
    assert len(result.trials) == 5 and 1 not in [t["number"] for t in result.trials]
    assert read_trial_log(tmp_path / "trials.jsonl")[1]["state"] == "FAIL"
    # An objective that never gives a score stops after n_trials failures with a clear error.
    with pytest.raises(SearchError, match="no trial of the search .* completed"):
        run_search(lambda lambdas: TrialOutcome(score=math.nan), settings(n_trials=2), workdir=tmp_path / "nan", progress=False)


def test_exception_fails_the_trial_propagates_and_resume_continues(tmp_path):
    s = settings(n_trials=6, n_startup_trials=3, enqueue=[[0.5, 0.5]])

    def interrupted(lambdas):
        if len(read_trial_log(tmp_path / "trials.jsonl")) == 2:
            raise KeyboardInterrupt
        return smooth(lambdas)

    (tmp_path / "trials.jsonl").touch()
    with pytest.raises(KeyboardInterrupt):
        run_search(interrupted, s, workdir=tmp_path, progress=False)
    assert [t.state for t in journal_study(tmp_path).trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL]
    assert read_trial_log(tmp_path / "trials.jsonl")[2]["error"] == "KeyboardInterrupt: "

    result = run_search(smooth, s, workdir=tmp_path, resume=True, progress=False)
    assert [t["number"] for t in result.trials] == [0, 1, 3, 4, 5, 6]
    assert [t["params"] for t in result.trials].count([0.5, 0.5]) == 1
    # The resumed random start draws new points rather than replaying the first run's.
    params = [tuple(t.params.values()) for t in journal_study(tmp_path).trials]
    assert len(set(params)) == len(params)


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from hfmerge.searching import SearchSettings, TrialOutcome, run_search

workdir = Path(sys.argv[1])
calls = []

def objective(lambdas):
    calls.append(lambdas)
    if len(calls) == 5:  # trial 4, past the random start: SIGKILL while it is RUNNING, mid-objective
        os.kill(os.getpid(), signal.SIGKILL)
    return TrialOutcome(score=-sum((x - 0.5) ** 2 for x in lambdas), task_scores={"t": 0.0}, timings={})

run_search(objective, SearchSettings(names=["a", "b"], n_trials=8, n_startup_trials=4, enqueue=[[0.2, 0.8]]), workdir=workdir, progress=False)
"""


def test_resume_after_a_killed_run(tmp_path):
    proc = run_script(KILLED_RUN, str(tmp_path))
    output, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output
    assert journal_study(tmp_path).trials[4].state == TrialState.RUNNING
    before = read_trial_log(tmp_path / "trials.jsonl")
    assert [r["number"] for r in before] == [0, 1, 2, 3]

    s = SearchSettings(names=["a", "b"], n_trials=8, n_startup_trials=4, enqueue=[[0.2, 0.8]])
    result = run_search(smooth, s, workdir=tmp_path, resume=True, progress=False)

    trials = journal_study(tmp_path).trials
    assert trials[4].state == TrialState.FAIL  # the one the kill left RUNNING
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 8 == len(result.trials)
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert [t.number for t in trials] == list(range(9))
    assert [t["params"] for t in result.trials].count([0.2, 0.8]) == 1
    assert [t["params"] for t in result.trials[:4]] == [r["params"] for r in before]  # completed trials kept
    log = read_trial_log(tmp_path / "trials.jsonl")
    assert log[:4] == before
    assert [(r["number"], r["state"]) for r in log[4:]] == [(4, "FAIL")] + [(n, "COMPLETE") for n in range(5, 9)]


WORKER = """
import sys, time
from pathlib import Path
from hfmerge.searching import SearchSettings, TrialOutcome, run_search

storage, workdir, index = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
first_running = workdir.parent / "first-trial-running"
second_running = workdir.parent / "second-worker-running"
if index == 1:
    while not first_running.exists():  # join while worker 0 has a RUNNING trial
        time.sleep(0.02)

def objective(lambdas):
    # Worker 0 holds its first trial RUNNING until worker 1 has joined and runs a trial of its
    # own: the overlap is certain however slowly either process starts.
    if index == 0 and not first_running.exists():
        first_running.touch()
        while not second_running.exists():
            time.sleep(0.02)
    if index == 1:
        second_running.touch()
    time.sleep(0.2)  # the workers' trials overlap, as real objectives do
    return TrialOutcome(score=-sum((x - 0.5) ** 2 for x in lambdas), task_scores={}, timings={})

settings = SearchSettings(names=["a", "b"], n_trials=8, n_startup_trials=3, storage=storage, study_name="shared")
run_search(objective, settings, workdir=workdir, resume=True, progress=False)
"""


def test_two_workers_share_one_study(tmp_path):
    storage = str(tmp_path / "shared.journal")  # a journal file on a shared disk, as on NFS
    outputs = [tmp_path / f"worker{i}.out" for i in range(2)]
    procs = [run_script(WORKER, storage, str(tmp_path / f"worker{i}"), str(i), output=outputs[i]) for i in range(2)]
    wait_all(procs, outputs)

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(storage)))
    states = [t.state for t in study.trials]
    # n_trials is the study's total, not per worker (exactly: the count and the ask happen under
    # the study's file lock); a joining worker fails nobody's trial.
    assert states.count(TrialState.COMPLETE) == 8
    assert set(states) == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    # Worker 1 started a trial while worker 0's first trial was RUNNING, and that trial completed.
    first = study.trials[0]
    joined = next(t for t in study.trials if t.user_attrs["worker"] != first.user_attrs["worker"])
    assert joined.datetime_start < first.datetime_complete and first.state == TrialState.COMPLETE
    logged = [read_trial_log(tmp_path / f"worker{i}" / "trials.jsonl") for i in range(2)]
    assert all(logged) and sorted(r["number"] for log in logged for r in log) == [t.number for t in study.trials]


def test_patience_counts_only_trials_after_the_random_start(tmp_path):
    # Trials 1 and 2 do not improve but are part of the random start; trial 3 improves;
    # trials 4 and 5 do not: with patience 2 the search stops there, before trial 6's 0.9.
    scores = iter([0.5, 0.1, 0.2, 0.6, 0.3, 0.4, 0.9, 0.9, 0.9])
    result = run_search(
        lambda lambdas: TrialOutcome(score=next(scores)),
        settings(n_trials=9, n_startup_trials=3, patience=2), workdir=tmp_path, progress=False,
    )
    assert result.stopped_early
    assert [t["number"] for t in result.trials] == [0, 1, 2, 3, 4, 5]
    assert result.best_trial == 3 and result.best_value == 0.6


def test_bad_settings_are_reported():
    with pytest.raises(SearchError, match=r"enqueue\[0\] has 3 values; expected one per model \(2\)"):
        settings(enqueue=[[0.1, 0.2, 0.3]])
    with pytest.raises(SearchError, match=r"enqueue\[0\]\[1\] = 1.5 is outside \[0.0, 1.0\]"):
        settings(enqueue=[[0.1, 1.5]])
    with pytest.raises(SearchError, match="low=1.0 is not below high=0.5"):
        settings(low=1.0, high=0.5)


def test_plot_trajectory_writes_a_png(tmp_path):
    result = run_search(smooth, settings(n_trials=6, n_startup_trials=3), workdir=tmp_path, progress=False)
    path = plot_trajectory(result.trials, 3, tmp_path / "plots" / "search.png", ["org/model-a", "org/model-b"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
