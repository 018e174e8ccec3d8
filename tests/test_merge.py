"""The streaming merge end to end on tiny models of five architectures (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

import hfmerge
from hfmerge.cli import main
from hfmerge.merging import run_merge
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import FAMILIES, build_finetuned, load_base_state, write_checkpoint


def write_recipe(path: Path, **data) -> Path:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
    for m in data.get("models", []):
        m["model"] = str(m["model"])
        if "fisher" in m:
            m["fisher"] = str(m["fisher"])
    path.write_text(yaml.safe_dump(data))
    return path


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_base_state(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_arithmetic_output_loads_and_equals_the_formula(families, tmp_path, family):
    fam = families[family]
    recipe = write_recipe(
        tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=fam.base,
        models=[{"model": fam.finetuned[0], "parameters": {"weight": 0.7}}, {"model": fam.finetuned[1], "parameters": {"weight": 0.4}}],
        parameters={"lambda": 0.9}, max_shard_size="8KB",
    )
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    base, a, b = (load_base_state(p) for p in (fam.base, fam.finetuned[0], fam.finetuned[1]))
    got = merged_state(out)
    assert set(got) == set(base)  # the base checkpoint's key set
    for name, t in base.items():
        expected = t + 0.9 * (0.7 * (a[name] - t) + 0.4 * (b[name] - t))
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-6)
    # sharded with the standard index, and transformers loads it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModel.from_pretrained(out)
    sd = model.state_dict()
    for name in base:
        short = name if name in sd else name.split(".", 1)[1] if name.split(".", 1)[1] in sd else None
        if short is not None:
            torch.testing.assert_close(sd[short], got[name])
    assert (out / "config.json").is_file() and (out / "hfmerge_recipe.yaml").is_file()


def test_output_dtype_is_the_recipes_and_computation_is_float32(t5, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base,
                          models=[{"model": p} for p in t5.finetuned], dtype="bfloat16")
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    got = load_file(out / "model.safetensors")
    states = [load_base_state(p) for p in t5.finetuned]
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, (sum(s[name].float() for s in states) / 3).to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModel.from_pretrained(out).dtype == torch.bfloat16


def test_sharded_inputs_and_tied_aliases_stored_under_other_names(t5, tmp_path):
    """A fine-tune stored sharded, another holding encoder/decoder embed_tokens and lm_head copies
    of `shared`: each stored tensor of the base is merged once; the output keeps the base's keys."""
    sharded = build_finetuned(t5.base, tmp_path / "sharded", seed=5, sharded_max=4000)
    state = load_base_state(t5.finetuned[0])
    extra = dict(state)
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        extra[alias] = state["shared.weight"].clone()
    del extra["shared.weight"]  # only the aliases: must be found through the tie group
    aliased = write_checkpoint(tmp_path / "aliased", extra, t5.base / "config.json")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=t5.base,
                          models=[{"model": sharded}, {"model": aliased}], parameters={"lambda": 0.5})
    plan = build_plan(load_recipe(recipe))
    assert not plan.warnings
    shared = next(t for t in plan.tensors if t.name == "shared.weight")
    assert shared.sources[1] in ("decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight")
    out = run_merge(plan, tmp_path / "out", progress=False).output
    got = load_file(out / "model.safetensors")
    base = load_base_state(t5.base)
    assert set(got) == set(base) == {*base}  # only `shared.weight` for the embeddings
    s = load_base_state(sharded)
    expected = base["shared.weight"] + 0.5 * ((s["shared.weight"] - base["shared.weight"]) + (state["shared.weight"] - base["shared.weight"]))
    torch.testing.assert_close(got["shared.weight"], expected)


def test_untied_lm_head_of_t5_v1_1_is_merged_separately(families, tmp_path):
    fam = families["t5_v1_1"]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=fam.base, models=[{"model": p} for p in fam.finetuned])
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    got = load_file(out / "model.safetensors")
    states = [load_base_state(p) for p in fam.finetuned]
    assert not torch.equal(got["lm_head.weight"], got["shared.weight"])
    torch.testing.assert_close(got["lm_head.weight"], sum(s["lm_head.weight"] for s in states) / 3)


def test_ties_whole_model_trim_matches_a_flattened_reference(t5, tmp_path):
    density = 0.2
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="ties", base_model=t5.base,
                          models=[{"model": p, "parameters": {"density": density}} for p in t5.finetuned[:2]],
                          parameters={"trim": "model"})
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    base = load_base_state(t5.base)
    names = list(base)
    tvs = []
    for p in t5.finetuned[:2]:
        s = load_base_state(p)
        flat = torch.cat([(s[n] - base[n]).reshape(-1) for n in names])
        k = int(density * flat.numel())
        thr = flat.abs().kthvalue(flat.numel() - k + 1).values
        tvs.append(flat * (flat.abs() >= thr))
    stacked = torch.stack(tvs)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == sign
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    got = load_file(out / "model.safetensors")
    offset = 0
    for n in names:
        size = base[n].numel()
        torch.testing.assert_close(got[n], base[n] + merged[offset:offset + size].reshape(base[n].shape), rtol=1e-5, atol=1e-6)
        offset += size


