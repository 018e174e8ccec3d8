"""The models of mergekit's merge tests, rebuilt offline with transformers.

mergekit's ``tests/common.py`` and ``tests/test_tokenizer.py`` build randomly initialised
checkpoints of five architectures (and a BPE tokenizer for the tokenizer and chat-template
tests). These builders make checkpoints of the same architectures, with the same tensor names
and config keys, from seeded random initialisations:

* ``make_picollama``: LlamaForCausalLM, mergekit's sizes (hidden 32, 16 heads, 2 layers).
* ``make_picogranite``: GraniteForCausalLM, mergekit's sizes.
* ``make_gpt2size``: GPT2LMHeadModel with GPT-2 small's 12 layers (the stacking recipe selects
  ``layer_range: [0, 12]``) but tiny widths (mergekit builds the full 124M-parameter model).
* ``make_picoLlaVa``: LlavaForConditionalGeneration with a 2-layer CLIP tower and the pico
  Llama as text model, mergekit's sizes.
* ``make_tokenizer``: a BPE vocabulary ``<unk> <s> </s> _tok_3 ...`` without merges, as a
  Llama tokenizer, plus optional added tokens.

The pytest fixtures at the bottom are session-scoped and named as in mergekit's test modules
(``model_a``, ``vlm_b``, ``model_chatml``, ...), so a configuration refers to its models by
the names mergekit's tests use. Import them into a test module to use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch


def _save(model_cls, config, path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(str(path))
    return str(path)


def make_picollama(path: Path, vocab_size: int = 64, *, seed: int = 0) -> str:
    """A 2-layer Llama of hidden size 32 saved as safetensors in `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
    return _save(LlamaForCausalLM, config, path, seed)


def make_picogranite(path: Path, vocab_size: int = 64, *, seed: int = 0) -> str:
    """A 2-layer Granite of hidden size 32 saved as safetensors in `path`."""
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=2,
                           num_hidden_layers=2)
    return _save(GraniteForCausalLM, config, path, seed)


def make_gpt2size(path: Path, *, seed: int = 0) -> str:
    """A GPT-2 with GPT-2 small's 12 layers and 1024-token context, at embedding width 16."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_ctx=1024, n_embd=16, n_head=2, n_layer=12, n_positions=1024, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return _save(GPT2LMHeadModel, config, path, seed)


def make_picoLlaVa(path: Path, *, seed: int = 0) -> str:  # noqa: N802  (mergekit's name)
    """A LLaVA of a 2-layer CLIP vision tower (32-pixel images, 4-pixel patches) and the pico Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2, hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
    return _save(LlavaForConditionalGeneration, config, path, seed)


def make_tokenizer(vocab_size: int, added_tokens: Sequence[str] = ()):
    """A Llama tokenizer over ``<unk> <s> </s> _tok_3 ... _tok_{vocab_size-1}`` (BPE without
    merges: every token is whole), with `added_tokens` appended after the vocabulary."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaTokenizerFast

    names = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    tokenizer = LlamaTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[])))
    tokenizer.add_tokens(list(added_tokens))
    return tokenizer


def _with_tokenizer(path: str, vocab_size: int, added_tokens: Sequence[str]) -> str:
    make_tokenizer(vocab_size, added_tokens).save_pretrained(path)
    return path


# Every model mergekit's three merge-test modules use: fixture name -> builder. Seeds differ so
# that no two models are equal (mergekit's are independent random initialisations too).
BUILDERS = {
    "model_a": lambda p: make_picollama(p, seed=1),
    "model_b": lambda p: make_picollama(p, seed=2),
    "model_c": lambda p: make_picollama(p, seed=3),
    "vlm_a": lambda p: make_picoLlaVa(p, seed=11),
    "vlm_b": lambda p: make_picoLlaVa(p, seed=12),
    "vlm_c": lambda p: make_picoLlaVa(p, seed=13),
    "gpt2_like": lambda p: make_gpt2size(p, seed=21),
    "granite_a": lambda p: make_picogranite(p, seed=31),
    "granite_b": lambda p: make_picogranite(p, seed=32),
    # The tokenizer and chat-template tests: the base has 64 tokens; model_chatml has 66 rows
    # (two added chat tokens); model_padded has 64 rows and four unused added tokens, which
    # (as in mergekit) lie past its embedding matrix.
    "model_base": lambda p: _with_tokenizer(make_picollama(p, vocab_size=64, seed=41), 64, []),
    "model_chatml": lambda p: _with_tokenizer(make_picollama(p, vocab_size=66, seed=42), 64, ["<|im_start|>", "<|im_end|>"]),
    "model_padded": lambda p: _with_tokenizer(make_picollama(p, vocab_size=64, seed=43),
                                              64, ["<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"]),
}


def build_all(root: Path, names: Sequence[str] | None = None) -> dict[str, str]:
    """Build the named models (default: all) under `root`; returns name -> folder."""
    root = Path(root)
    return {name: BUILDERS[name](root / name) for name in (names or BUILDERS)}


@pytest.fixture(scope="session")
def mergekit_models(tmp_path_factory) -> dict[str, str]:
    """Every model of mergekit's merge tests, by its fixture name (built once per session)."""
    return build_all(tmp_path_factory.mktemp("mergekit-models"))
