#!/usr/bin/env python
"""Per-tensor cost of the task-vector methods' pure functions, without any I/O.

Times each method's tensor function (`hfmerge.methods.<module>.<function>`) on one tensor
position: a base and M experts of one shape (default 768 × 3072, flan-t5-base's feed-forward
matrices), one torch thread, best of `--repeat` calls after a warm-up. With `--src`, the same
is measured for other hfmerge source trees (e.g. a worktree of an older commit), each in its
own process, round-robin over `--rounds` so that a change of machine load hits every tree
alike; the table gives each tree's best and its ratio to the first tree.

Usage::

    python benchmarks/method_kernels.py                                  # the installed hfmerge
    python benchmarks/method_kernels.py --src /path/old-tree --src .     # before / after
    python benchmarks/method_kernels.py --shape 32128 768 --repeat 2     # the embedding's shape
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# label -> (module, function, keyword arguments); densities as compare_mergekit.py's recipes use.
CASES = {
    "ties": ("ties", "ties", {"density": 0.3}),
    "dare_linear": ("dare", "dare", {"density": 0.3, "seeded": True}),
    "dare_ties": ("dare", "dare", {"density": 0.3, "seeded": True, "combine": "ties", "normalize": False}),
    "breadcrumbs": ("breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": ("breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01, "combine": "ties"}),
    "sce": ("sce", "sce", {"select_topk": 0.5}),
    "della": ("della", "della", {"density": 0.5, "epsilon": 0.1, "seeded": True}),
    "task_arithmetic": ("task_arithmetic", "task_arithmetic", {}),
}
WEIGHTS = [1.0, 0.6, 0.3, 0.8, 0.5, 0.7, 0.9, 0.4]


def measure(methods: list[str], shape: tuple[int, ...], models: int, repeat: int) -> dict[str, float]:
    """Best wall seconds of one call per method, in this process (one torch thread)."""
    import importlib

    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    # Task vectors of fine-tuning size: θ_i = θ_pre + 0.01·N(0, 1), rounded in float32 as stored.
    tensors = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(models)]
    out = {}
    for label in methods:
        module, name, kwargs = CASES[label]
        func = getattr(importlib.import_module(f"hfmerge.methods.{module}"), name)
        kwargs = dict(kwargs)
        seeded = kwargs.pop("seeded", False)
        for per_model in ("density", "gamma", "epsilon"):
            if per_model in kwargs:
                kwargs[per_model] = [kwargs[per_model]] * models
        if label != "sce":
            kwargs["weight"] = WEIGHTS[:models]

        def call() -> None:
            extra = {"generators": [torch.Generator().manual_seed(10 + i) for i in range(models)]} if seeded else {}
            func(base, tensors, **kwargs, **extra)

        call()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        out[label] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--methods", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--shape", nargs="+", type=int, default=[768, 3072], help="the tensor's shape (default 768 3072)")
    p.add_argument("--models", type=int, default=4, help="experts besides the base (default 4)")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per method and round; the best counts (default 5)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over the source trees (default 2)")
    p.add_argument("--src", action="append", help="an hfmerge source tree to measure (repeatable; default: the installed hfmerge)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import hfmerge

        print(json.dumps({"source": os.path.dirname(os.path.dirname(os.path.abspath(hfmerge.__file__))),
                          "seconds": measure(args.methods, tuple(args.shape), args.models, args.repeat)}))
        return 0
    trees = args.src or [None]
    best: dict[int, dict[str, float]] = {i: {} for i in range(len(trees))}
    for _ in range(args.rounds):
        for i, tree in enumerate(trees):
            env = dict(os.environ)
            if tree is not None:
                env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--methods", *args.methods, "--shape", *map(str, args.shape),
                   "--models", str(args.models), "--repeat", str(args.repeat)]
            got = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
            if tree is not None and os.path.realpath(got["source"]) != os.path.realpath(tree):
                raise SystemExit(f"{tree}: the worker imported hfmerge from {got['source']}; give the folder that holds the hfmerge package")
            for label, seconds in got["seconds"].items():
                best[i][label] = min(best[i].get(label, float("inf")), seconds)
    names = [tree or "installed" for tree in trees]
    shape = " × ".join(map(str, args.shape))
    print(f"one tensor position: base + {args.models} experts of {shape} float32, one torch thread, best of "
          f"{args.repeat} × {args.rounds} rounds; ms per call")
    header = "| method | " + " | ".join(f"{n} ms" for n in names) + "".join(f" | {n} / {names[0]}" for n in names[1:]) + " |"
    print(header)
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for label in args.methods:
        ms = [best[i][label] * 1000 for i in range(len(trees))]
        cells = [f"{v:.1f}" for v in ms] + [f"{v / ms[0]:.2f}" for v in ms[1:]]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
