"""Hub reads survive transient faults, and every downloaded file is verified before it is used or kept.

Each test runs real merges against the Hub-protocol test server (tests/hub_server.py) with faults
injected on the endpoints a merge touches: the revision lookup (HEAD of config.json at the
branch), the file listing (`/api/models/{repo}/revision/{sha}`), the config.json download, a
shard's header range read and the shard's download. Waits between retries are recorded instead of
slept, so the tests take seconds and check the backoff without measuring time.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import hfmerge
import hfmerge.checkpoints.hub as hub_module
from hfmerge.cli import main
from hfmerge.errors import CheckpointError
from hub_server import Fault
from test_merge import write_recipe

POLICY = hub_module.RetryPolicy(attempts=4, base_wait_s=0.5, max_wait_s=2.0, max_retry_after_s=30.0)


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


class _Clock:
    """Stands in for the `time` module of hfmerge.checkpoints.hub: records each wait, sleeps none."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retries of hfmerge's Hub calls under `POLICY`, their waits recorded here instead of slept."""
    clock = _Clock()
    monkeypatch.setattr(hub_module, "time", clock)
    monkeypatch.setattr(hub_module, "RETRY_POLICY", POLICY)
    return clock.waits


@pytest.fixture
def family(hub, t5, tmp_path):
    """A base and one fine-tune on the test Hub, the recipe merging them, and the no-fault result."""
    repos = {"base": hub.unique_repo_id("t5-base"), "a": hub.unique_repo_id("t5-a")}
    hub.create_repo_direct(repos["base"], folder_files(t5.base))
    hub.create_repo_direct(repos["a"], folder_files(t5.finetuned[0]))
    recipe = write_recipe(tmp_path / "hub.yaml", merge_method="task_arithmetic", base_model=repos["base"],
                          models=[{"model": repos["a"], "parameters": {"weight": 0.7}}])
    local = write_recipe(tmp_path / "local.yaml", merge_method="task_arithmetic", base_model=t5.base,
                         models=[{"model": t5.finetuned[0], "parameters": {"weight": 0.7}}])
    assert hfmerge.merge(local, output=tmp_path / "expected", progress=False).output == tmp_path / "expected"
    expected = (tmp_path / "expected" / "model.safetensors").read_bytes()
    sha = hub.head_sha(repos["a"])
    paths = {
        "revision lookup": f"/{repos['a']}/resolve/main/config.json",
        "file listing": f"/api/models/{repos['a']}/revision/{sha}",
        "config.json": f"/{repos['a']}/resolve/{sha}/config.json",
        "shard": f"/{repos['a']}/resolve/{sha}/model.safetensors",
    }
    return repos, recipe, expected, paths


def cache_problems(cache: Path) -> list[str]:
    """Blobs whose content disagrees with their name, and leftover partial downloads."""
    problems = []
    for path in cache.rglob("*"):
        if path.name.endswith(".incomplete"):
            problems.append(f"partial download left: {path}")
        elif path.parent.name == "blobs" and path.is_file():
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest() if len(path.name) == 64 else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            if digest != path.name:
                problems.append(f"blob {path.name} holds content {digest}")
    return problems


def faults_on_every_endpoint(paths: dict[str, str], **fault) -> dict[str, Fault]:
    """One fault per endpoint (the shard's download and its header range read told apart by Range)."""
    where = {
        "revision lookup": dict(method="HEAD", path_contains=paths["revision lookup"]),
        "file listing": dict(method="GET", path_contains=paths["file listing"]),
        "config.json": dict(method="GET", path_contains=paths["config.json"]),
        "header range read": dict(method="GET", path_contains=paths["shard"], ranged=True),
        "shard download": dict(method="GET", path_contains=paths["shard"], ranged=False),
    }
    if "drop_after" in fault:
        del where["revision lookup"]  # a HEAD has no body to cut
    return {name: Fault(**spec, **fault, times=1) for name, spec in where.items()}


