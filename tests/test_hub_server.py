"""The Hub-protocol test server is faithful enough for the real clients.

Every test drives the real `huggingface_hub` client (or `transformers`) against `HubServer`
through HF_ENDPOINT, and checks both what the client returns and what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import time
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    save_torch_state_dict,
    snapshot_download,
)
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from hub_fixtures import CLIENT_TIMEOUT_S, HUB_TEST_TOKEN, install_client_timeout
from hub_server import HubServer, git_blob_sha1

# huggingface_hub's own LFS PUT passes a file object as `data=`; httpx2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")


def _tiny_safetensors(path: Path, seed: int = 0, n: int = 3, size: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(size, size, generator=gen) for i in range(n)}
    save_file(tensors, str(path))
    return tensors


def _model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _tiny_safetensors(folder / "model.safetensors")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- merge\n---\n# Tiny model\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden": 16}))
    return folder


# ----------------------------------------------------------------------------------------------
# Repo creation and uploads
# ----------------------------------------------------------------------------------------------


def test_create_repo_makes_initial_commit_and_409_on_existing(hub: HubServer, hf_token: str, hub_repo_id: str):
    api = HfApi()
    url = api.create_repo(hub_repo_id)
    assert url == f"{hub.url}/{hub_repo_id}"
    assert api.list_repo_files(hub_repo_id) == [".gitattributes"]
    assert len(api.list_repo_commits(hub_repo_id)) == 1

    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(hub_repo_id)
    assert err.value.response.status_code == 409
    # exist_ok swallows the 409 but still reads "url" from its body.
    assert api.create_repo(hub_repo_id, exist_ok=True) == url
    assert len(api.list_repo_commits(hub_repo_id)) == 1

    assert api.whoami()["name"] == hub.username

    # Without a namespace the repo lands under the user's name, like on the Hub.
    name = hub_repo_id.split("/")[1] + "-nons"
    assert api.create_repo(name, private=True).repo_id == f"{hub.username}/{name}"
    assert hub.get_repo(f"{hub.username}/{name}").private


def test_upload_folder_is_one_commit_with_lfs_for_weights(
    hub: HubServer, hf_token: str, hub_repo_id: str, tmp_path: Path
):
    api = HfApi()
    api.create_repo(hub_repo_id)
    before = hub.head_sha(hub_repo_id)
    folder = _model_folder(tmp_path / "model")
    hub.clear_requests()

    info = api.upload_folder(repo_id=hub_repo_id, folder_path=folder, commit_message="Add tiny model")

    commits = api.list_repo_commits(hub_repo_id)
    assert [c.commit_id for c in commits[:2]] == [info.oid, before]  # exactly one new commit
    assert len(commits) == 2 and commits[0].title == "Add tiny model"
    assert len(hub.requests_matching("POST", "/commit/")) == 1
    assert hub.requests_matching("POST", "/api/validate-yaml")
    # The weights went through the LFS dance; the PUT to the upload URL carries no auth.
    puts = hub.requests_matching("PUT", "/_lfs/upload/")
    assert len(puts) == 1 and not puts[0].has_auth and puts[0].status == 200
    assert all(HUB_TEST_TOKEN not in repr(r) for r in hub.requests)

    siblings = {s.rfilename: s for s in api.model_info(hub_repo_id, files_metadata=True).siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "model.safetensors"}
    weights = (folder / "model.safetensors").read_bytes()
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_sha1((folder / "config.json").read_bytes())
    for name in ("model.safetensors", "README.md", "config.json"):
        assert hub.read_file(hub_repo_id, name) == (folder / name).read_bytes()

    # Uploading the same folder again changes nothing: the client sends no commit at all.
    hub.clear_requests()
    again = api.upload_folder(repo_id=hub_repo_id, folder_path=folder)
    assert again.oid == info.oid and not hub.requests_matching("POST", "/commit/")


def test_multipart_lfs_upload_and_pull_request(hub: HubServer, hf_token: str, hub_repo_id: str):
    api = HfApi()
    hub.create_repo_direct(hub_repo_id, {"config.json": b"{}"})
    main_before = hub.head_sha(hub_repo_id)
    hub.multipart_chunk_size = 64 * 1024
    data = os.urandom(200 * 1024)

    info = api.upload_file(
        path_or_fileobj=data, path_in_repo="weights.bin", repo_id=hub_repo_id, create_pr=True, commit_message="PR"
    )

    assert info.pr_url == f"{hub.url}/{hub_repo_id}/discussions/1"
    assert len(hub.requests_matching("PUT", "/part/")) == 4
    assert hub.head_sha(hub_repo_id) == main_before  # a PR does not move main
    path = hf_hub_download(hub_repo_id, "weights.bin", revision="refs/pr/1")
    assert Path(path).read_bytes() == data
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(hub_repo_id, "weights.bin")


def test_commit_deletes_files_and_folders(hub: HubServer, hf_token: str, hub_repo_id: str):
    api = HfApi()
    hub.create_repo_direct(hub_repo_id, {"keep.txt": b"k", "old.txt": b"o", "dir/a.txt": b"a", "dir/b/c.txt": b"c"})
    api.create_commit(
        hub_repo_id,
        [
            CommitOperationDelete("old.txt"),
            CommitOperationDelete("dir/", is_folder=True),
            CommitOperationAdd("new.txt", b"n"),
        ],
        commit_message="Reshuffle",
    )
    assert sorted(api.list_repo_files(hub_repo_id)) == [".gitattributes", "keep.txt", "new.txt"]

    head = hub.head_sha(hub_repo_id)
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("does-not-exist.txt", hub_repo_id)
    assert hub.head_sha(hub_repo_id) == head


# ----------------------------------------------------------------------------------------------
# Downloads
# ----------------------------------------------------------------------------------------------


def test_hf_hub_download_second_call_is_a_cache_hit(hub: HubServer, hub_repo_id: str, tmp_path: Path, hub_cache: Path):
    folder = _model_folder(tmp_path / "model")
    sha = hub.create_repo_direct(hub_repo_id, {p.name: p for p in folder.iterdir()})

    first = {name: hf_hub_download(hub_repo_id, name) for name in ("model.safetensors", "config.json")}
    assert len(hub.requests_matching("GET", "/resolve/")) == 2
    for name, path in first.items():
        assert Path(path).read_bytes() == (folder / name).read_bytes()
        assert f"/snapshots/{sha}/" in path
    # Cache blobs are named by ETag: sha256 for LFS files, git-blob sha1 for regular files.
    blobs = {p.name for p in (hub_cache / f"models--{hub_repo_id.replace('/', '--')}" / "blobs").iterdir()}
    assert hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest() in blobs
    assert git_blob_sha1((folder / "config.json").read_bytes()) in blobs

    hub.clear_requests()
    second = {name: hf_hub_download(hub_repo_id, name) for name in first}
    assert second == first
    assert [r.method for r in hub.requests] == ["HEAD", "HEAD"]  # metadata only, no body again

    hub.clear_requests()
    assert hf_hub_download(hub_repo_id, "config.json", revision=sha) == first["config.json"]
    assert hub.requests == []  # a cached commit SHA needs no network at all


def test_snapshot_download_at_historical_sha(hub: HubServer, hub_repo_id: str):
    old = hub.create_repo_direct(hub_repo_id, {"a.txt": b"v1", "weights.safetensors": b"\0" * 64, "sub/x.txt": b"x"})
    new = hub.commit_direct(hub_repo_id, {"a.txt": b"v2", "b.txt": b"new"}, "v2", delete=["weights.safetensors"])
    assert new != old

    old_dir = Path(snapshot_download(hub_repo_id, revision=old))
    assert (old_dir / "a.txt").read_bytes() == b"v1"
    assert (old_dir / "weights.safetensors").read_bytes() == b"\0" * 64
    assert (old_dir / "sub" / "x.txt").read_bytes() == b"x"
    assert not (old_dir / "b.txt").exists()
    assert hub.requests_matching("GET", f"/tree/{old}")

    new_dir = Path(snapshot_download(hub_repo_id))
    assert new_dir.name == new
    assert (new_dir / "a.txt").read_bytes() == b"v2" and (new_dir / "b.txt").read_bytes() == b"new"
    assert not (new_dir / "weights.safetensors").exists()


def test_dropped_connection_is_resumed_with_range(hub: HubServer, hub_repo_id: str):
    # Bigger than one 10 MiB download chunk: the client resumes from the last whole chunk.
    chunk = 10 * 1024 * 1024
    data = os.urandom(chunk + 300 * 1024)
    hub.create_repo_direct(hub_repo_id, {"big.bin": data})
    hub.drop_connection_after(path_contains="big.bin", nbytes=chunk + 1000)

    path = hf_hub_download(hub_repo_id, "big.bin")

    assert Path(path).read_bytes() == data
    gets = hub.requests_matching("GET", "big.bin")
    assert [(r.status, r.range, r.body_bytes) for r in gets] == [
        (200, None, chunk + 1000),
        (206, f"bytes={chunk}-", len(data) - chunk),
    ]


def test_503_on_head_is_retried_but_not_on_get(hub: HubServer, hub_repo_id: str):
    hub.create_repo_direct(hub_repo_id, {"config.json": b'{"a": 1}'})
    hub.fail_next("HEAD", "config.json", 503)
    path = hf_hub_download(hub_repo_id, "config.json")
    assert Path(path).read_bytes() == b'{"a": 1}'
    assert [r.status for r in hub.requests_matching("HEAD", "config.json")] == [503, 200]

    hub.commit_direct(hub_repo_id, {"other.json": b"{}"})
    hub.fail_next("GET", "other.json", 503)
    with pytest.raises(HfHubHTTPError) as err:
        hf_hub_download(hub_repo_id, "other.json")
    assert err.value.response.status_code == 503
    assert err.value.response.headers["X-Error-Code"] == "ServiceUnavailable"


def test_resolve_headers_and_ranges(hub: HubServer, hub_repo_id: str):
    data = bytes(range(256)) * 4
    sha = hub.create_repo_direct(hub_repo_id, {"w.bin": data, "t.txt": b"hello"})
    url = f"{hub.url}/{hub_repo_id}/resolve/main/w.bin"
    with httpx2.Client(timeout=CLIENT_TIMEOUT_S) as client:
        head = client.head(url)
        assert head.status_code == 200
        assert head.headers["X-Repo-Commit"] == sha
        assert head.headers["Content-Length"] == str(len(data))
        assert head.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        text_head = client.head(f"{hub.url}/{hub_repo_id}/resolve/{sha}/t.txt")
        assert text_head.headers["ETag"] == f'"{git_blob_sha1(b"hello")}"'

        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, data[10:20])
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
        assert client.get(url, headers={"Range": "bytes=-4"}).content == data[-4:]
        assert client.get(url, headers={"Range": f"bytes=1000-{10**6}"}).content == data[1000:]
        bad = client.get(url, headers={"Range": f"bytes={len(data)}-"})
        assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"

        missing = client.head(f"{hub.url}/{hub_repo_id}/resolve/main/nope.txt")
        assert missing.status_code == 404
        assert missing.headers["X-Error-Code"] == "EntryNotFound" and missing.headers["X-Repo-Commit"] == sha
        assert missing.headers["X-Error-Message"]
        not_found = client.get(f"{hub.url}/{hub_repo_id}-nope/resolve/main/w.bin")
        assert not_found.headers["X-Error-Code"] == "RepoNotFound" and "error" in not_found.json()


def test_state_survives_a_restart(tmp_path: Path):
    """A second server on the same root serves the same commits, refs and bytes (port 0, context manager)."""
    with HubServer(tmp_path / "root") as first:
        old = first.create_repo_direct("org/model", {"w.safetensors": b"\1" * 100, "c.json": b"{}"})
        first.commit_direct("org/model", {"c.json": b'{"v": 2}'})
        first.tag("org/model", "v1", old)
        head = first.head_sha("org/model")
    with HubServer(tmp_path / "root") as second, httpx2.Client(timeout=CLIENT_TIMEOUT_S) as client:
        assert second.head_sha("org/model") == head
        answer = client.get(f"{second.url}/org/model/resolve/v1/c.json")
        assert (answer.status_code, answer.content, answer.headers["X-Repo-Commit"]) == (200, b"{}", old)
        assert client.get(f"{second.url}/org/model/resolve/{head}/w.safetensors").content == b"\1" * 100


# ----------------------------------------------------------------------------------------------
# Metadata: safetensors headers, HfFileSystem, commits, tree, refs
# ----------------------------------------------------------------------------------------------


def test_get_safetensors_metadata_single_and_sharded(hub: HubServer, hub_repo_id: str, tmp_path: Path):
    api = HfApi()
    single = tmp_path / "single"
    single.mkdir()
    _tiny_safetensors(single / "model.safetensors")
    hub.create_repo_direct(hub_repo_id, {"model.safetensors": single / "model.safetensors"})
    meta = api.get_safetensors_metadata(hub_repo_id)
    assert not meta.sharded
    assert meta.files_metadata["model.safetensors"].tensors["layer0.weight"].shape == [16, 16]
    ranged = hub.requests_matching("GET", "model.safetensors")
    assert ranged and all(r.status == 206 and r.range == "bytes=0-100000" for r in ranged)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    state = {f"block{i}.weight": torch.full((32, 32), float(i)) for i in range(4)}
    save_torch_state_dict(state, sharded, max_shard_size=5000)
    sharded_id = hub_repo_id + "-sharded"
    hub.create_repo_direct(sharded_id, {p.name: p for p in sharded.iterdir()})
    hub.clear_requests()
    meta = api.get_safetensors_metadata(sharded_id)
    assert meta.sharded and set(meta.weight_map) == set(state)
    assert len(meta.files_metadata) == len(set(meta.weight_map.values())) > 1
    single_head = hub.requests_matching("HEAD", "/model.safetensors")
    assert single_head and single_head[0].status == 404


def test_hf_file_system_reads_one_tensor_with_ranges(hub: HubServer, hub_repo_id: str, tmp_path: Path):
    local = tmp_path / "model.safetensors"
    tensors = _tiny_safetensors(local, n=4, size=128)  # 4 x 64 KiB
    sha = hub.create_repo_direct(hub_repo_id, {"model.safetensors": local})
    hub.clear_requests()

    fs = HfFileSystem(skip_instance_cache=True)
    with fs.open(f"{hub_repo_id}@{sha}/model.safetensors", "rb", block_size=4096) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        begin, end = header["layer2.weight"]["data_offsets"]
        f.seek(8 + n + begin)
        raw = f.read(end - begin)
    assert raw == tensors["layer2.weight"].numpy().tobytes()

    gets = hub.requests_matching("GET", "/resolve/")
    assert gets and all(r.status == 206 and r.range and r.range.startswith("bytes=") for r in gets)
    assert sum(r.body_bytes for r in gets) < local.stat().st_size // 2


def test_list_repo_commits_tree_paths_info_and_refs(hub: HubServer, hf_token: str, hub_repo_id: str):
    api = HfApi()
    first = hub.create_repo_direct(hub_repo_id, {"a/b/c.txt": b"c", "a/d.txt": b"d", "e.txt": b"e"}, message="one")
    second = hub.commit_direct(hub_repo_id, {"e.txt": b"e2"}, "two\n\nlonger description")
    commits = api.list_repo_commits(hub_repo_id)
    assert [c.commit_id for c in commits] == [c.sha for c in hub.commit_history(hub_repo_id)]
    assert [c.title for c in commits] == ["two", "one", "initial commit"]
    assert commits[0].message == "longer description" and commits[0].authors == [hub.username]
    hub.commits_page_size = 2  # paged with Link headers
    assert [c.commit_id for c in api.list_repo_commits(hub_repo_id)] == [c.commit_id for c in commits]
    assert len(api.list_repo_commits(hub_repo_id, revision=first)) == 2

    hub.tree_page_size = 2
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(hub_repo_id, recursive=True)}
    assert tree == {
        "a": "RepoFolder",
        "a/b": "RepoFolder",
        ".gitattributes": "RepoFile",
        "e.txt": "RepoFile",
        "a/d.txt": "RepoFile",
        "a/b/c.txt": "RepoFile",
    }
    assert len(hub.requests_matching("GET", "/tree/")) == 3
    assert {e.path for e in api.list_repo_tree(hub_repo_id, path_in_repo="a")} == {"a/b", "a/d.txt"}
    expanded = {e.path: e for e in api.list_repo_tree(hub_repo_id, recursive=True, expand=True)}
    assert expanded["e.txt"].last_commit.oid == second and expanded["a/d.txt"].last_commit.oid == first

    infos = api.get_paths_info(hub_repo_id, ["a", "e.txt", "missing.txt"], revision=first)
    assert {i.path: type(i).__name__ for i in infos} == {"a": "RepoFolder", "e.txt": "RepoFile"}

    api.create_tag(hub_repo_id, tag="v1", revision=first)
    hub.tag(hub_repo_id, "v2", second)
    api.create_branch(hub_repo_id, branch="dev", revision=first)
    refs = api.list_repo_refs(hub_repo_id)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": first, "v2": second}
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second, "dev": first}
    assert Path(hf_hub_download(hub_repo_id, "e.txt", revision="v1")).read_bytes() == b"e"
    assert api.model_info(hub_repo_id, revision="dev").sha == first


def test_dataset_repos(hub: HubServer, hf_token: str, hub_repo_id: str):
    api = HfApi()
    url = api.create_repo(hub_repo_id, repo_type="dataset")
    assert url == f"{hub.url}/datasets/{hub_repo_id}"
    api.upload_file(path_or_fileobj=b"x,y\n1,2\n", path_in_repo="data.csv", repo_id=hub_repo_id, repo_type="dataset")
    info = api.dataset_info(hub_repo_id)
    assert info.sha == hub.head_sha(hub_repo_id, repo_type="dataset")
    path = hf_hub_download(hub_repo_id, "data.csv", repo_type="dataset")
    assert Path(path).read_bytes() == b"x,y\n1,2\n"
    assert hub.requests_matching("GET", f"/datasets/{hub_repo_id}/resolve/")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_repo_id)  # same id, wrong type


# ----------------------------------------------------------------------------------------------
# Errors, auth and atomic commits
# ----------------------------------------------------------------------------------------------


def test_error_codes_map_to_client_exceptions(hub: HubServer, hub_repo_id: str, monkeypatch: pytest.MonkeyPatch):
    api = HfApi()
    hub.create_repo_direct(hub_repo_id, {"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_repo_id + "-missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_repo_id + "-missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(hub_repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(hub_repo_id, revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(hub_repo_id, "missing.json")
    assert api.file_exists(hub_repo_id, "config.json") and not api.file_exists(hub_repo_id, "missing.json")

    gated = hub_repo_id + "-gated"
    hub.create_repo_direct(gated, {"config.json": b"{}"}, gated=True)
    assert api.model_info(gated).gated == "auto"  # metadata stays readable
    with pytest.raises(GatedRepoError):
        hf_hub_download(gated, "config.json")
    with pytest.raises(GatedRepoError):
        hf_hub_download(gated, "config.json", token=HUB_TEST_TOKEN)
    hub.grant_access(gated, HUB_TEST_TOKEN)
    assert Path(hf_hub_download(gated, "config.json", token=HUB_TEST_TOKEN)).read_bytes() == b"{}"

    private = hub_repo_id + "-private"
    hub.create_repo_direct(private, {"config.json": b"{}"}, private=True)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(private)
    assert api.model_info(private, token=HUB_TEST_TOKEN).private

    hub.set_repo_flags(hub_repo_id, disabled=True)
    with pytest.raises(DisabledRepoError):
        api.model_info(hub_repo_id)
    hub.set_repo_flags(hub_repo_id, disabled=False)

    # A token the server does not know is refused outright, even on a public repo.
    hub.tokens = {HUB_TEST_TOKEN}
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(hub_repo_id)
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
    assert api.model_info(hub_repo_id, token=HUB_TEST_TOKEN).id == hub_repo_id


def test_refused_commits_leave_the_repo_unchanged(hub: HubServer, hf_token: str, hub_repo_id: str, tmp_path: Path):
    api = HfApi()
    head = hub.create_repo_direct(hub_repo_id, {"config.json": b"{}", "weights.safetensors": b"\0" * 32})
    files = hub.list_files(hub_repo_id)
    folder = _model_folder(tmp_path / "model")

    for status in (401, 403):
        hub.inject_auth_error(status)  # on the commit POST, after the LFS upload went through
        with pytest.raises(HfHubHTTPError) as err:
            api.upload_folder(repo_id=hub_repo_id, folder_path=folder)
        assert err.value.response.status_code == status
        assert hub.head_sha(hub_repo_id) == head and hub.list_files(hub_repo_id) == files

    with pytest.raises(HfHubHTTPError) as err:  # no token at all: writes need one
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=hub_repo_id, token=False)
    assert err.value.response.status_code == 401

    with pytest.raises(HfHubHTTPError) as err:  # parentCommit is no longer the head
        newer = hub.commit_direct(hub_repo_id, {"other.txt": b"o"})
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=hub_repo_id, parent_commit=head)
    assert err.value.response.status_code == 412
    assert hub.head_sha(hub_repo_id) == newer

    # One valid file plus an LFS pointer to an object never uploaded: nothing is committed.
    lines = [
        {"key": "header", "value": {"summary": "half", "description": ""}},
        {"key": "file", "value": {"path": "ok.txt", "content": base64.b64encode(b"ok").decode(), "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}},
    ]
    response = httpx2.post(
        f"{hub.url}/api/models/{hub_repo_id}/commit/main",
        content=b"".join(json.dumps(line).encode() + b"\n" for line in lines),
        headers={"Authorization": f"Bearer {hf_token}", "Content-Type": "application/x-ndjson"},
        timeout=CLIENT_TIMEOUT_S,
    )
    assert response.status_code == 422 and response.headers["X-Error-Code"] == "LfsFileNotFound"
    assert "ok.txt" not in hub.list_files(hub_repo_id) and hub.head_sha(hub_repo_id) == newer


def test_slow_answers_and_client_timeout(hub: HubServer, hub_repo_id: str):
    api = HfApi()
    hub.create_repo_direct(hub_repo_id, {"config.json": b"{}"})
    delay = hub.set_delay(0.3, path_contains=f"/api/models/{hub_repo_id}")
    start = time.monotonic()
    api.model_info(hub_repo_id)
    assert time.monotonic() - start >= 0.3
    hub.faults.remove(delay)

    # model_info passes timeout=None; the fixture's transport still bounds the call. The server
    # answers only after 5 s, so the timeout error itself shows the client gave up first; the
    # request's timeouts show which bound did it (no bound on elapsed time: a busy machine is slow).
    hub.set_delay(5, path_contains=f"/api/models/{hub_repo_id}", times=1)
    install_client_timeout(0.5)
    hub.clear_requests()
    try:
        with pytest.raises(httpx2.TimeoutException) as err:
            api.model_info(hub_repo_id)
        assert err.value.request.extensions["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), 0.5)
        assert len(hub.requests_matching("GET", f"/api/models/{hub_repo_id}")) == 1  # given up, not retried
    finally:
        install_client_timeout(CLIENT_TIMEOUT_S)


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------


def test_transformers_from_pretrained_loads_through_the_server(
    hub: HubServer, hf_token: str, hub_repo_id: str, tmp_path: Path
):
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4)
    local = transformers.T5ForConditionalGeneration(config)
    local.save_pretrained(tmp_path / "t5", max_shard_size="20KB")  # sharded: index + several files
    HfApi().create_repo(hub_repo_id)
    HfApi().upload_folder(repo_id=hub_repo_id, folder_path=tmp_path / "t5")
    hub.clear_requests()

    remote = transformers.AutoModel.from_pretrained(hub_repo_id)

    local_state, remote_state = local.state_dict(), remote.state_dict()
    shared = set(local_state) & set(remote_state)
    assert len(shared) == len(remote_state) > 10
    for name in shared:
        assert torch.equal(local_state[name], remote_state[name]), name
    head = hub.requests_matching("HEAD", "/model.safetensors")
    assert head and head[0].status == 404  # sharded: the single-file probe is an EntryNotFound
    shards = {r.path for r in hub.requests_matching("GET", "-of-")}
    assert len(shards) == len(list((tmp_path / "t5").glob("model-*.safetensors")))
