"""The DF-Merge search shared by several workers on a real PostgreSQL server.

Workers are `hfmerge RECIPE --storage postgresql://... --study-name NAME` processes on tiny
trained T5 experts. Where a test needs two workers to overlap or one to die mid-trial, the
worker itself waits for a file or kills itself at a given trial (`WORKER`), so the outcome does
not depend on how fast the machine is; timeouts are only guards against a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from hfmerge.cli import main
from postgres_fixtures import postgres  # noqa: F401  (fixture)
from test_fisher import experts, one_torch_thread, task_entries  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800.0  # only against a deadlock; the workers take seconds

# A worker: the CLI in a child process, with hooks in the objective. "first" holds its first
# trial RUNNING until "second" runs one of its own; "killed" SIGKILLs itself in the middle of
# its third trial (the candidate built, the trial RUNNING with heartbeats in the study).
WORKER = """
import os, signal, sys, time
from pathlib import Path
from hfmerge import dfmerge
from hfmerge.cli import main

role, sync = sys.argv[1], Path(sys.argv[2])
real = dfmerge.DFMergeObjective.__call__
calls = []

def hooked(self, lambdas):
    calls.append(lambdas)
    if role == "first" and len(calls) == 1:
        while not (sync / "second-running").exists():
            time.sleep(0.05)
    if role == "second" and len(calls) == 1:
        (sync / "second-running").touch()
    if role == "killed" and len(calls) == 3:
        self.build(lambdas)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, lambdas)

