"""Small helpers about language models and their inputs, shared by scoring, generation and the
Fisher engine: where a model runs, how long its inputs may be, which tokens start and pad its
sequences, and the padded batches and token log-probabilities both scoring and Fisher compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["decoder_start_id", "eos_id", "is_encoder_decoder", "max_positions", "model_device", "pad_id", "pad_rows",
           "progress_bar", "token_logprobs"]


def is_encoder_decoder(model: Any) -> bool:
    """Whether `model` is an encoder-decoder (T5, BART, ...) rather than a decoder-only LM."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def max_positions(config: Any) -> int | None:
    """The longest input the model's position embeddings allow, or None when its config says not.

    Args:
        config: A transformers config.

    Returns:
        The first positive value among the config keys architectures use for it, else None.
    """
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_id(tokenizer: Any, model: Any) -> int | None:
    """The end-of-sequence token appended to encoder-decoder options.

    Args:
        tokenizer: The model's tokenizer.
        model: The model (its config is the fallback).

    Returns:
        The tokenizer's EOS id, else the config's (the first one where the config lists several),
        else None.
    """
    eos = tokenizer.eos_token_id if getattr(tokenizer, "eos_token_id", None) is not None else getattr(model.config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list) else eos


def decoder_start_id(model: Any) -> int:
    """The token an encoder-decoder's decoder input starts with (config, else generation config).

    Raises:
        ValueError: Neither names a ``decoder_start_token_id``.
    """
    for source in (model.config, getattr(model, "generation_config", None)):
        value = getattr(source, "decoder_start_token_id", None)
        if value is not None:
            return int(value)
    raise ValueError("the model's config has no decoder_start_token_id, which the decoder input starts with")


def pad_id(model: Any) -> int:
    """The config's padding token, 0 when it has none (padded positions are masked anyway)."""
    pad = getattr(model.config, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def model_device(model: Any, device: str | torch.device | None = None) -> torch.device:
    """The device to put a model's inputs on: `device` when given, else that of its first
    parameter not on the meta device (accelerate offloads some to meta), else the CPU."""
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def pad_rows(rows: Sequence[Sequence[int]], value: int, device: torch.device, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded to one length.

    Args:
        rows: Token ids per row.
        value: The padding id.
        device: Where the tensors go.
        left: Pad on the left (decoder-only batches), else on the right.

    Returns:
        (ids, mask), both [rows, longest row]; mask is True on real tokens.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            if left:
                ids[i, width - len(r):] = torch.tensor(r)
                mask[i, width - len(r):] = True
            else:
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, in float32: target logit minus logsumexp of the row."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm bar over `total` examples, silent unless `enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)
