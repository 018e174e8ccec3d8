"""The recipe: schema, defaults and validation, all in one place.

The keys follow mergekit's YAML where mergekit has the concept (``merge_method``,
``base_model``, ``models[].model``, ``models[].parameters``, ``parameters``, ``dtype``,
``out_dtype``, ``tokenizer_source``, ``tokenizer``, ``chat_template``), so a mergekit recipe
for a method both tools have runs unchanged. hfmerge's own keys extend that schema. Every problem is reported as one
`RecipeError` naming the key path, what was given and what is expected, before any weight is
read.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .constants import RECIPE_DTYPES
from .errors import HfMergeError, RecipeError, short_repr
from .fileio import parse_size
from .methods import METHODS, MergeMethod, Param, known_parameter_names
from .methods.fisher import FISHER_DATA_PARAMS
from .refs import ModelRef, is_hub_repo_id, parse_model_ref
from .search_space import Dimension
from .tokenizer import TokenizerSettings, TokenSetting, TokenSource, resolve_chat_template
from .yamlio import load_yaml_file

TOP_LEVEL_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source", "config_source",
    "max_shard_size", "allow_pickle", "allow_external_symlinks", "allow_nonfinite", "push_to_hub", "tasks", "tokenizer",
    "chat_template", "hub_ids", "search",
)
SEARCH_KEYS = ("n_trials", "n_startup_trials", "seed", "patience", "enqueue")
SEARCH_RANGE_KEYS = ("search", "log", "step")
# The Fisher computation's settings: fixed for a whole search (the Fishers are computed before it).
FISHER_SETTINGS = frozenset(p.name for p in FISHER_DATA_PARAMS)
# Defaults of the `search:` block: the same as dfmerge's (its `parameters`), Optuna's names.
SEARCH_DEFAULTS = {"n_trials": 60, "n_startup_trials": 10, "seed": 0, "patience": 0}
MODEL_KEYS = ("model", "parameters", "fisher")
SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")
SOURCE_KEYS = ("model", "layer_range", "parameters")
# mergekit keys hfmerge does not implement: reported as such rather than as typos.
UNSUPPORTED_MERGEKIT_KEYS = {
    "modules": "per-module recipes are not supported",
}
DEFAULT_MAX_SHARD_SIZE = "5GB"
# YAML 1.1 (PyYAML) reads exponent numbers without a dot, such as 1e-5, as strings; mergekit's
# numeric parameters accept them as numbers, and so do ours.
_EXPONENT_NUMBER = re.compile(r"[-+]?\d+(?:\.\d*)?[eE][-+]?\d+")




@dataclass(frozen=True)
class Gradient:
    """mergekit's gradient: values spread evenly over the layers and interpolated linearly.

    A tensor at relative depth t (0 for the first layer and the embeddings, 1 for the last
    layer and the output head) gets the piecewise-linear interpolation of the list at t.
    """

    values: tuple[float, ...]

    def at(self, t: float) -> float:
        scaled = t * (len(self.values) - 1)
        i0 = int(scaled)
        i1 = min(len(self.values) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.values[i0] + frac * self.values[i1]


@dataclass(frozen=True)
class FilteredValue:
    """mergekit's filter list: the first entry whose filter is absent, ``*`` or a substring of
    the tensor name applies (order matters); its value may be a number or a gradient. No match
    falls through to the global ``parameters`` and then to the method's default."""

    entries: tuple[tuple[str | None, "float | Gradient"], ...]

    def resolve(self, tensor_name: str, t: float) -> float | None:
        for flt, value in self.entries:
            if flt is None or flt == "*" or flt in tensor_name:
                return value.at(t) if isinstance(value, Gradient) else value
        return None


def resolve_setting(value: Any, tensor_name: str, t: float) -> float | None:
    """The value of a per-model setting for one tensor at relative depth `t`."""
    if isinstance(value, FilteredValue):
        return value.resolve(tensor_name, t)
    if isinstance(value, Gradient):
        return value.at(t)
    return value


@dataclass(frozen=True)
class SearchRange(Dimension):
    """``{search: [low, high]}`` in place of a number: the value is left to the recipe's search.

    A `Dimension` of the study (range, log scale, step, integer) whose `name` is the key path
    without ``parameters`` (``density``, ``models[1].weight``, ``t[2]``), stable across runs;
    `path` is the full key path, for messages.
    """

    path: str = ""


@dataclass(frozen=True)
class SearchSpec:
    """What a recipe searches: every `SearchRange` (in recipe order) and the ``search:`` block's
    settings (Optuna's names, dfmerge's defaults)."""

    space: tuple[SearchRange, ...]
    n_trials: int = SEARCH_DEFAULTS["n_trials"]
    n_startup_trials: int = SEARCH_DEFAULTS["n_startup_trials"]
    seed: int = SEARCH_DEFAULTS["seed"]
    patience: int = SEARCH_DEFAULTS["patience"]
    enqueue: tuple[dict[str, float], ...] = ()


ParamValue = Any  # a scalar, a Gradient, a FilteredValue or a SearchRange (until the search fixes it)


def recipe_syntax(value: ParamValue) -> Any:
    """A parameter value as a recipe writes it: a gradient as its list, a filter list as its
    ``{filter, value}`` entries, anything else unchanged."""
    if isinstance(value, Gradient):
        return [recipe_syntax(v) for v in value.values]
    if isinstance(value, FilteredValue):
        return [{**({"filter": flt} if flt is not None else {}), "value": recipe_syntax(v)} for flt, v in value.entries]
    if isinstance(value, SearchRange):
        return {"search": [value.low, value.high], **({"log": True} if value.log else {}),
                **({"step": value.step} if value.step is not None else {})}
    return value


@dataclass(frozen=True)
class ModelSpec:
    """One fine-tuned model of the recipe, or one source of a slice."""

    key: str  # "models[i]", or "slices[i].sources[j]"
    ref: ModelRef
    parameters: dict[str, ParamValue]
    fisher: Path | None = None
    task: int | None = None  # index into Recipe.tasks of the model's own task
    layer_range: tuple[int, int] | None = None  # a slice source's layers [start, end)
    slice_parameters: dict[str, ParamValue] = field(default_factory=dict)  # its slice's per-model defaults


