#!/usr/bin/env python
"""Compare hfmerge with mergekit on the same flan-T5-style inputs and the same YAML recipes.

mergekit is not a dependency of hfmerge and must not be installed into hfmerge's virtualenv
(it changes pinned packages). Install it into a separate virtualenv and pass its python::

    python3 -m venv /tmp/mk-venv
    /tmp/mk-venv/bin/pip install torch==2.13.0      # the CPU build first
    /tmp/mk-venv/bin/pip install mergekit
    python benchmarks/compare_mergekit.py --mergekit-python /tmp/mk-venv/bin/python

For every method the script writes one recipe, runs ``mergekit-yaml RECIPE OUT`` (CPU) and
``hfmerge RECIPE --output OUT2`` on it, each in a fresh child process (wall time, CPU time and
peak RSS from ``os.wait4``), then reads both outputs tensor by tensor with safetensors:

* the deterministic methods (all but DARE and DELLA): the outputs should be equal up to
  float32 rounding; the table shows max |difference|, max relative difference (per tensor:
  max |hf - mk| / max |mk|, the largest over tensors) and how many entries differ beyond
  1e-6 of their tensor's scale. For TIES and Breadcrumbs, differing entries are checked for
  ties in magnitude at the cuts (TIES' top-k, the ends of Breadcrumbs' band), where the
  choice of kept entries is arbitrary. Where hfmerge deliberately differs from mergekit
  (``sce``'s weight fallback, ``arcee_fusion``'s sampled quantiles on large tensors, ...) and
  the outputs differ, the row points to the section of docs/methods.md that says so.
* ``dare_linear``, ``dare_ties``, ``della``, ``della_linear``: the random masks differ, so only
  statistics are compared: the standardised mean of hf - mk per tensor (near 0), the ratio of
  the merged task vectors' norms ||mk - base|| / ||hf - base||, and for ``dare_linear`` and
  ``della_linear`` each tool's relative distance to the expectation (task arithmetic with the
  same weights and λ).

The inputs (base + 3 experts, ~230 MB each by default, ~29 MB with ``--size small``; base + 4
experts of ~1 GB each with ``--size flan-t5-base``) are cached under benchmarks/_work/. Methods
that take one or two models (slerp, nearswap, arcee_fusion, passthrough; nuslerp) use the first
experts.

Beside every merge the script measures the I/O floor of that recipe (``io_limit.py``, in a
fresh process after the two merges: the time to read the recipe's input checkpoints and to
write files of the size of hfmerge's output, with the page cache warm) and, once per recipe,
each tool's start-up (a bare interpreter, and one importing what its merge command imports).
The timing table gives each tool's wall time as a multiple of that floor, also with the
tool's start-up taken off, and hfmerge's time as a share of mergekit's; every figure of a
row comes from the same stretch of the run, so the load of a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from io_limit import run_limit, startup  # noqa: E402
from merge_memory import WORK, Hfmerge, Measure, T5Dims, build_family, print_table, run_measured  # noqa: E402

WEIGHTS = (1.0, 0.6, 0.3, 0.8, 0.5)
REL_TOL = 1e-6  # relative to the tensor's max |value|: float32 rounding of a few operations


@dataclass(frozen=True)
class Spec:
    """One benchmark recipe: what the YAML file says."""

    method: str  # merge_method
    base: bool  # base_model set
    params: dict = field(default_factory=dict)  # global parameters
    per_model: dict = field(default_factory=dict)  # per-model parameters besides weight
    models: int = 0  # experts used (0: all of them)
    weight: bool = True  # per-model weight from WEIGHTS


# label -> recipe. Methods without a per-model weight in mergekit get none (a weight would be
# ignored with a warning by hfmerge and silently by mergekit).
RECIPES: dict[str, Spec] = {
    "linear": Spec("linear", False),
    "task_arithmetic": Spec("task_arithmetic", True, {"lambda": 0.7}),
    "ties": Spec("ties", True, {"normalize": True}, {"density": 0.3}),
    "dare_linear": Spec("dare_linear", True, {"lambda": 0.7}, {"density": 0.5}),
    "dare_ties": Spec("dare_ties", True, {}, {"density": 0.5}),
    "dare_ties_normalize": Spec("dare_ties", True, {"normalize": True}, {"density": 0.5}),
    "della": Spec("della", True, {}, {"density": 0.5, "epsilon": 0.15}),
    "della_linear": Spec("della_linear", True, {"lambda": 0.7}, {"density": 0.5, "epsilon": 0.15}),
    "breadcrumbs": Spec("breadcrumbs", True, {}, {"density": 0.5, "gamma": 0.01}),
    "breadcrumbs_ties": Spec("breadcrumbs_ties", True, {}, {"density": 0.5, "gamma": 0.01}),
    "sce": Spec("sce", True, {"select_topk": 0.5}, weight=False),
    "ram": Spec("ram", True, weight=False),
    "ramplus_tl": Spec("ramplus_tl", True, {"r": 0.1, "alpha": 0.2}, weight=False),
    "slerp": Spec("slerp", True, {"t": 0.4}, models=1, weight=False),
    "nuslerp": Spec("nuslerp", False, models=2),
    "nuslerp_base": Spec("nuslerp", True, models=2),
    "multislerp": Spec("multislerp", True),
    "karcher": Spec("karcher", True, weight=False),
    "model_stock": Spec("model_stock", True, weight=False),
    "model_stock_filter_wise": Spec("model_stock", True, {"filter_wise": True}, weight=False),
    "nearswap": Spec("nearswap", True, {"t": 0.001}, models=1, weight=False),
    "arcee_fusion": Spec("arcee_fusion", True, models=1, weight=False),
    "passthrough": Spec("passthrough", False, {}, {"scale": 0.5}, models=1, weight=False),
}
# random sparsification: outputs compared by statistics (expectation for the linear ones)
RANDOM = {"dare_linear", "dare_ties", "dare_ties_normalize", "della", "della_linear"}
# magnitude cuts: where a cut falls between equal magnitudes, which entries are kept is arbitrary
MAGNITUDE_CUT = {"ties", "breadcrumbs", "breadcrumbs_ties"}
# where hfmerge deliberately differs from mergekit 0.1.5: docs/methods.md explains
DOCUMENTED = {
    "della": "docs/methods.md#della--della-della_linear (rescale per entry by 1/p, not one L1 factor per tensor)",
    "della_linear": "docs/methods.md#della--della-della_linear (rescale per entry by 1/p, not one L1 factor per tensor)",
    "sce": "docs/methods.md#sce--sce (mergekit uses 1/M weights when the mean squares sum below 1e-6)",
    "arcee_fusion": "docs/methods.md#arcee-fusion--arcee_fusion (mergekit samples 1M scores for the quartiles of larger tensors)",
    "nearswap": "docs/methods.md#nearswap--nearswap",
    "multislerp": "docs/methods.md#multi-slerp--multislerp",
}
SIZES = {  # --size presets (d_model, d_ff, layers per stack, heads, vocab)
    "default": (512, 1024, 4, 8, 32128),  # 58.1M parameters, 232 MB per checkpoint
    "small": (256, 512, 2, 4, 8000),  # 7.2M parameters, 29 MB per checkpoint
    "flan-t5-base": (768, 2048, 12, 12, 32128),  # 247.6M parameters, 990 MB per checkpoint (base + 4 experts by default)
}
DEFAULT_EXPERTS = {"flan-t5-base": 4}  # else 3


def write_recipe(path: Path, label: str, base: Path, experts: list[Path]) -> dict:
    spec = RECIPES[label]
    recipe: dict = {"merge_method": spec.method}
    if spec.base:
        recipe["base_model"] = str(base)
    used = experts[:spec.models] if spec.models else experts
    recipe["models"] = []
    for i, e in enumerate(used):
        params = ({"weight": WEIGHTS[i % len(WEIGHTS)]} if spec.weight else {}) | spec.per_model
        recipe["models"].append({"model": str(e), "parameters": params} if params else {"model": str(e)})
    if spec.params:
        recipe["parameters"] = dict(spec.params)
    recipe["dtype"] = "float32"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return recipe


class Weights:
    """Tensor-by-tensor access to a model folder's safetensors (one file or an index)."""

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SystemExit(f"no safetensors files in {folder}")
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    self.where[k] = f

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.where[name]), "pt") as h:
            return h.get_tensor(name).to(torch.float32)