@pytest.mark.parametrize("kind", ["503", "429 with Retry-After", "dropped connection"])
def test_one_transient_fault_on_every_endpoint_is_retried_and_the_merge_is_unchanged(hub, hub_cache, family, waits, tmp_path, kind):
    repos, recipe, expected, paths = family
    fault = {"503": dict(status=503), "429 with Retry-After": dict(status=429, headers={"Retry-After": "3"}),
             "dropped connection": dict(drop_after=3)}[kind]
    faults = faults_on_every_endpoint(paths, **fault)
    for f in faults.values():
        hub.faults.add(f)
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    assert {name: f.hits for name, f in faults.items()} == dict.fromkeys(faults, 1)  # every fault fired
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == expected
    assert cache_problems(hub_cache) == []
    # (A 5xx answer closes the connection, so a pooled connection can also fail once: an extra,
    # also retried, wait may appear.)
    if kind == "429 with Retry-After":
        assert waits.count(3.0) == len(faults)  # the server's Retry-After, once per fault
    elif kind == "503":
        assert waits.count(POLICY.base_wait_s) >= len(faults) and set(waits) <= {0.5, 1.0, 2.0}  # backoff steps


def test_a_timeout_is_retried(hub, family, waits, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repos, recipe, expected, paths = family
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.3)
    stall = hub.set_delay(1.0, path_contains=paths["revision lookup"], method="HEAD", times=1)
    assert hfmerge.merge(recipe, output=tmp_path / "out", progress=False).output == tmp_path / "out"
    assert stall.hits == 1 and len(hub.requests_matching("HEAD", paths["revision lookup"])) == 2
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == expected


def test_retry_after_and_attempts_are_bounded(hub, family, waits, tmp_path):
    repos, recipe, expected, paths = family
    hub.fail_next("GET", paths["file listing"], 429, times=None, headers={"Retry-After": "3600"})
    with pytest.raises(CheckpointError) as failed:
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert len(hub.requests_matching("GET", paths["file listing"])) == POLICY.attempts
    assert waits == [POLICY.max_retry_after_s] * (POLICY.attempts - 1)
    err = str(failed.value)
    assert f"{repos['a']}@main: could not be read from the Hub: the Hub did not answer or answered with an error (HfHubHTTPError: 429" in err
    assert f"on all {POLICY.attempts} attempts; retry later" in err
    assert not (tmp_path / "out").exists()


