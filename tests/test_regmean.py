"""RegMean: the closed form per linear weight, the Gram statistics of the engine's hooks, and
``regmean`` recipes run end to end on tiny T5 experts (Gram files computed, cached, reused)."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import FisherFileError, RecipeError
from hfmerge.evaluation.scoring import EncodedExample
from hfmerge.fisher.gram import gram_layers, gram_statistics
from hfmerge.fisher.loglik import model_kind, pair_batches
from hfmerge.methods import METHODS
from hfmerge.methods.regmean import regmean
from hfmerge.testing import load_base_state
from test_evaluation import random_examples
from test_fisher import bert_classifier, encoded, experts, one_torch_thread, tiny, write_recipe  # noqa: F401  (fixtures: experts; one_torch_thread, autouse)

warnings.filterwarnings("ignore", message=".*batching rule.*")


# ---------------------------------------------------------------------------------------------
# The per-tensor closed form
# ---------------------------------------------------------------------------------------------


def grams_of(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.t() @ x / x.shape[0] for x in inputs]


def closed_form(weights, grams, alpha):
    """(Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ in float64, with G̃ = α G + (1 − α) diag(G), transposed; input
    columns whose Gram diagonal is zero in every model (never reached) take the average."""
    shrunk = []
    for g in grams:
        g = g.double()
        shrunk.append(alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g)))
    total = sum(shrunk)
    rhs = sum(g @ w.double().t() for g, w in zip(shrunk, weights))
    live = torch.diagonal(total) != 0
    out = (sum(weights) / len(weights)).double()
    out[:, live] = (torch.linalg.inv(total[live][:, live]) @ rhs[live]).t()
    return out


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_regmean_is_the_closed_form_least_squares_merge(alpha):
    torch.manual_seed(0)
    weights = [torch.randn(5, 6) for _ in range(3)]
    grams = grams_of([torch.randn(20, 6) * torch.linspace(0.5, 2, 6) for _ in range(3)])
    merged = regmean(None, weights, importances=grams, alpha=alpha)
    assert merged.dtype == torch.float32 and merged.shape == (5, 6)
    torch.testing.assert_close(merged.double(), closed_form(weights, grams, alpha), rtol=1e-5, atol=1e-5)


def test_regmean_minimises_the_regression_objective():
    torch.manual_seed(1)
    weights = [torch.randn(4, 5, dtype=torch.float64) for _ in range(2)]
    inputs = [torch.randn(30, 5, dtype=torch.float64) for _ in range(2)]
    merged = regmean(None, [w.float() for w in weights], importances=[g.float() for g in grams_of(inputs)], alpha=1.0).double()
    w = merged.clone().requires_grad_(True)
    loss = sum(((x @ w.t() - x @ wi.t()) ** 2).sum() / x.shape[0] for x, wi in zip(inputs, weights))
    loss.backward()
    assert float(w.grad.abs().max()) < 1e-4
    # and any other weight does worse
    for other in (weights[0], weights[1], (weights[0] + weights[1]) / 2):
        assert sum(((x @ other.t() - x @ wi.t()) ** 2).sum() / x.shape[0] for x, wi in zip(inputs, weights)) > float(loss.detach())


def test_equal_grams_give_the_plain_average():
    torch.manual_seed(2)
    weights = [torch.randn(3, 4) for _ in range(3)]
    gram = grams_of([torch.randn(10, 4)])[0]
    for alpha in (1.0, 0.5, 0.0):
        torch.testing.assert_close(regmean(None, weights, importances=[gram, gram, gram], alpha=alpha), sum(weights) / 3, rtol=1e-5, atol=1e-6)


def test_a_dominant_gram_gives_that_models_weight():
    torch.manual_seed(3)
    weights = [torch.randn(3, 4) for _ in range(2)]
    small, big = grams_of([torch.randn(10, 4), torch.randn(10, 4)])
    merged = regmean(None, weights, importances=[small, big * 1e6], alpha=0.9)
    torch.testing.assert_close(merged, weights[1], rtol=1e-4, atol=1e-4)
    assert float((merged - weights[0]).abs().max()) > 0.1


def test_alpha_zero_is_a_diagonal_weighted_average_per_input_column():
    torch.manual_seed(4)
    weights = [torch.randn(3, 4) for _ in range(2)]
    grams = grams_of([torch.randn(10, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]), torch.randn(10, 4)])
    merged = regmean(None, weights, importances=grams, alpha=0.0)
    d = [torch.diagonal(g) for g in grams]  # column j of W_i weighs G_i[j, j]
    expected = (d[0] * weights[0] + d[1] * weights[1]) / (d[0] + d[1])
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)


def test_inputs_that_no_model_saw_take_the_average_and_leave_the_rest_alone():
    torch.manual_seed(5)
    weights = [torch.randn(3, 4) for _ in range(2)]
    inputs = [torch.randn(10, 4), torch.randn(10, 4)]
    for x in inputs:
        x[:, 2] = 0.0  # a dead input feature: its row and column of every Gram matrix are zero
    grams = grams_of(inputs)
    merged = regmean(None, weights, importances=grams, alpha=1.0)
    assert bool(torch.isfinite(merged).all())
    torch.testing.assert_close(merged[:, 2], (weights[0][:, 2] + weights[1][:, 2]) / 2)
    keep = [0, 1, 3]
    sub = closed_form([w[:, keep] for w in weights], [g[keep][:, keep] for g in grams], 1.0)
    torch.testing.assert_close(merged[:, keep].double(), sub, rtol=1e-5, atol=1e-5)


def test_a_negative_diagonal_is_refused():
    with pytest.raises(ValueError, match="Gram matrix of model 1 has a negative diagonal"):
        regmean(None, [torch.ones(2, 2), torch.ones(2, 2)], importances=[torch.eye(2), -torch.eye(2)], alpha=0.9)


def test_tensors_without_grams_are_averaged():
    torch.manual_seed(6)
    tensors = [torch.randn(7) for _ in range(3)]
    torch.testing.assert_close(regmean(None, tensors, importances=None, alpha=0.9), sum(tensors) / 3)
    method = METHODS["regmean"]
    assert method.needs_importance and method.importance == "gram" and not method.needs_base
    assert method.param("alpha").default == 0.9 and method.param("regmean_examples").default == 256


# ---------------------------------------------------------------------------------------------
# Gram statistics from the hooks
# ---------------------------------------------------------------------------------------------


def hand_grams(model, examples: list[EncodedExample], labels: list[int]) -> dict[str, torch.Tensor]:
    """Σ x xᵀ / T of every linear layer's inputs, one example at a time (no padding at all)."""
    layers = gram_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name, module in layers.items():
        def hook(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.t() @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    kind = model_kind(model)
    try:
        with torch.no_grad():
            for n, label in enumerate(labels):
                batch = pair_batches(model, examples, [(n, label, 1.0)], 1, torch.device("cpu"))[0]
                assert bool(batch.input_mask.all())  # one row: nothing is padded
                if kind == "encoder-decoder":
                    labels_ = batch.labels
                    start = torch.full_like(labels_[:, :1], model.config.decoder_start_token_id)
                    model(input_ids=batch.input_ids, decoder_input_ids=torch.cat([start, labels_[:, :-1]], 1), use_cache=False)
                elif kind == "classifier":
                    model(input_ids=batch.input_ids)
                else:
                    model(input_ids=batch.input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


@pytest.mark.parametrize("family", ["t5", "t5_v1_1", "llama"])
def test_gram_statistics_equal_per_example_sums_without_the_padding(family):
    model, tokenizer = tiny(family)
    examples, enc = encoded(model, tokenizer, n=9)
    labels = [e.label for e in examples]
    got = gram_statistics(model, enc, labels, batch_size=4)
    expected = hand_grams(model, enc, labels)
    assert set(got) == set(expected) == set(gram_layers(model))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # the batches really were padded: counting the padding would change the statistics
    lengths = {len(e.prompt_ids) for e in enc}
    assert len(lengths) > 1
    if family == "t5":  # the LM head is the input embedding (tied): not one linear map, no Gram matrix
        assert model.lm_head.weight is model.shared.weight
        assert "lm_head.weight" not in got and "shared.weight" not in got
    else:  # flan-T5's and Llama's own LM head is a linear layer like any other
        assert got["lm_head.weight"].shape == (16, 16)
        assert "model.embed_tokens.weight" not in got and "shared.weight" not in got
    if family == "t5_v1_1":
        assert {"encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"} <= set(got)
    assert got[next(n for n in got if n.endswith("wo.weight") or n.endswith("down_proj.weight"))].shape == (32, 32)


def test_gram_statistics_of_a_sequence_classifier_count_pooled_rows_once_per_example():
    from hfmerge.evaluation.tasks import Example
    from hfmerge.fisher.engine import encode_for_model
    from test_evaluation import make_tokenizer

    model = bert_classifier()
    examples = [Example(e.prompt, ("no", "yes"), n % 2) for n, e in enumerate(random_examples(7, seed=2))]
    enc = encode_for_model(model, make_tokenizer(append_eos=False), examples)
    got = gram_statistics(model, enc, [e.label for e in examples], batch_size=3)
    expected = hand_grams(model, enc, [e.label for e in examples])
    assert {"bert.pooler.dense.weight", "classifier.weight", "bert.encoder.layer.0.attention.self.query.weight"} <= set(got)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gram_statistics_tell_the_streams_apart_when_their_lengths_are_equal():
    model, tokenizer = tiny("t5_v1_1")
    # prompts and options of the same padded length: the decoder batch gets one more padding column
    enc = [EncodedExample((5, 6, 7, 1), ((8, 9, 10, 1),)), EncodedExample((5, 1), ((11, 1),)), EncodedExample((12, 13, 1), ((14, 15, 16, 1),))]
    got = gram_statistics(model, enc, [0, 0, 0])
    expected = hand_grams(model, enc, [0, 0, 0])
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# regmean recipes
# ---------------------------------------------------------------------------------------------


def test_regmean_recipe_computes_caches_and_merges_by_the_closed_form(experts, tmp_path):  # noqa: F811
    from safetensors import safe_open
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "regmean.yaml", "regmean", experts, {"regmean_examples": 12, "alpha": 0.8})
    plan = hfmerge.plan(recipe)  # the dry run computes nothing and says what the merge will compute
    assert hfmerge.plan_summary(plan)["fishers_to_compute"] == [str(m) for m in experts["models"]]
    plan.release()
    out = tmp_path / "merged"
    result = hfmerge.merge(recipe, output=out, progress=False)
    assert result.output == out and result.evaluation is not None
    # the merge computed and cached the Gram matrices; a second run finds them in the cache
    records = hfmerge.compute_fishers(recipe, device="cpu", progress=False)
    assert [r.source for r in records] == ["cache", "cache"] and [r.task for r in records] == ["has_w1", "has_w2"]
    grams = []
    for r in records:
        with safe_open(r.path, framework="pt") as f:
            meta = f.metadata()
            grams.append({k: f.get_tensor(k) for k in f.keys()})
        assert meta["kind"] == "gram" and meta["num_examples"] == "12" and meta["task"] == r.task
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in grams[0]
    assert grams[0]["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape == (64, 64)
    assert "shared.weight" not in grams[0] and "lm_head.weight" not in grams[0]  # tied: averaged
    merged = load_file(out / "model.safetensors")
    a, b = (load_base_state(m) for m in experts["models"])
    solved = 0
    for name, value in merged.items():
        if name in grams[0]:
            expected = closed_form([a[name], b[name]], [grams[0][name], grams[1][name]], 0.8).float()
            # float32 solves; a barely firing ReLU neuron leaves some systems ill-conditioned (cond ~1e6)
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-4 * float(expected.abs().max()), msg=name)
            assert float((value - (a[name] + b[name]) / 2).abs().max()) > 1e-4, name  # not the average
            solved += 1
        else:
            torch.testing.assert_close(value, (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-7, msg=name)
    assert solved == len(grams[0]) and solved > 20
    # the Gram files given in the recipe merge to the same weights
    given = tmp_path / "given.yaml"
    copies = []
    for i, r in enumerate(records):
        copies.append(shutil.copy(r.path, tmp_path / f"gram{i}.safetensors"))
    given.write_text(yaml.safe_dump({"merge_method": "regmean", "parameters": {"alpha": 0.8},
                                     "models": [{"model": str(m), "fisher": str(c)} for m, c in zip(experts["models"], copies)]}))
    again = load_file(hfmerge.merge(given, output=tmp_path / "again", progress=False).output / "model.safetensors")
    for name, value in merged.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)


def test_regmean_recipe_settings_are_checked(experts, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    from hfmerge.fisher.cache import check_fisher_file

    models = [str(m) for m in experts["models"]]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "models": [{"model": m} for m in models]}))
    with pytest.raises(RecipeError, match=r"models\[0\]\.fisher: missing; merge_method 'regmean' needs per-model Gram matrices"):
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    with pytest.raises(RecipeError, match=r"parameters\.alpha"):
        hfmerge.plan(write_recipe(tmp_path / "bad.yaml", "regmean", experts, {"alpha": 1.5}))
    # a Gram matrix of the wrong width, and one in only one of the files
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    wrong, partial, empty = tmp_path / "wrong.safetensors", tmp_path / "partial.safetensors", tmp_path / "empty.safetensors"
    save_file({q: torch.eye(5)}, wrong)
    save_file({q: torch.eye(32)}, partial)
    save_file({"unrelated": torch.eye(2)}, empty)
    for files, message in (((wrong, wrong), r"needs \[32, 32\]"), ((partial, empty), "has no Gram matrix for")):
        recipe.write_text(yaml.safe_dump({"merge_method": "regmean", "models": [{"model": m, "fisher": str(f)} for m, f in zip(models, files)]}))
        with pytest.raises(FisherFileError, match=message):
            hfmerge.plan(recipe)
    # the cache's check accepts negative off-diagonal entries of Gram matrices, never a negative diagonal
    meta = {"hfmerge_format": "hfmerge-fisher-1", "kind": "gram"}
    save_file({q: torch.tensor([[1.0, -0.5], [-0.5, 1.0]])}, tmp_path / "ok.safetensors", metadata=meta)
    save_file({q: torch.tensor([[-1.0, 0.0], [0.0, 1.0]])}, tmp_path / "bad.safetensors", metadata=meta)
    assert check_fisher_file(tmp_path / "ok.safetensors") is None
    assert "negative" in check_fisher_file(tmp_path / "bad.safetensors")


