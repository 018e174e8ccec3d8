"""Publishing fails early and never leaves a partial state (test server, real client).

- The token is checked (present, valid, write access to the namespace) before the plan is built,
  so a bad token costs seconds, not a merge: nothing is downloaded and no output is written.
- `hfmerge push DIR REPO` publishes an already written output after checking it is complete.
- A failed or interrupted push leaves the Hub as it was: no new empty repo, no new commit.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import hfmerge
from hfmerge.cli import main
from hfmerge.errors import HubAccessError, IncompleteOutputError, PublishError
from hfmerge.publish import check_push_access
from hub_fixtures import HUB_TEST_TOKEN
from hub_server import HubServer
from test_hub_read import folder_files
from test_merge import write_recipe

# huggingface_hub's own LFS PUT passes a file object as `data=`; httpx2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

OTHER_TOKEN = "hf_hfmergeOtherToken00000000000000000"


@pytest.fixture(scope="module")
def merged(t5, tmp_path_factory) -> Path:
    """A sharded merge output (index + several shards), written once for the module, offline."""
    root = tmp_path_factory.mktemp("merged")
    recipe = write_recipe(root / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    assert hfmerge.merge(recipe, output=root / "out", max_shard_size="20KB", progress=False).output == root / "out"
    assert (root / "out" / "model.safetensors.index.json").is_file()
    return root / "out"


@pytest.fixture
def folder(merged, tmp_path) -> Path:
    """A private copy of the merge output that a test may damage."""
    return Path(shutil.copytree(merged, tmp_path / "merged"))


def _use_token(monkeypatch, hub: HubServer, token: str = OTHER_TOKEN, **profile) -> str:
    hub.add_token(token, **profile)
    monkeypatch.setenv("HF_TOKEN", token)
    return token


def _hub_recipe(hub: HubServer, t5, tmp_path: Path) -> Path:
    """A recipe whose base model lives on the Hub, so a merge would download it."""
    base_repo = hub.unique_repo_id("base")
    hub.create_repo_direct(base_repo, folder_files(t5.base))
    hub.clear_requests()
    return write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=base_repo,
                        models=[{"model": p} for p in t5.finetuned[:2]])


def _assert_nothing_read_or_written(hub: HubServer, out: Path) -> None:
    assert not hub.requests_matching(path_contains="/resolve/"), "a model file was read"
    assert not hub.requests_matching(path_contains="/api/models/"), "a model was looked up"
    assert not hub.requests_matching("POST"), "something was written to the Hub"
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "an output was written"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The early auth check (hfmerge.merge and hfmerge.plan, before the plan is built)
# ----------------------------------------------------------------------------------------------


def test_missing_token_fails_before_any_model_is_read(hub, t5, tmp_path, capsys):
    recipe = _hub_recipe(hub, t5, tmp_path)
    out = tmp_path / "out"
    assert main([str(recipe), "-o", str(out), "-q", "--push-to-hub", hub.unique_repo_id("target")]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err
    _assert_nothing_read_or_written(hub, out)


def test_read_only_token_fails_fast_naming_write_access(hub, t5, tmp_path, monkeypatch):
    token = _use_token(monkeypatch, hub, role="read")
    recipe = _hub_recipe(hub, t5, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(HubAccessError) as refused:
        hfmerge.merge(recipe, output=out, push_to_hub=hub.unique_repo_id("target"), progress=False)
    err = str(refused.value)
    assert "read token" in err and "write access" in err and token not in err
    _assert_nothing_read_or_written(hub, out)
    assert len(hub.requests_matching("GET", "/api/whoami-v2")) == 1


def test_token_of_another_namespace_fails_fast_even_for_an_existing_repo(hub, t5, tmp_path, monkeypatch):
    _use_token(monkeypatch, hub, user="someone-else")
    target = hub.unique_repo_id("theirs")  # a repo of test-user
    hub.create_repo_direct(target, {"README.md": b"theirs\n"})
    before = hub.commit_history(target)
    recipe = _hub_recipe(hub, t5, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(HubAccessError) as refused:
        hfmerge.merge(recipe, output=out, push_to_hub=target, progress=False)
    err = str(refused.value)
    assert "'someone-else'" in err and "'test-user'" in err and "write access to test-user" in err
    _assert_nothing_read_or_written(hub, out)
    assert hub.commit_history(target) == before


def test_dry_run_with_push_checks_the_token_too(hub, t5, tmp_path, monkeypatch):
    _use_token(monkeypatch, hub, role="read")
    recipe = _hub_recipe(hub, t5, tmp_path)
    with pytest.raises(HubAccessError, match="write access"):
        hfmerge.plan(recipe, push_to_hub=hub.unique_repo_id("target"))


@pytest.mark.parametrize(
    ("profile", "namespace", "allowed"),
    [
        ({}, "test-user", True),
        ({"orgs": {"acme": "write"}}, "acme", True),
        ({"orgs": {"acme": "contributor"}}, "acme", True),
        ({"orgs": {"acme": "read"}}, "acme", False),
        ({"orgs": {"acme": "write"}}, "other-org", False),
        ({"role": "fineGrained", "scoped": [("user", "test-user", ["repo.content.read", "repo.write"])]}, "test-user", True),
        ({"role": "fineGrained", "scoped": [("user", "test-user", ["repo.content.read"])]}, "test-user", False),
        ({"role": "fineGrained", "orgs": {"acme": "write"}, "scoped": [("user", "test-user", ["repo.write"])]}, "acme", False),
        ({"role": "fineGrained", "scoped": [("model", "test-user/target", ["repo.write"])]}, "test-user", True),
        ({"role": "fineGrained", "scoped": [("model", "test-user/elsewhere", ["repo.write"])]}, "test-user", False),
    ],
    ids=["write-own", "org-write", "org-contributor", "org-read-role", "not-a-member", "fine-grained-user-write",
         "fine-grained-read-only", "fine-grained-other-namespace", "fine-grained-this-repo", "fine-grained-other-repo"],
)
def test_check_push_access_follows_role_orgs_and_fine_grained_scopes(hub, monkeypatch, profile, namespace, allowed):
    _use_token(monkeypatch, hub, **profile)
    repo_id = f"{namespace}/target"
    if allowed:
        assert check_push_access(repo_id).namespace == namespace
        # and the server agrees: the token can create the repo and commit to it
        assert hub.token_profile(OTHER_TOKEN).can_write(repo_id)
    else:
        with pytest.raises(HubAccessError, match="write access"):
            check_push_access(repo_id)
        assert not hub.token_profile(OTHER_TOKEN).can_write(repo_id)


def test_invalid_token_is_reported_as_invalid(hub, monkeypatch):
    hub.tokens = {HUB_TEST_TOKEN}
    monkeypatch.setenv("HF_TOKEN", "hf_notAValidToken")
    with pytest.raises(HubAccessError, match=r"invalid or expired \(HTTP 401\)") as err:
        check_push_access(hub.unique_repo_id("target"))
    assert "hf_notAValidToken" not in str(err.value)


@pytest.fixture
def quick_retries(monkeypatch):
    """The Hub retry policy with short waits, so retry tests take milliseconds."""
    from hfmerge.checkpoints import hub as hub_module

    monkeypatch.setattr(hub_module, "RETRY_POLICY", hub_module.RetryPolicy(attempts=3, base_wait_s=0.01, max_wait_s=0.01))


def test_transient_whoami_error_is_retried(hub, hf_token, quick_retries):
    hub.fail_next("GET", "/api/whoami-v2", status=503, times=1)
    assert check_push_access(hub.unique_repo_id("target")).user == hub.username
    assert len(hub.requests_matching("GET", "/api/whoami-v2")) == 2


def test_whoami_failing_every_time_is_reported_after_the_retries(hub, hf_token, quick_retries):
    hub.fail_next("GET", "/api/whoami-v2", status=503, times=None)
    with pytest.raises(HubAccessError, match="could not check the token.*retry later"):
        check_push_access(hub.unique_repo_id("target"))
    assert len(hub.requests_matching("GET", "/api/whoami-v2")) == 3


def test_offline_mode_is_reported_before_anything_is_sent(hub, hf_token, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        check_push_access(hub.unique_repo_id("target"))
    assert not hub.requests


# ----------------------------------------------------------------------------------------------
# hfmerge.push(folder, repo_id) and `hfmerge push DIR REPO`
# ----------------------------------------------------------------------------------------------


def test_push_subcommand_publishes_a_merged_folder_hash_equal(hub, hf_token, merged, capsys):
    target = hub.unique_repo_id("pushed")
    assert main(["push", str(merged), target, "-q", "--message", "Publish the average"]) == 0
    out = capsys.readouterr().out
    assert f"Pushed to {target}:" in out and "/commit/" in out
    history = hub.commit_history(target)
    assert len(history) == 2 and history[0].title == "Publish the average"  # initial commit + one upload
    remote = {path: entry.sha256 for path, entry in hub.list_files(target).items() if path != ".gitattributes"}
    local = {path: _sha256(p) for path, p in folder_files(merged).items()}
    assert remote == local
    assert sum(1 for p in local if p.endswith(".safetensors")) > 1  # the shards and their index went up together


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing_shard", "listed in model.safetensors.index.json are missing"),
        ("truncated_shard", "truncated"),
        ("temp_file", "unfinished write"),
        ("no_card", "README.md (the model card) is missing"),
        ("no_config", "config.json (the model config) is missing"),
        ("no_weights", "no model.safetensors"),
        ("cache_folder", "in a folder the Hub refuses"),
    ],
)
def test_push_refuses_an_incomplete_folder(hub, hf_token, folder, damage, expected):
    shards = sorted(folder.glob("model-*.safetensors"))
    if damage == "missing_shard":
        shards[-1].unlink()
    elif damage == "truncated_shard":
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) - 16])
    elif damage == "temp_file":
        (folder / "model-00001-of-00002.safetensors.incomplete").write_bytes(b"partial")
    elif damage == "no_card":
        (folder / "README.md").unlink()
    elif damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "no_weights":
        for p in [*shards, folder / "model.safetensors.index.json"]:
            p.unlink()
    elif damage == "cache_folder":  # upload_folder skips .cache/huggingface but refuses any other .cache/
        (folder / ".cache" / "other").mkdir(parents=True)
        (folder / ".cache" / "other" / "x.txt").write_text("x")
    target = hub.unique_repo_id("incomplete")
    with pytest.raises(IncompleteOutputError) as refused:
        hfmerge.push(folder, target)
    err = str(refused.value)
    assert "not a complete hfmerge output" in err and expected in err
    assert not hub.requests and not hub.repo_exists(target)


def test_push_refuses_an_unfinished_merge_folder(hub, hf_token, merged, tmp_path):
    tmp = Path(shutil.copytree(merged, tmp_path / ".out.hfmerge-abc123"))
    with pytest.raises(IncompleteOutputError, match="temporary folder of an unfinished merge"):
        hfmerge.push(tmp, hub.unique_repo_id("unfinished"))
    assert not hub.requests


def test_push_checks_the_token_before_uploading(hub, merged, monkeypatch):
    _use_token(monkeypatch, hub, role="read")
    target = hub.unique_repo_id("readonly")
    with pytest.raises(HubAccessError, match="write access"):
        hfmerge.push(merged, target)
    assert not hub.requests_matching("POST") and not hub.repo_exists(target)


@pytest.mark.parametrize("bad", ["org/name@main", "./folder", "a/b/c", "bad--name"])
def test_push_subcommand_rejects_a_bad_repo_id(hub, hf_token, merged, capsys, bad):
    assert main(["push", str(merged), bad]) == 1
    err = capsys.readouterr().err
    assert f"REPO_ID: {bad!r}" in err and "Hub repo id" in err
    assert not hub.requests


def test_a_bare_repo_name_goes_to_the_token_users_namespace(hub, merged, t5, tmp_path, monkeypatch):
    """As the Hub's own command line does: `name` means `<token user>/name`."""
    user = hub.unique_repo_id("u").split("/")[1].replace("-", "")
    _use_token(monkeypatch, hub, user=user, role="write")
    name = "bare-" + user
    assert hfmerge.push(merged, name).repo_id == f"{user}/{name}" and hub.repo_exists(f"{user}/{name}")
    # The same through a merge's push_to_hub.
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": m} for m in t5.finetuned[:2]])
    result = hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=name + "-2", progress=False)
    assert result.pushed.repo_id == f"{user}/{name}-2" and hub.repo_exists(f"{user}/{name}-2")


