"""The output never destroys an input; a failing disk leaves nothing behind and says so in one line.

Covers: outputs that are, contain or lie inside an input (refused before anything is read,
with or without --overwrite, through symlinks too); full, read-only or forbidden disks
(simulated by making the OS call fail with that errno, since the tests run as root, and once
for real with a file-size limit); temporary folders of killed runs removed by the next run;
the umask applied to the output; atomic Fisher cache writes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import hfmerge
from hfmerge import merging as merge_module
from hfmerge import planning as planning_module
from hfmerge import fileio
from hfmerge.checkpoints import writer as writer_module
from hfmerge.cli import main
from hfmerge.errors import OutputIsInputError, OutputWriteError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.testing import load_base_state


TEMP_MARK = ".hfmerge-"


# -- a workspace of inputs ------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file (bytes), folder and link under `roots`, to compare before and after."""
    state: dict[str, bytes | None] = {}
    for root in roots:
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                state[str(p)] = None if p.is_dir() or p.is_symlink() else p.read_bytes()
    return state


@pytest.fixture
def work(t5, tmp_path) -> dict[str, Path]:
    """Base, two fine-tunes, Fisher files, task data and recipes, each in its own folder."""
    root = tmp_path / "work"
    models = root / "models"
    base = Path(shutil.copytree(t5.base, models / "base"))
    fts = [Path(shutil.copytree(src, models / f"ft{i}")) for i, src in enumerate(t5.finetuned[:2])]
    fishers = root / "fishers"
    fishers.mkdir(parents=True)
    state = load_base_state(base)
    fisher_files = []
    for i in range(2):
        path = fishers / f"f{i}.safetensors"
        save_file({k: v.float().abs() + 1e-3 for k, v in state.items() if v.is_floating_point()}, str(path))
        fisher_files.append(path)
    data = root / "data"
    data.mkdir()
    rows = [{"text": f"w{i}", "label": i % 2} for i in range(4)]
    (data / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipes = root / "recipes"
    recipes.mkdir()
    tasks = [{"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data / "val.jsonl")}},
              "validation_split": "validation", "doc_to_text": "{{text}}", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"}
             for name in ("ta", "tb")]
    full = recipes / "fisher.yaml"
    full.write_text(yaml.safe_dump({"merge_method": "fisher", "base_model": str(base),
                                    "models": [{"model": str(ft), "fisher": str(f)} for ft, f in zip(fts, fisher_files)], "tasks": tasks}))
    simple = recipes / "ta.yaml"
    simple.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(base),
                                      "models": [{"model": str(ft)} for ft in fts], "parameters": {"lambda": 0.5}, "max_shard_size": "8KB"}))
    return {"root": root, "models": models, "base": base, "ft0": fts[0], "ft1": fts[1], "fishers": fishers, "fisher0": fisher_files[0],
            "data": data, "data_file": data / "val.jsonl", "full": full, "simple": simple, "out": tmp_path / "out"}


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def temp_siblings(output: Path) -> list[Path]:
    return sorted(p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}{TEMP_MARK}"))


def one_line_error(capsys) -> str:
    """What the command printed: one line, no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def one_line(exc: BaseException) -> str:
    """A library error's message, which must be one line."""
    err = str(exc)
    assert err and len(err.splitlines()) == 1, err
    return err


# -- 1. the output may not be, contain or lie inside an input -------------------------------------

# target, the text naming the input's field in the refusal
OUTPUT_CASES = {
    "a model folder": (lambda w: w["ft0"], "models[0].model"),
    "the folder holding the models": (lambda w: w["models"], "base_model"),
    "a folder inside a model folder": (lambda w: w["ft0"] / "sub", "models[0].model"),
    "a Fisher file's folder": (lambda w: w["fishers"], "models[0].fisher"),
    "the task data folder": (lambda w: w["data"], "tasks[0].dataset_kwargs.data_files"),
    "a folder inside the Hugging Face cache": (lambda w: hub_cache() / "merged", "HF_HUB_CACHE"),
    "the recipe's folder": (lambda w: w["full"].parent, "the recipe file"),
}


