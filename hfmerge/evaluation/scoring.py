"""Rank classification: score every answer option by its log-likelihood under the model.

The score of option ``y`` for prompt ``x`` is its length-normalised log-likelihood

    score(y | x) = (1 / |y|) * sum_t log p(y_t | x, y_<t)

over the option's tokens ``y_1 .. y_|y|``, and the prediction is the best-scoring option. This
is how the DF-Merge paper and its reference code score T5 (and how T0 / T-Few evaluate).

* Encoder-decoder models (T5): the option is tokenised without special tokens and EOS is
  appended, so EOS is one of the scored tokens (it tells "yes" from "yes, but ..."). The
  encoder runs once per example; its output is reused for every option. The decoder input is
  the option shifted right behind ``decoder_start_token_id``, as in training.
* Decoder-only models: the option is the continuation ``target_delimiter + option`` of the
  prompt, and only its tokens are scored; EOS is not appended (as in lm-evaluation-harness:
  the option is a continuation of running text, not the end of a document). Prompt and
  prompt+option are tokenised the harness's way: the continuation's tokens are the tokens of
  prompt+option after the prompt's own tokens, so a tokenizer that merges across the boundary
  still sees the text it was trained on. Sequences are left-padded with explicit position ids
  so only the last ``max option length + 1`` positions need logits.

Both paths batch (example, option) pairs, pad options to the longest in the batch and mask
padded positions out of both the sum and the count, and compute log-probabilities in float32
whatever the model's dtype. `score_options_naive` is the one-example, one-option reference
loop, built on the model's own training loss; the tests hold the two equal to 1e-5.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .lm import decoder_start_id, eos_id, is_encoder_decoder, max_positions, model_device, pad_id, pad_rows, progress_bar, token_logprobs

__all__ = ["OptionScores", "EncodedExample", "encode_examples", "score_encoded", "score_options", "score_options_naive"]


class _HasPromptAndOptions(Protocol):
    prompt: str
    options: Sequence[str]


@dataclass(frozen=True)
class OptionScores:
    """The log-likelihoods of one example's options.

    Attributes:
        logprob_sums: Per option, the sum of its tokens' log-probabilities.
        num_tokens: Per option, how many tokens were scored (EOS included for encoder-decoder).
    """

    logprob_sums: tuple[float, ...]
    num_tokens: tuple[int, ...]

    @property
    def mean_logprobs(self) -> tuple[float, ...]:
        """The length-normalised scores: sum / number of tokens, per option."""
        return tuple(s / n for s, n in zip(self.logprob_sums, self.num_tokens))

    def normalized(self, normalization: str = "token", options: Sequence[str] | None = None) -> tuple[float, ...]:
        """Scores under a normalisation.

        Args:
            normalization: ``token`` (mean over tokens; the default and the paper's), ``none``
                (the plain sum, the harness's ``acc``) or ``char`` (sum over the option's
                length in characters, the harness's ``acc_norm``).
            options: The options' texts (needed for ``char``).

        Returns:
            One score per option.

        Raises:
            ValueError: Unknown normalisation, or ``char`` without `options`.
        """
        if normalization == "token":
            return self.mean_logprobs
        if normalization == "none":
            return self.logprob_sums
        if normalization == "char":
            if options is None:
                raise ValueError("normalization 'char' needs the options' texts")
            return tuple(s / max(len(o), 1) for s, o in zip(self.logprob_sums, options))
        raise ValueError(f"unknown normalization {normalization!r}; expected token, none or char")

    def best(self, normalization: str = "token", options: Sequence[str] | None = None) -> int:
        """The index of the best option (the first one on a tie)."""
        scores = self.normalized(normalization, options)
        return max(range(len(scores)), key=lambda j: (scores[j], -j))


@dataclass(frozen=True)
class EncodedExample:
    """One example as token ids.

    Attributes:
        prompt_ids: Encoder-decoder: the encoder input. Decoder-only: the prompt's tokens.
        option_ids: Per option, the tokens that are scored.
        contexts: Decoder-only: per option, the tokens fed before the option's tokens (the
            prompt's tokens as found in prompt+option, truncated on the left to fit the
            model). None for encoder-decoder models.
    """

    prompt_ids: tuple[int, ...]
    option_ids: tuple[tuple[int, ...], ...]
    contexts: tuple[tuple[int, ...], ...] | None = None


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return list(tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"])


def encode_examples(tokenizer: Any, examples: Sequence[_HasPromptAndOptions], *, encoder_decoder: bool,
                    target_delimiter: str = " ", eos_token_id: int | None = None,
                    bos_token_id: int | None = None, max_length: int | None = None) -> list[EncodedExample]:
    """Tokenise examples for scoring (once; a search scores the same examples many times).

    Args:
        tokenizer: A `transformers` tokenizer.
        examples: Objects with ``prompt`` and ``options`` (e.g. `tasks.Example`).
        encoder_decoder: Tokenise for an encoder-decoder model (else decoder-only).
        target_delimiter: Decoder-only: the text put between prompt and option.
        eos_token_id: Encoder-decoder: appended to every option (default: the tokenizer's).
        bos_token_id: Decoder-only: the context used when a prompt has no tokens (default:
            the tokenizer's BOS, else its EOS, as the harness does).
        max_length: Decoder-only: the model's maximum sequence length; longer prompts lose
            tokens on the left. Encoder-decoder: the encoder's maximum input length, if any.

    Returns:
        One `EncodedExample` per example.

    Raises:
        ValueError: No EOS token for an encoder-decoder model, an option with no tokens, or an
            option longer than the model's maximum length.
    """
    if encoder_decoder:
        eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token, which encoder-decoder rank classification scores after each option")
        prompts = _ids(tokenizer, [e.prompt for e in examples], True)
        flat = _ids(tokenizer, [o for e in examples for o in e.options], False)
        out, k = [], 0
        for e, p in zip(examples, prompts):
            if max_length is not None and len(p) > max_length:
                p = p[: max_length - 1] + p[-1:]  # keep the closing special token (T5's EOS)
            options = []
            for _ in e.options:
                ids = list(flat[k])
                k += 1
                if not ids or ids[-1] != eos:
                    ids.append(eos)
                options.append(tuple(ids))
            out.append(EncodedExample(tuple(p), tuple(options)))
        return out

    # Decoder-only, the harness's way: trailing whitespace of the prompt moves to the
    # continuation (a tokenizer attaches a space to the following word), and the
    # continuation's tokens are those of prompt+option after the prompt's own tokens.
    contexts, continuations = [], []
    for e in examples:
        context = e.prompt
        stripped = context.rstrip()
        spaces = context[len(stripped):]
        contexts.append(stripped)
        continuations.append([spaces + target_delimiter + o for o in e.options])
    context_ids = _ids(tokenizer, contexts, True)
    whole_ids = _ids(tokenizer, [c + cont for c, conts in zip(contexts, continuations) for cont in conts], True)
    start = bos_token_id if bos_token_id is not None else (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id)
    out, k = [], 0
    for e, ctx in zip(examples, context_ids):
        options, ctxs = [], []
        for option in e.options:
            whole = list(whole_ids[k])
            k += 1
            n_ctx = len(ctx)
            cont = whole[n_ctx:]
            prefix = whole[:n_ctx]
            if not cont:
                raise ValueError(f"option {option!r} has no tokens after the prompt {e.prompt[-40:]!r}")
            if not prefix:
                # Nothing to condition the first option token on: start from BOS/EOS.
                if start is None:
                    raise ValueError("an empty prompt needs a BOS or EOS token to condition on; the tokenizer has neither")
                prefix = [start]
            if max_length is not None and len(prefix) + len(cont) > max_length:
                keep = max_length - len(cont)
                if keep < 1:
                    raise ValueError(f"option {option!r} has {len(cont)} tokens, more than the model's {max_length} positions allow")
                prefix = prefix[-keep:]
            options.append(tuple(cont))
            ctxs.append(tuple(prefix))
        out.append(EncodedExample(tuple(ctx), tuple(options), tuple(ctxs)))
    return out


# --------------------------------------------------------------------------------------------
# Batched scoring
# --------------------------------------------------------------------------------------------


def _masked_sums(logprobs: torch.Tensor, mask: torch.Tensor) -> tuple[list[float], list[int]]:
    # torch.where, not multiplication: a padded position may hold -inf or NaN (a left-padded
    # row's padding attends to nothing), and 0 * NaN is NaN.
    summed = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(dim=1, dtype=torch.float64)
    return summed.tolist(), mask.sum(dim=1).tolist()


def _chunks(order: list[int], sizes: Sequence[int], budget: int) -> Iterator[list[int]]:
    """Consecutive groups of `order` whose `sizes` add up to at most `budget` (at least one)."""
    chunk: list[int] = []
    total = 0
    for i in order:
        if chunk and total + sizes[i] > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += sizes[i]
    if chunk:
        yield chunk


def _score_encoder_decoder(model: Any, encoded: list[EncodedExample], batch_size: int, device: torch.device, bar) -> list[tuple[list[float], list[int]]]:
    from transformers.modeling_outputs import BaseModelOutput

    start, pad = decoder_start_id(model), pad_id(model)
    encoder = model.get_encoder()
    results: list[Any] = [None] * len(encoded)
    # Longest prompts first: little padding per batch, and an out-of-memory error comes at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].prompt_ids))
    sizes = [len(e.option_ids) for e in encoded]
    for chunk in _chunks(order, sizes, batch_size):
        input_ids, attention = pad_rows([encoded[i].prompt_ids for i in chunk], pad, device)
        # The encoder runs once per example; every option of the example reuses its output.
        hidden = encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
        pairs = [(c, j) for c, i in enumerate(chunk) for j in range(sizes[i])]
        sums: dict[int, list[float]] = {c: [] for c in range(len(chunk))}
        counts: dict[int, list[int]] = {c: [] for c in range(len(chunk))}
        for b in range(0, len(pairs), batch_size):
            batch = pairs[b: b + batch_size]
            owner = torch.tensor([c for c, _ in batch], device=device)
            labels, label_mask = pad_rows([encoded[chunk[c]].option_ids[j] for c, j in batch], pad, device)
            # Teacher forcing: the decoder sees the option shifted right behind the start token.
            # Padded label positions come after every real one, and the decoder is causal, so
            # they cannot change the real positions' outputs; they are masked out below.
            decoder_input = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
            out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden.index_select(0, owner)),
                        attention_mask=attention.index_select(0, owner), decoder_input_ids=decoder_input, use_cache=False)
            s, n = _masked_sums(token_logprobs(out.logits, labels), label_mask)
            for (c, _), si, ni in zip(batch, s, n):
                sums[c].append(si)
                counts[c].append(ni)
        for c, i in enumerate(chunk):
            results[i] = (sums[c], counts[c])
        bar.update(len(chunk))
    return results


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _score_decoder_only(model: Any, encoded: list[EncodedExample], batch_size: int, device: torch.device, bar) -> list[tuple[list[float], list[int]]]:
    pad = pad_id(model)
    pairs = [(i, j) for i, e in enumerate(encoded) for j in range(len(e.option_ids))]
    length = {(i, j): len(encoded[i].contexts[j]) + len(encoded[i].option_ids[j]) for i, j in pairs}  # type: ignore[index]
    pairs.sort(key=lambda p: -length[p])
    keep_logits = _accepts(model, "logits_to_keep")
    # Models with position embeddings take position_ids; ALiBi models (BLOOM, MPT) take none and
    # derive what they need from the attention mask.
    pass_positions = _accepts(model, "position_ids")
    sums = [[0.0] * len(e.option_ids) for e in encoded]
    counts = [[0] * len(e.option_ids) for e in encoded]
    done_options = [0] * len(encoded)
    for b in range(0, len(pairs), batch_size):
        batch = pairs[b: b + batch_size]
        rows = [encoded[i].contexts[j] + encoded[i].option_ids[j] for i, j in batch]  # type: ignore[index]
        cont_len = torch.tensor([len(encoded[i].option_ids[j]) for i, j in batch], device=device)
        # Left padding puts every option at the end of its row, so the logits needed are those
        # of the last (longest option + 1) positions. Position ids count real tokens only, so a
        # padded row sees the same positions as it would alone.
        input_ids, attention = pad_rows(rows, pad, device, left=True)
        position_ids = (attention.long().cumsum(dim=1) - 1).clamp(min=0)
        window = int(cont_len.max()) + 1
        kwargs: dict[str, Any] = {"logits_to_keep": window} if keep_logits else {}
        if pass_positions:
            kwargs["position_ids"] = position_ids
        logits = model(input_ids=input_ids, attention_mask=attention.long(), use_cache=False, **kwargs).logits
        logits = logits[:, -window:, :]
        # Window position w holds the logits of absolute position T - window + w, which predict
        # the token at T - window + w + 1.
        targets = input_ids[:, input_ids.shape[1] - window + 1:]
        steps = torch.arange(window - 1, device=device)
        mask = steps.unsqueeze(0) >= (window - 1 - cont_len).unsqueeze(1)
        s, n = _masked_sums(token_logprobs(logits[:, :-1, :], targets), mask)
        for (i, j), si, ni in zip(batch, s, n):
            sums[i][j] = si
            counts[i][j] = ni
            done_options[i] += 1
            if done_options[i] == len(encoded[i].option_ids):
                bar.update(1)
    return list(zip(sums, counts))


def score_encoded(model: Any, encoded: Sequence[EncodedExample], batch_size: int = 32, device: str | torch.device | None = None,
                  progress: bool = False, desc: str = "scoring") -> list[OptionScores]:
    """Score tokenised examples with batched rank classification.

    Args:
        model: A `transformers` encoder-decoder or causal LM (already on `device`).
        encoded: From `encode_examples` (with the same kind of model).
        batch_size: (example, option) pairs per forward pass.
        device: Where inputs go (default: the model's device).
        progress: Show a progress bar.
        desc: The progress bar's label.

    Returns:
        Per example, its options' log-likelihood sums and token counts.

    Raises:
        ValueError: `batch_size` < 1, or the model lacks a token id the scoring needs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoded = list(encoded)
    if not encoded:
        return []
    device = model_device(model, device)
    was_training = model.training
    model.eval()  # dropout off: scores are deterministic
    try:
        with torch.inference_mode(), progress_bar(len(encoded), progress, desc) as bar:
            if is_encoder_decoder(model):
                raw = _score_encoder_decoder(model, encoded, batch_size, device, bar)
            else:
                if any(e.contexts is None for e in encoded):
                    raise ValueError("examples were encoded for an encoder-decoder model; encode them with encoder_decoder=False")
                raw = _score_decoder_only(model, encoded, batch_size, device, bar)
    finally:
        model.train(was_training)
    return [OptionScores(tuple(s), tuple(int(x) for x in n)) for s, n in raw]


def _encode_for(model: Any, tokenizer: Any, examples: Sequence[_HasPromptAndOptions], target_delimiter: str) -> list[EncodedExample]:
    encoder_decoder = is_encoder_decoder(model)
    max_length = max_positions(model.config)
    return encode_examples(tokenizer, examples, encoder_decoder=encoder_decoder, target_delimiter=target_delimiter,
                           eos_token_id=eos_id(tokenizer, model), max_length=max_length)


def score_options(model: Any, tokenizer: Any, examples: Sequence[_HasPromptAndOptions], batch_size: int = 32,
                  device: str | torch.device | None = None, progress: bool = False, *, target_delimiter: str = " ") -> list[OptionScores]:
    """Score every option of every example (batched rank classification).

    Args:
        model: A `transformers` encoder-decoder or causal LM, already on `device`.
        tokenizer: Its tokenizer.
        examples: Objects with ``prompt`` and ``options`` (e.g. `tasks.Example`).
        batch_size: (example, option) pairs per forward pass.
        device: Where inputs go (default: the model's device).
        progress: Show a progress bar.
        target_delimiter: Decoder-only models: text between prompt and option.

    Returns:
        Per example, an `OptionScores`; ``.mean_logprobs`` are the length-normalised scores and
        ``.best()`` the predicted option.

    Raises:
        ValueError: See `encode_examples` and `score_encoded`.
    """
    encoded = _encode_for(model, tokenizer, examples, target_delimiter)
    return score_encoded(model, encoded, batch_size, device, progress)


def score_options_naive(model: Any, tokenizer: Any, examples: Sequence[_HasPromptAndOptions],
                        device: str | torch.device | None = None, *, target_delimiter: str = " ") -> list[OptionScores]:
    """The reference: one forward pass per (example, option), no padding, no reuse.

    It uses the same tokenisation as `score_options` but the model's own training loss (mean
    cross-entropy over the label tokens; transformers shifts the labels itself), so it also
    checks the batched path's decoder-input shift and position bookkeeping.

    Args:
        model: A `transformers` encoder-decoder or causal LM, already on `device`.
        tokenizer: Its tokenizer.
        examples: Objects with ``prompt`` and ``options``.
        device: Where inputs go (default: the model's device).
        target_delimiter: Decoder-only models: text between prompt and option.

    Returns:
        Per example, an `OptionScores`.
    """
    encoded = _encode_for(model, tokenizer, examples, target_delimiter)
    device = model_device(model, device)
    encoder_decoder = is_encoder_decoder(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for e in encoded:
                sums, counts = [], []
                for j, option in enumerate(e.option_ids):
                    labels = torch.tensor([option], device=device)
                    if encoder_decoder:
                        loss = model(input_ids=torch.tensor([e.prompt_ids], device=device), labels=labels, use_cache=False).loss
                    else:
                        context = list(e.contexts[j])  # type: ignore[index]
                        ids = torch.tensor([context + list(option)], device=device)
                        masked = torch.tensor([[-100] * len(context) + list(option)], device=device)
                        loss = model(input_ids=ids, labels=masked, use_cache=False).loss
                    sums.append(-float(loss) * len(option))
                    counts.append(len(option))
                out.append(OptionScores(tuple(sums), tuple(counts)))
    finally:
        model.train(was_training)
    return out

