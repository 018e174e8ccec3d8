"""Compute, cache and reuse the Fishers a recipe needs.

`FisherSettings` holds the choices that change a Fisher (N, mode, seed, full or mask-node
Fisher); `fisher_for_checkpoint` turns one opened checkpoint and its task into a Fisher file,
through the cache. The examples are drawn once per task (N without replacement from the
validation split, seeded) and hashed into the cache key with everything else that defines the
result, so nothing stale is ever reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import FisherError
from ..evaluation.lm import eos_id, max_positions
from ..evaluation.scoring import EncodedExample, encode_examples
from ..evaluation.tasks import Example, TaskData
from .cache import cache_key, lookup, store
from .diagonal import MODES, FisherStats, diagonal_fisher
from .loglik import model_kind

logger = logging.getLogger(__name__)

DEFAULT_NUM_EXAMPLES = 30
DEFAULT_GRAM_EXAMPLES = 256  # RegMean's examples per task, as FusionBench's configurations
KINDS = ("diagonal", "nodes", "gram")


@dataclass(frozen=True)
class FisherSettings:
    """What a Fisher is computed from, besides the model and the task.

    Attributes:
        num_examples: N, drawn once from the task's validation split (all if it has fewer).
        mode: ``exact``, ``sampled`` or ``empirical``.
        seed: Seed of the example draw and of ``sampled`` option draws.
        implementation: ``auto``, ``hooks``, ``vmap`` or ``loop`` (same result; speed only).
        kind: ``diagonal`` (per parameter), ``nodes`` (Fisher Mask Nodes: per head/neuron) or
            ``gram`` (RegMean: the Gram matrix of every linear layer's inputs; `mode` and
            `implementation` do not apply).
    """

    num_examples: int = DEFAULT_NUM_EXAMPLES
    mode: str = "exact"
    seed: int = 0
    implementation: str = "auto"
    kind: str = "diagonal"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FisherError(f"fisher mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.num_examples < 1:
            raise FisherError(f"the Fisher needs at least one example, got num_examples={self.num_examples}")
        if self.kind not in KINDS:
            raise FisherError(f"fisher kind {self.kind!r}; expected one of {', '.join(KINDS)}")


def fisher_examples(data: TaskData, num_examples: int, seed: int) -> list[Example]:
    """N examples drawn without replacement from the task's validation examples (seeded, in
    their original order); all of them when there are fewer."""
    pool = data.examples("validation")
    if num_examples >= len(pool):
        return list(pool)
    chosen = sorted(random.Random(f"fisher:{seed}").sample(range(len(pool)), num_examples))
    return [pool[i] for i in chosen]


def examples_hash(examples: Sequence[Example]) -> str:
    """SHA-256 of the rendered examples (prompt, options, label)."""
    payload = json.dumps([[e.prompt, list(e.options), e.label] for e in examples])
    return hashlib.sha256(payload.encode()).hexdigest()


def model_identity(ckpt: Any) -> str:
    """What identifies a checkpoint's weights: the pinned commit of a Hub repo, else a
    fingerprint of the local weight files (names, sizes, modification times) and config."""
    adapter = getattr(ckpt, "adapter", None)
    if adapter is not None:  # a LoRA adapter applied to its base: both halves define the weights
        return f"lora:{model_identity(adapter)}|base:{model_identity(ckpt.base)}"
    if ckpt.commit:
        return f"{ckpt.ref.repo_id}@{ckpt.commit}"
    h = hashlib.sha256()
    for f in sorted({Path(i.file) for i in ckpt.tensors.values()}):
        path = f if f.is_absolute() else Path(ckpt.folder) / f
        st = path.stat()
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    h.update(json.dumps(ckpt.config, sort_keys=True).encode())
    return f"local:{Path(ckpt.folder).resolve()}:{h.hexdigest()[:16]}"


def tokenizer_identity(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids: its class, vocabulary and special tokens."""
    if tokenizer is None:
        return ""
    payload = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens,
                          getattr(tokenizer, "eos_token_id", None)], default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def fisher_metadata(ckpt: Any, task: str, examples: Sequence[Example], settings: FisherSettings, *,
                    scale: float | None = None, base: Any = None, tokenizer: Any = None, target_delimiter: str = " ") -> dict[str, str]:
    """The metadata that defines a Fisher (and, hashed, its cache key)."""
    meta = {
        "tokenizer_sha256": tokenizer_identity(tokenizer), "target_delimiter": target_delimiter,
        "model": ckpt.ref.text, "model_identity": model_identity(ckpt), "task": task, "data_sha256": examples_hash(examples),
        "num_examples": str(len(examples)), "mode": settings.mode if settings.kind != "gram" else "", "seed": str(settings.seed), "kind": settings.kind,
        "lambda": "" if scale is None else repr(float(scale)),
        "base_identity": "" if base is None else model_identity(base),
        "hfmerge_version": __version__,
    }
    return meta


