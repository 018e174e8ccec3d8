#!/usr/bin/env python
"""DF-Merge search cost on tiny models: where a trial's time goes, and how soon the search is
near its final best.

Builds a tiny T5 base (original layout) and one expert per keyword task ("does the text
contain wK?", yes/no), each fine-tuned for a few steps, then runs ``merge_method: dfmerge``
(10 random start trials + 50 guided ones by default) through the command line and reads the
trial log. Prints:

1. the mean seconds per trial in each stage (Fisher, merge, evaluation), Optuna's sampling
   time and the rest of the trial's wall time ("overhead": everything that is none of the
   three stages, sampling included), as a share of the trial;
   (Optuna's sampling is listed apart from the rest of the driver's overhead);
2. the search's best-so-far validation score by trial, and the trial and cumulative time at
   which it came within 0.6 points (0.006) of the final best;
3. for context, the same search without Fisher (``fisher: false``) and task arithmetic's
   validation score at λ = 0.3, 0.5 and 1.0;
4. with ``--reference``, the same search with the reference implementation's Fisher
   (``fisher_implementation: loop``: one example at a time, a full-model gradient per example
   and option, as the authors' code computes it; same model, same examples, same seed), its
   per-trial time and split beside hfmerge's, the ratio of the two, and whether both searches
   visited the same λ and chose the same best trial.

``--lab`` runs the searches on the merge lab's base and five experts (``benchmarks/lab``; the
lab must be built, see its README) instead of the tiny keyword models.

Examples::

    python benchmarks/dfmerge_search.py
    python benchmarks/dfmerge_search.py --tasks 4 --trials 30 --startup 10
    python benchmarks/dfmerge_search.py --lab --trials 20 --reference --no-ablation
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import hfmerge  # noqa: E402
from hfmerge.testing import build_base, keyword_rows, train_expert  # noqa: E402
from test_evaluation import make_tokenizer, write_jsonl  # noqa: E402


def build_world(root: Path, n_tasks: int, d_model: int) -> tuple[Path, list[Path], list[dict]]:
    tok = make_tokenizer(append_eos=True)
    base = build_base(root / "base", "t5", seed=11, d_model=d_model)
    tok.save_pretrained(base)
    models, tasks = [], []
    for i in range(n_tasks):
        kw = f"w{i + 1}"
        rows = keyword_rows(96, keyword=kw, seed=i)
        for r in rows:
            r["answer"] = ["no", "yes"][r["label"]]
        data = write_jsonl(root / f"task{i}.jsonl", rows)
        models.append(train_expert(base, root / f"expert{i}", tok, [(f"Review: {r['text']} Answer:", r["answer"]) for r in rows],
                                   steps=40, lr=1e-2, seed=i))
        tasks.append({"task": f"has_{kw}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
                      "validation_split": "validation", "doc_to_text": "Review: {{text}} Answer:", "doc_to_choice": ["no", "yes"],
                      "doc_to_target": "label", "num_validation_examples": 64})
    return base, models, tasks


def run(root: Path, name: str, recipe: dict) -> tuple[float, Path]:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = root / f"out-{name}"
    start = time.perf_counter()
    hfmerge.merge(path, output=out, overwrite=True, progress=False)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=3, help="keyword tasks = experts = coefficients (default 3)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--startup", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--fisher-examples", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true", help="also run the search with the reference's per-example loop Fisher and compare")
    parser.add_argument("--no-ablation", action="store_true", help="skip the search without Fisher")
    parser.add_argument("--lab", action="store_true", help="search on the merge lab's models (built by `python -m benchmarks.lab build`)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); "
          + ("the merge lab's base and five experts" if args.lab else f"{args.tasks} tiny T5 experts (d_model {args.d_model})")
          + f", {args.trials} trials ({min(args.startup, args.trials)} random)")
    result: dict = {}
    searches = [("dfmerge", {})]
    if not args.no_ablation:
        searches.append(("dfmerge_no_fisher", {"fisher": False}))
    if args.reference:
        searches.append(("dfmerge_reference_fisher", {"fisher_implementation": "loop"}))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.lab:
            from benchmarks.lab.settings import settings_for
            from benchmarks.lab.table import Lab

            lab = Lab(settings_for(quick=False))
            torch.set_num_threads(args.threads)  # the lab sets its own thread count
            common = {k: v for k, v in lab.recipe("dfmerge").items() if k != "parameters"}
            fisher_examples = lab.settings.fisher_examples or args.fisher_examples
        else:
            base, models, tasks = build_world(root, args.tasks, args.d_model)
            common = {"base_model": str(base), "models": [{"model": str(m)} for m in models], "tasks": tasks}
            fisher_examples = args.fisher_examples
        params = {"n_trials": args.trials, "n_startup_trials": min(args.startup, args.trials), "seed": 0, "fisher_examples": fisher_examples}
        for name, extra in searches:
            wall, out = run(root, name, {"merge_method": "dfmerge", **common, "parameters": {**params, **extra}})
            log = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
            done = [r for r in log if r["state"] == "COMPLETE"]
            stage = {k: sum(r["timings"][k] for r in done) / len(done) for k in ("fisher_s", "merge_s", "eval_s")}
            trial = sum(r["trial_s"] for r in done) / len(done)
            sample = sum(r["sample_s"] for r in done) / len(done)
            best, curve, cumulative = -1.0, [], 0.0
            for r in done:
                cumulative += r["trial_s"]
                best = max(best, r["score"])
                curve.append((r["number"], best, cumulative))
            final = curve[-1][1]
            reach = next(c for c in curve if c[1] >= final - 0.006)
            summary = json.loads((out / "dfmerge_search.json").read_text())
            result[name] = {"wall_s": wall, "trial_s": trial, "sample_s": sample, **stage, "overhead_s": trial - sum(stage.values()),
                            "driver_s": trial - sum(stage.values()) - sample,
                            "final_best": final, "reach_trial": reach[0], "reach_s": reach[2], "search_s": cumulative,
                            "best_lambdas": summary["lambdas"], "best_trial": summary.get("best_trial"),
                            "trials": [{"number": r["number"], "params": r.get("params"), "score": r["score"]} for r in done]}
            print(f"  {name}: done", file=sys.stderr)
        if not args.lab:
            ta = {}
            for lam in (0.3, 0.5, 1.0):
                _, out = run(root, f"ta{lam}", {"merge_method": "task_arithmetic", **common, "parameters": {"lambda": lam}})
                ta[lam] = json.loads((out / "eval_results.json").read_text())["average"]
            result["task_arithmetic"] = ta
    print("\n| search | trials | s/trial | Fisher s | merge s | evaluation s | Optuna sampling s (share) | other overhead s (share) | final best | within 0.6 pt at trial | after s | whole search s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, _ in searches:
        r = result[name]
        print(f"| {name} | {args.trials} | {r['trial_s']:.3f} | {r['fisher_s']:.3f} | {r['merge_s']:.3f} | {r['eval_s']:.3f} | {r['sample_s']:.3f} "
              f"({100 * r['sample_s'] / r['trial_s']:.1f}%) | {r['driver_s']:.3f} ({100 * r['driver_s'] / r['trial_s']:.1f}%) | {r['final_best']:.4f} | {r['reach_trial']} | {r['reach_s']:.1f} | {r['search_s']:.1f} |")
    if "task_arithmetic" in result:
        print("\ntask arithmetic (validation average): " + ", ".join(f"λ={k}: {v:.4f}" for k, v in result["task_arithmetic"].items()))
    if args.reference:
        ours, ref = result["dfmerge"], result["dfmerge_reference_fisher"]
        same_points = [a["params"] == b["params"] for a, b in zip(ours["trials"], ref["trials"])]
        largest = max(abs(a["score"] - b["score"]) for a, b in zip(ours["trials"], ref["trials"]))
        result["reference"] = {"trial_ratio": ours["trial_s"] / ref["trial_s"], "fisher_ratio": ours["fisher_s"] / ref["fisher_s"],
                               "same_points": sum(same_points), "trials_compared": len(same_points), "largest_score_difference": largest,
                               "same_best": ours["best_lambdas"] == ref["best_lambdas"]}
        x = result["reference"]
        print(f"\nhfmerge's trial against the reference-style trial (loop Fisher): {x['trial_ratio']:.2f}x the time "
              f"(Fisher alone {x['fisher_ratio']:.2f}x); same λ in {x['same_points']} of {x['trials_compared']} trials, "
              f"largest validation difference {x['largest_score_difference']:.2e}, same best λ: {'yes' if x['same_best'] else 'no'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
