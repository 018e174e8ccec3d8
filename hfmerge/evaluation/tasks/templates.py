"""Task templates: ``doc_to_text``, ``doc_to_choice``, ``doc_to_target`` and ``description``
compiled and rendered as lm-evaluation-harness does, in Jinja2's immutable sandbox with
`StrictUndefined` (a typo in a field is an error, not an empty string) and the harness's
``regex_replace`` filter; and the rendered values read as a prompt, options and a label."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import short_repr
from ..metrics import parse_number
from .schema import Example, TaskSpec, fail, suggest

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _regex_replace(string: str, pattern: str, repl: str, count: int = 0) -> str:
    """The harness's `regex_replace` filter."""
    return re.sub(pattern, repl, string, count=count)


_ENV = None


def template_environment():
    """The Jinja2 environment of task templates: sandboxed, immutable, strict about undefined
    names (a typo in a field is an error, not an empty string), with `regex_replace`."""
    global _ENV
    if _ENV is None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
        _ENV.filters["regex_replace"] = _regex_replace
    return _ENV


class _Field:
    """A key whose value names a field of the data: the field's value is used as is."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, doc: Mapping[str, Any]) -> Any:
        return doc[self.name]


class _Template:
    def __init__(self, source: str) -> None:
        self.source = source
        self.compiled = template_environment().from_string(source)

    def __call__(self, doc: Mapping[str, Any]) -> str:
        return self.compiled.render(doc)


def _compile(spec: TaskSpec, key: str, value: str, columns: Sequence[str], split: str) -> _Field | _Template:
    """A field reference or a compiled template, checked against the data's columns.

    Like the harness, a value equal to a field name is that field; anything else is a
    template. A bare word that is not a field is reported as a missing field rather than
    rendered as constant text, since that is nearly always a typo.
    """
    import jinja2
    from jinja2 import meta

    where = f"{spec.key}.{key}"
    fields = ", ".join(columns)
    if key != "description":  # the harness always renders the description as a template
        if value in columns:
            return _Field(value)
        if _IDENTIFIER.fullmatch(value):
            raise fail(spec.source, where, f"field {short_repr(value)} is not in the data of task {short_repr(spec.name)} ({split} split fields: {fields}){suggest(value, columns)}")
    env = template_environment()
    try:
        parsed = env.parse(value)
        template = _Template(value)
    except jinja2.TemplateSyntaxError as exc:
        raise fail(spec.source, where, f"not a valid Jinja template (line {exc.lineno}): {exc.message}") from None
    missing = sorted(meta.find_undeclared_variables(parsed) - set(env.globals) - set(columns))
    if missing:
        name = missing[0]
        raise fail(spec.source, where, f"template field {short_repr(name)} is not in the data of task {short_repr(spec.name)} ({split} split fields: {fields}){suggest(name, columns)}")
    return template


def _render(spec: TaskSpec, key: str, fn: _Field | _Template, doc: Mapping[str, Any], where: str) -> Any:
    import jinja2

    try:
        return fn(doc)
    except jinja2.UndefinedError as exc:
        raise fail(spec.source, f"{spec.key}.{key}", f"{where}: {exc.message} (fields: {', '.join(doc)})") from None
    except jinja2.TemplateError as exc:
        raise fail(spec.source, f"{spec.key}.{key}", f"{where}: template error: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a template calling a method on a wrong type, ...
        raise fail(spec.source, f"{spec.key}.{key}", f"{where}: template failed: {type(exc).__name__}: {exc}") from None


def _as_reference(spec: TaskSpec, value: Any, where: str) -> str:
    """The reference answer of a generate_until task without options: the target's text."""
    key = f"{spec.key}.doc_to_target"
    if isinstance(value, (list, tuple)):
        raise fail(spec.source, key, f"{where}: got {short_repr(value)}; several reference answers are not supported, give one")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise fail(spec.source, key, f"{where}: got {short_repr(value)}; expected the reference answer's text (or a number)")
    text = str(value)
    if not text.strip():
        raise fail(spec.source, key, f"{where}: the reference answer is empty")
    return text


