"""Malformed safetensors and symlinks out of a model folder.

hfmerge accepts exactly the safetensors files that the `safetensors` library loads: every
malformed header here is refused by both (the library's `safe_open` and hfmerge), with a
message naming the file and the tensor, before any tensor byte is read; every unusual but valid
one is accepted by both and read identically. Symlinks are followed only inside a local model
folder (unless the recipe allows it) and, for Hub inputs, only inside the repo's cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import hfmerge
from hfmerge.checkpoints.reader import open_local_checkpoint
from hfmerge.checkpoints.safetensors_header import read_header
from hfmerge.errors import CheckpointError, RecipeError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe, parse_recipe
from hfmerge.refs import ModelRef
from test_merge import write_recipe

F32x2 = {"dtype": "F32", "shape": [2]}  # 8 bytes


def st_bytes(header: dict | str, data: bytes) -> bytes:
    """A safetensors file: length prefix, header JSON (padded with spaces as writers do), data."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def data_of(n_bytes: int) -> bytes:
    return torch.arange(n_bytes // 4, dtype=torch.float32).numpy().tobytes()


def library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


# (id, file bytes, the tensor the message must name or None for a header-level defect)
MALFORMED = [
    ("negative-offset", st_bytes({"a": {**F32x2, "data_offsets": [-8, 0]}, "b": {**F32x2, "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("overlapping", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, data_of(12)), "b"),
    ("same-range-twice", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [0, 8]}}, data_of(8)), None),
    ("hole", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, data_of(20)), "b"),
    ("hole-at-start", st_bytes({"a": {**F32x2, "data_offsets": [4, 12]}}, data_of(12)), "a"),
    ("end-before-begin", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [8, 0]}}, data_of(8)), "b"),
    ("trailing-bytes", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [8, 16]}}, data_of(20)), "b"),
    ("short-data", st_bytes({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [8, 16]}}, data_of(12)), "b"),
    ("wrong-byte-count", st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("negative-dim", st_bytes({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("float-dim", st_bytes({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("minus-zero-offset", st_bytes('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-0, 8]}}', data_of(8)), "a"),
    ("three-offsets", st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, data_of(8)), "a"),
    ("unknown-dtype", st_bytes({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("missing-field", st_bytes({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, data_of(8)), "a"),
    ("repeated-field", st_bytes('{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data_of(8)), "a"),
    ("overflowing-shape", st_bytes({"a": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}, b""), "a"),
    ("half-byte-dtype", st_bytes({"a": {"dtype": "F4", "shape": [1], "data_offsets": [0, 0]}}, b""), "a"),
    ("metadata-not-strings", st_bytes({"__metadata__": {"format": 1}, "a": {**F32x2, "data_offsets": [0, 8]}}, data_of(8)), None),
    ("metadata-twice", st_bytes('{"__metadata__": {}, "__metadata__": {}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data_of(8)), None),
    ("not-an-object", st_bytes('[{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}]', data_of(8)), None),
    ("nan", st_bytes('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}', data_of(8)), None),
    ("lone-surrogate", st_bytes('{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data_of(8)), None),
    ("too-deep", st_bytes('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + "[" * 126 + "]" * 126 + "}}", data_of(8)), None),
    ("bad-utf8", struct.pack("<Q", 8) + b'{"\xff":1}' + data_of(8), None),
    ("header-past-end", struct.pack("<Q", 4096) + b"{}      ", None),
    ("header-too-large", struct.pack("<Q", 100_000_001) + b"{}      ", None),
]

# Unusual but valid: the library loads each, so hfmerge must too, with the same tensors.
VALID = [
    ("offsets-not-in-name-order", st_bytes({"a": {**F32x2, "data_offsets": [8, 16]}, "b": {"dtype": "I32", "shape": [2], "data_offsets": [0, 8]}}, data_of(16))),
    ("array-entry", st_bytes('{"a": ["F32", [2], [0, 8]]}', data_of(8))),
    ("repeated-name-keeps-last", st_bytes('{"a": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data_of(8))),
    ("empty-tensors-share-an-offset", st_bytes({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b"")),
    ("unknown-fields-and-null-metadata", st_bytes({"__metadata__": None, "a": {**F32x2, "data_offsets": [0, 8], "note": [1, {"x": None}]}}, data_of(8))),
    ("scalar", st_bytes({"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, data_of(4))),
    ("whitespace-before-the-object", st_bytes(' \n{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', data_of(8))),
    ("no-tensors", st_bytes({"__metadata__": {"format": "pt"}}, b"")),
    # Data not aligned to the element size (a header not padded to 8 bytes, a 1-byte tensor
    # first): read by copy, where aligned data is mapped.
    ("unpadded-header", struct.pack("<Q", 61) + json.dumps({"a": {**F32x2, "data_offsets": [0, 8]}}).encode().ljust(61) + data_of(8)),
    ("float-after-one-byte", st_bytes({"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {**F32x2, "data_offsets": [1, 9]}},
                                      b"\x07" + data_of(8))),
]


@pytest.mark.parametrize("content, tensor", [pytest.param(c, t, id=i) for i, c, t in MALFORMED])
def test_malformed_file_is_refused_by_the_library_and_by_hfmerge(tmp_path, content, tensor):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    assert library_refuses(path)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    if tensor is not None:
        assert f"tensor {tensor!r}" in message


@pytest.mark.parametrize("content", [pytest.param(c, id=i) for i, c in VALID])
def test_unusual_valid_file_is_accepted_and_read_as_the_library_reads_it(tmp_path, content):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(content)
    ckpt = open_local_checkpoint(ModelRef(str(folder), path=folder), label="models[0].model")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(ckpt.tensors)
        for name in f.keys():
            expected = f.get_tensor(name)
            got = ckpt.read(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected)


def test_valid_file_with_a_dtype_hfmerge_cannot_compute_with_is_refused_as_unsupported(tmp_path):
    # The library loads it (a valid file), so the message says what hfmerge lacks, not "corrupted".
    path = tmp_path / "model.safetensors"
    path.write_bytes(st_bytes({"scales": {"dtype": "F8_E8M0", "shape": [8], "data_offsets": [0, 8]}}, data_of(8)))
    assert not library_refuses(path)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'scales' has dtype F8_E8M0, which hfmerge cannot read"):
        read_header(path)


def _with_weights(t5, tmp_path: Path, rewrite) -> Path:
    """A copy of a fine-tuned checkpoint whose header `rewrite` changes (data untouched)."""
    folder = tmp_path / "bad"
    shutil.copytree(t5.finetuned[0], folder)
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    rewrite(header)
    (folder / "model.safetensors").write_bytes(st_bytes(header, data[8 + n:]))
    return folder


def _shift_into_header(header: dict) -> None:
    # The defect that merged with exit 0: a tensor whose offsets point before the data section.
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin - 64, end - 64]


def test_merge_of_a_checkpoint_with_offsets_into_the_header_fails_in_the_plan(t5, tmp_path):
    folder = _with_weights(t5, tmp_path, _shift_into_header)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=t5.base, models=[{"model": folder}])
    with pytest.raises(CheckpointError) as refused:
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert "bad/model.safetensors: tensor '" in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_hub_header_with_a_hole_is_refused_in_the_plan(hub, t5, tmp_path):
    def hole(header: dict) -> None:
        last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
        begin, end = header[last]["data_offsets"]
        header[last]["data_offsets"] = [begin + 4, end + 4]

    bad = _with_weights(t5, tmp_path, hole)
    base_repo, bad_repo = hub.unique_repo_id("t5-base"), hub.unique_repo_id("t5-hole")
    hub.create_repo_direct(base_repo, {p.name: p for p in t5.base.iterdir() if p.is_file()})
    hub.create_repo_direct(bad_repo, {p.name: p for p in bad.iterdir() if p.is_file()})
    assert library_refuses(bad / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": bad_repo}])
    with pytest.raises(CheckpointError, match=rf"models\[0\].model .*{bad_repo}@[0-9a-f]{{40}} model.safetensors: tensor '[^']+': data_offsets .* leave 4 bytes unused"):
        build_plan(load_recipe(recipe))
    assert not [r for r in hub.requests_matching("GET", "model.safetensors") if not r.range]  # no weights downloaded


# -- symlinks -----------------------------------------------------------------------------------


def _plan(tmp_path: Path, t5, model: Path):
    return build_plan(load_recipe(write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=t5.base, models=[{"model": model}])))


def _linked_copy(t5, tmp_path: Path, name: str, target: Path) -> Path:
    """A copy of a fine-tuned checkpoint whose file `name` is a symlink to `target`."""
    folder = tmp_path / "linked"
    shutil.copytree(t5.finetuned[0], folder)
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(target)
    return folder


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer_config.json"])
def test_symlink_out_of_a_local_folder_is_refused(t5, tmp_path, name):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    source = t5.finetuned[0] / name
    # A tokenizer file is copied to the output when this model is the tokenizer source.
    (outside / name).write_bytes(source.read_bytes() if source.exists() else b"{}")
    folder = _linked_copy(t5, tmp_path, name, outside / name)
    with pytest.raises(CheckpointError, match=rf"models\[0\].model .*linked/{name} leads through a symbolic link to .*elsewhere/{name}, outside the model folder"
                                              r".*`allow_external_symlinks: true`"):
        _plan(tmp_path, t5, folder)


def test_shard_in_a_linked_subfolder_outside_is_refused(t5, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(t5.finetuned[0] / "model.safetensors", outside / "part.safetensors")
    folder = tmp_path / "sharded"
    shutil.copytree(t5.finetuned[0], folder)
    names = list(read_header(folder / "model.safetensors")[0])
    (folder / "model.safetensors").unlink()
    (folder / "sub").symlink_to(outside)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "sub/part.safetensors" for n in names}}))
    with pytest.raises(CheckpointError, match=r"sharded/sub/part.safetensors leads through a symbolic link"):
        _plan(tmp_path, t5, folder)


def test_symlink_inside_the_folder_is_followed(t5, tmp_path):
    folder = tmp_path / "inside"
    shutil.copytree(t5.finetuned[0], folder)
    (folder / "weights").mkdir()
    (folder / "model.safetensors").rename(folder / "weights" / "real.safetensors")
    (folder / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    plan = _plan(tmp_path, t5, folder)
    assert plan.models[0].tensors


def test_symlink_outside_is_followed_with_the_recipe_key(t5, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(t5.finetuned[0] / "model.safetensors", outside / "model.safetensors")
    folder = _linked_copy(t5, tmp_path, "model.safetensors", outside / "model.safetensors")
    ref = ModelRef(str(folder), path=folder)
    with pytest.raises(CheckpointError, match="allow_external_symlinks"):
        open_local_checkpoint(ref, label="models[0].model")
    ckpt = open_local_checkpoint(ref, label="models[0].model", allow_external_symlinks=True)
    name = next(iter(ckpt.tensors))
    with safe_open(str(outside / "model.safetensors"), framework="pt") as f:
        assert torch.equal(ckpt.read(name), f.get_tensor(name))


def test_recipe_key_allow_external_symlinks_reaches_the_merge(t5, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(t5.finetuned[0] / "model.safetensors", outside / "model.safetensors")
    folder = _linked_copy(t5, tmp_path, "model.safetensors", outside / "model.safetensors")
    data = {"merge_method": "task_arithmetic", "base_model": t5.base, "models": [{"model": folder}]}
    refused = write_recipe(tmp_path / "refused.yaml", **data)
    with pytest.raises(CheckpointError, match="allow_external_symlinks"):
        hfmerge.merge(refused, output=tmp_path / "out1", progress=False)
    assert not (tmp_path / "out1").exists()
    allowed = write_recipe(tmp_path / "allowed.yaml", **data, allow_external_symlinks=True)
    assert hfmerge.merge(allowed, output=tmp_path / "out2", progress=False).output == tmp_path / "out2"
    assert (tmp_path / "out2" / "model.safetensors").is_file()


def test_recipe_key_allow_external_symlinks_is_a_boolean(t5, tmp_path):
    data = {"merge_method": "task_arithmetic", "base_model": str(t5.base), "models": [{"model": str(t5.finetuned[0])}]}
    assert parse_recipe(data, source="r.yaml").allow_external_symlinks is False
    assert parse_recipe({**data, "allow_external_symlinks": True}, source="r.yaml").allow_external_symlinks is True
    with pytest.raises(RecipeError, match="allow_external_symlinks"):
        parse_recipe({**data, "allow_external_symlinks": "yes"}, source="r.yaml")


def test_a_local_folder_in_the_hugging_face_cache_layout_is_accepted(t5, tmp_path):
    # snapshots/<commit>/ files link to ../../blobs/: inside the repo's cache folder.
    repo = tmp_path / "hub" / "models--org--t5"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, src in enumerate(p for p in t5.finetuned[0].iterdir() if p.is_file()):
        shutil.copyfile(src, repo / "blobs" / f"blob{i}")
        (snapshot / src.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert _plan(tmp_path, t5, snapshot).models[0].tensors


def test_hub_file_resolving_outside_the_repo_cache_is_refused(hub, hub_cache, t5, tmp_path):
    base_repo, repo = hub.unique_repo_id("t5-base"), hub.unique_repo_id("t5-a")
    hub.create_repo_direct(base_repo, {p.name: p for p in t5.base.iterdir() if p.is_file()})
    hub.create_repo_direct(repo, {p.name: p for p in t5.finetuned[0].iterdir() if p.is_file()})
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": repo}])
    assert hfmerge.merge(recipe, output=tmp_path / "first", progress=False).output == tmp_path / "first"  # fills the cache
    # Alter the cache: the snapshot's weights now lead to a file outside it.
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(t5.finetuned[0] / "model.safetensors", outside)
    pointer = next(hub_cache.glob(f"models--{repo.replace('/', '--')}/snapshots/*/model.safetensors"))
    pointer.unlink()
    pointer.symlink_to(outside)
    with pytest.raises(CheckpointError, match=rf"models\[0\].model .*model.safetensors resolves to .*elsewhere.safetensors, outside this repo's folder of the Hugging Face cache"):
        build_plan(load_recipe(recipe))
    assert os.path.islink(pointer)  # reported, not repaired silently