def encode_for_model(model: Any, tokenizer: Any, examples: Sequence[Example], *, target_delimiter: str = " ", label: str = "task") -> list[EncodedExample]:
    """Tokenise examples the way rank classification does for this model."""
    kind = model_kind(model)
    if kind == "classifier":
        num_labels = int(getattr(model.config, "num_labels", 0))
        for n, e in enumerate(examples):
            if len(e.options) != num_labels:
                raise FisherError(f"{label}: example {n} has {len(e.options)} options but the classifier has {num_labels} classes; "
                                  "for a sequence classifier the options are its classes, in label order")
        ids = tokenizer([e.prompt for e in examples], truncation=True, max_length=max_positions(model.config))["input_ids"]
        return [EncodedExample(tuple(i), tuple((k,) for k in range(num_labels))) for i in ids]
    try:
        return encode_examples(tokenizer, examples, encoder_decoder=kind == "encoder-decoder", target_delimiter=target_delimiter,
                               eos_token_id=eos_id(tokenizer, model), max_length=max_positions(model.config))
    except ValueError as exc:
        raise FisherError(f"{label}: {exc}") from None


def compute_fisher(model: Any, tokenizer: Any, examples: Sequence[Example], settings: FisherSettings, *, target_delimiter: str = " ",
                   label: str = "task", progress: bool = False, encoded: list[EncodedExample] | None = None,
                   stats: list[FisherStats] | None = None) -> dict[str, torch.Tensor]:
    """The Fisher of a live model, keyed by parameter name (diagonal), node name (nodes) or
    linear weight name (gram: the Gram matrices of the layers' inputs)."""
    if encoded is None:
        encoded = encode_for_model(model, tokenizer, examples, target_delimiter=target_delimiter, label=label)
    labels = [e.label for e in examples]
    if settings.kind == "gram":
        from .gram import gram_statistics

        return gram_statistics(model, encoded, labels, progress=progress, desc=f"Gram {label}", stats=stats)
    if settings.kind == "nodes":
        from .nodes import node_fisher

        return node_fisher(model, encoded, labels, mode=settings.mode, seed=settings.seed, progress=progress, desc=f"Fisher nodes {label}", stats=stats)
    return diagonal_fisher(model, encoded, labels, mode=settings.mode, implementation=settings.implementation, seed=settings.seed,
                           progress=progress, desc=f"Fisher {label}", stats=stats)