dfmerge.DFMergeObjective.__call__ = hooked
sys.exit(main(sys.argv[3:]))
"""


def recipe(path: Path, experts, n_trials: int) -> Path:  # noqa: F811
    data = {"merge_method": "dfmerge", "base_model": str(experts["base"]), "models": [{"model": str(m)} for m in experts["models"]],
            "parameters": {"n_trials": n_trials, "n_startup_trials": 2, "seed": 5, "fisher_examples": 6}, "tasks": task_entries(experts, 12)}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_worker(role: str, sync: Path, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("w") as sink:
        return subprocess.Popen([sys.executable, "-c", WORKER, role, str(sync), *args], env=env, cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait(procs: list[subprocess.Popen], logs: list[Path], expected: list[int]) -> None:
    """Wait until every worker exits; fail with the logs at the first unexpected exit code."""
    start = time.monotonic()
    while True:
        codes = [p.poll() for p in procs]
        wrong = [i for i, c in enumerate(codes) if c is not None and c != expected[i]]
        if wrong or (None in codes and time.monotonic() - start > HANG_GUARD_S):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            pytest.fail("\n".join(f"worker {i} (exit {codes[i]}):\n{logs[i].read_text()[-4000:]}" for i in range(len(procs))))
        if None not in codes:
            return
        time.sleep(0.1)


def worker_args(recipe_path: Path, output: Path, url: str, study: str, *extra: str) -> list[str]:
    return [str(recipe_path), "-o", str(output), "-q", "--storage", url, "--study-name", study, *extra]


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=url)


def test_two_workers_complete_exactly_n_distinct_trials_and_one_builds_the_merge(experts, postgres, tmp_path):  # noqa: F811
    path = recipe(tmp_path / "df.yaml", experts, n_trials=6)
    url = postgres.url()
    outputs = [tmp_path / "out-first", tmp_path / "out-second"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    procs = [start_worker(role, tmp_path, worker_args(path, out, url, "two-workers"), log)
             for role, out, log in zip(("first", "second"), outputs, logs)]
    wait(procs, logs, [0, 0])

    study = load(url, "two-workers")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6  # exactly n_trials, nothing failed or left running
    params = [(t.params["lambda_0"], t.params["lambda_1"]) for t in study.trials]
    assert len(set(params)) == 6
    workers = {t.user_attrs["worker"] for t in study.trials}
    assert len(workers) == 2 and all(t.user_attrs["trial_s"] > 0 for t in study.trials)
    names = [str(m) for m in experts["models"]]
    assert all(t.user_attrs["lambda_models"] == {"lambda_0": names[0], "lambda_1": names[1]} for t in study.trials)
    # Exactly one worker built the merge; the other said who did.
    built = [out for out in outputs if out.exists()]
    assert len(built) == 1
    final = study.user_attrs["hfmerge_final"]
    assert final["state"] == "done" and final["output"] == str(built[0]) and final["worker"] in workers
    other = logs[outputs.index(next(o for o in outputs if not o.exists()))].read_text()
    assert f"its final merge {'was built' if 'was built' in other else 'is being built'} by {final['worker']} into {built[0]}" in other
    # The output's trial log and summary come from the study: both workers' trials.
    log = [json.loads(line) for line in (built[0] / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in log] == list(range(6)) and {r["worker"] for r in log} == workers
    summary = json.loads((built[0] / "dfmerge_search.json").read_text())
    best = max(study.trials, key=lambda t: t.value)
    assert summary["best_trial"] == best.number and list(summary["lambdas"].values()) == [best.params["lambda_0"], best.params["lambda_1"]]
    assert "***" in summary["storage"] and postgres.password not in summary["storage"]


@pytest.fixture(scope="module")
def killed_then_finished(experts, postgres, tmp_path_factory):  # noqa: F811
    """A worker SIGKILLed in its third trial, then a second worker that finishes the study of 4."""
    root = tmp_path_factory.mktemp("killed")
    path = recipe(root / "df.yaml", experts, n_trials=4)
    url = postgres.url()
    beat = ["--heartbeat-interval", "1", "--grace-period", "3"]
    killed = start_worker("killed", root, worker_args(path, root / "out-killed", url, "killed", *beat), root / "killed.log")
    wait([killed], [root / "killed.log"], [-signal.SIGKILL])
    running = [t for t in load(url, "killed").trials if t.state == TrialState.RUNNING]
    assert len(running) == 1  # the kill left its trial RUNNING
    survivor = start_worker("plain", root, worker_args(path, root / "out", url, "killed", *beat), root / "survivor.log")
    wait([survivor], [root / "survivor.log"], [0])
    return {"url": url, "path": path, "root": root, "killed_trial": running[0].number}


def test_a_killed_workers_trial_is_failed_by_heartbeat_and_run_again(killed_then_finished):
    url, root, number = killed_then_finished["url"], killed_then_finished["root"], killed_then_finished["killed_trial"]
    trials = load(url, "killed").trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 4 and states.count(TrialState.FAIL) == 1 and TrialState.RUNNING not in states
    dead = trials[number]
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == number)
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params and retry.user_attrs["worker"] != dead.user_attrs["worker"]
    # The completed trials of the dead worker are kept and counted once.
    assert [t.number for t in trials if t.state == TrialState.COMPLETE][:2] == [0, 1]
    assert (root / "out" / "model.safetensors").is_file() and not (root / "out-killed").exists()
    log = [json.loads(line) for line in (root / "out" / "trials.jsonl").read_text().splitlines()]
    assert [r["state"] for r in log].count("COMPLETE") == 4
    assert next(r for r in log if r["number"] == number)["state"] == "FAIL"
    assert next(r for r in log if r["number"] == retry.number)["retry_of"] == number


def test_a_worker_started_after_the_study_is_complete_exits_at_once(killed_then_finished, tmp_path, monkeypatch, capsys):
    import hfmerge.planning

    def no_model(*args, **kwargs):
        raise AssertionError("a late worker loaded the models")

    monkeypatch.setattr(hfmerge.planning, "build_plan", no_model)
    args = worker_args(killed_then_finished["path"], tmp_path / "late", killed_then_finished["url"], "killed")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"is complete (4 completed trials); its final merge was built by" in out and "nothing to do" in out
    assert str(killed_then_finished["root"] / "out") in out and not (tmp_path / "late").exists()
    # --finalize on a finished study has nothing to do either; on an unknown study it is an error.
    assert main([*args, "--finalize"]) == 0
    assert main([*worker_args(killed_then_finished["path"], tmp_path / "late", killed_then_finished["url"], "no-such-study"), "--finalize"]) == 1
    err = capsys.readouterr().err
    assert "--finalize: there is no search 'no-such-study' in postgresql://hfmerge:***@127.0.0.1:" in err and "nothing to finalise" in err


@pytest.mark.parametrize("case", ["wrong password", "no server"])
def test_a_bad_password_or_no_server_is_one_line_before_any_model_is_loaded(experts, postgres, tmp_path, monkeypatch, capsys, case):  # noqa: F811
    import hfmerge.planning
    from postgres_fixtures import free_port

    monkeypatch.setattr(hfmerge.planning, "build_plan", lambda *a, **k: pytest.fail("a model was loaded"))
    url = postgres.url(password="not-the-password") if case == "wrong password" else postgres.url(port=free_port())
    assert main(worker_args(recipe(tmp_path / "df.yaml", experts, 4), tmp_path / "out", url, "bad")) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the search storage postgresql://hfmerge:***@127.0.0.1:")
    assert ("password authentication failed" if case == "wrong password" else "refused") in lines[0]
    assert "not-the-password" not in captured.err and postgres.password not in captured.err


def test_missing_server_programs_fail_with_how_to_install_them(tmp_path, monkeypatch):
    import postgres_fixtures

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(postgres_fixtures, "VERSIONED", tmp_path)
    with pytest.raises(postgres_fixtures.ServerError, match=r"not found on PATH .*apt-get install postgresql"):
        postgres_fixtures.server_binaries()


def test_heartbeat_settings_are_checked(capsys):
    import hfmerge

    with pytest.raises(hfmerge.OptionError, match=r"^grace_period: 5 s is not longer than the heartbeat interval \(10 s\)"):
        hfmerge.RunOptions(heartbeat_interval=10, grace_period=5)
    with pytest.raises(hfmerge.OptionError, match=r"^heartbeat_interval: got 0; expected a positive whole number of seconds"):
        hfmerge.RunOptions(heartbeat_interval=0)
    assert main(["r.yaml", "--heartbeat-interval", "5", "--grace-period", "5"]) == 1
    assert "--grace-period: 5 s is not longer than the heartbeat interval (5 s)" in capsys.readouterr().err
