"""The registry that maps recipe method names to pure tensor functions.

A merge method is a function of one tensor position::

    fn(base, tensors, *, importances=None, generators=None, **params) -> merged

``base`` is the pre-trained tensor (float32; ``None`` for methods that ignore it),
``tensors`` the M fine-tuned tensors (float32), ``importances`` the per-model importance
tensors (Fisher; RegMean's Gram matrices) when the method declares it needs them, ``generators`` one seeded
``torch.Generator`` per model for random methods, and ``params`` the method's parameters:
per-model ones as lists of M floats, global ones as scalars. No I/O, no model objects.
The tensors arrive on the merge device (the CPU, or the GPU with ``--device cuda``): a new
tensor takes its inputs' device (``torch.zeros_like``, ``device=t.device``), while the
generators stay on the CPU (draw there and move the draw, as ``_common.random_drop_`` does).

What a method needs beyond one tensor position is declared or hooked here, never as a
branch on its name elsewhere:

- declared needs: ``needs_base`` (``base_optional``), ``needs_importance`` (with ``importance`` ``diagonal``,
  ``nodes`` or ``gram`` and ``importance_optional``), ``random`` (seeded generators) and ``search``;
- ``validate(recipe, source) -> warnings``: the method's own recipe checks, called once from
  `hfmerge.recipe.parse_recipe` after the generic ones; it raises `RecipeError` naming the key
  path and returns advice for the plan's warnings;
- ``prepare(context) -> kwargs``: a whole-model pre-pass run once before the streaming merge,
  through a read-only `PrepareContext`; what it returns is passed to every per-tensor call
  (TIES' global trim thresholds, Fisher norms), so the per-tensor function stays pure.

Adding a method = one module with a function decorated by `merge_method` + its import in
``hfmerge/methods/__init__.py`` + its formula test; nothing outside this package changes.

Importing a method module must not import torch: `hfmerge.recipe` imports every method to
validate a recipe, and recipe checks, ``--help`` and a local ``--dry-run`` run without torch
(importing it costs seconds). So a method module (and every helper module here) follows one
pattern, which ``tests/test_startup.py`` checks for every module in this package:

- ``from __future__ import annotations`` at the top, so ``torch.Tensor`` in annotations is
  never evaluated;
- ``import torch`` at module level only under ``if TYPE_CHECKING:``;
- ``import torch`` as the first statement of each function that calls torch at run time
  (after its docstring; the import is a dictionary look-up once torch is loaded);
- no torch object at module level: no ``torch.float32`` constants or default arguments
  (write the name as a string and look it up inside the function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

if TYPE_CHECKING:
    import torch

    from ..recipe import Recipe

_T = TypeVar("_T")


class TensorPosition(Protocol):
    """One merged tensor position of the plan, as a pre-pass sees it (read-only)."""

    name: str
    shape: tuple[int, ...]
    depth: float  # relative depth t in [0, 1], where gradient parameters are evaluated

    @property
    def numel(self) -> int: ...


class PrepareContext(Protocol):
    """What a `prepare` hook may read: the recipe and the plan's merged positions.

    Attributes:
        recipe: The validated recipe (parameters, models, per-model settings).
        positions: Every tensor position that is merged (not copied), in plan order; tied
            aliases appear once per stored name, as in the merge itself.
    """

    recipe: "Recipe"
    positions: Sequence[TensorPosition]

    def inputs(self, position: TensorPosition) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The base tensor (None without a base) and the M model tensors, float32, as the merge reads them."""
        ...

    def importances(self, position: TensorPosition) -> list[torch.Tensor]:
        """The M diagonal importance (Fisher) tensors of `position`, in their stored dtype."""
        ...

    def progress(self, items: Iterable[_T], desc: str) -> Iterator[_T]:
        """`items`, with a progress bar labelled `desc` when the run shows progress."""
        ...


Validate = Callable[["Recipe", str], list[str]]
Prepare = Callable[[PrepareContext], dict[str, Any]]