@pytest.mark.parametrize("how", ["plain", "overwrite", "symlink"])
@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused_before_anything_is_read(work, tmp_path, monkeypatch, case, how):
    target, field = OUTPUT_CASES[case]
    output = target(work)
    if how == "symlink":
        # Reached through a link: the link itself, or a linked parent when the target is new.
        link = tmp_path / "link"
        if output.exists():
            link.symlink_to(output, target_is_directory=True)
            output = link
        else:
            link.symlink_to(output.parent, target_is_directory=True)
            output = link / output.name
    watched = [work["root"], hub_cache()]
    before = snapshot(*watched)
    existed = os.path.lexists(output)
    # Refused before any reading: building the plan would be a bug.
    monkeypatch.setattr(planning_module, "build_plan", lambda *a, **k: pytest.fail("the plan was built"))
    with pytest.raises(OutputIsInputError) as refused:
        hfmerge.merge(work["full"], output=output, overwrite=how != "plain", evaluate=False, progress=False)
    err = one_line(refused.value)
    assert str(output) in err and field in err, err
    assert snapshot(*watched) == before  # every input byte-identical, nothing added
    assert os.path.lexists(output) == existed
    assert not any(p.name.startswith("." + output.name) for p in output.parent.iterdir()) if output.parent.exists() else True


def test_the_command_prints_an_output_inside_an_input_as_one_line_and_fails(work, capsys, monkeypatch):
    monkeypatch.setattr(planning_module, "build_plan", lambda *a, **k: pytest.fail("the plan was built"))
    assert main([str(work["full"]), "-o", str(work["ft0"]), "-q", "--no-eval", "--overwrite"]) == 1
    err = one_line_error(capsys)
    assert err.startswith("error: ") and str(work["ft0"]) in err and "models[0].model" in err, err


def test_a_library_merge_refuses_an_output_inside_an_input_too(work):
    from hfmerge.errors import OutputIsInputError

    plan = build_plan(load_recipe(work["simple"]))
    before = snapshot(work["root"])
    with pytest.raises(OutputIsInputError, match="models\\[1\\].model"):
        merge_module.run_merge(plan, work["ft1"], overwrite=True, progress=False)
    assert snapshot(work["root"]) == before


def test_json_and_copy_targets_may_not_replace_an_input(work, capsys):
    before = snapshot(work["root"])
    # the merge command's --json (also with --dry-run)
    assert main([str(work["full"]), "--dry-run", "-q", "--json", str(work["data_file"])]) == 1
    assert "tasks[0].dataset_kwargs.data_files" in one_line_error(capsys)
    assert main([str(work["simple"]), "-o", str(work["out"]), "-q", "--json", str(work["simple"])]) == 1
    assert "--json file" in one_line_error(capsys)
    # hfmerge eval --json
    assert main(["eval", str(work["full"]), "--model", str(work["ft0"]), "-q", "--json", str(work["ft0"] / "config.json")]) == 1
    assert "--model" in one_line_error(capsys)
    # hfmerge fisher --json / --copy-to
    assert main(["fisher", str(work["full"]), "-q", "--json", str(work["fisher0"])]) == 1
    assert "models[0].fisher" in one_line_error(capsys)
    assert main(["fisher", str(work["full"]), "-q", "--copy-to", str(work["ft1"])]) == 1
    assert "models[1].model" in one_line_error(capsys)
    assert main(["fisher", str(work["full"]), "-q", "--copy-to", str(work["fishers"])]) == 1
    assert "models[0].fisher" in one_line_error(capsys)
    assert snapshot(work["root"]) == before
    assert not work["out"].exists()


def test_an_output_beside_the_inputs_is_fine(work):
    out = work["models"] / "merged"  # a sibling of the model folders, inside none of them
    assert hfmerge.merge(work["simple"], output=out, progress=False).output == out
    assert (out / "config.json").is_file() and not temp_siblings(out)


# -- 2. full, read-only or forbidden disks --------------------------------------------------------


def assert_clean_failure(refused: pytest.ExceptionInfo, out: Path, *words: str) -> str:
    err = one_line(refused.value)
    assert str(out) in err, err
    for w in words:
        assert w in err, err
    assert not os.path.lexists(out)
    assert not temp_siblings(out)
    return err


