"""Greedy generation: score a task by the text the model writes (``output_type: generate_until``).

Each prompt is continued by greedy decoding (the most likely token at every step; no sampling,
one beam) for at most ``max_gen_toks`` new tokens, stopping at the model's EOS. The new tokens
are decoded without special tokens, the text is cut at the first occurrence of any ``until``
string, as lm-evaluation-harness does, and stripped of surrounding whitespace
(`postprocess_generation`). The metrics then compare that text with the reference answer.

* Encoder-decoder models (T5): the prompt is the encoder input, tokenised with the tokenizer's
  special tokens (T5 appends EOS); the decoder starts from ``decoder_start_token_id``.
* Decoder-only models: the prompt is tokenised with the tokenizer's special tokens (Llama's
  BOS) and continued; it is left-padded in a batch so that every row's new tokens start at
  the same column. A prompt too long for the model's positions loses tokens on the left so
  that ``max_gen_toks`` new tokens still fit.

Prompts are sorted by length (longest first) and generated ``batch_size`` at a time with
`model.generate(do_sample=False, num_beams=1, max_new_tokens=max_gen_toks)` and an attention
mask; a batch stops early once every row has reached EOS or holds a stop string (greedy
decoding is the same with or without the early stop, since each row's text is cut at its
first stop string anyway). The model's own ``generation_config`` supplies the token ids (EOS,
padding, decoder start) and is otherwise used as ``model.generate`` uses it, as in
lm-evaluation-harness and FusionBench. The tests hold the batched texts equal to a
one-prompt-at-a-time `model.generate` loop on tiny T5, T5 v1.1, GPT-2 and Llama models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .lm import is_encoder_decoder, max_positions, model_device, pad_rows, progress_bar
from .tasks import DEFAULT_MAX_GEN_TOKS, DEFAULT_UNTIL

__all__ = ["DEFAULT_UNTIL", "DEFAULT_MAX_GEN_TOKS", "encode_prompts", "generate_encoded", "generate_texts", "postprocess_generation"]


def postprocess_generation(text: str, until: Sequence[str] = ()) -> str:
    """The answer in a generated text: cut at the first occurrence of any stop string, stripped.

    As in lm-evaluation-harness, the text is cut at each stop string in turn (so the earliest
    occurrence of any of them wins). Surrounding whitespace is then stripped: FusionBench
    compares decoded text, from which T5's tokenizer drops the leading space, and many harness
    tasks remove it with a filter; a decoder-only model's answer usually starts with a space.

    Args:
        text: The decoded new tokens.
        until: Stop strings; empty strings are ignored.

    Returns:
        The answer text.
    """
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the model's EOS (its generation config's, else its
    config's; one id or several, as Llama 3 has) and the tokenizer's EOS, as the harness stops
    at both."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None)
    value = getattr(generation_config, "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    for v in ([] if value is None else value if isinstance(value, (list, tuple)) else [value]) + [getattr(tokenizer, "eos_token_id", None)]:
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


def _pad_token(model: Any, tokenizer: Any, eos: list[int]) -> int:
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(getattr(model, "generation_config", None), "pad_token_id", None),
                  getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    return eos[0] if eos else 0  # GPT-2 has no pad token; padded positions are masked anyway


def encode_prompts(tokenizer: Any, prompts: Sequence[str], *, encoder_decoder: bool, max_gen_toks: int,
                   max_length: int | None = None, bos_token_id: int | None = None) -> list[tuple[int, ...]]:
    """Tokenise prompts for generation (once; a search generates from the same prompts many times).

    Args:
        tokenizer: A `transformers` tokenizer.
        prompts: The rendered prompts.
        encoder_decoder: Tokenise for an encoder-decoder model (else decoder-only).
        max_gen_toks: The most new tokens; decoder-only prompts are cut on the left to leave
            room for them within `max_length`.
        max_length: The model's maximum sequence length (decoder-only) or encoder input
            length (encoder-decoder), if any.
        bos_token_id: Decoder-only: the token an empty prompt becomes (default: the
            tokenizer's BOS, else its EOS).

    Returns:
        One tuple of token ids per prompt.

    Raises:
        ValueError: `max_gen_toks` leaves no room for a prompt in `max_length` positions, or an
            empty prompt with no BOS or EOS token to stand for it.
    """
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be at least 1, got {max_gen_toks}")
    ids = [list(r) for r in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]] if prompts else []
    out = []
    if encoder_decoder:
        for p in ids:
            if max_length is not None and len(p) > max_length:
                p = p[: max_length - 1] + p[-1:]  # keep the closing special token (T5's EOS), as rank classification does
            out.append(tuple(p))
        return out
    room = None
    if max_length is not None:
        room = max_length - max_gen_toks
        if room < 1:
            raise ValueError(f"max_gen_toks {max_gen_toks} leaves no room for the prompt in the model's {max_length} positions; lower max_gen_toks")
    start = bos_token_id if bos_token_id is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    for p in ids:
        if not p:
            if start is None:
                raise ValueError("an empty prompt needs a BOS or EOS token to start from; the tokenizer has neither")
            p = [start]
        if room is not None and len(p) > room:
            p = p[-room:]  # the harness keeps the end of the context
        out.append(tuple(p))
    return out


class _StopOnStrings:
    """A `transformers` stopping criterion: a row is done once its new text holds a stop string.

    Only an early exit: the text is cut at its first stop string afterwards in any case.
    """

    def __init__(self, tokenizer: Any, until: Sequence[str], start: int) -> None:
        self.tokenizer = tokenizer
        self.until = [s for s in until if s]
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.until) for t in texts], dtype=torch.bool, device=input_ids.device)


def _decode_new(tokenizer: Any, rows: torch.Tensor, eos: list[int]) -> list[str]:
    """Decode generated tokens up to (not including) each row's first EOS."""
    texts = []
    stop = set(eos)
    for row in rows.tolist():
        cut = next((k for k, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def generate_encoded(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                     until: Sequence[str] = DEFAULT_UNTIL, batch_size: int = 32, device: str | torch.device | None = None,
                     progress: bool = False, desc: str = "generating") -> list[str]:
    """Greedy generation from tokenised prompts, batched.

    Args:
        model: A `transformers` encoder-decoder or causal LM (already on `device`).
        tokenizer: Its tokenizer (decodes the new tokens).
        prompt_ids: From `encode_prompts` (with the same kind of model).
        max_gen_toks: The most new tokens per prompt.
        until: Stop strings: the text is cut at the first one.
        batch_size: Prompts per `generate` call.
        device: Where inputs go (default: the model's device).
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        Per prompt, the answer text (see `postprocess_generation`).

    Raises:
        ValueError: `batch_size` or `max_gen_toks` < 1, or an empty prompt.
    """
    from transformers import StoppingCriteriaList

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be at least 1, got {max_gen_toks}")
    prompts = [list(p) for p in prompt_ids]
    if any(not p for p in prompts):
        raise ValueError("a prompt has no tokens; encode prompts with encode_prompts")
    if not prompts:
        return []
    device = model_device(model, device)
    encoder_decoder = is_encoder_decoder(model)
    eos = _eos_ids(model, tokenizer)
    pad = _pad_token(model, tokenizer, eos)
    settings: dict[str, Any] = {"do_sample": False, "num_beams": 1, "max_new_tokens": max_gen_toks, "pad_token_id": pad}
    if eos:
        settings["eos_token_id"] = eos
    results: list[str] = [""] * len(prompts)
    # Longest prompts first: little padding per batch, and an out-of-memory error comes at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    was_training = model.training
    model.eval()  # dropout off: generation is deterministic
    try:
        with torch.inference_mode(), progress_bar(len(prompts), progress, desc) as bar:
            for b in range(0, len(order), batch_size):
                chunk = order[b: b + batch_size]
                # Decoder-only rows are left-padded so every row continues at the last column;
                # encoder inputs are right-padded. The attention mask hides the padding.
                input_ids, attention = pad_rows([prompts[i] for i in chunk], pad, device, left=not encoder_decoder)
                start = 1 if encoder_decoder else input_ids.shape[1]  # the decoder start token / the prompt
                criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, until, start)]) if any(until) else None
                out = model.generate(input_ids=input_ids, attention_mask=attention.long(), stopping_criteria=criteria, **settings)
                texts = _decode_new(tokenizer, out[:, start:], eos)
                for i, text in zip(chunk, texts):
                    results[i] = postprocess_generation(text, until)
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                   until: Sequence[str] = DEFAULT_UNTIL, batch_size: int = 32, device: str | torch.device | None = None,
                   progress: bool = False) -> list[str]:
    """Greedy answers to prompts (batched): tokenise with `encode_prompts`, then `generate_encoded`.

    Args:
        model: A `transformers` encoder-decoder or causal LM, already on `device`.
        tokenizer: Its tokenizer.
        prompts: The prompts' texts.
        max_gen_toks: The most new tokens per prompt.
        until: Stop strings: the text is cut at the first one.
        batch_size: Prompts per `generate` call.
        device: Where inputs go (default: the model's device).
        progress: Show a progress bar.

    Returns:
        Per prompt, the answer text: new tokens decoded without special tokens, cut at the first
        stop string and stripped.

    Raises:
        ValueError: See `encode_prompts` and `generate_encoded`.
    """
    encoded = encode_prompts(tokenizer, prompts, encoder_decoder=is_encoder_decoder(model), max_gen_toks=max_gen_toks,
                             max_length=max_positions(model.config))
    return generate_encoded(model, tokenizer, encoded, max_gen_toks=max_gen_toks, until=until, batch_size=batch_size,
                            device=device, progress=progress)
