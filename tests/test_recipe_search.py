"""Searching any method's parameters: `{search: [low, high]}` ranges, checked in the recipe,
searched with the DF-Merge engine, merged from the best trial."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hfmerge
from hfmerge.cli import main
from hfmerge.errors import RecipeError, SearchError
from hfmerge.options import RunOptions
from hfmerge.recipe import SearchRange, parse_recipe, recipe_syntax, with_search_values
from hfmerge.testing import build_base, build_finetuned, keyword_rows, word_tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_family(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return tiny_family(tmp_path_factory, "t5")


def tiny_family(tmp_path_factory, family: str) -> dict:
    """A tiny base with a word tokenizer, two noisy variants and a yes/no validation task."""
    root = tmp_path_factory.mktemp(f"search-{family}")
    base = build_base(root / "base", family, seed=5)
    word_tokenizer(64).save_pretrained(base)
    models = [build_finetuned(base, root / f"ft{i}", seed=i, scale=0.05) for i in range(2)]
    rows = keyword_rows(16, keyword="w9", seed=1)
    (root / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "has_w9", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(root / "v.jsonl")}},
            "validation_split": "validation", "doc_to_text": "{{text}}", "doc_to_choice": ["w5", "w6"], "doc_to_target": "label"}
    return {"base": base, "models": models, "task": task}


def recipe_dict(llama, method: str, parameters: dict, models: list[dict] | None = None, **extra) -> dict:
    return {"merge_method": method, "base_model": str(llama["base"]),
            "models": models or [{"model": str(m)} for m in llama["models"]], "parameters": parameters, "tasks": [llama["task"]], **extra}


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# -- the recipe ------------------------------------------------------------------------------------


def test_ranges_anywhere_get_stable_names_and_fixing_them_gives_an_ordinary_recipe(llama):
    models = [{"model": str(llama["models"][0]), "parameters": {"weight": {"search": [0, 1]}, "density": [0.2, {"search": [0.1, 0.9]}]}},
              {"model": str(llama["models"][1]), "parameters": {"weight": [{"filter": "mlp", "value": {"search": [0.5, 2]}}, {"value": 1.0}]}}]
    data = recipe_dict(llama, "ties", {"lambda": {"search": [0.5, 1.5], "step": 0.25}, "density": {"search": [0.1, 0.9], "log": True}},
                       models, search={"n_trials": 5, "n_startup_trials": 2, "seed": 3, "patience": 2})
    recipe = parse_recipe(data)
    space = {r.name: r for r in recipe.search_space}
    assert list(space) == ["lambda", "density", "models[0].weight", "models[0].density[1]", "models[1].weight[0].value"]
    assert space["lambda"] == SearchRange("lambda", 0.5, 1.5, step=0.25, path="parameters.lambda")
    assert space["density"].log and space["models[0].density[1]"].path == "models[0].parameters.density[1]"
    assert (recipe.search.n_trials, recipe.search.n_startup_trials, recipe.search.seed, recipe.search.patience) == (5, 2, 3, 2)
    assert recipe_syntax(recipe.parameters["lambda"]) == {"search": [0.5, 1.5], "step": 0.25}
    assert recipe_syntax(recipe.models[0].parameters["density"]) == [0.2, {"search": [0.1, 0.9]}]
    assert recipe_syntax(recipe.models[1].parameters["weight"]) == [{"filter": "mlp", "value": {"search": [0.5, 2.0]}}, {"value": 1.0}]
    # YAML 1.1 reads 1e-5 as a string; a range of a float parameter takes it as the number, as a value does.
    small = parse_recipe(recipe_dict(llama, "ties", yaml.safe_load("lambda: {search: [1e-5, 1e-1], log: true}")))
    assert (small.search_space[0].low, small.search_space[0].high) == (1e-5, 0.1)

    values = {"lambda": 1.25, "density": 0.3, "models[0].weight": 0.7, "models[0].density[1]": 0.4, "models[1].weight[0].value": 1.5}
    fixed = with_search_values(recipe, values)
    assert fixed.search is None and fixed.search_space == ()
    assert fixed.parameters["lambda"] == 1.25 and fixed.model_defaults["density"] == 0.3
    assert fixed.model_param(fixed.models[0], "weight", "x") == 0.7
    assert fixed.model_param(fixed.models[0], "density", "model.layers.1.mlp", 1.0) == pytest.approx(0.4)
    assert fixed.model_param(fixed.models[1], "weight", "model.layers.0.mlp.up_proj.weight") == 1.5
    # The echoed YAML has the values written where the ranges were, and no search block.
    raw = fixed.raw
    assert "search" not in raw and raw["parameters"] == {"lambda": 1.25, "density": 0.3}
    assert raw["models"][0]["parameters"] == {"weight": 0.7, "density": [0.2, 0.4]}
    assert raw["models"][1]["parameters"]["weight"][0] == {"filter": "mlp", "value": 1.5}
    assert parse_recipe(raw).search is None  # it parses as a plain recipe
    assert recipe.raw["parameters"]["lambda"] == {"search": [0.5, 1.5], "step": 0.25}  # the searched recipe is left as it was


def test_a_shared_per_model_range_is_one_parameter_and_integers_get_an_int_distribution(llama):
    from optuna.distributions import FloatDistribution, IntDistribution

    from hfmerge.recipe_search import search_settings

    recipe = parse_recipe(recipe_dict(llama, "dare_linear", {"weight": {"search": [0, 1]}, "seed": {"search": [0, 9], "step": 3}}))
    settings = search_settings(recipe, RunOptions(n_trials=7, study_name="s"))
    assert settings.keys == ["weight", "seed"] and settings.n_trials == 7 and settings.study_name == "s"
    assert settings.dimensions[0].distribution() == FloatDistribution(0.0, 1.0)
    assert settings.dimensions[1].distribution() == IntDistribution(0, 9, step=3)
    assert with_search_values(recipe, {"weight": 0.5, "seed": 3}).parameters["seed"] == 3


@pytest.mark.parametrize("method, parameters, extra, message", [
    ("task_arithmetic", {"lambda": {"search": [1.5, 0.5]}}, {}, r"parameters\.lambda\.search: the range \[1\.5, 0\.5\] is empty"),
    ("task_arithmetic", {"lambda": {"search": [0.5, 11]}}, {}, r"parameters\.lambda\.search\[1\]: got 11; 'lambda' must be a number in \[0\.0, 10\.0\]"),
    ("ties", {"density": {"search": [0, 0.9]}}, {}, r"parameters\.density\.search\[0\]: got 0; 'density' must be a number in \(0\.0, 1\.0\]"),
    ("ties", {"density": {"search": [0.1, 0.9], "scale": "log"}}, {}, r"parameters\.density\.scale: unknown key"),
    ("task_arithmetic", {"weight": {"search": [0, 1], "log": True}}, {}, r"parameters\.weight\.log: a log scale needs low > 0, got low = 0"),
    ("task_arithmetic", {"weight": {"search": [0.1, 1], "log": True, "step": 0.1}}, {}, r"parameters\.weight\.step: a step cannot be combined with log"),
    ("task_arithmetic", {"weight": {"search": [0.1, 1], "step": -1}}, {}, r"parameters\.weight\.step: got -1; expected a positive number"),
    ("task_arithmetic", {"lambda": {"search": 0.5}}, {}, r"parameters\.lambda\.search: got 0\.5; expected \[low, high\], two numbers"),
    ("ties", {"normalize": {"search": [0, 1]}}, {}, r"parameters\.normalize\.search: 'normalize' is true or false; only a number can be searched"),
    ("dare_linear", {"seed": {"search": [0.5, 3]}}, {}, r"parameters\.seed\.search: got \[0\.5, 3\]; expected \[low, high\], two integers"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"tasks": None}, r"tasks: missing; parameters\.lambda is searched"),
    ("task_arithmetic", {"lambda": 1.0}, {"search": {"n_trials": 4}}, r"search: no parameter is searched"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"search": {"n_trials": 3, "n_startup_trials": 5}},
     r"search\.n_startup_trials: 5 random start trials exceed n_trials = 3"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"search": {"n_trials": 0}}, r"search\.n_trials: got 0; expected an integer >= 1"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"search": {"trials": 3}}, r"search\.trials: unknown key; did you mean 'n_trials'"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"search": {"enqueue": [{"lamda": 0.5}]}}, r"search\.enqueue\[0\]\.lamda: unknown key; did you mean 'lambda'"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}}, {"search": {"enqueue": [{"lambda": 2}]}},
     r"search\.enqueue\[0\]\.lambda: got 2; expected a number in \[0\.0, 1\.0\]"),
    ("task_arithmetic", {"lambda": {"search": [0, 1]}, "weight": {"search": [0, 1]}}, {"search": {"enqueue": [{"lambda": 0.5}]}},
     r"search\.enqueue\[0\]\.weight: missing; an enqueued point gives every searched parameter a value"),
    ("dfmerge", {"fisher": False, "low": {"search": [0, 1]}}, {}, r"parameters\.low: merge_method 'dfmerge' searches its coefficients λ itself"),
    ("dfmerge", {"fisher": False}, {"search": {"n_trials": 4}}, r"search: merge_method 'dfmerge' takes its search settings under parameters"),
    ("fisher", {"fisher_examples": {"search": [4, 8]}}, {"models": "one"},
     r"parameters\.fisher_examples: the Fishers of merge_method 'fisher' are computed once, before the search"),
])
def test_bad_ranges_and_search_settings_name_the_key(llama, method, parameters, extra, message):
    if extra.get("models") == "one":
        extra = {**extra, "models": [{"model": str(llama["models"][0])}]}
    data = recipe_dict(llama, method, parameters, **extra)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data)


def test_a_gradient_point_may_be_searched(llama):
    data = recipe_dict(llama, "slerp", {"t": [0.0, {"search": [0.2, 0.8]}, 1.0]}, models=[{"model": str(llama["models"][0])}])
    recipe = parse_recipe(data)
    assert [(r.name, r.low, r.high) for r in recipe.search_space] == [("t[1]", 0.2, 0.8)]
    fixed = with_search_values(recipe, {"t[1]": 0.6})
    assert fixed.tensor_param("t", "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.6)
    assert fixed.raw["parameters"]["t"] == [0.0, 0.6, 1.0]


def test_a_gradient_of_searched_points_only_is_a_gradient_not_a_filter_list(llama):
    """``[{search: ...}, {search: ...}]`` is a list of dicts like a filter list; every entry being a
    range makes it a gradient whose points are all searched, per model as globally."""
    model = {"model": str(llama["models"][0]), "parameters": {"weight": [{"search": [0.0, 1.0]}, {"search": [0.0, 0.5]}]}}
    data = recipe_dict(llama, "task_arithmetic", {}, models=[model, {"model": str(llama["models"][1])}])
    recipe = parse_recipe(data)
    assert [(r.name, r.low, r.high) for r in recipe.search_space] == [("models[0].weight[0]", 0.0, 1.0), ("models[0].weight[1]", 0.0, 0.5)]
    fixed = with_search_values(recipe, {"models[0].weight[0]": 0.2, "models[0].weight[1]": 0.4})
    assert fixed.raw["models"][0]["parameters"]["weight"] == [0.2, 0.4]
    # A filter entry beside a range is neither a gradient nor a filter list.
    model["parameters"]["weight"] = [{"search": [0.0, 1.0]}, {"filter": "mlp", "value": 0.5}]
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight"):
        parse_recipe(recipe_dict(llama, "task_arithmetic", {}, models=[model, {"model": str(llama["models"][1])}]))


def test_a_slice_parameter_may_be_searched(llama):
    sources = [{"model": str(llama["base"]), "layer_range": [0, 2]}, {"model": str(llama["models"][0]), "layer_range": [0, 2]}]
    data = recipe_dict(llama, "slerp", {}, slices=[{"sources": sources, "parameters": {"t": {"search": [0.2, 0.8]}}}])
    del data["models"]
    recipe = parse_recipe(data)
    assert [(r.name, r.path) for r in recipe.search_space] == [("slices[0].t", "slices[0].parameters.t")]
    fixed = with_search_values(recipe, {"slices[0].t": 0.3})
    assert fixed.tensor_param("t", "model.layers.0.mlp.up_proj.weight", 0.0, fixed.slices[0]) == pytest.approx(0.3)
    assert fixed.raw["slices"][0]["parameters"]["t"] == 0.3


# -- end to end ------------------------------------------------------------------------------------


def direct_merge(recipe_path: Path, output: Path) -> dict[str, torch.Tensor]:
    hfmerge.merge(recipe_path, output=output, progress=False, evaluate=False)
    return load_file(output / "model.safetensors")


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("method, parameters", [
    ("task_arithmetic", {"lambda": {"search": [0.2, 2.0]}}),
    ("dare_linear", {"density": {"search": [0.3, 0.9]}, "weight": 1.0, "seed": 7}),  # random masks: seeded alike in every trial
])
def test_a_searched_global_parameter_merges_the_best_trial_exactly(llama, tmp_path, method, parameters):
    name = next(k for k, v in parameters.items() if isinstance(v, dict))
    path = write(tmp_path / "r.yaml", recipe_dict(llama, method, parameters, search={"n_trials": 3, "n_startup_trials": 2, "seed": 1}))
    out = tmp_path / "out"
    result = hfmerge.merge(path, output=out, progress=False)
    search = result.search
    assert len(search.trials) == 3 and search.named and search.keys == [name]
    best = search.best[name]
    assert best == max(search.trials, key=lambda t: t["score"])["params"][0]
    # The output is the best trial's candidate: its evaluation reproduces that trial's score.
    assert result.evaluation.search_score == pytest.approx(search.best_value, abs=1e-12)
    # The echoed recipe is an ordinary recipe with the best value; merged again, it gives the same bits.
    echoed = yaml.safe_load((out / "hfmerge_recipe.yaml").read_text())
    assert echoed["parameters"][name] == best and "search" not in echoed
    assert_same_tensors(load_file(out / "model.safetensors"), direct_merge(write(tmp_path / "fixed.yaml", echoed), tmp_path / "direct"))
    # The search's record: trial log, study, plot, summary and the card's section.
    log = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [(r["state"], r["names"]) for r in log] == [("COMPLETE", [name])] * 3
    assert {"merge_s", "eval_s"} <= set(log[0]["timings"])
    summary = json.loads((out / "hfmerge_search.json").read_text())
    assert summary["best"] == {name: best} and summary["space"][0]["path"] == f"parameters.{name}"
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG" and (out / "study.journal").is_file()
    card = ModelCard.load(out / "README.md").text
    low, high = parameters[name]["search"]
    assert "## Search" in card and f"| `{name}` | `parameters.{name}` | [{low}, {high}] | {best:.6g} |" in card
    assert "search:" in card.split("The recipe as searched:")[1]  # the searched recipe, ranges and all
    assert not (tmp_path / ".out.hfmerge-search").exists()  # the study moved into the output


def test_searched_weights_per_model_in_a_shared_study(llama, tmp_path):
    import optuna

    models = [{"model": str(m), "parameters": {"weight": {"search": [0.0, 1.0]}}} for m in llama["models"]]
    # linear averages the unlisted base_model too, with the global weight, as mergekit does.
    data = recipe_dict(llama, "linear", {"weight": 1.0}, models, search={"n_trials": 3, "n_startup_trials": 2, "enqueue": [{"models[0].weight": 0.5, "models[1].weight": 0.5}]})
    path = write(tmp_path / "r.yaml", data)
    storage = str(tmp_path / "shared.journal")
    result = hfmerge.merge(path, output=tmp_path / "out", storage=storage, study_name="lin", progress=False)
    search = result.search
    assert search.keys == ["models[0].weight", "models[1].weight"] and search.trials[0]["params"] == [0.5, 0.5]
    study = optuna.load_study(study_name="lin", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage)))
    assert set(study.best_params) == {"models[0].weight", "models[1].weight"}
    assert study.user_attrs["hfmerge_final"]["state"] == "done"
    echoed = yaml.safe_load((tmp_path / "out" / "hfmerge_recipe.yaml").read_text())
    assert [m["parameters"]["weight"] for m in echoed["models"]] == search.best_params
    assert_same_tensors(load_file(tmp_path / "out" / "model.safetensors"), direct_merge(write(tmp_path / "fixed.yaml", echoed), tmp_path / "direct"))
    # A worker started once the study is complete and merged has nothing to do.
    late = hfmerge.merge(path, output=tmp_path / "other", storage=storage, study_name="lin", progress=False)
    assert isinstance(late, hfmerge.dfmerge.WorkerResult) and "nothing to do" in late.message and not (tmp_path / "other").exists()


def test_resume_keeps_the_completed_trials(llama, tmp_path, capsys):  # and the command line runs it
    path = write(tmp_path / "r.yaml", recipe_dict(llama, "task_arithmetic", {"lambda": {"search": [0.2, 2.0]}},
                                                  search={"n_trials": 2, "n_startup_trials": 2, "seed": 4}))
    out = tmp_path / "out"
    first = hfmerge.search(path, output=out, progress=False)  # the search only: the study stays beside the output
    assert len(first.trials) == 2 and not out.exists()
    with pytest.raises(SearchError, match="a previous search .* exists"):
        hfmerge.merge(path, output=out, n_trials=4, progress=False)
    data = yaml.safe_load(path.read_text())
    data["parameters"]["lambda"]["search"] = [0.2, 3.0]
    with pytest.raises(SearchError, match=r"made for the search space lambda in \[0\.2, 2\.0\]; this recipe searches lambda in \[0\.2, 3\.0\]"):
        hfmerge.merge(write(tmp_path / "wider.yaml", data), output=out, n_trials=4, resume=True, progress=False)
    capsys.readouterr()
    assert main([str(path), "-o", str(out), "--n-trials", "4", "--resume"]) == 0
    assert re.search(r"Best of 4 trials: trial \d, validation score [\d.]+, lambda = [\d.]+", capsys.readouterr().out)
    trials = json.loads((out / "hfmerge_search.json").read_text())["trials"]
    assert len(trials) == 4
    assert [(t["number"], t["params"]) for t in trials[:2]] == [(t["number"], t["params"]) for t in first.trials]


def test_the_dry_run_shows_the_search_space_and_trials(llama, tmp_path, capsys):
    models = [{"model": str(llama["models"][0]), "parameters": {"weight": {"search": [0.1, 1.0], "log": True}}}, {"model": str(llama["models"][1])}]
    path = write(tmp_path / "r.yaml", recipe_dict(llama, "ties", {"density": {"search": [0.2, 0.8], "step": 0.1}}, models,
                                                  search={"n_trials": 12, "n_startup_trials": 4, "seed": 2}))
    assert hfmerge.plan(path, random_seed=5).recipe.search.seed == 5  # --random-seed seeds the search too
    summary = hfmerge.plan_summary(hfmerge.plan(path), RunOptions(n_trials=20))
    assert summary["search"]["n_trials"] == 20 and summary["search"]["n_startup_trials"] == 4
    assert [(d["name"], d["low"], d["high"], d["log"], d["step"]) for d in summary["search"]["space"]] == [
        ("density", 0.2, 0.8, False, 0.1), ("models[0].weight", 0.1, 1.0, True, None)]
    assert summary["parameters"]["density"] == {"search": [0.2, 0.8], "step": 0.1}
    assert main([str(path), "--dry-run", "--n-trials", "9"]) == 0
    printed = capsys.readouterr().out
    assert "search:      2 parameter(s), 9 trials (4 random start), seed 2" in printed
    assert "density: [0.2, 0.8] (step 0.1, float)  <- parameters.density" in printed
    assert "models[0].weight: [0.1, 1.0] (log, float)  <- models[0].parameters.weight" in printed


@pytest.mark.parametrize("family", ["llama", "t5"])  # t5: tied embeddings stored under several names
def test_later_trials_merge_into_the_loaded_candidate_exactly_as_a_written_one_loads(family, request, tmp_path):
    from hfmerge.evaluation.evaluate_model import load_model_for_eval, prepare_tasks
    from hfmerge.recipe_search import ParameterObjective

    models = request.getfixturevalue(family)
    path = write(tmp_path / "r.yaml", recipe_dict(models, "dare_ties", {"density": {"search": [0.2, 0.9]}, "weight": {"search": [0.5, 1.5]}}))
    plan = hfmerge.plan(path)
    objective = ParameterObjective(plan, prepare_tasks(plan.recipe.tasks), tmp_path / "scratch", RunOptions(device="cpu"))
    first = objective([0.5, 1.0])  # written, loaded, kept
    assert objective.model is not None and not any((tmp_path / "scratch").iterdir())
    objective([0.8, 0.7])
    again = objective([0.5, 1.0])  # merged into the kept model
    assert (again.score, again.task_scores) == (first.score, first.task_scores)
    objective.write([0.8, 0.7], tmp_path / "written")
    objective.merge_into_model([0.8, 0.7])
    loaded, _ = load_model_for_eval(tmp_path / "written", device="cpu")
    expected, got = loaded.state_dict(), objective.model.state_dict()
    assert set(expected) == set(got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
