"""Why merges of the lab's experts work or collapse: probes of the base and the task vectors.

`python -m benchmarks.lab probe [--quick]` answers three questions in about a minute:

1. **Does the pre-trained base read its input?** Its span-corruption loss on held-in corpus
   blocks, against the same loss when every example is given another example's input, and
   the span tokens' loss against the corpus' unigram entropy. A base whose loss does not
   change when the inputs are swapped has learnt token frequencies, not features.
2. **Are the task vectors linear?** Each expert's validation accuracy at θ_pre + α τ_i.
3. **Where do they interfere?** Each expert plus the other experts' task vectors, against
   the expert plus random vectors of the same per-tensor norms, and the other task vectors
   restricted to one parameter group at a time. Interference that random vectors of the same
   size do not cause is structured: the experts rewrite the same features.

Nothing here merges through recipes; it works on state dicts in memory, so it measures the
models, not the merge engine.
"""

from __future__ import annotations

import collections
import json
import math
import random
import time
from pathlib import Path

import torch

from .build import (SENTINELS, _batch, build_lab, load_tokenizer, log, quiet_libraries, raw_length_for, read_corpus,
                    span_corrupt, threads)
from .settings import RESULTS_DIR, TASKS, LabSettings, settings_for, task_entries

GROUPS = ("embedding", "norm", "relative bias", "encoder attention", "encoder FFN", "decoder self-attention",
          "cross-attention", "decoder FFN")


def group_of(name: str) -> str:
    """The parameter group of a T5 tensor name (for the interference table)."""
    if "shared" in name or "embed_tokens" in name or "lm_head" in name:
        return "embedding"
    if "layer_norm" in name:
        return "norm"
    if "relative_attention_bias" in name:
        return "relative bias"
    if "EncDecAttention" in name:
        return "cross-attention"
    encoder = name.startswith("encoder")
    if "DenseReluDense" in name:
        return "encoder FFN" if encoder else "decoder FFN"
    return "encoder attention" if encoder else "decoder self-attention"


# --------------------------------------------------------------------------- 1. context use

def context_use(settings: LabSettings, model_dir: Path, n_blocks: int = 64, seed: int = 1) -> dict:
    """Span-corruption loss of the model on corpus blocks, with the right and with swapped inputs."""
    from transformers import T5ForConditionalGeneration

    p = settings.pretrain
    tokenizer = load_tokenizer(model_dir)
    lines = read_corpus(settings)
    rng = random.Random(seed)
    ids: list[int] = []
    for row in tokenizer(rng.sample(lines, min(len(lines), 4000)), add_special_tokens=False)["input_ids"]:
        ids += row
    raw = raw_length_for(p.input_length, p.noise_density, p.mean_span_length)
    blocks = [ids[i:i + raw] for i in range(0, len(ids) - raw + 1, raw)][:n_blocks]
    sentinel_ids = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(SENTINELS)])
    pairs = [span_corrupt(b, p.noise_density, p.mean_span_length, sentinel_ids, 1, rng) for b in blocks]
    inputs, targets = [x for x, _ in pairs], [y for _, y in pairs]
    model = T5ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()

    def token_nll(batch_inputs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _batch(batch_inputs, targets)
        mask = batch.pop("attention_mask")
        with torch.no_grad():
            logits = model(**batch, attention_mask=mask).logits
        labels = batch["labels"]
        nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return nll, labels

    nll, labels = token_nll(inputs)
    swapped, _ = token_nll(inputs[1:] + inputs[:1])
    valid = labels != -100
    span = valid & ~torch.isin(labels, torch.tensor([*sentinel_ids, 1]))
    counts = collections.Counter(ids)
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())
    return {
        "blocks": len(blocks),
        "loss": nll[valid].mean().item(),
        "loss_swapped_inputs": swapped[valid].mean().item(),
        "span_token_loss": nll[span].mean().item(),
        "span_token_loss_swapped_inputs": swapped[span].mean().item(),
        "unigram_entropy": unigram,
    }


# --------------------------------------------------------------------------- 2-3. task vectors