def test_403_on_config_json_fails_at_once_saying_forbidden(hub, family, waits, tmp_path, capsys):
    repos, recipe, _, paths = family
    hub.fail_next(None, f"/{repos['a']}/resolve/", 403, times=None)
    assert main([str(recipe), "-o", str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{repos['a']}@main config.json: access forbidden (HTTP 403)" in err and "retry later" not in err
    assert len(hub.requests_matching(None, f"/{repos['a']}/")) == 1 and waits == []  # no retry
    assert not (tmp_path / "out").exists()


def test_404_on_config_json_fails_at_once_with_a_clear_message(hub, family, waits, tmp_path):
    repos, recipe, _, paths = family
    hub.fail_next(None, paths["revision lookup"], 404, times=None)
    with pytest.raises(CheckpointError) as failed:
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    err = str(failed.value)
    assert f"{repos['a']}@main config.json: not found on the Hub (HTTP 404); check the repo name, the revision and the file" in err
    assert len(hub.requests_matching(None, f"/{repos['a']}/")) == 1 and waits == []


@pytest.mark.parametrize("target, low_disk", [("shard", False), ("shard", True), ("config.json", False)],
                         ids=["shard", "shard-low-disk", "config.json (git blob id)"])
def test_corrupt_bytes_once_are_downloaded_again_and_never_kept(hub, hub_cache, family, waits, tmp_path, target, low_disk):
    repos, recipe, expected, paths = family
    corrupt = hub.corrupt_next(paths[target], times=1)
    assert hfmerge.merge(recipe, output=tmp_path / "out", low_disk=low_disk, progress=False).output == tmp_path / "out"
    assert corrupt.hits == 1
    assert [r.status for r in hub.requests_matching("GET", paths[target]) if not r.range] == [200, 200]  # downloaded again
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == expected
    assert cache_problems(hub_cache) == []


@pytest.mark.parametrize("low_disk", [False, True], ids=["cache", "low-disk"])
def test_corrupt_bytes_every_time_fail_clearly_and_leave_nothing(hub, hub_cache, family, waits, tmp_path, low_disk):
    repos, recipe, _, paths = family
    sha256 = hub.list_files(repos["a"])["model.safetensors"].sha256
    hub.corrupt_next(paths["shard"], times=None)
    with pytest.raises(CheckpointError) as failed:
        hfmerge.merge(recipe, output=tmp_path / "out", low_disk=low_disk, progress=False)
    err = str(failed.value)
    assert f"{repos['a']}@{hub.head_sha(repos['a'])} model.safetensors: downloaded twice and both copies were damaged" in err
    assert f"the Hub announces {sha256}" in err
    assert len([r for r in hub.requests_matching("GET", paths["shard"]) if not r.range]) == 2
    assert not (tmp_path / "out").exists()
    assert not list(hub_cache.glob(f"*/blobs/{sha256}*"))  # no blob, complete or partial
    assert [p for p in hub_cache.rglob("model.safetensors") if repos["a"].split("/")[1] in str(p)] == []
    assert cache_problems(hub_cache) == []
    assert not list(tmp_path.rglob("*.incomplete"))


def test_evaluating_a_hub_model_downloads_it_verified_and_retried(hub, hub_cache, t5, waits, tmp_path):
    import shutil

    import torch

    from hfmerge.evaluation.evaluate_model import load_model_for_eval
    from test_evaluation import make_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(t5.base, folder)
    make_tokenizer(append_eos=True).save_pretrained(folder)
    repo = hub.unique_repo_id("t5-eval")
    hub.create_repo_direct(repo, folder_files(folder))
    sha = hub.head_sha(repo)
    hub.faults.add(Fault(method="GET", path_contains=f"/{repo}/resolve/{sha}/model.safetensors", ranged=False, status=503))
    corrupt = hub.corrupt_next(f"/{repo}/resolve/{sha}/tokenizer.json")
    model, tokenizer = load_model_for_eval(repo, device="cpu")
    local, _ = load_model_for_eval(folder, device="cpu")
    assert corrupt.hits == 1 and POLICY.base_wait_s in waits  # the 503 was waited out, the bad tokenizer.json fetched again
    assert all(torch.equal(t, local.state_dict()[n]) for n, t in model.state_dict().items())
    assert tokenizer("w1 w2")["input_ids"] == make_tokenizer(append_eos=True)("w1 w2")["input_ids"]
    assert cache_problems(hub_cache) == []


def test_a_header_range_read_that_disagrees_with_the_verified_shard_stops_the_merge(hub, family, waits, tmp_path):
    import dataclasses

    from hfmerge.errors import CheckpointError
    from hfmerge.merging import run_merge
    from hfmerge.planning import build_plan
    from hfmerge.recipe import load_recipe

    repos, recipe, _, _ = family
    plan = build_plan(load_recipe(recipe))
    tensors = plan.models[0].tensors
    name = next(iter(tensors))
    # As if a flipped byte in the range read had changed an offset and the header still parsed.
    tensors[name] = dataclasses.replace(tensors[name], begin=tensors[name].begin + 4, end=tensors[name].end + 4)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: the downloaded file's header disagrees with the one read in the plan for tensor '{name}'"):
        run_merge(plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_server_that_ignores_range_is_read_only_up_to_the_wanted_bytes(monkeypatch):
    """A header read answered with the whole file (HTTP 200) stops reading once it has its bytes."""
    import contextlib

    import huggingface_hub.utils as hf_utils

    from hfmerge.refs import ModelRef

    body = bytes(range(256)) * 4096  # 1 MiB "shard"
    served: list[int] = []

    class Response:
        status_code = 200
        headers: dict[str, str] = {}

        def iter_bytes(self):
            for i in range(0, len(body), 1024):
                served.append(i)
                yield body[i:i + 1024]

    class Session:
        @contextlib.contextmanager
        def stream(self, method, url, **kwargs):
            assert kwargs["headers"]["Range"] == "bytes=8-2055"
            yield Response()

    monkeypatch.setattr(hf_utils, "get_session", lambda: Session())
    monkeypatch.setattr(hf_utils, "hf_raise_for_status", lambda response: None)
    data = hub_module._range_get(ModelRef("org/x", repo_id="org/x"), "base_model", "0" * 40, "model.safetensors", 8, 2055)
    assert data == body[8:2056]
    assert len(served) <= 3  # a few KB were read, not the whole file
