"""`RunOptions`: how to run a recipe, everything that is not the recipe itself.

Shared by the API functions (`hfmerge.api`) and the engines they drive (`hfmerge.dfmerge`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OptionError

__all__ = ["RunOptions", "device_settings", "merge_device", "output_settings"]


@dataclass(frozen=True)
class RunOptions:
    """How to run a recipe: everything that is not the recipe itself.

    Attributes:
        output: The folder to write the merged model into (default: ``./merged-<recipe name>``).
        overwrite: Replace `output` if it exists (only once the new folder is complete).
        max_shard_size: Cut output shards at this size (bytes or ``"2GB"``); overrides the recipe.
        device: Where Fisher models, a search's working model and the evaluation run:
            ``"auto"`` (cuda when available), ``"cpu"`` or ``"cuda"``. The arithmetic of the
            streaming merge runs on cuda only when ``"cuda"`` is asked for explicitly
            (`merge_device`); ``"auto"`` keeps it on the CPU.
        max_memory: Load Fisher models with an accelerate device map within these budgets,
            e.g. ``{0: "20GiB", "cpu": "60GiB"}`` (fisher and fisher_nodes methods).
        offload_folder: Where such a device map offloads layers that fit nowhere else.
        low_disk: Download Hub shards into a scratch folder, at most one per model at a time.
        evaluate: Evaluate the output on the recipe's tasks (when it has any).
        batch_size: Evaluation batch size.
        progress: Show progress bars.
        storage: A search's Optuna storage (URL or journal path; default: a journal beside the
            output): DF-Merge's, or that of a recipe with ``{search: ...}`` ranges.
        study_name: The Optuna study's name (workers sharing `storage` use the same one).
        n_trials: Total trials of a search (overrides the recipe's ``n_trials``).
        resume: Continue an interrupted search (completed trials are kept).
        finalize: Run no trial: build the final merge of a complete shared search from its
            best trial, taking over the claim of a worker that died while building it.
        heartbeat_interval: Seconds between the heartbeats of a running trial in a database
            storage (`storage`).
        grace_period: Seconds without heartbeat after which another worker fails a running
            trial and runs its values again (default: 4 × `heartbeat_interval`).
        push_to_hub: Upload the output to this Hub repo in one commit; True: the recipe's
            ``push_to_hub``; None: no upload.
        private: Create the Hub repo as private.
        copy_tokenizer: Copy the tokenizer files of the base (or first) model into the output.
            False leaves them out; a recipe's explicit ``tokenizer_source`` is still copied.
        write_model_card: Write ``README.md`` (the model card). False leaves it out (and
            cannot be combined with `push_to_hub`: a pushed model needs its card).
        random_seed: The seed of a method's random draws: replaces the recipe's
            ``parameters.seed`` for methods that have one (DARE's masks, a search's sampler),
            and the ``search:`` block's seed of a recipe that searches parameters.
        num_threads: Threads torch uses for the merge arithmetic on the CPU while `merge`
            runs (default: torch's own setting).
        hub_ids: The Hub ids of local inputs, ``{folder: "org/name"}``, for the model card's
            ``base_model`` metadata: added to the recipe's ``hub_ids`` (replacing its id for the
            same folder). A relative folder is taken from the working directory.
    """

    output: str | Path | None = None
    overwrite: bool = False
    max_shard_size: int | str | None = None
    device: str = "auto"
    max_memory: dict[int | str, str] | None = None
    offload_folder: str | Path | None = None
    low_disk: bool = False
    evaluate: bool = True
    batch_size: int = 32
    progress: bool = True
    storage: str | None = None
    study_name: str | None = None
    n_trials: int | None = None
    resume: bool = False
    finalize: bool = False
    heartbeat_interval: int = 30
    grace_period: int | None = None
    push_to_hub: str | bool | None = None
    private: bool = False
    copy_tokenizer: bool = True
    write_model_card: bool = True
    random_seed: int | None = None
    num_threads: int | None = None
    hub_ids: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise OptionError(f"got {self.device!r}; expected auto, cpu or cuda", options=("device",))
        if self.n_trials is not None and self.n_trials < 1:
            raise OptionError(f"got {self.n_trials}; expected a positive number of trials", options=("n_trials",))
        for name in ("heartbeat_interval", "grace_period"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionError(f"got {value!r}; expected a positive whole number of seconds", options=(name,))
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise OptionError(f"{self.grace_period} s is not longer than the heartbeat interval ({self.heartbeat_interval} s)",
                              options=("grace_period",))
        if self.batch_size < 1:
            raise OptionError(f"got {self.batch_size}; expected a positive number", options=("batch_size",))
        if self.random_seed is not None and (isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int) or self.random_seed < 0):
            raise OptionError(f"got {self.random_seed!r}; expected a whole number >= 0", options=("random_seed",))
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise OptionError(f"got {self.num_threads!r}; expected a positive number of threads", options=("num_threads",))
        if not self.write_model_card and self.push_to_hub not in (None, False):
            raise OptionError("a pushed model needs its model card (README.md); write the card or do not push",
                              options=("write_model_card", "push_to_hub"))


def device_settings(options: RunOptions) -> dict[str, Any]:
    """Keyword arguments for `fisher.engine.ensure_fishers` from `options`.

    Raises:
        OptionError: ``cuda`` was asked for and none is available.
    """
    import torch

    device = options.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionError("cuda: no CUDA device is available here; use cpu", options=("device",))
    return {"device": device, "max_memory": options.max_memory, "offload_folder": options.offload_folder,
            "device_map": "auto" if options.max_memory else None}


def merge_device(options: RunOptions) -> str:
    """Where the streaming merge computes: ``"cuda"`` when `options.device` says ``"cuda"``,
    else ``"cpu"`` (``"auto"`` keeps a static merge on the CPU, where it reads its inputs).

    Raises:
        OptionError: ``cuda`` was asked for and none is available.
    """
    return device_settings(options)["device"] if options.device == "cuda" else "cpu"


def output_settings(options: RunOptions) -> dict[str, Any]:
    """Keyword arguments for `merging.run_merge` from `options`: the merge device and which
    side files the output gets."""
    return {"device": merge_device(options), "copy_tokenizer": options.copy_tokenizer, "model_card": options.write_model_card}
