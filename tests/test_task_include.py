"""lm-evaluation-harness's ``include:`` in task definitions: overrides, nesting, relative paths
and the errors of missing files, cycles and oversized files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfmerge.evaluation.tasks import MAX_YAML_BYTES, TaskError, load_task_data, load_tasks_file, parse_tasks
from hfmerge.recipe import load_recipe

BASE_TASK = """\
task: rte
dataset_path: json
dataset_kwargs: {data_files: {validation: data/rte.jsonl}}
validation_split: validation
doc_to_text: "{{premise}} True or False?"
doc_to_choice: ["True", "False"]
doc_to_target: label
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_data(path: Path, n: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"premise": f"p{i}", "label": i % 2}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """tasks/rte.yaml with its data beside it, in tasks/data/."""
    write_data(tmp_path / "tasks" / "data" / "rte.jsonl")
    return write(tmp_path / "tasks" / "rte.yaml", BASE_TASK)


def test_the_entry_s_keys_override_the_included_ones(tmp_path, shared):
    spec, = parse_tasks([{"include": "tasks/rte.yaml", "doc_to_text": "{{premise}}?", "limit": 2}], source="r.yaml", base_dir=tmp_path)
    assert (spec.name, spec.doc_to_text, spec.doc_to_choice, spec.limit) == ("rte", "{{premise}}?", ("True", "False"), 2)
    # Relative data paths of an included key are the included file's own.
    assert spec.dataset_kwargs["data_files"] == {"validation": str(tmp_path / "tasks" / "data" / "rte.jsonl")}
    assert "include" not in spec.raw and spec.raw["doc_to_text"] == "{{premise}}?" and spec.raw["dataset_path"] == "json"
    assert spec.origins["dataset_kwargs"] == tmp_path / "tasks" / "rte.yaml" and "doc_to_text" not in spec.origins
    data = load_task_data(spec)
    assert [e.prompt for e in data.validation] == ["p0?", "p1?"]


def test_a_whole_mapping_is_replaced_not_merged(tmp_path, shared):
    write_data(tmp_path / "mine.jsonl")
    spec, = parse_tasks([{"include": "tasks/rte.yaml", "dataset_kwargs": {"data_files": {"validation": "mine.jsonl"}}}],
                        source="r.yaml", base_dir=tmp_path)
    assert spec.dataset_kwargs == {"data_files": {"validation": str(tmp_path / "mine.jsonl")}}


def test_a_list_of_includes_earlier_files_win_as_in_the_harness(tmp_path, shared):
    write(tmp_path / "tasks" / "prompt.yaml", 'doc_to_text: "Premise: {{premise}}"\nlimit: 3\n')
    spec, = parse_tasks([{"include": ["tasks/prompt.yaml", "tasks/rte.yaml"]}], source="r.yaml", base_dir=tmp_path)
    assert (spec.doc_to_text, spec.limit, spec.name) == ("Premise: {{premise}}", 3, "rte")
    spec, = parse_tasks([{"include": ["tasks/rte.yaml", "tasks/prompt.yaml"]}], source="r.yaml", base_dir=tmp_path)
    assert spec.doc_to_text == "{{premise}} True or False?" and spec.limit == 3


def test_nested_includes_resolve_against_each_file_s_folder(tmp_path, shared):
    # family/rte_short.yaml includes ../tasks/rte.yaml, relative to family/, not to the recipe.
    write(tmp_path / "family" / "rte_short.yaml", "include: ../tasks/rte.yaml\nlimit: 1\n")
    recipe = write(tmp_path / "eval.yaml", "tasks:\n  - include: family/rte_short.yaml\n    task: rte_one\n")
    spec, = load_tasks_file(recipe)
    assert (spec.name, spec.limit, spec.doc_to_text) == ("rte_one", 1, "{{premise}} True or False?")
    assert spec.origins["limit"] == tmp_path / "family" / "rte_short.yaml"
    assert spec.origins["doc_to_text"] == tmp_path / "family" / ".." / "tasks" / "rte.yaml"
    assert len(load_task_data(spec).validation) == 1


def test_a_tasks_file_may_be_one_task_made_of_an_include(tmp_path, shared):
    path = write(tmp_path / "rte_test.yaml", "include: tasks/rte.yaml\ntest_split: validation\n")
    spec, = load_tasks_file(path)
    assert (spec.name, spec.test_split) == ("rte", "validation")


def test_a_recipe_includes_relative_to_its_folder_and_keeps_the_merged_tasks(tmp_path, shared, monkeypatch):
    recipe = write(tmp_path / "recipe.yaml", "merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n  - model: org/ft\n"
                                             "parameters: {weight: 0.3}\ntasks:\n  - include: tasks/rte.yaml\n")
    monkeypatch.chdir(tmp_path / "tasks")  # the working folder plays no part
    parsed = load_recipe(recipe)
    assert parsed.tasks[0].name == "rte"
    # The recipe written beside a merge holds the tasks whole, not the includes.
    assert parsed.raw["tasks"][0]["doc_to_text"] == "{{premise}} True or False?" and "include" not in parsed.raw["tasks"][0]