@dataclass(frozen=True)
class SliceSpec:
    """One output slice of a ``slices:`` recipe: consecutive output layers, each merged from the
    same offset into every source's layer range.

    Attributes:
        key: ``slices[i]``.
        sources: The merged inputs, as the method gets them (for a method on task vectors the
            base model's entry is not among them: it is `base`).
        inputs: For each source, its index into `Recipe.models` (the distinct checkpoints).
        base: The base model's entry of this slice (its layer range), for methods that read
            the base; None otherwise.
        parameters: The slice's own global (tensor) parameters, consulted before the recipe's.
    """

    key: str
    sources: tuple[ModelSpec, ...]
    inputs: tuple[int, ...]
    base: ModelSpec | None = None
    parameters: dict[str, ParamValue] = field(default_factory=dict)

    @property
    def length(self) -> int:
        start, end = self.sources[0].layer_range  # type: ignore[misc]
        return end - start


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `raw` is the YAML as written (echoed into the model card).

    Frozen: a run that fixes what the recipe left open (a search's coefficients) makes a new
    recipe with `dataclasses.replace`.
    """

    method: MergeMethod
    base: ModelRef | None
    models: list[ModelSpec]  # with slices: each distinct source checkpoint once (its settings are per source)
    parameters: dict[str, Any]
    out_dtype: str | None  # safetensors dtype name, None = the base's dtype
    tokenizer_source: ModelRef | None
    config_source: ModelRef | None
    max_shard_size: int
    allow_pickle: bool = False
    allow_external_symlinks: bool = False  # local checkpoints: follow symlinks out of the model folder
    allow_nonfinite: bool = False
    push_to_hub: str | None = None
    model_defaults: dict[str, ParamValue] = field(default_factory=dict)  # per-model keys given under `parameters`
    tasks: list = field(default_factory=list)  # evaluation.tasks.TaskSpec, validated but not loaded
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # the method's advice from its `validate` hook
    slices: tuple[SliceSpec, ...] = ()  # a `slices:` recipe (layer stacking); empty for `models:`
    # The output vocabulary when it is built rather than copied (union, a `tokenizer:` block, or
    # tokenizer_source with models whose vocabulary sizes differ); None: copy the tokenizer files.
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None  # the template text, or "auto"
    # The Hub ids of local inputs (`hub_ids`): resolved folder (`ref_identity`) -> org/name, for
    # the model card's base_model metadata and inputs table; nothing else reads them.
    hub_ids: dict[str, str] = field(default_factory=dict)
    # The parameters given as `{search: [low, high]}` and the `search:` block's settings; None
    # when every value is fixed (and always for dfmerge, which searches its λ its own way).
    search: SearchSpec | None = None

    @property
    def search_space(self) -> tuple[SearchRange, ...]:
        """The searched parameters, in recipe order (empty when nothing is searched)."""
        return self.search.space if self.search is not None else ()

    @property
    def source(self) -> str:
        return str(self.path) if self.path else "recipe"

    @property
    def model_entries(self) -> list[ModelSpec]:
        """Every entry that carries per-model settings: the models, or every slice's sources."""
        return [m for s in self.slices for m in s.sources] if self.slices else list(self.models)

    def model_param(self, model: ModelSpec, name: str, tensor_name: str, t: float = 0.0) -> float:
        """A per-model parameter's value for one tensor at relative depth `t`.

        As in mergekit: the model's own setting, else the global ``parameters`` setting, else the
        method's default (a filter list that matches nothing falls through). A slice source's
        slice-level ``parameters`` come between its own and the global ones.
        """
        for setting in (model.parameters.get(name), model.slice_parameters.get(name), self.model_defaults.get(name)):
            value = resolve_setting(setting, tensor_name, t) if setting is not None else None
            if value is not None:
                return float(value)
        spec = self.method.model_param(name)
        assert spec is not None
        return float(spec.default)

    def tensor_param(self, name: str, tensor_name: str, t: float = 0.0, slice_spec: SliceSpec | None = None) -> Any:
        """A global parameter's value for one tensor at relative depth `t`: a tensor
        parameter's gradient or filter list resolved (the slice's setting first, then the
        recipe's, then the default where no filter matches), any other parameter as given."""
        value = self.parameters.get(name)
        spec = self.method.param(name)
        if spec is None or not spec.tensor:
            return value
        for setting in ((slice_spec.parameters.get(name),) if slice_spec is not None else ()) + (value,):
            resolved = resolve_setting(setting, tensor_name, t) if setting is not None else None
            if resolved is not None:
                return float(resolved)
        return float(spec.default)


def _ranges(value: ParamValue) -> list[SearchRange]:
    """The searched ranges inside one parameter value (a gradient's points, a filter list's values)."""
    if isinstance(value, SearchRange):
        return [value]
    if isinstance(value, Gradient):
        return [r for v in value.values for r in _ranges(v)]
    if isinstance(value, FilteredValue):
        return [r for _, v in value.entries for r in _ranges(v)]
    return []


def _filled(value: ParamValue, values: dict[str, float]) -> ParamValue:
    """`value` with each searched range replaced by its value in `values` (by name)."""
    if isinstance(value, SearchRange):
        return values[value.name]
    if isinstance(value, Gradient):
        return Gradient(tuple(_filled(v, values) for v in value.values))
    if isinstance(value, FilteredValue):
        return FilteredValue(tuple((flt, _filled(v, values)) for flt, v in value.entries))
    return value


def _settings_of(recipe: Recipe) -> list[dict[str, ParamValue]]:
    """Every mapping of parameter values a recipe holds, in recipe order."""
    found = [recipe.parameters, recipe.model_defaults, *(m.parameters for m in recipe.models)]
    for sl in recipe.slices:
        found.append(sl.parameters)
        found += [d for m in sl.sources for d in (m.slice_parameters, m.parameters)]
    return found


def recipe_search_ranges(recipe: Recipe) -> tuple[SearchRange, ...]:
    """Every ``{search: ...}`` range of a recipe, each once, in the order the recipe writes them."""
    ranges: dict[str, SearchRange] = {}
    for settings in _settings_of(recipe):
        for value in settings.values():
            for r in _ranges(value):
                ranges.setdefault(r.name, r)
    written = list(recipe.raw.get("parameters") or {}) if isinstance(recipe.raw.get("parameters"), dict) else []

    def position(r: SearchRange) -> int:
        # The global parameters and the per-model defaults given with them are held apart: order them as written.
        key = r.path.split(".")[1].split("[")[0] if r.path.startswith("parameters.") else None
        return written.index(key) if key in written else len(written)

    return tuple(sorted(ranges.values(), key=position))


def _raw_set(node: Any, tokens: list[str | int], value: Any) -> None:
    head, rest = tokens[0], tokens[1:]
    if isinstance(head, int) and isinstance(node, dict):  # a lone {filter, value} entry written without its list
        _raw_set(node, rest, value)
    elif not rest:
        node[head] = value
    else:
        _raw_set(node[head], rest, value)


def with_search_values(recipe: Recipe, values: dict[str, float]) -> Recipe:
    """The ordinary recipe a search candidate is: every searched range fixed to its value.

    Also in the echoed YAML (`raw`, without its ``search:`` block), so that the recipe written
    beside a merge reproduces it without searching.

    Args:
        recipe: A recipe with a search space (`Recipe.search`).
        values: One value per searched parameter, by name (`SearchRange.name`).

    Returns:
        The recipe with no search left.
    """
    space = recipe.search_space
    values = {r.name: (int(values[r.name]) if r.integer else float(values[r.name])) for r in space}

    def fill(settings: dict[str, ParamValue]) -> dict[str, ParamValue]:
        return {k: _filled(v, values) for k, v in settings.items()}

    raw = copy.deepcopy(recipe.raw)
    raw.pop("search", None)
    for r in space:
        _raw_set(raw, [int(t[1:-1]) if t.startswith("[") else t for t in re.findall(r"\[\d+\]|[^.\[\]]+", r.path)], values[r.name])
    slices = tuple(replace(sl, parameters=fill(sl.parameters), sources=tuple(
        replace(m, parameters=fill(m.parameters), slice_parameters=fill(m.slice_parameters)) for m in sl.sources)) for sl in recipe.slices)
    return replace(recipe, parameters=fill(recipe.parameters), model_defaults=fill(recipe.model_defaults),
                   models=[replace(m, parameters=fill(m.parameters)) for m in recipe.models], slices=slices, raw=raw, search=None)


def _fail(source: str, path: str, message: str) -> RecipeError:
    return RecipeError(f"{source}: {path}: {message}")


def _key_name(key: Any) -> str:
    """A user-written mapping key as it appears in a key path: itself when it is a short
    string, else a shortened rendering (a key can be any YAML scalar, of any length)."""
    return key if isinstance(key, str) and len(key) <= 80 else short_repr(key)


def _unknown_key(source: str, where: str, key: Any, allowed: tuple[str, ...]) -> RecipeError:
    name = _key_name(key)
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return _fail(source, f"{where}{name}", f"unknown key{hint} (expected one of: {', '.join(allowed)})")


def _did_you_mean(key: Any, allowed: tuple[str, ...]) -> str:
    """" (did you mean 'x'?)" for a key close to one the method takes or any method knows."""
    if not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(allowed) + sorted(known_parameter_names() - set(allowed)), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_search_range(value: Any) -> bool:
    return isinstance(value, dict) and "search" in value


def search_name(path: str) -> str:
    """A searched parameter's name in the study: its key path without ``parameters``."""
    return re.sub(r"(^|\.)parameters\.", r"\1", path)


def _search_range(source: str, path: str, spec: Param, value: dict) -> SearchRange:
    """``{search: [low, high], log: bool, step: number}`` for a numeric parameter, checked
    against the parameter's own bounds."""
    for k in value:
        if k not in SEARCH_RANGE_KEYS:
            raise _unknown_key(source, f"{path}.", k, SEARCH_RANGE_KEYS)
    if spec.kind not in (int, float):
        raise _fail(source, f"{path}.search", f"{spec.name!r} is {spec.expected()}; only a number can be searched")
    integer = spec.kind is int

    def exponent(v: Any) -> Any:  # YAML 1.1's 1e-5 is a string; a float parameter takes it as the number
        return float(v) if not integer and isinstance(v, str) and _EXPONENT_NUMBER.fullmatch(v) else v

    def number(v: Any) -> bool:
        return _is_number(v) and (not integer or isinstance(v, int))

    bounds = value["search"]
    if isinstance(bounds, list):
        bounds = [exponent(v) for v in bounds]

    if not isinstance(bounds, list) or len(bounds) != 2 or not all(number(v) for v in bounds):
        what = "integers" if integer else "numbers"
        raise _fail(source, f"{path}.search", f"got {short_repr(bounds)}; expected [low, high], two {what}")
    low, high = bounds
    for i, v in enumerate(bounds):
        problem = spec.check(float(v) if spec.kind is float else v)
        if problem is not None:
            raise _fail(source, f"{path}.search[{i}]", f"got {short_repr(v)}; {spec.name!r} must be {problem}")
    if not low < high:
        raise _fail(source, f"{path}.search", f"the range [{low}, {high}] is empty; give [low, high] with low < high")
    log = _bool(source, f"{path}.log", value.get("log", False))
    if log and low <= 0:
        raise _fail(source, f"{path}.log", f"a log scale needs low > 0, got low = {low}")
    step = exponent(value.get("step"))
    if step is not None:
        if not number(step) or step <= 0:
            raise _fail(source, f"{path}.step", f"got {short_repr(step)}; expected a positive {'integer' if integer else 'number'}")
        if log:
            raise _fail(source, f"{path}.step", "a step cannot be combined with log: true (Optuna samples either on a grid or on a log scale)")
        step = int(step) if integer else float(step)
    cast = int if integer else float
    return SearchRange(search_name(path), cast(low), cast(high), log, step, integer, path=path)


def _check_param(source: str, path: str, spec: Param, value: Any) -> Any:
    if _is_search_range(value):
        return _search_range(source, path, spec, value)
    if spec.kind is float and isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        value = float(value)
    problem = spec.check(value)
    if problem is not None:
        raise _fail(source, path, f"got {short_repr(value)}; expected {problem}")
    return float(value) if spec.kind is float else value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _setting_value(source: str, path: str, spec: Param, value: Any) -> "float | Gradient":
    if isinstance(value, list):
        def number(v: Any) -> bool:  # exponent strings (YAML 1.1's 1e-5) too, as for a single value; a point may be searched
            return _is_number(v) or _is_search_range(v) or (spec.kind is float and isinstance(v, str) and bool(_EXPONENT_NUMBER.fullmatch(v)))

        if len(value) < 1 or not all(number(v) for v in value):
            raise _fail(source, path, f"got {short_repr(value)}; expected a number or a gradient (a list of numbers)")
        return Gradient(tuple(_check_param(source, f"{path}[{i}]", spec, v) for i, v in enumerate(value)))
    return _check_param(source, path, spec, value)


def _model_param_value(source: str, path: str, spec: Param, value: Any) -> ParamValue:
    """A per-model setting: a number, a gradient, or a filter list (one or more {filter, value});
    any number may be a searched range ``{search: [low, high]}``."""
    if _is_search_range(value):
        return _search_range(source, path, spec, value)
    if isinstance(value, dict):
        value = [value]
    # A list of dicts is a filter list, unless they are searched ranges: then it is a gradient
    # whose points are all searched (``[{search: [0, 1]}, {search: [0, 1]}]``).
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value) and not all(_is_search_range(e) for e in value):
        entries = []
        for i, entry in enumerate(value):
            if "value" not in entry or set(entry) - {"filter", "value"}:
                raise _fail(source, f"{path}[{i}]", f"got {short_repr(entry)}; expected {{filter: <substring of tensor names>, value: <number or gradient>}}")
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise _fail(source, f"{path}[{i}].filter", f"got {short_repr(flt)}; expected a string")
            entries.append((flt, _setting_value(source, f"{path}[{i}].value", spec, entry["value"])))
        return FilteredValue(tuple(entries))
    return _setting_value(source, path, spec, value)