def test_dare_merge_is_reproducible_and_tied_aliases_stay_identical(t5, tmp_path):
    # base storing `shared` and an identical `encoder.embed_tokens` copy: DARE must treat them alike.
    base_state = load_base_state(t5.base)
    base_state["encoder.embed_tokens.weight"] = base_state["shared.weight"].clone()
    base = write_checkpoint(tmp_path / "base", base_state, t5.base / "config.json")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="dare_ties", base_model=base,
                          models=[{"model": p, "parameters": {"density": 0.5}} for p in t5.finetuned[:2]], parameters={"seed": 3})
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert hfmerge.merge(recipe, output=out, progress=False).output == out
        outs.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in outs[0])
    assert torch.equal(outs[0]["shared.weight"], outs[0]["encoder.embed_tokens.weight"])


def test_fisher_merge_reads_fisher_files_with_checkpoint_names(t5, tmp_path):
    states = [load_base_state(p) for p in t5.finetuned[:2]]
    fishers = []
    for i, s in enumerate(states):
        f = {n: torch.full_like(t, 1.0 if i == 0 else 3.0) for n, t in s.items()}
        save_file(f, tmp_path / f"f{i}.safetensors")
        fishers.append(tmp_path / f"f{i}.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="fisher", base_model=t5.base,
                          models=[{"model": p, "fisher": f} for p, f in zip(t5.finetuned[:2], fishers)])
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    got = load_file(out / "model.safetensors")
    for n in got:
        torch.testing.assert_close(got[n], (states[0][n] * 1 + states[1][n] * 3) / 4)


def test_dry_run_prints_the_plan_and_writes_nothing(t5, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="ties", base_model=t5.base, models=[{"model": p} for p in t5.finetuned])
    out = tmp_path / "out"
    assert main([str(recipe), "--dry-run", "-o", str(out), "--json", str(tmp_path / "plan.json")]) == 0
    text = capsys.readouterr().out
    assert "tensors:     47 (47 merged, 0 copied)" in text and "peak memory" in text and "ties without density" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["tensors"] == 47 and plan["parameters_count"] == sum(t.numel() for t in load_base_state(t5.base).values())
    assert plan["output_bytes"] == 4 * plan["parameters_count"]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "r.yaml"]


def test_tokenizer_and_generation_config_come_from_the_chosen_sources(t5, tmp_path):
    tok_src = tmp_path / "tok"
    tok_src.mkdir()
    (tok_src / "tokenizer_config.json").write_text('{"model_max_length": 7}')
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base,
                          models=[{"model": p} for p in t5.finetuned[:2]], tokenizer_source=str(tok_src))
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"model_max_length": 7}
    assert (out / "generation_config.json").read_text() == (t5.base / "generation_config.json").read_text()


def test_non_float_tensors_are_copied_when_equal(t5, tmp_path):
    states = {"base": load_base_state(t5.base), "a": load_base_state(t5.finetuned[0])}
    folders = {}
    for k, s in states.items():
        s = dict(s)
        s["steps"] = torch.tensor([1, 2, 3], dtype=torch.int64)
        folders[k] = write_checkpoint(tmp_path / k, s, t5.base / "config.json")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=folders["base"], models=[{"model": folders["a"]}])
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    assert torch.equal(load_file(out / "model.safetensors")["steps"], torch.tensor([1, 2, 3]))


def test_gradient_weights_follow_layer_depth_in_a_merge(t5, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=t5.base,
                          models=[{"model": t5.finetuned[0], "parameters": {"weight": [0.0, 1.0]}}])
    out = tmp_path / "out"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    got, base, ft = load_file(out / "model.safetensors"), load_base_state(t5.base), load_base_state(t5.finetuned[0])
    for name, expected in [("shared.weight", base), ("encoder.block.0.layer.0.SelfAttention.q.weight", base),
                           ("decoder.block.1.layer.2.DenseReluDense.wo.weight", ft), ("decoder.final_layer_norm.weight", base)]:
        torch.testing.assert_close(got[name], expected[name])


def test_untied_lm_head_gets_its_own_random_mask(families):
    """transformers forces T5 tying; a config declaring tie_word_embeddings: false keeps lm_head apart."""
    import json as _json

    from hfmerge.checkpoints.aliases import tied_groups

    config = _json.loads((families["t5_v1_1"].base / "config.json").read_text())
    groups, warning = tied_groups(config)
    assert warning is None
    assert not any("lm_head.weight" in g for g in groups)
    assert any({"shared.weight", "encoder.embed_tokens.weight"} <= g for g in groups)
    original = _json.loads((families["t5"].base / "config.json").read_text())
    assert any({"shared.weight", "lm_head.weight"} <= g for g in tied_groups(original)[0])
