"""The model card (README.md of the output), built with huggingface_hub's ModelCard.

It says exactly how the model was made: every input with its pinned commit, the recipe with
revisions resolved, the SHA-256 of every output file and the library versions.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import yaml

from . import __version__
from .constants import FILE_BUILDERS, TORCH_DTYPE_NAMES
from .planning import MergePlan
from .recipe import Recipe, hub_id_of, recipe_syntax

# Architecture class suffix -> (pipeline tag, transformers Auto class that loads it).
PIPELINE_BY_SUFFIX = (
    ("ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("ForCausalLM", "text-generation", "AutoModelForCausalLM"),
    ("LMHeadModel", "text-generation", "AutoModelForCausalLM"),
    ("ForMaskedLM", "fill-mask", "AutoModelForMaskedLM"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
)
# Encoder-decoder families whose ...ForConditionalGeneration is a text-to-text model.
SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "longt5", "switch_transformers"})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _explicit(ckpt) -> bool:
    """Whether `ckpt` is a ``BASE+ADAPTER`` reference (a LoRA adapter on a model it names)."""
    return bool(getattr(ckpt, "explicit_base", False))


def _ref_name(ckpt) -> str:
    if _explicit(ckpt):
        return ckpt.ref.text
    return ckpt.ref.repo_id if ckpt.ref.repo_id else ckpt.ref.text


def _commit(ckpt) -> str:
    if _explicit(ckpt):
        return f"{_commit(ckpt.base)}+{ckpt.commit or 'local'}"
    return ckpt.commit or "local"


def _pinned(ckpt) -> str | None:
    """The reference pinned to the commits that were read; None when nothing in it is on the Hub."""
    if _explicit(ckpt):
        model, adapter = _pinned(ckpt.base), (f"{ckpt.ref.repo_id}@{ckpt.commit}" if ckpt.ref.repo_id else None)
        if model is None and adapter is None:
            return None
        return f"{model or ckpt.base.ref.text}+{adapter or ckpt.adapter.ref.text}"
    return f"{ckpt.ref.repo_id}@{_commit(ckpt)}" if ckpt.ref.repo_id else None


def _hub_ids(ckpt, recipe: Recipe, *, local_only: bool = False) -> list[str]:
    """The Hub repos a checkpoint was read from, or that the recipe's ``hub_ids`` name for its
    local folder (for a ``BASE+ADAPTER`` reference, both sides); `local_only`: only the latter."""
    ids = _hub_ids(ckpt.base, recipe, local_only=local_only) if _explicit(ckpt) else []
    own = hub_id_of(recipe, ckpt.ref) if ckpt.ref.is_local or not local_only else None
    return ids + ([own] if own else [])


def _input_name(ckpt, recipe: Recipe) -> str:
    """How the inputs table names a checkpoint: its reference, and the Hub ids ``hub_ids``
    gives its local folders."""
    named = _hub_ids(ckpt, recipe, local_only=True)
    return f"{_ref_name(ckpt)} (Hub: {', '.join(named)})" if named else _ref_name(ckpt)


def resolved_recipe(plan: MergePlan) -> dict:
    """The recipe as written, with every Hub reference pinned to the commit that was read."""
    raw = yaml.safe_load(yaml.safe_dump(plan.recipe.raw, sort_keys=False))  # a deep copy in the user's key order
    pinned = _pinned(plan.base) if plan.base is not None else None
    if pinned is not None:
        raw["base_model"] = pinned
    by_key = {spec.key: ckpt for spec, ckpt in zip(plan.recipe.models, plan.models)}
    for i, entry in enumerate(raw.get("models") or []):
        ckpt = by_key.get(f"models[{i}]")
        pinned = _pinned(ckpt) if ckpt is not None else None
        if pinned is not None:
            if isinstance(entry, dict):
                entry["model"] = pinned
            else:
                raw["models"][i] = pinned
    for sl in plan.recipe.slices:
        by_key.update({spec.key: plan.models[i] for spec, i in zip(sl.sources, sl.inputs)})
        if sl.base is not None and plan.base is not None:
            by_key[sl.base.key] = plan.base
    for i, entry in enumerate(raw.get("slices") or []):
        for j, src in enumerate(entry.get("sources") or []):
            ckpt = by_key.get(f"slices[{i}].sources[{j}]")
            pinned = _pinned(ckpt) if ckpt is not None else None
            if pinned is not None:
                src["model"] = pinned
    return raw


def _license(plan: MergePlan) -> str | None:
    readme = plan.reference.folder / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.to_dict().get("license")
        except Exception:  # noqa: BLE001 - a malformed upstream card only loses the licence
            return None
    return None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import torch

    # Package metadata, not imports: importing transformers costs about a second.
    return {"hfmerge": __version__, "python": platform.python_version(), "torch": torch.__version__,
            **{name: version(name) for name in ("transformers", "huggingface_hub", "safetensors")}}




def _usage(auto_class: str, pipeline: str | None, repo: str) -> str:
    """The lines that load the model with transformers."""
    lines = ["```python", f"from transformers import AutoTokenizer, {auto_class}", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")', f'model = {auto_class}.from_pretrained("{repo}")']
    if pipeline:
        lines += ["", "# or", "from transformers import pipeline", "", f'pipe = pipeline("{pipeline}", model="{repo}")']
    return "\n".join(lines + ["```"])


def build_card(plan: MergePlan, folder: Path, title: str, evaluation=None, extra_sections: str = "", repo_id: str | None = None,
               known_hashes: dict[str, str] | None = None):
    """Build the ModelCard for the merged model written in `folder` (hashes every file there but README.md).

    Hub repos go into the `base_model` metadata, with the ids the recipe's ``hub_ids`` gives
    local folders (a local folder without one has no id there); `base_model_relation: merge`
    is written only with a `base_model`. The inputs table lists every input, a named local
    folder with its id. `evaluation` (an `EvalReport` of the output) adds
    `model-index` results and an evaluation section; `extra_sections` (markdown, e.g. the
    coefficient search) follows it. `repo_id` (where the model is pushed) goes into the usage
    snippet; without it the snippet loads the folder by its `title`. `known_hashes` maps file
    names (relative to `folder`) to SHA-256 digests already computed while writing them; those
    files are not read again.
    """
    from huggingface_hub import ModelCard, ModelCardData

    recipe = plan.recipe
    method = recipe.method
    config = plan.config_source.config
    arch = (config.get("architectures") or [""])[0]
    pipeline, auto_class = next(((tag, auto) for suffix, tag, auto in PIPELINE_BY_SUFFIX if arch.endswith(suffix)), (None, "AutoModel"))
    if arch.endswith("ForConditionalGeneration") and config.get("model_type") not in SEQ2SEQ_MODEL_TYPES:
        pipeline, auto_class = None, "AutoModel"  # vision-language and speech models: no text-to-text pipeline
    inputs = ([plan.base] if plan.base is not None else []) + plan.models
    hub_inputs = list(dict.fromkeys(i for c in inputs for i in _hub_ids(c, recipe)))
    data = ModelCardData(
        base_model=hub_inputs or None,
        # The Hub reads the relation of the base_model entries; without them it says nothing.
        base_model_relation="merge" if hub_inputs else None,
        library_name="transformers",
        pipeline_tag=pipeline,
        tags=["merge", "hfmerge", method.name],
        license=_license(plan),
        datasets=sorted({t.dataset_path for t in recipe.tasks if not t.from_disk and t.dataset_path not in FILE_BUILDERS}) or None,
        model_name=title if evaluation is not None else None,
        eval_results=evaluation.to_eval_results() if evaluation is not None else None,
    )
    eval_section = ""
    if evaluation is not None:
        eval_section = f"""
