#!/usr/bin/env python
"""Wall time and peak memory of hfmerge's streaming merge on flan-T5-style checkpoints.

Builds a base checkpoint and N "fine-tuned" experts with the T5 v1.1 / flan-T5 layout
(gated-GELU FFN ``wi_0``/``wi_1``/``wo``, separate ``lm_head``, relative attention bias in
block 0, RMS layer norms) straight into safetensors files, tensor by tensor from seeded
generators (no torch model is instantiated, so any size can be built with little memory).
The inputs are cached under ``benchmarks/_work/`` so a rerun only merges.

Each merge runs ``python -m hfmerge`` in a fresh child process; its wall time and peak
resident set size (``ru_maxrss`` from ``os.wait4`` on that child) are reported next to
hfmerge's own estimate (``hfmerge RECIPE --dry-run --json`` field
``estimated_peak_memory_bytes``).

Examples::

    python benchmarks/merge_memory.py                      # flan-t5-base size, base + 4 experts (~1 GB each)
    python benchmarks/merge_memory.py --layers 6 --d-model 512 --d-ff 1024
    python benchmarks/merge_memory.py --layer-scaling      # 6 vs 12 layers per stack, d_model 512
    python benchmarks/merge_memory.py --repeat 3 --hfmerge-src /tmp/hfsnap   # 3 runs each, a frozen copy of hfmerge
    python benchmarks/merge_memory.py --clean              # delete benchmarks/_work
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work"
MiB = 2**20


# -- the flan-T5 layout ---------------------------------------------------------------------


@dataclass(frozen=True)
class T5Dims:
    """Sizes of a T5 v1.1 / flan-T5 model (defaults: flan-t5-base)."""

    d_model: int = 768
    d_ff: int = 2048
    layers: int = 12  # per stack: encoder and decoder each have this many blocks
    heads: int = 12
    d_kv: int = 64
    vocab: int = 32128
    buckets: int = 32

    @property
    def tag(self) -> str:
        return f"t5-d{self.d_model}-f{self.d_ff}-l{self.layers}-h{self.heads}-k{self.d_kv}-v{self.vocab}"


def t5_tensors(dims: T5Dims) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor a flan-T5 checkpoint stores, in checkpoint order.

    The names are those of transformers' ``T5ForConditionalGeneration.state_dict()`` minus
    ``encoder.embed_tokens.weight`` and ``decoder.embed_tokens.weight``, which are the same
    parameter as ``shared.weight`` and are not stored (``save_pretrained`` drops them too).
    ``lm_head.weight`` is its own tensor, as in flan-T5 checkpoints.
    """
    d, f, inner = dims.d_model, dims.d_ff, dims.heads * dims.d_kv
    out: list[tuple[str, tuple[int, ...], str]] = [("shared.weight", (dims.vocab, d), "embed")]

    def attention(prefix: str, relative_bias: bool) -> None:
        for p in ("q", "k", "v"):
            out.append((f"{prefix}.{p}.weight", (inner, d), "linear"))
        out.append((f"{prefix}.o.weight", (d, inner), "linear"))
        if relative_bias:
            out.append((f"{prefix}.relative_attention_bias.weight", (dims.buckets, dims.heads), "relbias"))

    def ffn(prefix: str) -> None:
        out.append((f"{prefix}.DenseReluDense.wi_0.weight", (f, d), "linear"))
        out.append((f"{prefix}.DenseReluDense.wi_1.weight", (f, d), "linear"))
        out.append((f"{prefix}.DenseReluDense.wo.weight", (d, f), "linear"))
        out.append((f"{prefix}.layer_norm.weight", (d,), "norm"))

    for i in range(dims.layers):
        b = f"encoder.block.{i}.layer"
        attention(f"{b}.0.SelfAttention", i == 0)
        out.append((f"{b}.0.layer_norm.weight", (d,), "norm"))
        ffn(f"{b}.1")
    out.append(("encoder.final_layer_norm.weight", (d,), "norm"))
    for i in range(dims.layers):
        b = f"decoder.block.{i}.layer"
        attention(f"{b}.0.SelfAttention", i == 0)
        out.append((f"{b}.0.layer_norm.weight", (d,), "norm"))
        attention(f"{b}.1.EncDecAttention", False)
        out.append((f"{b}.1.layer_norm.weight", (d,), "norm"))
        ffn(f"{b}.2")
    out.append(("decoder.final_layer_norm.weight", (d,), "norm"))
    out.append(("lm_head.weight", (dims.vocab, d), "embed"))
    return out


