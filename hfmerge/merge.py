"""Run a plan: stream every tensor position through the method into the shard writer.

Memory stays bounded by the tensors of one position times the number of models. The output
is written into a temporary folder beside the target and renamed into place only when
complete; on any failure the temporary folder is removed and the target is untouched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm.auto import tqdm

from . import __version__
from .checkpoints.reader import TORCH_DTYPES
from .checkpoints.writer import ShardedSafetensorsWriter
from .errors import HfMergeError, IncompatibleCheckpointsError, NonFiniteTensorError, OutputExistsError
from .plan import MergePlan, TensorPlan

logger = logging.getLogger(__name__)

# Files copied from the config source and the tokenizer source when present.
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "spiece.model",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json",
)
RECIPE_FILE = "hfmerge_recipe.yaml"
_TORCH_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    warnings: list[str]
    evaluation: Any = None  # EvalReport when the recipe has tasks and evaluation ran


def dare_seed(seed: int, alias_key: str, model_index: int) -> int:
    """The seed of one model's random mask on one tensor: independent of processing order, and
    the same for tied aliases so that they stay identical."""
    digest = hashlib.blake2b(f"{seed}\0{alias_key}\0{model_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TensorMerger:
    """Turns one planned tensor position into its merged tensor (reads, checks, calls the method)."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.recipe = plan.recipe
        self.method = plan.recipe.method
        self.warnings: list[str] = []
        self.fisher_norms: list[float] | None = None
        self.thresholds: list[float] | None = None
        self._node_fishers: list[dict[str, torch.Tensor]] | None = None

    def _float(self, tensor: torch.Tensor, label: str, name: str) -> torch.Tensor:
        t = tensor.to(torch.float32)
        if not bool(torch.isfinite(t).all()):
            msg = f"{label}: tensor {name!r} contains NaN or Inf values"
            if not self.recipe.allow_nonfinite:
                raise NonFiniteTensorError(msg + "; the checkpoint is damaged. Set `allow_nonfinite: true` in the recipe to merge it anyway")
            self.warnings.append(msg)
        return t

    def read_inputs(self, t: TensorPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        plan = self.plan
        base = self._float(plan.base.read(t.base_source), plan.base.label, t.base_source) if plan.base is not None and t.base_source else None
        tensors = [self._float(m.read(src), m.label, src) for m, src in zip(plan.models, t.sources)]
        return base, tensors

    def params_for(self, t: TensorPlan) -> dict:
        recipe = self.recipe
        params = dict(recipe.parameters)
        for p in self.method.per_model:
            params[p.name] = [recipe.model_param(m, p.name, t.name, t.depth) for m in recipe.models]
        return params

    def merge(self, t: TensorPlan) -> torch.Tensor:
        out_dtype = TORCH_DTYPES[t.out_dtype]
        if not t.merge:
            return self._copy_unmergeable(t)
        base, tensors = self.read_inputs(t)
        kwargs = self.params_for(t)
        if self.method.needs_importance:
            kwargs["importances"] = self.importances(t)
            if self.fisher_norms is not None:
                kwargs["fisher_norms"] = self.fisher_norms
        if self.method.random:
            seed = int(self.recipe.parameters.get("seed", 0))
            kwargs["generators"] = [torch.Generator().manual_seed(dare_seed(seed, t.alias_key, i)) for i in range(len(tensors))]
        if self.thresholds is not None:
            kwargs["thresholds"] = self.thresholds
        merged = self.method.func(base, tensors, **kwargs)
        return merged.to(out_dtype)

    def importances(self, t: TensorPlan) -> list[torch.Tensor] | None:
        """Per model, the importance of every entry of `t` (None: the method runs without)."""
        plan = self.plan
        if plan.fishers is None:
            if self.method.importance_optional:
                return None
            raise HfMergeError(f"{self.recipe.source}: merge_method {self.method.name!r} needs the models' Fishers; compute them first (hfmerge fisher)")
        if self.method.importance == "nodes":
            if self._node_fishers is None:
                from safetensors.torch import load_file

                self._node_fishers = [load_file(str(f.path)) for f in plan.fishers]
            return [plan.node_layout.importance(nf, t.name, t.shape) for nf in self._node_fishers]
        return [self._float(f.read(src), f.label, src) for f, src in zip(plan.fishers, t.fisher_sources)]  # type: ignore[arg-type]

    def _copy_unmergeable(self, t: TensorPlan) -> torch.Tensor:
        ref = self.plan.reference
        value = ref.read(t.base_source or t.sources[0])
        for m, src in zip(self.plan.models, t.sources):
            if not torch.equal(m.read(src), value):
                raise IncompatibleCheckpointsError(
                    f"tensor {t.name!r} has dtype {value.dtype} (not floating point) and differs between {ref.label} and {m.label}; "
                    "it cannot be merged. Check that these models are fine-tunes of one checkpoint"
                )
        return value

    # -- whole-model pre-passes ------------------------------------------------------------

    def prepare(self, progress: bool) -> None:
        """Compute what needs the whole model before the per-tensor merge (Fisher norms, global TIES thresholds)."""
        if self.method.needs_importance and self.recipe.parameters.get("normalize_fishers") and self.method.importance == "diagonal":
            sq = [0.0] * len(self.plan.models)
            for t in tqdm(self.plan.tensors, desc="Fisher norms", disable=not progress, unit="tensor"):
                if t.merge:
                    for i, (f, src) in enumerate(zip(self.plan.fishers, t.fisher_sources)):  # type: ignore[arg-type]
                        sq[i] += float(f.read(src).to(torch.float64).pow(2).sum())
            self.fisher_norms = [max(s ** 0.5, 1e-30) for s in sq]
        if self.method.name == "ties" and self.recipe.parameters.get("trim") == "model":
            self.thresholds = self._global_thresholds(progress)

    def _global_thresholds(self, progress: bool) -> list[float]:
        """Exact per-model magnitude thresholds for a whole-model top-k trim, in two streaming passes.

        Non-negative float32 values order like their int32 bit patterns, so a radix select on
        the bits finds the k-th largest |τ| with two histograms (high 16 bits, then low 15)
        instead of holding the whole model in memory.
        """
        m = len(self.plan.models)
        densities = [self.recipe.model_param(spec, "density", "") for spec in self.recipe.models]
        merged = [t for t in self.plan.tensors if t.merge]
        total = sum(t.numel for t in merged)
        ks = [int(d * total) for d in densities]

        def bits(t: TensorPlan):
            base, tensors = self.read_inputs(t)
            for i, x in enumerate(tensors):
                yield i, (x - base).abs().reshape(-1).view(torch.int32)

        high = [torch.zeros(1 << 16, dtype=torch.int64) for _ in range(m)]
        for t in tqdm(merged, desc="TIES trim (1/2)", disable=not progress, unit="tensor"):
            for i, b in bits(t):
                high[i] += torch.bincount(b >> 15, minlength=1 << 16)
        chosen_bin, rank_in_bin = [], []
        for i in range(m):
            # Walk from the top bin down until k entries are covered.
            above = torch.flip(torch.cumsum(torch.flip(high[i], [0]), 0), [0])  # entries in bins >= b
            k = max(ks[i], 1)
            b = int((above >= k).nonzero().max()) if bool((above >= k).any()) else 0
            chosen_bin.append(b)
            rank_in_bin.append(k - (int(above[b + 1]) if b + 1 < len(above) else 0))
        low = [torch.zeros(1 << 15, dtype=torch.int64) for _ in range(m)]
        for t in tqdm(merged, desc="TIES trim (2/2)", disable=not progress, unit="tensor"):
            for i, b in bits(t):
                sel = b[(b >> 15) == chosen_bin[i]]
                if sel.numel():
                    low[i] += torch.bincount(sel & 0x7FFF, minlength=1 << 15)
        thresholds = []
        for i in range(m):
            if densities[i] >= 1:
                thresholds.append(0.0)
                continue
            if ks[i] == 0:
                thresholds.append(float("inf"))
                continue
            above = torch.flip(torch.cumsum(torch.flip(low[i], [0]), 0), [0])
            lo = int((above >= rank_in_bin[i]).nonzero().max())
            pattern = torch.tensor([(chosen_bin[i] << 15) | lo], dtype=torch.int32)
            thresholds.append(float(pattern.view(torch.float32)))
        return thresholds


def check_output(output: Path, overwrite: bool) -> None:
    """Fail early (in the plan step) when the output cannot be written."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output folder {output} already exists; choose another --output or pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a folder; remove it or choose another --output")


def run_merge(plan: MergePlan, output: Path, *, overwrite: bool = False, progress: bool = True,
              evaluate: Callable[[Path], Any] | None = None,
              extra: Callable[[Path, Any], tuple[list[str], str]] | None = None) -> MergeResult:
    """Merge according to `plan` and write a loadable model folder at `output` atomically.

    Args:
        plan: From `build_plan`.
        output: The folder to create.
        overwrite: Replace `output` if it exists (only once the new folder is complete).
        progress: Show progress bars.
        evaluate: Called with the finished (not yet renamed) folder; its report goes into the
            model card and ``eval_results.json``.
        extra: Called with the folder and the report before the card is written; writes more
            files there (e.g. a search's plot) and returns their names and a markdown section
            for the card.

    Raises:
        OutputExistsError: `output` exists and `overwrite` is false.
        HfMergeError: Any problem found while merging (nothing is left behind).
    """
    output = Path(output).absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.hfmerge-", dir=output.parent))
    merger = TensorMerger(plan)
    try:
        merger.prepare(progress)
        files = _write_weights(plan, merger, tmp, progress)
        files += _copy_side_files(plan, tmp)
        report = evaluate(tmp) if evaluate is not None else None
        if report is not None:
            (tmp / "eval_results.json").write_text(report.to_json())
            files.append("eval_results.json")
        section = ""
        if extra is not None:
            more, section = extra(tmp, report)
            files += more
        from .card import build_card

        build_card(plan, tmp, output.name, report, section).save(tmp / "README.md")
        files.append("README.md")
        _finalize(output, tmp, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        plan.release()
    return MergeResult(output, sorted(files), plan.warnings + merger.warnings, report)


def _write_weights(plan: MergePlan, merger: TensorMerger, folder: Path, progress: bool) -> list[str]:
    # A reference that stores tied copies under several names (e.g. `shared` and
    # `encoder.embed_tokens`) gets each copy merged from identical inputs with the same seed
    # (TensorPlan.alias_key), so the copies stay identical.
    metadata = {"hfmerge_version": __version__, "merge_method": plan.recipe.method.name}
    bar = tqdm(total=plan.output_bytes, desc="Merging", unit="B", unit_scale=True, disable=not progress)
    with ShardedSafetensorsWriter(folder, plan.output_tensors, plan.recipe.max_shard_size, metadata) as writer:
        for t in plan.tensors:
            merged = merger.merge(t)
            writer.write(t.name, merged)
            bar.update(merged.numel() * merged.element_size())
    bar.close()
    return writer.file_names + (["model.safetensors.index.json"] if len(writer.shards) > 1 else [])


def _copy_side_files(plan: MergePlan, folder: Path) -> list[str]:
    copied = []
    config_folder = plan.config_source.folder
    for name in CONFIG_FILES:
        src = config_folder / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    # Record the output dtype in config.json so from_pretrained picks it by default.
    if (folder / "config.json").is_file() and plan.recipe.out_dtype is not None:
        config = json.loads((folder / "config.json").read_text())
        dtype_name = _TORCH_NAMES[plan.recipe.out_dtype]
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        src = plan.tokenizer_folder / name
        if src.is_file():
            shutil.copyfile(src, folder / name)
            copied.append(name)
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(plan.recipe.raw, sort_keys=False))
    copied.append(RECIPE_FILE)
    return copied


def _finalize(output: Path, tmp: Path, overwrite: bool) -> None:
    if output.exists():
        if not overwrite:  # appeared while we were merging
            raise OutputExistsError(f"output folder {output} appeared while merging; nothing was replaced (the result was discarded)")
        backup = Path(tempfile.mkdtemp(prefix=f".{output.name}.hfmerge-old-", dir=output.parent))
        os.rename(output, backup / "old")
        try:
            os.rename(tmp, output)
        except BaseException:
            os.rename(backup / "old", output)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(tmp, output)
