"""The streaming engine's overlapped parts: the writer's background thread and its hashes, the
quick finiteness check, and inputs read as mapped views (copy-on-write)."""

from __future__ import annotations

import errno
import hashlib

import pytest
import torch
from safetensors.torch import load_file

from hfmerge.checkpoints.writer import OutputTensor, ShardedSafetensorsWriter
from hfmerge.errors import OutputWriteError
from hfmerge.merging import _all_finite


def tensors(n: int = 5) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.arange(12 + i, dtype=torch.float32) * (i + 1) for i in range(n)}


@pytest.mark.parametrize("background", [False, True])
def test_writer_hashes_what_it_writes_and_the_files_load(tmp_path, background):
    values = tensors()
    planned = [OutputTensor(name, tuple(t.shape), "F32") for name, t in values.items()]
    with ShardedSafetensorsWriter(tmp_path, planned, max_shard_size=120, background=background) as writer:
        for name, t in values.items():
            writer.write(name, t)
    files = [f for f in writer.file_names]
    assert len(files) > 1  # sharded: every shard hashed
    assert writer.sha256 == {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in files}
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert set(loaded) == set(values) and all(torch.equal(loaded[k], v) for k, v in values.items())


def test_a_failure_on_the_writer_thread_reaches_the_caller(tmp_path):
    values = tensors(3)
    planned = [OutputTensor(name, tuple(t.shape), "F32") for name, t in values.items()]
    writer = ShardedSafetensorsWriter(tmp_path, planned, max_shard_size=10**6, background=True)
    calls = []

    def failing_put(shard, out, tensor):
        calls.append(out.name)
        raise writer._failed(OSError(errno.ENOSPC, "No space left on device"), writer.file_names[shard])

    writer._put = failing_put
    with pytest.raises(OutputWriteError, match="space"):
        with writer:
            for name, t in values.items():
                writer.write(name, t)
    assert calls == ["t0"]  # the error surfaced at the next write, before more work was queued


def test_quick_finiteness_check_agrees_with_the_exact_one():
    big = torch.full((1000,), 3e38)  # every entry finite, their float32 sum is not
    assert not torch.isfinite(big.sum()) and _all_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(100)
        t[37] = bad
        assert not _all_finite(t)
    assert _all_finite(torch.empty(0)) and _all_finite(torch.zeros(3, 4))


def test_a_mapped_input_written_into_leaves_the_file_alone(tmp_path):
    from hfmerge.checkpoints import open_checkpoint
    from hfmerge.refs import parse_model_ref
    from hfmerge.testing import build_base

    folder = build_base(tmp_path / "m", "llama")
    before = (folder / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(parse_model_ref(str(folder)), label="m")
    name = next(iter(ckpt.tensors))
    t = ckpt.read(name)
    expected = t.clone()
    t.add_(1.0)  # a method working in place on its input
    assert (folder / "model.safetensors").read_bytes() == before
    assert torch.equal(ckpt.read(name), expected)
