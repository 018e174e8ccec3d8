"""Validation and test tasks: the recipe's ``tasks:`` section, parsed, checked and rendered.

A task is written with lm-evaluation-harness's task keys (``task``, ``dataset_path``,
``dataset_name``, ``dataset_kwargs``, ``validation_split``, ``test_split``, ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``metric_list``, ``description``, ``target_delimiter``,
``output_type``, ``generation_kwargs``, ``include``), so a harness task can be pasted in;
hfmerge adds a few keys of its own (``validation_fraction``, ``test_fraction``,
``num_validation_examples``, ``num_test_examples``, ``limit``, ``seed``, ``model``,
``normalization``, ``manual_download_instructions``). docs/tasks.md is the reference.

A task is scored one of two ways, chosen by ``output_type`` as in the harness:
``multiple_choice`` (the default) ranks the options by log-likelihood (scoring.py);
``generate_until`` generates an answer greedily and compares it with the reference text
(generation.py). One task definition with ``doc_to_choice`` serves both: for generation the
label picks the option whose text is the reference.

Two steps, both before any model is loaded:

1. `parse_tasks` resolves ``include:`` and checks the keys, types and values and that every
   local data file exists (no data is read).
2. `load_task_data` reads the splits with `datasets`, carves and subsamples them with the
   task's seed, and renders every example into (prompt, options, label index); for a
   ``generate_until`` task without ``doc_to_choice`` the options are the one reference.
   Templates are checked against the data's fields first, so a typo in a field name is
   reported as such, naming the task, the key and the field.

Templates are Jinja2 run in `jinja2.sandbox.ImmutableSandboxedEnvironment` with
`StrictUndefined`, like the harness's (which adds a ``regex_replace`` filter; so does
hfmerge), but without the harness's ``!function`` Python hooks: a recipe runs no code.

    schema.py     the keys, `TaskSpec`, `Example`, `TaskData`, `TaskError`
    include.py    lm-evaluation-harness's ``include:``
    parse.py      `parse_tasks`, `load_tasks_file`, `match_tasks_to_models`
    templates.py  the sandboxed Jinja2 ``doc_to_*`` rendering
    data.py       `load_task_data`: splits, slices, manual downloads, carving, subsets

YAML is read by `hfmerge.yamlio` (bounded size and aliases, ``!function`` read as a marker).
"""

from __future__ import annotations

from .data import load_task_data
from .include import MAX_INCLUDES, resolve_includes
from .parse import load_tasks_file, match_tasks_to_models, parse_tasks
from .schema import DEFAULT_MAX_GEN_TOKS, DEFAULT_UNTIL, NORMALIZATIONS, Example, TaskData, TaskError, TaskSpec
from ...yamlio import MAX_YAML_BYTES, MAX_YAML_NODES, load_yaml_file, yaml_loader

__all__ = [
    "TaskError", "TaskSpec", "Example", "TaskData", "parse_tasks", "load_task_data", "load_tasks_file",
    "match_tasks_to_models", "resolve_includes", "yaml_loader", "load_yaml_file", "NORMALIZATIONS",
    "DEFAULT_MAX_GEN_TOKS", "DEFAULT_UNTIL", "MAX_YAML_BYTES", "MAX_YAML_NODES", "MAX_INCLUDES",
]
