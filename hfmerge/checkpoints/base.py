"""What every opened checkpoint offers (`Checkpoint`) and the file names of the formats read.

A local folder (`reader.LocalCheckpoint`), a Hub repo pinned to a commit (`hub.HubCheckpoint`)
and a PEFT LoRA adapter applied to its base (`lora.LoraCheckpoint`) all satisfy `Checkpoint`,
so the plan, the merge, the Fisher engine and the model card never ask which kind they hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from ..refs import ModelRef
    from .safetensors_header import TensorInfo

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"

# Small files read in the plan step or copied to the output when present: config, tokenizer,
# generation config, model card.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "spiece.model", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "README.md",
)


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds a PEFT adapter (``adapter_config.json`` decides, as in transformers)."""
    return (folder / ADAPTER_CONFIG).is_file()


@runtime_checkable
class Checkpoint(Protocol):
    """An opened checkpoint: headers read, weights read one tensor at a time on demand.

    Attributes:
        ref: The reference it was opened from (a Hub one pinned to `commit`).
        label: How messages name it (the recipe key path and the reference).
        folder: The local folder of its config and side files (a Hub repo's cache snapshot).
        config: The parsed ``config.json`` of the model it stands for.
        tensors: Every tensor by name, header information only.
        commit: The pinned commit SHA of a Hub checkpoint; None for a local folder.
    """

    ref: ModelRef
    label: str
    folder: Path
    config: dict
    tensors: dict[str, TensorInfo]
    commit: str | None

    @property
    def files(self) -> list[Path]:
        """The weight files its tensors are stored in."""
        ...

    def read(self, name: str) -> torch.Tensor:
        """One tensor, by its stored name.

        Raises:
            CheckpointError: The tensor is missing or its file cannot be read.
        """
        ...

    def release(self) -> None:
        """Give back what reading left on disk (low-disk downloads); a no-op where nothing is left."""
        ...
