"""Build the merge lab: tokenizer, pre-trained tiny T5, one expert per task, a multitask model.

    python -m benchmarks.lab build [--quick]

Every stage is an ordinary Hugging Face folder under ``benchmarks/_work/lab/<full|quick>/``,
named with a hash of what it depends on (the data manifest and the settings up to that
stage), written to a temporary folder and renamed when complete, with a ``lab.json`` that
records its settings, losses and wall time. A stage whose folder exists is not rebuilt, so a
second build is instant, and new fine-tuning settings reuse the pre-trained base.

- tokenizer/  a Unigram (SentencePiece-like) tokenizer trained on the pre-training corpus:
  ``<pad>`` = 0, ``</s>`` = 1 (appended to every input, as T5's), ``<unk>`` = 2, and 100
  sentinels ``<extra_id_N>``;
- base/       T5 (ReLU FFN, tied embeddings) pre-trained from scratch with span corruption;
- finetuned-<key>/experts/<task>/  the base fine-tuned on one task's train split (the same
  settings for every task);
- finetuned-<key>/multitask/  the base fine-tuned on the union of the train splits (the
  oracle), for as many steps as the experts together.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.lab` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.lab.settings import DATA_DIR, TASKS, LabSettings, data_file, settings_for  # noqa: E402

SENTINELS = 100


def threads(settings: LabSettings) -> int:
    """torch threads: the settings' (2), or HFMERGE_LAB_THREADS (e.g. 1 on a busy machine)."""
    return int(os.environ.get("HFMERGE_LAB_THREADS") or settings.threads)


def quiet_libraries() -> None:
    """No download/saving progress bars from huggingface_hub and transformers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def log(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- stages

def _stage(folder: Path, build: Callable[[Path], dict]) -> tuple[Path, bool]:
    """Run `build(tmp)` unless `folder` is complete; rename tmp into place. Returns (folder, built)."""
    if (folder / "lab.json").exists():
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        info = build(tmp)
        info["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "lab.json").write_text(json.dumps(info, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder, True


def read_corpus(settings: LabSettings) -> list[str]:
    with gzip.open(DATA_DIR / "corpus.txt.gz", "rt", encoding="utf-8") as fh:
        text = fh.read()
    if settings.corpus_bytes is not None:
        text = text[: settings.corpus_bytes]
    return [line for line in text.splitlines() if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(settings: LabSettings, folder: Path) -> dict:
    """A lower-cased Unigram tokenizer with T5's special tokens, saved as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = read_corpus(settings)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace("\n", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=settings.model.vocab_size - SENTINELS, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.75, max_piece_length=16, show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok = _canonical_unigram(tok)
    sentinels = [f"<extra_id_{i}>" for i in range(SENTINELS)]
    tok.add_special_tokens(sentinels)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens=sentinels, model_max_length=512)
    assert fast.pad_token_id == 0 and fast.eos_token_id == 1, (fast.pad_token_id, fast.eos_token_id)
    fast.save_pretrained(folder)
    return {"stage": "tokenizer", "vocab_size": len(fast), "corpus_lines": len(lines), "settings": settings.to_dict()}


