"""DF-Merge: equation (8), the search end to end on tiny trained experts, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hfmerge.cli import main
from hfmerge.errors import RecipeError
from hfmerge.methods.dfmerge import dfmerge_tensor
from hfmerge.recipe import load_recipe, parse_recipe
from test_fisher import experts, one_torch_thread, task_entries  # noqa: F401  (fixtures)
from test_methods import run as run_method


def test_equation_8_with_identical_fishers_is_general_task_arithmetic():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50, 7, generator=gen)
    tensors = [base + 0.1 * torch.randn(50, 7, generator=gen) for _ in range(3)]
    lambdas = [0.2, 0.7, 1.3]
    fisher = torch.rand(50, 7, generator=gen) + 0.5
    gta = base + sum(lam * (t - base) for lam, t in zip(lambdas, tensors))
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, [fisher] * 3), gta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, None), gta, rtol=1e-5, atol=1e-6)
    # Unequal Fishers: each entry follows the model that dominates it.
    big = [torch.full_like(base, 1e6), torch.full_like(base, 1e-3), torch.full_like(base, 1e-3)]
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, big), base + 3 * lambdas[0] * (tensors[0] - base), rtol=1e-4, atol=1e-5)
    # Where every F is zero the 1e-12 floor gives General Task Arithmetic.
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, [torch.zeros_like(base)] * 3), gta, rtol=1e-5, atol=1e-6)


def _two_models():
    base = torch.tensor([1.0, -1.0])
    tensors = [base + torch.tensor([1.0, 2.0]), base + torch.tensor([3.0, -1.0])]
    return base, tensors, [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])]


def test_equation_8_is_the_default_on_hand_computed_tensors():
    base, tensors, fishers = _two_models()
    # θ = θ_pre + 2 (F_1 0.5 τ_1 + F_2 1.0 τ_2) / (F_1 + F_2): 1 + 2 (0.5 + 9) / 4, −1 + 2 (3 − 1) / 4
    expected = torch.tensor([5.75, 0.0])
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [0.5, 1.0], fishers), expected)
    torch.testing.assert_close(run_method("dfmerge", base, tensors, weight=[0.5, 1.0], importances=fishers), expected)
    # A third model with λ = 0 still dilutes the others through its Fisher: 1 + 3 (0.5 + 9) / 104.
    third = [*tensors, base + 7.0], [0.5, 1.0, 0.0], [*fishers, torch.full((2,), 100.0)]
    out = run_method("dfmerge", base, third[0], weight=third[1], importances=third[2])
    torch.testing.assert_close(out[0], torch.tensor(1 + 3 * 9.5 / 104))


def test_capped_weighting_on_hand_computed_tensors():
    base, tensors, fishers = _two_models()
    # w_1 = min(2 F_1 / (F_1 + F_2), 1) = (0.5, 1), w_2 = (1, 0.5):
    # 1 + 0.5·0.5·1 + 1·3 = 4.25, −1 + 1·0.5·2 + 0.5·(−1) = −0.5
    expected = torch.tensor([4.25, -0.5])
    out = run_method("dfmerge", base, tensors, weight=[0.5, 1.0], importances=fishers, fisher_weighting="capped")
    torch.testing.assert_close(out, expected)
    # A model with λ = 0 brings no Fisher: the result is unchanged, whatever its Fisher (even None).
    out = dfmerge_tensor(base, [*tensors, base + 7.0], [0.5, 1.0, 0.0], [*fishers, torch.full((2,), 100.0)], "capped")
    torch.testing.assert_close(out, expected)
    # A dominant Fisher applies its task vector at λ τ, not at M λ τ as equation 8 does.
    gen = torch.Generator().manual_seed(1)
    t3 = [base + torch.randn(2, generator=gen) for _ in range(3)]
    big = [torch.full((2,), 1e6), torch.full((2,), 1e-3), torch.full((2,), 1e-3)]
    torch.testing.assert_close(dfmerge_tensor(base, t3, [0.4, 0.6, 0.8], big, "capped"), base + 0.4 * (t3[0] - base), rtol=1e-5, atol=1e-6)
    # Every λ = 0: the base.
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [0.0, 0.0], fishers, "capped"), base)


def test_kept_weighting_is_equation_8_without_the_switched_off_models():
    base, tensors, fishers = _two_models()
    two = dfmerge_tensor(base, tensors, [0.5, 1.0], fishers)  # equation 8 over the two models
    # All λ ≠ 0: kept is equation 8 exactly.
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [0.5, 1.0], fishers, "kept"), two)
    # A third model at λ = 0 with a large Fisher: equation 8 shrinks the others (its Fisher
    # stays in the denominator, M = 3); kept leaves it out (M′ = 2), whatever its Fisher.
    third = [*tensors, base + 7.0]
    paper = dfmerge_tensor(base, third, [0.5, 1.0, 0.0], [*fishers, torch.full((2,), 100.0)])
    kept = dfmerge_tensor(base, third, [0.5, 1.0, 0.0], [*fishers, torch.full((2,), 100.0)], "kept")
    torch.testing.assert_close(kept, two)
    assert float((paper - base).abs().max()) < float((kept - base).abs().max())
    # Unlike capped, a dominant Fisher still stretches its task vector up to M′ λ τ.
    big = [torch.full((2,), 1e6), torch.full((2,), 1e-3)]
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [0.5, 1.0], big, "kept"), base + 2 * 0.5 * (tensors[0] - base), rtol=1e-5, atol=1e-5)
    # Every λ = 0: the base.
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [0.0, 0.0], fishers, "kept"), base)


def test_capped_weighting_with_equal_fishers_is_task_arithmetic():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(40, 3, generator=gen)
    tensors = [base + 0.1 * torch.randn(40, 3, generator=gen) for _ in range(4)]
    lambdas = [0.2, 0.0, 0.9, 0.5]
    fisher = torch.rand(40, 3, generator=gen) + 0.1
    ta = base + sum(lam * (t - base) for lam, t in zip(lambdas, tensors))
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, [fisher] * 4, "capped"), ta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, None, "capped"), ta, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dfmerge_tensor(base, tensors, lambdas, [torch.zeros_like(base)] * 4, "capped"), ta, rtol=1e-5, atol=1e-6)


def test_fisher_temperature_flattens_the_fishers():
    base = torch.zeros(2)
    tensors = [torch.tensor([3.0, 3.0]), torch.zeros(2)]
    fishers = [torch.tensor([1.0, 4.0]), torch.tensor([4.0, 1.0])]
    # α = 1: 2 · 3 F_1 / (F_1 + F_2) = (1.2, 4.8); α = 0.5: √F = (1, 2), (2, 1) → (2, 4); α = 0: equal weights → 3.
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [1.0, 1.0], fishers), torch.tensor([1.2, 4.8]))
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [1.0, 1.0], fishers, temperature=0.5), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [1.0, 1.0], fishers, temperature=0.0), torch.tensor([3.0, 3.0]))
    # Capped with α = 0.5: w_1 = min(2 (1, 2) / 3, 1) = (2/3, 1) → (2, 3).
    torch.testing.assert_close(dfmerge_tensor(base, tensors, [1.0, 1.0], fishers, "capped", 0.5), torch.tensor([2.0, 3.0]))


def write(path: Path, experts, parameters: dict, **extra) -> Path:  # noqa: F811
    recipe = {"merge_method": "dfmerge", "base_model": str(experts["base"]), "models": [{"model": str(m)} for m in experts["models"]],
              "parameters": parameters, "tasks": task_entries(experts, 16), **extra}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_fixed_coefficients_without_fisher_equal_task_arithmetic(experts, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    recipe = {"merge_method": "dfmerge", "base_model": str(experts["base"]), "parameters": {"fisher": False}, "tasks": task_entries(experts, 8),
              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(experts["models"], (0.3, 0.8))]}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(recipe))
    ta = dict(recipe, merge_method="task_arithmetic", parameters={})
    ta.pop("tasks")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(ta))
    assert main([str(tmp_path / "d.yaml"), "-o", str(tmp_path / "d"), "-q", "--no-eval"]) == 0
    assert main([str(tmp_path / "t.yaml"), "-o", str(tmp_path / "t"), "-q"]) == 0
    a, b = load_file(tmp_path / "d" / "model.safetensors"), load_file(tmp_path / "t" / "model.safetensors")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_capped_weighting_end_to_end_with_one_model_switched_off_is_task_arithmetic(experts, tmp_path):  # noqa: F811
    import hfmerge
    from safetensors.torch import load_file

    # λ = (0, 0.7): the first model brings no Fisher, the second's weight is min(1 · F / F, 1) = 1.
    models = [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(experts["models"], (0.0, 0.7))]
    recipe = {"merge_method": "dfmerge", "base_model": str(experts["base"]), "models": models, "tasks": task_entries(experts, 8),
              "parameters": {"fisher_weighting": "capped", "fisher_examples": 4}}
    (tmp_path / "capped.yaml").write_text(yaml.safe_dump(recipe))
    hfmerge.merge(tmp_path / "capped.yaml", hfmerge.RunOptions(output=tmp_path / "capped", evaluate=False, progress=False))
    base, expert = load_file(experts["base"] / "model.safetensors"), load_file(experts["models"][1] / "model.safetensors")
    merged = load_file(tmp_path / "capped" / "model.safetensors")
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, base[name] + 0.7 * (expert[name] - base[name]), rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "capped" / "dfmerge_search.json").read_text())
    assert summary["fisher_weighting"] == "capped" and summary["fisher_temperature"] == 1.0
    # Equation 8 at the same λ: the λ = 0 model's Fisher still dilutes the second's weight.
    (tmp_path / "paper.yaml").write_text(yaml.safe_dump({**recipe, "parameters": {"fisher_examples": 4}}))
    hfmerge.merge(tmp_path / "paper.yaml", hfmerge.RunOptions(output=tmp_path / "paper", evaluate=False, progress=False))
    paper = load_file(tmp_path / "paper" / "model.safetensors")
    assert any(not torch.allclose(paper[n], merged[n], rtol=1e-5, atol=1e-6) for n in merged)


def test_search_end_to_end_records_a_score_that_a_fresh_evaluation_reproduces(experts, tmp_path, capsys):  # noqa: F811
    from hfmerge.evaluation.evaluate_model import evaluate_model

    recipe = write(tmp_path / "df.yaml", experts, {"n_trials": 6, "n_startup_trials": 3, "seed": 1, "fisher_examples": 8, "enqueue": [0.5, 0.5]})
    data = yaml.safe_load(recipe.read_text())
    for t in data["tasks"]:  # a test split: the output is scored on it too
        t["dataset_kwargs"]["data_files"]["test"] = t["dataset_kwargs"]["data_files"]["validation"]
        t["test_split"] = "test"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "merged"
    assert main([str(recipe), "-o", str(out), "-q"]) == 0
    summary = json.loads((out / "dfmerge_search.json").read_text())
    assert len(summary["trials"]) == 6 and summary["trials"][0]["params"] == [0.5, 0.5]
    best = max(summary["trials"], key=lambda t: t["score"])
    assert summary["best_validation_score"] == best["score"]
    assert list(summary["lambdas"].values()) == best["params"]
    fresh = evaluate_model(out, load_recipe(recipe).tasks, "validation", progress=False)
    assert fresh.average == pytest.approx(best["score"], abs=1e-12)
    test = json.loads((out / "eval_results_test.json").read_text())
    assert test["split"] == "test" and set(test["tasks"]) == {"has_w1", "has_w2"} and summary["test"]["average"] == test["average"]
    for name in ("search.png", "trials.jsonl", "study.journal", "eval_results.json", "hfmerge_recipe.yaml"):
        assert (out / name).is_file(), name
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert all({"fisher_s", "merge_s", "eval_s"} <= set(r["timings"]) for r in log if r["state"] == "COMPLETE")
    card = ModelCard.load(out / "README.md")
    assert "## Coefficients" in card.text and "](search.png)" in card.text and "dfmerge" in card.data.tags
    # The echoed recipe fixes the found λ: it reproduces the model without a search.
    echoed = yaml.safe_load((out / "hfmerge_recipe.yaml").read_text())
    assert [m["parameters"]["weight"] for m in echoed["models"]] == best["params"]
    assert not (tmp_path / ".merged.hfmerge-search").exists()  # the study moved into the output


# The CLI in a child process that is SIGKILLed in the middle of its 4th trial (number 3): the
# candidate is built, the trial is RUNNING in the study, three trials are COMPLETE. The child
# kills itself at that point, so where the kill lands does not depend on how fast the machine is.
KILLED_IN_TRIAL_3 = """
import os, signal, sys
from hfmerge import dfmerge
from hfmerge.cli import main

