"""The diagonal Fisher information of a model on a task's examples.

    F = (1/N) Σ_n Σ_k w_nk (∇_θ ℓ_nk)²

with ℓ_nk the length-normalised log-likelihood of option k of example n (`loglik`) and the
weights w_nk given by the mode:

* ``exact`` (default): w_nk = p_nk, the model's own probability of option k (softmax over the
  options of ℓ_n·): the expectation over the model's predictive distribution, as the DF-Merge
  reference code and Fisher merging compute it;
* ``sampled``: one option drawn from p_n· (seeded), weight 1;
* ``empirical``: the labelled option, weight 1 (the "empirical Fisher").

Squares are taken **per example and option**, never of a batch sum (that adds cross terms).
Three implementations give the same result:

* ``loop``: per example one forward pass (the encoder once, the K options as one decoder
  batch) and one backward pass per option with a non-zero weight. Squared gradients are
  accumulated by post-accumulate-grad hooks, which also reach parameters that accelerate
  offloads to CPU or disk (those are materialised afresh in every forward and never keep a
  ``.grad``): see `offload`.
* ``vmap``: per-(example, option) gradients of a batch of pairs at once with
  ``torch.func.vmap(grad(...))``. Faster for small models (one fused pass over many pairs);
  for large models the per-pair gradient copies cost more memory and time than they save.

* ``hooks``: a batch of pairs in one forward and one backward pass; layer hooks record each
  layer's inputs and output gradients, from which every pair's gradient is formed one
  parameter at a time, squared and added (`hooks`). Parameters the hooks do not cover are
  computed with the loop over the same pairs.

``auto`` picks ``hooks`` where they cover every parameter of the model, else ``vmap`` for
in-memory language models under `VMAP_MAX_PARAMETERS` parameters and ``loop`` otherwise (see
docs/benchmarks.md for the measurements behind it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FisherError
from ..evaluation.lm import model_device
from ..evaluation.scoring import EncodedExample
from .loglik import model_kind, option_logliks, pair_batches, pair_loglik

logger = logging.getLogger(__name__)

MODES = ("exact", "sampled", "empirical")
IMPLEMENTATIONS = ("auto", "hooks", "vmap", "loop")
# Below this many parameters the vectorised implementation is used by `auto`.
VMAP_MAX_PARAMETERS = 20_000_000
# (example, option) pairs per vmap call; bounded further by VMAP_MAX_ELEMENTS.
VMAP_CHUNK = 128
# Per-pair gradient copies a vmap call may hold at once, in parameter entries.
VMAP_MAX_ELEMENTS = 64_000_000


@dataclass
class FisherStats:
    """What a Fisher computation did.

    Attributes:
        num_examples: Examples used (N).
        num_gradients: Per-(example, option) gradients taken.
        implementation: ``hooks``, ``vmap`` or ``loop``.
        seconds: Wall time.
    """

    num_examples: int
    num_gradients: int
    implementation: str
    seconds: float


def option_weights(logliks: torch.Tensor, mode: str, label: int, rng: random.Random) -> list[tuple[int, float]]:
    """The (option, weight) pairs of one example's Fisher term.

    Args:
        logliks: ℓ_k of the example's options (detached).
        mode: ``exact``, ``sampled`` or ``empirical``.
        label: The index of the labelled option (used by ``empirical`` only).
        rng: Draws the option in ``sampled`` mode.
    """
    if mode == "empirical":
        return [(label, 1.0)]
    p = torch.softmax(logliks.double(), dim=0)
    if mode == "sampled":
        return [(rng.choices(range(len(p)), weights=p.tolist(), k=1)[0], 1.0)]
    return [(k, float(pk)) for k, pk in enumerate(p) if float(pk) > 0.0]


def choose_implementation(model: Any, implementation: str, offloaded: bool) -> str:
    """Resolve ``auto`` (``hooks`` where they cover every parameter); refuse ``vmap`` where it
    cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise FisherError(f"fisher implementation {implementation!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    vmap_ok = not offloaded and model_kind(model) != "classifier"
    if implementation == "vmap" and not vmap_ok:
        raise FisherError("fisher implementation 'vmap' needs a language model held in memory (not offloaded, not a classifier); use 'hooks' or 'loop'")
    if implementation == "auto":
        from .hooks import uncovered_parameters

        if not uncovered_parameters(model):
            return "hooks"
        size = sum(p.numel() for p in model.parameters())
        return "vmap" if vmap_ok and size <= VMAP_MAX_PARAMETERS else "loop"
    return implementation


def diagonal_fisher(model: Any, examples: Sequence[EncodedExample], labels: Sequence[int], *, mode: str = "exact",
                    implementation: str = "auto", seed: int = 0, device: str | torch.device | None = None,
                    progress: bool = False, desc: str = "Fisher", stats: list[FisherStats] | None = None) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of `model` on `examples`, one float32 tensor per parameter.

    Args:
        model: A transformers encoder-decoder LM, decoder-only LM or sequence classifier.
            Its parameters may be offloaded by an accelerate device map (then ``vmap`` does
            not run). Put in ``eval()`` mode for the computation (dropout off), restored after.
        examples: Tokenised examples (`hfmerge.evaluation.scoring.encode_examples`).
        labels: Per example, the index of the right option (used by ``empirical`` only).
        mode: ``exact``, ``sampled`` or ``empirical``.
        implementation: ``auto``, ``hooks``, ``vmap`` or ``loop``.
        seed: Seed of the option draws in ``sampled`` mode.
        device: Where inputs go (default: the model's execution device).
        progress: Show a progress bar.
        desc: The progress bar's label.
        stats: If given, a `FisherStats` is appended.

    Returns:
        Parameter name (as ``model.named_parameters()`` gives it: tied parameters once) →
        Fisher tensor of the parameter's shape, on CPU.

    Raises:
        FisherError: Unknown mode or implementation, no examples, a label out of range.
    """
    import time

    from .offload import is_offloaded, squared_grad_hooks

    if mode not in MODES:
        raise FisherError(f"fisher mode {mode!r}; expected one of {', '.join(MODES)}")
    examples = list(examples)
    if not examples:
        raise FisherError("no examples to compute the Fisher on")
    if len(labels) != len(examples):
        raise FisherError(f"{len(labels)} labels for {len(examples)} examples")
    offloaded = is_offloaded(model)
    impl = choose_implementation(model, implementation, offloaded)
    dev = model_device(model, device)
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)
    try:
        if impl == "loop":
            with squared_grad_hooks(model) as sink:
                for n, example in enumerate(examples):
                    logliks = option_logliks(model, example, dev)
                    chosen = option_weights(logliks.detach(), mode, _label(labels[n], len(example.option_ids), n), rng)
                    for j, (k, w) in enumerate(chosen):
                        sink.weight = w
                        logliks[k].backward(retain_graph=j < len(chosen) - 1)
                    bar.update(1)
                fisher, count = sink.result(), sink.count
        elif impl == "hooks":
            fisher, count = _hooks_fisher(model, examples, labels, mode, rng, dev, bar)
        else:
            fisher, count = _vmap_fisher(model, examples, labels, mode, rng, dev, bar)
    finally:
        bar.close()
        model.train(was_training)
    for value in fisher.values():
        value.div_(len(examples))
    if stats is not None:
        stats.append(FisherStats(len(examples), count, impl, time.perf_counter() - start))
    return fisher


def _label(label: int, num_options: int, n: int) -> int:
    if not 0 <= label < num_options:
        raise FisherError(f"example {n}: label {label} is out of range for its {num_options} options")
    return label


def weighted_rows(model: Any, examples: list[EncodedExample], labels: Sequence[int], mode: str, rng: random.Random,
                  device: torch.device) -> list[tuple[int, int, float]]:
    """The (example, option, weight) rows of the Fisher sum; p needs every option's ℓ, from one
    batched no-grad pass (labels are checked; only ``empirical`` uses them)."""
    from ..evaluation.scoring import score_encoded

    for n, e in enumerate(examples):
        _label(labels[n], len(e.option_ids), n)
    if mode == "empirical":
        return [(n, labels[n], 1.0) for n in range(len(examples))]
    rows: list[tuple[int, int, float]] = []
    if model_kind(model) == "classifier":
        with torch.no_grad():
            for n, e in enumerate(examples):
                logits = model(input_ids=torch.tensor([e.prompt_ids], device=device)).logits[0].float()
                rows += [(n, k, w) for k, w in option_weights(torch.log_softmax(logits, -1).cpu(), mode, labels[n], rng)]
        return rows
    for n, s in enumerate(score_encoded(model, examples, batch_size=64, device=device)):
        rows += [(n, k, w) for k, w in option_weights(torch.tensor(s.mean_logprobs), mode, labels[n], rng)]
    return rows


def _hooks_fisher(model: Any, examples: list[EncodedExample], labels: Sequence[int], mode: str, rng: random.Random,
                  device: torch.device, bar: Any) -> tuple[dict[str, torch.Tensor], int]:
    from .hooks import hooks_fisher

    if mode == "exact":  # p comes from the gradient pass's own forward: every option is a row
        for n, e in enumerate(examples):
            _label(labels[n], len(e.option_ids), n)
        pairs = [(n, k, 1.0) for n, e in enumerate(examples) for k in range(len(e.option_ids))]
    else:
        pairs = weighted_rows(model, examples, labels, mode, rng, device)
    fisher, missing, count = hooks_fisher(model, examples, pairs, device, bar, exact=mode == "exact")
    if missing:
        if mode == "exact":
            pairs = weighted_rows(model, examples, labels, mode, rng, device)
        logger.info("Fisher: %d parameter(s) outside the layer hooks computed one option at a time (%s)", len(missing),
                    "; ".join(f"{n}: {why}" for n, why in list(missing.items())[:3]))
        fisher.update(rows_loop(model, examples, pairs, device, set(missing)))
    return fisher, count


def rows_loop(model: Any, examples: list[EncodedExample], pairs: Sequence[tuple[int, int, float]], device: torch.device,
              only: set[str]) -> dict[str, torch.Tensor]:
    """Σ_pairs w · (∇ℓ)² of the parameters in `only`, one backward pass per pair (the loop,
    over given rows)."""
    from .offload import squared_grad_hooks

    by_example: dict[int, list[tuple[int, float]]] = {}
    for n, k, w in pairs:
        by_example.setdefault(n, []).append((k, w))
    with squared_grad_hooks(model, only) as sink:
        for n, chosen in by_example.items():
            logliks = option_logliks(model, examples[n], device)
            for j, (k, w) in enumerate(chosen):
                sink.weight = w
                logliks[k].backward(retain_graph=j < len(chosen) - 1)
        return sink.result()


def _vmap_fisher(model: Any, examples: list[EncodedExample], labels: Sequence[int], mode: str, rng: random.Random,
                 device: torch.device, bar: Any) -> tuple[dict[str, torch.Tensor], int]:
    from torch.func import grad, vmap

    pairs = weighted_rows(model, examples, labels, mode, rng, device)
    params = {name: p.detach() for name, p in model.named_parameters()}
    size = sum(p.numel() for p in params.values())
    chunk = max(1, min(VMAP_CHUNK, VMAP_MAX_ELEMENTS // max(size, 1)))
    fisher = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}

    def loglik(params: dict[str, torch.Tensor], ids, mask, labels_, label_mask):
        return pair_loglik(model, params, ids, mask, labels_, label_mask)

    per_pair_grads = vmap(grad(loglik), in_dims=(None, 0, 0, 0, 0))
    done = 0
    for b, batch in enumerate(pair_batches(model, examples, pairs, chunk, device)):
        grads = per_pair_grads(params, batch.input_ids, batch.input_mask, batch.labels, batch.label_mask)
        w = batch.weights
        for name, g in grads.items():
            g = g.float()
            # Σ_pairs w · g² without materialising w · g² for every pair at once.
            fisher[name].add_(torch.einsum("p,p...->...", w, g * g))
        del grads
        # The bar counts examples; a chunk of pairs completes the examples its last pair reaches.
        reached = pairs[min((b + 1) * chunk, len(pairs)) - 1][0] + 1
        bar.update(reached - done)
        done = reached
    bar.update(len(examples) - done)
    return {k: v.cpu() for k, v in fisher.items()}, len(pairs)

