"""Checkpoint I/O: references, readers (local folders, Hub repos, PEFT adapters), the streaming
writer, tied aliases. Nothing here knows about merge methods.

`open_checkpoint` opens any model reference as a `Checkpoint`. Importing this package loads
neither torch nor huggingface_hub; `open_checkpoint` imports the readers when first called.
"""

from __future__ import annotations

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
    adapter.

    Args:
        ref: The reference (``org/name[@revision]`` or a folder).
        label: How messages name the model (e.g. ``"models[1].model (./rte)"``).
        allow_pickle: Accept pickle weights, loaded with ``torch.load(weights_only=True)`` (local
            folders and adapters; the recipe key).
        allow_external_symlinks: Follow a local folder's symlinks that lead out of it (the recipe
            key; a Hub checkpoint's files must always stay in its cache folder).
        base: The recipe's opened base checkpoint, which an adapter is applied to.
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
    from . import hub, lora, reader
    from .base import is_adapter_folder

    if not ref.is_local:
        snapshot = hub.pin_hub_repo(ref, label=label)
        ckpt: hub.HubCheckpoint | lora.LoraCheckpoint
        if snapshot.is_adapter:
            ckpt = lora.open_hub_adapter(snapshot, label=label, base=base, allow_pickle=allow_pickle)
        else:
            ckpt = hub.open_hub_checkpoint(ref, label=label, snapshot=snapshot)
        ckpt.scratch = scratch
        return ckpt
    assert ref.path is not None
    if is_adapter_folder(ref.path):
        return lora.open_local_adapter(ref, label=label, base=base, allow_pickle=allow_pickle,
                                       allow_external_symlinks=allow_external_symlinks)
    return reader.open_local_checkpoint(ref, label=label, allow_pickle=allow_pickle, allow_external_symlinks=allow_external_symlinks)
