"""Hostile or malformed recipes: refused with one short RecipeError naming the file and the key,
never a traceback, an exhausted memory or a flood of output."""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hfmerge.errors import RecipeError, TaskError, short_repr
from hfmerge.evaluation.tasks import load_tasks_file
from hfmerge.yamlio import MAX_YAML_BYTES
from hfmerge.methods import METHODS
from hfmerge.recipe import MODEL_KEYS, TOP_LEVEL_KEYS, load_recipe, parse_recipe

# One line: the file, the key path, a short rendering of the value and what is expected. The
# longest expected part is the list of method names after an unknown merge_method.
MESSAGE_LIMIT = 160 + len(", ".join(METHODS))


def alias_bomb(levels: int, width: int = 10) -> str:
    """A YAML flow list whose last item, expanded, holds width**levels strings ("billion laughs")."""
    items = ["&l0 [" + ", ".join(["lol"] * width) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


RECIPE_WITH_SLOT = """\
merge_method: task_arithmetic
base_model: {base_model}
models:
  - model: ./a
    parameters: {{weight: {weight}}}
parameters: {{lambda: {lam}}}
"""


def recipe_text(**slots: str) -> str:
    values = {"base_model": "./base", "weight": "0.5", "lam": "1.0", **slots}
    return RECIPE_WITH_SLOT.format(**values)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path


def assert_short_refusal(exc: BaseException, path: Path | str) -> str:
    message = str(exc)
    assert message.startswith(f"{path}: ") and len(message) <= MESSAGE_LIMIT and "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# Alias bombs, oversized and broken files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slot", ["base_model", "lam", "weight"])
def test_an_alias_bomb_is_refused_before_it_is_built(folders, slot):
    """10**6 values after expansion (a million times the file): refused at load, naming the file."""
    recipe = folders / "r.yaml"
    recipe.write_text(recipe_text(**{slot: alias_bomb(6)}))
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert "alias" in assert_short_refusal(info.value, recipe)


def test_a_billion_laughs_recipe_costs_neither_memory_nor_output(folders):
    """The full bomb through the CLI, in a process whose address space is capped: the refusal is
    one short line on stderr, and expanding the value (10**9 strings) would pass the cap."""
    recipe = folders / "r.yaml"
    recipe.write_text(recipe_text(base_model=alias_bomb(9)))
    cap = 4 * 2**30

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hfmerge", str(recipe), "--dry-run"], capture_output=True, text=True,
                          timeout=300, preexec_fn=limit_memory, env=env, cwd=folders)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert len(proc.stderr) <= MESSAGE_LIMIT + 100 and "Traceback" not in proc.stderr
    assert str(recipe) in proc.stderr and "alias" in proc.stderr


def test_merge_key_and_recursive_aliases_are_refused(folders):
    recipe = folders / "r.yaml"
    merges = "\n".join(["  k0: &k0 {x: 1, y: 2}"] + [f"  k{i}: &k{i} {{<<: [*k{i - 1}, *k{i - 1}]}}" for i in range(1, 40)])
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model:\n{merges}\nmodels: [./a]\n")
    with pytest.raises(RecipeError, match="aliases are expanded") as info:
        load_recipe(recipe)
    assert_short_refusal(info.value, recipe)
    recipe.write_text("merge_method: task_arithmetic\nbase_model: &loop [*loop]\nmodels: [./a]\n")
    with pytest.raises(RecipeError, match="recursive") as info:
        load_recipe(recipe)
    assert_short_refusal(info.value, recipe)


def test_a_task_file_is_read_by_the_same_bounded_loader(folders):
    tasks = folders / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - task: t\n    doc_to_choice: {alias_bomb(6)}\n")
    with pytest.raises(TaskError, match="alias") as info:
        load_tasks_file(tasks)
    assert_short_refusal(info.value, tasks)


def test_a_file_over_the_size_bound_is_refused_unread(folders):
    recipe = folders / "r.yaml"
    recipe.write_text(recipe_text() + "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(RecipeError, match="larger than 1 MiB") as info:
        load_recipe(recipe)
    assert_short_refusal(info.value, recipe)


def test_deep_nesting_and_non_utf8_bytes_are_recipe_errors(folders):
    recipe = folders / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match="nested too deeply") as info:
        load_recipe(recipe)
    assert_short_refusal(info.value, recipe)
    recipe.write_bytes(b"merge_method: task_arithmetic\nbase_model: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not UTF-8") as info:
        load_recipe(recipe)
    assert_short_refusal(info.value, recipe)