def test_a_missing_included_file_is_named(tmp_path):
    with pytest.raises(TaskError, match=r"r\.yaml: tasks\[0\]\.include: included file not found: .*nowhere\.yaml \(relative paths "
                                        r"are resolved against .*, the folder of the file that includes it\)"):
        parse_tasks([{"include": "nowhere.yaml", "task": "t"}], source="r.yaml", base_dir=tmp_path)
    write(tmp_path / "a.yaml", "include: [b.yaml, gone.yaml]\n")
    write(tmp_path / "b.yaml", BASE_TASK)
    with pytest.raises(TaskError, match=r"a\.yaml: include\[1\]: included file not found: .*gone\.yaml"):
        parse_tasks([{"include": "a.yaml"}], source="r.yaml", base_dir=tmp_path)


@pytest.mark.parametrize("value", [3, [], ["ok.yaml", None], {"file": "x.yaml"}, ""])
def test_an_include_must_be_paths(tmp_path, value):
    with pytest.raises(TaskError, match=r"r\.yaml: tasks\[0\]\.include: got .*; expected the path of a task YAML file"):
        parse_tasks([{"include": value}], source="r.yaml", base_dir=tmp_path)


def test_an_included_file_must_hold_a_task_mapping(tmp_path):
    write(tmp_path / "list.yaml", "- task: a\n")
    with pytest.raises(TaskError, match=r"tasks\[0\]\.include: .*list\.yaml holds list; an included file holds one task mapping"):
        parse_tasks([{"include": "list.yaml"}], source="r.yaml", base_dir=tmp_path)


def test_an_include_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", "include: b.yaml\ntask: a\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(TaskError, match=r"b\.yaml: include: 'a\.yaml' closes an include cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        parse_tasks([{"include": "a.yaml"}], source="r.yaml", base_dir=tmp_path)
    write(tmp_path / "self.yaml", "include: ./self.yaml\n")
    with pytest.raises(TaskError, match=r"self\.yaml: include: '\./self\.yaml' closes an include cycle"):
        load_tasks_file(tmp_path / "self.yaml")


def test_a_file_included_twice_is_not_a_cycle(tmp_path, shared):
    write(tmp_path / "tasks" / "limit.yaml", "include: rte.yaml\nlimit: 2\n")
    specs = parse_tasks([{"include": ["tasks/limit.yaml", "tasks/rte.yaml"]}, {"include": "tasks/rte.yaml", "task": "rte2"}],
                        source="r.yaml", base_dir=tmp_path)
    assert [(s.name, s.limit) for s in specs] == [("rte", 2), ("rte2", None)]


def test_included_files_have_the_recipe_s_size_bounds(tmp_path):
    write(tmp_path / "big.yaml", BASE_TASK + "# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(TaskError, match=r"big\.yaml: larger than 1 MiB"):
        parse_tasks([{"include": "big.yaml"}], source="r.yaml", base_dir=tmp_path)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                                            for p, c in zip("abcdef", "bcdefg"))
    write(tmp_path / "bomb.yaml", bomb)
    with pytest.raises(TaskError, match=r"bomb\.yaml: refused: the YAML holds more than"):
        parse_tasks([{"include": "bomb.yaml"}], source="r.yaml", base_dir=tmp_path)


def test_includes_are_bounded_in_number(tmp_path, monkeypatch):
    import hfmerge.evaluation.tasks.include as include

    monkeypatch.setattr(include, "MAX_INCLUDES", 3)
    write(tmp_path / "x.yaml", "limit: 1\n")
    with pytest.raises(TaskError, match=r"tasks\[0\]\.include\[\d\]: refused: more than 3 includes in all"):
        parse_tasks([{"include": ["x.yaml"] * 4}], source="r.yaml", base_dir=tmp_path)


def test_errors_about_an_included_key_name_its_file(tmp_path, shared):
    write(tmp_path / "tasks" / "bad.yaml", BASE_TASK.replace('["True", "False"]', '["only one"]'))
    with pytest.raises(TaskError, match=r"r\.yaml: tasks\[0\]\.doc_to_choice: got \['only one'\]; expected at least two options "
                                        r"\(doc_to_choice is set in .*bad\.yaml\)"):
        parse_tasks([{"include": "tasks/bad.yaml"}], source="r.yaml", base_dir=tmp_path)
    # When the data is read too: a template naming a field the data lacks.
    spec, = parse_tasks([{"include": "tasks/rte.yaml", "doc_to_target": "{{ lable }}"}], source="r.yaml", base_dir=tmp_path)
    with pytest.raises(TaskError, match=r"tasks\[0\]\.doc_to_target: template field 'lable' is not in the data") as caught:
        load_task_data(spec)
    assert "is set in" not in str(caught.value)  # the entry's own key: no included file to name
    write(tmp_path / "tasks" / "rte2.yaml", BASE_TASK.replace("{{premise}} True", "{{premis}} True"))
    spec, = parse_tasks([{"include": "tasks/rte2.yaml"}], source="r.yaml", base_dir=tmp_path)
    with pytest.raises(TaskError, match=r"tasks\[0\]\.doc_to_text: template field 'premis' is not in the data .* "
                                        r"\(doc_to_text is set in .*rte2\.yaml\)"):
        load_task_data(spec)
