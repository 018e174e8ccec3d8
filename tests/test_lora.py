"""PEFT LoRA adapters as merge inputs: W + scale·B·A streamed per tensor, checked in the plan."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hfmerge.checkpoints.lora import PEFT_PREFIX, AdapterConfig, check_adapter_base
import hfmerge
from hfmerge.cli import main
from hfmerge.errors import CheckpointError, IncompatibleCheckpointsError
from hfmerge.planning import build_plan
from hfmerge.recipe import load_recipe
from hfmerge.refs import ModelRef
from hfmerge.testing import load_base_state, write_checkpoint
from test_merge import write_recipe

try:
    import peft
except ImportError:  # peft is a test extra; the hand-computed tests below cover the same formula
    peft = None

T5_Q = "encoder.block.0.layer.0.SelfAttention.q"  # [16, 16]
T5_V = "decoder.block.1.layer.1.EncDecAttention.v"  # [16, 16]
T5_WI = "encoder.block.1.layer.1.DenseReluDense.wi_0"  # [32, 16]


# -- helpers ---------------------------------------------------------------------------------


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], *, prefix: str = PEFT_PREFIX, pickle: bool = False, **config) -> Path:
    """An adapter folder as peft writes it: adapter_config.json + adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "base", "fan_in_fan_out": False,
           "bias": "none", "revision": None, "target_modules": sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors if ".lora_" in k}),
           "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
    cfg.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    state = {prefix + k: v.contiguous() for k, v in tensors.items()}
    if pickle:
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def lora_pair(module: str, out_dim: int, in_dim: int, r: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"{module}.lora_A.weight": torch.randn(r, in_dim, generator=gen) * 0.3,
            f"{module}.lora_B.weight": torch.randn(out_dim, r, generator=gen) * 0.3}