@dataclass
class Comparison:
    method: str
    recipe: dict
    hf_wall_s: float  # shortest of the runs
    hf_cpu_s: float
    hf_peak_mib: float  # largest of the runs
    mk_wall_s: float
    mk_cpu_s: float
    mk_peak_mib: float
    hf_anon_mib: float = 0.0  # largest sampled RssAnon (allocated memory, without mapped files)
    mk_anon_mib: float = 0.0
    mk_file_mib: float = 0.0  # largest sampled RssFile (mergekit memory-maps its inputs)
    limit_s: float = 0.0  # shortest I/O floor of the runs (io_limit.py): read the inputs, write the output's size
    limit_runs: list = field(default_factory=list)
    hf_startup: dict = field(default_factory=dict)  # interpreter_s, imports_s (fresh processes)
    mk_startup: dict = field(default_factory=dict)
    hf_runs: list = field(default_factory=list)
    mk_runs: list = field(default_factory=list)
    tensors_compared: int = 0
    only_in_hf: list[str] = field(default_factory=list)
    only_in_mk: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    worst_tensor: str = ""
    entries_differing: int = 0
    tensors_differing: int = 0
    differing_tensors: list[str] = field(default_factory=list)  # names and sizes of the tensors with entries beyond REL_TOL
    tie_explained_entries: int = 0
    # DARE statistics
    max_std_mean_diff: float = 0.0
    max_abs_z: float = 0.0
    norm_ratio_mk_hf: float = 0.0
    norm_ratio_range: tuple[float, float] = (0.0, 0.0)
    dist_to_expectation_hf: float = 0.0
    dist_to_expectation_mk: float = 0.0


