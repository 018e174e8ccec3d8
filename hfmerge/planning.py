"""The plan step: everything that can be wrong is found here, before any weight is read.

Opens every checkpoint header-only, maps each output tensor to the name it has in every model
(tied aliases resolved), checks names, shapes and dtypes across models, checks Fisher files,
and estimates memory and output size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .checkpoints import Checkpoint, open_checkpoint
from .checkpoints.aliases import state_dict_order, tied_groups
from .checkpoints.reader import LocalCheckpoint
from .checkpoints.safetensors_header import DTYPE_SIZES, TensorInfo, read_header
from .checkpoints.writer import OutputTensor
from .errors import CheckpointError, FisherFileError, IncompatibleCheckpointsError, RecipeError
from .recipe import Recipe, ref_identity
from .refs import ModelRef
from .tokenizer import (
    AlignInput, AlignmentError, TokenizerLoadError, VocabularyAlignment, auto_chat_template, build_alignment, is_vocabulary_tensor,
    load_tokenizer, vocab_size_key, vocabulary_rows,
)

# The Python process with torch loaded, measured on CPU; added to the estimate of peak memory.
PROCESS_BASELINE_BYTES = 350 * 2**20


@dataclass(frozen=True)
class FisherFile:
    """A per-model Fisher file (safetensors with the checkpoint's tensor names), header only."""

    path: Path
    tensors: dict[str, TensorInfo]
    label: str

    def read(self, name: str):
        return LocalCheckpoint(ModelRef(str(self.path), path=self.path.parent), self.label, self.path.parent, self.tensors, {}).read(name)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where to read it in every input, and how to write it."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base_source: str | None  # name in the base checkpoint (None: the method gets no base)
    sources: tuple[str, ...]  # name in each model that feeds it (`inputs`)
    fisher_sources: tuple[str, ...] | None
    merge: bool  # False: a non-float tensor copied from the reference model
    alias_key: str  # the canonical name of its tied group (itself when untied)
    depth: float = 0.0  # relative depth t in [0, 1] for gradient parameters
    inputs: tuple[int, ...] | None = None  # indices into the plan's models, one per source; None: all, in order
    slice: int | None = None  # index into the recipe's slices whose sources' settings apply
    vocabulary: bool = False  # token-indexed rows, re-indexed to the output vocabulary when read

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Frozen, compared by identity: a plan owns opened checkpoints (their download state may change
# as shards are read and released), but no field is reassigned once the plan is built. A run
# that learns more later (Fishers computed, coefficients searched) derives a new plan from it.
@dataclass(frozen=True, eq=False)
class MergePlan:
    """Everything a merge reads, resolved and checked: build it with `build_plan`, derive new
    plans with `with_fishers` and `with_coefficients`."""

    recipe: Recipe
    base: Checkpoint | None
    models: list[Checkpoint]
    fishers: list[FisherFile] | None
    tensors: list[TensorPlan]
    config_source: Checkpoint
    tokenizer_folder: Path
    warnings: list[str] = field(default_factory=list)
    scratch: Path | None = None  # low-disk download folder, removed by `release`
    config_overrides: tuple[tuple[tuple[str, ...], Any], ...] = ()  # (key path, value) set in the output config.json
    group_of: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)  # tied aliases of each name
    node_layout: Any = None  # fisher.nodes.NodeLayout for methods weighing by mask nodes
    vocabulary: VocabularyAlignment | None = None  # the inputs' re-indexing to the output vocabulary
    output_tokenizer: Any = None  # a transformers tokenizer saved with the merge (None: the files are copied)

    def release(self) -> None:
        """Delete low-disk downloads (a later read downloads again)."""
        for ckpt in ([self.base] if self.base is not None else []) + self.models:
            ckpt.release()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    @property
    def search_space(self) -> tuple:
        """The recipe's searched parameters (`recipe.SearchRange`), resolved when the recipe was
        validated; each trial of the search derives a plan with them fixed."""
        return self.recipe.search_space

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]

    def inputs_of(self, t: TensorPlan) -> list[Checkpoint]:
        """The models whose tensors `t.sources` names, in that order."""
        return self.models if t.inputs is None else [self.models[i] for i in t.inputs]

    def vocabulary_group(self, t: TensorPlan) -> tuple[int, ...]:
        """The inputs of `t` as indices into base-then-models (the vocabulary alignment's order)."""
        return _vocabulary_group(self.base is not None, len(self.models), t.base_source is not None, t.inputs)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def output_tensors(self) -> list[OutputTensor]:
        return [OutputTensor(t.name, t.shape, t.out_dtype) for t in self.tensors]

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.output_tensors)

    def estimated_peak_bytes(self) -> int:
        """Peak memory of the streaming merge: the largest tensor position in flight.

        Per position: every input as read (a float32 copy too when stored in another dtype),
        the Fisher tensors likewise (RegMean's Gram matrices, in × in, per model), the method's float32 work space (the stacked task vectors
        plus a few single-tensor temporaries: magnitudes, masks, the running sums) and the
        output in float32 and output dtype; plus the inputs of the next position (read ahead
        while this one merges), the previous output (still being written) and the process
        itself.
        """
        method = self.recipe.method
        inputs: list[int] = []
        work: list[int] = []
        for t in self.tensors:
            m = len(t.sources)
            n_inputs = m + (1 if self.base is not None else 0)
            n_imp = m if method.needs_importance and method.importance == "diagonal" else 0
            name = t.base_source or t.sources[0]
            stored = DTYPE_SIZES[self.reference.tensors[name].dtype] if name in self.reference.tensors else 4
            per_input = 4 if stored == 4 else stored + 4
            gram = 0
            if method.needs_importance and method.importance == "gram" and len(t.shape) == 2:
                # the M Gram matrices [in, in] as read and in float32, their sum and the solve's factor
                gram = (2 * m + 3) * t.shape[1] ** 2 * 4
            inputs.append(t.numel * n_inputs * per_input)
            work.append(t.numel * ((n_inputs + n_imp) * per_input + (m + 8) * 4 + 4 + DTYPE_SIZES[t.out_dtype]) + gram)
        worst = 0
        for i, w in enumerate(work):
            ahead = inputs[i + 1] if i + 1 < len(inputs) else 0
            behind = self.tensors[i - 1].numel * DTYPE_SIZES[self.tensors[i - 1].out_dtype] if i else 0
            worst = max(worst, w + ahead + behind)
        return PROCESS_BASELINE_BYTES + worst


