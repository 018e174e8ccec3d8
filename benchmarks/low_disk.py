#!/usr/bin/env python
"""Peak disk use of a merge from the Hub: the default (Hugging Face cache) against --low-disk.

Builds flan-T5-style checkpoints (base + experts, see merge_memory.py), shards them, serves them
from the project's Hub-protocol test server on 127.0.0.1 (tests/hub_server.py), and runs
``hfmerge RECIPE`` in a child process twice: once through a fresh Hugging Face cache and once
with ``--low-disk``. A thread samples the bytes on disk under the cache and the scratch
(``TMPDIR``) folders every 20 ms; the table shows the peak of each, next to the input and
output sizes.

    python benchmarks/low_disk.py                         # d_model 512, 6+6 layers, 3 experts, 50 MB shards
    python benchmarks/low_disk.py --shard-mb 20 --experts 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from merge_memory import WORK, T5Dims, build_family  # noqa: E402

MB = 2**20


def tree_bytes(*folders: Path) -> int:
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                p = Path(root) / f
                try:
                    if not p.is_symlink():
                        total += p.stat().st_size
                except FileNotFoundError:
                    pass  # deleted while walking
    return total


def shard_checkpoint(src: Path, dst: Path, shard_bytes: int) -> None:
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    save_torch_state_dict(load_file(src / "model.safetensors"), dst, max_shard_size=shard_bytes)


def run_sampled(cmd: list[str], env: dict, watch: list[Path]) -> tuple[float, int]:
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_bytes(*watch))
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    t.start()
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    finally:
        stop.set()
        t.join()
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0, max(peak, tree_bytes(*watch))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shard-mb", type=int, default=50, help="shard size of the uploaded checkpoints")
    args = ap.parse_args(argv)

    dims = T5Dims(d_model=args.d_model, d_ff=args.d_ff, layers=args.layers, heads=args.heads)
    fam = build_family(dims, args.experts)
    work = Path(tempfile.mkdtemp(prefix="low-disk-", dir=WORK))
    try:
        sharded = []
        for folder in [fam.base, *fam.experts]:
            dst = work / "inputs" / folder.name
            shard_checkpoint(folder, dst, args.shard_mb * MB)
            sharded.append(dst)
        shards_per_model = len(list(sharded[0].glob("*.safetensors")))
        largest_shard = max(p.stat().st_size for p in sharded[0].glob("*.safetensors"))

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        from hub_server import HubServer

        server = HubServer(work / "hub", port=port).start()
        repos = []
        for folder in sharded:
            repo = f"bench/{folder.name}"
            server.create_repo_direct(repo, {p.name: p for p in folder.iterdir() if p.is_file()})
            repos.append(repo)
        recipe = work / "recipe.yaml"
        models = "".join(f"  - model: {r}\n    parameters: {{weight: 1.0, density: 0.2}}\n" for r in repos[1:])
        recipe.write_text(f"merge_method: ties\nbase_model: {repos[0]}\nmodels:\n{models}dtype: float32\nmax_shard_size: {args.shard_mb}MB\n")

        rows = []
        for mode in ("cache", "low-disk"):
            cache, tmp, out = work / f"cache-{mode}", work / f"tmp-{mode}", work / f"out-{mode}"
            cache.mkdir()
            tmp.mkdir()
            env = {**os.environ, "HF_HUB_CACHE": str(cache), "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1"}
            cmd = [sys.executable, "-m", "hfmerge", str(recipe), "-o", str(out), "-q"] + (["--low-disk"] if mode == "low-disk" else [])
            wall, peak = run_sampled(cmd, env, [cache, tmp])
            rows.append((mode, wall, peak, tree_bytes(cache), tree_bytes(out)))
        server.stop()
        inputs = tree_bytes(*sharded)
        print(f"\n{len(repos)} checkpoints ({inputs / len(repos) / MB:.0f} MB each, {shards_per_model} shards of up to {largest_shard / MB:.0f} MB), TIES (density 0.2)")
        print(f"{'mode':<10} {'wall s':>7} {'peak disk (cache+scratch) MB':>30} {'left in cache MB':>17} {'output MB':>10}")
        for mode, wall, peak, left, out_bytes in rows:
            print(f"{mode:<10} {wall:>7.1f} {peak / MB:>30.0f} {left / MB:>17.0f} {out_bytes / MB:>10.0f}")
        print(f"\nlow-disk bound: one shard per input = {len(repos)} x {largest_shard / MB:.0f} MB = {len(repos) * largest_shard / MB:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
