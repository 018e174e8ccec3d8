#!/usr/bin/env python
"""Fisher engine benchmarks: seconds per example (vmap, loop, auto), Fisher Mask Nodes against
the full diagonal Fisher, and peak memory of a Fisher computation against model size.

Three tables:

1. ``speed``: seconds per example of the diagonal Fisher (exact mode unless ``--mode``) with
   the per-example loop, the vectorised (vmap) and the layer-hook (hooks) implementation,
   timed in interleaved rounds, the hooks' speed-up over what ``auto`` picked before they
   existed and over the loop, which one ``auto`` picks now, and the largest difference
   between the hooks' and the loop's Fisher (relative to the largest entry), on the tiny T5
   of the tests, on a randomly initialised model of t5-small's shape (60M parameters) and,
   with ``--widths``, on T5 models of the same depth and other widths.
2. ``nodes``: Fisher Mask Nodes against the full diagonal Fisher on the same models and data
   (time ratio), and the merge quality of ``fisher_nodes`` against ``fisher`` (and averaging)
   on tiny T5 experts trained for a few steps on keyword tasks.
3. ``memory``: peak resident memory of one Fisher computation (loop, vmap, hooks) for T5 models
   of growing width, each measured in a fresh process.

Examples::

    python benchmarks/fisher_speed.py                   # all three tables
    python benchmarks/fisher_speed.py --tables speed --examples 16
    python benchmarks/fisher_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
warnings.filterwarnings("ignore")

from scoring_speed import SETUPS, Setup, build, make_examples  # noqa: E402

from hfmerge.fisher.diagonal import VMAP_MAX_PARAMETERS, choose_implementation, diagonal_fisher  # noqa: E402
from hfmerge.fisher.engine import encode_for_model  # noqa: E402
from hfmerge.fisher.nodes import node_fisher  # noqa: E402


IMPLEMENTATIONS = ("loop", "vmap", "hooks")


def previous_auto(model) -> str:
    """What ``auto`` chose before the hooks implementation existed (vmap up to 20M parameters)."""
    return "vmap" if sum(p.numel() for p in model.parameters()) <= VMAP_MAX_PARAMETERS else "loop"


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds; every round runs each once, in an
    order rotated from round to round, so that load changes on a shared machine hit all alike."""
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    best = {n: float("inf") for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def t5_of_width(d_model: int) -> dict:
    """A T5 with 6+6 layers, 8 heads, d_ff = 4 × d_model and t5's vocabulary (d_model 512: t5-small's shape)."""
    return {"d_model": d_model, "d_kv": d_model // 8, "d_ff": 4 * d_model, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8,
            "vocab_size": 32128}


def speed_table(examples_n: int, repeats: int, mode: str = "exact", widths: tuple[int, ...] = ()) -> list[dict]:
    rows = []
    setups = [SETUPS["tiny-t5"]] + [Setup(f"t5-d{w}", "t5", t5_of_width(w), "") for w in widths] + [SETUPS["t5-small-shape"]]
    for setup in setups:
        name = setup.name
        model, tokenizer, words = build(setup)
        n = examples_n if name == "tiny-t5" else max(4, examples_n // 8)
        examples = make_examples(n, words, max_prompt=24)
        enc = encode_for_model(model, tokenizer, examples)
        labels = [e.label for e in examples]
        fns = {impl: (lambda impl=impl: diagonal_fisher(model, enc, labels, mode=mode, implementation=impl)) for impl in IMPLEMENTATIONS}
        times = interleaved(fns, repeats)
        loop, hooks = fns["loop"](), fns["hooks"]()
        top = max(float(v.abs().max()) for v in loop.values())
        difference = max(float((hooks[k] - loop[k]).abs().max()) for k in loop) / top
        auto, before = choose_implementation(model, "auto", offloaded=False), previous_auto(model)
        rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()), "examples": len(enc),
                     "options": sum(len(e.option_ids) for e in enc), "mode": mode,
                     **{f"{impl}_s_per_example": times[impl] / len(enc) for impl in IMPLEMENTATIONS},
                     "previous_auto": before, "hooks_vs_previous_auto": times[before] / times["hooks"],
                     "hooks_vs_loop": times["loop"] / times["hooks"], "auto": auto,
                     "auto_is_best": times[auto] <= min(times.values()) * 1.05, "hooks_max_difference": difference})
        print(f"  speed {name}: done", file=sys.stderr)
    return rows


BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522,
             "max_position_embeddings": 512}


