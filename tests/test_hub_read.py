"""Reading inputs from a Hub (the project's Hub-protocol test server, real huggingface_hub client)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hfmerge
from hfmerge.errors import CheckpointError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import build_finetuned, load_base_state
from test_merge import write_recipe


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def hub_family(hub, t5, tmp_path):
    """The tiny T5 family uploaded to the test Hub: base (single file) and two fine-tunes (one sharded)."""
    sharded = build_finetuned(t5.base, tmp_path / "sharded", seed=11, sharded_max=4000)
    repos = {key: hub.unique_repo_id(f"t5-{key}") for key in ("base", "a", "b")}  # fresh repos per test
    for key, folder in (("base", t5.base), ("a", t5.finetuned[0]), ("b", sharded)):
        hub.create_repo_direct(repos[key], folder_files(folder))
    return repos, {"base": t5.base, "a": t5.finetuned[0], "b": sharded}


def test_hub_inputs_merge_bit_identical_to_local_and_plan_reads_headers_only(hub, hub_family, tmp_path):
    repos, local = hub_family
    hub_recipe = write_recipe(tmp_path / "hub.yaml", merge_method="ties", base_model=repos["base"],
                              models=[{"model": repos["a"], "parameters": {"density": 0.5}}, {"model": repos["b"], "parameters": {"density": 0.5}}])
    hub.clear_requests()
    plan = build_plan(load_recipe(hub_recipe))
    weight_gets = [r for r in hub.requests_matching("GET", ".safetensors") if not (r.range or "").startswith("bytes=0-7") and "index" not in r.path]
    full_gets = [r for r in weight_gets if not r.range]
    assert full_gets == []  # the plan moved no weight file
    assert all(len(c.commit) == 40 for c in plan.models) and len(plan.base.commit) == 40
    assert plan.models[1].commit == hub.head_sha(repos["b"])
    out_hub = tmp_path / "out-hub"
    assert hfmerge.merge(hub_recipe, output=out_hub, progress=False).output == out_hub
    local_recipe = write_recipe(tmp_path / "local.yaml", merge_method="ties", base_model=local["base"],
                                models=[{"model": local["a"], "parameters": {"density": 0.5}}, {"model": local["b"], "parameters": {"density": 0.5}}])
    out_local = tmp_path / "out-local"
    assert hfmerge.merge(local_recipe, output=out_local, progress=False).output == out_local
    assert (out_hub / "model.safetensors").read_bytes() == (out_local / "model.safetensors").read_bytes()


def test_a_commit_after_the_plan_does_not_change_the_result_and_revisions_select_commits(hub, hub_family, t5, tmp_path):
    repos, local = hub_family
    first = hub.head_sha(repos["a"])
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": repos["a"]}])
    plan = build_plan(load_recipe(recipe))
    changed = build_finetuned(t5.base, tmp_path / "changed", seed=99)
    hub.commit_direct(repos["a"], {"model.safetensors": changed / "model.safetensors"}, "new weights")
    from hfmerge.merging import run_merge

    out = run_merge(plan, tmp_path / "out", progress=False).output
    expected = load_base_state(local["a"])
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], expected[n]) for n in got)  # λ = 1, one model: the model itself, as planned
    # @revision picks the old commit explicitly; the branch now gives the new one.
    pinned = write_recipe(tmp_path / "p.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": f"{repos['a']}@{first}"}])
    assert build_plan(load_recipe(pinned)).models[0].commit == first
    assert build_plan(load_recipe(recipe)).models[0].commit == hub.head_sha(repos["a"]) != first


@pytest.mark.parametrize("model, pattern", [
    ("org/does-not-exist", r"org/does-not-exist@main: repo not found; check the name, or log in"),
    ("{a}@nope", r"@nope: revision 'nope' not found; check the branch, tag or commit"),
])
def test_missing_repo_or_revision_is_reported_in_the_plan(hub, hub_family, tmp_path, model, pattern):
    repos, _ = hub_family
    model = model.format(a=repos["a"])
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": model}])
    with pytest.raises(CheckpointError, match=pattern):
        build_plan(load_recipe(recipe))


def test_gated_repo_message_says_what_to_do(hub, hub_family, t5, tmp_path):
    hub.create_repo_direct("org/gated", folder_files(t5.finetuned[1]), gated=True, exist_ok=True)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=hub_family[0]["base"], models=[{"model": "org/gated"}])
    with pytest.raises(CheckpointError, match=r"org/gated@main.*: the repo is gated; accept its conditions"):
        build_plan(load_recipe(recipe))


def test_remote_index_with_parent_shard_name_is_rejected(hub, hub_family, t5, tmp_path):
    files = folder_files(t5.finetuned[1])
    files["model.safetensors.index.json"] = b'{"metadata": {}, "weight_map": {"shared.weight": "../evil.safetensors"}}'
    hub.create_repo_direct("org/evil", files, exist_ok=True)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=hub_family[0]["base"], models=[{"model": "org/evil"}])
    with pytest.raises(CheckpointError, match=r"shard file name '../evil.safetensors' leaves the checkpoint folder"):
        build_plan(load_recipe(recipe))


def test_second_run_offline_works_from_the_cache(hub, hub_family, tmp_path, monkeypatch):
    repos, _ = hub_family
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=repos["base"], models=[{"model": repos["a"]}, {"model": repos["b"]}])
    assert hfmerge.merge(recipe, output=tmp_path / "online", progress=False).output == tmp_path / "online"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_requests()
    assert hfmerge.merge(recipe, output=tmp_path / "offline", progress=False).output == tmp_path / "offline"
    assert len(hub.requests) == 0  # nothing asked of the Hub
    assert (tmp_path / "online" / "model.safetensors").read_bytes() == (tmp_path / "offline" / "model.safetensors").read_bytes()


def test_dropped_connection_mid_shard_is_recovered(hub, hub_family, tmp_path):
    repos, local = hub_family
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": repos["a"]}])
    plan = build_plan(load_recipe(recipe))
    hub.drop_connection_after(path_contains=f"{repos['a']}/resolve", nbytes=3000, times=1)
    from hfmerge.merging import run_merge

    out = run_merge(plan, tmp_path / "out", progress=False).output
    gets = [r.body_bytes for r in hub.requests_matching("GET", f"{repos['a']}/resolve")]
    assert 3000 in gets and len(gets) >= 2  # the first body was cut, a second request completed it
    expected = load_base_state(local["a"])
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[n], expected[n]) for n in got)


def test_low_disk_keeps_at_most_one_shard_per_model_and_gives_the_same_output(hub, hub_family, hub_cache, tmp_path, monkeypatch):
    from hfmerge.checkpoints.hub import HubCheckpoint

    repos, _ = hub_family
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="ties", base_model=repos["base"],
                          models=[{"model": repos["a"], "parameters": {"density": 0.5}}, {"model": repos["b"], "parameters": {"density": 0.5}}])
    real = HubCheckpoint.local_file
    on_disk: list[int] = []
    scratch_dirs = set()

    def spy(self, info):
        path = real(self, info)
        scratch_dirs.add(self.scratch)
        on_disk.append(sum(1 for p in self.scratch.rglob("*.safetensors")))
        return path

    monkeypatch.setattr(HubCheckpoint, "local_file", spy)
    assert hfmerge.merge(recipe, output=tmp_path / "low", low_disk=True, progress=False).output == tmp_path / "low"
    assert on_disk and max(on_disk) == 1
    assert all(d is not None and not d.exists() for d in scratch_dirs)  # scratch removed afterwards
    assert not list(hub_cache.rglob("*.safetensors"))  # no weights went through the cache
    monkeypatch.setattr(HubCheckpoint, "local_file", real)
    assert hfmerge.merge(recipe, output=tmp_path / "cached", progress=False).output == tmp_path / "cached"
    assert (tmp_path / "low" / "model.safetensors").read_bytes() == (tmp_path / "cached" / "model.safetensors").read_bytes()


def test_503_on_a_header_read_is_retried(hub, hub_family, tmp_path):
    repos, _ = hub_family
    hub.fail_next(method="GET", path_contains=".safetensors", status=503, times=1)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": repos["a"]}])
    plan = build_plan(load_recipe(recipe))
    statuses = [r.status for r in hub.requests_matching("GET", ".safetensors")]
    assert statuses[0] == 503 and statuses[1] == 206 and plan.base.tensors and plan.models[0].tensors


def test_persistent_503_is_reported_clearly(hub, hub_family, tmp_path, monkeypatch):
    # Every try fails; the retry policy's waits are shortened so the test stays fast.
    import hfmerge.checkpoints.hub as hub_module

    monkeypatch.setattr(hub_module, "RETRY_POLICY", hub_module.RetryPolicy(attempts=3, base_wait_s=0.01, max_wait_s=0.02))
    repos, _ = hub_family
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": repos["a"]}])
    plan = build_plan(load_recipe(recipe))
    hub.fail_next(path_contains=f"{repos['a']}/resolve", status=503, times=None)
    from hfmerge.merging import run_merge

    with pytest.raises(CheckpointError, match=r"models\[0\].model .*model.safetensors: could not be downloaded: the Hub did not answer or answered with an error .*503.*retry later"):
        run_merge(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_repo_without_weights_is_reported_in_the_plan(hub, hub_family, t5, tmp_path):
    repos, _ = hub_family
    empty = hub.unique_repo_id("config-only")
    hub.create_repo_direct(empty, {"config.json": (t5.base / "config.json").read_bytes(), "adapter_model.safetensors": b"x" * 16})
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"], models=[{"model": empty}])
    hub.clear_requests()
    with pytest.raises(CheckpointError, match=r"has no model.safetensors or model.safetensors.index.json \(found adapter_model.safetensors; is this an adapter repo\?\)"):
        build_plan(load_recipe(recipe))
    assert not [r for r in hub.requests_matching("GET", ".safetensors") if not r.range]  # no weights moved


def test_a_low_disk_plan_that_fails_after_opening_leaves_no_scratch_folder(hub, hub_family, tmp_path, monkeypatch):
    import tempfile

    repos, _ = hub_family
    scratch_parent = tmp_path / "tmp"
    scratch_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_parent))
    # Both inputs open fine; the missing tokenizer folder is found only afterwards.
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=repos["base"],
                          models=[{"model": repos["a"]}], tokenizer_source=str(tmp_path / "no-such-folder"))
    with pytest.raises(CheckpointError, match="tokenizer_source"):
        build_plan(load_recipe(recipe), low_disk=True)
    assert list(scratch_parent.iterdir()) == []
