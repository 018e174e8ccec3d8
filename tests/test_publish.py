"""Publishing to the Hub (test server, real client): one commit, a model card that reads back, clear auth errors."""

from __future__ import annotations

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from safetensors.torch import load_file

import hfmerge
from hfmerge.cli import main
from hfmerge.errors import PublishError
from test_hub_read import folder_files
from test_merge import write_recipe


def test_push_round_trip_one_commit_card_and_from_pretrained(hub, hf_token, t5, tmp_path):
    base_repo = hub.unique_repo_id("base")
    hub.create_repo_direct(base_repo, folder_files(t5.base))
    target = hub.unique_repo_id("merged")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo,
                          models=[{"model": t5.finetuned[0], "parameters": {"weight": 0.5}}, {"model": t5.finetuned[1], "parameters": {"weight": 0.5}}],
                          push_to_hub=target)
    pushed = hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=True, progress=False).pushed  # the recipe's push_to_hub
    assert pushed.repo_id == target and "/commit/" in pushed.commit_url
    history = hub.commit_history(target)
    assert len(history) == 2  # the repo's initial commit, then exactly one upload commit
    assert set(hub.list_files(target)) >= {"model.safetensors", "config.json", "README.md", "hfmerge_recipe.yaml"}
    # transformers loads the pushed model through the Hub, bit-identical to the local output
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(target)
    local = load_file(tmp_path / "out" / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in local.items())
    # the card reads back with the metadata that was meant
    card = ModelCard.load(target)
    data = card.data.to_dict()
    assert data["base_model"] == [base_repo] and data["base_model_relation"] == "merge"
    assert data["tags"] == ["merge", "hfmerge", "task_arithmetic"] and data["pipeline_tag"] == "text2text-generation"
    commit = hub.head_sha(base_repo)
    assert f"{base_repo}@{commit}" in card.text and f"`{commit}`" in card.text
    # named after the repo it is published as, with the lines that load it from there
    name = target.split("/")[-1]
    assert card.text.lstrip().startswith(f"# {name}") or f"\n# {name}\n" in card.text
    assert f'AutoModelForSeq2SeqLM.from_pretrained("{target}")' in card.text and f'pipeline("text2text-generation", model="{target}")' in card.text
    from hfmerge.card import sha256_file

    assert sha256_file(tmp_path / "out" / "model.safetensors") in card.text
    assert hf_token not in card.text and hf_token not in pushed.commit_url
    # pushing a changed merge again makes a new commit
    recipe = write_recipe(tmp_path / "r2.yaml", merge_method="task_arithmetic", base_model=base_repo,
                          models=[{"model": t5.finetuned[0], "parameters": {"weight": 0.3}}, {"model": t5.finetuned[1], "parameters": {"weight": 0.7}}])
    assert hfmerge.merge(recipe, output=tmp_path / "out2", push_to_hub=target, progress=False).pushed.repo_id == target
    assert len(hub.commit_history(target)) == 3


def test_commit_refused_with_401_gives_the_login_message_and_leaves_the_repo_unchanged(hub, hf_token, t5, tmp_path):
    # The token passes the early check (whoami) but the Hub refuses the commit, e.g. because the
    # token was revoked during the merge. A missing token fails before the merge instead
    # (test_publish_safety.py).
    target = hub.unique_repo_id("locked")
    hub.create_repo_direct(target, {"README.md": b"original\n"})
    before = hub.head_sha(target)
    hub.inject_auth_error(status=401, path_contains="/commit/", times=None)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    with pytest.raises(PublishError) as failed:
        hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=target, progress=False)
    err = str(failed.value)
    assert "not authenticated (HTTP 401)" in err and "hf auth login" in err and "nothing was committed" in err
    assert hub.head_sha(target) == before and set(hub.list_files(target)) == {".gitattributes", "README.md"}


def test_push_to_hub_needs_a_repo_id(t5, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    # The command line names its flag where the library names the option.
    assert main([str(recipe), "-o", str(tmp_path / "out"), "--push-to-hub"]) == 1
    assert "--push-to-hub: needs a repo id" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_push_with_a_read_only_token_gives_the_permission_message(hub, hf_token, t5, tmp_path):
    target = hub.unique_repo_id("readonly")
    hub.create_repo_direct(target, {"README.md": b"original\n"})
    before = hub.head_sha(target)
    hub.inject_auth_error(status=403, path_contains="/commit/", times=None)
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    with pytest.raises(PublishError) as failed:
        hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=target, progress=False)
    err = str(failed.value)
    assert "permission denied (HTTP 403)" in err and "write access" in err and hf_token not in err
    assert hub.head_sha(target) == before


def test_private_creates_a_private_repo(hub, hf_token, t5, tmp_path):
    target = hub.unique_repo_id("private")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="average", base_model=t5.base, models=[{"model": p} for p in t5.finetuned[:2]])
    assert hfmerge.merge(recipe, output=tmp_path / "out", push_to_hub=target, private=True, progress=False).pushed.repo_id == target
    assert hub.get_repo(target).private is True
    assert "model.safetensors" in hub.list_files(target)