calls = []
score = dfmerge.DFMergeObjective.__call__

def dying(self, lambdas):
    calls.append(lambdas)
    if len(calls) == 4:
        self.build(lambdas)
        os.kill(os.getpid(), signal.SIGKILL)
    return score(self, lambdas)

dfmerge.DFMergeObjective.__call__ = dying
sys.exit(main(sys.argv[1:]))
"""


def test_resume_keeps_completed_trials_and_runs_no_seed_point_twice(experts, tmp_path):  # noqa: F811
    recipe = write(tmp_path / "df.yaml", experts, {"n_trials": 6, "n_startup_trials": 2, "seed": 3, "fisher_examples": 6, "enqueue": [0.4, 0.6]})
    out = tmp_path / "merged"
    workdir = tmp_path / ".merged.hfmerge-search"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.run([sys.executable, "-c", KILLED_IN_TRIAL_3, str(recipe), "-o", str(out), "-q"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    done_before = [json.loads(line) for line in (workdir / "trials.jsonl").read_text().splitlines()]
    assert [(r["number"], r["state"]) for r in done_before] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert not out.exists()
    # Without --resume the existing study is not silently reused.
    assert main([str(recipe), "-o", str(out), "-q"]) == 1
    assert main([str(recipe), "-o", str(out), "-q", "--resume"]) == 0
    summary = json.loads((out / "dfmerge_search.json").read_text())
    assert len(summary["trials"]) == 6
    # The completed trials are kept as they were, the enqueued point ran once, and the trial the
    # kill left RUNNING is marked FAIL (not counted, not left pending) before the search goes on.
    assert [{"number": t["number"], "params": t["params"]} for t in summary["trials"][:3]] == [
        {"number": r["number"], "params": r["params"]} for r in done_before]
    assert sum(t["params"] == [0.4, 0.6] for t in summary["trials"]) == 1
    log = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert log[:3] == done_before
    assert (log[3]["number"], log[3]["state"]) == (3, "FAIL") and "left RUNNING" in log[3]["error"]
    assert [(r["number"], r["state"]) for r in log[4:]] == [(n, "COMPLETE") for n in range(4, 7)]


@pytest.mark.parametrize("change, message", [
    ({"tasks": None}, r"tasks: missing; merge_method 'dfmerge' searches coefficients"),
    ({"tasks": "one"}, r"needs one task per fine-tuned model: 1 task\(s\) for 2 model\(s\)"),
    ({"parameters": {"low": 1.0, "high": 0.5}}, r"parameters.low: the search bounds are empty"),
    ({"parameters": {"enqueue": [0.5]}}, r"parameters.enqueue: point 0 has 1 value"),
    ({"models_fisher": True}, r"models\[0\].fisher: merge_method 'dfmerge' computes each model's Fisher"),
    ({"parameters": {"weight": 0.5}}, r"parameters.weight: merge_method 'dfmerge' searches every λ_i"),
    ({"model_weight": 0.5}, r"models\[1\].parameters.weight: missing; .* give a weight to every model or to none"),
    ({"parameters": {"n_trials": 3, "n_startup_trials": 5}}, r"parameters.n_startup_trials: 5 random start trials exceed n_trials = 3"),
    ({"parameters": {"fisher_weighting": "cap"}}, r"parameters.fisher_weighting: got 'cap'; expected one of 'paper', 'kept', 'capped'"),
    ({"parameters": {"fisher_temperature": -1}}, r"parameters.fisher_temperature: got -1; expected a number >= 0.0"),
])
def test_bad_dfmerge_recipes_fail_before_any_model_is_loaded(tmp_path, change, message):
    for name in ("a", "b", "base"):
        (tmp_path / name).mkdir()
    (tmp_path / "v.jsonl").write_text('{"text": "w1", "label": 1}\n')
    tasks = [{"task": t, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "v.jsonl"}}, "validation_split": "validation",
              "doc_to_text": "{{text}}", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"} for t in ("ta", "tb")]
    data = {"merge_method": "dfmerge", "base_model": "./base", "models": [{"model": "./a"}, {"model": "./b"}], "tasks": tasks}
    if "tasks" in change:
        data["tasks"] = None if change["tasks"] is None else tasks[:1]
    if "parameters" in change:
        data["parameters"] = change["parameters"]
    if "models_fisher" in change:
        data["models"][0]["fisher"] = "f.safetensors"
    if "model_weight" in change:
        data["models"][0]["parameters"] = {"weight": change["model_weight"]}
    with pytest.raises(RecipeError, match=message):
        parse_recipe(data, source="r.yaml", base_dir=tmp_path)


def test_device_maps_are_refused_for_a_search(experts, tmp_path, capsys):  # noqa: F811
    recipe = write(tmp_path / "df.yaml", experts, {"n_trials": 2, "n_startup_trials": 1})
    assert main([str(recipe), "-o", str(tmp_path / "out"), "-q", "--max-memory", "cpu=1GB"]) == 1
    assert "--max-memory / --offload-folder: a dfmerge search keeps its working model" in capsys.readouterr().err
    assert main([str(recipe), "-o", str(tmp_path / "out"), "-q", "--n-trials", "0"]) == 1
    assert "--n-trials: got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_to_hub_publishes_the_search_with_its_plot_in_one_commit(experts, hub, hf_token, tmp_path, capsys):  # noqa: F811
    recipe = write(tmp_path / "df.yaml", experts, {"n_trials": 3, "n_startup_trials": 2, "fisher_examples": 6})
    target = hub.unique_repo_id("dfmerged")
    assert main([str(recipe), "-o", str(tmp_path / "out"), "-q", "--push-to-hub", target]) == 0
    assert f"Pushed to {target}:" in capsys.readouterr().out
    assert len(hub.commit_history(target)) == 2  # the repo's initial commit, then one upload
    files = set(hub.list_files(target))
    assert {"search.png", "trials.jsonl", "study.journal", "dfmerge_search.json", "README.md", "model.safetensors"} <= files
    card = ModelCard.load(target)
    assert "](search.png)" in card.text and "## Coefficients" in card.text and hf_token not in card.text


def test_a_fisher_for_a_model_and_lambda_already_computed_is_reused(experts, tmp_path, monkeypatch):  # noqa: F811
    import hfmerge.dfmerge as dfm
    from hfmerge.evaluation.evaluate_model import prepare_tasks
    from hfmerge.fisher.models import load_tokenizer
    from hfmerge.planning import build_plan

    recipe = load_recipe(write(tmp_path / "df.yaml", experts, {"fisher_examples": 6}))
    plan = build_plan(recipe)
    tasks = prepare_tasks([recipe.tasks[m.task] for m in recipe.models], "validation")
    objective = dfm.DFMergeObjective(plan, tasks, load_tokenizer(plan.tokenizer_folder, "t"))
    computed = []
    real = dfm.diagonal_fisher
    monkeypatch.setattr(dfm, "diagonal_fisher", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = objective([1.0, 0.25])
    again = objective([1.0, 0.5])  # model 0 at λ = 1.0 again: its Fisher is reused
    assert len(computed) == 3
    repeat = objective([1.0, 0.25])  # both reused: the same candidate, the same score
    assert len(computed) == 3 and repeat.score == first.score and again.timings["fisher_s"] >= 0
