"""``slices:`` recipes (mergekit's layer stacking and slice-wise merges) end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import hfmerge
from hfmerge.errors import IncompatibleCheckpointsError, RecipeError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import build_base, load_base_state


def _recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data, default=str))))
    return path


def _merge(tmp_path: Path, data: dict) -> tuple[Path, hfmerge.MergeResult]:
    out = tmp_path / "out"
    result = hfmerge.merge(_recipe(tmp_path / "r.yaml", data), hfmerge.RunOptions(output=out, progress=False))
    return out, result


def _layer(name: str, index: int) -> str:
    """`name` (a tensor of layer 0, e.g. ``model.layers.0.mlp``) moved to layer `index`."""
    head, _, tail = name.partition(".0.")
    return f"{head}.{index}.{tail}"


def test_gpt2_stack_of_two_slices_gives_a_loadable_four_layer_model(families, tmp_path):
    gpt2 = families["gpt2"]
    source = gpt2.finetuned[0]
    out, _ = _merge(tmp_path, {"merge_method": "passthrough", "dtype": "float32",
                               "slices": [{"sources": [{"model": source, "layer_range": [0, 2]}]},
                                          {"sources": [{"model": source, "layer_range": [0, 2]}]}]})
    src, got = load_base_state(source), load_base_state(out)
    assert json.loads((out / "config.json").read_text())["n_layer"] == 4
    layers = {n.split(".")[2] for n in got if n.startswith("transformer.h.")}
    assert layers == {"0", "1", "2", "3"}
    for name, value in src.items():
        if name.startswith("transformer.h."):
            index = int(name.split(".")[2])
            for out_index in (index, index + 2):  # layer i is output layers i and i + 2
                renamed = f"transformer.h.{out_index}." + name.split(".", 3)[3]
                assert torch.equal(got[renamed], value), renamed
        else:
            assert torch.equal(got[name], value), name  # wte, wpe, ln_f
    assert len(got) == len(src) + 24  # 12 tensors per gpt2 layer, two layers more

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.n_layer == 4 and len(model.transformer.h) == 4
    torch.testing.assert_close(model.transformer.h[3].attn.c_attn.weight, src["transformer.h.1.attn.c_attn.weight"])
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and bool(torch.isfinite(logits).all())


def test_llama_frankenmerge_takes_embeddings_from_the_first_slice_and_the_head_from_the_last(families, tmp_path):
    llama = families["llama"]
    a, b = llama.finetuned[0], llama.finetuned[1]
    out, _ = _merge(tmp_path, {"merge_method": "passthrough",
                               "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]},
                                          {"sources": [{"model": b, "layer_range": [1, 2]}]}]})
    sa, sb, got = load_base_state(a), load_base_state(b), load_base_state(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], sb["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])
    for name in (n for n in sa if n.startswith("model.layers.0.")):
        assert torch.equal(got[name], sa[name])
        assert torch.equal(got[_layer(name, 1)], sa[_layer(name, 1)])
        assert torch.equal(got[_layer(name, 2)], sb[_layer(name, 1)])  # b's layer 1 is output layer 2
    assert not any(n.startswith("model.layers.3.") for n in got)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3


def test_slicewise_linear_merge_with_per_source_weights_and_a_gradient_within_each_slice(tmp_path):
    base = build_base(tmp_path / "a", "llama", layers=3, seed=1)
    other = build_base(tmp_path / "b", "llama", layers=3, seed=2)
    data = {"merge_method": "linear", "dtype": "float32",
            "slices": [{"sources": [{"model": base, "layer_range": [0, 3], "parameters": {"weight": [1.0, 0.0]}},
                                    {"model": other, "layer_range": [0, 3], "parameters": {"weight": [0.0, 1.0]}}]},
                       {"sources": [{"model": base, "layer_range": [1, 2], "parameters": {"weight": 0.25}},
                                    {"model": other, "layer_range": [2, 3]}],
                        "parameters": {"weight": 0.75}}]}
    out, _ = _merge(tmp_path, data)
    sa, sb, got = load_base_state(base), load_base_state(other), load_base_state(out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    q = "model.layers.{}.self_attn.q_proj.weight"
    # slice 0: t = 0, 1/2, 1 over its three layers; weights [1 - t, t] (normalised)
    for i, t in enumerate((0.0, 0.5, 1.0)):
        torch.testing.assert_close(got[q.format(i)], (1 - t) * sa[q.format(i)] + t * sb[q.format(i)], rtol=1e-6, atol=1e-6)
    # slice 1 (one layer): a's layer 1 weighted 0.25, b's layer 2 with the slice's default 0.75
    torch.testing.assert_close(got[q.format(3)], 0.25 * sa[q.format(1)] + 0.75 * sb[q.format(2)], rtol=1e-6, atol=1e-6)
    # outside the layers t = 0: embeddings from slice 0 (weights 1, 0), head from slice 1 (0.25, 0.75)
    torch.testing.assert_close(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    torch.testing.assert_close(got["lm_head.weight"], 0.25 * sa["lm_head.weight"] + 0.75 * sb["lm_head.weight"], rtol=1e-6, atol=1e-6)


def test_slicewise_ties_reads_the_base_at_its_own_layer_range(families, tmp_path):
    llama = families["llama"]
    base, a, b = llama.base, llama.finetuned[0], llama.finetuned[1]
    data = {"merge_method": "ties", "base_model": base, "dtype": "float32", "parameters": {"lambda": 0.5},
            "slices": [{"sources": [{"model": base, "layer_range": [0, 2]},
                                    {"model": a, "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.5], "density": 1.0}},
                                    {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 1.0}}]},
                       {"sources": [{"model": base, "layer_range": [1, 2]},
                                    {"model": a, "layer_range": [0, 1], "parameters": {"density": 1.0}}]}]}
    out, _ = _merge(tmp_path, data)
    s0, sa, sb, got = (load_base_state(p) for p in (base, a, b, out))

    def ties(base_t, tensors, weights):
        deltas = torch.stack([x - base_t for x in tensors])
        w = torch.tensor(weights).view(-1, *([1] * base_t.dim()))
        sign = torch.where((w * deltas).sum(0) >= 0, 1.0, -1.0)
        keep = (torch.sign(deltas) == sign).float()
        return base_t + 0.5 * (w * deltas * keep).sum(0) / (w * keep).sum(0).clamp(min=1e-8) * (keep.sum(0) > 0)

    name = "model.layers.{}.mlp.up_proj.weight"
    # layer 1 of slice 0: t = 1, so a's gradient [1.0, 0.5] gives 0.5
    torch.testing.assert_close(got[name.format(1)], ties(s0[name.format(1)], [sa[name.format(1)], sb[name.format(1)]], [0.5, 0.5]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[name.format(0)], ties(s0[name.format(0)], [sa[name.format(0)], sb[name.format(0)]], [1.0, 0.5]),
                               rtol=1e-5, atol=1e-6)
    # slice 1: a's layer 0 against the base's layer 1, alone: θ = base_1 + λ (a_0 − base_1)
    torch.testing.assert_close(got[name.format(2)], s0[name.format(1)] + 0.5 * (sa[name.format(0)] - s0[name.format(1)]), rtol=1e-5, atol=1e-6)


def _slices_recipe(tmp_path: Path, family, **changes) -> Path:
    data = {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": family.finetuned[0], "layer_range": [0, 2]}]},
                       {"sources": [{"model": family.finetuned[1], "layer_range": [0, 1]}]}]}
    data.update(changes)
    return _recipe(tmp_path / "r.yaml", data)


@pytest.mark.parametrize("changes, pattern", [
    ({"models": [{"model": "./x"}]}, r"r.yaml: slices: give either models .* or slices .*, not both"),
    ({"slices": []}, r"slices: got \[\]; expected a non-empty list"),
    ({"slices": [{"sources": []}]}, r"slices\[0\].sources: got \[\]; expected a non-empty list"),
    ({"slices": [{"sources": [{"model": "A", "layer_range": [2, 2]}]}]}, r"slices\[0\].sources\[0\].layer_range: got \[2, 2\]; expected \[start, end\]"),
    ({"slices": [{"sources": [{"model": "A"}]}]}, r"slices\[0\].sources\[0\].layer_range: missing"),
    ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 1], "layers": 1}]}]}, r"slices\[0\].sources\[0\].layers: unknown key"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [0, 2]}, {"model": "B", "layer_range": [0, 1]}]}]},
     r"slices\[0\].sources\[1\].layer_range: has 1 layers but slices\[0\].sources\[0\] has 2; every source of a slice must give the same number"),
    ({"slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}, {"model": "B", "layer_range": [0, 1]}]}]},
     r"slices\[0\].sources: merge_method 'passthrough' copies one source per slice, got 2"),
    ({"merge_method": "ties", "base_model": "BASE", "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}]}]},
     r"slices\[0\].sources: base_model is not among them"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}], "parameters": {"normalize": False}}]},
     r"slices\[0\].parameters.normalize: 'normalize' applies to the whole merge"),
    ({"merge_method": "fisher", "slices": [{"sources": [{"model": "A", "layer_range": [0, 1]}]}]}, r"slices: merge_method 'fisher' .* cannot merge slices"),
])
def test_bad_slices_are_refused_naming_the_key_path(families, tmp_path, changes, pattern):
    llama = families["llama"]
    names = {"A": str(llama.finetuned[0]), "B": str(llama.finetuned[1]), "BASE": str(llama.base)}
    text = json.dumps(changes)
    for short, path in names.items():
        text = text.replace(f'"{short}"', json.dumps(path))
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(_slices_recipe(tmp_path, llama, **json.loads(text)))


def test_a_layer_range_past_the_last_layer_is_refused_in_the_plan_step(families, tmp_path):
    llama = families["llama"]
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": llama.finetuned[0], "layer_range": [0, 2]}]},
        {"sources": [{"model": llama.finetuned[1], "layer_range": [1, 3]}]}]}))
    with pytest.raises(RecipeError, match=r"r.yaml: slices\[1\].sources\[0\].layer_range: \[1, 3\] is out of range; .* has 2 layers"):
        build_plan(recipe)


def test_a_model_with_two_layer_stacks_is_refused(families, tmp_path):
    t5 = families["t5"]
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": t5.finetuned[0], "layer_range": [0, 1]}]}]}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"it has 2 layer stacks \(decoder.block, encoder.block\)"):
        build_plan(recipe)


def test_a_config_without_a_layer_count_is_refused(families, tmp_path):
    source = tmp_path / "src"
    build_base(source, "llama")
    config = json.loads((source / "config.json").read_text())
    del config["num_hidden_layers"]
    (source / "config.json").write_text(json.dumps(config))
    recipe = load_recipe(_recipe(tmp_path / "r.yaml", {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": source, "layer_range": [0, 1]}]}]}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"config.json has no layer count \(num_hidden_layers, n_layer, num_layers"):
        build_plan(recipe)


def test_the_plan_maps_each_output_layer_to_its_slice_sources(families, tmp_path):
    llama = families["llama"]
    a, b = llama.finetuned[0], llama.finetuned[1]
    plan = build_plan(load_recipe(_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "slices": [
        {"sources": [{"model": a, "layer_range": [1, 2]}, {"model": b, "layer_range": [0, 1]}]},
        {"sources": [{"model": b, "layer_range": [1, 2]}]}]})))
    by_name = {t.name: t for t in plan.tensors}
    first = by_name["model.layers.0.mlp.up_proj.weight"]
    assert first.sources == ("model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight")
    assert [plan.models[i].ref.path for i in first.inputs] == [a.resolve(), b.resolve()] and first.slice == 0 and first.depth == 1.0
    second = by_name["model.layers.1.mlp.up_proj.weight"]
    assert second.sources == ("model.layers.1.mlp.up_proj.weight",) and [plan.models[i].ref.path for i in second.inputs] == [b.resolve()]
    assert by_name["lm_head.weight"].slice == 1 and by_name["model.embed_tokens.weight"].slice == 0
    assert plan.config_overrides == ((("num_hidden_layers",), 2),)
    assert [t.name for t in plan.tensors][0] == "model.embed_tokens.weight"


def test_hub_sources_are_pinned_in_the_recipe_the_card_records(hub, families, tmp_path):
    from hfmerge.card import resolved_recipe

    llama = families["llama"]
    repos = {key: hub.unique_repo_id(f"llama-{key}") for key in ("base", "a")}
    for key, folder in (("base", llama.base), ("a", llama.finetuned[0])):
        hub.create_repo_direct(repos[key], {p.name: p for p in folder.iterdir() if p.is_file()})
    plan = build_plan(load_recipe(_recipe(tmp_path / "r.yaml", {"merge_method": "task_arithmetic", "base_model": repos["base"], "slices": [
        {"sources": [{"model": repos["base"], "layer_range": [0, 1]}, {"model": repos["a"], "layer_range": [1, 2]}]},
        {"sources": [{"model": repos["a"], "layer_range": [0, 2]}, {"model": repos["base"], "layer_range": [0, 2]}]}]})))
    raw = resolved_recipe(plan)
    pinned = {key: f"{repo}@{hub.head_sha(repo)}" for key, repo in repos.items()}
    assert raw["base_model"] == pinned["base"]
    assert [[s["model"] for s in sl["sources"]] for sl in raw["slices"]] == [[pinned["base"], pinned["a"]], [pinned["a"], pinned["base"]]]
    assert len(plan.models) == 1  # the base is no input of a task-vector method; a appears once


@pytest.fixture
def scaling_method():
    """A method with a tensor parameter (a gradient is allowed for it) for one test, then removed."""
    from hfmerge.methods import METHODS, Param, merge_method

    @merge_method("slices_test_scale", params=(Param("factor", 1.0, tensor=True),), needs_base=False, summary="test-only method")
    def scale(base, tensors, *, factor, **_):
        return tensors[0] * factor

    try:
        yield "slices_test_scale"
    finally:
        METHODS.pop("slices_test_scale")


def test_a_slices_tensor_parameter_wins_over_the_global_one_within_that_slice(families, tmp_path, scaling_method):
    a = families["llama"].finetuned[0]
    out, _ = _merge(tmp_path, {"merge_method": scaling_method, "dtype": "float32", "parameters": {"factor": 2.0}, "slices": [
        {"sources": [{"model": a, "layer_range": [0, 1]}]},
        {"sources": [{"model": a, "layer_range": [0, 2]}], "parameters": {"factor": [{"filter": "mlp", "value": [0.0, 1.0]}]}}]})
    sa, got = load_base_state(a), load_base_state(out)
    up, q = "model.layers.{}.mlp.up_proj.weight", "model.layers.{}.self_attn.q_proj.weight"
    torch.testing.assert_close(got[up.format(0)], 2.0 * sa[up.format(0)])  # slice 0: the global factor
    torch.testing.assert_close(got[up.format(1)], 0.0 * sa[up.format(0)])  # slice 1, t = 0: the gradient's start
    torch.testing.assert_close(got[up.format(2)], 1.0 * sa[up.format(1)])  # t = 1
    torch.testing.assert_close(got[q.format(2)], 2.0 * sa[q.format(1)])  # no filter matched: the global factor
    torch.testing.assert_close(got["lm_head.weight"], 2.0 * sa["lm_head.weight"])  # slice 1's filter does not match it


def test_per_layer_config_lists_follow_the_stacked_layers(tmp_path):
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32, use_sliding_window=True, sliding_window=8,
                                      layer_types=["full_attention", "sliding_attention"])
    torch.manual_seed(0)
    source = tmp_path / "qwen2"
    transformers.Qwen2ForCausalLM(config).save_pretrained(source)
    assert json.loads((source / "config.json").read_text())["layer_types"] == ["full_attention", "sliding_attention"]
    out, _ = _merge(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": source, "layer_range": [1, 2]}]}, {"sources": [{"model": source, "layer_range": [0, 2]}]}]})
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == written["layer_types"] and len(model.model.layers) == 3
    assert bool(torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all())