@dataclass(frozen=True)
class Param:
    """A method parameter as the recipe gives it.

    Attributes:
        name: Recipe key (mergekit's name where mergekit has the concept).
        default: Value when the recipe omits it (mergekit's default where it has one).
        kind: ``float``, ``int``, ``bool``, ``str`` or ``list`` (of numbers or of lists of numbers).
        low, high: Allowed range (inclusive unless `low_open` / `high_open`).
        choices: Allowed values for ``str`` parameters.
        help: One line for the docs and error messages.
        tensor: For a global (``parameters``) number: it may also be a gradient or a filter list
            and is resolved per tensor position before the call, like per-model parameters
            (mergekit's tensor parameters, e.g. slerp's ``t``).
    """

    name: str
    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    help: str = ""
    tensor: bool = False  # a global parameter that may vary by tensor (a gradient or a filter list), as mergekit's tensor parameters

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is list:
            return "a list of numbers (or a list of such lists)"
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            lo = "(" if self.low_open else "["
            hi = ")" if self.high_open else "]"
            return f"{what} in {lo}{self.low}, {self.high}{hi}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low}"
        return what

    def check(self, value: Any) -> str | None:
        """Return None if `value` is acceptable, else what was expected."""
        if self.kind is bool:
            return None if isinstance(value, bool) else self.expected()
        if self.kind is str:
            return None if isinstance(value, str) and (not self.choices or value in self.choices) else self.expected()
        if self.kind is list:
            def numbers(v: Any) -> bool:
                return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            return None if isinstance(value, list) and (numbers(value) or all(numbers(v) for v in value)) else self.expected()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return self.expected()
        if not math.isfinite(value):
            return self.expected()
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return self.expected()
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return self.expected()
        return None


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function and what the recipe may set for it."""

    name: str
    func: Callable[..., torch.Tensor]
    per_model: tuple[Param, ...] = ()
    params: tuple[Param, ...] = ()
    needs_base: bool = True
    needs_importance: bool = False
    random: bool = False
    paper: str = ""
    summary: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    importance: str = "diagonal"  # "diagonal" (per-entry Fisher), "nodes" (Fisher Mask Nodes) or "gram" (RegMean's Gram matrices)
    search: bool = False  # coefficients found by a search (DF-Merge) before the streaming merge
    importance_optional: bool = False  # the method also runs without importances (F = 1)
    validate: Validate | None = None  # method-specific recipe checks (module docstring)
    prepare: Prepare | None = None  # whole-model pre-pass returning extra per-tensor kwargs
    base_optional: bool = False  # with needs_base: runs without a base_model too (then base is None)

    def check_recipe(self, recipe: "Recipe", source: str) -> list[str]:
        """Run the method's own recipe checks.

        Args:
            recipe: The recipe, validated by the generic checks.
            source: The recipe's name for messages.

        Returns:
            Advice for the plan's warnings (empty without a `validate` hook).

        Raises:
            RecipeError: A setting this method cannot run with, naming the key path.
        """
        return self.validate(recipe, source) if self.validate is not None else []

    def prepared_kwargs(self, context: PrepareContext) -> dict[str, Any]:
        """Run the method's whole-model pre-pass.

        Args:
            context: Read access to the recipe and the plan's merged positions.

        Returns:
            Keyword arguments added to every per-tensor call (empty without a `prepare` hook).
        """
        return self.prepare(context) if self.prepare is not None else {}

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def model_param(self, name: str) -> Param | None:
        for p in self.per_model:
            if p.name == name:
                return p
        return None


METHODS: dict[str, MergeMethod] = {}


def merge_method(name: str, *, per_model: tuple[Param, ...] = (), params: tuple[Param, ...] = (), needs_base: bool = True,
                 needs_importance: bool = False, random: bool = False, paper: str = "", summary: str = "",
                 aliases: dict[str, dict[str, Any]] | None = None, alias_defaults: dict[str, dict[str, Any]] | None = None,
                 importance: str = "diagonal", search: bool = False, importance_optional: bool = False,
                 validate: Validate | None = None, prepare: Prepare | None = None, base_optional: bool = False) -> Callable:
    """Register a pure tensor function as a merge method.

    Args:
        name: The recipe's ``merge_method`` value.
        per_model: Parameters set per model under ``models[].parameters``.
        params: Global parameters under ``parameters``.
        needs_base: Whether the method reads the base model's tensor. A base listed among
            ``models`` is then not one of the M models (its task vector is zero), as in mergekit.
        base_optional: With `needs_base`: ``base_model`` may be omitted, and the function then
            gets ``base=None`` (mergekit's nuslerp, multislerp, karcher).
        needs_importance: Whether it needs per-model importance tensors (Fisher).
        random: Whether it draws random numbers (it then receives seeded generators).
        paper: Link to the method's paper, for docs and the model card.
        summary: One line describing the method.
        aliases: Other names for the same function with some parameters fixed, e.g.
            mergekit's ``dare_ties`` = ``dare`` with ``combine: ties``.
        alias_defaults: Per alias, parameters whose default differs from the main name's
            (to keep mergekit's defaults under mergekit's names).
        importance: ``diagonal`` (a Fisher per entry), ``nodes`` (per head and neuron,
            spread to the entries by the engine) or ``gram`` (per 2-D weight [out, in], each
            model's [in, in] Gram matrix of the layer's inputs; None for tensors without one).
        search: The per-model coefficients are searched (DF-Merge) before the merge.
        importance_optional: Importances may be switched off (then all ones).
        validate: ``validate(recipe, source) -> warnings``: the method's own recipe checks,
            raising `RecipeError` with the key path; run once when the recipe is parsed.
        prepare: ``prepare(context) -> kwargs``: a whole-model pre-pass over the plan's
            positions (`PrepareContext`), run once before the streaming merge; the returned
            keyword arguments go to every per-tensor call.

    Returns:
        A decorator that registers the function (under `name` and every alias) and returns it.

    Raises:
        ValueError: A name is registered twice.
    """

    def register(func: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        for method_name, fixed in {name: {}, **(aliases or {})}.items():
            if method_name in METHODS:
                raise ValueError(f"merge method {method_name!r} registered twice")
            defaults = (alias_defaults or {}).get(method_name, {})
            visible = tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p for p in params if p.name not in fixed)
            METHODS[method_name] = MergeMethod(method_name, func, per_model, visible, needs_base, needs_importance, random, paper, summary,
                                               dict(fixed), importance, search, importance_optional, validate, prepare, base_optional)
        return func

    return register


# Parameters that mergekit accepts for some method but hfmerge's methods never read: a recipe
# that sets them runs, with a warning that names them (they change nothing in hfmerge).
MERGEKIT_ONLY_PARAMS = frozenset({"int8_mask"})


def known_parameter_names() -> frozenset[str]:
    """Every parameter name some registered method reads, plus mergekit's that none does."""
    names = set(MERGEKIT_ONLY_PARAMS)
    for method in METHODS.values():
        names.update(p.name for p in method.per_model + method.params)
        names.update(method.fixed)
    return frozenset(names)