class FailingFile:
    """A file object whose second write fails with `code` (the header went through)."""

    def __init__(self, real, code: int):
        self.real, self.code, self.writes = real, code, 0

    def write(self, data):
        self.writes += 1
        if self.writes > 2:
            raise OSError(self.code, os.strerror(self.code))
        return self.real.write(data)

    def close(self):
        self.real.close()


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, ["no space left", "needs", "free there"]),
    (errno.EDQUOT, ["quota", "needs"]),
    (errno.EFBIG, ["file too large", "max_shard_size"]),
    (errno.EROFS, ["read-only"]),
    (errno.EACCES, ["permission denied"]),
    (errno.EPERM, ["permission denied"]),
])
def test_a_shard_write_that_fails_gives_one_line_and_leaves_nothing(work, monkeypatch, code, words):
    real_open = open
    monkeypatch.setattr(writer_module, "open", lambda path, mode="r": FailingFile(real_open(path, mode), code), raising=False)
    with pytest.raises(OutputWriteError) as refused:
        hfmerge.merge(work["simple"], output=work["out"], progress=False)
    err = assert_clean_failure(refused, work["out"], *words)
    assert ".hfmerge-" not in err  # the folder the user asked for, not the temporary one


def test_a_temporary_folder_that_cannot_be_created_is_one_line(work, monkeypatch):
    def read_only(prefix="", dir=None, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(merge_module.tempfile, "mkdtemp", read_only)
    with pytest.raises(OutputWriteError) as refused:
        hfmerge.merge(work["simple"], output=work["out"], progress=False)
    assert_clean_failure(refused, work["out"], "read-only")


def test_a_side_file_copy_and_the_final_rename_that_fail_leave_nothing(work, monkeypatch):
    def full_copy(src, dst, **kwargs):
        err = OSError(errno.ENOSPC, "No space left on device")
        err.filename, err.filename2 = str(src), str(dst)
        raise err

    with monkeypatch.context() as m:
        m.setattr(merge_module.shutil, "copyfile", full_copy)
        with pytest.raises(OutputWriteError) as refused:
            hfmerge.merge(work["simple"], output=work["out"], progress=False)
    assert_clean_failure(refused, work["out"], "config.json", "no space left")

    def forbidden(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src), None, str(dst))

    with monkeypatch.context() as m:
        m.setattr(merge_module.os, "rename", forbidden)
        with pytest.raises(OutputWriteError) as refused:
            hfmerge.merge(work["simple"], output=work["out"], progress=False)
    assert_clean_failure(refused, work["out"], "permission denied")


def test_too_little_free_space_is_refused_up_front_with_the_numbers(work, monkeypatch):
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 100, 100))
    monkeypatch.setattr(merge_module.TensorMerger, "merge", lambda self, t: pytest.fail("merging started"))
    with pytest.raises(OutputWriteError) as refused:
        hfmerge.merge(work["simple"], output=work["out"], progress=False)
    err = assert_clean_failure(refused, work["out"], "not enough space", "100 B is free")
    assert "needs" in err