def to_checkpoint_names(fisher: dict[str, torch.Tensor], name_map: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Rename parameter Fishers to the checkpoint's tensor names (every stored alias)."""
    out = {}
    for name, value in fisher.items():
        for stored in name_map.get(name, [name]):
            out[stored] = value if stored == name_map[name][0] else value.clone()
    return out


@dataclass
class FisherJob:
    """One Fisher to produce: a checkpoint and the task it is computed on."""

    ckpt: Any
    data: TaskData
    label: str


def fisher_for_checkpoint(job: FisherJob, tokenizer: Any, settings: FisherSettings, *, progress: bool = False,
                          device: str | torch.device = "cpu", device_map: Any = None, max_memory: dict | None = None,
                          offload_folder: str | Path | None = None, cache_root: Path | None = None,
                          stats: list[FisherStats] | None = None) -> tuple[Path, bool]:
    """The Fisher file of `job`'s checkpoint on its task, from the cache or computed now.

    Returns:
        (path of the Fisher file, whether it came from the cache).
    """
    from .models import checkpoint_name_map, load_model, load_model_device_map

    examples = fisher_examples(job.data, settings.num_examples, settings.seed)
    meta = fisher_metadata(job.ckpt, job.data.spec.name, examples, settings, tokenizer=tokenizer, target_delimiter=job.data.spec.target_delimiter)
    key = cache_key(meta)
    hit = lookup(key, root=cache_root)
    if hit is not None:
        logger.info("%s: Fisher from the cache (%s)", job.label, hit.name)
        return hit, True
    start = time.perf_counter()
    if device_map is not None or max_memory is not None:
        model = load_model_device_map(job.ckpt, device_map=device_map or "auto", max_memory=max_memory, offload_folder=offload_folder)
    else:
        model = load_model(job.ckpt, device=device)
    fisher = compute_fisher(model, tokenizer, examples, settings, target_delimiter=job.data.spec.target_delimiter, label=job.label,
                            progress=progress, stats=stats)
    if settings.kind != "nodes":  # parameter names (diagonal) and weight names (gram) become the checkpoint's
        fisher = to_checkpoint_names(fisher, checkpoint_name_map(model, job.ckpt.tensors, job.ckpt.label))
    del model
    path = store(key, fisher, {**meta, "seconds": f"{time.perf_counter() - start:.3f}"}, cache_root)
    return path, False


def settings_from_recipe(recipe: Any) -> FisherSettings:
    """The Fisher settings a recipe's parameters ask for (for Gram statistics: ``regmean_examples``
    and ``regmean_seed``)."""
    p = recipe.parameters
    kind = recipe.method.importance if recipe.method.importance in KINDS else "diagonal"
    if kind == "gram":
        return FisherSettings(num_examples=int(p.get("regmean_examples", DEFAULT_GRAM_EXAMPLES)), seed=int(p.get("regmean_seed", 0)), kind=kind)
    return FisherSettings(num_examples=int(p.get("fisher_examples", DEFAULT_NUM_EXAMPLES)), mode=str(p.get("fisher_mode", "exact")),
                          seed=int(p.get("fisher_seed", 0)), implementation=str(p.get("fisher_implementation", "auto")), kind=kind)


@dataclass
class FisherRecord:
    """One model's Fisher as `ensure_fishers` produced it (for reports and the CLI)."""

    model: str
    task: str | None
    path: Path
    source: str  # "file" (given in the recipe), "cache" or "computed"
    seconds: float = 0.0


def ensure_fishers(plan: Any, *, progress: bool = True, device: str | torch.device = "cpu", device_map: Any = None,
                   max_memory: dict | None = None, offload_folder: str | Path | None = None, cache_root: Path | None = None,
                   task_data: dict[str, TaskData] | None = None) -> list[FisherRecord]:
    """Find every model of `plan` a Fisher file: the recipe's, a cached one, or one computed now
    on the model's task at θ_i. The plan is not changed: `planning.with_fishers(plan, [r.path
    for r in records])` is the plan that merges with them.

    Args:
        plan: From `build_plan`, for a method that needs importances.
        progress: Show progress bars.
        device, device_map, max_memory, offload_folder: Where models run (see `load_model`).
        cache_root: The Fisher cache folder (default `cache.cache_dir()`).
        task_data: Tasks already loaded, by name (else loaded here; validation split).

    Returns:
        One record per model, in the recipe's order.
    """
    from ..evaluation.tasks import load_task_data
    from .models import load_tokenizer

    recipe = plan.recipe
    settings = settings_from_recipe(recipe)
    records: list[FisherRecord] = []
    tokenizer = None
    for spec, ckpt in zip(recipe.models, plan.models):
        if spec.fisher is not None:
            records.append(FisherRecord(spec.ref.text, None, Path(spec.fisher), "file"))
            continue
        task = recipe.tasks[spec.task]
        data = (task_data or {}).get(task.name) or load_task_data(task, ("validation",))
        if tokenizer is None:
            tokenizer = load_tokenizer(plan.tokenizer_folder, f"{recipe.source}: tokenizer_source")
        stats: list[FisherStats] = []
        path, cached = fisher_for_checkpoint(FisherJob(ckpt, data, f"{spec.key} ({spec.ref.text}) on {task.name}"), tokenizer, settings,
                                             progress=progress, device=device, device_map=device_map, max_memory=max_memory,
                                             offload_folder=offload_folder, cache_root=cache_root, stats=stats)
        records.append(FisherRecord(spec.ref.text, task.name, path, "cache" if cached else "computed", stats[0].seconds if stats else 0.0))
    return records
