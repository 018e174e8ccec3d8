"""Differentiable option log-likelihoods: the quantity whose gradients the Fisher squares.

For an example with options y_1 .. y_K, ℓ_k is the length-normalised log-likelihood of option
k (the mean log-probability of its tokens, EOS counted for encoder-decoder models), exactly
the score rank classification ranks options by (`hfmerge.evaluation.scoring`). The model's
predictive distribution over the options is p = softmax(ℓ).

Three kinds of model are supported:

* encoder-decoder LMs (T5): the encoder runs once per example, the K options go through the
  decoder as one batch;
* decoder-only LMs: the K rows prompt+option, right-padded (causal attention keeps padding
  from reaching real positions);
* sequence classifiers (BERT-style ``...ForSequenceClassification``): ℓ_k is the log-softmax
  of the classifier's logits, one class per option.

`pair_loglik` is the same quantity for one (example, option) pair written for
`torch.func.vmap`: padded inputs and a ready 4-D attention mask (a 2-D mask makes
transformers' mask utilities branch on data, which vmap cannot trace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..evaluation.lm import decoder_start_id, is_encoder_decoder, pad_id, pad_rows, token_logprobs
from ..evaluation.scoring import EncodedExample

__all__ = ["ModelKind", "model_kind", "option_logliks", "PairBatch", "pair_batches", "pair_loglik", "batch_logliks"]


def is_sequence_classifier(model: Any) -> bool:
    """Whether `model` is a ``...ForSequenceClassification`` model (options are its classes)."""
    return type(model).__name__.endswith("ForSequenceClassification")


ModelKind = str  # "encoder-decoder", "decoder-only" or "classifier"


def model_kind(model: Any) -> ModelKind:
    """Which of the three supported kinds `model` is."""
    if is_sequence_classifier(model):
        return "classifier"
    return "encoder-decoder" if is_encoder_decoder(model) else "decoder-only"


def _masked_mean(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where rather than a product: padded positions may hold -inf.
    summed = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(dim=-1)
    return summed / mask.sum(dim=-1).clamp(min=1)


def option_logliks(model: Any, example: EncodedExample, device: torch.device) -> torch.Tensor:
    """ℓ_k for every option of one example, with the autograd graph (shape [K], float32).

    Args:
        model: The model, in ``eval()`` mode.
        example: One tokenised example (`scoring.encode_examples`; for a classifier only
            ``prompt_ids`` is used and the options are the classes).
        device: Where inputs go.
    """
    kind = model_kind(model)
    if kind == "classifier":
        ids = torch.tensor([example.prompt_ids], dtype=torch.long, device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)
    pad = pad_id(model)
    if kind == "encoder-decoder":
        ids = torch.tensor([example.prompt_ids], dtype=torch.long, device=device)
        attention = torch.ones_like(ids)
        hidden = model.get_encoder()(input_ids=ids, attention_mask=attention).last_hidden_state
        k = len(example.option_ids)
        labels, label_mask = pad_rows(example.option_ids, pad, device)
        decoder_input = torch.cat([torch.full_like(labels[:, :1], decoder_start_id(model)), labels[:, :-1]], dim=1)
        from transformers.modeling_outputs import BaseModelOutput

        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.expand(k, -1, -1)), attention_mask=attention.expand(k, -1),
                    decoder_input_ids=decoder_input, use_cache=False)
        return _masked_mean(token_logprobs(out.logits, labels), label_mask)
    # Decoder-only: row k is context_k + option_k; the logits at position t predict token t + 1.
    contexts = example.contexts or tuple(example.prompt_ids for _ in example.option_ids)
    rows = [tuple(c) + tuple(o) for c, o in zip(contexts, example.option_ids)]
    ids, real = pad_rows(rows, pad, device)
    logits = model(input_ids=ids, attention_mask=real.long(), use_cache=False).logits
    positions = torch.arange(ids.shape[1] - 1, device=device)
    starts = torch.tensor([len(c) for c in contexts], device=device)
    ends = torch.tensor([len(r) for r in rows], device=device)
    # Target index t + 1 belongs to the option when start <= t + 1 < end.
    mask = (positions.unsqueeze(0) + 1 >= starts.unsqueeze(1)) & (positions.unsqueeze(0) + 1 < ends.unsqueeze(1))
    return _masked_mean(token_logprobs(logits[:, :-1, :], ids[:, 1:]), mask)


# --------------------------------------------------------------------------------------------
# One (example, option) pair at a time, for torch.func.vmap
# --------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """(example, option) pairs padded to common shapes, for vmap over the first dimension.

    Attributes:
        input_ids, input_mask: Encoder input (encoder-decoder) or prompt+option row
            (decoder-only), right-padded.
        labels, label_mask: Encoder-decoder: the option's tokens. Decoder-only: the next
            token at each position and whether it belongs to the option.
        weights: The pair's weight in the Fisher (p_k, or 1 for the chosen option).
    """

    input_ids: torch.Tensor
    input_mask: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor
    weights: torch.Tensor


def pair_batches(model: Any, examples: Sequence[EncodedExample], pairs: Sequence[tuple[int, int, float]], chunk: int,
                 device: torch.device) -> list[PairBatch]:
    """Pack weighted (example index, option index, weight) pairs into padded chunks."""
    kind = model_kind(model)
    pad = pad_id(model)
    out = []
    for b in range(0, len(pairs), chunk):
        part = pairs[b: b + chunk]
        weights = torch.tensor([w for _, _, w in part], dtype=torch.float32, device=device)
        if kind == "encoder-decoder":
            ids, mask = pad_rows([examples[i].prompt_ids for i, _, _ in part], pad, device)
            labels, label_mask = pad_rows([examples[i].option_ids[k] for i, k, _ in part], pad, device)
        elif kind == "decoder-only":
            rows, starts = [], []
            for i, k, _ in part:
                e = examples[i]
                context = (e.contexts or tuple(e.prompt_ids for _ in e.option_ids))[k]
                rows.append(tuple(context) + tuple(e.option_ids[k]))
                starts.append(len(context))
            ids, mask = pad_rows(rows, pad, device)
            labels = ids[:, 1:]
            positions = torch.arange(ids.shape[1] - 1, device=device).unsqueeze(0) + 1
            ends = mask.sum(dim=1, keepdim=True)
            label_mask = (positions >= torch.tensor(starts, device=device).unsqueeze(1)) & (positions < ends)
        else:  # classifier: the row's option is a class index
            ids, mask = pad_rows([examples[i].prompt_ids for i, _, _ in part], pad, device)
            labels = torch.tensor([[k] for _, k, _ in part], dtype=torch.long, device=device)
            label_mask = torch.ones_like(labels, dtype=torch.bool)
        out.append(PairBatch(ids, mask, labels, label_mask, weights))
    return out


def batch_logliks(model: Any, batch: PairBatch) -> torch.Tensor:
    """ℓ of every (example, option) row of `batch` in one ordinary batched forward pass ([R])."""
    kind = model_kind(model)
    if kind == "classifier":
        logits = model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long()).logits
        return torch.log_softmax(logits.float(), dim=-1).gather(1, batch.labels).squeeze(1)
    if kind == "encoder-decoder":
        decoder_input = torch.cat([torch.full_like(batch.labels[:, :1], decoder_start_id(model)), batch.labels[:, :-1]], dim=1)
        out = model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long(), decoder_input_ids=decoder_input, use_cache=False)
        return _masked_mean(token_logprobs(out.logits, batch.labels), batch.label_mask)
    out = model(input_ids=batch.input_ids, attention_mask=batch.input_mask.long(), use_cache=False)
    return _masked_mean(token_logprobs(out.logits[:, :-1], batch.labels), batch.label_mask)


def pair_loglik(model: Any, params: dict[str, torch.Tensor], input_ids: torch.Tensor, input_mask: torch.Tensor,
                labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """ℓ of one (example, option) pair as a function of `params` (inputs without batch dim)."""
    from torch.func import functional_call

    ids = input_ids.unsqueeze(0)
    if is_encoder_decoder(model):
        lab = labels.unsqueeze(0)
        # A ready 4-D mask (batch, heads, query, key): padding keys are hidden from every query.
        mask4 = input_mask[None, None, None, :]
        decoder_input = torch.cat([torch.full_like(lab[:, :1], decoder_start_id(model)), lab[:, :-1]], dim=1)
        out = functional_call(model, params, (), {"input_ids": ids, "attention_mask": mask4, "decoder_input_ids": decoder_input, "use_cache": False})
        return _masked_mean(token_logprobs(out.logits[0], labels), label_mask)
    # Decoder-only, right-padded: causal attention alone keeps padding away from real tokens.
    out = functional_call(model, params, (), {"input_ids": ids, "use_cache": False})
    return _masked_mean(token_logprobs(out.logits[0, :-1], labels), label_mask)
