#!/usr/bin/env python
"""One worker against two on a shared PostgreSQL study: best score so far per completed trial.

The objective is a smooth stand-in for a DF-Merge search (4 coefficients, maximum 1.0 at a
known λ, a fixed sleep per trial so that the workers' trials overlap as real ones do), so the
comparison is about the sampler: with two workers, each new λ is chosen while the other
worker's trial is still RUNNING (qLogEI conditions on it), and the question is whether the
best score after k completed trials is as good as one worker's. Trials are ordered by the
time they completed. Each configuration runs for several seeds; the table gives the mean
regret (1 − best so far) after k completed trials.

A PostgreSQL server is started for the run (as the tests do) unless ``--storage`` names one.

Examples::

    python benchmarks/distributed_search.py
    python benchmarks/distributed_search.py --seeds 6 --trials 30 --trial-s 1.0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

OPTIMUM = (0.3, 0.7, 0.5, 0.2)

WORKER = """
import sys, time
from pathlib import Path
from hfmerge.searching import SearchSettings, TrialOutcome, run_search

url, name, seed, n, startup, trial_s, workdir = sys.argv[1:8]
optimum = {optimum}

def objective(lambdas):
    time.sleep(float(trial_s))
    return TrialOutcome(score=1.0 - sum((x - o) ** 2 for x, o in zip(lambdas, optimum)))

settings = SearchSettings(names=["a", "b", "c", "d"], n_trials=int(n), n_startup_trials=int(startup), seed=int(seed), storage=url, study_name=name)
run_search(objective, settings, workdir=Path(workdir), progress=False)
""".format(optimum=OPTIMUM)


def run(url: str, name: str, workers: int, seed: int, n: int, startup: int, trial_s: float, workdir: Path) -> tuple[list[float], float, int]:
    """Best-so-far by completed trial, wall seconds, and the number of distinct λ."""
    import optuna
    from optuna.trial import TrialState

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(seed), str(n), str(startup), str(trial_s), str(workdir / f"{name}-{i}")],
                              env=env, cwd=REPO) for i in range(workers)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"a worker of {name} failed (exit {p.returncode})")
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=url)
    done = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    best, curve = -float("inf"), []
    for t in done:
        best = max(best, t.value)
        curve.append(best)
    return curve, wall, len({tuple(t.params.values()) for t in done})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", help="a PostgreSQL URL (default: start a throw-away server)")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--startup", type=int, default=6)
    p.add_argument("--trial-s", type=float, default=0.5, help="seconds each trial sleeps (the objective's cost)")
    args = p.parse_args(argv)
    import tempfile

    from postgres_fixtures import running_server

    with contextlib.ExitStack() as stack:
        url = args.storage or stack.enter_context(running_server()).url()
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stamp = int(time.time())
        results = {}
        for workers in (1, 2):
            curves, walls, distinct = [], [], []
            for seed in range(args.seeds):
                curve, wall, n_distinct = run(url, f"bench-{stamp}-{workers}w-{seed}", workers, seed, args.trials, args.startup, args.trial_s, workdir)
                curves.append(curve)
                walls.append(wall)
                distinct.append(n_distinct)
            results[workers] = (curves, walls, distinct)
        checkpoints = sorted({args.startup, args.startup + 4, args.trials // 2, (3 * args.trials) // 4, args.trials})
        print(f"mean regret (1 - best so far) after k completed trials, {args.seeds} seeds, {args.trials} trials, {args.startup} random")
        print("| workers | " + " | ".join(f"k = {k}" for k in checkpoints) + " | distinct λ | wall s |")
        print("|---|" + "---|" * (len(checkpoints) + 2))
        for workers, (curves, walls, distinct) in results.items():
            regrets = [sum(1.0 - c[k - 1] for c in curves) / len(curves) for k in checkpoints]
            print(f"| {workers} | " + " | ".join(f"{r:.4f}" for r in regrets)
                  + f" | {min(distinct)}–{max(distinct)} of {args.trials} | {sum(walls) / len(walls):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