## Evaluation

{evaluation.split.capitalize()} split; multiple-choice tasks are scored by rank classification over their answer options, generation tasks by greedy generation:

```
{evaluation.to_table()}
```
"""
    eval_section += extra_sections
    rows = []
    if plan.base is not None:
        rows.append(f"| {_input_name(plan.base, recipe)} | `{_commit(plan.base)}` | base | |")
    for spec, ckpt in zip(recipe.models, plan.models):
        coeffs = ", ".join(f"{p.name}={recipe_syntax(spec.parameters.get(p.name, recipe.model_defaults.get(p.name, p.default)))}"
                           for p in method.per_model)
        if recipe.slices:
            coeffs = "per slice: see the recipe" if method.per_model else ""  # a checkpoint may feed several slices
        # applied to the base (checkpoints/lora.py), or to the model the reference names (BASE+ADAPTER)
        role = ("LoRA adapter on its model" if _explicit(ckpt) else "LoRA adapter") if getattr(ckpt, "format", "") == "lora" else "fine-tuned"
        rows.append(f"| {_input_name(ckpt, recipe)} | `{_commit(ckpt)}` | {role} ({spec.key}) | {coeffs} |")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    known = known_hashes or {}
    hashes = "\n".join(f"| `{p.relative_to(folder).as_posix()}` | `{known.get(p.relative_to(folder).as_posix()) or sha256_file(p)}` |"
                       for p in files)
    params = ", ".join(f"`{k}` = {recipe_syntax(v)}" for k, v in recipe.parameters.items()) or "none"
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    body = f"""
# {title}

This model is a merge of {len(plan.models)} fine-tuned model(s){' of ' + _input_name(plan.base, recipe) if plan.base is not None else ''}, made with hfmerge using **{method.name}** ({_paper(method.paper)}): {method.summary}.

## Usage

{_usage(auto_class, pipeline, repo_id or title)}

## Inputs

| model | commit | role | coefficients |
|---|---|---|---|
{chr(10).join(rows)}

## Method

`merge_method: {method.name}`; parameters: {params}. Computation in float32; output dtype: {TORCH_DTYPE_NAMES.get(recipe.out_dtype or '', 'as stored in the base checkpoint')}.

{eval_section}
## Recipe (revisions resolved)

```yaml
{yaml.safe_dump(resolved_recipe(plan), sort_keys=False).rstrip()}
```

## Files

| file | SHA-256 |
|---|---|
{hashes}

## Software

{versions}
"""
    content = f"---\n{data.to_yaml()}\n---\n{body}"
    return ModelCard(content)


def _paper(paper: str) -> str:
    """A link when the method's paper is a URL, else its citation."""
    return f"[paper]({paper})" if paper.startswith("http") else paper