def apply(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scales: dict[str, float], transposed: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """W + scale·B·A by hand, per module of `scales` (the expected full fine-tuned model)."""
    out = {k: v.clone() for k, v in state.items()}
    for module, scale in scales.items():
        a = adapter.get(f"{module}.lora_A.weight", adapter.get(f"{module}.lora_embedding_A"))
        b = adapter.get(f"{module}.lora_B.weight", adapter.get(f"{module}.lora_embedding_B"))
        delta = b @ a
        if module in transposed:
            delta = delta.T
        out[f"{module}.weight"] = out[f"{module}.weight"].float() + scale * delta
    return out


def plan_for(tmp_path: Path, base: Path, models: list[Path], method: str = "task_arithmetic", **extra):
    recipe = write_recipe(tmp_path / "r.yaml", merge_method=method, base_model=base, models=[{"model": m} for m in models], **extra)
    return build_plan(load_recipe(recipe))


def assert_reads(ckpt, expected: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(ckpt.tensors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(ckpt.read(name).float(), value.float(), rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def flan(families):
    """The tiny flan-T5-layout model (gated FFN, untied lm_head)."""
    return families["t5_v1_1"]


# -- against peft itself ---------------------------------------------------------------------


PEFT_CASES = {
    "t5-q-v-wi-lm_head": ("t5_v1_1", dict(r=4, lora_alpha=8, target_modules=["q", "v", "wi_0"], modules_to_save=["lm_head"])),
    "t5-rslora-embedding": ("t5_v1_1", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q", "o", "shared"])),
    "t5-rank-alpha-patterns": ("t5_v1_1", dict(r=4, lora_alpha=8, target_modules=["q", "v", "wi_1"], rank_pattern={"v": 2, r"encoder\.block\.1\.layer\.0\.SelfAttention\.q": 6}, alpha_pattern={"wi_1": 3})),
    "gpt2-conv1d-lora_bias": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], lora_bias=True)),
}


@pytest.mark.skipif(peft is None, reason="peft is not installed (pip install -e .[test])")
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_streamed_adapter_equals_peft_merge_and_unload(families, tmp_path, case):
    family, kwargs = PEFT_CASES[case]
    base = families[family].base
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.T5ForConditionalGeneration
    torch.manual_seed(0)
    model = peft.get_peft_model(cls.from_pretrained(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():  # a trained lm_head copy, so modules_to_save has something to carry
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    model.save_pretrained(tmp_path / "adapter")
    expected = peft.PeftModel.from_pretrained(cls.from_pretrained(base), tmp_path / "adapter").merge_and_unload().state_dict()

    plan = plan_for(tmp_path, base, [tmp_path / "adapter"])
    lora = plan.models[0]
    assert lora.format == "lora" and lora.updates
    assert_reads(lora, {n: expected[n] for n in lora.tensors})
    # λ = 1 and one model: the merge is the adapted model itself, which transformers loads.
    out = tmp_path / "out"
    assert hfmerge.merge(tmp_path / "r.yaml", output=out, progress=False).output == out
    got = load_file(out / "model.safetensors")
    for name, t in got.items():
        torch.testing.assert_close(t, expected[name], rtol=1e-6, atol=1e-6)
    loaded = cls.from_pretrained(out).state_dict()
    torch.testing.assert_close(loaded[next(iter(lora.updates))], got[next(iter(lora.updates))])


# -- hand-computed W + scale·B·A ---------------------------------------------------------------


def test_plain_lora_is_w_plus_alpha_over_r_times_ba(flan, tmp_path):
    base = load_base_state(flan.base)
    tensors = {**lora_pair(T5_Q, 16, 16, 4, 1), **lora_pair(T5_WI, 32, 16, 4, 2)}
    write_adapter(tmp_path / "ad", tensors, r=4, lora_alpha=8)
    lora = plan_for(tmp_path, flan.base, [tmp_path / "ad"]).models[0]
    assert_reads(lora, apply(base, tensors, {T5_Q: 2.0, T5_WI: 2.0}))
    assert lora.read(T5_Q + ".weight").dtype == torch.float32  # adapted tensors stay float32
    assert torch.equal(lora.read("shared.weight"), base["shared.weight"])  # untouched: the base's own tensor


def test_rslora_scale_is_alpha_over_sqrt_r(flan, tmp_path):
    base = load_base_state(flan.base)
    tensors = lora_pair(T5_Q, 16, 16, 4, 3)
    write_adapter(tmp_path / "ad", tensors, r=4, lora_alpha=6, use_rslora=True)
    assert_reads(plan_for(tmp_path, flan.base, [tmp_path / "ad"]).models[0], apply(base, tensors, {T5_Q: 6 / math.sqrt(4)}))


def test_rank_and_alpha_patterns_override_per_module(flan, tmp_path):
    base = load_base_state(flan.base)
    tensors = {**lora_pair(T5_Q, 16, 16, 4, 4), **lora_pair(T5_V, 16, 16, 2, 5), **lora_pair(T5_WI, 32, 16, 6, 6)}
    # `v` matches T5_V by its last name component; the regex matches the whole wi_0 module name.
    write_adapter(tmp_path / "ad", tensors, r=4, lora_alpha=8, rank_pattern={"v": 2, r"encoder\.block\.1\..*wi_0": 6},
                  alpha_pattern={"EncDecAttention.v": 5})
    expected = apply(base, tensors, {T5_Q: 8 / 4, T5_V: 5 / 2, T5_WI: 8 / 6})
    assert_reads(plan_for(tmp_path, flan.base, [tmp_path / "ad"]).models[0], expected)


def test_fan_in_fan_out_conv1d_layers_get_the_transposed_update(families, tmp_path):
    """GPT-2 stores Conv1D weights [in, out]. c_attn is [16, 48]: the shape decides; attn.c_proj is
    square: the architecture says it is a Conv1D, so it is transposed even though this config says
    fan_in_fan_out: false (peft sets the flag per layer, and a mixed model saves either value)."""
    gpt2 = families["gpt2"]
    base = load_base_state(gpt2.base)
    c_attn, c_proj = "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj"
    tensors = {**lora_pair(c_attn, 48, 16, 4, 7), **lora_pair(c_proj, 16, 16, 4, 8)}
    write_adapter(tmp_path / "ad", tensors, r=4, lora_alpha=4, fan_in_fan_out=False)
    lora = plan_for(tmp_path, gpt2.base, [tmp_path / "ad"]).models[0]
    assert_reads(lora, apply(base, tensors, {c_attn: 1.0, c_proj: 1.0}, transposed={c_attn, c_proj}))


@pytest.mark.parametrize("flag", [True, False])
def test_square_weights_of_an_unknown_architecture_follow_fan_in_fan_out(families, tmp_path, flag):
    import shutil

    base_dir = shutil.copytree(families["gpt2"].base, tmp_path / "base")
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("architectures")
    (base_dir / "config.json").write_text(json.dumps(config))
    c_proj = "transformer.h.1.attn.c_proj"
    tensors = lora_pair(c_proj, 16, 16, 4, 8)
    write_adapter(tmp_path / "ad", tensors, r=4, lora_alpha=4, fan_in_fan_out=flag)
    plan = plan_for(tmp_path, base_dir, [tmp_path / "ad"])
    assert_reads(plan.models[0], apply(load_base_state(base_dir), tensors, {c_proj: 1.0}, transposed={c_proj} if flag else set()))


def test_embedding_lora_bias_modules_to_save_and_keys_without_the_peft_prefix(families, tmp_path):
    gpt2 = families["gpt2"]
    base = load_base_state(gpt2.base)
    gen = torch.Generator().manual_seed(9)
    c_fc = "transformer.h.0.mlp.c_fc"  # Conv1D [16, 64]
    tensors = {
        "transformer.wte.lora_embedding_A": torch.randn(4, 64, generator=gen),  # [r, vocab]
        "transformer.wte.lora_embedding_B": torch.randn(16, 4, generator=gen),  # [dim, r]
        **lora_pair(c_fc, 64, 16, 4, 10),
        f"{c_fc}.lora_B.bias": torch.randn(64, generator=gen),
        "transformer.ln_f.weight": torch.randn(16, generator=gen),  # modules_to_save: a full tensor
        "transformer.h.1.ln_1.base_layer.bias": torch.randn(16, generator=gen),  # a wrapped layer's bias
    }
    write_adapter(tmp_path / "ad", tensors, prefix="", r=4, lora_alpha=2, lora_bias=True, modules_to_save=["ln_f"])
    expected = apply(base, tensors, {"transformer.wte": 0.5, c_fc: 0.5}, transposed={"transformer.wte", c_fc})
    expected[f"{c_fc}.bias"] = base[f"{c_fc}.bias"] + 0.5 * tensors[f"{c_fc}.lora_B.bias"]
    expected["transformer.ln_f.weight"] = tensors["transformer.ln_f.weight"]
    expected["transformer.h.1.ln_1.bias"] = tensors["transformer.h.1.ln_1.base_layer.bias"]
    assert_reads(plan_for(tmp_path, gpt2.base, [tmp_path / "ad"]).models[0], expected)


# -- merging adapters ------------------------------------------------------------------------


def test_two_adapters_merge_like_the_full_models_they_stand_for(flan, tmp_path):
    base = load_base_state(flan.base)
    adapters, fulls = [], []
    for i, modules in enumerate([(T5_Q, T5_WI), (T5_Q, T5_V)]):
        tensors = {k: v for j, m in enumerate(modules) for k, v in lora_pair(m, *base[m + ".weight"].shape, 4, 20 + 10 * i + j).items()}
        adapters.append(write_adapter(tmp_path / f"ad{i}", tensors, r=4, lora_alpha=4 * (i + 1), base_model_name_or_path=str(flan.base)))
        full = apply(base, tensors, {m: float(i + 1) for m in modules})
        fulls.append(write_checkpoint(tmp_path / f"full{i}", {k: v.contiguous() for k, v in full.items()}, flan.base / "config.json"))
    params = {"lambda": 0.8}
    models = [{"model": adapters[0], "parameters": {"weight": 0.7}}, {"model": adapters[1], "parameters": {"weight": 0.5}}]
    recipe = write_recipe(tmp_path / "lora.yaml", merge_method="task_arithmetic", base_model=flan.base, models=models, parameters=params)
    assert hfmerge.merge(recipe, output=tmp_path / "out-lora", progress=False).output == tmp_path / "out-lora"
    models = [{"model": fulls[0], "parameters": {"weight": 0.7}}, {"model": fulls[1], "parameters": {"weight": 0.5}}]
    recipe = write_recipe(tmp_path / "full.yaml", merge_method="task_arithmetic", base_model=flan.base, models=models, parameters=params)
    assert hfmerge.merge(recipe, output=tmp_path / "out-full", progress=False).output == tmp_path / "out-full"
    got, want = load_file(tmp_path / "out-lora" / "model.safetensors"), load_file(tmp_path / "out-full" / "model.safetensors")
    assert set(got) == set(want) == set(base)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
        assert got[name].dtype == base[name].dtype
    card = (tmp_path / "out-lora" / "README.md").read_text()
    assert f"| {adapters[0]} | `local` | LoRA adapter (models[0]) |" in card


def test_dry_run_reports_an_adapter_whose_base_is_named_differently(flan, tmp_path, capsys):
    write_adapter(tmp_path / "ad", lora_pair(T5_Q, 16, 16, 4, 1), base_model_name_or_path="google/flan-t5-base")
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=flan.base, models=[{"model": tmp_path / "ad"}])
    assert main([str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "the adapter was trained on google/flan-t5-base" in out and "their names differ, so check that they are the same model" in out


# -- errors found in the plan ----------------------------------------------------------------


BAD_ADAPTERS = {
    "not-lora": (dict(peft_type="IA3"), r"peft_type is 'IA3'; only LoRA adapters"),
    "dora": (dict(use_dora=True), r"DoRA \(use_dora: true\).*not supported.*merge_and_unload"),
    "pissa": (dict(init_lora_weights="pissa_niter_4"), r"init_lora_weights is 'pissa_niter_4', which changes the base weights"),
    "no-peft-type": (dict(peft_type=None), r"has no peft_type"),
    "rank-disagrees": (dict(r=8), r"rank 4\), but adapter_config.json gives it rank 8 \(r / rank_pattern\)"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_unsupported_or_inconsistent_adapter_configs_are_refused(flan, tmp_path, case):
    config, pattern = BAD_ADAPTERS[case]
    write_adapter(tmp_path / "ad", lora_pair(T5_Q, 16, 16, 4, 1), **config)
    with pytest.raises(CheckpointError, match=r"models\[0\]\.model \(.*ad\): .*" + pattern):
        plan_for(tmp_path, flan.base, [tmp_path / "ad"])


@pytest.mark.parametrize("tensors, pattern", [
    ({**lora_pair("encoder.block.7.layer.0.SelfAttention.q", 16, 16, 4, 1)},
     r"adapts module 'encoder.block.7.layer.0.SelfAttention.q', but base_model .* has no tensor .*; is the adapter made for base\?"),
    ({**lora_pair(T5_Q, 24, 16, 4, 1)}, r"module '.*SelfAttention.q': lora B \[24, 4\] · A \[4, 16\] gives a \[24, 16\] update, but base_model .* stores .* as \[16, 16\]"),
    ({f"{T5_Q}.lora_A.weight": torch.zeros(4, 16)}, r"has no matching lora_B; the adapter file is incomplete"),
    ({**lora_pair(T5_Q, 16, 16, 4, 1), f"{T5_Q}.lora_magnitude_vector": torch.ones(16)}, r"belongs to DoRA magnitude vectors"),
    ({**lora_pair(T5_Q, 16, 16, 4, 1), "lm_head.weight": torch.zeros(70, 16)}, r"has shape \[70, 16\] but base_model .* stores 'lm_head.weight' as \[64, 16\]"),
])
def test_adapter_tensors_that_do_not_fit_the_base_name_the_tensor(flan, tmp_path, tensors, pattern):
    write_adapter(tmp_path / "ad", tensors)
    with pytest.raises(IncompatibleCheckpointsError, match=pattern):
        plan_for(tmp_path, flan.base, [tmp_path / "ad"])


def test_an_adapter_needs_the_recipe_base_model(flan, tmp_path):
    write_adapter(tmp_path / "ad", lora_pair(T5_Q, 16, 16, 4, 1), base_model_name_or_path="google/flan-t5-base")
    with pytest.raises(CheckpointError, match=r"models\[0\].model .* is a PEFT LoRA adapter .*needs `base_model:` set to the model it was trained on \(google/flan-t5-base\)"):
        plan_for(tmp_path, None, [tmp_path / "ad", flan.finetuned[0]], method="average")
    with pytest.raises(CheckpointError, match=r"base_model \(.*ad\): .* is a PEFT LoRA adapter .*can only be a `models` entry"):
        plan_for(tmp_path, tmp_path / "ad", [flan.finetuned[0]])


def test_adapter_folder_without_weights(flan, tmp_path):
    write_adapter(tmp_path / "ad", lora_pair(T5_Q, 16, 16, 4, 1))
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"has adapter_config.json but no adapter_model.safetensors"):
        plan_for(tmp_path, flan.base, [tmp_path / "ad"])


def test_pickle_adapter_needs_allow_pickle_and_then_loads_weights_only(flan, tmp_path, monkeypatch):
    tensors = lora_pair(T5_Q, 16, 16, 4, 1)
    write_adapter(tmp_path / "ad", tensors, pickle=True)
    with pytest.raises(CheckpointError, match=r"holds only pickle adapter weights \(adapter_model.bin\).*allow_pickle: true"):
        plan_for(tmp_path, flan.base, [tmp_path / "ad"])
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    lora = plan_for(tmp_path, flan.base, [tmp_path / "ad"], allow_pickle=True).models[0]
    assert_reads(lora, apply(load_base_state(flan.base), tensors, {T5_Q: 2.0}))
    assert calls and all(calls)


# -- the base check --------------------------------------------------------------------------


class _Base:
    def __init__(self, text: str, commit: str = "", path: Path | None = None):
        repo, _, rev = text.partition("@")
        self.ref = ModelRef(text, path=path) if path else ModelRef(text, repo_id=repo, revision=commit or rev or None)
        self.commit = commit
        self.label = f"base_model ({text})"


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("adapter_base, revision, base, error, warning", [
    ("google/flan-t5-base", None, _Base("google/flan-t5-base", SHA), None, None),
    ("Google/FLAN-T5-base", None, _Base("google/flan-t5-base", SHA), None, None),
    ("google/flan-t5-base", None, _Base("google/t5-v1_1-base", SHA), r"trained on google/flan-t5-base .*but base_model is google/t5-v1_1-base\. Set `base_model: google/flan-t5-base`", None),
    ("google/flan-t5-base", None, _Base("someone/flan-t5-base", SHA), None, r"same name under another owner"),
    ("t5-base", None, _Base("google-t5/t5-base", SHA), None, None),  # a legacy id without owner
    ("/data/models/flan-t5-base", None, _Base("google/flan-t5-base", SHA), None, None),  # a local copy keeps its name
    ("/home/me/.cache/huggingface/hub/models--google--flan-t5-base/snapshots/" + SHA, None, _Base("google/flan-t5-base", SHA), None, None),
    ("/data/my-base", None, _Base("google/flan-t5-base", SHA), None, r"their names differ, so check"),
    ("google/flan-t5-base", None, _Base("./flan-t5-base", path=Path("/x/flan-t5-base")), None, None),
    ("google/flan-t5-base", "v1", _Base("google/flan-t5-base", SHA), r"at revision 'v1', but base_model resolves to main \(0123.*\)\. Pin it: `base_model: google/flan-t5-base@v1`", None),
    ("google/flan-t5-base", "v1", _Base("google/flan-t5-base@v1", SHA), None, None),
    ("google/flan-t5-base", SHA[:10], _Base("google/flan-t5-base", SHA), None, None),
    (None, None, _Base("google/flan-t5-base", SHA), None, r"does not name its base model"),
])
def test_adapter_base_check(adapter_base, revision, base, error, warning):
    problem, note = check_adapter_base(AdapterConfig(r=4, lora_alpha=8, base_model=adapter_base, revision=revision), base)
    if error:
        assert problem is not None and re.search(error, problem), problem
    else:
        assert problem is None, problem
    if warning:
        assert note is not None and re.search(warning, note), note
    else:
        assert note is None, note


# -- an adapter on the Hub -------------------------------------------------------------------


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


def test_adapters_on_the_hub_merge_end_to_end_pinned_and_offline(hub, flan, tmp_path, monkeypatch):
    base_repo = hub.unique_repo_id("flan-base")
    hub.create_repo_direct(base_repo, folder_files(flan.base))
    base = load_base_state(flan.base)
    repos, local = [], []
    for i, module in enumerate([T5_Q, T5_WI]):
        tensors = lora_pair(module, *base[module + ".weight"].shape, 4, 40 + i)
        folder = write_adapter(tmp_path / f"ad{i}", tensors, base_model_name_or_path=base_repo)
        repo = hub.unique_repo_id(f"lora-{i}")
        hub.create_repo_direct(repo, {**folder_files(folder), "README.md": b"---\nlicense: mit\n---\n"})
        repos.append(repo)
        local.append(folder)
    recipe = write_recipe(tmp_path / "hub.yaml", merge_method="ties", base_model=base_repo,
                          models=[{"model": r, "parameters": {"density": 0.5}} for r in repos])
    hub.clear_requests()
    plan = build_plan(load_recipe(recipe))
    assert [m.commit for m in plan.models] == [hub.head_sha(r) for r in repos]
    assert not [r for r in hub.requests_matching("GET", "adapter_model.safetensors") if not r.range]  # headers only
    assert hfmerge.merge(recipe, output=tmp_path / "out-hub", progress=False).output == tmp_path / "out-hub"
    card = (tmp_path / "out-hub" / "README.md").read_text()
    assert f"| {repos[0]} | `{hub.head_sha(repos[0])}` | LoRA adapter (models[0]) |" in card
    assert f"model: {repos[1]}@{hub.head_sha(repos[1])}" in card

    local_recipe = write_recipe(tmp_path / "local.yaml", merge_method="ties", base_model=flan.base,
                                models=[{"model": f, "parameters": {"density": 0.5}} for f in local])
    assert hfmerge.merge(local_recipe, output=tmp_path / "out-local", progress=False).output == tmp_path / "out-local"
    assert (tmp_path / "out-hub" / "model.safetensors").read_bytes() == (tmp_path / "out-local" / "model.safetensors").read_bytes()
    assert hfmerge.merge(recipe, output=tmp_path / "out-low", low_disk=True, progress=False).output == tmp_path / "out-low"
    assert (tmp_path / "out-low" / "model.safetensors").read_bytes() == (tmp_path / "out-local" / "model.safetensors").read_bytes()

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.clear_requests()
    assert hfmerge.merge(recipe, output=tmp_path / "out-offline", progress=False).output == tmp_path / "out-offline"
    assert len(hub.requests) == 0
    assert (tmp_path / "out-offline" / "model.safetensors").read_bytes() == (tmp_path / "out-local" / "model.safetensors").read_bytes()


def test_hub_adapter_of_another_base_is_refused_in_the_plan(hub, flan, tmp_path):
    base_repo = hub.unique_repo_id("flan-base")
    hub.create_repo_direct(base_repo, folder_files(flan.base))
    folder = write_adapter(tmp_path / "ad", lora_pair(T5_Q, 16, 16, 4, 1), base_model_name_or_path="google/flan-t5-base")
    repo = hub.unique_repo_id("lora")
    hub.create_repo_direct(repo, folder_files(folder))
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": repo}])
    with pytest.raises(IncompatibleCheckpointsError, match=rf"models\[0\].model \({repo}\): the adapter was trained on google/flan-t5-base .*but base_model is {base_repo}\. Set `base_model: google/flan-t5-base`"):
        build_plan(load_recipe(recipe))


def test_hub_pickle_adapter_is_read_only_with_allow_pickle(hub, flan, tmp_path):
    base_repo = hub.unique_repo_id("flan-base")
    hub.create_repo_direct(base_repo, folder_files(flan.base))
    tensors = lora_pair(T5_Q, 16, 16, 4, 1)
    repo = hub.unique_repo_id("lora-bin")
    hub.create_repo_direct(repo, folder_files(write_adapter(tmp_path / "ad", tensors, pickle=True, base_model_name_or_path=base_repo)))
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": repo}])
    with pytest.raises(CheckpointError, match=rf"{repo}@[0-9a-f]{{40}} holds only pickle adapter weights"):
        build_plan(load_recipe(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", merge_method="task_arithmetic", base_model=base_repo, models=[{"model": repo}], allow_pickle=True)
    assert_reads(build_plan(load_recipe(recipe)).models[0], apply(load_base_state(flan.base), tensors, {T5_Q: 2.0}))
