"""mergekit's ``BASE+ADAPTER`` references: a LoRA adapter applied to the model the reference names,
locally, on the Hub and mixed, in base_model and models[].model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import CheckpointError, IncompatibleCheckpointsError, ModelReferenceError, RecipeError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe, parse_recipe
from hfmerge.refs import parse_model_ref
from hfmerge.testing import load_base_state
from hfmerge.checkpoints.lora import AdapterConfig, check_adapter_base
from test_lora import SHA, _Base, apply, assert_reads, folder_files, lora_pair, write_adapter
from test_merge import write_recipe

Q = "model.layers.0.self_attn.q_proj"  # [16, 16]
UP = "model.layers.1.mlp.up_proj"  # [32, 16]


@pytest.fixture(scope="module")
def llama(families):
    return families["llama"]


def make_adapter(folder: Path, base: Path, module: str, seed: int, **config) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA adapter (r = 4, lora_alpha = 8: scale 2) of one module of the llama `base`."""
    shape = load_base_state(base)[module + ".weight"].shape
    tensors = lora_pair(module, *shape, 4, seed)
    return write_adapter(folder, tensors, **config), tensors


# -- syntax ----------------------------------------------------------------------------------


def test_base_plus_adapter_parses_each_side_as_a_reference(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "ad").mkdir()
    ref = parse_model_ref("org/base@v1 + org/lora-adapter@abc", field="models[0].model")
    assert ref.text == "org/base@v1+org/lora-adapter@abc"
    assert (ref.repo_id, ref.revision) == ("org/base", "v1") and ref.model.text == "org/base@v1" and ref.model.adapter is None
    assert (ref.adapter.repo_id, ref.adapter.revision) == ("org/lora-adapter", "abc")
    assert ref.parts == (ref.model, ref.adapter)
    local = parse_model_ref("base+./ad", base_dir=tmp_path)
    assert local.path == (tmp_path / "base").resolve() and local.adapter.path == (tmp_path / "ad").resolve()
    mixed = parse_model_ref("./base+org/lora", base_dir=tmp_path)
    assert mixed.is_local and not mixed.adapter.is_local
    plain = parse_model_ref("org/base")
    assert plain.adapter is None and plain.model is plain and plain.parts == (plain,)


def test_a_folder_whose_name_contains_plus_is_that_folder(tmp_path):
    (tmp_path / "c++model").mkdir()
    ref = parse_model_ref("c++model", base_dir=tmp_path)
    assert ref.adapter is None and ref.path == (tmp_path / "c++model").resolve()


@pytest.mark.parametrize(("text", "message"), [
    ("+org/lora", r"models\[0\].model: '\+org/lora' has no base model before the '\+'; expected BASE\+ADAPTER"),
    ("org/base+", r"models\[0\].model: 'org/base\+' has no adapter after the '\+'"),
    ("org/base + ", r"has no adapter after the '\+'"),
    ("org/a+org/b+org/c", r"models\[0\].model: 'org/a\+org/b\+org/c' has 2 '\+'; expected BASE\+ADAPTER, one model and one LoRA adapter"),
    ("org/base+not a repo", r"models\[0\].model \(the adapter after '\+'\): 'not a repo' is neither an existing folder nor a Hub repo id"),
    ("bad//base+org/lora", r"models\[0\].model \(the model before '\+'\): 'bad//base' is neither"),
    ("org/base@+org/lora", r"\(the model before '\+'\): 'org/base@' has an empty revision"),
])
def test_malformed_references_are_refused_naming_the_key(text, message):
    with pytest.raises(ModelReferenceError, match=message):
        parse_model_ref(text, field="models[0].model")
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": text}]})


def test_recipe_identity_tells_base_plus_adapter_from_either_side():
    recipe = parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base",
                           "models": [{"model": "org/base+org/lora"}, {"model": "org/lora"}, {"model": "org/base"}]})
    # the base itself is dropped from the task vectors; BASE+ADAPTER and the bare adapter are kept
    assert [m.ref.text for m in recipe.models] == ["org/base+org/lora", "org/lora"]
    with pytest.raises(RecipeError, match=r"models\[1\].model: 'org/base \+ org/lora' is the same model as models\[0\].model"):
        parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base",
                      "models": [{"model": "org/base+org/lora"}, {"model": "org/base + org/lora"}]})
    same_base = parse_recipe({"merge_method": "task_arithmetic", "base_model": "org/base+org/lora",
                              "models": [{"model": "org/base+org/lora"}, {"model": "org/other"}]})
    assert [m.ref.text for m in same_base.models] == ["org/other"]