def t5_config(dims: T5Dims) -> dict:
    """config.json in the form of google/flan-t5-base's."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "d_ff": dims.d_ff,
        "d_kv": dims.d_kv,
        "d_model": dims.d_model,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "n_positions": 512,
        "num_decoder_layers": dims.layers,
        "num_heads": dims.heads,
        "num_layers": dims.layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": dims.buckets,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": dims.vocab,
    }


def param_count(dims: T5Dims) -> int:
    return sum(math.prod(s) for _, s, _ in t5_tensors(dims))


def check_layout(dims: T5Dims) -> None:
    """Check the config with transformers.T5Config and the names against the real architecture.

    The architecture is instantiated on the meta device with the same number of layers but
    tiny widths (names do not depend on widths), so no memory is used.
    """
    import transformers

    config = t5_config(dims)
    cfg = transformers.T5Config(**{k: v for k, v in config.items() if k not in ("model_type",)})
    assert cfg.num_layers == dims.layers and cfg.num_decoder_layers == dims.layers and cfg.is_gated_act
    small = dict(config, d_model=8, d_ff=16, d_kv=2, num_heads=2, vocab_size=16)
    small.pop("model_type")
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**small))
    expected = set(model.state_dict()) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    ours = [n for n, _, _ in t5_tensors(replace(dims, d_model=8, d_ff=16, d_kv=2, heads=2, vocab=16))]
    if set(ours) != expected or len(ours) != len(expected):
        raise SystemExit(f"layout mismatch with transformers: missing {sorted(expected - set(ours))[:5]}, extra {sorted(set(ours) - expected)[:5]}")
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    for n, s, _ in t5_tensors(replace(dims, d_model=8, d_ff=16, d_kv=2, heads=2, vocab=16)):
        if shapes[n] != s:
            raise SystemExit(f"layout mismatch with transformers: {n} has shape {shapes[n]} there, {s} here")


# -- writing checkpoints ---------------------------------------------------------------------


def _seed(*parts: object) -> int:
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _base_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_seed(seed, "base", name))
    x = torch.randn(shape, generator=g)
    if kind == "linear":
        return x.mul_(shape[1] ** -0.5)
    if kind == "norm":
        return x.mul_(0.05).add_(1.0)
    if kind == "relbias":
        return x.mul_(0.5)
    return x  # embeddings: unit scale


def _delta(name: str, shape: tuple[int, ...], kind: str, seed: int, expert: int, scale: float) -> torch.Tensor:
    """One expert's task vector: seeded Gaussian noise, a different magnitude per expert."""
    g = torch.Generator().manual_seed(_seed(seed, f"expert{expert}", name))
    base_std = {"linear": shape[-1] ** -0.5, "norm": 0.05, "relbias": 0.5, "embed": 1.0}[kind]
    return torch.randn(shape, generator=g).mul_(scale * base_std * (1 + 0.5 * expert))


class _StreamWriter:
    """A single-file safetensors writer: header first, then the tensors in order (float32)."""

    def __init__(self, path: Path, layout: list[tuple[str, tuple[int, ...], str]]):
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, _ in layout:
            n = math.prod(shape) * 4
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)

    def write(self, t: torch.Tensor) -> None:
        self.f.write(t.contiguous().view(-1).numpy().data)

    def close(self) -> None:
        self.f.close()


@dataclass
class Family:
    folder: Path
    base: Path
    experts: list[Path]
    dims: T5Dims
    params: int
    bytes_per_model: int