def bert_classifier_of_shape(config: dict):
    """A randomly initialised two-class BERT sequence classifier (the paper's setting) and a
    word-level tokenizer over its vocabulary."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from hfmerge.testing import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config("bert")
    for k, v in config.items():
        setattr(cfg, k, v)
    cfg.num_labels = 2
    model = tf.BertForSequenceClassification(cfg).eval()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(cfg.vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    return model, tokenizer, cfg.vocab_size - 4


NODE_MODELS = ("tiny-t5", "t5-small-shape", "bert-base-shape")


def nodes_table(examples_n: int, repeats: int, models: Sequence[str] = NODE_MODELS, max_prompt: int = 24) -> list[dict]:
    """Fisher Mask Nodes against two full diagonal Fishers, per Fisher mode, timed in interleaved
    rounds: the per-example loop (a backward pass per example and option with a full-model
    gradient, as the original Fisher-merging code and the node paper's baseline compute it; in
    ``sampled`` mode exactly one backward pass per example) and hfmerge's fastest (hooks)."""
    rows = []
    for name in models:
        if name == "bert-base-shape":
            model, tokenizer, words = bert_classifier_of_shape(BERT_BASE)
        else:
            model, tokenizer, words = build(SETUPS[name])
        n = examples_n if name == "tiny-t5" else max(4, examples_n // 2)
        examples = make_examples(n, words, max_prompt=max_prompt)
        if name == "bert-base-shape":  # a two-class classifier: one option per class
            examples = [type(e)(e.prompt, ("no", "yes"), i % 2) for i, e in enumerate(examples)]
        enc = encode_for_model(model, tokenizer, examples)
        labels = [e.label for e in examples]
        for mode in ("exact", "sampled"):
            fns = {"loop": lambda mode=mode: diagonal_fisher(model, enc, labels, mode=mode, implementation="loop"),
                   "hooks": lambda mode=mode: diagonal_fisher(model, enc, labels, mode=mode, implementation="hooks"),
                   "nodes": lambda mode=mode: node_fisher(model, enc, labels, mode=mode)}
            times = interleaved(fns, repeats)
            rows.append({"model": name, "parameters": sum(p.numel() for p in model.parameters()), "examples": n,
                         "options": sum(len(e.option_ids) for e in enc), "mode": mode,
                         "loop_s": times["loop"], "hooks_s": times["hooks"], "nodes_s": times["nodes"],
                         "ratio_vs_loop": times["loop"] / times["nodes"], "ratio_vs_hooks": times["hooks"] / times["nodes"]})
            print(f"  nodes {name} {mode}: done", file=sys.stderr)
    return rows


def merge_quality(workdir: Path, n_tasks: int = 3) -> list[dict]:
    """fisher vs fisher_nodes vs average on tiny T5 keyword experts (validation accuracy)."""
    import yaml

    import hfmerge
    from hfmerge.testing import build_base, keyword_rows, train_expert

    sys.path.insert(0, str(REPO / "tests"))
    from test_evaluation import make_tokenizer, write_jsonl

    tok = make_tokenizer(append_eos=True)
    base = build_base(workdir / "base", "t5", seed=11, d_model=32)
    tok.save_pretrained(base)
    keywords = [f"w{i + 1}" for i in range(n_tasks)]
    models, tasks = [], []
    for i, kw in enumerate(keywords):
        rows = keyword_rows(64, keyword=kw, seed=i)
        for r in rows:
            r["answer"] = ["no", "yes"][r["label"]]
        data = write_jsonl(workdir / f"task{i}.jsonl", rows)
        models.append(train_expert(base, workdir / f"expert{i}", tok, [(f"Review: {r['text']} Answer:", r["answer"]) for r in rows],
                                   steps=40, lr=1e-2, seed=i))
        tasks.append({"task": f"has_{kw}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
                      "validation_split": "validation", "doc_to_text": "Review: {{text}} Answer:", "doc_to_choice": ["no", "yes"],
                      "doc_to_target": "label"})

    os.environ["HFMERGE_CACHE"] = str(workdir / "cache")  # Fishers computed here, not read from an earlier run's cache
    out = []
    for method, params in (("average", {}), ("fisher", {"fisher_examples": 30}), ("fisher_nodes", {"fisher_examples": 30})):
        recipe = workdir / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "models": [{"model": str(m)} for m in models],
                                          "parameters": params, "tasks": tasks}))
        start = time.perf_counter()
        hfmerge.merge(recipe, output=workdir / f"out-{method}", overwrite=True, progress=False)
        seconds = time.perf_counter() - start
        results = json.loads((workdir / f"out-{method}" / "eval_results.json").read_text())
        out.append({"method": method, "average_accuracy": results["average"], "seconds": seconds,
                    "tasks": {k: v["score"] for k, v in results["tasks"].items()}})
        print(f"  quality {method}: done", file=sys.stderr)
    return out


