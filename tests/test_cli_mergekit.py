"""`hfmerge CONFIG OUT_PATH` with mergekit-yaml's flags: mapped, accepted without effect, or refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import hfmerge
from hfmerge.checkpoints.reader import TORCH_DTYPES
from hfmerge.cli import _merge_parser, main
from hfmerge.merging import TensorMerger, _to_device
from hfmerge.methods._common import random_drop_
from hfmerge.options import RunOptions, merge_device
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import load_base_state

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def write_recipe(path: Path, **data) -> Path:
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}
    for m in data.get("models", []):
        m["model"] = str(m["model"])
    path.write_text(yaml.safe_dump(data))
    return path


def linear_recipe(fam, path: Path) -> Path:
    return write_recipe(path, merge_method="linear", models=[{"model": p, "parameters": {"weight": 1.0}} for p in fam.finetuned[:2]])


def dare_recipe(fam, path: Path, **parameters) -> Path:
    return write_recipe(path, merge_method="dare_linear", base_model=fam.base, parameters=parameters,
                        models=[{"model": p, "parameters": {"weight": 0.5, "density": 0.5}} for p in fam.finetuned[:2]])


def shard_sizes(out: Path) -> list[int]:
    """Bytes of tensor data in each shard, in shard order."""
    names = sorted(p.name for p in out.glob("model*.safetensors"))
    sizes = []
    for name in names:
        with safe_open(str(out / name), "pt") as f:
            sizes.append(sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()))
    return sizes


def _by_shard(weight_map: dict[str, str]) -> list[list[str]]:
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    return [shards[k] for k in sorted(shards)]


def test_second_positional_is_the_output(families, tmp_path):
    fam = families["llama"]
    recipe = linear_recipe(fam, tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    # mergekit-yaml's order with a flag between CONFIG and OUT_PATH, and the same folder given both ways
    assert main([str(recipe), "--no-cuda", str(tmp_path / "out2"), "-q", "--output", str(tmp_path / "out2")]) == 0
    torch.testing.assert_close(load_base_state(tmp_path / "out2"), load_base_state(tmp_path / "out"), rtol=0, atol=0)


def test_two_different_outputs_are_refused(families, tmp_path, capsys):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "a"), "-o", str(tmp_path / "b"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "the output is given twice and differently" in err and "a'" in err and "b'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_out_shard_size_counts_bytes_as_mergekits_writer(families, tmp_path):
    fam = families["llama"]
    recipe = linear_recipe(fam, tmp_path / "r.yaml")
    # float32 model: 6K of mergekit's notation = 6000 bytes per shard at most (unless one tensor is larger)
    assert main([str(recipe), str(tmp_path / "k"), "--out-shard-size", "6K", "-q"]) == 0
    assert main([str(recipe), str(tmp_path / "bytes"), "--max-shard-size", "6000", "-q"]) == 0
    index = json.loads((tmp_path / "k" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "bytes" / "model.safetensors.index.json").read_text())
    sizes = shard_sizes(tmp_path / "k")
    # mergekit-yaml 0.1.5 with --out-shard-size 6K writes these same six shards (1, 2, 2, 7, 2, 7
    # tensors) for this model, compared by hand; counted in parameters it would write two
    assert [len(v) for v in _by_shard(index["weight_map"])] == [1, 2, 2, 7, 2, 7]
    largest = max(t.numel() * t.element_size() for t in load_base_state(fam.base).values())
    assert all(s <= max(6000, largest) for s in sizes)
    # 0 is mergekit's "no limit": one file
    assert main([str(recipe), str(tmp_path / "zero"), "--out-shard-size", "0", "-q"]) == 0
    assert (tmp_path / "zero" / "model.safetensors").is_file() and not (tmp_path / "zero" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("value, hint", [("5GB", "use --max-shard-size"), ("1.5B", "whole number"), ("-1", "whole number"), ("", "whole number")])
def test_out_shard_size_takes_mergekits_notation_only(families, tmp_path, capsys, value, hint):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "out"), f"--out-shard-size={value}", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --out-shard-size:") and hint in err


def test_out_shard_size_and_max_shard_size_together_are_refused(families, tmp_path, capsys):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "out"), "--out-shard-size", "1B", "--max-shard-size", "1GB", "-q"]) == 1
    assert "give one" in capsys.readouterr().err


def test_random_seed_replaces_the_recipes_seed_reproducibly(families, tmp_path):
    fam = families["llama"]
    recipe = dare_recipe(fam, tmp_path / "r.yaml", seed=0)
    runs = {}
    for name, argv in {"s1": ["--random-seed", "1"], "s1b": ["--random-seed", "1"], "s2": ["--random-seed", "2"], "recipe": []}.items():
        assert main([str(recipe), str(tmp_path / name), "-q", *argv]) == 0
        runs[name] = load_base_state(tmp_path / name)
    # the same as writing seed: 1 in the recipe
    assert main([str(dare_recipe(fam, tmp_path / "r1.yaml", seed=1)), str(tmp_path / "in-recipe"), "-q"]) == 0
    in_recipe = load_base_state(tmp_path / "in-recipe")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs["s1"][name], runs["s1b"][name]) and torch.equal(runs["s1"][name], in_recipe[name])
    assert not torch.equal(runs["s1"][name], runs["s2"][name]) and not torch.equal(runs["s1"][name], runs["recipe"][name])
    # the echoed recipe reproduces the run
    assert yaml.safe_load((tmp_path / "s2" / "hfmerge_recipe.yaml").read_text())["parameters"]["seed"] == 2


def test_random_seed_of_a_method_without_randomness_is_a_warning(families, tmp_path):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    warnings = hfmerge.plan(recipe, RunOptions(random_seed=5)).warnings
    assert any("random_seed 5" in w and "no effect" in w for w in warnings)
    assert not any("random_seed" in w for w in hfmerge.plan(recipe).warnings)


def test_negative_random_seed_is_refused(families, tmp_path, capsys):
    recipe = dare_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "out"), "--random-seed", "-1", "-q"]) == 1
    assert "--random-seed: got -1" in capsys.readouterr().err


@pytest.fixture
def base_with_tokenizer(families, tmp_path) -> Path:
    base = Path(shutil.copytree(families["llama"].base, tmp_path / "base"))
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return base


def test_no_copy_tokenizer_leaves_the_base_tokenizer_out(families, tmp_path, base_with_tokenizer):
    fam = families["llama"]
    models = [{"model": p, "parameters": {"weight": 1.0}} for p in fam.finetuned[:2]]
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_with_tokenizer, models=models)
    assert main([str(recipe), str(tmp_path / "with"), "-q", "--copy-tokenizer"]) == 0
    assert main([str(recipe), str(tmp_path / "without"), "-q", "--no-copy-tokenizer"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "with").iterdir()}
    left = {p.name for p in (tmp_path / "without").iterdir()}
    assert "tokenizer.json" not in left and "tokenizer_config.json" not in left and "config.json" in left
    # as in mergekit, a tokenizer the recipe names is part of the merge and is written either way
    named = write_recipe(tmp_path / "t.yaml", merge_method="task_arithmetic", base_model=base_with_tokenizer, models=models,
                         tokenizer_source=str(base_with_tokenizer))
    assert main([str(named), str(tmp_path / "named"), "-q", "--no-copy-tokenizer"]) == 0
    assert (tmp_path / "named" / "tokenizer.json").is_file()


def test_no_write_model_card(families, tmp_path, capsys):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "out"), "-q", "--no-write-model-card"]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert "README.md" not in files and {"model.safetensors", "config.json", "hfmerge_recipe.yaml"} <= files
    assert main([str(recipe), str(tmp_path / "card"), "-q", "--write-model-card"]) == 0
    assert (tmp_path / "card" / "README.md").is_file()
    # a pushed model needs its card: refused before anything is read or sent
    assert main([str(recipe), str(tmp_path / "push"), "-q", "--no-write-model-card", "--push-to-hub", "org/name"]) == 1
    err = capsys.readouterr().err
    assert "--no-write-model-card / --push-to-hub" in err and "model card" in err
    assert not (tmp_path / "push").exists()


def test_cuda_flags_choose_the_device(families, tmp_path, capsys):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    assert main([str(recipe), str(tmp_path / "cpu"), "-q", "--no-cuda"]) == 0
    for flags in (["--cuda", "--device", "cpu"], ["--no-cuda", "--device", "cuda"], ["--gpu-rich", "--device", "cpu"]):
        assert main([str(recipe), str(tmp_path / "x"), "-q", *flags]) == 1
        assert "give one" in capsys.readouterr().err
    for flags in (["--cuda"], ["--gpu-rich"], ["--multi-gpu"]):
        code = main([str(recipe), str(tmp_path / "gpu"), "-q", "--overwrite", *flags])
        if torch.cuda.is_available():
            assert code == 0
        else:  # refused before anything is read
            assert code == 1 and "no CUDA device is available" in capsys.readouterr().err
            assert not (tmp_path / "gpu").exists()


def test_static_merges_compute_on_the_cuda_device_only_when_asked():
    assert merge_device(RunOptions()) == "cpu"  # auto: a static merge stays on the CPU
    assert merge_device(RunOptions(device="cpu")) == "cpu"
    if torch.cuda.is_available():
        assert merge_device(RunOptions(device="cuda")) == "cuda"
    else:
        with pytest.raises(hfmerge.OptionError, match="no CUDA device"):
            merge_device(RunOptions(device="cuda"))


def test_tensor_merger_calls_the_method_on_its_device(families, tmp_path):
    fam = families["llama"]
    plan = build_plan(load_recipe(dare_recipe(fam, tmp_path / "r.yaml", seed=4)))
    try:
        default, on_cpu = TensorMerger(plan), TensorMerger(plan, torch.device("cpu"))
        assert on_cpu.device == torch.device("cpu")
        for t in [t for t in plan.tensors if t.merge][:4]:
            a, b = default.merge(t), on_cpu.merge(t)
            assert a.device.type == "cpu" and a.dtype == TORCH_DTYPES[t.out_dtype]
            assert torch.equal(a, b)
    finally:
        plan.release()
    nested = _to_device((torch.ones(2), [torch.zeros(1)], {"k": [torch.ones(1)], "x": 1.5}), torch.device("cpu"))
    assert isinstance(nested, tuple) and isinstance(nested[1], list) and nested[2]["x"] == 1.5 and torch.equal(nested[2]["k"][0], torch.ones(1))


def test_dare_masks_come_from_the_cpu_generator():
    # the mask is drawn where the generator lives, exactly as a CPU bernoulli of that generator
    delta = torch.randn(50, generator=torch.Generator().manual_seed(1))
    got = random_drop_(delta.clone(), 0.3, torch.Generator().manual_seed(7))
    mask = torch.bernoulli(torch.full((50,), 0.3), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, delta * mask / 0.3, rtol=0, atol=0)


def test_num_threads_is_used_and_restored(families, tmp_path, monkeypatch):
    recipe = linear_recipe(families["llama"], tmp_path / "r.yaml")
    seen = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    assert main([str(recipe), str(tmp_path / "out"), "-q", "-j", "1"]) == 0
    assert seen == [1, before] and torch.get_num_threads() == before


NO_OPS = ["--allow-crimes", "--no-allow-crimes", "--low-cpu-memory", "--no-low-cpu-memory", "--read-to-gpu", "--no-read-to-gpu",
          "--lazy-unpickle", "--no-lazy-unpickle", "--clone-tensors", "--no-clone-tensors", "--async-write", "--no-async-write",
          "--write-threads", "4", "--safe-serialization", "--no-trust-remote-code", "--no-unsafe-truncate-embeddings",
          "--lora-merge-cache", "lora-cache", "--lora-merge-dtype", "bfloat16", "--no-multi-gpu", "--no-quiet", "-q", "-v"]


def test_no_op_flags_are_accepted_and_change_nothing(families, tmp_path):
    recipe = dare_recipe(families["llama"], tmp_path / "r.yaml", seed=2)
    assert main([str(recipe), str(tmp_path / "plain"), "-q"]) == 0
    assert main([str(recipe), str(tmp_path / "flags"), *NO_OPS]) == 0
    plain, flags = load_base_state(tmp_path / "plain"), load_base_state(tmp_path / "flags")
    assert set(plain) == set(flags) and all(torch.equal(plain[n], flags[n]) for n in plain)
    assert not (tmp_path / "lora-cache").exists()


@pytest.mark.parametrize("argv, reason", [
    (["--trust-remote-code"], "never runs code from a model repo"),
    (["--unsafe-truncate-embeddings"], "never discards embedding rows"),
    (["--no-safe-serialization"], "safetensors only"),
    (["--transformers-cache", "/somewhere"], "set HF_HUB_CACHE=DIR instead"),
])
def test_refused_flags_say_why(tmp_path, capsys, argv, reason):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "r.yaml"), str(tmp_path / "out"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: refused:" in err and reason in err


def test_help_lists_the_mergekit_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "OUT_PATH" in out and "mergekit-yaml flags" in out and "--out-shard-size" in out and "--trust-remote-code" in out


def test_every_merge_flag_is_in_docs_cli_md():
    text = DOCS.read_text()
    documented = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", text))
    flags = {s for action in _merge_parser()._actions for s in action.option_strings}
    missing = sorted(flags - documented)
    assert not missing, f"flags missing from docs/cli.md: {missing}"
    # the mergekit-yaml table names every option of mergekit-yaml 0.1.5
    mergekit = ["--allow-crimes", "--unsafe-truncate-embeddings", "--trust-remote-code", "--transformers-cache", "--lora-merge-cache",
                "--lora-merge-dtype", "--random-seed", "-v", "--quiet", "--cuda", "--device", "--low-cpu-memory", "--lazy-unpickle",
                "--read-to-gpu", "--multi-gpu", "--num-threads", "-j", "--gpu-rich", "--async-write", "--write-threads",
                "--out-shard-size", "--copy-tokenizer", "--clone-tensors", "--write-model-card", "--safe-serialization", "--help"]
    table = text[text.index("## mergekit-yaml flags"):]
    assert all(f"`{flag}" in table for flag in mergekit), [f for f in mergekit if f"`{flag}" not in table]