def build_family(dims: T5Dims, experts: int, *, seed: int = 0, delta_scale: float = 0.02, root: Path = WORK,
                 rebuild: bool = False, log=print) -> Family:
    """Build (or reuse from the cache) a base checkpoint and `experts` fine-tuned variants."""
    check_layout(dims)
    layout = t5_tensors(dims)
    params = param_count(dims)
    folder = root / (f"{dims.tag}-e{experts}-s{seed}" + (f"-d{delta_scale:g}" if delta_scale != 0.02 else ""))
    manifest = {"dims": asdict(dims), "experts": experts, "seed": seed, "delta_scale": delta_scale, "params": params, "version": 1}
    names = ["base"] + [f"expert{i}" for i in range(1, experts + 1)]
    fam = Family(folder, folder / "base", [folder / n for n in names[1:]], dims, params, params * 4)
    mpath = folder / "manifest.json"
    if not rebuild and mpath.is_file() and json.loads(mpath.read_text()) == manifest and all((folder / n / "model.safetensors").is_file() for n in names):
        log(f"reusing cached checkpoints in {folder}")
        return fam
    shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=root))
    log(f"building {len(names)} checkpoints of {params / 1e6:.1f}M parameters ({params * 4 / 1e9:.2f} GB each, float32) in {folder} ...")
    t0 = time.perf_counter()
    try:
        config = json.dumps(t5_config(dims), indent=2, sort_keys=True) + "\n"
        writers = []
        for n in names:
            (tmp / n).mkdir()
            (tmp / n / "config.json").write_text(config)
            writers.append(_StreamWriter(tmp / n / "model.safetensors", layout))
        for name, shape, kind in layout:
            base = _base_tensor(name, shape, kind, seed)
            writers[0].write(base)
            for e in range(1, experts + 1):
                writers[e].write(base + _delta(name, shape, kind, seed, e, delta_scale))
        for w in writers:
            w.close()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process built the same inputs meanwhile: use theirs (same seed, same bytes).
            if not (mpath.is_file() and json.loads(mpath.read_text()) == manifest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            log("  another process built the same checkpoints meanwhile; using those")
            return fam
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"  built in {time.perf_counter() - t0:.1f} s")
    return fam


# -- running a child and measuring it ---------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


@dataclass
class Measure:
    """One run of a command in a fresh child process."""

    wall_s: float
    peak_rss_bytes: int  # the child's ru_maxrss: exact high-water mark of its resident set
    cpu_s: float  # user + system CPU time of the child
    steal_pct: float  # share of the machine's CPU time stolen by the hypervisor during the run
    peak_anon_bytes: int = 0  # sampled peaks (every 50 ms) of RssAnon (allocated memory) ...
    peak_file_bytes: int = 0  # ... and RssFile (resident pages of mapped files: libraries, mmapped inputs)

    @property
    def peak_mib(self) -> float:
        return self.peak_rss_bytes / MiB

    @property
    def anon_mib(self) -> float:
        return self.peak_anon_bytes / MiB

    @property
    def file_mib(self) -> float:
        return self.peak_file_bytes / MiB

    def short(self) -> str:
        return (f"{self.wall_s:.1f} s wall, {self.cpu_s:.1f} s CPU, peak RSS {self.peak_mib:.0f} MiB "
                f"(sampled peaks: anon {self.anon_mib:.0f}, file {self.file_mib:.0f}), steal {self.steal_pct:.0f}%")


def _rss_parts(pid: int) -> tuple[int, int]:
    """(RssAnon, RssFile) of a live process in bytes, from /proc/PID/status; (0, 0) when unavailable."""
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return anon, file