MEMORY_CHILD = """
import resource, sys, torch, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {benchmarks!r}); sys.path.insert(0, {repo!r})
from scoring_speed import build, make_examples, Setup
from hfmerge.fisher.diagonal import diagonal_fisher
from hfmerge.fisher.engine import encode_for_model
setup = Setup("m", "t5", {config!r}, "")
model, tok, words = build(setup)
enc = encode_for_model(model, tok, make_examples(4, words, max_prompt=24))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
diagonal_fisher(model, enc, [0] * 4, implementation={impl!r})
print(sum(p.numel() for p in model.parameters()), before, status("VmHWM"))
"""


def memory_table() -> list[dict]:
    rows = []
    for d_model in (64, 128, 256, 512):
        config = t5_of_width(d_model)
        for impl in IMPLEMENTATIONS:
            code = MEMORY_CHILD.format(benchmarks=str(REPO / "benchmarks"), repo=str(REPO), config=config, impl=impl)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            params, before, after = int(out[0]), int(out[1]), int(out[2])
            rows.append({"d_model": d_model, "parameters": params, "implementation": impl, "model_mb": params * 4 / 2**20,
                         "rss_before_mb": before / 2**20, "peak_mb": after / 2**20, "fisher_extra_mb": (after - before) / 2**20})
        print(f"  memory d_model={d_model}: done", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", default="speed,nodes,memory", help="comma-separated: speed, nodes, memory")
    parser.add_argument("--examples", type=int, default=32, help="examples on the tiny model (t5-small shape: an eighth for the speed table, half for the nodes table; at least 4)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--widths", default="", help="comma-separated d_model values of extra T5 rows (6+6 layers) in the speed table, e.g. 64,128,256")
    parser.add_argument("--mode", default="exact", choices=("exact", "sampled", "empirical"), help="Fisher mode of the speed table")
    parser.add_argument("--node-models", default=",".join(NODE_MODELS), help=f"models of the nodes table (default: {','.join(NODE_MODELS)})")
    parser.add_argument("--max-prompt", type=int, default=24, help="longest prompt of the nodes table's examples, in words (default 24)")
    parser.add_argument("--no-quality", action="store_true", help="skip the merge-quality part of the nodes table")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = [t.strip() for t in args.tables.split(",")]
    load = os.getloadavg()[0]
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs "
          f"(load average {load:.1f}), best of {args.repeats} (interleaved in the speed table)")
    result: dict = {}
    if "speed" in tables:
        widths = tuple(int(w) for w in args.widths.split(",") if w.strip())
        rows = result["speed"] = speed_table(args.examples, args.repeats, args.mode, widths)
        print("\n| model | parameters | examples (options) | loop s/example | vmap s/example | hooks s/example | hooks vs previous auto | "
              "hooks vs loop | auto picks | auto is the fastest | hooks − loop (max, relative) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters'] / 1e6:.3f}M | {r['examples']} ({r['options']}) | {r['loop_s_per_example']:.4f} | "
                  f"{r['vmap_s_per_example']:.4f} | {r['hooks_s_per_example']:.4f} | {r['hooks_vs_previous_auto']:.1f}x ({r['previous_auto']}) | "
                  f"{r['hooks_vs_loop']:.1f}x | {r['auto']} | {'yes' if r['auto_is_best'] else 'no'} | {r['hooks_max_difference']:.1e} |")
    if "nodes" in tables:
        models = [m.strip() for m in args.node_models.split(",") if m.strip()]
        rows = result["nodes"] = nodes_table(args.examples, args.repeats, models, args.max_prompt)
        print("\n| model | parameters | examples (options) | mode | full Fisher, per-example loop s | full Fisher, hooks s | Fisher nodes s | "
              "nodes vs loop | nodes vs hooks |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['examples']} ({r['options']}) | {r['mode']} | {r['loop_s']:.3f} | "
                  f"{r['hooks_s']:.3f} | {r['nodes_s']:.3f} | {r['ratio_vs_loop']:.1f}x | {r['ratio_vs_hooks']:.1f}x |")
    if "nodes" in tables and not args.no_quality:
        with tempfile.TemporaryDirectory() as tmp:
            quality = result["quality"] = merge_quality(Path(tmp))
        print("\n| method | average validation accuracy | per task | seconds (Fishers + merge + evaluation) |")
        print("|---|---:|---|---:|")
        for r in quality:
            per = ", ".join(f"{k} {v:.3f}" for k, v in r["tasks"].items())
            print(f"| {r['method']} | {r['average_accuracy']:.3f} | {per} | {r['seconds']:.1f} |")
    if "memory" in tables:
        rows = result["memory"] = memory_table()
        print("\n| d_model | parameters | float32 model MB | implementation | RSS before MB | peak RSS during the Fisher MB | added by the Fisher MB |")
        print("|---:|---:|---:|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['d_model']} | {r['parameters'] / 1e6:.1f}M | {r['model_mb']:.0f} | {r['implementation']} | {r['rss_before_mb']:.0f} | "
                  f"{r['peak_mb']:.0f} | {r['fisher_extra_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
