"""Bad input: a clear error naming the file, model or tensor, and nothing written."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hfmerge
from hfmerge import merging as merge_module
from hfmerge.cli import main
from hfmerge.errors import CheckpointError, FisherFileError, IncompatibleCheckpointsError, NonFiniteTensorError, OutputExistsError
from hfmerge.merging import run_merge
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import load_base_state, write_checkpoint
from test_merge import write_recipe



def recipe_for(tmp_path: Path, base: Path, models: list[Path], **extra) -> Path:
    return write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base, models=[{"model": m} for m in models], **extra)


def plan_error(recipe: Path):
    return build_plan(load_recipe(recipe))


def assert_nothing_written(tmp_path: Path, allowed: set[str]):
    assert {p.name for p in tmp_path.iterdir()} <= allowed


def test_missing_folder(t5, tmp_path):
    r = recipe_for(tmp_path, t5.base, [t5.finetuned[0], tmp_path / "nope"])
    with pytest.raises(CheckpointError, match=r"models\[1\].model .*folder .*nope does not exist"):
        plan_error(r)


def test_folder_without_weights(t5, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copyfile(t5.base / "config.json", empty / "config.json")
    (empty / "adapter_model.safetensors").write_bytes(b"")
    r = recipe_for(tmp_path, t5.base, [empty])
    with pytest.raises(CheckpointError, match=r"models\[0\].model .*has no model.safetensors .*found adapter_model.safetensors"):
        plan_error(r)


def test_folder_without_config(t5, tmp_path):
    folder = tmp_path / "noconf"
    folder.mkdir()
    shutil.copyfile(t5.finetuned[0] / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no config.json"):
        plan_error(recipe_for(tmp_path, t5.base, [folder]))


def _bin_checkpoint(t5, tmp_path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copyfile(t5.base / "config.json", folder / "config.json")
    torch.save(load_base_state(t5.finetuned[0]), folder / "pytorch_model.bin")
    return folder


def test_pickle_checkpoint_is_refused_without_the_allow_flag(t5, tmp_path, monkeypatch):
    folder = _bin_checkpoint(t5, tmp_path)
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or {})
    with pytest.raises(CheckpointError, match=r"holds only pickle weights .*set `allow_pickle: true`"):
        plan_error(recipe_for(tmp_path, t5.base, [folder]))
    assert calls == []  # never unpickled


def test_pickle_checkpoint_loads_with_weights_only_when_allowed(t5, tmp_path, monkeypatch):
    folder = _bin_checkpoint(t5, tmp_path)
    real_load = torch.load
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    r = recipe_for(tmp_path, t5.base, [folder], allow_pickle=True)
    out = run_merge(plan_error(r), tmp_path / "out", progress=False).output
    assert seen and all(w is True for w in seen)
    assert (out / "model.safetensors").is_file()


def test_truncated_safetensors(t5, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(t5.finetuned[0], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model.safetensors: tensor .* ends at byte \d+ but the file has only \d+ bytes; the file is truncated"):
        plan_error(recipe_for(tmp_path, t5.base, [folder]))


@pytest.mark.parametrize("corrupt, pattern", [
    (lambda d: d[:5], "too short to be a safetensors file"),
    (lambda d: struct.pack("<Q", 10**12) + d[8:], "header claims"),
    (lambda d: d[:8] + b"{" + b"x" * 20 + d[29:], "header is not valid JSON"),
])
def test_corrupted_header(t5, tmp_path, corrupt, pattern):
    folder = tmp_path / "bad"
    shutil.copytree(t5.finetuned[0], folder)
    path = folder / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match=pattern):
        plan_error(recipe_for(tmp_path, t5.base, [folder]))


def test_shape_mismatch_and_missing_tensor_name_the_tensor(t5, tmp_path):
    state = load_base_state(t5.finetuned[0])
    state["shared.weight"] = torch.zeros(3, 3)
    bad = write_checkpoint(tmp_path / "shape", state, t5.base / "config.json")
    with pytest.raises(IncompatibleCheckpointsError, match=r"tensor 'shared.weight' has different shapes .*\[3, 3\]"):
        plan_error(recipe_for(tmp_path, t5.base, [bad]))
    state = load_base_state(t5.finetuned[0])
    del state["encoder.final_layer_norm.weight"]
    bad = write_checkpoint(tmp_path / "missing", state, t5.base / "config.json")
    with pytest.raises(IncompatibleCheckpointsError, match=r"'encoder.final_layer_norm.weight' missing in models\[0\].model"):
        plan_error(recipe_for(tmp_path, t5.base, [bad]))


def test_non_float_tensor_where_a_merge_is_asked(t5, tmp_path):
    state = load_base_state(t5.finetuned[0])
    state["shared.weight"] = state["shared.weight"].to(torch.int32)
    bad = write_checkpoint(tmp_path / "int", state, t5.base / "config.json")
    with pytest.raises(IncompatibleCheckpointsError, match=r"'shared.weight' is floating point in some models and not in others"):
        plan_error(recipe_for(tmp_path, t5.base, [bad]))


def _nan_checkpoint(t5, tmp_path) -> Path:
    state = load_base_state(t5.finetuned[0])
    state["decoder.final_layer_norm.weight"][0] = float("nan")
    return write_checkpoint(tmp_path / "nan", state, t5.base / "config.json")


def test_nan_is_an_error_and_nothing_is_written(t5, tmp_path):
    r = recipe_for(tmp_path, t5.base, [_nan_checkpoint(t5, tmp_path)])
    with pytest.raises(NonFiniteTensorError, match=r"models\[0\].model .*tensor 'decoder.final_layer_norm.weight' contains NaN or Inf"):
        run_merge(plan_error(r), tmp_path / "out", progress=False)
    assert_nothing_written(tmp_path, {"r.yaml", "nan"})


def test_nan_is_a_warning_when_the_recipe_allows_it(t5, tmp_path):
    r = recipe_for(tmp_path, t5.base, [_nan_checkpoint(t5, tmp_path)], allow_nonfinite=True)
    result = run_merge(plan_error(r), tmp_path / "out", progress=False)
    assert any("contains NaN or Inf" in w for w in result.warnings)


def test_existing_output_is_refused_without_overwrite(t5, tmp_path):
    r = recipe_for(tmp_path, t5.base, [t5.finetuned[0]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as refused:
        hfmerge.merge(r, output=out, progress=False)
    assert "already exists" in str(refused.value) and "overwrite" in refused.value.options
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(OutputExistsError):
        run_merge(plan_error(r), out, progress=False)
    assert hfmerge.merge(r, output=out, overwrite=True, progress=False).output == out
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert_nothing_written(tmp_path, {"r.yaml", "out"})


def test_the_command_names_its_overwrite_flag_for_an_existing_output(t5, tmp_path, capsys):
    r = recipe_for(tmp_path, t5.base, [t5.finetuned[0]])
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(r), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --output / --overwrite: output folder") and "already exists" in err
    assert list(out.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_output(t5, tmp_path, monkeypatch):
    r = recipe_for(tmp_path, t5.base, [t5.finetuned[0]], max_shard_size="4KB")
    plan = plan_error(r)
    calls = {"n": 0}
    real = merge_module.TensorMerger.merge

    def failing(self, t):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full")
        return real(self, t)

    monkeypatch.setattr(merge_module.TensorMerger, "merge", failing)
    with pytest.raises(OSError, match="disk full"):
        run_merge(plan, tmp_path / "out", progress=False)
    assert calls["n"] == 20
    assert_nothing_written(tmp_path, {"r.yaml"})


def test_fisher_file_problems_name_the_file_and_tensor(t5, tmp_path):
    state = load_base_state(t5.finetuned[0])
    partial = {n: torch.ones_like(t) for n, t in state.items() if n != "shared.weight"}
    save_file(partial, tmp_path / "f.safetensors")
    r = write_recipe(tmp_path / "r.yaml", merge_method="fisher", base_model=t5.base,
                     models=[{"model": t5.finetuned[0], "fisher": tmp_path / "f.safetensors"}, {"model": t5.finetuned[1], "fisher": tmp_path / "nope.safetensors"}])
    with pytest.raises(FisherFileError, match=r"models\[1\].fisher: Fisher file .*nope.safetensors not found"):
        plan_error(r)
    r = write_recipe(tmp_path / "r.yaml", merge_method="fisher", base_model=t5.base,
                     models=[{"model": t5.finetuned[0], "fisher": tmp_path / "f.safetensors"}])
    with pytest.raises(FisherFileError, match=r"models\[0\].fisher: f.safetensors has no tensor 'shared.weight'"):
        plan_error(r)


def test_offline_hub_reference_missing_from_the_cache_is_reported_in_the_plan(t5, tmp_path):
    r = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=t5.base, models=[{"model": "org/some-model@v1"}])
    with pytest.raises(CheckpointError, match=r"models\[0\].model \(org/some-model@v1\): org/some-model@v1 config.json: not in the local cache and HF_HUB_OFFLINE is set"):
        plan_error(r)


def test_shard_names_in_an_index_cannot_leave_the_folder(t5, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(t5.finetuned[0], folder)
    (folder / "model.safetensors").rename(folder / "x.safetensors")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"shared.weight": "../x.safetensors"}}')
    with pytest.raises(CheckpointError, match=r"shard file name '../x.safetensors' leaves the checkpoint folder"):
        plan_error(recipe_for(tmp_path, t5.base, [folder]))