def _dtype(source: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in RECIPE_DTYPES:
        raise _fail(source, key, f"got {short_repr(value)}; expected one of float32, float16, bfloat16")
    return RECIPE_DTYPES[value]


def _bool(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, key, f"got {short_repr(value)}; expected true or false")
    return value


def _ref(source: str, key: str, value: Any, base_dir: Path | None) -> ModelRef:
    if not isinstance(value, str):
        raise _fail(source, key, f"got {short_repr(value)}; expected a model reference (org/name, org/name@revision or a folder)")
    try:
        return parse_model_ref(value, base_dir=base_dir, field=f"{source}: {key}")
    except HfMergeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _fail(source, key, str(exc)) from None


def _push_repo(source: str, value: Any) -> str | None:
    if value is None:
        return None
    ref = None
    if isinstance(value, str) and "/" in value and not value.startswith((".", "/", "~")):
        try:
            ref = parse_model_ref(value, field=f"{source}: push_to_hub")
        except HfMergeError:
            ref = None
    if ref is None or ref.repo_id is None or ref.revision is not None or ref.adapter is not None:
        raise _fail(source, "push_to_hub", f"got {short_repr(value)}; expected a Hub repo id org/name")
    return ref.repo_id


def ref_identity(ref: ModelRef) -> str:
    """What makes two references the same model: the resolved folder, or repo id and revision
    (of both sides for ``BASE+ADAPTER``)."""
    return "+".join(str(part.path) if part.is_local else f"{part.repo_id}@{part.revision or ''}" for part in ref.parts)


def named_hub_ids(value: Any, inputs: Sequence[ModelRef], *, base_dir: Path | None,
                  fail: Callable[[str, str], HfMergeError]) -> dict[str, str]:
    """Check a mapping from local input folders to the Hub repos they are copies of
    (the recipe's ``hub_ids``, or ``--base-model-id``).

    Args:
        value: ``{folder: org/name}``; a folder as a model reference names it (relative to
            `base_dir` first), and must be a local input: the base model, a model, a slice's
            source, or a side of a ``BASE+ADAPTER`` reference.
        inputs: The recipe's model references.
        base_dir: The folder relative paths are resolved against (the recipe's; None: the
            working directory).
        fail: Makes the error from the key path below `value` (``[folder]``) and the message.

    Returns:
        The resolved folder (`ref_identity`) -> repo id.
    """
    if not isinstance(value, dict) or not value:
        raise fail("", f"got {short_repr(value)}; expected a mapping from local input folders to Hub repo ids, e.g. {{./base: org/name}}")
    local = {ref_identity(part) for ref in inputs for part in ref.parts if part.is_local}
    named: dict[str, str] = {}
    for folder, repo_id in value.items():
        where = f"[{_key_name(folder)}]"
        ref = None
        if isinstance(folder, str):
            try:
                ref = parse_model_ref(folder, base_dir=base_dir, field=folder)
            except HfMergeError:
                ref = None
        if ref is None or not ref.is_local or ref.adapter is not None:
            raise fail(where, "not a local folder; name the folder of a local input as the recipe does (a Hub input's id is known already)")
        identity = ref_identity(ref)
        if identity not in local:
            raise fail(where, f"{ref.path} is not one of the recipe's local inputs (base_model, models, slices' sources)")
        if not isinstance(repo_id, str):
            raise fail(where, f"got {short_repr(repo_id)}; expected a Hub repo id org/name")
        try:
            valid = is_hub_repo_id(repo_id)
        except RecipeError:
            valid = False
        if not valid:
            raise fail(where, f"{short_repr(repo_id)} is not a Hub repo id; expected org/name, without a revision")
        if named.get(identity, repo_id) != repo_id:
            raise fail(where, f"{ref.path} is named twice, as {named[identity]} and {repo_id}; give one id")
        named[identity] = repo_id
    return named


def recipe_inputs(recipe: Recipe) -> list[ModelRef]:
    """The model references a recipe merges: its base model and every model (or slice source)."""
    return ([recipe.base] if recipe.base is not None else []) + [m.ref for m in recipe.models]


def hub_id_of(recipe: Recipe, ref: ModelRef) -> str | None:
    """The Hub id of `ref`: its repo id on the Hub, or the one ``hub_ids`` gives a local folder."""
    if ref.repo_id is not None:
        return ref.repo_id
    return recipe.hub_ids.get(ref_identity(ref.model)) if ref.is_local else None


def _tasks(value: Any, source: str, base_dir: Path | None, models: list[ModelSpec]) -> tuple[list, list[int | None]]:
    if value is None:
        return [], []
    from .evaluation.tasks import match_tasks_to_models, parse_tasks

    tasks = parse_tasks(value, source=source, base_dir=base_dir)
    return tasks, match_tasks_to_models(tasks, [m.ref.text for m in models], source=source)


def _check_method_data(source: str, name: str, method: MergeMethod, models: list[ModelSpec]) -> None:
    """Methods that need importances: a Fisher file or a task per model (a searching method checks its own data)."""
    if method.search:
        return  # a search computes its Fishers on the models' tasks; its method checks those
    if method.needs_importance:
        for m in models:
            if m.fisher is None and m.task is None:
                what = {"nodes": "a node Fisher file (as hfmerge.compute_fishers writes)",
                        "gram": "a Gram file (safetensors: per linear weight name, the [in, in] Gram matrix of its inputs, as hfmerge.compute_fishers writes)",
                        }.get(method.importance, "a Fisher file (safetensors with the checkpoint's tensor names)")
                needs = "Gram matrices of its linear layers' inputs" if method.importance == "gram" else "Fisher information"
                raise _fail(source, f"{m.key}.fisher", f"missing; merge_method {name!r} needs per-model {needs}: give {what} "
                            "or a task for this model under `tasks:` to compute it from")


def _check_entry(source: str, key: str, entry: Any, allowed: tuple[str, ...], expected: str) -> None:
    """A list entry must be a mapping with only `allowed` keys."""
    if not isinstance(entry, dict):
        raise _fail(source, key, f"got {short_repr(entry)}; expected {expected}")
    for k in entry:
        if k not in allowed:
            raise _unknown_key(source, f"{key}.", k, allowed)


def _model_parameters(source: str, key: str, params_in: Any, method: MergeMethod, ignored: list[str]) -> dict[str, ParamValue]:
    """The ``parameters`` of one model entry (``models[i]`` or a slice source), checked."""
    if params_in is None:
        params_in = {}
    if not isinstance(params_in, dict):
        raise _fail(source, f"{key}.parameters", f"got {short_repr(params_in)}; expected a mapping")
    allowed = tuple(p.name for p in method.per_model)
    params: dict[str, ParamValue] = {}
    for pk, pv in params_in.items():
        spec = method.model_param(pk)
        if spec is None:
            if isinstance(pk, str) and pk in known_parameter_names():
                ignored.append(f"{key}.parameters.{pk}")
                continue
            raise _fail(source, f"{key}.parameters.{_key_name(pk)}", f"not a per-model parameter of {method.name!r}" + _did_you_mean(pk, allowed)
                        + (f" (expected one of: {', '.join(allowed)})" if allowed else " (it takes none)"))
        params[pk] = _model_param_value(source, f"{key}.parameters.{pk}", spec, pv)
    return params


def _models(source: str, raw_models: Any, method: MergeMethod, base_identity: str | None, base_dir: Path | None,
            ignored: list[str]) -> list[ModelSpec]:
    """The ``models:`` list, checked (a base listed there is dropped for methods on task vectors)."""
    name = method.name
    if raw_models is None:
        raise _fail(source, "models", "missing; expected a list of fine-tuned models, each {model: <reference>} (or slices: to stack layer ranges)")
    if not isinstance(raw_models, list) or not raw_models:
        raise _fail(source, "models", f"got {short_repr(raw_models)}; expected a non-empty list of {{model: <reference>}}")
    models: list[ModelSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw_models):
        key = f"models[{i}]"
        if isinstance(entry, str):  # shorthand: a bare reference
            entry = {"model": entry}
        _check_entry(source, key, entry, MODEL_KEYS, "{model: <reference>, parameters: {...}}")
        if "model" not in entry:
            raise _fail(source, f"{key}.model", "missing; expected a model reference")
        ref = _ref(source, f"{key}.model", entry["model"], base_dir)
        identity = ref_identity(ref)
        if identity == base_identity and method.needs_base:
            # A method on task vectors: the base listed among the models has τ = 0 and is
            # skipped, as mergekit skips it. Methods that average models (needs_base false)
            # keep it: it is averaged with its weight, as mergekit's linear does.
            continue
        if identity in seen:
            raise _fail(source, f"{key}.model", f"{short_repr(entry['model'])} is the same model as {seen[identity]}; list each model once")
        seen[identity] = f"{key}.model"
        params = _model_parameters(source, key, entry.get("parameters"), method, ignored)
        fisher = None
        if "fisher" in entry:
            if not method.needs_importance:
                raise _fail(source, f"{key}.fisher", f"merge_method {name!r} does not use Fisher files")
            if not isinstance(entry["fisher"], str):
                raise _fail(source, f"{key}.fisher", f"got {short_repr(entry['fisher'])}; expected the path of a safetensors Fisher file")
            fisher = Path(entry["fisher"]).expanduser()
            if not fisher.is_absolute() and base_dir is not None:
                fisher = base_dir / fisher
        if fisher is not None and method.search:
            raise _fail(source, f"{key}.fisher", f"merge_method {name!r} computes each model's Fisher at the searched coefficient; a fixed Fisher file does not apply")
        models.append(ModelSpec(key, ref, params, fisher))
    if not models:
        raise _fail(source, "models", "lists only the base model; add at least one fine-tuned model")
    return models


def _global_parameters(source: str, where: str, params_in: Any, method: MergeMethod, ignored: list[str],
                       ) -> tuple[dict[str, Any], dict[str, ParamValue]]:
    """A ``parameters`` mapping: the method's global parameters (with defaults, at the top level
    only) and the per-model parameters it sets for every model. A slice's `where`
    (``slices[i].parameters``) takes only parameters that may vary by tensor."""
    name = method.name
    top = where == "parameters"
    if params_in is None:
        params_in = {}
    if not isinstance(params_in, dict):
        raise _fail(source, where, f"got {short_repr(params_in)}; expected a mapping")
    parameters: dict[str, Any] = {p.name: p.default for p in method.params} if top else {}
    if top:
        parameters.update(method.fixed)
    allowed = tuple(p.name for p in method.params)
    model_defaults: dict[str, ParamValue] = {}
    for pk, pv in params_in.items():
        spec = method.param(pk)
        if spec is None:
            if pk in method.fixed and pv == method.fixed[pk]:
                continue
            if method.model_param(pk) is not None:
                # mergekit allows per-model parameters globally as a default for every model.
                model_defaults[pk] = _model_param_value(source, f"{where}.{pk}", method.model_param(pk), pv)
                continue
            if pk not in method.fixed and isinstance(pk, str) and pk in known_parameter_names():
                ignored.append(f"{where}.{pk}")
                continue
            extra = f" ({name!r} fixes {pk} = {method.fixed[pk]!r})" if pk in method.fixed else ""
            everything = allowed + tuple(p.name for p in method.per_model)
            raise _fail(source, f"{where}.{_key_name(pk)}", f"not a parameter of {name!r}{extra}" + (_did_you_mean(pk, everything) if not extra else "")
                        + (f"; expected one of: {', '.join(everything)}" if everything else ""))
        if spec.tensor:
            parameters[pk] = _model_param_value(source, f"{where}.{pk}", spec, pv)
        elif top:
            parameters[pk] = _check_param(source, f"{where}.{pk}", spec, pv)
        else:
            raise _fail(source, f"{where}.{pk}", f"{pk!r} applies to the whole merge; set it under the top-level parameters")
    return parameters, model_defaults


def _layer_range(source: str, key: str, value: Any) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or value[0] < 0 or value[1] <= value[0]):
        raise _fail(source, key, f"got {short_repr(value)}; expected [start, end] with 0 <= start < end (layers start to end - 1)")
    return value[0], value[1]