def run_measured(cmd: list[str], *, log_path: Path | None = None, env: dict | None = None, cwd: Path | None = None) -> Measure:
    """Run `cmd` as a fresh child and measure it.

    The peak is the command's ``ru_maxrss`` from ``os.wait4`` (Linux: KiB), i.e. the high-water
    mark of that process alone (including any grandchildren it waited for), not of earlier
    runs. The command is started through ``_spawn.py``, a small launcher with a fresh address
    space: forked straight from this process, the command's ``ru_maxrss`` would start at this
    process's own peak, which grows as the outputs are compared. CPU time is the command's
    user + system time, which, unlike wall time, hardly depends on other load on the machine.
    While it runs, /proc/PID/status is sampled every 50 ms for the split of the resident set
    into anonymous memory (what the process allocated) and file pages (shared libraries, and
    the inputs for a tool that memory-maps them).
    """
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    r, w = os.pipe()
    try:
        steal0, total0 = _cpu_ticks()
        t0 = time.perf_counter()
        launcher = subprocess.Popen([sys.executable, "-I", "-S", str(HERE / "_spawn.py"), str(w), *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, pass_fds=(w,))
        os.close(w)
        w = -1
        with os.fdopen(r) as report:
            r = -1
            line = report.readline()
            if not line:
                launcher.wait()
                raise SystemExit(f"could not start: {' '.join(cmd)} (launcher exit {launcher.returncode})")
            pid = int(line)
            peak_anon = peak_file = 0
            while launcher.poll() is None:
                anon, file = _rss_parts(pid)
                peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            steal1, total1 = _cpu_ticks()
            result = json.loads(report.readline() or "{}")
    finally:
        for fd in (r, w):
            if fd >= 0:
                os.close(fd)
        if log_path:
            out.close()  # type: ignore[union-attr]
    if result.get("exit") != 0:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
        raise SystemExit(f"command failed (exit {result.get('exit')}): {' '.join(cmd)}\n{tail}")
    steal = 100.0 * (steal1 - steal0) / (total1 - total0) if total1 > total0 else 0.0
    return Measure(wall, result["maxrss_kib"] * 1024, result["cpu_s"], steal, peak_anon, peak_file)


@dataclass(frozen=True)
class Hfmerge:
    """How to run hfmerge: a python that has its dependencies, and optionally a source folder.

    With `src` (a folder holding the ``hfmerge`` package, e.g. ``git archive HEAD hfmerge``
    extracted somewhere) that copy is put first on PYTHONPATH, so the code measured does not
    change while the working tree is edited. Children run with the work folder as their
    current directory so that ``python -m`` does not pick up ./hfmerge by accident.
    """

    python: str = sys.executable
    src: Path | None = None

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        if self.src is not None:
            env["PYTHONPATH"] = str(self.src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def cmd(self) -> list[str]:
        return [self.python, "-m", "hfmerge"]

    def run(self, args: list[str], *, log_path: Path | None = None) -> Measure:
        WORK.mkdir(parents=True, exist_ok=True)
        return run_measured(self.cmd() + args, log_path=log_path, env=self.env, cwd=WORK)

    def estimate(self, recipe: Path) -> int:
        with tempfile.TemporaryDirectory() as d:
            js = Path(d) / "plan.json"
            subprocess.run(self.cmd() + [str(recipe), "--dry-run", "--json", str(js), "-q"], check=True, stdout=subprocess.DEVNULL, env=self.env, cwd=WORK)
            return int(json.loads(js.read_text())["estimated_peak_memory_bytes"])

    def describe(self) -> str:
        WORK.mkdir(parents=True, exist_ok=True)
        code = "import hfmerge, os; print(hfmerge.__version__, os.path.dirname(hfmerge.__file__))"
        return subprocess.run([self.python, "-c", code], check=True, capture_output=True, text=True, env=self.env, cwd=WORK).stdout.strip()


# -- recipes ---------------------------------------------------------------------------------

METHODS = {
    # label: (merge_method, global parameters, per-model parameters)
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.4}, {"weight": 1.0}),
    "ties": ("ties", {"lambda": 1.0}, {"weight": 1.0, "density": 0.2}),
    "ties (trim: model)": ("ties", {"lambda": 1.0, "trim": "model"}, {"weight": 1.0, "density": 0.2}),
    "linear": ("linear", {}, {"weight": 1.0}),
    "dare_ties": ("dare_ties", {"lambda": 1.0, "seed": 0}, {"weight": 1.0, "density": 0.5}),
}
METHOD_KEYS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "ties_model": "ties (trim: model)", "linear": "linear", "dare_ties": "dare_ties"}


def write_recipe(path: Path, fam: Family, label: str) -> Path:
    import yaml

    method, params, per_model = METHODS[label]
    recipe = {"merge_method": method}
    if method != "linear":
        recipe["base_model"] = str(fam.base)
    recipe["models"] = [{"model": str(e), "parameters": dict(per_model)} for e in fam.experts]
    if params:
        recipe["parameters"] = dict(params)
    recipe["dtype"] = "float32"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@dataclass
