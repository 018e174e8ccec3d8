#!/usr/bin/env python
"""The I/O floor of a merge: read its inputs and write an output of the same size.

A static merge must at least read every tensor of its input checkpoints and write the merged
model. This probe does only that, in a fresh process, with the page cache warm (every input is
read once before the timed pass), and reports the seconds the two take; `compare_mergekit.py`
runs it beside each merge and divides the merges' times by it.

* Read: each input's ``*.safetensors`` files, tensor data included, with ``readinto`` in
  chunks of 64 MiB into one reused buffer (no allocation per tensor, no conversion).
* Write: for each ``*.safetensors`` file of a reference output folder (``--like``; the output
  of the merge being measured), a file of the same size in a scratch folder: the reference's
  header, then its data size in bytes from one 64 MiB buffer of random bytes (so the same
  sharding and the same number of bytes; no ``fsync``, like the merges). The scratch files
  are removed after the timing.

It also measures start-up: the wall time of a fresh interpreter that does nothing
(``python -c pass``) and of one that imports what a merge command imports before it reads a
tensor (``--startup hfmerge`` or ``--startup mergekit``).

Usage (one JSON object on stdout)::

    python benchmarks/io_limit.py --inputs BASE EXPERT1 ... --like MERGED_OUTPUT --scratch DIR
    python benchmarks/io_limit.py --startup hfmerge
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 64 * 2**20

# What the merge command of each tool imports before its first tensor read.
STARTUP_IMPORTS = {
    "hfmerge": "import torch, yaml, tqdm, hfmerge.cli, hfmerge.merging, hfmerge.planning, hfmerge.recipe, hfmerge.methods",
    "mergekit": "import torch, mergekit.scripts.run_yaml, mergekit.merge",
}


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no safetensors files in {folder}")
    return files


def read_all(files: list[Path], buf: bytearray) -> int:
    """Read every byte of `files` into `buf`, chunk by chunk; returns the bytes read."""
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                got = f.readinto(view)
                if not got:
                    break
                total += got
    return total


def write_like(files: list[Path], scratch: Path, buf: bytearray) -> int:
    """Write, for each of `files`, a file of the same size (its header, then bytes of `buf`)."""
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = f.read(n)
        size = path.stat().st_size
        with open(scratch / path.name, "wb", buffering=0) as out:
            out.write(struct.pack("<Q", n))
            out.write(header)
            left = size - 8 - n
            while left > 0:
                step = min(left, len(view))
                out.write(view[:step])
                left -= step
        total += size
    return total


def limit(inputs: list[Path], like: Path, scratch: Path) -> dict:
    files = [f for folder in inputs for f in safetensors_files(folder)]
    out_files = safetensors_files(like)
    buf = bytearray(os.urandom(CHUNK))
    read_all(files, buf)  # warm the page cache
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        nread = read_all(files, buf)
        t1 = time.perf_counter()
        nwritten = write_like(out_files, scratch, buf)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"read_s": t1 - t0, "write_s": t2 - t1, "limit_s": t2 - t0, "read_bytes": nread, "written_bytes": nwritten,
            "input_files": len(files), "output_files": len(out_files)}


def startup(python: str, tool: str, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Wall seconds of a bare interpreter and of one importing `tool`'s merge command, in fresh processes."""
    def timed(code: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([python, "-c", code], check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    return {"interpreter_s": timed("pass"), "imports_s": timed(STARTUP_IMPORTS[tool])}


def run_limit(inputs: list[Path], like: Path, scratch: Path, python: str = sys.executable) -> dict:
    """Run the probe in a fresh process (so it starts, like a merge, with nothing allocated)."""
    cmd = [python, str(Path(__file__).resolve()), "--inputs", *map(str, inputs), "--like", str(like), "--scratch", str(scratch)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Time reading a merge's inputs and writing an output of its size (warm page cache).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--inputs", nargs="+", type=Path, help="checkpoint folders to read")
    p.add_argument("--like", type=Path, help="a merged output folder: its safetensors files give the sizes to write")
    p.add_argument("--scratch", type=Path, help="an empty folder to write into (created, then removed)")
    p.add_argument("--startup", choices=sorted(STARTUP_IMPORTS), help="measure the start-up of this tool instead (with this python)")
    args = p.parse_args(argv)
    if args.startup:
        print(json.dumps(startup(sys.executable, args.startup)))
        return 0
    if not (args.inputs and args.like and args.scratch):
        p.error("--inputs, --like and --scratch are needed")
    if args.scratch.exists():
        p.error(f"--scratch {args.scratch} exists; give a folder to create")
    print(json.dumps(limit(args.inputs, args.like, args.scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
