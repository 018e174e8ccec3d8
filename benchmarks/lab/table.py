"""Run every merge method on the lab and print the tables (DF-Merge paper, Tables 2 and 3).

    python -m benchmarks.lab table [--quick] [--methods average,ties,...] [--results DIR]

Every merge goes through hfmerge's public path: a recipe YAML (mergekit keys, a ``tasks:``
section in lm-evaluation-harness keys pointing at the lab's jsonl files) run by
`hfmerge.merge` (what ``hfmerge RECIPE -o DIR`` runs), then scored with `hfmerge.evaluate`
on the validation split (for the methods that choose
hyperparameters) and the test split. A method hfmerge does not have yet (or whose recipe it
rejects) is listed as "not implemented yet" with the reason, so new methods show up here as
soon as they land.

Rows, as in the paper: zero-shot (the pre-trained base), each expert on its own task, the
multitask model, Averaging, Task Arithmetic (λ grid on validation), TIES (λ grid, density
0.2), DARE (drop-rate × λ grid), Fisher merging, Fisher nodes, DF-Merge (GP search) and
DF-Merge without Fisher. Wall time is the method's own cost: every merge and validation
evaluation of its search, plus the final merge; test scoring is not counted. Variant rows
(`VARIANT_ROWS`: Fisher merging's floor on every Fisher or none, DF-Merge's capped
weighting, equation 8 over the kept models, and the capped weighting of F^0.5) run only when
``--methods`` names them.

Seeds: the DF-Merge recipes take ``seed`` (the sampler) and, for the Fisher-weighted ones,
``fisher_seed`` (which validation inputs the Fishers use) both from ``--search-seed``; the
models, the grids and the Fisher merging rows do not depend on it.

Outputs (``--results``; default ``benchmarks/lab/results/`` for the full lab and the cache
folder for ``--quick``): ``table.md`` (both tables), ``results.json`` (every figure),
``trajectory.png`` (Figure 4), ``validation_fraction.png`` (Figure 5).

Merges and scores are cached under the lab's folder, keyed by the recipe and a hash of
hfmerge's source, so a second run only redoes what changed.

Newer rows (`NEW_ROWS`): RegMean (α grid, Gram matrices on the Fisher rows' number of
validation inputs), TSV-Merge, Iso-C and Iso-CTS (α on task arithmetic's λ grid continued to
2, and to 8 for the Iso methods), and two recipes whose parameters the generic engine searches
(``{search: [low, high]}`` and a ``search:`` block with DF-Merge's budget and
``--search-seed``): TIES with λ and density, task arithmetic with one weight per model. ``python -m benchmarks.lab seeds`` summarises runs with
several search seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.lab.build import build_lab, log, quiet_libraries, threads  # noqa: E402
from benchmarks.lab.settings import REPO, RESULTS_DIR, TASKS, LabSettings, settings_for, task_entries  # noqa: E402

TA_GRID = [round(0.1 * i, 1) for i in range(0, 11)]            # paper: [0, 1] step 0.1
TIES_GRID = [round(0.8 + 0.1 * i, 1) for i in range(0, 11)]     # paper: [0.8, 1.8] step 0.1
TIES_DENSITY = 0.2                                               # TIES paper's k = 20%
DARE_DROP = [0.1, 0.3, 0.5, 0.7, 0.9]                            # paper: [0.1, 0.9] step 0.2
DARE_LAMBDAS = [0.2, 0.4, 0.6, 0.8, 1.0]

QUICK_TA_GRID = [0.3, 0.6, 1.0]
QUICK_TIES_GRID = [0.8, 1.3, 1.8]
QUICK_DARE_DROP = [0.3, 0.7]
QUICK_DARE_LAMBDAS = [0.5, 1.0]

METHOD_ROWS = ("zero_shot", "experts", "multitask", "average", "fisher", "task_arithmetic", "dare", "ties",
               "fisher_nodes", "dfmerge", "dfmerge_no_fisher")
# Variants of the rows above, run only when --methods names them: Fisher merging with its
# 1e-6 floor on every model's Fisher or on none (the row above floors the first model's
# only), and DF-Merge with the capped Fisher weighting.
VARIANT_ROWS = ("fisher_floor_all", "fisher_floor_none", "dfmerge_capped", "dfmerge_kept", "dfmerge_capped_t05")
VARIANT_PARAMETERS = {"fisher_floor_all": {"favor_target_model": False}, "fisher_floor_none": {"fisher_floor": 0.0},
                      "dfmerge_capped": {"fisher_weighting": "capped"}, "dfmerge_kept": {"fisher_weighting": "kept"},
                      "dfmerge_capped_t05": {"fisher_weighting": "capped", "fisher_temperature": 0.5}}
LABELS = {
    "chance": "Chance (uniform guess)", "zero_shot": "Zero-shot", "experts": "Fine-tuned (each expert on its task)",
    "multitask": "Multi-task", "average": "Averaging", "fisher": "Fisher Merging", "task_arithmetic": "Task Arithmetic",
    "dare": "DARE", "ties": "TIES-Merging", "fisher_nodes": "Fisher Nodes", "dfmerge": "DF-Merge (GP, logEI)",
    "dfmerge_no_fisher": "DF-Merge w/o Fisher (GP over GTA)",
    "fisher_floor_all": "Fisher Merging, floor on every Fisher", "fisher_floor_none": "Fisher Merging, no floor",
    "dfmerge_capped": "DF-Merge, capped Fisher weights",
    "dfmerge_kept": "DF-Merge, equation 8 over the kept models",
    "dfmerge_capped_t05": "DF-Merge, capped weights of F^0.5",
}
USES_VALIDATION = {"average": False, "zero_shot": None, "experts": None, "multitask": None}

# Newer methods and searched parameters, kept in their own block (run by `run_new_row`):
# RegMean (data-aware: Gram matrices of the linear layers' inputs on each task's validation
# examples; α on a small grid), the singular-value merges (α on task arithmetic's λ grid), and
# two recipes searched by the generic engine (`{search: [low, high]}` plus a `search:` block)
# with the DF-Merge rows' budget and seed: TIES with λ and density searched, and task
# arithmetic with one searched weight per model (the space of DF-Merge w/o Fisher).
REGMEAN_ALPHAS = [0.1, 0.5, 0.9, 1.0]                           # FusionBench's configurations use 0.1-0.95
QUICK_REGMEAN_ALPHAS = [0.5, 1.0]
SVD_ROWS = ("tsv_merge", "iso_c", "iso_cts")
# Task arithmetic's λ grid, continued to 2: α scales the whole merged update, and on the full lab
# TSV's and Iso-C's validation scores still rose at α = 1 (their reference default).
SVD_ALPHAS = [*TA_GRID, 1.2, 1.4, 1.6, 1.8, 2.0]
# Iso-C and Iso-CTS flatten the spectrum to its mean singular value, which shrinks the update's
# top directions: their validation scores were still rising at α = 2, so their grid goes further.
ISO_ALPHAS = [*SVD_ALPHAS, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0]
SEARCH_ROWS = ("ta_weights_search", "ta_depth_weights_search", "ties_search")
TIES_SEARCH_SPACE = {"lambda": [0.0, 2.0], "density": [0.1, 1.0]}   # holds the grid row's λ range and density
TA_WEIGHT_RANGE = [0.0, 1.0]                                         # DF-Merge's λ_i range
NEW_ROWS = ("regmean", *SVD_ROWS, *SEARCH_ROWS)
METHOD_ROWS = (*METHOD_ROWS, *NEW_ROWS)
LABELS.update({
    "regmean": "RegMean", "tsv_merge": "TSV-Merge", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
    "ta_weights_search": "Task Arithmetic, weights searched (GP)", "ties_search": "TIES, λ and density searched (GP)",
    "ta_depth_weights_search": "Task Arithmetic, weights searched per depth (GP)",
})


@dataclass
class Row:
    key: str
    label: str
    status: str = "ok"                 # ok | not implemented yet: ... | failed: ...
    scores: dict[str, float] = field(default_factory=dict)
    validation_average: float | None = None
    seconds: float | None = None
    setting: str = ""
    uses_validation: bool | None = None

    @property
    def average(self) -> float | None:
        return sum(self.scores.values()) / len(self.scores) if self.scores and len(self.scores) == len(TASKS) else None


# --------------------------------------------------------------------------- hfmerge access

def source_fingerprint() -> str:
    """A hash of hfmerge's source files: cached results are reused only for the same code."""
    h = hashlib.sha256()
    for path in sorted((REPO / "hfmerge").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def method_available(name: str, recipe: dict, recipe_dir: Path) -> str | None:
    """None if hfmerge accepts this recipe, else why not (without reading any weight)."""
    from hfmerge.errors import HfMergeError
    from hfmerge.methods import METHODS
    from hfmerge.recipe import parse_recipe

    if name not in METHODS:
        return f"not implemented yet (hfmerge has no merge_method {name!r})"
    try:
        parse_recipe(recipe, source=str(recipe_dir / "recipe.yaml"), base_dir=recipe_dir)
    except HfMergeError as exc:
        return f"not implemented yet ({exc})"
    return None


class Lab:
    """The lab's models, its tasks and a cache of merges and scores."""

    def __init__(self, settings: LabSettings, *, progress: bool = False) -> None:
        self.settings = settings
        self.paths = build_lab(settings)
        self.work = self.paths["multitask"].parent / "table"
        self.work.mkdir(parents=True, exist_ok=True)
        self.fingerprint = source_fingerprint()
        self.progress = progress
        self.last_score_seconds = 0.0
        self._prepared: dict[tuple[str, int | None], list] = {}

    # ---- recipes and merges

    def recipe(self, method: str, parameters: dict | None = None, model_parameters: dict | None = None, *,
               tasks: bool = True, validation_examples: int | None = None) -> dict:
        from hfmerge.methods import METHODS

        parameters = dict(parameters or {})
        declared = METHODS[method].param("fisher_examples") if method in METHODS else None
        if self.settings.fisher_examples is not None and declared is not None:
            parameters.setdefault("fisher_examples", self.settings.fisher_examples)
        models = []
        for task in TASKS:
            entry: dict[str, Any] = {"model": str(self.paths[f"expert:{task}"])}
            if model_parameters:
                entry["parameters"] = copy.deepcopy(model_parameters)
            models.append(entry)
        data: dict[str, Any] = {"merge_method": method, "base_model": str(self.paths["base"]), "models": models, "dtype": "float32"}
        if parameters:
            data["parameters"] = dict(parameters)
        if tasks:
            data["tasks"] = task_entries(self.settings, validation_examples=validation_examples)
        return data

    def run_dir(self, recipe: dict) -> Path:
        digest = hashlib.sha256(json.dumps({"recipe": recipe, "code": self.fingerprint}, sort_keys=True).encode()).hexdigest()[:12]
        return self.work / f"{recipe['merge_method']}-{digest}"

    def merge(self, recipe: dict) -> tuple[Path, float, Path]:
        """Run the recipe with `hfmerge.merge` (cached). Returns (output folder, seconds, run folder).

        Raises:
            HfMergeError: hfmerge refused or failed the recipe.
        """
        import hfmerge

        run = self.run_dir(recipe)
        out = run / "merged"
        done = run / "merge.json"
        if done.exists() and (out / "config.json").exists():
            return out, json.loads(done.read_text())["seconds"], run
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        recipe_path = run / "recipe.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        # A cache of Fishers per run: every method pays for its own Fishers (honest wall
        # times) and nothing is written outside the lab's folder.
        saved = os.environ.get("HFMERGE_CACHE")
        os.environ["HFMERGE_CACHE"] = str(run / "hfmerge-cache")
        start = time.perf_counter()
        try:
            hfmerge.merge(recipe_path, hfmerge.RunOptions(output=out, overwrite=True, evaluate=False, progress=False))
        finally:
            if saved is None:
                os.environ.pop("HFMERGE_CACHE", None)
            else:
                os.environ["HFMERGE_CACHE"] = saved
        seconds = time.perf_counter() - start
        done.write_text(json.dumps({"seconds": round(seconds, 2)}))
        return out, seconds, run

    # ---- scoring

    def prepared(self, split: str, tasks: tuple[str, ...] = TASKS):
        from hfmerge.evaluation.evaluate_model import prepare_tasks
        from hfmerge.evaluation.tasks import parse_tasks

        key = (split, tasks)
        if key not in self._prepared:
            entries = [e for e in task_entries(self.settings) if e["task"] in tasks]
            for e in entries:
                e.pop("model")
            self._prepared[key] = prepare_tasks(parse_tasks(entries, source="lab tasks"), split)
        return self._prepared[key]

    def score(self, folder: Path, split: str, tasks: tuple[str, ...] = TASKS) -> dict[str, list[int]]:
        """Per task, 1/0 per example: was the prediction right (cached beside the folder)."""
        import hfmerge

        cache = folder.parent / f"scores2-{folder.name}-{split}-{'-'.join(tasks)}-{self.fingerprint}-{self.settings.eval_validation}-{self.settings.eval_test}.json"
        if cache.exists() and cache.stat().st_mtime >= (folder / "config.json").stat().st_mtime:
            cached = json.loads(cache.read_text())
            self.last_score_seconds = cached["seconds"]
            return cached["correct"]
        prepared = self.prepared(split, tasks)
        start = time.perf_counter()
        report = hfmerge.evaluate(folder, prepared, split=split, progress=self.progress, batch_size=64, device=None)
        self.last_score_seconds = time.perf_counter() - start
        correct = {}
        for data, result in zip(prepared, report.results):
            labels = [e.label for e in data.examples(split)]
            correct[result.task] = [int(p == y) for p, y in zip(result.predictions, labels)]
        cache.write_text(json.dumps({"seconds": round(self.last_score_seconds, 2), "correct": correct}))
        return correct


def accuracy(correct: dict[str, list[int]], subset: dict[str, list[int]] | None = None) -> dict[str, float]:
    out = {}
    for task, values in correct.items():
        idx = subset[task] if subset else range(len(values))
        chosen = [values[i] for i in idx]
        out[task] = sum(chosen) / len(chosen)
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# --------------------------------------------------------------------------- methods

def reference_rows(lab: Lab) -> list[Row]:
    rows = []
    chance = {}
    for data in lab.prepared("test"):
        chance[data.spec.name] = mean(1 / len(e.options) for e in data.examples("test"))
    rows.append(Row("chance", LABELS["chance"], scores=chance, setting="1 / number of options"))
    for key, folder in (("zero_shot", lab.paths["base"]), ("multitask", lab.paths["multitask"])):
        start = time.perf_counter()
        correct = lab.score(folder, "test")
        rows.append(Row(key, LABELS[key], scores=accuracy(correct), setting=f"{folder.name}", seconds=None))
        log(f"{LABELS[key]}: {mean(rows[-1].scores.values()):.4f} ({time.perf_counter() - start:.1f} s)")
    experts = {}
    for task in TASKS:
        experts[task] = accuracy(lab.score(lab.paths[f"expert:{task}"], "test", (task,)))[task]
    rows.insert(2, Row("experts", LABELS["experts"], scores=experts, setting="expert i on task i"))
    log(f"experts: {mean(experts.values()):.4f}")
    return rows


@dataclass
class GridPoint:
    setting: dict
    folder: Path
    seconds: float
    validation: dict[str, list[int]]


def run_grid(lab: Lab, key: str, method: str, grid: list[tuple[dict, dict | None]], describe, *,
             tasks: bool = False) -> tuple[Row, list[GridPoint]]:
    """Merge and score every grid point on validation; the best one on test.

    `tasks`: the merge recipes carry the `tasks:` section (a method that computes statistics
    on the tasks' validation examples, such as RegMean, needs it).
    """
    probe = lab.recipe(method, *grid[0], tasks=True)
    why = method_available(method, probe, lab.run_dir(probe))
    if why:
        return Row(key, LABELS[key], status=why, uses_validation=True), []
    points = []
    for params, model_params in grid:
        recipe = lab.recipe(method, params, model_params, tasks=tasks)
        folder, merge_s, _ = lab.merge(recipe)
        validation = lab.score(folder, "validation")
        # merge + validation scoring, as measured when they ran (also when read from the cache)
        points.append(GridPoint({**(params or {}), **(model_params or {})}, folder, merge_s + lab.last_score_seconds, validation))
    best = max(points, key=lambda p: mean(accuracy(p.validation).values()))  # first of equals: the grid's order
    test = accuracy(lab.score(best.folder, "test"))
    row = Row(key, LABELS[key], scores=test, validation_average=mean(accuracy(best.validation).values()),
              seconds=sum(p.seconds for p in points), setting=describe(best.setting) + f" (best of {len(points)} on validation)",
              uses_validation=True)
    log(f"{LABELS[key]}: {row.average:.4f}  [{row.setting}]  {row.seconds:.0f} s")
    return row, points


def run_single(lab: Lab, key: str, method: str, params: dict | None = None, *, uses_validation: bool = True,
               validation_examples: int | None = None) -> tuple[Row, Path | None]:
    """One recipe (no grid): merge (a search method searches inside), then score on test."""
    recipe = lab.recipe(method, params, tasks=True, validation_examples=validation_examples)
    why = method_available(method, recipe, lab.run_dir(recipe))
    if why:
        log(f"{LABELS[key]}: {why}")
        return Row(key, LABELS[key], status=why, uses_validation=uses_validation), None
    try:
        folder, seconds, run = lab.merge(recipe)
    except Exception as exc:  # noqa: BLE001 - report the failure as a row, keep the table going
        log(f"{LABELS[key]}: failed: {exc}")
        return Row(key, LABELS[key], status=f"failed: {exc}", uses_validation=uses_validation), None
    test = accuracy(lab.score(folder, "test"))
    setting = ", ".join(f"{k}={v}" for k, v in (params or {}).items())
    chosen = chosen_lambdas(run)
    if chosen:
        setting += ("; " if setting else "") + "λ = " + ", ".join(f"{v:.2f}" for v in chosen)
    row = Row(key, LABELS[key], scores=test, seconds=seconds, setting=setting, uses_validation=uses_validation,
              validation_average=best_validation(run))
    log(f"{LABELS[key]}: {row.average:.4f}  [{row.setting}]  {seconds:.0f} s")
    return row, run


def find_trials(run: Path) -> list[dict]:
    """The search's trial log (``trials.jsonl``) wherever hfmerge put it inside the run folder."""
    for path in sorted(run.rglob("trials.jsonl")):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return []


def _best_trial(run: Path) -> dict | None:
    trials = [t for t in find_trials(run) if t.get("state", "COMPLETE") == "COMPLETE" and t.get("score") is not None]
    return max(trials, key=lambda t: t["score"]) if trials else None


def chosen_lambdas(run: Path) -> list[float] | None:
    best = _best_trial(run)
    return None if best is None else list(best["params"])


def best_validation(run: Path) -> float | None:
    """The search's best validation score (the mean of the tasks' accuracies), if it searched."""
    best = _best_trial(run)
    return None if best is None else float(best["score"])


# --------------------------------------------------------------------------- newer methods, searched rows

def run_new_row(lab: Lab, key: str, settings: LabSettings, quick: bool) -> tuple[Row, list[GridPoint]]:
    """RegMean and the singular-value merges on validation grids; the searched recipes."""
    if key == "regmean":
        from hfmerge.methods import METHODS

        # As many validation inputs per task as the Fisher rows use (hfmerge's Fisher default
        # unless the settings say otherwise), not RegMean's own default of 256.
        examples = settings.fisher_examples or METHODS["fisher"].param("fisher_examples").default
        grid = [({"alpha": a, "regmean_examples": examples}, None) for a in (QUICK_REGMEAN_ALPHAS if quick else REGMEAN_ALPHAS)]
        try:
            return run_grid(lab, key, "regmean", grid,
                            lambda s: f"α={s['alpha']}, Gram matrices on {s['regmean_examples']} validation inputs per task", tasks=True)
        except Exception as exc:  # noqa: BLE001 - e.g. a singular system at α = 1: a failed row, the table goes on
            log(f"{LABELS[key]}: failed: {exc}")
            return Row(key, LABELS[key], status=f"failed: {exc}", uses_validation=True), []
    if key in SVD_ROWS:
        grid = [({"alpha": a}, None) for a in (QUICK_TA_GRID if quick else ISO_ALPHAS if key.startswith("iso") else SVD_ALPHAS)]
        extra = ", common_space_fraction 0.8 (default)" if key == "iso_cts" else ""
        return run_grid(lab, key, key, grid, lambda s: f"α={s['alpha']}{extra}")
    if key in SEARCH_ROWS:
        return run_searched(lab, key, settings), []
    raise ValueError(f"unknown method row {key!r}; expected one of {NEW_ROWS}")


def searched_recipe(lab: Lab, key: str, settings: LabSettings) -> dict:
    """The recipe of a searched row: ranges in place of values and a `search:` block."""
    trials = settings.search_trials or settings.dfmerge_trials
    search = {"n_trials": trials, "n_startup_trials": min(settings.dfmerge_startup, trials), "seed": settings.search_seed}
    if key == "ta_weights_search":
        recipe = lab.recipe("task_arithmetic", {"lambda": 1.0}, {"weight": {"search": list(TA_WEIGHT_RANGE)}})
    elif key == "ta_depth_weights_search":
        # Two searched points per model, a gradient over depth: the first layers' weight and the
        # last layers', interpolated between (2 × M dimensions; AdaMerging's layer-wise idea
        # through the generic search).
        recipe = lab.recipe("task_arithmetic", {"lambda": 1.0}, {"weight": [{"search": list(TA_WEIGHT_RANGE)}] * 2})
    elif key == "ties_search":
        recipe = lab.recipe("ties", {name: {"search": list(r)} for name, r in TIES_SEARCH_SPACE.items()})
    else:
        raise ValueError(f"unknown searched row {key!r}; expected one of {SEARCH_ROWS}")
    recipe["search"] = search
    return recipe


def run_searched(lab: Lab, key: str, settings: LabSettings) -> Row:
    """One searched recipe: the search's best candidate on test, its best validation score, its time."""
    recipe = searched_recipe(lab, key, settings)
    why = method_available(recipe["merge_method"], recipe, lab.run_dir(recipe))
    if why:
        log(f"{LABELS[key]}: {why}")
        return Row(key, LABELS[key], status=why, uses_validation=True)
    try:
        folder, seconds, _ = lab.merge(recipe)
    except Exception as exc:  # noqa: BLE001 - report the failure as a row, keep the table going
        log(f"{LABELS[key]}: failed: {exc}")
        return Row(key, LABELS[key], status=f"failed: {exc}", uses_validation=True)
    from hfmerge.recipe_search import SUMMARY_FILE

    summary = json.loads((folder / SUMMARY_FILE).read_text())
    test = accuracy(lab.score(folder, "test"))
    search = recipe["search"]
    best = summary["best"]
    weights = [f"models[{i}].weight" for i in range(len(TASKS))]
    if list(best) == weights:  # one weight per model: in the models' (tasks') order, as DF-Merge's λ
        chosen = "weights = " + ", ".join(f"{best[n]:.2f}" for n in weights)
    else:
        chosen = ", ".join(f"{name} = {value:.2f}" for name, value in best.items())
    setting = (f"{recipe['merge_method']}, {len(summary['trials'])} trials ({search['n_startup_trials']} random), "
               f"seed={search['seed']}; {chosen}")
    row = Row(key, LABELS[key], scores=test, validation_average=summary["best_validation_score"], seconds=seconds,
              setting=setting, uses_validation=True)
    log(f"{LABELS[key]}: {row.average:.4f}  [{row.setting}]  {seconds:.0f} s")
    return row


# --------------------------------------------------------------------------- figures

def nested_subsets(correct: dict[str, list[int]], fraction: float, seed: int = 0) -> dict[str, list[int]]:
    """The first `fraction` of a seeded permutation per task: larger fractions contain smaller ones."""
    out = {}
    for task, values in correct.items():
        order = list(range(len(values)))
        random.Random(f"{seed}:{task}").shuffle(order)
        out[task] = order[:max(1, round(fraction * len(values)))]
    return out


def fraction_curve(lab: Lab, points: list[GridPoint], fractions: tuple[float, ...]) -> list[tuple[float, float]]:
    """Test accuracy of the grid point a validation subset of each size would have chosen."""
    curve = []
    for f in fractions:
        best = max(points, key=lambda p: mean(accuracy(p.validation, nested_subsets(p.validation, f)).values()))
        curve.append((f, mean(accuracy(lab.score(best.folder, "test")).values())))
    return curve


def plot_trajectories(runs: dict[str, list[dict]], n_startup: int, path: Path) -> Path | None:
    """Figure 4: validation score per trial, best so far, and the coefficients of each new best."""
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 6), sharex="col", squeeze=False)
    for col, (label, trials) in enumerate(runs.items()):
        done = [t for t in trials if t.get("state", "COMPLETE") == "COMPLETE" and t.get("score") is not None]
        xs = list(range(1, len(done) + 1))
        scores = [t["score"] for t in done]
        best, best_params, best_xs, best_lams = -math.inf, None, [], []
        for x, t in zip(xs, done):
            if t["score"] > best:
                best, best_params = t["score"], t["params"]
            best_xs.append(x)
            best_lams.append(best_params)
        top, bottom = axes[0][col], axes[1][col]
        for ax in (top, bottom):
            ax.axvspan(0.5, n_startup + 0.5, color="tab:red", alpha=0.12, lw=0)
        top.plot(xs, scores, "o", ms=3, color="tab:gray", label="trial")
        top.plot(xs, [max(scores[:i + 1]) for i in range(len(scores))], "-", color="tab:blue", label="best so far")
        top.set_ylabel("mean validation accuracy")
        top.set_title(label)
        top.legend(loc="lower right", fontsize=8)
        for i, task in enumerate(TASKS):
            bottom.step(best_xs, [lam[i] for lam in best_lams], where="post", label=task)
        bottom.set_ylabel("λ of the best trial so far")
        bottom.set_xlabel("trial")
        bottom.set_ylim(-0.05, 1.05)
        bottom.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_fractions(curves: dict[str, list[tuple[float, float]]], references: dict[str, float], path: Path) -> Path | None:
    """Figure 5: test accuracy against the fraction of validation data used for selection."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot([100 * f for f, _ in curve], [100 * a for _, a in curve], "o-", label=label)
    styles = iter(["--", ":", "-."])
    for label, value in references.items():
        if value is not None:
            ax.axhline(100 * value, ls=next(styles, "--"), color="gray", lw=1)
            ax.annotate(label, (100, 100 * value), fontsize=8, ha="right", va="bottom", color="gray")
    ax.set_xscale("log")
    ticks = sorted({f for curve in curves.values() for f, _ in curve})
    ax.set_xticks([100 * f for f in ticks], [f"{100 * f:g}" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("validation data used (%)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- tables

def fmt(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def main_table(rows: list[Row]) -> str:
    head = "| Method | Valid. set | " + " | ".join(TASKS) + " | Avg. | Wall s | Setting |"
    lines = [head, "|" + "---|" * 2 + "---:|" * (len(TASKS) + 2) + "---|"]
    for r in rows:
        valid = {True: "✓", False: "✗", None: "-"}[r.uses_validation]
        if r.status != "ok":
            lines.append(f"| {r.label} | {valid} | " + " | ".join("" for _ in TASKS) + f" | | | {r.status} |")
            continue
        cells = [fmt(r.scores.get(t)) for t in TASKS]
        seconds = "" if r.seconds is None else f"{r.seconds:.1f}" if r.seconds < 10 else f"{r.seconds:.0f}"
        lines.append(f"| {r.label} | {valid} | " + " | ".join(cells) + f" | {fmt(r.average)} | {seconds} | {r.setting} |")
    return "\n".join(lines)


def ablation_table(rows: dict[str, Row]) -> str:
    full = rows.get("dfmerge")
    ref = full.average if full is not None and full.status == "ok" else None
    lines = ["| Method | Avg. test accuracy | Δ vs DF-Merge |", "|---|---:|---:|"]
    for key, label in (("dfmerge", "DF-Merge (GP, logEI)"), ("dfmerge_no_fisher", "w/o Fisher information (GP over GTA)"),
                       ("fisher", "w/o Bayesian optimisation (Fisher merging)"), ("average", "Averaging")):
        r = rows.get(key)
        if r is None or r.status != "ok":
            lines.append(f"| {label} | {'not run' if r is None else r.status} | |")
            continue
        delta = "" if ref is None or key == "dfmerge" else f"{100 * (r.average - ref):+.2f}"
        lines.append(f"| {label} | {fmt(r.average)} | {delta} |")
    return "\n".join(lines)


def checks(rows: dict[str, Row]) -> list[str]:
    """Does the lab discriminate? The properties the lab is built to show."""
    def avg(k):
        r = rows.get(k)
        return r.average if r is not None and r.status == "ok" else None

    z, e, m, a, c = avg("zero_shot"), avg("experts"), avg("multitask"), avg("average"), avg("chance")
    out = []
    if None not in (z, e, c):
        out.append(f"experts − zero-shot: {100 * (e - z):+.2f} points (zero-shot − chance: {100 * (z - c):+.2f})")
    if None not in (m, e):
        out.append(f"multitask − experts: {100 * (m - e):+.2f} points")
    if None not in (a, e, m):
        out.append(f"averaging − experts: {100 * (a - e):+.2f} points; room between averaging and multitask: {100 * (m - a):.2f} points")
    merged = {k: avg(k) for k in ("average", "fisher", "task_arithmetic", "dare", "ties", "fisher_nodes", "dfmerge", "dfmerge_no_fisher",
                                  *VARIANT_ROWS)}
    merged = {k: v for k, v in merged.items() if v is not None}
    merged.update({k: v for k in NEW_ROWS if (v := avg(k)) is not None})
    if merged:
        best = max(merged, key=merged.get)
        out.append(f"best merge: {LABELS[best]} at {100 * merged[best]:.2f}")
    return out


# --------------------------------------------------------------------------- main

def run_table(settings: LabSettings, methods: tuple[str, ...] = METHOD_ROWS, results_dir: Path | None = None,
              *, figures: bool = True, progress: bool = False) -> dict:
    quiet_libraries()
    import torch

    torch.set_num_threads(threads(settings))
    lab = Lab(settings, progress=progress)
    quick = settings.name == "quick"
    results_dir = Path(results_dir) if results_dir else (lab.work.parent / "results" if quick else RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    rows: dict[str, Row] = {}
    for r in reference_rows(lab):
        r.uses_validation = None
        rows[r.key] = r
    grids: dict[str, list[GridPoint]] = {}
    search_runs: dict[str, Path | None] = {}
    ta = QUICK_TA_GRID if quick else TA_GRID
    ties = QUICK_TIES_GRID if quick else TIES_GRID
    drops, dare_l = (QUICK_DARE_DROP, QUICK_DARE_LAMBDAS) if quick else (DARE_DROP, DARE_LAMBDAS)
    search = {"n_trials": settings.dfmerge_trials, "n_startup_trials": settings.dfmerge_startup, "seed": settings.search_seed}
    # The search seed also draws the Fisher's examples (and seeds `sampled` Fishers); the search
    # without Fisher computes none, so its recipe carries no fisher_seed.
    fisher_search = {**search, "fisher_seed": settings.search_seed}

    for key in methods:
        if key in ("zero_shot", "experts", "multitask"):
            continue
        if key in NEW_ROWS:
            log(f"--- {LABELS[key]}")
            rows[key], points = run_new_row(lab, key, settings, quick)
            if points:
                grids[key] = points
            continue
        log(f"--- {LABELS[key]}")
        if key == "average":
            rows[key], _ = run_single(lab, key, "average", uses_validation=False)
            rows[key].setting = "θ = mean θ_i"
        elif key in ("fisher", "fisher_nodes"):
            rows[key], _ = run_single(lab, key, key)
            if rows[key].status == "ok":
                rows[key].setting = "importance from validation inputs of each task (method defaults)"
        elif key in ("fisher_floor_all", "fisher_floor_none"):
            rows[key], _ = run_single(lab, key, "fisher", VARIANT_PARAMETERS[key])
        elif key == "task_arithmetic":
            rows[key], grids[key] = run_grid(lab, key, "task_arithmetic", [({"lambda": lam}, None) for lam in ta],
                                             lambda s: f"λ={s['lambda']}")
        elif key == "ties":
            rows[key], grids[key] = run_grid(lab, key, "ties", [({"lambda": lam, "density": TIES_DENSITY}, None) for lam in ties],
                                             lambda s: f"λ={s['lambda']}, density={s['density']}")
        elif key == "dare":
            grid = [({"lambda": lam, "density": round(1 - p, 1), "seed": settings.seed}, None) for p in drops for lam in dare_l]
            rows[key], grids[key] = run_grid(lab, key, "dare_linear", grid,
                                             lambda s: f"dare_linear λ={s['lambda']}, p={1 - s['density']:.1f}")
        elif key == "dfmerge":
            rows[key], search_runs[key] = run_single(lab, key, "dfmerge", dict(fisher_search))
        elif key in ("dfmerge_capped", "dfmerge_kept", "dfmerge_capped_t05"):
            rows[key], search_runs[key] = run_single(lab, key, "dfmerge", {**fisher_search, **VARIANT_PARAMETERS[key]})
        elif key == "dfmerge_no_fisher":
            rows[key], search_runs[key] = run_single(lab, key, "dfmerge", {**search, "fisher": False})
        else:
            raise ValueError(f"unknown method row {key!r}; expected one of {METHOD_ROWS + VARIANT_ROWS}")

    ordered = [rows[k] for k in ("chance", *METHOD_ROWS, *VARIANT_ROWS) if k in rows]
    table2 = main_table(ordered)
    table3 = ablation_table(rows)
    notes = checks(rows)

    figures_written: dict[str, str] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    if figures:
        trajectories = {LABELS[k]: find_trials(run) for k, run in search_runs.items() if run is not None}
        fig4 = plot_trajectories(trajectories, settings.dfmerge_startup, results_dir / "trajectory.png")
        if fig4:
            figures_written["trajectory"] = fig4.name
        # Figure 5: the grid methods re-select on nested validation subsets (no new merges);
        # DF-Merge searches again on each subset.
        for key in ("task_arithmetic", "ties", "dare"):
            if grids.get(key):
                curves[LABELS[key]] = fraction_curve(lab, grids[key], settings.fractions)
        if "dfmerge" in methods and rows.get("dfmerge") and rows["dfmerge"].status == "ok":
            n_val = settings.eval_validation or min(len(d.examples("validation")) for d in lab.prepared("validation"))
            curve = []
            for f in settings.dfmerge_fractions:
                if f >= 1.0:
                    curve.append((f, rows["dfmerge"].average))
                    continue
                r, _ = run_single(lab, "dfmerge", "dfmerge", dict(fisher_search), validation_examples=max(1, round(f * n_val)))
                if r.status == "ok":
                    curve.append((f, r.average))
            curves[LABELS["dfmerge"]] = curve
        refs = {"multitask": rows["multitask"].average if "multitask" in rows else None,
                "averaging": rows["average"].average if "average" in rows and rows["average"].status == "ok" else None}
        fig5 = plot_fractions(curves, refs, results_dir / "validation_fraction.png")
        if fig5:
            figures_written["validation_fraction"] = fig5.name

    total = time.perf_counter() - start
    build = {}
    build_file = lab.paths["multitask"].parent / "build.json"
    if build_file.exists():
        build = json.loads(build_file.read_text())
    report = {
        "lab": settings.name, "key": settings.key(), "hfmerge_source": lab.fingerprint, "table_seconds": round(total, 1),
        "settings": settings.to_dict(), "build": build, "rows": [asdict(r) | {"average": r.average} for r in ordered],
        "fraction_curves": {k: v for k, v in curves.items()}, "checks": notes, "figures": figures_written,
    }
    (results_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    text = ["## Main table (test accuracy, %)", "", table2, "", "## Ablation (paper Table 3)", "", table3, "",
            "## Checks", "", *[f"- {n}" for n in notes], ""]
    if figures_written:
        text += ["## Figures", "", *[f"- {k}: {Path(v).name}" for k, v in figures_written.items()], ""]
    (results_dir / "table.md").write_text("\n".join(text))
    print("\n".join(text))
    log(f"table done in {total:.0f} s; results in {results_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.lab table", description="Run every merge method on the lab; print the tables.")
    p.add_argument("--quick", action="store_true", help="the quick lab (tiny models, small grids; seconds): the smoke test")
    p.add_argument("--methods", help=f"comma-separated rows to run (default: all): {','.join(METHOD_ROWS)}; "
                                     f"variants run only when named: {','.join(VARIANT_ROWS)}")
    p.add_argument("--results", help="folder for table.md, results.json and the PNGs")
    p.add_argument("--no-figures", action="store_true", help="skip Figures 4 and 5 (and the extra DF-Merge runs of Figure 5)")
    p.add_argument("--dfmerge-fractions", metavar="F,F,...",
                   help="validation fractions of Figure 5's DF-Merge searches (default: the settings'; 1 alone adds no search)")
    p.add_argument("--search-seed", type=int, metavar="N",
                   help="the DF-Merge recipes' seed and fisher_seed (default 0): their sampler, and the Fisher's examples of "
                        "the Fisher-weighted searches; the models stay the same, so a few seeds measure how much a search "
                        "depends on its random start and its Fisher inputs")
    p.add_argument("--progress", action="store_true", help="show evaluation progress bars")
    p.add_argument("--search-trials", type=int, metavar="N",
                   help=f"completed trials of the searched recipes ({','.join(SEARCH_ROWS)}; default: DF-Merge's budget, "
                        "60); the DF-Merge rows keep theirs")
    args = p.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else METHOD_ROWS
    unknown = [m for m in methods if m not in METHOD_ROWS + VARIANT_ROWS]
    if unknown:
        p.error(f"unknown method row(s) {', '.join(unknown)}; expected some of {','.join(METHOD_ROWS + VARIANT_ROWS)}")
    settings = settings_for(args.quick)
    if args.dfmerge_fractions:
        settings = dataclasses.replace(settings, dfmerge_fractions=tuple(float(f) for f in args.dfmerge_fractions.split(",")))
    if args.search_seed is not None:
        settings = dataclasses.replace(settings, search_seed=args.search_seed)
    if args.search_trials is not None:
        settings = dataclasses.replace(settings, search_trials=args.search_trials)
    run_table(settings, methods, args.results, figures=not args.no_figures, progress=args.progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