def _slices(source: str, raw: Any, method: MergeMethod, base: ModelRef | None, base_dir: Path | None,
            ignored: list[str]) -> tuple[SliceSpec, ...]:
    """The ``slices:`` list, checked as far as the recipe alone allows (the layer ranges against
    the checkpoints' layer counts are checked by the plan)."""
    name = method.name
    if not isinstance(raw, list) or not raw:
        raise _fail(source, "slices", f"got {short_repr(raw)}; expected a non-empty list of {{sources: [{{model: <reference>, layer_range: [start, end]}}]}}")
    if method.needs_importance or method.search:
        raise _fail(source, "slices", f"merge_method {name!r} weighs whole models by Fisher information or a search; it cannot merge slices")
    base_identity = ref_identity(base) if base is not None else None
    uses_base = base is not None and method.needs_base
    distinct: dict[str, int] = {}  # identity -> index into the recipe's models
    slices = []
    for i, entry in enumerate(raw):
        key = f"slices[{i}]"
        _check_entry(source, key, entry, SLICE_KEYS, "{sources: [...], parameters: {...}}")
        if entry.get("base_model") is not None:
            raise _fail(source, f"{key}.base_model", "a base model per slice is not supported; set base_model at the top level")
        if entry.get("residual_weight") is not None:
            ignored.append(f"{key}.residual_weight")  # in mergekit's schema, but never read
        slice_params, slice_defaults = _global_parameters(source, f"{key}.parameters", entry.get("parameters"), method, ignored)
        raw_sources = entry.get("sources")
        if not isinstance(raw_sources, list) or not raw_sources:
            raise _fail(source, f"{key}.sources", f"got {short_repr(raw_sources)}; expected a non-empty list of {{model: <reference>, layer_range: [start, end]}}")
        sources: list[ModelSpec] = []
        inputs: list[int] = []
        slice_base: ModelSpec | None = None
        first: ModelSpec | None = None
        seen: dict[str, str] = {}
        for j, src in enumerate(raw_sources):
            skey = f"{key}.sources[{j}]"
            _check_entry(source, skey, src, SOURCE_KEYS, "{model: <reference>, layer_range: [start, end]}")
            for k in ("model", "layer_range"):
                if k not in src:
                    raise _fail(source, f"{skey}.{k}", "missing; expected " + ("a model reference" if k == "model" else "[start, end]"))
            ref = _ref(source, f"{skey}.model", src["model"], base_dir)
            span = _layer_range(source, f"{skey}.layer_range", src["layer_range"])
            identity = ref_identity(ref)
            if identity in seen:
                raise _fail(source, f"{skey}.model", f"{short_repr(src['model'])} is the same model as {seen[identity]}; list each model once per slice")
            seen[identity] = f"{skey}.model"
            spec = ModelSpec(skey, ref, {}, layer_range=span, slice_parameters=slice_defaults)
            if uses_base and identity == base_identity:
                slice_base = spec  # the origin of this slice's task vectors; its parameters are not read
            else:
                spec = replace(spec, parameters=_model_parameters(source, skey, src.get("parameters"), method, ignored))
                sources.append(spec)
                inputs.append(distinct.setdefault(identity, len(distinct)))
            first = first or spec
            if span[1] - span[0] != first.layer_range[1] - first.layer_range[0]:  # type: ignore[index]
                raise _fail(source, f"{skey}.layer_range", f"has {span[1] - span[0]} layers but {first.key} has "
                            f"{first.layer_range[1] - first.layer_range[0]}; every source of a slice must give the same number of layers")  # type: ignore[index]
        if uses_base and slice_base is None:
            raise _fail(source, f"{key}.sources", f"base_model is not among them; merge_method {name!r} takes each slice's task vectors "
                        "from base_model's layers, so list base_model with its layer_range in every slice (as mergekit requires)")
        if not sources:
            raise _fail(source, f"{key}.sources", "lists only the base model; add at least one other source")
        slices.append(SliceSpec(key, tuple(sources), tuple(inputs), slice_base, slice_params))
    return tuple(slices)