class Row:
    method: str
    models: str
    params: int
    wall_s: float  # shortest of the runs
    cpu_s: float  # shortest of the runs
    peak_rss_mib: float  # largest of the runs
    estimate_mib: float  # hfmerge --dry-run's estimated_peak_memory_bytes
    anon_mib: float = 0.0  # largest sampled RssAnon of the runs
    layers: int = 0
    runs: list = field(default_factory=list)  # every run: wall_s, cpu_s, peak_rss_mib, steal_pct


def merge_and_measure(fam: Family, label: str, hf: Hfmerge, *, keep: bool = False, repeat: int = 1, log=print) -> Row:
    """Merge `repeat` times, each in a fresh process: the shortest wall and CPU times and the largest peak RSS."""
    runs = WORK / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    slug = label.replace(" ", "").replace("(", "-").replace(")", "").replace(":", "")
    recipe = write_recipe(runs / f"{fam.dims.tag}-{slug}.yaml", fam, label)
    out = runs / f"out-{fam.dims.tag}-{slug}"
    shutil.rmtree(out, ignore_errors=True)
    estimate = hf.estimate(recipe)
    measures: list[Measure] = []
    for i in range(repeat):
        log(f"merging: {label} ({len(fam.experts)} experts + base, {fam.params / 1e6:.0f}M params)" + (f", run {i + 1}/{repeat}" if repeat > 1 else "") + " ...")
        shutil.rmtree(out, ignore_errors=True)
        m = hf.run([str(recipe), "--output", str(out), "-q"], log_path=runs / f"{out.name}.log")
        log(f"  {m.short()} (estimate {estimate / MiB:.0f} MiB)")
        measures.append(m)
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    n_inputs = len(fam.experts) + (0 if METHODS[label][0] == "linear" else 1)
    models = f"{len(fam.experts)} experts" + (" + base" if n_inputs > len(fam.experts) else "")
    return Row(label, models, fam.params, min(m.wall_s for m in measures), min(m.cpu_s for m in measures), max(m.peak_mib for m in measures),
               estimate / MiB, max(m.anon_mib for m in measures), fam.dims.layers,
               [{"wall_s": round(m.wall_s, 2), "cpu_s": round(m.cpu_s, 2), "peak_rss_mib": round(m.peak_mib), "peak_anon_mib": round(m.anon_mib),
                 "peak_file_mib": round(m.file_mib), "steal_pct": round(m.steal_pct, 1)} for m in measures])


def print_table(head: list[str], rows: list[list[str]]) -> None:
    lines = [head] + rows
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    for j, line in enumerate(lines):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _walls(r: Row) -> str:
    return " / ".join(f"{x['wall_s']:.1f}" for x in r.runs)


