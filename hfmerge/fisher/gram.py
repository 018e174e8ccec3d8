"""Gram matrices of every linear layer's inputs on a task's examples: RegMean's statistics.

For each ``nn.Linear`` of a live model, G = (1/T) Σ_t x_t x_tᵀ (in × in, float32), the sum
over the T non-padding tokens of the layer's inputs x_t as the model runs on the examples, as
in the RegMean reference code (a running mean over the rows the layer saw; that code also
counted padding rows, which are left out here). Each example is run once, with its labelled
option: an encoder-decoder model reads the prompt into the encoder and the option into the
decoder (teacher forcing), a decoder-only model reads prompt + option, a sequence classifier
the prompt.

A layer's input rows are matched to the padding mask of the stream they belong to by their
sequence length: the encoder's (prompt) or the decoder's (option) for encoder-decoder models,
where the decoder batch is padded one position longer whenever the two lengths would be equal
(the extra position is padding, and causal attention keeps it from every real position). An
input without a sequence dimension (a classification head on a pooled vector) counts all its
rows.

Forward pre-hooks see every call, also on modules that accelerate offloads (the hooks run
before accelerate materialises the weights, and only read the inputs). A linear layer whose
weight is shared with a module of another kind (a language-model head tied to the input
embedding) gets no Gram matrix: the tied tensor is not one linear map, and RegMean averages it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import FisherError
from ..evaluation.lm import model_device, pad_id
from ..evaluation.scoring import EncodedExample
from .diagonal import FisherStats
from .loglik import model_kind, pair_batches

# Examples per forward pass.
GRAM_BATCH = 32


def gram_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers that get a Gram matrix, by their weight's parameter name (as
    ``model.named_parameters()`` gives it)."""
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters():
        first_name.setdefault(id(p), name)
    linear_owners: dict[int, int] = {}
    other_owners: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, nn.Linear) and p is module.weight:
                linear_owners[id(p)] = linear_owners.get(id(p), 0) + 1
            else:
                other_owners.add(id(p))
    layers: dict[str, nn.Linear] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = id(module.weight)
            if w in first_name and w not in other_owners and linear_owners.get(w) == 1:
                layers[first_name[w]] = module
    return layers


def gram_statistics(model: Any, examples: Sequence[EncodedExample], labels: Sequence[int], *, device: str | torch.device | None = None,
                    progress: bool = False, desc: str = "Gram", stats: list[FisherStats] | None = None,
                    batch_size: int = GRAM_BATCH) -> dict[str, torch.Tensor]:
    """The Gram matrix of every linear layer's inputs, keyed by the layer's weight name.

    Args:
        model: An encoder-decoder LM, decoder-only LM or sequence classifier (its parameters
            may be offloaded by an accelerate device map). Put in ``eval()`` mode for the
            passes (dropout off), restored after.
        examples: Tokenised examples (`hfmerge.evaluation.scoring.encode_examples`).
        labels: Per example, the index of the option that is run.
        device: Where inputs go (default: the model's execution device).
        progress: Show a progress bar.
        desc: The progress bar's label.
        stats: If given, a `FisherStats` is appended (``num_gradients`` counts the passes' rows).
        batch_size: Examples per forward pass.

    Returns:
        Weight name → (1/T) Σ_t x_t x_tᵀ, float32 on the CPU; layers that no pass reached are
        left out.

    Raises:
        FisherError: No examples, a label out of range.
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    if not examples:
        raise FisherError("no examples to compute the Gram matrices on")
    if len(labels) != len(examples):
        raise FisherError(f"{len(labels)} labels for {len(examples)} examples")
    for n, (e, label) in enumerate(zip(examples, labels)):
        if not 0 <= label < len(e.option_ids):
            raise FisherError(f"example {n}: label {label} is out of range for its {len(e.option_ids)} options")
    kind = model_kind(model)
    dev = model_device(model, device)
    layers = gram_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    masks: dict[int, torch.Tensor] = {}  # sequence length -> [batch, length] real-token mask
    current = {"rows": 0}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0].detach()
            rows = current["rows"]
            if x.dim() >= 3 and x.shape[0] == rows and x.shape[1] in masks:
                x = x[masks[x.shape[1]].to(x.device)]
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
                counts[name] = 0
            buf = sums[name]
            buf.addmm_(x.t().to(buf.device), x.to(buf.device))
            counts[name] += x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc=desc, unit="ex", disable=not progress, leave=False)
    rows_done = 0
    try:
        pairs = [(n, int(labels[n]), 1.0) for n in range(len(examples))]
        with torch.no_grad():
            for batch in pair_batches(model, examples, pairs, batch_size, dev):
                current["rows"] = batch.input_ids.shape[0]
                masks.clear()
                _run(model, kind, batch, masks)
                rows_done += current["rows"]
                bar.update(current["rows"])
    finally:
        bar.close()
        for h in handles:
            h.remove()
        model.train(was_training)
    grams = {name: (sums[name] / counts[name]).cpu() for name in sums if counts[name] > 0}
    if stats is not None:
        stats.append(FisherStats(len(examples), rows_done, "gram", time.perf_counter() - start))
    return grams


def _run(model: Any, kind: str, batch: Any, masks: dict[int, torch.Tensor]) -> None:
    """One forward pass of `batch`, with `masks` set for the hooks (by sequence length)."""
    from ..evaluation.lm import decoder_start_id

    if kind == "encoder-decoder":
        labels, label_mask = batch.labels, batch.label_mask
        if labels.shape[1] == batch.input_ids.shape[1]:  # keep the two streams' lengths apart
            labels = torch.cat([labels, torch.full_like(labels[:, :1], pad_id(model))], dim=1)
            label_mask = torch.cat([label_mask, torch.zeros_like(label_mask[:, :1])], dim=1)
        masks[batch.input_ids.shape[1]] = batch.input_mask.bool()
        masks[labels.shape[1]] = label_mask.bool()
        decoder_input = torch.cat([torch.full_like(labels[:, :1], decoder_start_id(model)), labels[:, :-1]], dim=1)
        model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long(), decoder_input_ids=decoder_input, use_cache=False)
        return
    masks[batch.input_ids.shape[1]] = batch.input_mask.bool()
    if kind == "classifier":
        model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long())
    else:
        model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long(), use_cache=False)