def test_a_real_file_size_limit_fails_cleanly_end_to_end(work, tmp_path):
    """A process whose file-size limit is below the model size (RLIMIT_FSIZE; EFBIG once
    SIGXFSZ is ignored): the write really fails in the kernel."""
    limit = max((work["base"] / "model.safetensors").stat().st_size // 2, 4096)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from hfmerge.cli import main
        sys.exit(main([{str(work['simple'])!r}, "-o", {str(work['out'])!r}, "-q", "--max-shard-size", "1GB"]))
    """)
    env = dict(os.environ, HFMERGE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(work["out"]) in err and "file too large" in err
    assert not work["out"].exists() and not temp_siblings(work["out"])


# -- 3. temporary folders of killed runs -----------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_temp(output: Path, name: str, owner: dict | None) -> Path:
    folder = output.parent / f".{output.name}.hfmerge-{name}"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
    if owner is not None:
        (folder / ".hfmerge-owner.json").write_text(json.dumps(owner))
    return folder


def test_stale_temporary_folders_are_removed_and_others_left(work, caplog):
    out = work["out"]
    host = socket.gethostname()
    stale = fake_temp(out, "dead1234", {"pid": dead_pid(), "host": host, "started": None})
    reused = fake_temp(out, "reused12", {"pid": os.getpid(), "host": host, "started": "0"})  # our pid, another process's start
    live = fake_temp(out, "live1234", {"pid": os.getpid(), "host": host, "started": None})
    remote = fake_temp(out, "remote12", {"pid": dead_pid(), "host": host + "-elsewhere", "started": None})
    unknown = fake_temp(out, "unknown1", None)
    search = out.parent / f".{out.name}.hfmerge-search"
    search.mkdir()
    with caplog.at_level(logging.INFO, logger="hfmerge.merging"):
        merge_module.run_merge(build_plan(load_recipe(work["simple"])), out, progress=False)
    assert not stale.exists() and not reused.exists()
    assert live.exists() and remote.exists() and unknown.exists() and search.is_dir()
    lines = [r.getMessage() for r in caplog.records if "temporary folder" in r.getMessage()]
    assert len(lines) == 1 and stale.name in lines[0] and reused.name in lines[0] and live.name not in lines[0]
    assert (out / "config.json").is_file() and not (out / ".hfmerge-owner.json").exists()


def test_a_run_killed_mid_merge_is_cleaned_up_by_the_next_run(work):
    out = work["out"]
    script = textwrap.dedent(f"""
        import os, signal, sys
        from hfmerge.checkpoints import writer
        real = writer.ShardedSafetensorsWriter.write
        def write(self, name, tensor):
            real(self, name, tensor)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after the first tensor is on disk
        writer.ShardedSafetensorsWriter.write = write
        import hfmerge
        hfmerge.merge({str(work['simple'])!r}, output={str(out)!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = temp_siblings(out)
    assert len(left) == 1 and not out.exists()
    assert hfmerge.merge(work["simple"], output=out, progress=False).output == out
    assert not temp_siblings(out) and (out / "model.safetensors.index.json").is_file()


def test_an_old_output_left_in_a_backup_by_a_killed_overwrite_is_put_back(work):
    out = work["out"]
    backup = fake_temp(out, "old-dead5678", {"pid": dead_pid(), "host": socket.gethostname(), "started": None})
    (backup / "old").mkdir()
    (backup / "old" / "mine.txt").write_text("the previous output")
    with pytest.raises(Exception, match="already exists"):  # it is back, so --overwrite is needed
        merge_module.run_merge(build_plan(load_recipe(work["simple"])), out, progress=False)
    assert (out / "mine.txt").read_text() == "the previous output" and not backup.exists()


# -- 4. the umask decides the output's mode ---------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_output_folder_and_files_get_the_umask_mode(work, umask):
    previous = os.umask(umask)
    try:
        assert hfmerge.merge(work["simple"], output=work["out"], progress=False).output == work["out"]
        from hfmerge.fisher.cache import save_fisher

        fisher = save_fisher(work["root"] / "cache" / "k.safetensors", {"w": torch.ones(3)}, {})
    finally:
        os.umask(previous)
    assert work["out"].stat().st_mode & 0o777 == 0o777 & ~umask
    for f in work["out"].iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert fisher.stat().st_mode & 0o777 == 0o666 & ~umask


# -- 5. the Fisher cache is never left half-written ----------------------------------------------


def test_a_fisher_cache_write_killed_midway_leaves_no_entry(tmp_path):
    from hfmerge.fisher.cache import cached_path, lookup

    root = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import safetensors.torch, torch
        def half_then_killed(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        safetensors.torch.save_file = half_then_killed
        from hfmerge.fisher.cache import cached_path, save_fisher
        save_fisher(cached_path("k" * 64, Path({str(root)!r})), {{"w": torch.ones(1000)}}, {{"cache_key": "k" * 64}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not cached_path("k" * 64, root).exists()
    assert lookup("k" * 64, root=root) is None
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in root.iterdir())  # only the hidden temporary file


def test_a_fisher_cache_write_on_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from hfmerge.errors import HfMergeError
    from hfmerge.fisher.cache import cached_path, save_fisher

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = cached_path("a" * 64, tmp_path / "cache")
    with pytest.raises(HfMergeError, match="no space left.*HFMERGE_CACHE"):
        save_fisher(target, {"w": torch.ones(3)}, {})
    assert list(target.parent.iterdir()) == []


def test_a_json_report_that_cannot_be_written_is_one_line_and_never_half_written(work, tmp_path, capsys, monkeypatch):
    report = tmp_path / "reports" / "plan.json"
    # The report's folder does not exist: one line naming the path, no traceback.
    assert main([str(work["simple"]), "--dry-run", "--json", str(report), "-q"]) == 1
    err = one_line_error(capsys)
    assert str(report) in err
    # A full disk mid-write: an existing report stays whole, no temporary file is left.
    report.parent.mkdir()
    report.write_text('{"old": true}\n')

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert main([str(work["simple"]), "--dry-run", "--json", str(report), "-q"]) == 1
    monkeypatch.undo()
    err = one_line_error(capsys)
    assert str(report) in err and "no space left" in err
    assert report.read_text() == '{"old": true}\n' and sorted(p.name for p in report.parent.iterdir()) == ["plan.json"]