def _tied_at_rank(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Entries whose |value| equals the k-th largest magnitude while the top-k is not unique.

    Only at such entries may two correct implementations of a magnitude cut keep different
    entries (the choice among equal magnitudes is arbitrary). Returns a flat bool mask (all
    False when the top-k is unique).
    """
    mags = flat.abs()
    none = torch.zeros_like(mags, dtype=torch.bool)
    if k <= 0 or k >= mags.numel():
        return none
    kth = torch.topk(mags, k, sorted=True).values[-1]
    at = mags == kth
    return at if int((mags > kth).sum()) + int(at.sum()) > k else none


def _tied_at_cut(tau: torch.Tensor, method: str, density: float, gamma: float) -> torch.Tensor:
    """Entries on a magnitude tie at the cut(s) of TIES' top-k or Breadcrumbs' band."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = int(density * n)
    if method == "ties":
        return _tied_at_rank(flat, k)
    # breadcrumbs: keep ascending ranks s .. s + k - 1, i.e. the top n - s without the top n - s - k
    s = max(0, n - k - int(gamma * n))
    return _tied_at_rank(flat, n - s) | _tied_at_rank(flat, n - s - k)


def compare(label: str, hf_dir: Path, mk_dir: Path, base_dir: Path, experts: list[Path], recipe: dict, c: Comparison) -> Comparison:
    hf, mk = Weights(hf_dir), Weights(mk_dir)
    base = Weights(base_dir)
    models = [Weights(Path(m["model"])) for m in recipe["models"]]
    common = sorted(hf.names() & mk.names())
    c.only_in_hf = sorted(hf.names() - mk.names())
    c.only_in_mk = sorted(mk.names() - hf.names())
    c.tensors_compared = len(common)
    weights = [m.get("parameters", {}).get("weight", 1.0) for m in recipe["models"]]
    lam = float(recipe.get("parameters", {}).get("lambda", 1.0))
    density = recipe["models"][0].get("parameters", {}).get("density", 1.0)
    sq_hf = sq_mk = sq_e = sq_hf_e = sq_mk_e = 0.0
    ratios = []
    for name in common:
        a, b = hf.get(name), mk.get(name)
        diff = (a - b).abs()
        scale = float(b.abs().max()) or 1.0
        mx = float(diff.max())
        rel = mx / scale
        if mx > c.max_abs_diff:
            c.max_abs_diff = mx
        if rel > c.max_rel_diff:
            c.max_rel_diff, c.worst_tensor = rel, name
        n_bad = int((diff > REL_TOL * scale).sum())
        c.entries_differing += n_bad
        if n_bad:
            c.tensors_differing += 1
            c.differing_tensors.append(f"{name} ({n_bad} of {b.numel()} entries)")
            if recipe["merge_method"] in MAGNITUDE_CUT:
                th = base.get(name)
                tied = torch.zeros(th.numel(), dtype=torch.bool)
                gamma = recipe["models"][0].get("parameters", {}).get("gamma", 0.01)
                for m in models:
                    tied |= _tied_at_cut(m.get(name) - th, recipe["merge_method"], density, gamma)
                bad = (diff > REL_TOL * scale).reshape(-1)
                c.tie_explained_entries += int((bad & tied).sum())
        if label in RANDOM:
            th = base.get(name)
            da, db = a - th, b - th
            sd = float(da.std()) if da.numel() > 1 else 0.0
            if sd > 0:
                c.max_std_mean_diff = max(c.max_std_mean_diff, abs(float((a - b).mean())) / sd)
            se = float((a - b).std()) / da.numel() ** 0.5 if da.numel() > 1 else 0.0
            if se > 0:
                c.max_abs_z = max(c.max_abs_z, abs(float((a - b).mean())) / se)
            na, nb = float(da.double().pow(2).sum()), float(db.double().pow(2).sum())
            sq_hf += na
            sq_mk += nb
            if na > 0:
                ratios.append((nb / na) ** 0.5)
            if recipe["merge_method"] in ("dare_linear", "della_linear"):
                expect = lam * sum(w * (m.get(name) - th) for w, m in zip(weights, models))
                sq_e += float(expect.double().pow(2).sum())
                sq_hf_e += float((da - expect).double().pow(2).sum())
                sq_mk_e += float((db - expect).double().pow(2).sum())
    if label in RANDOM:
        c.norm_ratio_mk_hf = (sq_mk / sq_hf) ** 0.5 if sq_hf else float("nan")
        c.norm_ratio_range = (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan"))
        if sq_e:
            c.dist_to_expectation_hf = (sq_hf_e / sq_e) ** 0.5
            c.dist_to_expectation_mk = (sq_mk_e / sq_e) ** 0.5
    return c


def recipe_cuts_by_magnitude(c: Comparison) -> bool:
    return c.recipe["merge_method"] in MAGNITUDE_CUT


def mergekit_cmd(python: str) -> list[str]:
    script = Path(python).parent / "mergekit-yaml"
    return [str(script)] if script.is_file() else [python, "-m", "mergekit.scripts.run_yaml"]


def recipe_inputs(recipe: dict) -> list[Path]:
    """The checkpoint folders a recipe reads: its base model (when set) and its models."""
    folders = [Path(recipe["base_model"])] if recipe.get("base_model") else []
    return folders + [Path(m["model"]) for m in recipe["models"] if Path(m["model"]) not in folders]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the same YAML recipes with mergekit and hfmerge on flan-T5-style checkpoints and compare the outputs.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--mergekit-python", required=True, help="python of a separate virtualenv with mergekit installed (its mergekit-yaml is used)")
    p.add_argument("--hfmerge-python", default=sys.executable, help="python that has hfmerge and its dependencies installed (default: this one)")
    p.add_argument("--hfmerge-src", type=Path, help="folder holding the hfmerge package to measure, put first on PYTHONPATH (default: the installed hfmerge)")
    p.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="recipes to run (default: all; dare_ties_normalize is dare_ties with normalize: true set explicitly, nuslerp_base "
                   "nuslerp of task vectors, model_stock_filter_wise model_stock with filter_wise: true)")
    p.add_argument("--size", choices=list(SIZES), default="default",
                   help="input size preset: default (d_model 512, d_ff 1024, 4+4 layers, 8 heads, vocab 32128: 232 MB per checkpoint), "
                   "small (d_model 256, d_ff 512, 2+2 layers, 4 heads, vocab 8000: 29 MB) or flan-t5-base (d_model 768, d_ff 2048, "
                   "12+12 layers, 12 heads, vocab 32128: 990 MB, base + 4 experts); the options below override single sizes")
    p.add_argument("--layers", type=int, help="blocks per stack (default 4)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--d-ff", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--experts", type=int, help="fine-tuned models besides the base (default 4 with --size flan-t5-base, else 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoints (the merges use seed 0)")
    p.add_argument("--delta-scale", type=float, default=0.02,
                   help="experts' task vectors: Gaussian noise of this standard deviation times the tensor's initial scale times "
                   "1 + e/2 for expert e (default %(default)s)")
    p.add_argument("--mergekit-args", default="--no-cuda --no-lazy-unpickle --no-copy-tokenizer --random-seed 0 --quiet",
                   help="extra options for mergekit-yaml (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per recipe, each in a fresh process; the table shows the shortest "
                   "wall time and the largest peak RSS (default 1)")
    p.add_argument("--keep-outputs", action="store_true", help="keep both merged models under benchmarks/_work/compare")
    p.add_argument("--json-out", metavar="PATH", help="also write the comparison as JSON (rewritten after every recipe, so a cut-short run keeps what it measured)")
    p.add_argument("--skip-compare", action="store_true", help="time the merges only: do not read the two outputs back and compare them")
    args = p.parse_args(argv)

    hf = Hfmerge(args.hfmerge_python, args.hfmerge_src.resolve() if args.hfmerge_src else None)
    print(f"hfmerge {hf.describe()}")
    preset = dict(zip(("d_model", "d_ff", "layers", "heads", "vocab"), SIZES[args.size]))
    dims = T5Dims(**{k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()})
    experts = args.experts if args.experts is not None else DEFAULT_EXPERTS.get(args.size, 3)
    fam = build_family(dims, experts, seed=args.seed, delta_scale=args.delta_scale)
    runs = WORK / "compare"
    runs.mkdir(parents=True, exist_ok=True)
    results: list[Comparison] = []
    for label in args.methods:
        recipe_path = runs / f"{label}.yml"
        recipe = write_recipe(recipe_path, label, fam.base, fam.experts)
        hf_out, mk_out = runs / f"{label}-hfmerge", runs / f"{label}-mergekit"
        for d in (hf_out, mk_out):
            shutil.rmtree(d, ignore_errors=True)
        mk_runs: list[Measure] = []
        hf_runs: list[Measure] = []
        limits: list[dict] = []
        print(f"{label}: start-up ...", flush=True)
        mk_start = startup(args.mergekit_python, "mergekit", cwd=runs)
        hf_start = startup(args.hfmerge_python, "hfmerge", env=hf.env, cwd=WORK)
        print(f"  mergekit {mk_start['imports_s']:.1f} s (interpreter {mk_start['interpreter_s']:.2f} s), "
              f"hfmerge {hf_start['imports_s']:.1f} s (interpreter {hf_start['interpreter_s']:.2f} s)", flush=True)
        for i in range(args.repeat):
            for d in (hf_out, mk_out):
                shutil.rmtree(d, ignore_errors=True)
            print(f"{label}: mergekit ..." + (f" (run {i + 1}/{args.repeat})" if args.repeat > 1 else ""), flush=True)
            mk_runs.append(run_measured(mergekit_cmd(args.mergekit_python) + [str(recipe_path), str(mk_out)] + args.mergekit_args.split(),
                                        log_path=runs / f"{label}-mergekit.log", cwd=runs))
            print(f"  {mk_runs[-1].short()}; hfmerge ...", flush=True)
            hf_runs.append(hf.run([str(recipe_path), "--output", str(hf_out), "-q"], log_path=runs / f"{label}-hfmerge.log"))
            print(f"  {hf_runs[-1].short()}; I/O floor ...", flush=True)
            limits.append(run_limit(recipe_inputs(recipe), hf_out, runs / f"{label}-io-limit"))
            print(f"  read {limits[-1]['read_s']:.2f} s + write {limits[-1]['write_s']:.2f} s = {limits[-1]['limit_s']:.2f} s", flush=True)
        if not args.skip_compare:
            print("  comparing ...", flush=True)
        c = Comparison(label, recipe,
                       min(m.wall_s for m in hf_runs), min(m.cpu_s for m in hf_runs), max(m.peak_mib for m in hf_runs),
                       min(m.wall_s for m in mk_runs), min(m.cpu_s for m in mk_runs), max(m.peak_mib for m in mk_runs),
                       max(m.anon_mib for m in hf_runs), max(m.anon_mib for m in mk_runs), max(m.file_mib for m in mk_runs),
                       hf_runs=[asdict(m) for m in hf_runs], mk_runs=[asdict(m) for m in mk_runs],
                       limit_s=min(x["limit_s"] for x in limits), limit_runs=limits, hf_startup=hf_start, mk_startup=mk_start)
        results.append(c if args.skip_compare else compare(label, hf_out, mk_out, fam.base, fam.experts, recipe, c))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps([asdict(r) for r in results], indent=2, default=str) + "\n")
        if not args.keep_outputs:
            shutil.rmtree(hf_out, ignore_errors=True)
            shutil.rmtree(mk_out, ignore_errors=True)

    print()
    print(f"Inputs: flan-T5 layout, d_model {dims.d_model}, d_ff {dims.d_ff}, {dims.layers}+{dims.layers} layers, vocab {dims.vocab}, "
          f"{fam.params / 1e6:.1f}M params ({fam.bytes_per_model / 1e6:.0f} MB float32) per model, base + {experts} experts")
    rows, trows = [], []
    for c in results:
        if args.skip_compare:
            verdict = "not compared (--skip-compare)"
        elif c.method in RANDOM:
            verdict = "random masks: see statistics"
        elif c.entries_differing == 0:
            verdict = "equal to float32 rounding"
        else:
            verdict = f"{c.entries_differing} entries in {c.tensors_differing} tensors differ"
            if recipe_cuts_by_magnitude(c):
                verdict += f"; {c.tie_explained_entries} of them at magnitude ties on a cut (top-k, or the band's ends)"
            verdict += f"; largest relative difference in {c.worst_tensor}"
        if c.method in DOCUMENTED and (c.entries_differing or c.method in RANDOM):
            verdict += f" (documented difference: {DOCUMENTED[c.method]})"
        rows.append([c.method, f"{c.max_abs_diff:.3g}", f"{c.max_rel_diff:.3g}", verdict])
        trows.append([c.method, f"{c.hf_wall_s:.1f}", f"{c.hf_cpu_s:.1f}", f"{c.hf_peak_mib:.0f}", f"{c.hf_anon_mib:.0f}",
                      f"{c.mk_wall_s:.1f}", f"{c.mk_cpu_s:.1f}", f"{c.mk_peak_mib:.0f}", f"{c.mk_anon_mib:.0f}", f"{c.mk_file_mib:.0f}"])
    print_table(["method", "max |diff|", "max rel diff", "outputs"], rows)
    print()
    print_table(["method", "hfmerge wall s", "CPU s", "peak RSS MiB", "anon MiB", "mergekit wall s", "CPU s", "peak RSS MiB", "anon MiB", "file MiB"], trows)
    print()
    print("Against the I/O floor (read the recipe's inputs, write the output's size; warm page cache) and each other; "
          "'own work': wall time less the tool's start-up (interpreter + imports, measured beside it)")
    lrows = []
    for c in results:
        hs, ms = c.hf_startup.get("imports_s", 0.0), c.mk_startup.get("imports_s", 0.0)
        lrows.append([c.method, f"{c.limit_s:.2f}", f"{c.hf_wall_s:.1f}", f"{c.mk_wall_s:.1f}", _ratio(c.hf_wall_s, c.limit_s), _ratio(c.mk_wall_s, c.limit_s),
                      _ratio(c.hf_wall_s - hs, c.limit_s), _ratio(c.mk_wall_s - ms, c.limit_s), _ratio(c.hf_wall_s, c.mk_wall_s),
                      f"{c.hf_peak_mib:.0f}", f"{c.mk_peak_mib:.0f}", _ratio(c.hf_peak_mib, c.mk_peak_mib), f"{hs:.1f}", f"{ms:.1f}"])
    print_table(["method", "floor s", "hfmerge wall s", "mergekit wall s", "hf / floor", "mk / floor", "hf own work / floor", "mk own work / floor",
                 "hf / mk wall", "hf peak MiB", "mk peak MiB", "hf / mk peak", "hf start-up s", "mk start-up s"], lrows)
    dare = [c for c in results if c.method in RANDOM and not args.skip_compare]
    if dare:
        print()
        srows = []
        for c in dare:
            srows.append([c.method, f"{c.max_std_mean_diff:.3g}", f"{c.max_abs_z:.2f}", f"{c.norm_ratio_mk_hf:.4f}", f"{c.norm_ratio_range[0]:.3f} - {c.norm_ratio_range[1]:.3f}",
                          f"{c.dist_to_expectation_hf:.4f}" if c.dist_to_expectation_hf else "-", f"{c.dist_to_expectation_mk:.4f}" if c.dist_to_expectation_mk else "-"])
        print_table(["method", "max |mean(hf-mk)|/std(hf-base)", "max |z| of mean(hf-mk)", "norm ratio mk/hf (model)", "per tensor", "hf: rel. dist. to E", "mk: rel. dist. to E"], srows)
    for c in results:
        if c.differing_tensors and c.method not in RANDOM:
            more = f" and {len(c.differing_tensors) - 10} more" if len(c.differing_tensors) > 10 else ""
            print(f"{c.method}: tensors that differ: {', '.join(c.differing_tensors[:10])}{more}")
        if c.only_in_hf or c.only_in_mk:
            print(f"{c.method}: tensors only in hfmerge's output: {c.only_in_hf or 'none'}; only in mergekit's: {c.only_in_mk or 'none'}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(c) for c in results], indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