def test_regmean_examples_and_seed_key_the_cache(experts, tmp_path):  # noqa: F811
    from hfmerge.fisher.engine import settings_from_recipe
    from hfmerge.recipe import load_recipe

    settings = settings_from_recipe(load_recipe(write_recipe(tmp_path / "a.yaml", "regmean", experts, {"regmean_examples": 7, "regmean_seed": 3})))
    assert (settings.kind, settings.num_examples, settings.seed) == ("gram", 7, 3)
    assert settings_from_recipe(load_recipe(write_recipe(tmp_path / "b.yaml", "regmean", experts))).num_examples == 256


def test_gram_matrices_through_an_accelerate_device_map_with_disk_offload_equal_the_in_memory_ones(experts, tmp_path, monkeypatch):  # noqa: F811
    from safetensors.torch import load_file

    from hfmerge.cli import main

    recipe = write_recipe(tmp_path / "regmean.yaml", "regmean", experts, {"regmean_examples": 6})
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache-memory"))
    assert main(["fisher", str(recipe), "-q", "--device", "cpu", "--copy-to", str(tmp_path / "memory")]) == 0
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache-offload"))
    assert main(["fisher", str(recipe), "-q", "--device", "cpu", "--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "offload"),
                 "--copy-to", str(tmp_path / "offloaded")]) == 0
    for name in ("0-expert0.fisher.safetensors", "1-expert1.fisher.safetensors"):
        a, b = load_file(tmp_path / "memory" / name), load_file(tmp_path / "offloaded" / name)
        assert set(a) == set(b) and len(a) > 20
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6 * float(a[key].abs().max()))


def test_badly_scaled_inputs_still_solve_to_float32_accuracy():
    torch.manual_seed(7)
    weights = [torch.randn(6, 8) for _ in range(2)]
    scale = torch.tensor([1.0, 1e-3, 2.0, 1e-4, 1.0, 3.0, 1e-2, 1.0])  # a few inputs that barely fire
    grams = grams_of([torch.randn(40, 8) * scale, torch.randn(40, 8) * scale])
    merged = regmean(None, weights, importances=grams, alpha=1.0)
    torch.testing.assert_close(merged.double(), closed_form(weights, grams, 1.0), rtol=1e-4, atol=1e-4)


def test_cache_list_names_gram_entries(tmp_path, monkeypatch, capsys):
    from hfmerge.cli import main
    from hfmerge.fisher import cache as fc

    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))
    for kind in ("gram", "diagonal"):
        meta = {"model": f"org/{kind}", "task": "sst2", "lambda": "", "kind": kind}
        key = fc.cache_key(meta)
        fc.save_fisher(fc.cached_path(key), {"w": torch.eye(3)}, {**meta, "cache_key": key})
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "org/gram on sst2 (RegMean Gram matrices)" in out and "org/diagonal on sst2\n" in out
