"""`python -m benchmarks.lab weights RUN [RUN ...]`: what equation 8's Fisher weights do at a
DF-Merge search's final λ, and how rough each search's objective was.

A RUN is a lab run folder of a Fisher-weighted DF-Merge row (``table/dfmerge-<digest>``, as
`Lab.run_dir` names them): its ``merged/dfmerge_search.json`` gives the λ found, and its Fisher
cache (``hfmerge-cache/fisher``) holds each model's Fisher at its λ (the final merge's). Over
every entry of every merged tensor, with M models, A the models with λ_i ≠ 0 and
w_i = M F_i / Σ_j F_j (F with its 1e-12, as the merge adds it):

* ``one model ≥ 90%``: the share of entries where a single model holds at least 90% of the
  Fisher mass (equation 8 is then nearly all-or-nothing there);
* ``switched-off share``: the mean share Σ_{i ∉ A} F_i / Σ_j F_j of the Fisher mass held by
  models whose λ is 0 (they add nothing to the numerator, so this share pulls the entry
  towards θ_pre);
* ``kept weight``: the mean of Σ_{i ∈ A} w_i / |A| (1 when the switched-off models hold no
  Fisher; equation 8 with equal Fishers over A would give M / |A|);
* ``stretched``: the share of entries where some model of A gets w_i > 1 (its task vector
  applied beyond λ_i τ_i), and the 99th percentile of max_{i ∈ A} w_i.

And from the run's trial log, for any DF-Merge run (with or without Fisher), the objective's
**roughness**: over every pair of completed trials whose λ lie within 0.2 of each other
(Euclidean distance, > 0), the median and mean |difference of their validation scores|. A
smooth objective moves little between nearby λ; a jagged one moves by points.

These are the quantities behind hypotheses (a) and (b) of the capped weighting
(docs/methods.md, DF-Merge's opt-in variants).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

FISHER_EPS = 1e-12
NEAR = 0.2  # λ distance within which two trials count as neighbours
QUANTILE_SAMPLE = 1_000_000


def roughness(trials: list[dict], near: float = NEAR) -> tuple[int, float | None, float | None]:
    """Pairs of completed trials within `near` of each other in λ, and the median and mean of
    their |score difference| (None, None without such a pair)."""
    done = [t for t in trials if t.get("state", "COMPLETE") == "COMPLETE" and t.get("score") is not None]
    gaps = [abs(a["score"] - b["score"]) for a, b in itertools.combinations(done, 2) if 0 < math.dist(a["params"], b["params"]) < near]
    if not gaps:
        return 0, None, None
    return len(gaps), statistics.median(gaps), statistics.fmean(gaps)


def fishers_at_final(run: Path) -> tuple[list[str], list[float], list[dict[str, Any]]]:
    """The models in merge order, their λ, and each one's Fisher at its λ (tensor name → tensor)."""
    from safetensors import safe_open

    summary = json.loads((run / "merged" / "dfmerge_search.json").read_text())
    models, lambdas = list(summary["lambdas"]), [float(v) for v in summary["lambdas"].values()]
    found: dict[tuple[str, float], Path] = {}
    for path in sorted((run / "hfmerge-cache" / "fisher").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("kind") == "diagonal" and "lambda" in meta:
            found[(meta["model"], float(meta["lambda"]))] = path
    fishers = []
    for model, lam in zip(models, lambdas):
        path = next((p for (m, v), p in found.items() if m == model and abs(v - lam) < 1e-9), None)
        if path is None:
            raise SystemExit(f"{run}: no Fisher of {model} at λ = {lam} in {run / 'hfmerge-cache' / 'fisher'}")
        with safe_open(str(path), "pt") as f:
            fishers.append({name: f.get_tensor(name) for name in f.keys()})
    return models, lambdas, fishers


def weight_statistics(lambdas: list[float], fishers: list[dict[str, Any]]) -> dict[str, float]:
    """The statistics of the module docstring over every tensor the Fishers share."""
    import torch

    m = len(fishers)
    kept = [i for i, lam in enumerate(lambdas) if lam != 0]
    n = 0
    dominant = off_share = kept_weight = stretched = 0.0
    top: list[torch.Tensor] = []
    for name in sorted(set.intersection(*(set(f) for f in fishers))):
        f = torch.stack([fi[name].double().reshape(-1) + FISHER_EPS for fi in fishers])  # (M, entries)
        total = f.sum(0)
        share = f / total
        n += f.shape[1]
        dominant += float((share.max(0).values >= 0.9).sum())
        off = [i for i in range(m) if i not in kept]
        off_share += float(share[off].sum(0).sum()) if off else 0.0
        if kept:
            w = m * share[kept]
            kept_weight += float((w.sum(0) / len(kept)).sum())
            stretched += float((w > 1).any(0).sum())
            top.append(w.max(0).values.float())
    p99 = 0.0
    if top:
        largest = torch.cat(top)
        if largest.numel() > QUANTILE_SAMPLE:  # torch.quantile takes at most 16M values: a fixed random sample
            largest = largest[torch.randperm(largest.numel(), generator=torch.Generator().manual_seed(0))[:QUANTILE_SAMPLE]]
        p99 = float(torch.quantile(largest, 0.99))
    return {"entries": n, "one_model_90": dominant / n, "switched_off_share": off_share / n, "kept_weight": kept_weight / n if kept else 0.0,
            "stretched": stretched / n, "max_kept_weight_p99": p99, "kept": len(kept), "models": m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="lab run folders (table/dfmerge-<digest>) of DF-Merge rows")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    import yaml

    rows = []
    for run in args.runs:
        if not (run / "merged" / "dfmerge_search.json").exists():
            raise SystemExit(f"{run}: no finished DF-Merge search here (merged/dfmerge_search.json is missing); give the folder of a "
                             "DF-Merge row the lab table has finished")
        setting = (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("parameters") or {}
        weighting = "no Fisher" if setting.get("fisher") is False else str(setting.get("fisher_weighting", "paper"))
        if setting.get("fisher_temperature") is not None:
            weighting += f", α = {setting['fisher_temperature']}"
        trials = [json.loads(line) for line in (run / "merged" / "trials.jsonl").read_text().splitlines() if line.strip()]
        pairs, median, mean = roughness(trials)
        row = {"run": run.name, "weighting": weighting, "seed": setting.get("seed", "?"), "pairs": pairs, "roughness_median": median,
               "roughness_mean": mean}
        if weighting != "no Fisher":
            _, lambdas, fishers = fishers_at_final(run)
            row.update({"lambdas": lambdas, **weight_statistics(lambdas, fishers)})
        else:
            row["lambdas"] = list(json.loads((run / "merged" / "dfmerge_search.json").read_text())["lambdas"].values())
        rows.append(row)

    def pct(v: float | None) -> str:
        return "" if v is None else f"{100 * v:.2f}"

    print(f"| run | weighting | seed | λ | trial pairs within {NEAR} | roughness: median, mean (points) | one model ≥ 90% | switched-off share | "
          "kept weight | stretched (some w_i > 1) | max kept w_i, 99th pct |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lam = ", ".join(f"{v:.2f}" for v in r["lambdas"])
        fisher = (f"{100 * r['one_model_90']:.1f}% | {100 * r['switched_off_share']:.1f}% | {r['kept_weight']:.3f} | {100 * r['stretched']:.1f}% | "
                  f"{r['max_kept_weight_p99']:.2f}") if "entries" in r else " | | | | "
        print(f"| {r['run']} | {r['weighting']} | {r['seed']} | {lam} | {r['pairs']} | {pct(r['roughness_median'])}, {pct(r['roughness_mean'])} | {fisher} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
