"""Checkpoint I/O: references, readers (local folders, Hub repos, PEFT adapters), the streaming
writer, tied aliases. Nothing here knows about merge methods.

`open_checkpoint` opens any model reference as a `Checkpoint`. Importing this package loads
neither torch nor huggingface_hub; `open_checkpoint` imports the readers when first called.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .base import Checkpoint

if TYPE_CHECKING:
    from pathlib import Path

    from ..refs import ModelRef

__all__ = ["Checkpoint", "open_checkpoint"]


def open_checkpoint(ref: ModelRef, *, label: str, allow_pickle: bool = False, allow_external_symlinks: bool = False,
                    base: Checkpoint | None = None, scratch: Path | None = None) -> Checkpoint:
    """Open a model reference header-only: a local folder, a Hub repo pinned to a commit, or a PEFT
    LoRA adapter (either) applied to `base`.

    As for transformers' ``from_pretrained``, ``adapter_config.json`` makes a folder or repo an
    adapter. A ``BASE+ADAPTER`` reference (`ModelRef.adapter`) opens BASE (`base` itself when
    it is the same reference) and applies the adapter to it instead of to `base`.

    Args:
        ref: The reference (``org/name[@revision]`` or a folder).
        label: How messages name the model (e.g. ``"models[1].model (./rte)"``).
        allow_pickle: Accept pickle weights, loaded with ``torch.load(weights_only=True)`` (local
            folders and adapters; the recipe key).
        allow_external_symlinks: Follow a local folder's symlinks that lead out of it (the recipe
            key; a Hub checkpoint's files must always stay in its cache folder).
        base: The recipe's opened base checkpoint, which an adapter without ``BASE+`` is applied to.
        scratch: Low-disk mode: a Hub checkpoint downloads its shards into this folder, one at
            a time, instead of the Hugging Face cache (`Checkpoint.release` deletes them);
            ignored for local folders.

    Returns:
        The opened checkpoint; weights are read one tensor at a time by `Checkpoint.read`.

    Raises:
        CheckpointError: The reference cannot be opened (see `reader.open_local_checkpoint`,
            `hub.open_hub_checkpoint`, `lora.open_local_adapter`), or an adapter without `base`.
        IncompatibleCheckpointsError: An adapter does not fit `base`.
    """
    from . import hub, reader
    from .base import is_adapter_folder

    if ref.adapter is not None:
        return _open_with_adapter(ref, label=label, allow_pickle=allow_pickle, allow_external_symlinks=allow_external_symlinks,
                                  known_base=base, scratch=scratch)
    if not ref.is_local:
        snapshot = hub.pin_hub_repo(ref, label=label)
        ckpt: hub.HubCheckpoint | lora.LoraCheckpoint
        if snapshot.is_adapter:
            from . import lora  # adapters only: it imports torch

            ckpt = lora.open_hub_adapter(snapshot, label=label, base=base, allow_pickle=allow_pickle)
        else:
            ckpt = hub.open_hub_checkpoint(ref, label=label, snapshot=snapshot)
        ckpt.scratch = scratch
        return ckpt
    assert ref.path is not None
    if is_adapter_folder(ref.path):
        from . import lora

        return lora.open_local_adapter(ref, label=label, base=base, allow_pickle=allow_pickle,
                                       allow_external_symlinks=allow_external_symlinks)
    return reader.open_local_checkpoint(ref, label=label, allow_pickle=allow_pickle, allow_external_symlinks=allow_external_symlinks)


def _same_model(ckpt: Checkpoint, ref: ModelRef) -> bool:
    """Whether the opened `ckpt` is what the plain reference `ref` names (as written)."""
    if getattr(ckpt, "format", "") == "lora":
        return False
    if ref.is_local:
        return ckpt.ref.is_local and ckpt.ref.path == ref.path
    return ckpt.ref.text == ref.text


def _open_with_adapter(ref: ModelRef, *, label: str, allow_pickle: bool, allow_external_symlinks: bool, known_base: Checkpoint | None,
                       scratch: Path | None) -> Checkpoint:
    """``BASE+ADAPTER``: open BASE (or reuse `known_base`, the recipe's base, when it is the same
    reference), then the adapter over it, checked against it; the adapter's own base name
    differing from BASE is a warning, not an error (the reference chose BASE explicitly)."""
    from ..errors import CheckpointError
    from . import hub, lora, reader
    from .base import is_adapter_folder

    model_ref, adapter_ref = ref.model, ref.adapter
    assert adapter_ref is not None
    owns_base = known_base is None or not _same_model(known_base, model_ref)
    if owns_base:
        base_label = f"{label}, the model before '+'"
        not_model = (f"{base_label}: {model_ref.text} is a PEFT LoRA adapter; BASE+ADAPTER needs the full model the adapter is "
                     "applied to before the '+'")
        if model_ref.is_local:
            assert model_ref.path is not None
            if is_adapter_folder(model_ref.path):
                raise CheckpointError(not_model)
            model: Checkpoint = reader.open_local_checkpoint(model_ref, label=base_label, allow_pickle=allow_pickle,
                                                             allow_external_symlinks=allow_external_symlinks)
        else:
            snapshot = hub.pin_hub_repo(model_ref, label=base_label)
            if snapshot.is_adapter:
                raise CheckpointError(not_model)
            hub_model = hub.open_hub_checkpoint(model_ref, label=base_label, snapshot=snapshot)
            hub_model.scratch = scratch / "model" if scratch is not None else None
            model = hub_model
    else:
        assert known_base is not None
        model = known_base
    adapter_label = f"{label}, the adapter after '+'"
    def not_adapter(where: str) -> CheckpointError:
        return CheckpointError(f"{adapter_label}: {where} is not a PEFT LoRA adapter (it has no adapter_config.json); "
                               "BASE+ADAPTER needs an adapter after the '+'. List a full model on its own, without '+'")

    try:
        if adapter_ref.is_local:
            assert adapter_ref.path is not None
            if not is_adapter_folder(adapter_ref.path):
                if not adapter_ref.path.is_dir():
                    raise CheckpointError(f"{adapter_label}: folder {adapter_ref.path} not found")
                raise not_adapter(adapter_ref.text)
            ckpt = lora.open_local_adapter(adapter_ref, label=label, base=model, allow_pickle=allow_pickle,
                                           allow_external_symlinks=allow_external_symlinks, explicit_base=True)
        else:
            snapshot = hub.pin_hub_repo(adapter_ref, label=adapter_label)
            if not snapshot.is_adapter:
                raise not_adapter(f"{adapter_ref.repo_id}@{snapshot.commit}")
            ckpt = lora.open_hub_adapter(snapshot, label=label, base=model, allow_pickle=allow_pickle, explicit_base=True)
            ckpt.scratch = scratch / "adapter" if scratch is not None else None
    except BaseException:
        if owns_base:
            model.release()
        raise
    ckpt.owns_base = owns_base
    ckpt.ref = replace(ckpt.ref, text=ref.text)  # the adapter's pinned reference, named as written
    return ckpt
