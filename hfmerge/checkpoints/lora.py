"""PEFT LoRA adapters as merge inputs, read as the full fine-tuned model they stand for.

A ``models`` entry that is a PEFT adapter (a folder or Hub repo with ``adapter_config.json``)
is streamed one tensor at a time like any checkpoint: each adapted weight is read as

    W + scale · B·A        (LoRA, Hu et al. 2021, eq. 3; what peft's ``merge_and_unload`` computes)

with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), and every other
tensor is the base's. Merge methods therefore see an ordinary fine-tuned model and need no change.
The adapter is applied to the recipe's ``base_model``, which the plan has already opened; opening
the adapter checks that it names that model as its base, and that every adapted tensor exists in
the base with a matching shape.

The format is read directly; the ``peft`` package is not needed. What is read, as peft writes it:

- ``adapter_config.json``: ``peft_type`` (only ``LORA``), ``r``, ``lora_alpha``, ``use_rslora``,
  ``rank_pattern`` / ``alpha_pattern`` (per-module overrides: a key applies to a module whose name
  is the key or ends with ``.<key>``, the key being a regular expression, as peft's
  ``get_pattern_key``), ``fan_in_fan_out``, ``base_model_name_or_path``, ``revision``.
- ``adapter_model.safetensors`` (or a pickle ``adapter_model.bin``, loaded only with
  ``allow_pickle: true`` and then with ``torch.load(weights_only=True)``), keys
  ``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]
  (``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r] for embeddings, whose update
  is transposed), ``.lora_B.bias`` with ``lora_bias``. Every other tensor (``modules_to_save``,
  trained biases with ``bias: all`` / ``lora_only``) is a full replacement of the base tensor of
  that name (peft strips ``modules_to_save.<adapter>`` and ``base_layer`` from saved keys).

Which modules were adapted is read from the weights file, not from ``target_modules``. The update
of a GPT-2-style ``Conv1D`` (weight stored [in, out]) is transposed, as peft forces
``fan_in_fan_out`` per layer: a non-square weight's shape decides; for a square one the
architecture (instantiated on the meta device) says which layers are ``Conv1D``, and only when
it is unknown does the config's ``fan_in_fan_out`` decide.

Adapted tensors are returned in float32 (the base weight upcast, then the update added), so a
task vector ``(W + ΔW) − W`` keeps ΔW exactly instead of losing it to bf16/fp16 rounding of the
sum; merging.py computes in float32 anyway.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..constants import REPO_ID
from ..errors import CheckpointError, IncompatibleCheckpointsError
from ..refs import ModelRef
from .base import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_SAFE, SIDE_FILES, Checkpoint
from .hub import HubCheckpoint, HubSnapshot, download_file
from .reader import LocalCheckpoint, check_inside, confinement_root, load_pickle, safe_dtype_names
from .safetensors_header import TensorInfo, read_header

PEFT_PREFIX = "base_model.model."

# peft config keys that turn on a LoRA variant whose merged weight is not W + scale·B·A.
UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA (use_dora: true) rescales every merged column by a learned magnitude",
    "use_qalora": "QA-LoRA (use_qalora: true) pools the input groups of quantised layers",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer replication (layer_replication) changes the model's layers",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts only after its invocation tokens",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# init_lora_weights values that change the base weights themselves (or select a variant): such an
# adapter only applies to the modified base unless it was converted when saved.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")

# <module>.lora_A.weight, <module>.lora_B.weight, <module>.lora_B.bias, <module>.lora_embedding_A/B
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)$")
_HUB_CACHE_PATH = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})")


@dataclass(frozen=True)
class AdapterConfig:
    """What hfmerge uses of a PEFT LoRA ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None  # base_model_name_or_path
    revision: str | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The rank and alpha of one module, with peft's pattern rule (``get_pattern_key``)."""
        return _pattern_value(self.rank_pattern, module, self.r), _pattern_value(self.alpha_pattern, module, self.lora_alpha)

    def scale(self, module: str) -> float:
        """peft's ``scaling``: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict, module: str, default: Any) -> Any:
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return pattern[key]
    return default


def parse_adapter_config(raw: Any, *, source: str) -> AdapterConfig:
    """Validate a PEFT adapter config for merging.

    Raises:
        CheckpointError: Not a LoRA adapter, a LoRA variant that is not W + scale·B·A (DoRA, ...),
            an initialisation that changed the base weights, or malformed values.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise CheckpointError(f"{source}: has no peft_type; this is not a PEFT adapter config")
    if str(peft_type).upper() != "LORA":
        raise CheckpointError(f"{source}: peft_type is {peft_type!r}; only LoRA adapters (peft_type: LORA) can be merged. "
                              "Merge this adapter into its base with peft's merge_and_unload() and use the saved full model instead")
    for key, what in UNSUPPORTED_VARIANTS.items():
        if raw.get(key):
            hint = "; merge it into its base with peft's merge_and_unload(), save the full model and use that folder instead"
            raise CheckpointError(f"{source}: {what} is not supported, only plain LoRA (W + scale·B·A){hint}")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{source}: init_lora_weights is {init!r}, which changes the base weights (or selects a LoRA variant), so the adapter "
            "does not apply to the original base. Save it converted to plain LoRA (peft's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) or merge it with merge_and_unload() and use the full model"
        )
    r = raw.get("r", 8)
    alpha = raw.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointError(f"{source}: r is {r!r}; expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{source}: lora_alpha is {alpha!r}; expected a number")
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
            raise CheckpointError(f"{source}: {key} is {value!r}; expected a mapping of module patterns to numbers")
        for pat in value:
            try:
                re.compile(pat)
            except re.error as exc:
                raise CheckpointError(f"{source}: {key} key {pat!r} is not a valid regular expression ({exc})") from None
        if key == "rank_pattern" and any(not isinstance(v, int) or v <= 0 for v in value.values()):
            raise CheckpointError(f"{source}: rank_pattern is {value!r}; ranks must be positive integers")
        patterns[key] = dict(value)
    base = raw.get("base_model_name_or_path")
    revision = raw.get("revision")
    return AdapterConfig(
        r=r, lora_alpha=float(alpha), use_rslora=bool(raw.get("use_rslora", False)), fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=patterns["rank_pattern"], alpha_pattern=patterns["alpha_pattern"],
        base_model=str(base) if base else None, revision=str(revision) if revision else None,
    )