def _distinct_sources(slices: tuple[SliceSpec, ...]) -> list[ModelSpec]:
    """Each checkpoint the slices read (the base of a method on task vectors aside) once, in
    order of first appearance, named by that first source; settings stay with the sources."""
    models: dict[int, ModelSpec] = {}
    for sl in slices:
        for spec, index in zip(sl.sources, sl.inputs):
            models.setdefault(index, ModelSpec(spec.key, spec.ref, {}))
    return [models[i] for i in sorted(models)]


def _one_folder_ref(source: str, key: str, value: Any, base_dir: Path | None) -> ModelRef:
    """A reference whose files are read as they are (tokenizer, config): ``model:`` allowed,
    ``BASE+ADAPTER`` refused (it names two folders)."""
    ref = _ref(source, key, _strip_model_prefix(value), base_dir)
    if ref.adapter is not None:
        raise _fail(source, key, f"{short_repr(value)} applies an adapter to a model; {key} takes one folder or repo, whose files are "
                    f"copied: name the model ({ref.model.text}) or the adapter ({ref.adapter.text}) alone")
    return ref


def _strip_model_prefix(value: Any) -> Any:
    return value[len("model:"):] if isinstance(value, str) and value.startswith("model:") else value


def _input_ref(source: str, key: str, value: Any, base_dir: Path | None, inputs: set[str]) -> ModelRef:
    ref = _ref(source, key, _strip_model_prefix(value), base_dir)
    if ref_identity(ref) not in inputs:
        raise _fail(source, key, f"{short_repr(value)} is not one of the merged models; a token's row comes from base_model or one of models")
    return ref