@pytest.mark.parametrize(("key", "value", "path"), [
    ("tokenizer_source", "org/base+org/lora", "tokenizer_source"),
    ("config_source", "model:org/base+org/lora", "config_source"),
    ("tokenizer", {"source": "org/base+org/lora"}, "tokenizer.source"),
])
def test_tokenizer_and_config_sources_take_one_folder_or_repo(key, value, path):
    data = {"merge_method": "task_arithmetic", "base_model": "org/base", "models": [{"model": "org/a"}], key: value}
    with pytest.raises(RecipeError, match=rf"{path}: '.*org/base\+org/lora' applies an adapter to a model; .*name the model \(org/base\) or the adapter \(org/lora\) alone"):
        parse_recipe(data)


# -- the adapter's recorded base ---------------------------------------------------------------


@pytest.mark.parametrize(("adapter_base", "revision", "base", "error", "warning"), [
    # another Hub repo: an error for a bare adapter, a warning when the reference names the model
    ("meta-llama/Llama-3.1-8B", None, _Base("meta-llama/Llama-3.1-8B-Instruct", SHA),
     r"but base_model is meta-llama/Llama-3.1-8B-Instruct\. Set `base_model: meta-llama/Llama-3.1-8B`",
     r"but the model before '\+' is meta-llama/Llama-3.1-8B-Instruct; the reference names that model"),
    # the recorded revision is not the one read
    ("org/base", "v2", _Base("org/base", SHA), r"at revision 'v2', but base_model resolves to main .*Pin it",
     r"at revision 'v2', but the model before '\+' resolves to main \(0123.*\); the reference names that model"),
    # the same model: nothing to say either way
    ("org/base", None, _Base("org/base", SHA), None, None),
])
def test_a_recorded_base_that_differs_is_an_error_only_for_a_bare_adapter(adapter_base, revision, base, error, warning):
    config = AdapterConfig(r=4, lora_alpha=8, base_model=adapter_base, revision=revision)
    bare_error, bare_note = check_adapter_base(config, base)
    explicit_error, explicit_note = check_adapter_base(config, base, explicit=True)
    assert explicit_error is None
    if error is None:
        assert bare_error is None and bare_note is None and explicit_note is None
    else:
        assert bare_error is not None and re.search(error, bare_error), bare_error
        assert bare_note is None
        assert explicit_note is not None and re.search(warning, explicit_note), explicit_note


# -- local -----------------------------------------------------------------------------------


def test_base_plus_adapter_on_the_recipe_base_is_the_bare_adapter(llama, tmp_path):
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, Q, 1)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=llama.base,
                          models=[{"model": f"{llama.base}+{folder}"}, {"model": llama.finetuned[0]}])
    plan = build_plan(load_recipe(recipe))
    lora = plan.models[0]
    assert lora.format == "lora" and lora.explicit_base and lora.base is plan.base and not lora.owns_base  # the base is opened once
    assert_reads(lora, apply(load_base_state(llama.base), tensors, {Q: 2.0}))
    assert not plan.warnings
    bare = write_recipe(tmp_path / "bare.yaml", merge_method="task_arithmetic", base_model=llama.base,
                        models=[{"model": folder}, {"model": llama.finetuned[0]}])
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    assert hfmerge.merge(bare, output=tmp_path / "out-bare", progress=False).output == tmp_path / "out-bare"
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "out-bare" / "model.safetensors").read_bytes()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| {llama.base}+{folder} | `local+local` | LoRA adapter on its model (models[0]) |" in card