# ----------------------------------------------------------------------------------------------
# Failed and interrupted pushes leave the Hub as it was
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 403])
def test_failed_commit_on_a_new_repo_leaves_no_repo(hub, hf_token, merged, status):
    target = hub.unique_repo_id("new")
    hub.fail_commits(status, repo_id=target)
    with pytest.raises(PublishError) as failed:
        hfmerge.push(merged, target)
    err = str(failed.value)
    assert "nothing was committed" in err and "created was deleted again" in err
    assert hub.requests_matching("POST", "/api/repos/create"), "the push did create the repo first"
    assert not hub.repo_exists(target)


def test_failed_commit_after_a_merge_leaves_no_new_repo(hub, hf_token, t5, tmp_path):
    target = hub.unique_repo_id("merged-new")
    hub.fail_commits(500, repo_id=target)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    with pytest.raises(PublishError, match="nothing was committed"):
        hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=target, progress=False)
    assert not hub.repo_exists(target)
    assert (tmp_path / "out" / "README.md").is_file()  # the local output stays: push it later with `hfmerge push`


def test_failed_commit_on_an_existing_repo_leaves_it_and_its_history_unchanged(hub, hf_token, merged):
    target = hub.unique_repo_id("existing")
    hub.create_repo_direct(target, {"README.md": b"original\n"})
    history, files = hub.commit_history(target), hub.list_files(target)
    hub.fail_commits(500, repo_id=target)
    with pytest.raises(PublishError) as failed:
        hfmerge.push(merged, target)
    err = str(failed.value)
    assert "nothing was committed" in err and "deleted" not in err
    assert hub.commit_history(target) == history and hub.list_files(target) == files
    assert not hub.requests_matching("DELETE")


def test_interrupt_during_the_upload_to_a_new_repo_leaves_no_repo(hub, hf_token, merged, capsys, monkeypatch):
    from huggingface_hub import HfApi

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    target = hub.unique_repo_id("interrupted")
    assert main(["push", str(merged), target]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert hub.requests_matching("POST", "/api/repos/create") and not hub.repo_exists(target)


def test_interrupt_during_the_upload_to_an_existing_repo_keeps_it(hub, hf_token, merged, monkeypatch):
    from huggingface_hub import HfApi

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    target = hub.unique_repo_id("kept")
    hub.create_repo_direct(target, {"README.md": b"original\n"})
    history = hub.commit_history(target)
    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hfmerge.push(merged, target)
    assert hub.commit_history(target) == history
