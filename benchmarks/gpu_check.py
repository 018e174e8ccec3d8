#!/usr/bin/env python
"""GPU check: CUDA results against CPU results, then GPU figures, in one run of a few minutes.

Run it on a machine with an NVIDIA GPU and a CUDA build of torch; without one it refuses at
once (exit 2). Everything is built offline with random weights: a T5 of t5-small's shape
(60M parameters) for the comparisons, and t5-small and t5-base shapes for the figures.

Checks (each PASS or FAIL with the measured deviation; exit 1 if any fails):

1. Fisher: the exact diagonal Fisher on 8 examples, on CUDA and on the CPU. Per parameter
   tensor, max |F_cuda − F_cpu| ≤ 1e-3 · max |F_cpu| + 1e-12 (float32, TF32 off: the two
   differ only in summation order).
2. Scores: the rank-classification log-likelihood of every option of 32 examples;
   max |Δ| ≤ 1e-3 nats, and the same predicted option wherever the CPU's top two options
   are more than 1e-3 apart.
3. A merge: `task_arithmetic` then `ties` of two experts with ``device="cuda"`` (the merge
   arithmetic on the GPU) and ``"cpu"``; every output tensor equal within rtol 1e-5,
   atol 1e-6 (TIES's top-k trimming may pick different elements at exact ties of |τ|: none
   occur with random weights).
4. One DF-Merge trial (Fishers, equation 8, evaluation) on CUDA and on the CPU: scores
   within 1e-3 of each other.

Figures (t5-small and t5-base shapes): Fisher seconds per example (loop and vmap),
evaluation examples per second, one DF-Merge trial in seconds (2 experts), static merge
throughput (GB of output per second, ``--device cuda`` against the CPU), and with
``--autocast`` how far a bf16-autocast Fisher lands from the float32 one (reported, not
checked: squared gradients of small magnitude underflow and lose bits in bf16, so the
Fisher is computed in float32; autocast is not applied to it).

Examples::

    python benchmarks/gpu_check.py                 # checks, then figures for both shapes
    python benchmarks/gpu_check.py --shapes small  # quicker
    python benchmarks/gpu_check.py --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
warnings.filterwarnings("ignore")

SHAPES = {
    "tiny": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "vocab_size": 512},
    "small": {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8, "vocab_size": 32128},
    "base": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12, "vocab_size": 32128},
}


def refuse_without_cuda(device: str) -> str | None:
    """The one-line refusal when `device` is cuda and there is none, else None."""
    if device == "cuda" and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU build)"
        return (f"gpu_check: no CUDA device is available (torch {torch.__version__}, CUDA build: {build}); run this script on a "
                "machine with an NVIDIA GPU and a CUDA build of torch. Nothing was checked")
    return None


def model_and_tokenizer(shape: str):
    from scoring_speed import Setup, build

    return build(Setup(shape, "t5", SHAPES[shape], f"t5-{shape} shape, random weights"))


def save_models(root: Path, shape: str) -> dict:
    """Base, two experts (base + seeded noise) and a tokenizer, as checkpoint folders."""
    from hfmerge.testing import build_finetuned

    model, tokenizer, words = model_and_tokenizer(shape)
    base = root / f"{shape}-base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    experts = [build_finetuned(base, root / f"{shape}-expert{i}", seed=i, scale=0.002) for i in range(2)]
    for e in experts:
        tokenizer.save_pretrained(e)
    return {"base": base, "experts": experts, "words": words}


def task_files(root: Path, words: int, n: int = 32) -> list[dict]:
    import random

    tasks = []
    for t in range(2):
        rng = random.Random(t)
        path = root / f"task{t}.jsonl"
        with path.open("w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(8, 24))), "label": rng.randrange(2)}) + "\n")
        tasks.append({"task": f"t{t}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(path)}}, "validation_split": "validation",
                      "doc_to_text": "{{text}}", "doc_to_choice": ["w1", "w2"], "doc_to_target": "label"})
    return tasks


def as_recipe(data: dict, root: Path):
    from hfmerge.recipe import parse_recipe

    return parse_recipe(data, source="gpu_check", base_dir=root)


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def result(name: str, ok: bool, detail: str) -> dict:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    return {"check": name, "ok": ok, "detail": detail}


def check_fisher_and_scores(device: str) -> list[dict]:
    from scoring_speed import make_examples

    from hfmerge.evaluation.scoring import score_options
    from hfmerge.fisher.diagonal import diagonal_fisher
    from hfmerge.fisher.engine import encode_for_model

    model, tokenizer, words = model_and_tokenizer("small")
    examples = make_examples(32, words, max_prompt=24)
    enc = encode_for_model(model, tokenizer, examples[:8])
    labels = [0] * len(enc)
    cpu_f = diagonal_fisher(model, enc, labels, implementation="loop")
    cpu_s = score_options(model, tokenizer, examples, batch_size=16)
    model.to(device)
    dev_f = diagonal_fisher(model, enc, labels, implementation="loop")
    dev_s = score_options(model, tokenizer, examples, batch_size=16)
    worst = max(((dev_f[k].cpu() - v).abs().max() / (v.abs().max() + 1e-12)).item() for k, v in cpu_f.items())
    out = [result("Fisher (exact, loop)", worst <= 1e-3, f"max relative deviation per tensor {worst:.2e} (limit 1e-3)")]
    diffs, flips = 0.0, 0
    for a, b in zip(cpu_s, dev_s):
        la, lb = torch.tensor(a.logprob_sums, dtype=torch.float64), torch.tensor(b.logprob_sums, dtype=torch.float64)
        diffs = max(diffs, (la - lb).abs().max().item())
        top2 = la.topk(2).values
        if top2[0] - top2[1] > 1e-3 and la.argmax() != lb.argmax():
            flips += 1
    out.append(result("scores (rank classification)", diffs <= 1e-3 and flips == 0, f"max |Δ log-likelihood| {diffs:.2e} nats (limit 1e-3), {flips} changed predictions"))
    return out


def check_merges(root: Path, models: dict, device: str) -> list[dict]:
    from safetensors.torch import load_file

    import hfmerge

    out = []
    for method, params in (("task_arithmetic", {}), ("ties", {"density": 0.5})):
        recipe = as_recipe({"merge_method": method, "base_model": str(models["base"]), "parameters": params,
                            "models": [{"model": str(e), "parameters": {"weight": 0.6}} for e in models["experts"]]}, root)
        written = {}
        for dev in ("cpu", device):
            target = root / f"merge-{method}-{dev}"
            hfmerge.merge(recipe, hfmerge.RunOptions(output=target, device=dev, progress=False, overwrite=True))
            written[dev] = load_file(target / "model.safetensors")
        worst = 0.0
        ok = True
        for name, t in written["cpu"].items():
            other = written[device][name]
            ok = ok and torch.allclose(t.float(), other.float(), rtol=1e-5, atol=1e-6)
            worst = max(worst, (t.float() - other.float()).abs().max().item())
        out.append(result(f"merge {method}", ok, f"max |Δ| {worst:.2e} over {len(written['cpu'])} tensors (rtol 1e-5, atol 1e-6)"))
    return out


def dfmerge_objective(root: Path, models: dict, device: str):
    from hfmerge.dfmerge import DFMergeObjective
    from hfmerge.evaluation.evaluate_model import prepare_tasks
    from hfmerge.fisher.models import load_tokenizer
    from hfmerge.planning import build_plan
    from hfmerge.recipe import parse_recipe

    data = {"merge_method": "dfmerge", "base_model": str(models["base"]), "models": [{"model": str(e)} for e in models["experts"]],
            "parameters": {"n_trials": 2, "n_startup_trials": 1, "fisher_examples": 8}, "tasks": task_files(root, models["words"])}
    recipe = parse_recipe(data, source="gpu_check", base_dir=root)
    plan = build_plan(recipe)
    tasks = prepare_tasks([recipe.tasks[m.task] for m in recipe.models], "validation")
    return DFMergeObjective(plan, tasks, load_tokenizer(plan.tokenizer_folder, "gpu_check"), device=device), plan


def check_dfmerge(root: Path, models: dict, device: str) -> list[dict]:
    scores = {}
    for dev in ("cpu", device):
        objective, plan = dfmerge_objective(root, models, dev)
        scores[dev] = objective([0.4, 0.7]).score
        plan.release()
        del objective
    delta = abs(scores["cpu"] - scores[device])
    return [result("DF-Merge trial", delta <= 1e-3, f"score {scores[device]:.4f} on {device}, {scores['cpu']:.4f} on cpu (|Δ| {delta:.1e}, limit 1e-3)")]


def figures(root: Path, shape: str, device: str, autocast: bool) -> dict:
    from scoring_speed import make_examples

    import hfmerge
    from hfmerge.evaluation.scoring import score_options
    from hfmerge.fisher.diagonal import diagonal_fisher
    from hfmerge.fisher.engine import encode_for_model

    model, tokenizer, words = model_and_tokenizer(shape)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    examples = make_examples(64, words, max_prompt=48)
    enc = encode_for_model(model, tokenizer, examples[:16])
    labels = [0] * len(enc)
    row: dict = {"shape": f"t5-{shape}", "parameters_M": round(n_params / 1e6, 1), "device": torch.cuda.get_device_name() if device == "cuda" else device}
    for impl in ("loop", "vmap"):
        diagonal_fisher(model, enc[:2], labels[:2], implementation=impl)  # warm-up
        seconds, fisher = timed(lambda: diagonal_fisher(model, enc, labels, implementation=impl), device)
        row[f"fisher_{impl}_s_per_example"] = round(seconds / len(enc), 4)
    if autocast and device == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = diagonal_fisher(model, enc, labels, implementation="loop")
        row["bf16_autocast_fisher_max_rel_dev"] = max(((half[k] - v).abs().max() / (v.abs().max() + 1e-12)).item() for k, v in fisher.items())
    score_options(model, tokenizer, examples[:8], batch_size=32)  # warm-up
    seconds, _ = timed(lambda: score_options(model, tokenizer, examples, batch_size=32), device)
    row["eval_examples_per_s"] = round(len(examples) / seconds, 1)
    del model
    models = save_models(root, shape)
    objective, plan = dfmerge_objective(root, models, device)
    objective([0.3, 0.3])  # warm-up, and the task vectors are read once per search anyway
    seconds, _ = timed(lambda: objective([0.5, 0.8]), device)
    row["dfmerge_trial_s"] = round(seconds, 2)
    plan.release()
    del objective
    recipe = as_recipe({"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in models["experts"]]}, root)
    for dev in ("cpu", device):
        target = root / f"throughput-{shape}-{dev}"
        seconds, merged = timed(lambda: hfmerge.merge(recipe, hfmerge.RunOptions(output=target, device=dev, progress=False, overwrite=True, evaluate=False)), dev)
        size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
        row[f"static_merge_{'gpu' if dev == device and dev != 'cpu' else 'cpu'}_GB_per_s"] = round(size / 1e9 / seconds, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,base", help="comma-separated shapes for the figures: small, base (default both), tiny (to try the script)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="the device checked against the CPU (cpu compares the CPU with itself: only to try the script without a GPU)")
    p.add_argument("--autocast", action="store_true", help="also report a bf16-autocast Fisher's deviation")
    p.add_argument("--no-figures", action="store_true", help="checks only")
    p.add_argument("--json", help="write the checks and figures to this file")
    args = p.parse_args(argv)
    refusal = refuse_without_cuda(args.device)
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 comparisons: TF32 would cost bits on purpose
    torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)
    report: dict = {"checks": [], "figures": []}
    with tempfile.TemporaryDirectory(prefix="hfmerge-gpu-check-") as tmp:
        root = Path(tmp)
        report["checks"] += check_fisher_and_scores(args.device)
        models = save_models(root, "small")
        report["checks"] += check_merges(root, models, args.device)
        report["checks"] += check_dfmerge(root, models, args.device)
        if not args.no_figures:
            for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
                (root / shape).mkdir()
                row = figures(root / shape, shape, args.device, args.autocast)
                report["figures"].append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    failed = [c["check"] for c in report["checks"] if not c["ok"]]
    print("all checks passed" if not failed else f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