def test_a_recipe_within_the_bounds_still_loads(folders):
    """Aliases are legitimate YAML: a shared setting used twice loads as before."""
    recipe = folders / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: ./base\nmodels:\n"
                      "  - {model: ./a, parameters: &p {weight: 0.25}}\n  - {model: ./b, parameters: *p}\n")
    loaded = load_recipe(recipe)
    assert [m.parameters["weight"] for m in loaded.models] == [0.25, 0.25]


@pytest.mark.parametrize("key", ["base_model", "merge_method", "dtype", "tokenizer_source", "push_to_hub", "max_shard_size"])
def test_huge_values_and_keys_are_quoted_short(folders, key):
    huge = "x" * 200_000
    data = {"merge_method": "task_arithmetic", "base_model": "./base", "models": ["./a"], key: huge}
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source="r.yaml", base_dir=folders)
    assert_short_refusal(info.value, "r.yaml")
    data = {"merge_method": "task_arithmetic", "base_model": "./base", "models": [{"model": "./a", "parameters": {huge: 1}}], huge: 1}
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, source="r.yaml", base_dir=folders)
    assert_short_refusal(info.value, "r.yaml")


def test_short_repr_is_bounded_whatever_the_value():
    shared: list = ["lol"] * 10
    for _ in range(8):  # 10**9 strings if expanded; cheap because nothing is expanded
        shared = [shared] * 10
    loop: list = []
    loop.append(loop)
    huge_int = 10**2000 * 10**3000  # past the digit limit of str() on Python 3.11+
    for value in (shared, loop, "y" * 10**6, {i: i for i in range(10**5)}, huge_int, [huge_int]):
        assert len(short_repr(value)) <= 80
    assert short_repr("ties") == "'ties'" and short_repr([1, 2]) == "[1, 2]"
    assert "..." in short_repr("z" * 200)


def test_numbers_and_dates_python_cannot_build_are_recipe_errors(folders):
    recipe = folders / "r.yaml"
    for value in ("1" * 5000, "2024-13-45"):
        recipe.write_text(recipe_text(weight=value))
        with pytest.raises(RecipeError, match="a value cannot be read") as info:
            load_recipe(recipe)
        assert_short_refusal(info.value, recipe)


# --------------------------------------------------------------------------------------------
# A wrong type for every key of the schema
# --------------------------------------------------------------------------------------------

# Values that no key takes (lists and mappings of garbage) and scalars that some keys take.
CONTAINERS = {"a list": [["x"]], "a mapping": {"x": {"y": 1}}}
SCALARS = {"a number": 12345, "a string": "no such thing ~", "null": None, "a boolean": True}


# Methods whose own checks want one fine-tuned model, and global parameters without a default.
ONE_MODEL = {"arcee_fusion", "nearswap", "passthrough", "slerp"}
REQUIRED_PARAMETERS = {"nearswap": {"t": 0.0001}, "slerp": {"t": 0.5}}


def baseline(method: str, folders: Path) -> dict[str, Any]:
    """A valid recipe for `method` with two models (one where it takes one), every per-model key present."""
    spec = METHODS[method]
    data: dict[str, Any] = {"merge_method": method, "models": [{"model": "./a"}, {"model": "./b"}][:1 if method in ONE_MODEL else 2]}
    if method in REQUIRED_PARAMETERS:
        data["parameters"] = dict(REQUIRED_PARAMETERS[method])
    if spec.needs_base:
        data["base_model"] = "./base"
    if spec.needs_importance and not spec.search:
        for i, m in enumerate(data["models"]):
            m["fisher"] = f"f{i}.safetensors"
    if spec.search:
        (folders / "v.jsonl").write_text('{"text": "w1", "label": 1}\n')
        data["tasks"] = [{"task": t, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "v.jsonl"}},
                          "validation_split": "validation", "doc_to_text": "{{text}}", "doc_to_choice": ["no", "yes"],
                          "doc_to_target": "label"} for t in ("ta", "tb")]
    return data


