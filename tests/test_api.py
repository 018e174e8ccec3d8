"""The Python API: `hfmerge.merge`, `plan`, `evaluate` return data, print nothing, and do what the
command does."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

import hfmerge
from hfmerge.cli import main
from hfmerge.testing import build_finetuned
from test_dfmerge import write as write_dfmerge
from test_evaluation import task, tiny_models  # noqa: F401  (fixture)
from test_fisher import experts  # noqa: F401  (fixture)
from test_merge import write_recipe


def ties_recipe(t5, tmp_path):
    return write_recipe(
        tmp_path / "r.yaml", merge_method="ties", base_model=t5.base,
        models=[{"model": t5.finetuned[0], "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": t5.finetuned[1], "parameters": {"weight": 0.4, "density": 0.5}}],
        parameters={"lambda": 1.0}, max_shard_size="8KB",
    )


def test_merge_returns_the_result_and_writes_what_the_cli_writes(t5, tmp_path, capsys):
    recipe = ties_recipe(t5, tmp_path)
    result = hfmerge.merge(recipe, hfmerge.RunOptions(output=tmp_path / "api" / "merged", progress=False))
    assert capsys.readouterr() == ("", "")  # a library prints nothing
    assert isinstance(result, hfmerge.MergeResult)
    assert result.output == tmp_path / "api" / "merged"
    assert result.files and all((result.output / f).is_file() for f in result.files)
    assert result.summary["method"] == "ties" and result.summary["output_shards"] > 1
    assert result.evaluation is None and result.search is None and result.pushed is None

    assert main([str(recipe), "-o", str(tmp_path / "cli" / "merged")]) == 0
    printed = capsys.readouterr().out
    assert "Plan for" in printed and "Merged model written to" in printed
    cli_files = sorted(p.name for p in (tmp_path / "cli" / "merged").iterdir())
    assert cli_files == result.files
    for name in result.files:
        assert (result.output / name).read_bytes() == (tmp_path / "cli" / "merged" / name).read_bytes(), name


def test_keyword_overrides_and_a_parsed_recipe_left_unchanged(t5, tmp_path):
    from hfmerge.recipe import load_recipe

    recipe = load_recipe(ties_recipe(t5, tmp_path))
    before = recipe.max_shard_size
    seen = []
    result = hfmerge.merge(recipe, output=tmp_path / "out", max_shard_size="1GB", progress=False,
                           on_plan=lambda summary: seen.append((summary, (tmp_path / "out").exists())))
    assert seen == [(result.summary, False)]  # the plan is shown before anything is written
    assert result.summary["output_shards"] == 1
    assert recipe.max_shard_size == before
    with pytest.raises(hfmerge.OutputExistsError) as info:
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert info.value.options == ("output", "overwrite") and "--" not in str(info.value)
    with pytest.raises(TypeError, match="unknown RunOptions field"):
        hfmerge.merge(recipe, outptu=tmp_path / "x")


def test_plan_is_the_dry_run(t5, tmp_path, capsys):
    recipe = ties_recipe(t5, tmp_path)
    plan = hfmerge.plan(recipe, output=tmp_path / "out")
    assert capsys.readouterr() == ("", "")
    assert isinstance(plan, hfmerge.MergePlan)
    assert not (tmp_path / "out").exists()
    summary = hfmerge.plan_summary(plan)
    assert summary["tensors"] == len(plan.tensors) and summary["output_bytes"] == plan.output_bytes
    assert main([str(recipe), "--dry-run"]) == 0
    assert f"Plan for {summary['recipe']}" in capsys.readouterr().out


def test_run_options_are_frozen_and_checked():
    options = hfmerge.RunOptions(output="merged", n_trials=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.output = "elsewhere"  # type: ignore[misc]
    assert dataclasses.replace(options, overwrite=True).overwrite
    with pytest.raises(hfmerge.OptionError) as info:
        hfmerge.RunOptions(n_trials=0)
    assert info.value.options == ("n_trials",) and str(info.value).startswith("n_trials: got 0")
    with pytest.raises(hfmerge.OptionError, match="device"):
        hfmerge.RunOptions(device="tpu")


def test_evaluate_scores_a_model_on_a_recipes_tasks(tiny_models, tmp_path, capsys):  # noqa: F811
    base = tiny_models["t5"]
    fts = [build_finetuned(base, tmp_path / f"ft{i}", seed=i, scale=0.05) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(p)} for p in fts],
                                      "parameters": {"lambda": 0.5}, "tasks": [task(tmp_path)]}))
    result = hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    report = hfmerge.evaluate(result.output, recipe, progress=False)
    assert capsys.readouterr().out == ""  # (transformers may show its own loading bar on stderr)
    assert isinstance(report, hfmerge.EvalReport)
    assert report.average == result.evaluation.average and 0.0 <= report.average <= 1.0
    with pytest.raises(hfmerge.OptionError) as info:
        hfmerge.evaluate(result.output, recipe, task_names=["nope"], progress=False)
    assert info.value.options == ("task_names",)
    assert not hfmerge.merge(recipe, output=tmp_path / "no-eval", evaluate=False, progress=False).evaluation


def test_import_hfmerge_is_light_and_the_api_names_survive_their_modules():
    code = ("import sys, hfmerge; assert 'torch' not in sys.modules, 'torch imported'; "
            "import hfmerge.merging, hfmerge.planning, hfmerge.searching; from hfmerge.merging import run_merge; "
            "assert callable(hfmerge.merge) and callable(hfmerge.plan) and hfmerge.merge.__module__ == 'hfmerge.api'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert set(hfmerge.__all__) <= set(dir(hfmerge))


def test_search_only_then_a_resumed_merge_reuses_its_trials(experts, tmp_path, capsys):  # noqa: F811
    recipe = write_dfmerge(tmp_path / "df.yaml", experts, {"n_trials": 3, "n_startup_trials": 2, "seed": 1, "fisher_examples": 4})
    options = hfmerge.RunOptions(output=tmp_path / "merged", progress=False, device="cpu", evaluate=False)
    found = hfmerge.search(recipe, options)
    assert capsys.readouterr().out == ""  # (Optuna may log a warning of its own on stderr)
    assert isinstance(found, hfmerge.SearchResult) and len(found.trials) == 3
    assert not (tmp_path / "merged").exists()
    result = hfmerge.merge(recipe, options, resume=True)
    assert result.search.trials == found.trials and result.search.best_params == found.best_params
    with pytest.raises(hfmerge.RecipeError, match="no coefficient search"):
        hfmerge.search(write_recipe(tmp_path / "avg.yaml", merge_method="linear", models=[{"model": m} for m in experts["models"]]))


def test_a_merge_that_fails_after_planning_releases_the_plan(t5, tmp_path, monkeypatch):
    """Whatever fails once the plan is built (here the caller's own callback), the plan's
    downloads and scratch folder are released and no output appears."""
    released = []
    real_release = hfmerge.MergePlan.release
    monkeypatch.setattr(hfmerge.MergePlan, "release", lambda self: (released.append(self), real_release(self)))

    def refuse(summary: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hfmerge.merge(ties_recipe(t5, tmp_path), output=tmp_path / "out", progress=False, on_plan=refuse)
    assert len(released) >= 1 and not (tmp_path / "out").exists()


def test_cuda_without_a_gpu_is_refused_before_planning_for_static_merges_too(t5, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(hfmerge.OptionError, match="no CUDA device") as info:
        hfmerge.merge(ties_recipe(t5, tmp_path), output=tmp_path / "out", device="cuda", progress=False)
    assert info.value.options == ("device",) and not (tmp_path / "out").exists()
