"""Live models for the algorithms that need gradients or outputs (the Fisher engine, the search).

A model is built from the architecture named in ``config.json`` (a transformers class; remote
code never runs) and filled tensor by tensor through hfmerge's own checkpoint readers, so a
local folder, a Hub repo pinned to a commit and an opted-in pickle checkpoint load the same way
and with the same checks as in a merge. A device map (accelerate: GPU, CPU and disk offload)
goes through ``from_pretrained`` on the checkpoint's local files instead.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["model_class", "build_model", "load_model", "untie_stored_apart", "state_names", "checkpoint_name_map", "load_tokenizer"]


def model_class(config: dict, label: str):
    """The transformers class named by ``config["architectures"][0]``."""
    import transformers

    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CheckpointError(f"{label}: config.json names architecture {arch!r}, which transformers does not provide (custom code is never run); "
                              "the Fisher engine and the search need a model class they can build")
    return cls


def _config_object(config: dict):
    import transformers

    kwargs = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    return transformers.AutoConfig.for_model(config["model_type"], **kwargs)


def build_model(config: dict, label: str, *, dtype: torch.dtype = torch.float32):
    """An instance of the checkpoint's architecture with freshly initialised weights, in eval mode."""
    cls = model_class(config, label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(_config_object(config))
    return model.to(dtype).eval()


def state_names(model: Any) -> dict[str, list[str]]:
    """Parameter name (``named_parameters()``: tied parameters once) → all its state-dict names."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id[id(p)].append(name)
    return {names[0]: names for names in by_id.values()}


def checkpoint_name_map(model: Any, stored: set[str] | dict, label: str) -> dict[str, list[str]]:
    """Parameter name → the names under which the checkpoint stores it (at least one).

    Raises:
        CheckpointError: A parameter is stored under none of its names.
    """
    out: dict[str, list[str]] = {}
    missing = []
    for name, aliases in state_names(model).items():
        found = [a for a in aliases if a in stored]
        if not found:
            missing.append(name)
        out[name] = found
    if missing:
        raise CheckpointError(f"{label}: the checkpoint does not store {len(missing)} parameter(s) of its architecture, e.g. {missing[0]!r}; "
                              "it cannot be loaded as a model for the Fisher engine")
    return out


def untie_stored_apart(model: Any, ckpt: Any, *, dtype: torch.dtype = torch.float32) -> list[str]:
    """Give its own parameter to every tied alias that the checkpoint stores with other values.

    transformers may tie parameters that a checkpoint keeps apart: in transformers 5, T5 ties
    ``lm_head.weight`` to ``shared.weight`` whatever ``tie_word_embeddings`` says, and
    ``from_pretrained`` unties them only when the checkpoint stores both with different values
    (flan-T5 and every T5 v1.1 checkpoint). Filling such a model from the first stored name
    would silently score and differentiate with the embedding as the output head. This does
    what ``from_pretrained`` does: an alias stored with values different from the group's
    first stored name becomes a parameter of its own (filled by the caller).

    Returns:
        The state-dict names that were untied.
    """
    import torch.nn as nn

    untied = []
    for aliases in state_names(model).values():
        stored = [a for a in aliases if a in ckpt.tensors]
        if len(stored) < 2:
            continue
        first = ckpt.read(stored[0])
        for alias in stored[1:]:
            if torch.equal(first, ckpt.read(alias)):
                continue
            module_name, _, attr = alias.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, attr)
            setattr(module, attr, nn.Parameter(torch.empty_like(current, dtype=dtype), requires_grad=current.requires_grad))
            untied.append(alias)
    return untied


def load_model(ckpt: Any, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Build the checkpoint's model and fill it from the checkpoint's tensors.

    Args:
        ckpt: An opened checkpoint (`LocalCheckpoint` or a Hub one): ``config``, ``tensors``,
            ``read(name)`` and ``label``.
        dtype: Parameter dtype.
        device: Where the model goes.

    Returns:
        The model in eval mode.
    """
    model = build_model(ckpt.config, ckpt.label, dtype=dtype)
    untie_stored_apart(model, ckpt, dtype=dtype)
    names = checkpoint_name_map(model, ckpt.tensors, ckpt.label)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, stored in names.items():
            params[name].copy_(ckpt.read(stored[0]).to(dtype))
        buffers = dict(model.named_buffers())
        for name, buf in buffers.items():
            if name in ckpt.tensors:
                buf.copy_(ckpt.read(name).to(buf.dtype))
    return model.to(device)


def load_model_device_map(ckpt: Any, *, device_map: Any, max_memory: dict | None = None, offload_folder: str | Path | None = None,
                          dtype: torch.dtype = torch.float32):
    """Load with an accelerate device map (GPU, CPU and disk offload) via ``from_pretrained``.

    The checkpoint's files are made local first (Hub shards go through the cache).
    """
    if getattr(ckpt, "format", "safetensors") != "safetensors":
        raise CheckpointError(f"{ckpt.label}: a device map needs a safetensors checkpoint")
    for info in {str(i.file): i for i in ckpt.tensors.values()}.values():
        ckpt.local_file(info)
    cls = model_class(ckpt.config, ckpt.label)
    kwargs: dict[str, Any] = {"device_map": device_map, "dtype": dtype, "trust_remote_code": False}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(str(ckpt.folder), **kwargs)
    return model.eval()


def load_tokenizer(folder: Path, label: str):
    """The tokenizer saved in `folder` (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{label}: no usable tokenizer in {folder} ({first}); set tokenizer_source to a model that has one") from None