def check_substitution(folders: Path, data: dict[str, Any], path: str, kind: str) -> None:
    """Parse `data`: a container must be refused, a scalar parsed or refused; a refusal is a
    RecipeError (never TypeError, KeyError, ...) whose message names `path` and stays short."""
    try:
        parse_recipe(data, source="r.yaml", base_dir=folders)
    except RecipeError as exc:
        message = str(exc)
        assert message.startswith("r.yaml: ") and path in message, (path, kind, message)
        assert len(message) <= MESSAGE_LIMIT, (path, kind, message)
    else:
        assert kind not in CONTAINERS, f"{path}: {kind} was accepted"


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
@pytest.mark.parametrize("key", TOP_LEVEL_KEYS)
def test_every_top_level_key_refuses_a_wrong_type(folders, method, key):
    valid = baseline(method, folders)
    parse_recipe(copy.deepcopy(valid), source="r.yaml", base_dir=folders)
    wrong = {**CONTAINERS, **SCALARS}
    must_refuse = set(CONTAINERS)
    if key in valid:  # e.g. merge_method: [task_arithmetic], models: [[...]]
        wrong["the valid value in a list"] = [valid[key]]
        must_refuse.add("the valid value in a list")
    for kind, value in wrong.items():
        data = copy.deepcopy(valid)
        data[key] = copy.deepcopy(value)
        try:
            parse_recipe(data, source="r.yaml", base_dir=folders)
        except RecipeError as exc:
            message = str(exc)
            assert message.startswith(f"r.yaml: {key}"), (key, kind, message)
            assert len(message) <= MESSAGE_LIMIT, (key, kind, message)
        else:
            assert kind not in must_refuse, f"{key}: {kind} was accepted"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_per_model_key_and_parameter_refuses_a_wrong_type(folders, method):
    """models[0]'s keys, the method's per-model parameters (per model and as global defaults)
    and its global parameters, each given every wrong type in turn."""
    spec = METHODS[method]
    valid = baseline(method, folders)
    parse_recipe(copy.deepcopy(valid), source="r.yaml", base_dir=folders)
    for kind, value in {**CONTAINERS, **SCALARS}.items():
        for key in MODEL_KEYS:
            data = copy.deepcopy(valid)
            data["models"][0][key] = copy.deepcopy(value)
            check_substitution(folders, data, f"models[0].{key}", kind)
        for param in spec.per_model:
            data = copy.deepcopy(valid)
            data["models"][0]["parameters"] = {param.name: copy.deepcopy(value)}
            check_substitution(folders, data, f"parameters.{param.name}", kind)
            data = copy.deepcopy(valid)
            data["parameters"] = {param.name: copy.deepcopy(value)}
            check_substitution(folders, data, f"parameters.{param.name}", kind)
        for param in spec.params:
            data = copy.deepcopy(valid)
            data["parameters"] = {param.name: copy.deepcopy(value)}
            check_substitution(folders, data, f"parameters.{param.name}", kind)


def test_the_issue_examples_are_recipe_errors(folders):
    with pytest.raises(RecipeError, match=r"r.yaml: merge_method: got \['ties'\]; expected a method name"):
        parse_recipe({"merge_method": ["ties"], "base_model": "./base", "models": ["./a"]}, source="r.yaml", base_dir=folders)
    with pytest.raises(RecipeError, match=r"r.yaml: dtype: got \['float32'\]; expected one of float32"):
        parse_recipe({"merge_method": "ties", "base_model": "./base", "models": ["./a"], "dtype": ["float32"]}, source="r.yaml", base_dir=folders)


def test_paths_the_os_refuses_and_huge_task_values_are_one_short_error(folders):
    import hfmerge

    # A recipe path too long for the OS: a RecipeError, not an OSError.
    with pytest.raises(RecipeError) as refused:
        hfmerge.plan(folders / ("r" * 300 + ".yaml"))
    err = str(refused.value)
    assert "cannot be read" in err and len(err) < 600 and len(err.splitlines()) == 1
    task = {"task": "t", "doc_to_text": "{{x}}", "doc_to_choice": ["a", "b"], "doc_to_target": 0}
    base = {"merge_method": "task_arithmetic", "base_model": "./base", "models": ["./a"]}
    for tasks in ([{**task, "dataset_path": "./" + "d" * 300}], [{**task, "dataset_path": "json", "dataset_kwargs": {"data_files": "/" + "f" * 300}}],
                  "x" * 200_000, [{**task, "dataset_path": "json", "task": ["z"] * 100_000}]):
        with pytest.raises(RecipeError) as info:
            parse_recipe({**base, "tasks": tasks}, source="r.yaml", base_dir=folders)
        assert len(str(info.value)) < 600, str(info.value)[:200]


def test_a_size_too_large_for_a_number_is_refused_on_the_command_line_and_in_the_recipe(folders, capsys):
    from hfmerge.cli import main

    recipe = folders / "r.yaml"
    recipe.write_text(recipe_text())
    assert main([str(recipe), "--dry-run", "--max-shard-size", "1" * 400]) == 1
    err = capsys.readouterr().err
    assert "--max-shard-size: expected a size" in err and "Traceback" not in err and len(err) < 400
    with pytest.raises(RecipeError, match="max_shard_size: must be positive") as info:
        parse_recipe({"merge_method": "task_arithmetic", "base_model": "./base", "models": ["./a"], "max_shard_size": -10**5000},
                     source="r.yaml", base_dir=folders)
    assert len(str(info.value)) < 400