def _label(key: str, ref: ModelRef) -> str:
    return f"{key} ({ref.text})"


def _open(ref: ModelRef, key: str, recipe: Recipe, base: Checkpoint | None = None, scratch: Path | None = None) -> Checkpoint:
    # `base`: what a PEFT adapter among the models is applied to (checkpoints/lora.py).
    return open_checkpoint(ref, label=_label(key, ref), allow_pickle=recipe.allow_pickle, base=base,
                           allow_external_symlinks=recipe.allow_external_symlinks, scratch=scratch)


def _model_of(ckpt: Checkpoint) -> Checkpoint:
    """The full checkpoint under a LoRA adapter (itself for any other checkpoint)."""
    while getattr(ckpt, "format", "") == "lora":
        ckpt = ckpt.base  # type: ignore[attr-defined]
    return ckpt


def _tokenizer_folder_of(ckpt: Checkpoint) -> Path:
    """Where a checkpoint's tokenizer is: its folder, or for a LoRA adapter without one (no
    tokenizer.json nor tokenizer_config.json beside it), its model's."""
    if any((ckpt.folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return ckpt.folder
    return _model_of(ckpt).folder


def _open_fisher(path: Path, label: str) -> FisherFile:
    if not path.is_file():
        raise FisherFileError(f"{label}: Fisher file {path} not found")
    try:
        infos, _ = read_header(path)
    except CheckpointError as exc:
        raise FisherFileError(f"{label}: Fisher file {exc}") from None
    return FisherFile(path, infos, label)


# The first numeric path component is the layer index ("model.layers.3.", "encoder.block.3.").
_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def relative_depths(names: list[str]) -> dict[str, float]:
    """Relative depth t of each tensor, as mergekit evaluates gradients: layer i of L has
    t = i / (L − 1) (1 when L = 1); every tensor outside the layers (embeddings, final norm,
    output head) has t = 0, as mergekit gives the tensors before and after its layer slices.
    Layer stacks are told apart by the name before the index, so an encoder and a decoder
    each span [0, 1]."""
    sizes: dict[str, int] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            sizes[m.group(1)] = max(sizes.get(m.group(1), 0), int(m.group(2)) + 1)
    depths = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            count = sizes[m.group(1)]
            depths[n] = int(m.group(2)) / (count - 1) if count > 1 else 1.0
        else:
            depths[n] = 0.0
    return depths


def _find(name: str, stored: dict[str, TensorInfo], group: frozenset[str] | None) -> str | None:
    if name in stored:
        return name
    if group:
        for alias in sorted(group):
            if alias in stored:
                return alias
    return None


def _vocabulary_group(has_base: bool, n_models: int, with_base: bool, inputs: tuple[int, ...] | None) -> tuple[int, ...]:
    offset = 1 if has_base else 0
    models = tuple(offset + i for i in (inputs if inputs is not None else range(n_models)))
    return ((0,) if with_base else ()) + models


def _position(recipe: Recipe, name: str, found: list[tuple[Checkpoint, str]], *, with_base: bool, depth: float, alias_key: str,
              inputs: tuple[int, ...] | None = None, slice_index: int | None = None, vocabulary_rows_out: int | None = None) -> TensorPlan:
    """One output tensor read from `found` (checkpoint, stored name) pairs, the base's first
    when `with_base`: their shapes and dtype kinds must agree, except the number of rows of a
    tensor indexed by token when the vocabularies are re-indexed to `vocabulary_rows_out`."""
    def where(ckpt: Checkpoint, src: str) -> str:
        return ckpt.label if src == name else f"{ckpt.label} ({src!r})"

    infos = [ckpt.tensors[src] for ckpt, src in found]
    token_rows = not _LAYER.match(name) and all(is_vocabulary_tensor(src, i.shape, vocabulary_rows(ckpt.config))
                                                for (ckpt, src), i in zip(found, infos))
    shape = infos[0].shape
    if token_rows and vocabulary_rows_out is not None and len({i.shape[1:] for i in infos}) == 1:
        shape = (vocabulary_rows_out, *shape[1:])  # every input re-indexed to the output vocabulary
    elif len({i.shape for i in infos}) > 1:
        detail = "; ".join(f"{where(ckpt, src)}: {list(i.shape)}" for (ckpt, src), i in zip(found, infos))
        hint = ("; the models' vocabulary sizes differ: set tokenizer_source (union, base or a model) to re-index them to one vocabulary"
                if token_rows else "; these checkpoints are not fine-tunes of one architecture")
        raise IncompatibleCheckpointsError(f"tensor {name!r} has different shapes across models ({detail}){hint}")
    if len({i.is_float for i in infos}) > 1:
        detail = "; ".join(f"{where(ckpt, src)}: {i.dtype}" for (ckpt, src), i in zip(found, infos))
        raise IncompatibleCheckpointsError(f"tensor {name!r} is floating point in some models and not in others ({detail}); a non-float tensor cannot be merged")
    info = infos[0]
    names = [src for _, src in found]
    return TensorPlan(
        name=name, shape=shape, out_dtype=(recipe.out_dtype or info.dtype) if info.is_float else info.dtype,
        base_source=names[0] if with_base else None, sources=tuple(names[1:] if with_base else names), fisher_sources=None,
        merge=info.is_float, alias_key=alias_key, depth=depth, inputs=inputs, slice=slice_index,
        vocabulary=token_rows and vocabulary_rows_out is not None,
    )


def _missing_error(missing: list[tuple[str, str]], reference: Checkpoint) -> IncompatibleCheckpointsError:
    shown = "; ".join(f"{n!r} missing in {label}" for n, label in missing[:5])
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    return IncompatibleCheckpointsError(f"checkpoints do not hold the same tensors: {shown}{more}. Every model must be a fine-tune of {reference.label}")


def _in_file_order(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensor names in the order they are stored (reads run forward)."""
    return [i.name for i in sorted(ckpt.tensors.values(), key=lambda i: (str(i.file), i.begin))]


def _whole_model_tensors(recipe: Recipe, inputs: list[Checkpoint], reference: Checkpoint,
                         group_of: dict[str, frozenset[str]], out_rows: int | None = None) -> list[TensorPlan]:
    """A `models:` recipe: every tensor of the reference, read at the same name (or a tied
    alias) in every input."""
    ordered = _in_file_order(reference)
    depths = relative_depths(ordered)
    tensors: list[TensorPlan] = []
    missing: list[tuple[str, str]] = []
    for name in ordered:
        group = group_of.get(name)
        found = [(ckpt, _find(name, ckpt.tensors, group)) for ckpt in inputs]
        missing += [(name, ckpt.label) for ckpt, src in found if src is None]
        if all(src is not None for _, src in found):
            tensors.append(_position(recipe, name, found, with_base=recipe.base is not None, depth=depths[name],  # type: ignore[arg-type]
                                     alias_key=min(group) if group else name, vocabulary_rows_out=out_rows))
    if missing:
        raise _missing_error(missing, reference)
    return tensors


@dataclass(frozen=True)
class _LayerStack:
    """A checkpoint's numbered layers: ``<prefix>.<index>.<rest>``, and the names outside them."""

    prefix: str
    layers: dict[int, list[str]]  # index -> the rest of each name, in file order
    outside: list[str]

    @property
    def count(self) -> int:
        return max(self.layers) + 1


def _layer_stack(ckpt: Checkpoint) -> _LayerStack:
    stacks: dict[str, dict[int, list[str]]] = {}
    outside = []
    for name in _in_file_order(ckpt):
        m = _LAYER.match(name)
        if m:
            stacks.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append(name[m.end():])
        else:
            outside.append(name)
    if len(stacks) != 1:
        found = "no tensor name has a layer index" if not stacks else f"it has {len(stacks)} layer stacks ({', '.join(sorted(stacks))})"
        raise IncompatibleCheckpointsError(f"{ckpt.label}: slices stack numbered layers (<prefix>.<index>.<name>), but {found}; "
                                           "slices need a model with one stack of layers")
    prefix, layers = next(iter(stacks.items()))
    return _LayerStack(prefix, layers, outside)


def _before_layers(reference: Checkpoint, names: list[str], group_of: dict[str, frozenset[str]]) -> dict[str, bool]:
    """Whether each tensor outside the layers comes before them (embeddings) or after (final
    norm, output head), by the order of the architecture's parameters (built on the meta
    device, cached with the tie groups); for a name it cannot place, by whether the name says it is an embedding
    (``embed``, ``wte``, ``wpe``)."""
    order = state_dict_order(reference.config)
    first_layer = next((i for i, k in enumerate(order) if _LAYER.match(k)), len(order))

    def position(name: str) -> int | None:
        for alias in [name, *sorted(group_of.get(name) or ())]:
            for i, k in enumerate(order):
                if k == alias or k.endswith("." + alias) or alias.endswith("." + k):
                    return i
        return None

    def by_name(name: str) -> bool:
        parts = name.split(".")
        return any("embed" in p and p != "embed_out" for p in parts) or any(p in ("wte", "wpe") for p in parts)

    placed = {n: position(n) for n in names}
    return {n: (i < first_layer) if i is not None else by_name(n) for n, i in placed.items()}


def _slice_tensors(recipe: Recipe, base: Checkpoint | None, models: list[Checkpoint], reference: Checkpoint,
                   group_of: dict[str, frozenset[str]], out_rows: int | None = None) -> tuple[list[TensorPlan], list[tuple[Checkpoint, int]]]:
    """A `slices:` recipe: the tensors before the layers from the first slice's sources, each
    slice's layers renumbered consecutively, the tensors after the layers from the last
    slice's sources (mergekit's layout). Every layer range is checked against its checkpoint.

    Returns:
        The tensors, and for each output layer the checkpoint and layer it is modelled on (the
        slice's first input), whose config describes it.
    """
    stacks: dict[int, _LayerStack] = {}

    def stack(ckpt: Checkpoint) -> _LayerStack:
        if id(ckpt) not in stacks:
            stacks[id(ckpt)] = _layer_stack(ckpt)
        return stacks[id(ckpt)]

    def readers(index: int) -> list[tuple[Checkpoint, Any]]:
        sl = recipe.slices[index]
        pairs = [(models[i], spec) for spec, i in zip(sl.sources, sl.inputs)]
        return ([(base, sl.base)] if sl.base is not None else []) + pairs

    prefix = stack(readers(0)[0][0]).prefix
    for index in range(len(recipe.slices)):
        for ckpt, spec in readers(index):
            layers = stack(ckpt)
            start, end = spec.layer_range
            if layers.prefix != prefix:
                raise IncompatibleCheckpointsError(f"{ckpt.label}: its layers are {layers.prefix}.<index>, but {readers(0)[0][0].label}'s are "
                                                   f"{prefix}.<index>; slices stack layers of one architecture")
            if end > layers.count:
                raise RecipeError(f"{recipe.source}: {spec.key}.layer_range: [{start}, {end}] is out of range; {ckpt.label} has "
                                  f"{layers.count} layers (0 to {layers.count - 1}, the range's end is exclusive)")

    def outside(index: int, names: list[str]) -> list[TensorPlan]:
        found_all, missing = [], []
        sl = recipe.slices[index]
        for name in names:
            group = group_of.get(name)
            found = [(ckpt, _find(name, ckpt.tensors, group)) for ckpt, _ in readers(index)]
            missing += [(name, ckpt.label) for ckpt, src in found if src is None]
            if all(src is not None for _, src in found):
                found_all.append(_position(recipe, name, found, with_base=sl.base is not None, depth=0.0,  # type: ignore[arg-type]
                                           alias_key=min(group) if group else name, inputs=sl.inputs, slice_index=index,
                                           vocabulary_rows_out=out_rows))
        if missing:
            raise _missing_error(missing, reference)
        return found_all

    names = stack(reference).outside
    before = _before_layers(reference, names, group_of)
    tensors = outside(0, [n for n in names if before[n]])
    origins: list[tuple[Checkpoint, int]] = []
    for index, sl in enumerate(recipe.slices):
        rd = readers(index)
        n = sl.length
        for offset in range(n):
            layer = [(ckpt, stack(ckpt), spec.layer_range[0] + offset) for ckpt, spec in rd]
            first_ckpt, first, first_index = layer[0]
            out_layer = len(origins)
            origins.append((first_ckpt, first_index))
            rest = first.layers.get(first_index, [])
            for ckpt, layers, i in layer:
                if sorted(layers.layers.get(i, [])) != sorted(rest):
                    raise IncompatibleCheckpointsError(f"layer {i} of {ckpt.label} does not hold the same tensors as layer {first_index} of "
                                                       f"{first_ckpt.label}; the sources of {sl.key} must have layers of one architecture")
            for suffix in rest:
                name = f"{prefix}.{out_layer}.{suffix}"
                found = [(ckpt, f"{layers.prefix}.{i}.{suffix}") for ckpt, layers, i in layer]
                tensors.append(_position(recipe, name, found, with_base=sl.base is not None, depth=offset / (n - 1) if n > 1 else 1.0,
                                         alias_key=name, inputs=sl.inputs, slice_index=index))
    return tensors + outside(len(recipe.slices) - 1, [n for n in names if not before[n]]), origins


# The key of config.json that holds the number of layers, in the order they are looked for.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _config_scope(config: Any, scope: tuple[str, ...]) -> dict | None:
    for key in scope:
        config = config.get(key) if isinstance(config, dict) else None
    return config if isinstance(config, dict) else None


def _stacked_config(config_ckpt: Checkpoint, origins: list[tuple[Checkpoint, int]]) -> tuple[tuple[tuple[str, ...], Any], ...]:
    """What the output config.json changes for a stacked model: its layer count (the top level
    of config.json, else its ``text_config``), and every per-layer list beside it (a key with
    ``layer`` in its name holding one entry per layer, such as ``layer_types``) rebuilt from the
    entry of the layer each output layer is modelled on, in that model's config."""
    total = len(origins)
    for scope in ((), ("text_config",)):
        config = _config_scope(config_ckpt.config, scope)
        key = next((k for k in LAYER_COUNT_KEYS if config is not None and isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)
        if config is None or key is None:
            continue
        count = config[key]
        overrides: list[tuple[tuple[str, ...], Any]] = [(scope + (key,), total)]
        for name, value in config.items():
            if "layer" not in name or not isinstance(value, list) or len(value) != count:
                continue
            entries = []
            for ckpt, layer in origins:
                own = _config_scope(ckpt.config, scope) or {}
                listed = own.get(name)
                if not isinstance(listed, list) or len(listed) <= layer:
                    raise IncompatibleCheckpointsError(f"{config_ckpt.label}: config.json lists {name} per layer, but {ckpt.label}'s config.json "
                                                       f"has no entry for its layer {layer}; the stacked model's {name} cannot be written")
                entries.append(listed[layer])
            overrides.append((scope + (name,), entries))
        return tuple(overrides)
    raise IncompatibleCheckpointsError(f"{config_ckpt.label}: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)}, at the top level "
                                       f"or under text_config); a slices: recipe must set it to the stacked model's {total} layers")


def build_plan(recipe: Recipe, *, low_disk: bool = False) -> MergePlan:
    """Open every input header-only and check that the merge can run.

    Args:
        recipe: The validated recipe.
        low_disk: Download Hub shards into a scratch folder instead of the Hugging Face cache,
            keeping at most one shard per model on disk (deleted when the next is needed).

    Raises:
        CheckpointError: A checkpoint or Fisher file cannot be read.
        IncompatibleCheckpointsError: Names, shapes or dtypes disagree.
    """
    refs = [recipe.base, *(m.ref for m in recipe.models)]
    remote = any(not part.is_local for r in refs if r is not None for part in r.parts)
    scratch = Path(tempfile.mkdtemp(prefix="hfmerge-low-disk-")) if low_disk and remote else None
    try:
        return _build_plan(recipe, scratch)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)  # the plan that would own it was never made
        raise


def _build_plan(recipe: Recipe, scratch: Path | None) -> MergePlan:
    def input_scratch(i: int) -> Path | None:
        return scratch / f"input-{i}" if scratch is not None else None

    base = _open(recipe.base, "base_model", recipe, scratch=input_scratch(0)) if recipe.base is not None else None
    models = [_open(m.ref, f"{m.key}.model", recipe, base, scratch=input_scratch(i)) for i, m in enumerate(recipe.models, start=1)]
    reference = base if base is not None else models[0]
    inputs = ([base] if base is not None else []) + models
    warnings: list[str] = [w for c in inputs for w in getattr(c, "warnings", ())]  # e.g. an adapter's base matched by name only

    groups, alias_warning = tied_groups(reference.config)
    if alias_warning:
        warnings.append(f"{reference.label}: {alias_warning}")
    group_of: dict[str, frozenset[str]] = {n: g for g in groups for n in g}

    tokenizer_folder = _tokenizer_folder(recipe, inputs, reference)
    vocabulary = _alignment(recipe, inputs, tokenizer_folder, warnings)
    out_rows = vocabulary.rows if vocabulary is not None else None
    if recipe.slices:
        tensors, origins = _slice_tensors(recipe, base, models, reference, group_of, out_rows)
    else:
        tensors, origins = _whole_model_tensors(recipe, inputs, reference, group_of, out_rows), []

    covered = {n for t in tensors for n in (t.name, *((group_of.get(t.name) or ())))}
    for ckpt in inputs if not recipe.slices else ():  # a slice reads only some layers of its sources
        extra = sorted(set(ckpt.tensors) - covered)
        if extra:
            warnings.append(f"{ckpt.label}: {len(extra)} tensor(s) not in {reference.label} are ignored, e.g. {extra[0]!r}")
    if not any(t.merge for t in tensors):
        raise IncompatibleCheckpointsError(f"{reference.label}: no floating-point tensor to merge")

    warnings.extend(recipe.warnings)  # the method's advice (its `validate` hook)

    config_ckpt = reference
    if recipe.config_source is not None:
        config_ckpt = next((c for c in inputs if c.ref.text == recipe.config_source.text), None) or _open(recipe.config_source, "config_source", recipe)
    config_ckpt = _model_of(config_ckpt)  # an adapter's config.json is its model's
    overrides = _stacked_config(config_ckpt, origins) if recipe.slices else ()
    if vocabulary is not None:
        if not any(t.vocabulary for t in tensors):
            raise IncompatibleCheckpointsError(f"{recipe.source}: {recipe.tokenizer.key}: no tensor of {reference.label} has one row per token "  # type: ignore[union-attr]
                                               f"(vocab_size {vocabulary.input_rows[0]}); its vocabulary cannot be re-indexed")
        overrides += ((vocab_size_key(config_ckpt.config) or ("vocab_size",), vocabulary.rows),)
    node_layout = None
    if recipe.method.needs_importance and recipe.method.importance == "nodes":
        from .fisher.nodes import layout_from_config

        node_layout = layout_from_config(reference.config, reference.label)
    fishers = None
    given = [m.fisher for m in recipe.models]
    if recipe.method.needs_importance and all(f is not None for f in given):
        fishers, tensors = _checked_fishers(recipe, models, tensors, group_of, node_layout, given,  # type: ignore[arg-type]
                                            [f"{recipe.source}: {m.key}.fisher" for m in recipe.models])
    return MergePlan(recipe, base, models, fishers, tensors, config_ckpt, tokenizer_folder, warnings, scratch,
                     group_of=group_of, node_layout=node_layout, config_overrides=overrides, vocabulary=vocabulary,
                     output_tokenizer=_output_tokenizer(recipe, inputs, vocabulary, tokenizer_folder, warnings))


def _tokenizer_folder(recipe: Recipe, inputs: list[Checkpoint], reference: Checkpoint) -> Path:
    """The folder of the tokenizer the output starts from."""
    if recipe.tokenizer_source is None:
        return _tokenizer_folder_of(reference)
    match = next((c for c in inputs if c.ref.text == recipe.tokenizer_source.text), None)
    if match is not None:
        return _tokenizer_folder_of(match)
    if recipe.tokenizer_source.is_local and recipe.tokenizer_source.path is not None and recipe.tokenizer_source.path.is_dir():
        return recipe.tokenizer_source.path
    key = "tokenizer.source" if recipe.tokenizer is not None and recipe.tokenizer.key == "tokenizer" else "tokenizer_source"
    raise CheckpointError(f"{recipe.source}: {key}: folder {recipe.tokenizer_source.text!r} not found")


def _vocabulary_groups(recipe: Recipe) -> list[tuple[int, ...]]:
    """The groups of inputs that feed the vocabulary tensors together: all of them, or for
    slices the first slice's sources (embeddings) and the last one's (output head)."""
    has_base, n = recipe.base is not None, len(recipe.models)
    if not recipe.slices:
        return [_vocabulary_group(has_base, n, has_base, None)]
    ends = (recipe.slices[0], recipe.slices[-1])
    return [_vocabulary_group(has_base, n, sl.base is not None, sl.inputs) for sl in ends]


def _alignment(recipe: Recipe, inputs: list[Checkpoint], tokenizer_folder: Path, warnings: list[str]) -> VocabularyAlignment | None:
    """The inputs' re-indexing to the output vocabulary, when the recipe asks for one: always
    for ``union`` and a ``tokenizer`` block, where the vocabulary sizes differ for an explicit
    ``tokenizer_source``."""
    settings = recipe.tokenizer
    rows = [vocabulary_rows(c.config) for c in inputs]
    if settings is None or (not settings.always and len(set(rows)) <= 1):
        return None
    where = f"{recipe.source}: {settings.key}"
    for ckpt, r in zip(inputs, rows):
        if r is None:
            raise CheckpointError(f"{where}: {ckpt.label}: config.json has no vocab_size; the vocabulary cannot be re-indexed")
    if recipe.method.needs_importance:
        raise IncompatibleCheckpointsError(f"{where}: re-indexing vocabularies is not supported with merge_method {recipe.method.name!r}, "
                                           "which weighs by Fishers of the models' own tensors")
    refs = ([recipe.base] if recipe.base is not None else []) + [m.ref for m in recipe.models]
    identities = [ref_identity(r) for r in refs]
    align_inputs = [AlignInput(ident, c.label, _tokenizer_folder_of(c), r) for ident, c, r in zip(identities, inputs, rows)]  # type: ignore[arg-type]

    def input_of(ref: ModelRef) -> int:
        ident = ref_identity(ref)
        return identities.index(ident) if ident in identities else -1

    def warn(message: str) -> None:
        if message not in warnings:
            warnings.append(message)

    source_rows = None
    config_path = tokenizer_folder / "config.json"
    if config_path.is_file():
        try:
            source_rows = vocabulary_rows(json.loads(config_path.read_text()))
        except (OSError, ValueError, AttributeError):
            source_rows = None
    try:
        return build_alignment(settings, align_inputs, base_index=0 if recipe.base is not None else None, input_of=input_of,
                               groups=_vocabulary_groups(recipe), source_folder=tokenizer_folder, source_rows=source_rows, warn=warn)
    except TokenizerLoadError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except AlignmentError as exc:
        raise RecipeError(f"{recipe.source}: {exc.key}: {exc}") from None


def _output_tokenizer(recipe: Recipe, inputs: list[Checkpoint], vocabulary: VocabularyAlignment | None, tokenizer_folder: Path,
                      warnings: list[str]) -> Any:
    """The tokenizer the merge saves (the built one, with the recipe's chat template), or None
    when the tokenizer files are copied as they are."""
    template = recipe.chat_template
    if template == "auto":
        template = auto_chat_template(list(dict.fromkeys(c.folder for c in inputs)))  # each model once, as mergekit
        if template is None:
            warnings.append(f"{recipe.source}: chat_template: auto: no merged model's tokenizer has a chat template; none is set")
    tokenizer = vocabulary.tokenizer if vocabulary is not None else None
    if template is not None:
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(tokenizer_folder)
            except TokenizerLoadError as exc:
                raise CheckpointError(f"{recipe.source}: chat_template: the template is saved with the tokenizer, but there is {exc}") from None
        tokenizer.chat_template = template
    return tokenizer


def with_fishers(plan: MergePlan, paths: list[Path], labels: list[str] | None = None) -> MergePlan:
    """A new plan: `plan` with one Fisher file per model, checked against the checkpoints.

    The new plan shares `plan`'s opened checkpoints and scratch folder (releasing either
    releases both); `plan` itself is left as it was.

    Args:
        plan: From `build_plan`.
        paths: One Fisher file per model, in the recipe's order.
        labels: How each file is named in messages (default: the recipe's ``models[i].fisher``).

    Returns:
        The plan whose merge weighs by these Fishers.

    Raises:
        FisherFileError: A file is missing, unreadable or does not match.
    """
    labels = labels or [f"{plan.recipe.source}: {m.key}.fisher" for m in plan.recipe.models]
    fishers, tensors = _checked_fishers(plan.recipe, plan.models, plan.tensors, plan.group_of, plan.node_layout, paths, labels)
    return replace(plan, fishers=fishers, tensors=tensors)


def with_coefficients(plan: MergePlan, lambdas: list[float], fisher_paths: list[Path] | None = None,
                      fisher_labels: list[str] | None = None) -> MergePlan:
    """A new plan: `plan` with every model's ``weight`` fixed (and, given, its Fisher file).

    Its recipe is an ordinary recipe with the coefficients written in, echoed that way into
    the output so that it reproduces the merge without searching again.

    Args:
        plan: From `build_plan` (a search recipe).
        lambdas: One weight per model, in the recipe's order.
        fisher_paths: One Fisher file per model, or None to merge without Fishers.
        fisher_labels: How each Fisher file is named in messages.

    Returns:
        The plan of the final merge, sharing `plan`'s opened checkpoints.

    Raises:
        FisherFileError: A Fisher file is missing, unreadable or does not match.
    """
    recipe = plan.recipe
    raw = json.loads(json.dumps(recipe.raw))
    raw["models"] = [{"model": m.ref.text, "parameters": {"weight": float(lam)}} for m, lam in zip(recipe.models, lambdas)]
    fixed = replace(recipe, models=[replace(m, parameters={**m.parameters, "weight": float(lam)}) for m, lam in zip(recipe.models, lambdas)], raw=raw)
    derived = replace(plan, recipe=fixed)
    return with_fishers(derived, fisher_paths, fisher_labels) if fisher_paths is not None else derived


def _checked_fishers(recipe: Recipe, models: list[Checkpoint], tensors: list[TensorPlan], group_of: dict[str, frozenset[str]],
                     node_layout: Any, paths: list[Path], labels: list[str]) -> tuple[list[FisherFile], list[TensorPlan]]:
    """Open one Fisher file per model (header only) and check it against the checkpoints.

    A diagonal Fisher must hold every merged tensor (or a tied alias) with its shape; a node
    Fisher every head and neuron group of the architecture; Gram files are checked by
    `_checked_grams`.

    Returns:
        The opened files and the tensors with their names in each file (unchanged for nodes).

    Raises:
        FisherFileError: A file is missing, unreadable or does not match.
    """
    fishers = [_open_fisher(Path(p), label) for p, label in zip(paths, labels)]
    if recipe.method.importance == "nodes":
        for fisher, model_ckpt in zip(fishers, models):
            for unit in node_layout.units:
                info = fisher.tensors.get(unit.key)
                if info is None:
                    raise FisherFileError(f"{fisher.label}: {fisher.path.name} has no node Fisher {unit.key!r}; compute it for {model_ckpt.label} "
                                          "with hfmerge.compute_fishers (the `hfmerge fisher` command)")
                if info.shape != (unit.size,):
                    raise FisherFileError(f"{fisher.label}: {unit.key!r} has shape {list(info.shape)}; the architecture has {unit.size} nodes there")
        return fishers, tensors
    if recipe.method.importance == "gram":
        return fishers, _checked_grams(fishers, models, tensors, group_of)
    checked = []
    for t in tensors:
        if not t.merge:
            checked.append(t)
            continue
        group = group_of.get(t.name)
        sources = []
        for fisher, model_ckpt in zip(fishers, models):
            src = _find(t.name, fisher.tensors, group)
            if src is None:
                raise FisherFileError(f"{fisher.label}: {fisher.path.name} has no tensor {t.name!r} (nor a tied alias of it); compute the Fisher for {model_ckpt.label} with the checkpoint's tensor names")
            if fisher.tensors[src].shape != t.shape:
                raise FisherFileError(f"{fisher.label}: tensor {src!r} has shape {list(fisher.tensors[src].shape)} but the checkpoint's is {list(t.shape)}")
            if not fisher.tensors[src].is_float:
                raise FisherFileError(f"{fisher.label}: tensor {src!r} has dtype {fisher.tensors[src].dtype}; Fisher values must be floating point")
            sources.append(src)
        checked.append(replace(t, fisher_sources=tuple(sources)))
    return fishers, checked


def _checked_grams(grams: list[FisherFile], models: list[Checkpoint], tensors: list[TensorPlan],
                   group_of: dict[str, frozenset[str]]) -> list[TensorPlan]:
    """Match RegMean's Gram files to the merged 2-D tensors.

    A weight [out, in] with a Gram matrix (under its name or a tied alias) in every file gets
    their names as `fisher_sources`; one with a Gram matrix in no file keeps None (the method
    averages it). A Gram matrix must be [in, in] and floating point, and a weight that some
    files cover and others do not is refused: the models would be merged by different rules.

    Raises:
        FisherFileError: A Gram matrix of the wrong shape or dtype, or in some files only.
    """
    checked = []
    for t in tensors:
        if not t.merge or len(t.shape) != 2:
            checked.append(t)
            continue
        group = group_of.get(t.name)
        sources = [_find(t.name, g.tensors, group) for g in grams]
        if all(src is None for src in sources):
            checked.append(t)
            continue
        for gram, model_ckpt, src in zip(grams, models, sources):
            if src is None:
                has = next(g for g, other in zip(grams, sources) if other is not None)
                raise FisherFileError(f"{gram.label}: {gram.path.name} has no Gram matrix for {t.name!r} but {has.label} has one; "
                                      f"compute the Gram matrices of {model_ckpt.label} on the same architecture")
            info = gram.tensors[src]
            if info.shape != (t.shape[1], t.shape[1]):
                raise FisherFileError(f"{gram.label}: Gram matrix {src!r} has shape {list(info.shape)}; weight {t.name!r} of shape "
                                      f"{list(t.shape)} needs [{t.shape[1]}, {t.shape[1]}] (its input width squared)")
            if not info.is_float:
                raise FisherFileError(f"{gram.label}: Gram matrix {src!r} has dtype {info.dtype}; it must be floating point")
        checked.append(replace(t, fisher_sources=tuple(sources)))  # type: ignore[arg-type]
    return checked