class TaskVectorProbe:
    """The base, the experts' task vectors and a validation scorer for states built from them."""

    def __init__(self, settings: LabSettings, paths: dict[str, Path], validation_examples: int = 100) -> None:
        from transformers import T5ForConditionalGeneration

        from hfmerge.evaluation.evaluate_model import prepare_tasks
        from hfmerge.evaluation.tasks import parse_tasks

        self.tokenizer = load_tokenizer(paths["base"])
        self.model = T5ForConditionalGeneration.from_pretrained(paths["base"], dtype=torch.float32).eval()
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.vectors = {}
        for task in TASKS:
            expert = T5ForConditionalGeneration.from_pretrained(paths[f"expert:{task}"], dtype=torch.float32).state_dict()
            self.vectors[task] = {k: expert[k] - self.base[k] for k in self.base}
        self.prepared = {}
        for entry in task_entries(settings, validation_examples=validation_examples):
            entry.pop("model")
            self.prepared[entry["task"]] = prepare_tasks(parse_tasks([entry], source="lab probe"), "validation")

    def accuracy(self, state: dict[str, torch.Tensor], task: str) -> float:
        import hfmerge

        self.model.load_state_dict(state)
        report = hfmerge.evaluate(self.model, self.prepared[task], split="validation", tokenizer=self.tokenizer, progress=False,
                                  batch_size=64, device=None)
        return 100 * report.results[0].metrics["accuracy"]

    def state(self, coefficients: dict[str, float], extra: dict[str, torch.Tensor] | None = None,
              only: str | None = None, only_tasks: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """θ_pre + Σ c_t τ_t (+ extra); task vectors of `only_tasks` restricted to group `only`."""
        out = {}
        for k, v in self.base.items():
            total = v.clone()
            for task, c in coefficients.items():
                if task in only_tasks and only is not None and group_of(k) != only:
                    continue
                total += c * self.vectors[task][k]
            if extra is not None:
                total += extra[k]
            out[k] = total
        return out

    def random_like(self, tasks: list[str], seed: int) -> dict[str, torch.Tensor]:
        """Per tensor, a Gaussian vector with the norm of each task's vector, summed over tasks."""
        g = torch.Generator().manual_seed(seed)
        out = {k: torch.zeros_like(v) for k, v in self.base.items()}
        for task in tasks:
            for k, v in self.vectors[task].items():
                r = torch.randn(v.shape, generator=g)
                out[k] += r * (v.norm() / r.norm().clamp(min=1e-12))
        return out

    def cosines(self) -> dict[str, dict[str, float]]:
        flat = {t: torch.cat([v.flatten() for v in self.vectors[t].values()]).double() for t in TASKS}
        return {a: {b: torch.nn.functional.cosine_similarity(flat[a], flat[b], 0).item() for b in TASKS} for a in TASKS}

    def relative_norms(self) -> dict[str, float]:
        base = torch.cat([v.flatten() for v in self.base.values()]).norm()
        return {t: (torch.cat([v.flatten() for v in self.vectors[t].values()]).norm() / base).item() for t in TASKS}


def task_vector_report(probe: TaskVectorProbe, scales: tuple[float, ...] = (0.0, 0.5, 1.0), seed: int = 0) -> dict:
    rows = {}
    for i, task in enumerate(TASKS):
        others = [t for t in TASKS if t != task]
        row = {f"alpha={a:g}": probe.accuracy(probe.state({task: a}), task) for a in scales}
        everyone = {t: 1.0 for t in TASKS}
        row["+ other task vectors"] = probe.accuracy(probe.state(everyone), task)
        row["+ random, same norms"] = probe.accuracy(probe.state({task: 1.0}, extra=probe.random_like(others, seed + i)), task)
        for g in GROUPS:
            row[f"+ others' {g}"] = probe.accuracy(probe.state(everyone, only=g, only_tasks=tuple(others)), task)
        rows[task] = row
    return {"rows": rows, "cosines": probe.cosines(), "relative_norms": probe.relative_norms()}


# --------------------------------------------------------------------------- report

def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(ctx: dict, tv: dict) -> str:
    text = ["## Does the base read its input?", "",
            _table(["", "all target tokens", "span tokens"], [
                ["loss, right inputs", f"{ctx['loss']:.3f}", f"{ctx['span_token_loss']:.3f}"],
                ["loss, inputs swapped between examples", f"{ctx['loss_swapped_inputs']:.3f}",
                 f"{ctx['span_token_loss_swapped_inputs']:.3f}"],
                ["corpus unigram entropy (nats)", "", f"{ctx['unigram_entropy']:.3f}"]]), ""]
    keys = list(next(iter(tv["rows"].values())).keys())
    text += ["## Task vectors: validation accuracy (%) of θ_pre + α τ_i and of the expert plus others", "",
             _table(["state", *TASKS], [[k, *[f"{tv['rows'][t][k]:.1f}" for t in TASKS]] for k in keys]), ""]
    text += ["## Task vectors: cosine similarity and norm relative to θ_pre", "",
             _table(["", *TASKS, "‖τ‖ / ‖θ_pre‖"],
                    [[a, *[f"{tv['cosines'][a][b]:.3f}" for b in TASKS], f"{tv['relative_norms'][a]:.4f}"] for a in TASKS]), ""]
    return "\n".join(text)


def run_probe(settings: LabSettings, results_dir: Path | None = None, validation_examples: int = 100) -> dict:
    quiet_libraries()
    torch.set_num_threads(threads(settings))
    paths = build_lab(settings)
    start = time.perf_counter()
    ctx = context_use(settings, paths["base"])
    tv = task_vector_report(TaskVectorProbe(settings, paths, validation_examples))
    report = {"lab": settings.name, "key": settings.key(), "validation_examples": validation_examples,
              "context_use": ctx, "task_vectors": tv, "seconds": round(time.perf_counter() - start, 1)}
    text = render(ctx, tv)
    if results_dir is None:
        results_dir = paths["multitask"].parent / "results" if settings.name == "quick" else RESULTS_DIR
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "probe.json").write_text(json.dumps(report, indent=1) + "\n")
    (results_dir / "probe.md").write_text(text + "\n")
    print(text)
    log(f"probe done in {report['seconds']:.0f} s; results in {results_dir}")
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.lab probe",
                                description="Probe the lab's base and task vectors: context use, linearity, interference.")
    p.add_argument("--quick", action="store_true", help="the quick lab")
    p.add_argument("--results", help="folder for probe.md and probe.json")
    p.add_argument("--validation-examples", type=int, default=100, help="validation examples per task (default 100)")
    args = p.parse_args(argv)
    run_probe(settings_for(args.quick), args.results, args.validation_examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
