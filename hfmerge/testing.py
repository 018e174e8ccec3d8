"""Tiny checkpoints built offline, for the demo, the tests and the benchmarks.

Each family has a base model saved with `save_pretrained` and "fine-tuned" variants made by
adding seeded noise to every floating-point tensor, saved with the same keys as the base (so
tied embeddings are stored once, as real checkpoints do).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FAMILIES = ("t5", "t5_v1_1", "gpt2", "bert", "llama")


def tiny_config(family: str, *, layers: int = 2, d_model: int = 16, vocab: int = 64):
    """A tiny transformers config of one architecture family."""
    import transformers as tf

    if family == "t5":  # original T5: ReLU FFN, tied embeddings and lm_head
        return tf.T5Config(vocab_size=vocab, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=layers, num_heads=4,
                           feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "t5_v1_1":  # T5 v1.1 / flan-T5: gated GELU, separate lm_head
        return tf.T5Config(vocab_size=vocab, d_model=d_model, d_kv=4, d_ff=2 * d_model, num_layers=layers, num_heads=4,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=layers, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=4,
                             intermediate_size=2 * d_model, max_position_embeddings=32)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _model_class(family: str):
    import transformers as tf

    return {"t5": tf.T5ForConditionalGeneration, "t5_v1_1": tf.T5ForConditionalGeneration, "gpt2": tf.GPT2LMHeadModel,
            "llama": tf.LlamaForCausalLM, "bert": tf.BertForMaskedLM}[family]


def build_base(folder: Path, family: str, *, seed: int = 0, **config_kwargs) -> Path:
    """Save a randomly initialised tiny model of `family` into `folder`."""
    torch.manual_seed(seed)
    config = tiny_config(family, **config_kwargs)
    model = _model_class(family)(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    if family == "t5_v1_1":
        # transformers ties T5's lm_head on save; a flan-T5 checkpoint stores its own lm_head.
        state = load_file(folder / "model.safetensors")
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"]) * 0.05
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        cfg = json.loads((folder / "config.json").read_text())
        cfg["tie_word_embeddings"] = False  # as flan-T5's config.json says
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def build_finetuned(base: Path, folder: Path, *, seed: int, scale: float = 0.01, sharded_max: int | None = None) -> Path:
    """Save base + seeded noise (one "fine-tuned" variant) with the base's keys and config."""
    state = load_base_state(base)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point():
            out[name] = (t.float() + scale * torch.randn(t.shape, generator=gen)).to(t.dtype).contiguous()
        else:
            out[name] = t.clone()
    write_checkpoint(folder, out, base / "config.json", sharded_max=sharded_max)
    return folder


def load_base_state(folder: Path) -> dict[str, torch.Tensor]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / f))
        return state
    return load_file(folder / "model.safetensors")


def write_checkpoint(folder: Path, state: dict[str, torch.Tensor], config: Path, *, sharded_max: int | None = None) -> Path:
    """Write a state dict as a checkpoint folder (single file, or sharded with an index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, folder / "config.json")
    if sharded_max is None:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        from huggingface_hub import save_torch_state_dict

        save_torch_state_dict(state, folder, max_shard_size=sharded_max)
    return folder


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer of `vocab_size` entries (``<pad>``, ``</s>``, ``<unk>``,
    ``<s>``, then ``w4``, ``w5``, ...) that closes inputs with ``</s>`` as T5's does: enough for a
    tiny model folder to load with ``AutoTokenizer`` and run through a pipeline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", "<s>"] + [f"w{i}" for i in range(4, vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")


def keyword_rows(n: int, *, keyword: str, seed: int, words: list[str] | None = None) -> list[dict]:
    """Rows of a synthetic yes/no task: does the text contain `keyword`? Half the rows do."""
    import random

    rng = random.Random(seed)
    pool = [w for w in (words or [f"w{i}" for i in range(52)]) if w != keyword]
    rows = []
    for i in range(n):
        text = [rng.choice(pool) for _ in range(rng.randint(3, 7))]
        if i % 2:
            text[rng.randrange(len(text))] = keyword
        rows.append({"text": " ".join(text), "label": i % 2})
    return rows


def train_expert(base: Path, folder: Path, tokenizer, examples: list[tuple[str, str]], *, steps: int = 40, lr: float = 3e-3,
                 seed: int = 0, batch_size: int = 8) -> Path:
    """Fine-tune a tiny encoder-decoder from `base` on (prompt, answer) pairs with teacher forcing
    and save it (with `tokenizer`) into `folder`: a small but real expert for tests."""
    import random

    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(base))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        enc = tokenizer([p for p, _ in batch], return_tensors="pt", padding=True)
        labels = tokenizer([a for _, a in batch], return_tensors="pt", padding=True)["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