def _canonical_unigram(tok):
    """The trained Unigram model with its pieces in a reproducible order.

    From run to run the trainer varies the last digits of the scores and emits pieces of equal
    score in either order; it also appends the characters it must keep (those rare in the
    corpus) with scores stepping down by 1e-4 in hash order. So the same corpus could give
    different token ids. Here the scores are rounded to 8 decimals, the pieces after the
    special tokens sorted by (score descending, piece), and the appended characters (single
    characters scored more than 0.5 below every longer piece; the trainer puts them about 1
    below) sorted by character and given the same descending scores in that order.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    n_special = model["unk_id"] + 1  # <pad>, </s>, <unk> come first
    special, pieces = model["vocab"][:n_special], model["vocab"][n_special:]
    pieces = [[piece, round(score, 8)] for piece, score in pieces]
    floor = min((score for piece, score in pieces if len(piece) > 1), default=float("-inf")) - 0.5
    appended = [p for p in pieces if len(p[0]) == 1 and p[1] < floor]
    kept = sorted((p for p in pieces if not (len(p[0]) == 1 and p[1] < floor)), key=lambda p: (-p[1], p[0]))
    scores = sorted((score for _, score in appended), reverse=True)
    appended = [[piece, score] for (piece, _), score in zip(sorted(appended), scores)]
    model["vocab"] = special + kept + appended
    return Tokenizer.from_str(json.dumps(spec))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------- span corruption

def _segment(n_items: int, n_segments: int, rng: random.Random) -> list[int]:
    """A random split of n_items into n_segments positive parts (T5's random_spans_noise_mask)."""
    cuts = sorted(rng.sample(range(1, n_items), n_segments - 1)) if n_segments > 1 else []
    edges = [0, *cuts, n_items]
    return [b - a for a, b in zip(edges, edges[1:])]


def _noise_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    num_noise = min(max(round(length * density), 1), length - 1)
    return num_noise, max(round(num_noise / mean_span), 1)


def raw_length_for(input_length: int, density: float, mean_span: float) -> int:
    """The longest raw block whose corrupted input (with sentinels and EOS) fits input_length."""
    length = input_length
    while True:
        noise, spans = _noise_counts(length + 1, density, mean_span)
        if (length + 1) - noise + spans + 1 > input_length:
            return length
        length += 1


def span_corrupt(block: list[int], density: float, mean_span: float, sentinel_ids: list[int], eos: int,
                 rng: random.Random) -> tuple[list[int], list[int]]:
    """T5's span corruption of one block: (inputs, targets), each ending with EOS."""
    num_noise, num_spans = _noise_counts(len(block), density, mean_span)
    num_spans = min(num_spans, num_noise, len(block) - num_noise)
    noise = _segment(num_noise, num_spans, rng)
    keep = _segment(len(block) - num_noise, num_spans, rng)
    inputs, targets, pos = [], [], 0
    for i, (k, n) in enumerate(zip(keep, noise)):
        inputs += block[pos:pos + k]
        pos += k
        inputs.append(sentinel_ids[i])
        targets.append(sentinel_ids[i])
        targets += block[pos:pos + n]
        pos += n
    return inputs + [eos], targets + [eos]


# --------------------------------------------------------------------------- training

def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def _batch(inputs: list[list[int]], targets: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = _pad(inputs, 0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long() if all(inputs) else None, "labels": _pad(targets, -100)}


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine to zero
    return f


def train(model, batches: Callable[[int], dict], *, steps: int, lr: float, warmup: int, weight_decay: float,
          desc: str, optimizer: str = "adamw", schedule: str = "cosine") -> list[float]:
    """Train with linear warm-up, then a cosine decay to zero or a constant rate; gradient norm
    clipped at 1. Returns the losses.

    Args:
        optimizer: ``"adamw"``, or ``"adafactor"`` (T5's optimiser: each step is scaled by the
            parameter's RMS, so `lr` is a relative step size).
        schedule: ``"cosine"`` or ``"constant"`` after the warm-up.
    """
    if optimizer == "adafactor":
        opt = torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer {optimizer!r}: use 'adamw' or 'adafactor'")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule {schedule!r}: use 'cosine' or 'constant'")
    shape = _lr_lambda(warmup, steps) if schedule == "cosine" else (lambda step: min(1.0, (step + 1) / max(1, warmup)))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(opt, shape)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    every = max(1, steps // 10)
    for step in range(steps):
        batch = batches(step)
        mask = batch.pop("attention_mask")
        if mask is None:
            mask = (batch["input_ids"] != 0).long()
        loss = model(**batch, attention_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = losses[-every:]
            log(f"{desc}: step {step + 1}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                f"({(time.perf_counter() - start) / (step + 1):.2f} s/step)")
    model.eval()
    return losses


def t5_config(settings: LabSettings, vocab_size: int):
    from transformers import T5Config

    m = settings.model
    return T5Config(vocab_size=vocab_size, d_model=m.d_model, d_ff=m.d_ff, d_kv=m.d_kv, num_heads=m.num_heads,
                    num_layers=m.num_layers, num_decoder_layers=m.num_decoder_layers, dropout_rate=m.dropout_rate,
                    feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                    eos_token_id=1)


def pretraining_batches(settings: LabSettings, tokenizer) -> tuple[Callable[[int], dict], dict]:
    """The pre-training stream: `batches(step)` and a summary of what it draws from.

    Span corruption of packed corpus blocks (one epoch after another, each shuffled); from step
    ``pretrain.supervised_from`` on, ``pretrain.supervised_per_batch`` rows of each batch are
    supervised train examples instead (T5's pre-training mixture), cycled in shuffled epochs.
    """
    p = settings.pretrain
    lines = read_corpus(settings)
    ids: list[int] = []
    for chunk in range(0, len(lines), 2000):
        for row in tokenizer(lines[chunk:chunk + 2000], add_special_tokens=False)["input_ids"]:
            ids += row
    raw = raw_length_for(p.input_length, p.noise_density, p.mean_span_length)
    blocks = [ids[i:i + raw] for i in range(0, len(ids) - raw + 1, raw)]
    sentinel_ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(SENTINELS)])
    if p.supervised_per_batch and not p.supervised_examples:
        raise ValueError("pretrain.supervised_per_batch > 0 needs pretrain.supervised_examples > 0")
    if not 0 <= p.supervised_per_batch < p.batch_size:
        raise ValueError(f"pretrain.supervised_per_batch must be in [0, batch_size={p.batch_size})")
    supervised = []
    if p.supervised_per_batch:
        supervised = [ex for task in TASKS for ex in finetune_examples(settings, tokenizer, task)[-p.supervised_examples:]]
    order: list[int] = []
    sup_order: list[int] = []
    rng = random.Random(settings.seed)

    def batches(step: int) -> dict:
        inputs, targets = [], []
        n_supervised = p.supervised_per_batch if step >= p.supervised_from else 0
        for _ in range(p.batch_size - n_supervised):
            if not order:
                order.extend(rng.sample(range(len(blocks)), len(blocks)))
            x, y = span_corrupt(blocks[order.pop()], p.noise_density, p.mean_span_length, sentinel_ids, 1, rng)
            inputs.append(x)
            targets.append(y)
        for _ in range(n_supervised):
            if not sup_order:
                sup_order.extend(rng.sample(range(len(supervised)), len(supervised)))
            x, y = supervised[sup_order.pop()]
            inputs.append(x)
            targets.append(y)
        return _batch(inputs, targets)

    return batches, {"corpus_tokens": len(ids), "blocks": len(blocks), "block_length": raw,
                     "supervised_examples": len(supervised)}


def pretrain(settings: LabSettings, tokenizer_dir: Path, folder: Path) -> dict:
    from transformers import T5ForConditionalGeneration

    p = settings.pretrain
    tokenizer = load_tokenizer(tokenizer_dir)
    batches, info = pretraining_batches(settings, tokenizer)
    log(f"pre-training corpus: {info['corpus_tokens']:,} tokens, {info['blocks']:,} blocks of {info['block_length']} -> "
        f"inputs of <= {p.input_length}; {p.steps * p.batch_size / info['blocks']:.1f} epochs")
    if info["supervised_examples"]:
        log(f"pre-training mixture from step {p.supervised_from}: {p.supervised_per_batch} of {p.batch_size} rows "
            f"per batch from {info['supervised_examples']:,} supervised train examples")
    torch.manual_seed(settings.seed)
    model = T5ForConditionalGeneration(t5_config(settings, len(tokenizer)))
    losses = train(model, batches, steps=p.steps, lr=p.lr, warmup=p.warmup, weight_decay=p.weight_decay, desc="pre-train",
                   optimizer=p.optimizer, schedule=p.schedule)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"stage": "base", "parameters": sum(t.numel() for t in model.parameters()), "corpus_tokens": info["corpus_tokens"],
            "supervised_examples": info["supervised_examples"], "losses": losses, "settings": settings.to_dict()}


def finetune_examples(settings: LabSettings, tokenizer, task: str, split: str = "train") -> list[tuple[list[int], list[int]]]:
    """(prompt ids with EOS, answer ids with EOS) for a task's split (train: the first
    `finetune.train_examples` rows), prompts cut to `finetune.max_input_tokens`."""
    rows = read_jsonl(data_file(task, split))
    if split == "train" and settings.finetune.train_examples is not None:
        rows = rows[: settings.finetune.train_examples]
    limit = settings.finetune.max_input_tokens
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    answers = tokenizer([r["options"][r["label"]] for r in rows])["input_ids"]
    return [(p[: limit - 1] + [1] if len(p) > limit else p, a) for p, a in zip(prompts, answers)]


def finetune(settings: LabSettings, base_dir: Path, tasks: tuple[str, ...], folder: Path) -> dict:
    """Fine-tune the base on the union of `tasks` (one task: an expert), steps × len(tasks)."""
    from transformers import T5ForConditionalGeneration

    f = settings.finetune
    tokenizer = load_tokenizer(base_dir)
    examples = [ex for task in tasks for ex in finetune_examples(settings, tokenizer, task)]
    steps = f.steps if len(tasks) == 1 else (f.multitask_steps or f.steps * len(tasks))
    torch.manual_seed(settings.seed)
    model = T5ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    rng = random.Random(settings.seed + 1)
    order: list[int] = []

    def batches(step: int) -> dict:
        chosen = []
        for _ in range(f.batch_size):
            if not order:
                order.extend(rng.sample(range(len(examples)), len(examples)))
            chosen.append(examples[order.pop()])
        return _batch([x for x, _ in chosen], [y for _, y in chosen])

    name = tasks[0] if len(tasks) == 1 else "multitask"
    losses = train(model, batches, steps=steps, lr=f.lr, warmup=f.warmup, weight_decay=f.weight_decay, desc=f"fine-tune {name}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"stage": "expert" if len(tasks) == 1 else "multitask", "tasks": list(tasks), "train_examples": len(examples),
            "steps": steps, "losses": losses, "settings": settings.to_dict()}


# --------------------------------------------------------------------------- the whole lab

def lab_paths(settings: LabSettings) -> dict[str, Path]:
    root, keys = settings.root, settings.stage_keys()
    tuned = root / f"finetuned-{keys['finetune']}"
    paths = {"root": root, "tokenizer": root / f"tokenizer-{keys['tokenizer']}", "base": root / f"base-{keys['base']}",
             "multitask": tuned / "multitask"}
    for task in TASKS:
        paths[f"expert:{task}"] = tuned / "experts" / task
    return paths


def is_built(settings: LabSettings) -> bool:
    return all((p / "lab.json").exists() for k, p in lab_paths(settings).items() if k != "root")


def build_lab(settings: LabSettings) -> dict[str, Path]:
    """Build (or find in the cache) every model of the lab. Returns the stage folders."""
    torch.set_num_threads(threads(settings))
    quiet_libraries()
    paths = lab_paths(settings)
    start = time.perf_counter()
    log(f"lab {settings.name} in {paths['root']}")
    built_any = False
    _, built = _stage(paths["tokenizer"], lambda tmp: train_tokenizer(settings, tmp))
    built_any |= built
    _, built = _stage(paths["base"], lambda tmp: pretrain(settings, paths["tokenizer"], tmp))
    built_any |= built
    for task in TASKS:
        _, built = _stage(paths[f"expert:{task}"], lambda tmp, task=task: finetune(settings, paths["base"], (task,), tmp))
        built_any |= built
    _, built = _stage(paths["multitask"], lambda tmp: finetune(settings, paths["base"], TASKS, tmp))
    built_any |= built
    seconds = time.perf_counter() - start
    summary = {"settings": settings.to_dict(), "key": settings.key(), "torch_threads": threads(settings),
               "stages": {k: json.loads((p / "lab.json").read_text()).get("seconds") for k, p in paths.items() if k != "root"}}
    if built_any:
        summary["build_seconds"] = round(seconds, 1)
        (paths["multitask"].parent / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"lab ready in {seconds:.1f} s" + ("" if built_any else " (everything cached)"))
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.lab build", description="Build the merge lab's models (cached).")
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (seconds): the smoke test")
    p.add_argument("--clean", action="store_true", help="delete this lab's cache folder first")
    args = p.parse_args(argv)
    settings = settings_for(args.quick)
    if args.clean and settings.root.exists():
        shutil.rmtree(settings.root)
    build_lab(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