def test_an_adapter_applied_to_another_model_of_the_same_architecture(llama, tmp_path):
    # e.g. an adapter trained on the base applied to a fine-tune of it: W_ft + scale·B·A
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, UP, 2)
    ft = llama.finetuned[1]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=llama.base,
                          models=[{"model": f"{ft}+{folder}", "parameters": {"weight": 0.5}}, {"model": llama.finetuned[0]}])
    plan = build_plan(load_recipe(recipe))
    lora = plan.models[0]
    assert lora.owns_base and lora.base is not plan.base and lora.base.ref.path == ft.resolve()
    assert_reads(lora, apply(load_base_state(ft), tensors, {UP: 2.0}))
    # "ft1" is not "base", the adapter's base_model_name_or_path: local names can only be compared, a warning
    assert any("the adapter was trained on base" in w and "the model before '+'" in w for w in plan.warnings), plan.warnings
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    out = load_base_state(tmp_path / "out")
    base, ft0 = load_base_state(llama.base), load_base_state(llama.finetuned[0])
    adapted = apply(load_base_state(ft), tensors, {UP: 2.0})
    for name in (UP + ".weight", Q + ".weight"):
        expected = base[name] + 0.5 * (adapted[name].float() - base[name]) + (ft0[name] - base[name])
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)


def test_without_base_model_the_adapted_model_gives_config_and_tokenizer(llama, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama.base, base)
    (base / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    a, ta = make_adapter(tmp_path / "a", llama.base, Q, 3)
    b, tb = make_adapter(tmp_path / "b", llama.base, UP, 4)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="linear", models=[{"model": f"./base+./a"}, {"model": "base+b"}])
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    out, state = load_base_state(tmp_path / "out"), load_base_state(llama.base)
    left, right = apply(state, ta, {Q: 2.0}), apply(state, tb, {UP: 2.0})
    for name in (Q + ".weight", UP + ".weight", "model.norm.weight"):
        torch.testing.assert_close(out[name], (left[name].float() + right[name].float()) / 2, rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"model_max_length": 77}


def test_base_model_may_be_an_adapted_model(llama, tmp_path):
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, Q, 5)
    other, tensors2 = make_adapter(tmp_path / "ad2", llama.base, UP, 6)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=f"{llama.base}+{folder}",
                          models=[{"model": llama.finetuned[0]}, {"model": other}])
    plan = build_plan(load_recipe(recipe))
    adapted_base = apply(load_base_state(llama.base), tensors, {Q: 2.0})
    assert_reads(plan.base, adapted_base)
    # a bare adapter among the models goes on top of the adapted base (checked against its model)
    assert_reads(plan.models[1], apply(adapted_base, tensors2, {UP: 2.0}))
    assert not plan.warnings


def test_each_side_must_be_what_its_place_asks_for(llama, tmp_path):
    folder, _ = make_adapter(tmp_path / "ad", llama.base, Q, 1)
    cases = [
        (f"{llama.base}+{llama.finetuned[0]}", CheckpointError, r"the adapter after '\+': .*ft0 is not a PEFT LoRA adapter \(it has no adapter_config.json\)"),
        (f"{folder}+{folder}", CheckpointError, r"the model before '\+': .*ad is a PEFT LoRA adapter; BASE\+ADAPTER needs the full model"),
        (f"{llama.base}+{tmp_path / 'missing'}", CheckpointError, r"the adapter after '\+': folder .*missing not found"),
    ]
    for text, error, message in cases:
        recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=llama.base, models=[{"model": text}])
        with pytest.raises(error, match=message):
            build_plan(load_recipe(recipe))


def test_an_adapter_that_does_not_fit_its_model_is_still_an_error(llama, families, tmp_path):
    folder, _ = make_adapter(tmp_path / "ad", llama.base, Q, 1)
    t5 = families["t5"].base
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="linear", models=[{"model": f"{t5}+{folder}"}])
    with pytest.raises(IncompatibleCheckpointsError, match=r"models\[0\].model \(.*\): the adapter adapts module 'model.layers.0.self_attn.q_proj', "
                       r"but models\[0\].model \(.*\), the model before '\+' has no tensor"):
        build_plan(load_recipe(recipe))


# -- Hub and mixed ---------------------------------------------------------------------------