def _steal(r: Row) -> str:
    return f"{min(x['steal_pct'] for x in r.runs):.0f}-{max(x['steal_pct'] for x in r.runs):.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Measure wall time and peak RSS of hfmerge merges on random flan-T5-style checkpoints (float32).",
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layers", type=int, help="blocks per stack (encoder and decoder); default 12, or N=6 with --layer-scaling")
    p.add_argument("--d-model", type=int, help="model width; default 768 (flan-t5-base), 512 with --layer-scaling")
    p.add_argument("--d-ff", type=int, help="FFN width; default 2048 (flan-t5-base), 1024 with --layer-scaling")
    p.add_argument("--heads", type=int, help="attention heads (d_kv is 64); default 12, 8 with --layer-scaling")
    p.add_argument("--vocab", type=int, default=32128, help="vocabulary size (default 32128, flan-T5's)")
    p.add_argument("--experts", type=int, default=4, help="number of fine-tuned models besides the base (default 4)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHOD_KEYS), help="methods to run (default: task_arithmetic ties ties_model; "
                   "task_arithmetic ties with --layer-scaling)")
    p.add_argument("--layer-scaling", action="store_true", help="merge models with N and 2N layers (same tensor sizes) and report the peak-RSS ratio")
    p.add_argument("--seed", type=int, default=0, help="seed of the random checkpoints")
    p.add_argument("--hfmerge-python", default=sys.executable, help="python that has hfmerge and its dependencies installed (default: this one)")
    p.add_argument("--hfmerge-src", type=Path, help="folder holding the hfmerge package to measure, put first on PYTHONPATH "
                   "(e.g. a `git archive HEAD hfmerge | tar -x -C DIR` snapshot); default: the installed hfmerge")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached checkpoints")
    p.add_argument("--keep-outputs", action="store_true", help="keep merged models under benchmarks/_work/runs")
    p.add_argument("--repeat", type=int, default=1, help="merges per method, each in a fresh process; the table shows the shortest "
                   "wall time and the largest peak RSS (default 1)")
    p.add_argument("--json-out", metavar="PATH", help="also write the measurements as JSON")
    p.add_argument("--clean", action="store_true", help="delete benchmarks/_work (cached checkpoints and outputs) and exit")
    args = p.parse_args(argv)

    if args.clean:
        shutil.rmtree(WORK, ignore_errors=True)
        print(f"removed {WORK}")
        return 0
    scaling = args.layer_scaling
    dims = T5Dims(
        d_model=args.d_model or (512 if scaling else 768),
        d_ff=args.d_ff or (1024 if scaling else 2048),
        layers=args.layers or (6 if scaling else 12),
        heads=args.heads or (8 if scaling else 12),
        vocab=args.vocab,
    )
    methods = [METHOD_KEYS[m] for m in (args.methods or (["task_arithmetic", "ties"] if scaling else ["task_arithmetic", "ties", "ties_model"]))]
    hf = Hfmerge(args.hfmerge_python, args.hfmerge_src.resolve() if args.hfmerge_src else None)
    print(f"hfmerge {hf.describe()}; torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    rows: list[Row] = []
    if not scaling:
        fam = build_family(dims, args.experts, seed=args.seed, rebuild=args.rebuild)
        for label in methods:
            rows.append(merge_and_measure(fam, label, hf, keep=args.keep_outputs, repeat=args.repeat))
        print()
        print(f"flan-T5 layout, d_model {dims.d_model}, d_ff {dims.d_ff}, {dims.layers}+{dims.layers} layers, vocab {dims.vocab}, "
              f"float32, {fam.bytes_per_model / 1e9:.2f} GB per checkpoint")
        print_table(["method", "models", "params", "wall s (min)", "CPU s (min)", "peak RSS MiB (max)", "of which anon MiB", "hfmerge estimate MiB", "wall s, every run", "steal %"],
                    [[r.method, r.models, f"{r.params / 1e6:.1f}M", f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}", f"{r.peak_rss_mib:.0f}", f"{r.anon_mib:.0f}", f"{r.estimate_mib:.0f}",
                      _walls(r), _steal(r)] for r in rows])
    else:
        small, large = dims, replace(dims, layers=2 * dims.layers)
        fams = [build_family(d, args.experts, seed=args.seed, rebuild=args.rebuild) for d in (small, large)]
        for label in methods:
            for fam in fams:
                rows.append(merge_and_measure(fam, label, hf, keep=args.keep_outputs, repeat=args.repeat))
        print()
        print(f"Layer scaling: d_model {dims.d_model}, d_ff {dims.d_ff}, vocab {dims.vocab}, {args.experts} experts + base, float32")
        table = []
        ratios = []
        for label in methods:
            a, b = [r for r in rows if r.method == label]
            for r in (a, b):
                table.append([label, str(r.layers), f"{r.params / 1e6:.1f}M", f"{r.params * 4 / 1e9:.2f}", f"{r.wall_s:.1f}", f"{r.cpu_s:.1f}",
                              f"{r.peak_rss_mib:.0f}", f"{r.estimate_mib:.0f}", _steal(r)])
            ratios.append((label, b.peak_rss_mib / a.peak_rss_mib, b.params / a.params))
        print_table(["method", "layers/stack", "params", "GB/model", "wall s (min)", "CPU s (min)", "peak RSS MiB (max)", "hfmerge estimate MiB", "steal %"], table)
        print()
        ok = True
        for label, ratio, pratio in ratios:
            verdict = "OK (< 1.10)" if ratio < 1.10 else "ABOVE the 1.10 goal"
            ok &= ratio < 1.10
            print(f"{label}: {2 * dims.layers} vs {dims.layers} layers: parameters x{pratio:.2f}, peak RSS x{ratio:.3f}  {verdict}")
        if not ok:
            print("peak RSS grew by 10% or more when doubling the layers")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
