#!/usr/bin/env python
"""Examples per second of hfmerge's batched rank-classification scorer against the naive loop.

The naive loop (`score_options_naive`) runs the whole model once per (example, option) pair;
the batched scorer (`score_options`) runs an encoder-decoder's encoder once per example,
reuses its output for every option, and batches (example, option) pairs with padding masked
out. Both use the same tokenisation; the script also prints the largest difference between
their scores (the tests hold it under 1e-5).

Models are randomly initialised in memory (speed does not depend on the weights); the tokenizer is a word-level one over the model's vocabulary. Each
measurement is the best of ``--repeats`` timed runs after one warm-up run.

Examples::

    python benchmarks/scoring_speed.py                  # tiny T5, t5-small-shaped T5, tiny GPT-2
    python benchmarks/scoring_speed.py --models tiny-t5 --examples 64 --batch-size 32
    python benchmarks/scoring_speed.py --threads 1        # steadier on a busy machine
    python benchmarks/scoring_speed.py --json scores.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hfmerge.evaluation.scoring import score_options, score_options_naive  # noqa: E402
from hfmerge.evaluation.tasks import Example  # noqa: E402


@dataclass(frozen=True)
class Setup:
    name: str
    family: str  # "t5" or "gpt2"
    config: dict
    description: str


SETUPS = {
    "tiny-t5": Setup("tiny-t5", "t5", {}, "hfmerge.testing tiny T5: d_model 16, 2+2 layers, vocab 64"),
    "t5-small-shape": Setup("t5-small-shape", "t5", {"d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 8, "vocab_size": 32128},
                            "t5-small's shape (60M parameters), random weights"),
    "tiny-gpt2": Setup("tiny-gpt2", "gpt2", {}, "hfmerge.testing tiny GPT-2: d_model 16, 2 layers, vocab 64, 32 positions"),
}


def build(setup: Setup):
    """A randomly initialised model and a word-level tokenizer over its vocabulary."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from hfmerge.testing import tiny_config

    torch.manual_seed(0)
    config = tiny_config(setup.family)
    for k, v in setup.config.items():
        setattr(config, k, v)
    if setup.family == "t5":
        model = tf.T5ForConditionalGeneration(config)
    else:
        model = tf.GPT2LMHeadModel(config)
    vocab = ["<pad>", "</s>", "<unk>", "<s>"] + [f"w{i}" for i in range(config.vocab_size - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if setup.family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    return model.eval(), tokenizer, config.vocab_size - 4


def make_examples(n: int, words: int, *, max_prompt: int, seed: int = 0) -> list[Example]:
    """`n` examples with prompts of 8..max_prompt words and 2-4 options of 1-3 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(8, max_prompt)))
        options = tuple(" ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 4)))
        out.append(Example(prompt, options, 0))
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    result = fn()  # warm-up (allocator, kernels, tokenizer caches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SETUPS), help=f"comma-separated, from: {', '.join(SETUPS)}")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="(example, option) pairs per forward pass of the batched scorer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice, one per core)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        # On a shared machine, OpenMP threads spin-waiting for a descheduled sibling make tiny
        # operations erratic; one thread gives steadier figures there.
        torch.set_num_threads(args.threads)

    rows = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads on {os.cpu_count()} CPUs (load average {load:.1f}), "
          f"{args.examples} examples, batch size {args.batch_size}, best of {args.repeats}")
    for name in args.models.split(","):
        setup = SETUPS[name.strip()]
        model, tokenizer, words = build(setup)
        # GPT-2's tiny config has 32 positions: keep its prompts short.
        examples = make_examples(args.examples, words, max_prompt=24 if setup.family == "t5" else 20)
        pairs = sum(len(e.options) for e in examples)
        naive_s, naive = timed(lambda: score_options_naive(model, tokenizer, examples), args.repeats)
        batched_s, batched = timed(lambda: score_options(model, tokenizer, examples, batch_size=args.batch_size), args.repeats)
        diff = max(abs(a - b) for x, y in zip(batched, naive) for a, b in zip(x.mean_logprobs, y.mean_logprobs))
        rows.append({
            "model": setup.name, "description": setup.description, "parameters": sum(p.numel() for p in model.parameters()),
            "examples": len(examples), "options": pairs, "naive_examples_per_s": len(examples) / naive_s,
            "batched_examples_per_s": len(examples) / batched_s, "speedup": naive_s / batched_s, "max_abs_diff": diff,
        })
        print(f"  {setup.name}: done", file=sys.stderr)

    print()
    print("| model | parameters | examples (options) | naive loop, ex/s | batched, ex/s | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['examples']} ({r['options']}) | {r['naive_examples_per_s']:.1f} | "
              f"{r['batched_examples_per_s']:.1f} | {r['speedup']:.1f}x | {r['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