def test_hub_and_mixed_references_merge_pinned_like_local_ones(hub, llama, tmp_path):
    base_repo = hub.unique_repo_id("llama-base")
    hub.create_repo_direct(base_repo, folder_files(llama.base))
    ft_repo = hub.unique_repo_id("llama-ft")
    hub.create_repo_direct(ft_repo, folder_files(llama.finetuned[1]))
    a, _ = make_adapter(tmp_path / "a", llama.base, Q, 7, base_model_name_or_path=base_repo)
    b, _ = make_adapter(tmp_path / "b", llama.base, UP, 8, base_model_name_or_path=base_repo)
    a_repo = hub.unique_repo_id("lora-a")
    hub.create_repo_direct(a_repo, folder_files(a))
    models = [{"model": f"{ft_repo}+{a_repo}"}, {"model": f"{ft_repo}+{b}"}, {"model": f"{llama.finetuned[1]}+{a_repo}"}]
    recipe = write_recipe(tmp_path / "hub.yaml", merge_method="task_arithmetic", base_model=base_repo, models=models[:2])
    plan = build_plan(load_recipe(recipe))
    # an adapter named for base_repo applied to ft_repo: asked for explicitly, so a warning, not an error
    assert sum(f"the adapter was trained on {base_repo}" in w and f"the model before '+' is {ft_repo}" in w for w in plan.warnings) == 2
    assert plan.models[0].commit == hub.head_sha(a_repo) and plan.models[0].base.commit == hub.head_sha(ft_repo)
    assert hfmerge.merge(recipe, output=tmp_path / "out-hub", progress=False).output == tmp_path / "out-hub"
    card = (tmp_path / "out-hub" / "README.md").read_text()
    assert f"model: {ft_repo}@{hub.head_sha(ft_repo)}+{a_repo}@{hub.head_sha(a_repo)}" in card
    assert f"model: {ft_repo}@{hub.head_sha(ft_repo)}+{b}" in card
    meta = yaml.safe_load(card.split("---")[1])
    assert {base_repo, ft_repo, a_repo} <= set(meta["base_model"])

    local = write_recipe(tmp_path / "local.yaml", merge_method="task_arithmetic", base_model=llama.base,
                         models=[{"model": f"{llama.finetuned[1]}+{a}"}, {"model": f"{llama.finetuned[1]}+{b}"}])
    assert hfmerge.merge(local, output=tmp_path / "out-local", progress=False).output == tmp_path / "out-local"
    expected = (tmp_path / "out-local" / "model.safetensors").read_bytes()
    assert (tmp_path / "out-hub" / "model.safetensors").read_bytes() == expected
    mixed = write_recipe(tmp_path / "mixed.yaml", merge_method="task_arithmetic", base_model=llama.base, models=[models[2], models[1]])
    assert hfmerge.merge(mixed, output=tmp_path / "out-mixed", low_disk=True, progress=False).output == tmp_path / "out-mixed"
    assert (tmp_path / "out-mixed" / "model.safetensors").read_bytes() == expected


def test_bare_hub_adapter_on_another_base_stays_an_error_but_base_plus_adapter_is_a_warning(hub, llama, tmp_path):
    base_repo = hub.unique_repo_id("llama-base")
    hub.create_repo_direct(base_repo, folder_files(llama.base))
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, Q, 1, base_model_name_or_path="meta-llama/Llama-3.2-1B")
    repo = hub.unique_repo_id("lora")
    hub.create_repo_direct(repo, folder_files(folder))
    bare = write_recipe(tmp_path / "bare.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": repo}])
    with pytest.raises(IncompatibleCheckpointsError, match=rf"the adapter was trained on meta-llama/Llama-3.2-1B .*but base_model is {base_repo}\. Set `base_model"):
        build_plan(load_recipe(bare))
    explicit = write_recipe(tmp_path / "explicit.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": f"{base_repo}+{repo}"}])
    plan = build_plan(load_recipe(explicit))
    assert plan.models[0].base is plan.base
    assert any("the adapter was trained on meta-llama/Llama-3.2-1B" in w and "the reference names that model" in w for w in plan.warnings)
    assert_reads(plan.models[0], apply(load_base_state(llama.base), tensors, {Q: 2.0}))


def test_a_hub_repo_after_plus_must_be_an_adapter(hub, llama, tmp_path):
    base_repo = hub.unique_repo_id("llama-base")
    hub.create_repo_direct(base_repo, folder_files(llama.base))
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=llama.base,
                          models=[{"model": f"{llama.base}+{base_repo}"}])
    with pytest.raises(CheckpointError, match=rf"the adapter after '\+': {base_repo}@[0-9a-f]{{40}} is not a PEFT LoRA adapter"):
        build_plan(load_recipe(recipe))