def _as_options(spec: TaskSpec, value: Any, where: str) -> tuple[str, ...]:
    key = f"{spec.key}.doc_to_choice"
    if isinstance(value, str):
        # A template renders text; the harness reads it as a Python literal list.
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise fail(spec.source, key, f"{where}: rendered {short_repr(value)}, which is not a list literal such as ['no', 'yes']") from None
    if isinstance(value, dict):
        raise fail(spec.source, key, f"{where}: got the mapping {short_repr(value)}; pick the list in a template, e.g. '{{{{ choices.text }}}}'")
    if not isinstance(value, (list, tuple)):
        raise fail(spec.source, key, f"{where}: got {short_repr(value)}; expected a list of options")
    options = []
    for j, option in enumerate(value):
        if isinstance(option, bool) or not isinstance(option, (str, int, float)):
            raise fail(spec.source, key, f"{where}: option {j} is {short_repr(option)}; expected text")
        options.append(str(option))
    fewest = 1 if spec.generates else 2  # for generation the options only name the labels
    if len(options) < fewest:
        raise fail(spec.source, key, f"{where}: got {len(options)} option(s) {short_repr(options)}; expected at least {'one' if fewest == 1 else 'two'}")
    for j, option in enumerate(options):
        if not option.strip():
            raise fail(spec.source, key, f"{where}: option {j} is empty")
    return tuple(options)


def _as_label(spec: TaskSpec, value: Any, options: tuple[str, ...], where: str) -> int:
    key = f"{spec.key}.doc_to_target"
    if isinstance(value, (list, tuple)):
        raise fail(spec.source, key, f"{where}: got {short_repr(value)}; several correct answers are not supported, give one label")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv columns with a missing value become floats
    if isinstance(value, str):
        text = value.strip()
        # The option's own text first; then, as the harness does, a number is an index.
        if value in options or text in options:
            return options.index(value if value in options else text)
        if re.fullmatch(r"-?\d+", text):
            value = int(text)
        else:
            raise fail(spec.source, key, f"{where}: label {short_repr(value)} is not among the options {short_repr(list(options))}")
    if isinstance(value, bool) or not isinstance(value, int):
        # numpy integers and the like
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise fail(spec.source, key, f"{where}: got the label {short_repr(value)}; expected an option index or an option's text") from None
    if not 0 <= value < len(options):
        raise fail(spec.source, key, f"{where}: label {value} is out of range for {len(options)} options (0..{len(options) - 1})"
                    + ("; a test split without labels (e.g. GLUE's, labelled -1) cannot be scored" if value < 0 else ""))
    return value


def render_examples(spec: TaskSpec, which: str, dataset: Any, indices: list[int]) -> list[Example]:
    """Render rows of a loaded split into examples, templates checked against its fields first.

    Args:
        spec: The task.
        which: ``validation`` or ``test`` (for messages).
        dataset: The split, a `datasets.Dataset`.
        indices: The rows to render, in order.

    Returns:
        One `Example` per row.

    Raises:
        TaskError: A template names a field the data lacks or fails on a row; a row has too few
            options, an empty one, or a label out of range or not among them; a reference is
            empty, or not a number for a correlation metric. Messages name the task, the key
            and the example.
    """
    split = spec.split_name(which)
    columns = list(dataset.column_names)
    text_fn = _compile(spec, "doc_to_text", spec.doc_to_text, columns, which)
    description_fn = _compile(spec, "description", spec.description, columns, which) if spec.description else None
    choice_fn = None if isinstance(spec.doc_to_choice, tuple) else _compile(spec, "doc_to_choice", spec.doc_to_choice, columns, which)
    target_fn = None if isinstance(spec.doc_to_target, int) else _compile(spec, "doc_to_target", spec.doc_to_target, columns, which)
    # A generate_until task without doc_to_choice: the target is the reference text itself.
    free_text = spec.generates and spec.doc_to_choice == ()
    numbers = [m.name for m in spec.metrics if m.uses_values] if spec.generates else []
    examples = []
    rows = dataset.select(indices) if len(indices) != len(dataset) else dataset
    for position, doc in zip(indices, rows):
        where = f"example {position} of split {short_repr(split)} of task {short_repr(spec.name)}"
        prompt = _render(spec, "doc_to_text", text_fn, doc, where)
        if not isinstance(prompt, str):
            prompt = str(prompt)
        if description_fn is not None:
            prompt = str(_render(spec, "description", description_fn, doc, where)) + prompt
        if free_text:
            target = spec.doc_to_target if target_fn is None else _render(spec, "doc_to_target", target_fn, doc, where)
            options, label = (_as_reference(spec, target, where),), 0
        else:
            options = spec.doc_to_choice if choice_fn is None else _as_options(spec, _render(spec, "doc_to_choice", choice_fn, doc, where), where)
            target = spec.doc_to_target if target_fn is None else _render(spec, "doc_to_target", target_fn, doc, where)
            label = _as_label(spec, target, options, where)
        if numbers and parse_number(options[label]) is None:
            raise fail(spec.source, f"{spec.key}.doc_to_target", f"{where}: the reference {short_repr(options[label])} is not a number, which "
                        f"{numbers[0]} compares with the number in the generated text")
        examples.append(Example(prompt, options, label))
    return examples