@dataclass(frozen=True)
class LowRankUpdate:
    """The update one base tensor receives: ``scale · B·A`` (transposed for [in, out] layouts),
    or ``scale · b`` for a LoRA bias (``lora_bias``)."""

    target: str  # base tensor name
    b: str  # adapter tensor names
    a: str | None  # None: a LoRA bias
    scale: float
    transpose: bool = False

    def delta(self, adapter: LocalCheckpoint) -> torch.Tensor:
        b = adapter.read(self.b).to(torch.float32)
        if self.a is None:
            return b * self.scale
        product = b @ adapter.read(self.a).to(torch.float32)
        return (product.T if self.transpose else product) * self.scale


class LoraCheckpoint:
    """A fine-tuned model given as a PEFT LoRA adapter of the base checkpoint; a `Checkpoint`:
    `tensors` (the base's names, shapes and dtypes), `read(name)`, `label`, `ref` (the adapter's,
    pinned), `folder` (the adapter's), `config` (the base's ``config.json``), `commit` (the
    adapter repo's, None for a local folder), `files` (the adapter's weights), `release()`.

    Attributes:
        base: The base checkpoint the adapter is applied to.
        adapter: The adapter's weights, opened header-only.
        adapter_config: The validated ``adapter_config.json``.
        updates: Low-rank updates by base tensor name.
        replacements: Base tensor name -> adapter tensor that replaces it (``modules_to_save``, biases).
        warnings: What the plan should report (e.g. a base that could only be matched by name).
        explicit_base: The reference named the model the adapter is applied to (``BASE+ADAPTER``);
            `ref` is then the adapter's, pinned, with the whole reference as its text.
        owns_base: `base` was opened for this adapter alone (``BASE+ADAPTER`` with a BASE other
            than the recipe's base_model) and is released with it.
    """

    format = "lora"

    def __init__(self, *, ref: ModelRef, label: str, folder: Path, base: Checkpoint, adapter: LocalCheckpoint,
                 adapter_config: AdapterConfig, updates: dict[str, LowRankUpdate], replacements: dict[str, str],
                 commit: str | None = None, warnings: list[str] | None = None, explicit_base: bool = False):
        self.ref = ref
        self.label = label
        self.folder = folder
        self.base = base
        self.adapter = adapter
        self.adapter_config = adapter_config
        self.updates = updates
        self.replacements = replacements
        self.commit = commit
        self.warnings = list(warnings or [])
        self.explicit_base = explicit_base
        self.owns_base = False

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    @property
    def config(self) -> dict:
        return self.base.config

    @property
    def files(self) -> list[Path]:
        return self.adapter.files

    @property
    def scratch(self) -> Path | None:
        return getattr(self.adapter, "scratch", None)

    @scratch.setter
    def scratch(self, value: Path | None) -> None:
        # Low-disk mode: the adapter's weights file goes to the scratch folder like any Hub shard.
        if hasattr(self.adapter, "scratch"):
            self.adapter.scratch = value

    def release(self) -> None:
        """Low-disk mode: delete the adapter's downloaded weights file (the recipe's base releases its
        own; a base opened for this adapter alone is released here)."""
        self.adapter.release()
        if self.owns_base:
            self.base.release()

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor of the fine-tuned model: W + scale·B·A in float32 where the adapter
        changes W (W being the adapter's own copy where it stores one), the adapter's tensor where
        it replaces W, the base's tensor elsewhere.

        Raises:
            CheckpointError: If the tensor is not in the base checkpoint.
        """
        if name not in self.base.tensors:
            raise CheckpointError(f"{self.label}: tensor {name!r} is not in the base checkpoint {self.base.label}")
        replacement = self.replacements.get(name)
        # A replaced tensor may be adapted too: peft saves a targeted embedding's own weight
        # (save_embedding_layers) beside its lora_embedding_A/B and applies the update on top.
        weight = self.adapter.read(replacement) if replacement is not None else self.base.read(name)
        update = self.updates.get(name)
        if update is None:
            return weight
        return weight.to(torch.float32) + update.delta(self.adapter)

    def __repr__(self) -> str:
        return f"LoraCheckpoint({self.label!r}, {len(self.updates)} updates, {len(self.replacements)} replacements)"


# -- opening ---------------------------------------------------------------------------------


def _read_config(path: Path, label: str) -> AdapterConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{label}: {path} is not valid JSON ({exc})") from None
    return parse_adapter_config(raw, source=f"{label}: {ADAPTER_CONFIG}")


def _pickle_weights(ref: ModelRef, label: str, folder: Path, path: Path) -> LocalCheckpoint:
    state = load_pickle(path, label)
    infos = {}
    for name, t in state.items():
        if t.dtype not in safe_dtype_names():
            raise CheckpointError(f"{label}: {path.name} tensor {name!r} has dtype {t.dtype}, which safetensors cannot name")
        infos[name] = TensorInfo(name, safe_dtype_names()[t.dtype], tuple(t.shape), path, 0, t.numel() * t.element_size())
    return LocalCheckpoint(ref, label, folder, infos, {}, format="pickle")


def _pickle_refused(label: str, where: str) -> CheckpointError:
    return CheckpointError(
        f"{label}: {where} holds only pickle adapter weights ({ADAPTER_PICKLE}); loading pickle can run arbitrary code, so hfmerge refuses it. "
        f"Convert the adapter to {ADAPTER_SAFE}, or set `allow_pickle: true` in the recipe to load it with torch.load(weights_only=True)"
    )


def _no_base(label: str, where: str, config: AdapterConfig) -> CheckpointError:
    named = f" (its adapter_config.json names {config.base_model})" if config.base_model else ""
    return CheckpointError(
        f"{label}: {where} is a PEFT LoRA adapter{named}, which hfmerge applies to the recipe's base_model. An adapter can only "
        f"be a `models` entry, and the recipe needs `base_model:` set to the model it was trained on{' (' + config.base_model + ')' if config.base_model else ''}"
        f"; or name that model in the reference: `{config.base_model or 'BASE'}+{where}`"
    )


def open_local_adapter(ref: ModelRef, *, label: str, base: Checkpoint | None, allow_pickle: bool = False,
                       allow_external_symlinks: bool = False, explicit_base: bool = False) -> LoraCheckpoint:
    """Open a local PEFT adapter folder header-only and check it against `base`.

    Args:
        ref: A local reference to a folder with ``adapter_config.json``.
        label: How messages name the model.
        base: The recipe's opened base checkpoint, which the adapter is applied to.
        allow_pickle: Accept ``adapter_model.bin`` (loaded with ``weights_only=True``).
        allow_external_symlinks: Follow symlinks that lead out of the folder (the recipe key).
        explicit_base: `base` was named by the reference (``BASE+ADAPTER``): an adapter made for
            another base is then a warning (see `check_adapter_base`).

    Returns:
        The adapter as the fine-tuned model it stands for.

    Raises:
        CheckpointError: No base, an unsupported adapter, missing or unreadable weights, a pickle
            adapter without ``allow_pickle``, a file that is a symlink out of the folder.
        IncompatibleCheckpointsError: The adapter was made for another base, or its tensors do not
            fit the base.
    """
    assert ref.path is not None
    folder = ref.path
    roots = [confinement_root(folder)]
    weights_file = ADAPTER_SAFE if (folder / ADAPTER_SAFE).is_file() else ADAPTER_PICKLE
    for name in (*SIDE_FILES, ADAPTER_CONFIG, weights_file):  # checked before anything is read, as for any local folder
        check_inside(folder / name, roots, label=label, allow_external=allow_external_symlinks)
    config = _read_config(folder / ADAPTER_CONFIG, label)
    if base is None:
        raise _no_base(label, str(folder), config)
    if (folder / ADAPTER_SAFE).is_file():
        infos, _ = read_header(folder / ADAPTER_SAFE)
        weights = LocalCheckpoint(ref, label, folder, infos, {})
    elif (folder / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise _pickle_refused(label, str(folder))
        weights = _pickle_weights(ref, label, folder, folder / ADAPTER_PICKLE)
    else:
        raise CheckpointError(f"{label}: {folder} has {ADAPTER_CONFIG} but no {ADAPTER_SAFE}; an adapter folder needs its weights beside its config")
    return bind_adapter(ref=ref, label=label, folder=folder, config=config, weights=weights, base=base, explicit_base=explicit_base)


def open_hub_adapter(snapshot: HubSnapshot, *, label: str, base: Checkpoint | None, allow_pickle: bool = False,
                     explicit_base: bool = False) -> LoraCheckpoint:
    """Open a PEFT adapter repo pinned by `pin_hub_repo`: its config and side files are downloaded,
    its safetensors header is read with range requests (the weights download when first read).

    Args:
        snapshot: The adapter repo, pinned.
        label: How messages name the model.
        base: The recipe's opened base checkpoint, which the adapter is applied to.
        allow_pickle: Accept ``adapter_model.bin`` (downloaded and loaded with ``weights_only=True``).
        explicit_base: As for `open_local_adapter`.

    Returns:
        The adapter as the fine-tuned model it stands for.

    Raises:
        CheckpointError, IncompatibleCheckpointsError: As `open_local_adapter`, and Hub failures.
    """
    ref, commit, sizes = snapshot.pinned, snapshot.commit, snapshot.sizes
    # Its small side files come along: a tokenizer_source may name the adapter.
    side = snapshot.download_small_files(label, (ADAPTER_CONFIG, *SIDE_FILES))
    folder = side[ADAPTER_CONFIG].parent
    config = _read_config(folder / ADAPTER_CONFIG, label)
    where = f"{ref.repo_id}@{commit}"
    if base is None:
        raise _no_base(label, where, config)
    if ADAPTER_SAFE in sizes:
        weights: LocalCheckpoint = HubCheckpoint(ref, label, folder, snapshot.read_header(ADAPTER_SAFE, label, folder), {}, commit=commit)
    elif ADAPTER_PICKLE in sizes:
        if not allow_pickle:
            raise _pickle_refused(label, where)
        path = download_file(ref, label, ADAPTER_PICKLE, commit)  # adapters are small: read it in the plan step
        weights = _pickle_weights(ref, label, path.parent, path)
    else:
        raise CheckpointError(f"{label}: {where} has {ADAPTER_CONFIG} but no {ADAPTER_SAFE}")
    return bind_adapter(ref=ref, label=label, folder=folder, config=config, weights=weights, base=base, commit=commit,
                        explicit_base=explicit_base)


def bind_adapter(*, ref: ModelRef, label: str, folder: Path, config: AdapterConfig, weights: LocalCheckpoint,
                 base: Checkpoint, commit: str | None = None, explicit_base: bool = False) -> LoraCheckpoint:
    """Check an opened adapter against `base` and map its tensors onto the base's (headers only).

    Raises:
        IncompatibleCheckpointsError: Another base, an adapted module the base lacks, shapes that
            do not fit, a rank that disagrees with the config, an unknown adapter tensor.
    """
    warnings: list[str] = []
    problem, note = check_adapter_base(config, base, explicit=explicit_base)
    if problem:
        raise IncompatibleCheckpointsError(f"{label}: {problem}")
    if note:
        warnings.append(f"{label}: {note}")
    updates, replacements = _map_tensors(config, weights.tensors, base, label, where=base.label if explicit_base else None)
    if not updates and not replacements:
        raise IncompatibleCheckpointsError(f"{label}: the adapter holds no LoRA tensors (lora_A / lora_B); nothing to merge")
    return LoraCheckpoint(ref=ref, label=label, folder=folder, base=base, adapter=weights, adapter_config=config,
                          updates=updates, replacements=replacements, commit=commit, warnings=warnings, explicit_base=explicit_base)


# -- base check ------------------------------------------------------------------------------


def _identity(text: str) -> tuple[str | None, str, str | None]:
    """(Hub id or None, name, commit from a cache path or None) of a model reference text."""
    cached = _HUB_CACHE_PATH.search(text)
    if cached:
        return f"{cached['org']}/{cached['name']}", cached["name"], cached["commit"]
    stripped = text.rstrip("/\\")
    local = text.startswith(("/", "./", "../", "~", "\\")) or "\\" in text or stripped.count("/") > 1 or not REPO_ID.match(stripped)
    name = re.split(r"[/\\]", stripped)[-1] if stripped else text
    return (None if local else stripped), name, None


def check_adapter_base(config: AdapterConfig, base: Checkpoint, *, explicit: bool = False) -> tuple[str | None, str | None]:
    """Compare the adapter's ``base_model_name_or_path`` (and ``revision``) with the model it is applied to.

    Two Hub ids must be equal (ignoring case); the same repo name under another owner is only a
    warning. A local path on either side can only be compared by its folder name (or by the repo
    id of a Hugging Face cache path): the same name is accepted, another name is a warning, since
    a local copy may be called anything. When the adapter names a revision and the base is on the
    Hub, base_model must be pinned to it.

    With `explicit` (``BASE+ADAPTER``: the reference itself names the model) what would be an
    error is a warning: applying an adapter to a sibling fine-tune of its base (an instruct
    model, say) is a deliberate choice there, and the shapes are still checked. A base that is
    itself an adapter applied to a model (``base_model: BASE+ADAPTER``) is compared by that model.

    Returns:
        (an error text or None, a warning text or None).
    """
    while isinstance(base, LoraCheckpoint):
        base = base.base
    base_ref = base.ref
    base_commit = base.commit
    role = "the model before '+'" if explicit else "base_model"
    if base_ref.repo_id:
        base_id: str | None = base_ref.repo_id
        base_name = base_ref.repo_id.split("/")[-1]
    else:
        base_id, base_name, base_commit = _identity(str(base_ref.path or base_ref.text))
    if not config.base_model:
        return None, f"the adapter's {ADAPTER_CONFIG} does not name its base model (base_model_name_or_path), so it cannot be checked against {role} {base_ref.text}"
    ad_id, ad_name, ad_commit = _identity(config.base_model)
    what = f"the adapter was trained on {config.base_model} ({ADAPTER_CONFIG}: base_model_name_or_path)"
    both_hub = ad_id is not None and base_ref.repo_id is not None
    problem = None
    if ad_id is None or base_id is None or ad_id.lower() != base_id.lower():
        if ad_name.lower() != base_name.lower():
            if not both_hub:
                return None, f"{what} and {role} is {base_ref.text}; their names differ, so check that they are the same model"
            pin = f"@{config.revision}" if config.revision else ""
            problem = f"{what}, but {role} is {base_ref.text}", f"Set `base_model: {config.base_model}{pin}`, or merge only adapters and models of one base"
        elif both_hub and "/" in ad_id and "/" in base_ref.repo_id:  # type: ignore[operator]
            return None, f"{what} and {role} is {base_ref.text}: the same name under another owner; assuming they are the same model"
    revision = config.revision or ad_commit
    if problem is None and revision and revision != "main" and base_ref.repo_id:
        asked = base_ref.text.partition("@")[2] or None
        is_prefix = bool(base_commit and re.fullmatch(r"[0-9a-f]{7,40}", revision) and base_commit.startswith(revision))
        if revision != asked and not is_prefix:
            problem = (f"{what} at revision {revision!r}, but {role} resolves to {asked or 'main'}{' (' + base_commit + ')' if base_commit else ''}",
                       f"Pin it: `base_model: {base_ref.repo_id}@{revision}`")
    if problem is None:
        return None, None
    if explicit:
        return None, f"{problem[0]}; the reference names that model, so the adapter is applied to it: check that it is the adapter's base or a fine-tune of it"
    return f"{problem[0]}. {problem[1]}", None


# -- tensor mapping --------------------------------------------------------------------------


def _strip(key: str) -> str:
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return name.replace(".base_layer.", ".")


def _resolve(name: str, base_tensors: dict[str, TensorInfo]) -> str | None:
    """The base tensor an adapter name refers to: the same name, or the one tensor whose name
    differs by a leading prefix (a model trained as `LlamaModel` against a `LlamaForCausalLM`
    checkpoint, or the reverse)."""
    if name in base_tensors:
        return name
    found = [n for n in base_tensors if n.endswith("." + name) or name.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def _stored_transposed(model_config: dict) -> dict[str, bool]:
    """Module name -> whether its weight is stored [in, out] (a `transformers` Conv1D), for every
    module of the base's architecture that has a weight; empty when it cannot be instantiated."""
    from transformers.pytorch_utils import Conv1D

    from .aliases import meta_model

    model, _ = meta_model(model_config)
    if model is None:
        return {}
    return {n: isinstance(m, Conv1D) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


def _layout(module: str, layouts: dict[str, bool]) -> bool | None:
    if module in layouts:
        return layouts[module]
    found = [v for n, v in layouts.items() if n.endswith("." + module) or module.endswith("." + n)]
    return found[0] if len(found) == 1 else None


def _map_tensors(config: AdapterConfig, adapter: dict[str, TensorInfo], base: Checkpoint,
                 label: str, where: str | None = None) -> tuple[dict[str, LowRankUpdate], dict[str, str]]:
    base_tensors = base.tensors
    where = where or f"base_model {base.label}"  # how messages name the model the adapter is applied to
    modules: dict[str, dict[str, str]] = {}
    replacements: dict[str, str] = {}
    for key, info in adapter.items():
        name = _strip(key)
        m = _LORA_KEY.match(name)
        if m:
            modules.setdefault(m["module"], {})[m["part"]] = key
            continue
        if ".lora_" in name or name.startswith("lora_"):
            kind = "DoRA magnitude vectors (use_dora)" if "lora_magnitude_vector" in name else "a LoRA variant hfmerge does not support"
            raise IncompatibleCheckpointsError(f"{label}: adapter tensor {key!r} belongs to {kind}; only plain LoRA (lora_A, lora_B) can be merged")
        target = _resolve(name, base_tensors)
        if target is None:
            raise IncompatibleCheckpointsError(f"{label}: adapter tensor {key!r} replaces {name!r}, which {where} does not have; is the adapter made for {config.base_model or 'another model'}?")
        if base_tensors[target].shape != info.shape:
            raise IncompatibleCheckpointsError(f"{label}: adapter tensor {key!r} has shape {list(info.shape)} but {where} stores {target!r} as {list(base_tensors[target].shape)}")
        replacements[target] = key

    updates: dict[str, LowRankUpdate] = {}
    layouts: dict[str, bool] | None = None  # looked up once, only for square weights
    for module, parts in sorted(modules.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            have, missing = (a_key or b_key), ("A" if a_key is None else "B")
            raise IncompatibleCheckpointsError(f"{label}: adapter tensor {have!r} has no matching lora_{'embedding_' if embedding else ''}{missing}; the adapter file is incomplete")
        a, b = adapter[a_key], adapter[b_key]
        if not (a.is_float and b.is_float):
            raise IncompatibleCheckpointsError(f"{label}: adapter tensors {a_key!r} / {b_key!r} are not floating point ({a.dtype}, {b.dtype})")
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise IncompatibleCheckpointsError(
                f"{label}: adapter tensors {a_key!r} {list(a.shape)} and {b_key!r} {list(b.shape)} are not matrices; "
                "LoRA on convolutions is not supported (only linear, Conv1D and embedding layers)"
            )
        r_cfg, _ = config.rank_and_alpha(module)
        if a.shape[0] != b.shape[1] or a.shape[0] != r_cfg:
            raise IncompatibleCheckpointsError(
                f"{label}: module {module!r} has lora A {list(a.shape)} and B {list(b.shape)} (rank {a.shape[0]}), but {ADAPTER_CONFIG} "
                f"gives it rank {r_cfg} (r / rank_pattern); the adapter's config and weights disagree"
            )
        target = _resolve(module + ".weight", base_tensors)
        if target is None:
            raise IncompatibleCheckpointsError(
                f"{label}: the adapter adapts module {module!r}, but {where} has no tensor {module + '.weight'!r}; "
                f"is the adapter made for {config.base_model or 'another model'}?"
            )
        shape = base_tensors[target].shape
        plain, flipped = (b.shape[0], a.shape[1]), (a.shape[1], b.shape[0])
        if embedding:
            fits = {True} if shape == flipped else set()
        else:
            fits = {t for t, s in ((False, plain), (True, flipped)) if shape == s}
        if not fits:
            raise IncompatibleCheckpointsError(
                f"{label}: module {module!r}: lora B {list(b.shape)} · A {list(a.shape)} gives a {list(plain)} update, "
                f"but {where} stores {target!r} as {list(shape)}; is the adapter made for {config.base_model or 'another model'}?"
            )
        if len(fits) == 1:
            transpose = fits.pop()
        else:  # a square weight: the layer type says how it is stored (peft sets fan_in_fan_out per layer)
            if layouts is None:
                layouts = _stored_transposed(base.config)
            known = _layout(module, layouts)
            transpose = config.fan_in_fan_out if known is None else known
        scale = config.scale(module)
        updates[target] = LowRankUpdate(target, b_key, a_key, scale, transpose)
        bias_key = parts.get("lora_B.bias")
        if bias_key is not None:
            bias_target = _resolve(module + ".bias", base_tensors)
            if bias_target is None:
                raise IncompatibleCheckpointsError(f"{label}: the adapter has a LoRA bias {bias_key!r} (lora_bias), but {where} has no tensor {module + '.bias'!r}")
            if base_tensors[bias_target].shape != adapter[bias_key].shape:
                raise IncompatibleCheckpointsError(f"{label}: LoRA bias {bias_key!r} has shape {list(adapter[bias_key].shape)} but {bias_target!r} is {list(base_tensors[bias_target].shape)}")
            updates[bias_target] = LowRankUpdate(bias_target, bias_key, None, scale)
    return updates, replacements