def _mapping(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> dict:
    _check_entry(source, key, value, allowed, f"a mapping with {', '.join(allowed)}")
    return value


def _token_source(source: str, key: str, value: Any, base_dir: Path | None, inputs: set[str]) -> TokenSource | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return TokenSource("model", _input_ref(source, key, value, base_dir, inputs))
    kind = value.get("kind")
    if kind == "zero":
        _mapping(source, key, value, ("kind",))
        return TokenSource("zero")
    if kind != "model_token":
        raise _fail(source, f"{key}.kind", f"got {short_repr(kind)}; expected 'zero' or 'model_token' (or give a model reference as the source)")
    _mapping(source, key, value, ("kind", "model", "token_id", "token"))
    if "model" not in value:
        raise _fail(source, f"{key}.model", "missing; expected the merged model whose row is taken")
    model = _input_ref(source, f"{key}.model", value["model"], base_dir, inputs)
    token_id, token = value.get("token_id"), value.get("token")
    if (token_id is None) == (token is None):
        raise _fail(source, key, "give exactly one of token_id and token (as mergekit)")
    if token_id is not None and (not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise _fail(source, f"{key}.token_id", f"got {short_repr(token_id)}; expected a row index (an integer >= 0)")
    if token is not None and not isinstance(token, str):
        raise _fail(source, f"{key}.token", f"got {short_repr(token)}; expected a token of that model's tokenizer")
    return TokenSource("model_token", model, token_id=token_id, token=token)


def _tokenizer_block(source: str, value: Any, base_dir: Path | None, inputs: set[str]) -> TokenizerSettings:
    """mergekit's ``tokenizer:`` block: source (default union), tokens, pad_to_multiple_of."""
    block = _mapping(source, "tokenizer", value, ("source", "tokens", "pad_to_multiple_of"))
    src: Any = block.get("source", "union")
    if src is None:
        src = "union"
    if src not in ("base", "union"):
        src = _one_folder_ref(source, "tokenizer.source", src, base_dir)
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise _fail(source, "tokenizer.pad_to_multiple_of", f"got {short_repr(pad)}; expected a positive integer")
    tokens_in = block.get("tokens") or {}
    if not isinstance(tokens_in, dict):
        raise _fail(source, "tokenizer.tokens", f"got {short_repr(tokens_in)}; expected a mapping of token to {{source, force}}")
    tokens = []
    for tok, entry in tokens_in.items():
        key = f"tokenizer.tokens.{_key_name(tok)}"
        if not isinstance(tok, str) or not tok:
            raise _fail(source, key, "a token must be a non-empty string")
        entry = _mapping(source, key, {} if entry is None else entry, ("source", "force"))
        force = _bool(source, f"{key}.force", entry.get("force", False))
        token_source = _token_source(source, f"{key}.source", entry.get("source"), base_dir, inputs)
        if force and token_source is None:
            raise _fail(source, f"{key}.force", "a forced token needs a source (a merged model, {kind: zero} or {kind: model_token, ...})")
        tokens.append(TokenSetting(tok, token_source, force, key))
    return TokenizerSettings(src, tuple(tokens), pad, always=True, key="tokenizer")


def _search_spec(source: str, value: Any, recipe: Recipe) -> SearchSpec | None:
    """The recipe's search: its ``{search: ...}`` ranges and the ``search:`` block, checked."""
    space = recipe_search_ranges(recipe)
    name = recipe.method.name
    if recipe.method.search:
        if space:
            raise _fail(source, space[0].path, f"merge_method {name!r} searches its coefficients λ itself (parameters low, high, n_trials, ...); "
                        "a {search: [low, high]} range is for the other methods")
        if value is not None:
            raise _fail(source, "search", f"merge_method {name!r} takes its search settings under parameters (n_trials, n_startup_trials, "
                        "seed, patience, enqueue)")
        return None
    if not space:
        if value is not None:
            raise _fail(source, "search", "no parameter is searched; give a numeric parameter a range, e.g. density: {search: [0.1, 0.9]}, "
                        "or remove the search block")
        return None
    fixed_once = [r for r in space if r.name in FISHER_SETTINGS]
    if fixed_once:
        raise _fail(source, fixed_once[0].path, f"the Fishers of merge_method {name!r} are computed once, before the search, so their "
                    "settings cannot be searched; give a number")
    if not recipe.tasks:
        raise _fail(source, "tasks", f"missing; {space[0].path} is searched, and a search scores each candidate on validation data: "
                    "list the validation tasks under tasks:")
    block = {} if value is None else value
    _check_entry(source, "search", block, SEARCH_KEYS, f"a mapping with {', '.join(SEARCH_KEYS)}")
    settings = dict(SEARCH_DEFAULTS)
    for key in SEARCH_DEFAULTS:
        if key in block:
            v = block[key]
            least = 1 if key == "n_trials" else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise _fail(source, f"search.{key}", f"got {short_repr(v)}; expected an integer >= {least}")
            settings[key] = v
    if settings["n_startup_trials"] > settings["n_trials"]:
        if "n_startup_trials" in block:
            raise _fail(source, "search.n_startup_trials", f"{settings['n_startup_trials']} random start trials exceed n_trials = {settings['n_trials']}")
        settings["n_startup_trials"] = settings["n_trials"]
    points = block.get("enqueue") or []
    if not isinstance(points, list):
        points = [points]
    by_name = {r.name: r for r in space}
    enqueue = []
    for i, point in enumerate(points):
        where = f"search.enqueue[{i}]"
        if not isinstance(point, dict):
            raise _fail(source, where, f"got {short_repr(point)}; expected a mapping of every searched parameter to a value, "
                        f"e.g. {{{', '.join(f'{n}: ...' for n in by_name)}}}")
        for k in point:
            if k not in by_name:
                raise _unknown_key(source, f"{where}.", k, tuple(by_name))
        for n, r in by_name.items():
            if n not in point:
                raise _fail(source, f"{where}.{n}", "missing; an enqueued point gives every searched parameter a value")
            v = point[n]
            if not _is_number(v) or (r.integer and not isinstance(v, int)) or not r.low <= v <= r.high:
                raise _fail(source, f"{where}.{n}", f"got {short_repr(v)}; expected {'an integer' if r.integer else 'a number'} in [{r.low}, {r.high}] ({r.path})")
        enqueue.append({n: point[n] for n in by_name})
    return SearchSpec(space, enqueue=tuple(enqueue), **settings)


def parse_recipe(data: Any, *, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a recipe given as parsed YAML.

    Args:
        data: The YAML document.
        source: Name of the recipe for messages (usually its path).
        base_dir: Folder that relative model paths are resolved against.

    Raises:
        RecipeError: Naming the key path, what was given and what is expected.
    """
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: expected a YAML mapping with merge_method, base_model and models, got {type(data).__name__}")
    for key in data:
        if key in UNSUPPORTED_MERGEKIT_KEYS:
            raise _fail(source, key, UNSUPPORTED_MERGEKIT_KEYS[key])
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key(source, "", key, TOP_LEVEL_KEYS)

    name = data.get("merge_method")
    if name is None:
        raise _fail(source, "merge_method", f"missing; expected one of {', '.join(sorted(METHODS))}")
    if not isinstance(name, str):
        raise _fail(source, "merge_method", f"got {short_repr(name)}; expected a method name, one of {', '.join(sorted(METHODS))}")
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(source, "merge_method", f"unknown method {short_repr(name)}{hint}; expected one of {', '.join(sorted(METHODS))}")
    method = METHODS[name]

    base = _ref(source, "base_model", data["base_model"], base_dir) if data.get("base_model") is not None else None
    if base is None and method.needs_base and not method.base_optional:
        raise _fail(source, "base_model", f"missing; merge_method {name!r} works on task vectors and needs the pre-trained model")

    ignored: list[str] = []  # keys another method (or mergekit) reads and this one does not
    base_identity = ref_identity(base) if base is not None else None
    if data.get("slices") is not None:
        if data.get("models") is not None:
            raise _fail(source, "slices", "give either models (whole models merged) or slices (layer ranges stacked), not both")
        slices = _slices(source, data["slices"], method, base, base_dir, ignored)
        models = _distinct_sources(slices)
    else:
        slices = ()
        models = _models(source, data.get("models"), method, base_identity, base_dir, ignored)
    parameters, model_defaults = _global_parameters(source, "parameters", data.get("parameters"), method, ignored)
    added_base: ModelSpec | None = None
    seen = {ref_identity(m.ref) for m in models}
    if base_identity is not None and method.fixed.get("include_base") and base_identity not in seen and not slices:
        # mergekit's linear adds an unlisted base_model to the average with the global weight
        # (and fails without one): do the same, and say clearly when there is no weight to use.
        # A slice averages only its sources, as in mergekit.
        if "weight" not in model_defaults:
            raise _fail(source, "base_model", f"merge_method {name!r} averages base_model with the models, as mergekit does, but it is "
                        "not listed under models and parameters.weight is not set: list it under models with its weight, set "
                        "parameters.weight, or use merge_method: average, where an unlisted base_model only supplies the tensor "
                        "names, config and tokenizer")
        added_base = ModelSpec("base_model", base, {})

    dtype = _dtype(source, "dtype", data.get("dtype"))
    out_dtype = _dtype(source, "out_dtype", data.get("out_dtype")) or dtype

    def _source_ref(key: str) -> ModelRef | str | None:
        value = data.get(key)
        if value is None or value == "base":
            return None
        if value == "union":
            if key != "tokenizer_source":
                raise _fail(source, key, "'union' applies to tokenizers; expected 'base' or a model reference")
            return value
        return _one_folder_ref(source, key, value, base_dir)

    tokenizer_source = _source_ref("tokenizer_source")
    config_source = _source_ref("config_source")
    assert not isinstance(config_source, str)
    inputs = {base_identity, *seen} - {None}
    tokenizer = None
    if data.get("tokenizer") is not None:
        if data.get("tokenizer_source") is not None:
            raise _fail(source, "tokenizer", "give either tokenizer_source or a tokenizer block, not both (as mergekit)")
        tokenizer = _tokenizer_block(source, data["tokenizer"], base_dir, inputs)
        tokenizer_source = tokenizer.source if isinstance(tokenizer.source, ModelRef) else None
    elif tokenizer_source == "union":
        tokenizer = TokenizerSettings("union", key="tokenizer_source")
        tokenizer_source = None
    elif data.get("tokenizer_source") is not None:
        # An explicit source re-indexes only where the models' vocabulary sizes differ.
        tokenizer = TokenizerSettings(tokenizer_source or "base", always=False, key="tokenizer_source")
    chat_template = None
    if data.get("chat_template") is not None:
        value = data["chat_template"]
        if not isinstance(value, str):
            raise _fail(source, "chat_template", f"got {short_repr(value)}; expected a template name or a Jinja template")
        try:
            chat_template = resolve_chat_template(value)
        except ValueError as exc:
            raise _fail(source, "chat_template", str(exc)) from None
    if base is None and (tokenizer_source is None or config_source is None):
        # Without a base model, config and tokenizer come from the first model.
        tokenizer_source = tokenizer_source or models[0].ref
        config_source = config_source or models[0].ref
    max_shard = parse_size(data.get("max_shard_size", DEFAULT_MAX_SHARD_SIZE), field=f"{source}: max_shard_size")
    tasks, owners = _tasks(data.get("tasks"), source, base_dir, models)
    task_of = {owner: i for i, owner in enumerate(owners) if owner is not None}
    models = [replace(m, task=task_of.get(i)) for i, m in enumerate(models)]
    slices = tuple(replace(sl, sources=tuple(replace(m, task=task_of.get(i)) for m, i in zip(sl.sources, sl.inputs))) for sl in slices)
    if added_base is not None:
        # Averaged first, as mergekit does; added after the tasks were matched, so a task's
        # `model:` index still counts the models as the recipe lists them.
        models.insert(0, added_base)
    _check_method_data(source, name, method, models)
    hub_ids = {}
    if data.get("hub_ids") is not None:
        inputs = ([base] if base is not None else []) + [m.ref for m in models]
        hub_ids = named_hub_ids(data["hub_ids"], inputs, base_dir=base_dir, fail=lambda where, msg: _fail(source, f"hub_ids{where}", msg))
    recipe = Recipe(
        method=method, base=base, models=models, parameters=parameters, out_dtype=out_dtype,
        tokenizer_source=tokenizer_source, config_source=config_source, max_shard_size=max_shard,
        tokenizer=tokenizer, chat_template=chat_template,
        allow_pickle=_bool(source, "allow_pickle", data.get("allow_pickle", False)),
        allow_external_symlinks=_bool(source, "allow_external_symlinks", data.get("allow_external_symlinks", False)),
        allow_nonfinite=_bool(source, "allow_nonfinite", data.get("allow_nonfinite", False)),
        push_to_hub=_push_repo(source, data.get("push_to_hub")),
        model_defaults=model_defaults,
        tasks=tasks,
        slices=slices,
        hub_ids=hub_ids,
        # The tasks with their includes merged, so the recipe written beside a merge (and the
        # card) says the whole run without the files it included.
        raw={**data, "tasks": [t.raw for t in tasks]} if tasks else data,
    )
    recipe = replace(recipe, search=_search_spec(source, data.get("search"), recipe))
    notes = []
    if ignored:
        notes.append(f"merge_method {name!r} does not use {', '.join(ignored)}; they are ignored, as mergekit ignores them")
    # The method's advice needs the whole recipe to judge, so it completes a second, final copy.
    # A searched recipe is judged at both ends of its ranges: every candidate lies between.
    if recipe.search is None:
        advice = method.check_recipe(recipe, source)
    else:
        ends = [with_search_values(recipe, {r.name: getattr(r, end) for r in recipe.search_space}) for end in ("low", "high")]
        advice = list(dict.fromkeys(w for end in ends for w in method.check_recipe(end, source)))
    return replace(recipe, warnings=notes + advice)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file. Relative model paths are resolved against its folder.

    Args:
        path: The recipe's YAML file.

    Raises:
        RecipeError: The file is missing, not UTF-8 YAML, larger than 1 MiB or past 100,000
            values once its aliases are expanded (checked before the document is built), or the
            recipe is invalid; the message names the file and the key path.
    """
    path = Path(path)

    # Safe loading, bounded in size and alias expansion; harness `!function` tags are read as
    # markers so tasks can reject them clearly.
    data = load_yaml_file(path, error=RecipeError)
    return replace(parse_recipe(data, source=str(path), base_dir=path.parent.resolve()), path=path)

