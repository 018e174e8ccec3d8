"""`hfmerge demo`: the main job end to end on small local checkpoints, offline.

Builds a small original-layout T5 (ReLU FFN, tied embeddings) as the "pre-trained" model and
two synthetic experts (the base plus a different seeded task vector each), writes two
mergekit-style recipes (task arithmetic and TIES), merges them with the same code path as
`hfmerge RECIPE` (`hfmerge.merge`), reloads each result with transformers, runs a forward
pass, and reports how much of each expert's task vector the merge kept (cosine similarity of
task vectors). Every checkpoint carries a small word-level tokenizer, so the outputs load with
``AutoTokenizer`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DESCRIPTION = ("Build a small T5 and two synthetic experts, merge them with task arithmetic and with TIES (the recipes are written "
               "beside them), check that transformers loads and runs each result, and show how much of each expert the merge kept. Offline.")
LEGEND = ("cos(τ, τ_a): cosine similarity between the merge's task vector τ = θ_merged − θ_base and expert a's τ_a = θ_a − θ_base, "
          "over all weights; 1 means the merge moved the base exactly in a's direction, 0 that a's change was lost. The experts' task "
          "vectors are unrelated random directions, so an even two-way merge keeps each at about 1/√2 ≈ 0.71.")
RECIPES = {
    "task_arithmetic": {"parameters": {"lambda": 1.0}, "model_parameters": {"weight": 0.5}},
    "ties": {"parameters": {"lambda": 1.0}, "model_parameters": {"weight": 1.0, "density": 0.2}},
}


def _cosine(a: dict[str, Any], b: dict[str, Any]) -> float:
    import torch

    va = torch.cat([t.reshape(-1) for t in a.values()])
    vb = torch.cat([b[n].reshape(-1) for n in a])
    return float(torch.nn.functional.cosine_similarity(va, vb, dim=0))


def run_demo(folder: Path, *, progress: bool = True) -> int:
    """Run the demo in `folder` (its models are built once and reused); prints a table."""
    import torch
    import transformers
    import yaml

    from .api import merge
    from .testing import build_base, build_finetuned, load_base_state, word_tokenizer

    transformers.utils.logging.disable_progress_bar()
    folder = Path(folder).absolute()
    models = folder / "models"
    base = models / "base"
    if not (base / "model.safetensors").is_file():
        print(f"Building a small T5 and two experts in {models} ...")
        build_base(base, "t5", seed=0, layers=4, d_model=128, vocab=512)
        tokenizer = word_tokenizer(512)
        tokenizer.save_pretrained(base)
        for i, name in enumerate(("expert-a", "expert-b")):
            build_finetuned(base, models / name, seed=1 + i, scale=0.02)
            tokenizer.save_pretrained(models / name)
    base_state = load_base_state(base)
    experts = {name: load_base_state(models / name) for name in ("expert-a", "expert-b")}
    task_vectors = {name: {n: s[n].float() - base_state[n].float() for n in base_state} for name, s in experts.items()}

    rows = []
    for method, spec in RECIPES.items():
        recipe_path = folder / f"{method}.yaml"
        recipe_path.write_text(yaml.safe_dump({
            "merge_method": method,
            "base_model": "./models/base",
            "models": [{"model": f"./models/{name}", "parameters": dict(spec["model_parameters"])} for name in experts],
            "parameters": dict(spec["parameters"]),
            "dtype": "float32",
        }, sort_keys=False))
        out = folder / f"merged-{method}"
        result = merge(recipe_path, output=out, overwrite=True, progress=progress)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(result.output).eval()
        with torch.no_grad():
            ids = torch.tensor([[5, 6, 7, 1]])
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([[0]])).logits
        merged = load_base_state(result.output)
        merged_tv = {n: merged[n].float() - base_state[n].float() for n in base_state}
        rows.append((method, recipe_path.name, out.name, *(_cosine(merged_tv, tv) for tv in task_vectors.values()), tuple(logits.shape)))

    print()
    print(f"{'method':<16} {'recipe':<22} {'output':<26} {'cos(τ, τ_a)':>11} {'cos(τ, τ_b)':>11}  forward pass")
    for method, recipe, out, ca, cb, shape in rows:
        print(f"{method:<16} {recipe:<22} {out:<26} {ca:>11.3f} {cb:>11.3f}  ok, logits {list(shape)}")
    print(f"\n{LEGEND}")
    print(f"\nRecipes and merged models are in {folder}. Try: hfmerge {folder / 'ties.yaml'} --dry-run")
    return 0