def test_passthrough_of_base_plus_adapter_writes_the_adapted_model(llama, tmp_path):
    # mergekit's way to bake a LoRA into its base: passthrough of one BASE+ADAPTER model
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, UP, 9)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="passthrough", models=[{"model": f"{llama.base} + {folder}"}])
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    out, expected = load_base_state(tmp_path / "out"), apply(load_base_state(llama.base), tensors, {UP: 2.0})
    assert set(out) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value.float(), rtol=0, atol=0)
    assert not torch.equal(out[UP + ".weight"], load_base_state(llama.base)[UP + ".weight"])


def test_places_that_take_one_repo_refuse_base_plus_adapter(tmp_path):
    from hfmerge.api import check_repo_id
    from hfmerge.errors import EvaluationError
    from hfmerge.evaluation.evaluate_model import load_model_for_eval

    with pytest.raises(RecipeError, match=r"push_to_hub: got 'org/out\+org/lora'; expected a Hub repo id"):
        parse_recipe({"merge_method": "linear", "models": [{"model": "org/a"}], "push_to_hub": "org/out+org/lora"})
    with pytest.raises(RecipeError, match=r"repo_id: 'org/out\+org/lora' is not a Hub repo id"):
        check_repo_id("org/out+org/lora")
    with pytest.raises(EvaluationError, match=r"'org/base\+org/lora' applies a LoRA adapter to a model \(BASE\+ADAPTER\), which only a recipe reads"):
        load_model_for_eval("org/base+org/lora", device="cpu")


def test_a_bare_adapter_without_its_base_suggests_base_plus_adapter(llama, tmp_path):
    folder, _ = make_adapter(tmp_path / "ad", llama.base, Q, 1)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="linear", models=[{"model": folder}])
    with pytest.raises(CheckpointError, match=rf"or name that model in the reference: `base\+{folder.resolve()}`"):
        build_plan(load_recipe(recipe))


def test_slices_take_base_plus_adapter_sources(llama, tmp_path):
    # mergekit's layer stacking of an adapted model: its layer 1 (adapted up_proj) repeated
    folder, tensors = make_adapter(tmp_path / "ad", llama.base, UP, 10)
    source = f"{llama.base}+{folder}"
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="passthrough", dtype="float32",
                          slices=[{"sources": [{"model": source, "layer_range": [0, 2]}]},
                                  {"sources": [{"model": source, "layer_range": [1, 2]}]}])
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    out, adapted = load_base_state(tmp_path / "out"), apply(load_base_state(llama.base), tensors, {UP: 2.0})
    torch.testing.assert_close(out[UP + ".weight"], adapted[UP + ".weight"].float(), rtol=0, atol=0)
    torch.testing.assert_close(out["model.layers.2.mlp.up_proj.weight"], adapted[UP + ".weight"].float(), rtol=0, atol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


def test_a_union_vocabulary_reads_the_tokenizer_of_the_model_under_an_adapter(tmp_path):
    # the adapter folder holds no tokenizer: the union takes chatml's own, and its new tokens
    from test_tokenizer_merge import IM, check_tokenizer, make_tokenizer, run

    from hfmerge.testing import build_base

    models = {"base": make_tokenizer(build_base(tmp_path / "base", "llama", seed=0, vocab=64), 64, []),
              "chatml": make_tokenizer(build_base(tmp_path / "chatml", "llama", seed=1, vocab=66), 64, IM)}
    folder, tensors = make_adapter(tmp_path / "ad", models["chatml"], Q, 11, base_model_name_or_path="chatml")
    models["adapted"] = Path(f"{models['chatml']}+{folder}")
    out = run(tmp_path, models, ["base", "adapted"], tokenizer_source="union")
    vocab = check_tokenizer(out, 66, contains=IM)
    assert vocab["<|im_start|>"] == 64
    merged, base, adapted = load_base_state(out), load_base_state(models["base"]), apply(load_base_state(models["chatml"]), tensors, {Q: 2.0})
    torch.testing.assert_close(merged[Q + ".weight"], (base[Q + ".weight"] + adapted[Q + ".weight"].float()) / 2)
    torch.testing.assert_close(merged["model.embed_tokens.weight"][64:], adapted["model.embed_tokens.weight"][64:])
