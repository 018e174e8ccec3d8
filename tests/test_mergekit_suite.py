"""mergekit's own merge-test configurations, run through hfmerge with mergekit's checks.

`CASES` holds every merge configuration of mergekit's ``tests/test_basic_merges.py``,
``tests/test_chat_template.py`` and ``tests/test_tokenizer.py`` (59; the nuslerp tests loop
over nine each), as the YAML mapping mergekit's test builds, with the checks that test makes.
Models are written ``${name}``, the name of mergekit's fixture (`mergekit_fixtures` rebuilds
them), and replaced by the folders when a case runs.

Each runnable case is merged with `hfmerge.merge` and checked as mergekit's
``run_and_check_merge`` does: a model file and ``config.json`` are written, the config loads
with ``AutoConfig``, every tensor is finite, every weight of the architecture is present
(the input checkpoint's tensor names, with the layers a slice recipe adds), then the test's own
checks. Each runs with the recipe's dtype (mergekit's tests use bfloat16) and in float32.

Cases that need a method or a recipe feature hfmerge does not have yet are listed in `PENDING`
with the reason, and a test asserts that `PENDING` is exactly the set of cases whose method is
not registered or whose feature hfmerge refuses. When a method or feature lands, that test
fails until its cases are moved out of `PENDING`; they then run like the others.

Setting ``HFMERGE_MERGEKIT_PYTHON`` to the python of a virtualenv with mergekit installed
(never hfmerge's own) also compares the float32 outputs of the deterministic cases with
``mergekit-yaml``'s.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import pytest
import torch
import yaml
from mergekit_fixtures import mergekit_models  # noqa: F401  (fixture)
from safetensors import safe_open

import hfmerge
from hfmerge.errors import IncompatibleCheckpointsError, RecipeError
from hfmerge.methods import METHODS
from hfmerge.recipe import parse_recipe

Check = Callable[[Path, Mapping[str, str]], None]  # (output folder, fixture name -> folder)


@dataclass(frozen=True)
class Case:
    """One merge configuration of mergekit's test suite.

    Attributes:
        name: mergekit's test (``Class::test``, a loop's variables in brackets).
        recipe: The configuration as mergekit's YAML, models as ``${fixture}``.
        checks: The test's own checks after the common ones.
        features: Recipe features beyond a plain merge that the case needs (keys of `FEATURES`).
        raises: The case must be refused: a `RecipeError` whose message contains this.
    """

    name: str
    recipe: dict[str, Any]
    checks: tuple[Check, ...] = ()
    features: tuple[str, ...] = ()
    raises: Optional[str] = None

    @property
    def method(self) -> str:
        return self.recipe["merge_method"]


# -- the checks of mergekit's tests ----------------------------------------------------------


def tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint folder, file by file."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                yield key, h.get_tensor(key)


def tensor_names(folder: Path) -> set[str]:
    """The tensor names of a checkpoint folder: its index's weight map, else its single file."""
    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(Path(folder) / "model.safetensors"), "pt") as h:
        return set(h.keys())


def get_tensor(folder: Path, name: str) -> torch.Tensor:
    return dict(tensors(folder))[name]


_LAYER = re.compile(r"^(?P<prefix>.*?\.(?:h|layers))\.(?P<index>\d+)\.(?P<rest>.+)$")


def required_names(input_names: set[str], layers_in: int, layers_out: int) -> set[str]:
    """The weights the output must hold: the input's, with the decoder stack (the layer prefix
    with `layers_in` layers) extended to `layers_out` layers when a slice recipe changes it."""
    if layers_in == layers_out:
        return set(input_names)
    stacks: dict[str, set[int]] = {}
    for name in input_names:
        if m := _LAYER.match(name):
            stacks.setdefault(m["prefix"], set()).add(int(m["index"]))
    decoder = {p for p, idx in stacks.items() if len(idx) == layers_in}
    out = set()
    for name in input_names:
        m = _LAYER.match(name)
        if m and m["prefix"] in decoder:
            out.update(f"{m['prefix']}.{i}.{m['rest']}" for i in range(layers_out))
        else:
            out.add(name)
    return out


def _layer_count(folder: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder)).get_text_config().num_hidden_layers


def check_merge_output(out: Path, reference: Path, dtype: Optional[str]) -> None:
    """mergekit's ``run_and_check_merge`` checks, plus the output dtype.

    Args:
        out: The merged folder.
        reference: The input checkpoint whose weights the output must all have (the base model,
            else the first model).
        dtype: The recipe's ``dtype``: every floating-point output tensor has it (None: unchecked).
    """
    from transformers import AutoConfig

    assert (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file(), "no model written"
    assert (out / "config.json").is_file(), "no config.json written"
    AutoConfig.from_pretrained(str(out))
    names = set()
    for name, t in tensors(out):
        names.add(name)
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
        if dtype is not None and t.is_floating_point():
            assert t.dtype == getattr(torch, dtype), f"{name} is {t.dtype}, the recipe asks for {dtype}"
    assert names == tensor_names(out), "the index does not list exactly the stored tensors"
    missing = required_names(tensor_names(reference), _layer_count(reference), _layer_count(out)) - names
    assert not missing, f"output misses {sorted(missing)[:5]} ({len(missing)} weights)"


def config_value(key: str, expected: Any) -> Check:
    """The output's config has `key` = `expected` (mergekit: ``config.n_layer == 24``)."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        from transformers import AutoConfig

        assert getattr(AutoConfig.from_pretrained(str(out)), key) == expected

    return check


def zeroed(needle: str, nonzero: str) -> Check:
    """Tensors whose name contains `needle` are all zero (and there is one); those containing
    `nonzero` are not (mergekit's passthrough ``scale`` filter test)."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        seen = False
        for name, t in tensors(out):
            if needle in name:
                assert (t == 0).all(), f"{name} is not zero"
                seen = True
            elif nonzero in name:
                assert t.count_nonzero() > 0, f"{name} is all zero"
        assert seen, f"no {needle} tensor in the output"

    return check


def chat_template(needle: str) -> Check:
    """The output tokenizer's chat template contains `needle`."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(str(out)).chat_template
        assert template and needle in template, f"chat template {template!r} lacks {needle!r}"

    return check


def vocabulary(size: int, added: Optional[int] = None, contains: tuple[str, ...] = (), excludes: tuple[str, ...] = ()) -> Check:
    """The output tokenizer has `size` tokens, `added` of them added tokens, these and not those."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        from transformers import LlamaTokenizerFast

        tok = LlamaTokenizerFast.from_pretrained(str(out))
        vocab = tok.get_vocab()
        assert len(vocab) == size, f"{len(vocab)} tokens, expected {size}"
        if added is not None:
            assert len(tok.added_tokens_decoder) == added
        assert all(t in vocab for t in contains), [t for t in contains if t not in vocab]
        assert not any(t in vocab for t in excludes), [t for t in excludes if t in vocab]

    return check


def _embedding(folder: Path, token: Optional[str] = None, token_id: Optional[int] = None) -> torch.Tensor:
    from transformers import LlamaTokenizerFast

    if token is not None:
        token_id = LlamaTokenizerFast.from_pretrained(str(folder)).get_vocab()[token]
    return get_tensor(folder, "model.embed_tokens.weight")[token_id].float()


def embedding_from(token: str, model: str, source: Optional[dict] = None, atol: float = 1e-8, rtol: float = 1e-5) -> Check:
    """The output's embedding of `token` is `model`'s embedding of the same token (or of the
    token `source` names: ``{"token": ...}`` or ``{"token_id": ...}``)."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        expected = _embedding(Path(models[model]), **(source or {"token": token}))
        assert torch.allclose(_embedding(out, token), expected, atol=atol, rtol=rtol), f"{token} is not {model}'s"

    return check


def padded_vocabulary(rows: int) -> Check:
    """The output's config and embedding matrix have `rows` rows."""

    def check(out: Path, models: Mapping[str, str]) -> None:
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(str(out)).vocab_size == rows
        assert get_tensor(out, "model.embed_tokens.weight").shape[0] == rows

    return check


# -- the configurations ----------------------------------------------------------------------


def ref(name: str) -> str:
    return "${" + name + "}"


def two_model(a: str, b: str, method: str, base: Optional[str] = None, params: Optional[dict] = None,
              weights: tuple[float, float] = (0.6, 0.4), dtype: Optional[str] = "bfloat16") -> dict:
    """mergekit's ``two_model_config``: weights 0.6 and 0.4, bfloat16."""
    recipe: dict[str, Any] = {"merge_method": method}
    if base is not None:
        recipe["base_model"] = ref(base)
    recipe["models"] = [{"model": ref(m), "parameters": {"weight": w}} for m, w in zip((a, b), weights)]
    if dtype is not None:
        recipe["dtype"] = dtype
    if params is not None:
        recipe["parameters"] = dict(params)
    return recipe


def tokenizer_recipe(models: list[str], base: str, method: str = "linear", **extra: Any) -> dict:
    """mergekit's tokenizer tests' ``make_config``: every weight 1, float32."""
    recipe: dict[str, Any] = {"merge_method": method, "base_model": ref(base),
                              "models": [{"model": ref(m), "parameters": {"weight": 1.0}} for m in models], "dtype": "float32"}
    recipe.update(extra)
    return recipe


def nuslerp_cases(prefix: str, a: str, b: str, c: str) -> list[Case]:
    """mergekit's nuslerp loop (no base and base `c`; row-wise and flattened on and off), then
    weights summing to zero."""
    cases = []
    for base in (None, c):
        for row_wise in (False, True):
            for flatten in (False, True):
                params = {"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
                cases.append(Case(f"{prefix}[base_model={base},row_wise={row_wise},flatten={flatten}]",
                                  two_model(a, b, "nuslerp", base, params)))
    cases.append(Case(f"{prefix}[weights_sum_to_zero]", two_model(a, b, "nuslerp", c, {"nuslerp_row_wise": False, "nuslerp_flatten": False},
                                                                  weights=(-0.5, 0.5))))
    return cases


BASIC = "TestBasicMerges::"


def shared_cases(kind: str, a: str, b: str, c: str) -> list[Case]:
    """The tests mergekit writes twice, as ``test_<method>_merge`` on the Llamas and as
    ``test_<method>_VLM_merge`` on the LLaVAs (`kind` is "" or "_VLM")."""
    return [
        Case(f"{BASIC}test_linear{kind}_merge", two_model(a, b, "linear")),
        Case(f"{BASIC}test_slerp{kind}_merge", two_model(a, b, "slerp", a, {"t": 0.35})),
        *nuslerp_cases(f"{BASIC}test_nuslerp{kind}_merges", a, b, c),
        Case(f"{BASIC}test_task_arithmetic{kind}_merge", two_model(a, b, "task_arithmetic", c)),
        Case(f"{BASIC}test_breadcrumbs{kind}_merge", two_model(a, b, "breadcrumbs", c)),
        Case(f"{BASIC}test_ties{kind}_merge", two_model(a, b, "ties", c, {"density": 0.3})),
        Case(f"{BASIC}test_dare_ties{kind}_merge", two_model(a, b, "dare_ties", c, {"density": 0.66})),
        # model_stock: mergekit passes (b, c) as the models and a as the base.
        Case(f"{BASIC}test_model_stock{kind}_merge", two_model(b, c, "model_stock", a)),
        Case(f"{BASIC}test_model_stock_filterwise{kind}_merge", two_model(b, c, "model_stock", a, {"filter_wise": True})),
    ]

TOKENIZER = "TestTokenizerMerges::"
CHATML = ("<|im_start|>", "<|im_end|>")
TOKENIZER_MODELS = ["model_base", "model_padded", "model_chatml"]

CASES: list[Case] = [
    # test_basic_merges.py
    Case("TestGraniteMerges::test_granite_copy", {"merge_method": "passthrough", "models": [{"model": ref("granite_a")}], "dtype": "bfloat16"}),
    Case("TestGraniteMerges::test_granite_linear_merge", two_model("granite_a", "granite_b", "linear")),
    Case("TestGraniteMerges::test_granite_slerp",
         {"merge_method": "slerp", "base_model": ref("granite_a"), "models": [{"model": ref("granite_a")}, {"model": ref("granite_b")}],
          "parameters": {"t": 0.5}, "dtype": "bfloat16"}),
    Case(BASIC + "test_gpt2_copy", {"merge_method": "passthrough", "models": [{"model": ref("gpt2_like")}], "dtype": "bfloat16"}),
    Case(BASIC + "test_gpt2_stack",
         {"merge_method": "passthrough", "slices": [{"sources": [{"model": ref("gpt2_like"), "layer_range": [0, 12]}]}] * 2, "dtype": "bfloat16"},
         checks=(config_value("n_layer", 24),), features=("slices",)),
    Case(BASIC + "test_passthrough_scale",
         {"merge_method": "passthrough", "models": [{"model": ref("model_a"), "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
         checks=(zeroed("o_proj", nonzero="lm_head"),)),
    Case(BASIC + "test_sce_merge", two_model("model_a", "model_b", "sce", "model_c", {"select_topk": 0.5})),
    Case(BASIC + "test_ram_merge", two_model("model_a", "model_b", "ram", "model_c")),
    Case(BASIC + "test_ramplus_tl_merge", two_model("model_a", "model_b", "ramplus_tl", "model_c", {"r": 0.05, "alpha": 1.0})),
    Case(BASIC + "test_multislerp_merge", two_model("model_a", "model_b", "multislerp", "model_c")),
    Case(BASIC + "test_arcee_fusion_merge", two_model("model_a", "model_b", "arcee_fusion", "model_a")),
    Case(BASIC + "test_nearswap_merge", two_model("model_a", "model_b", "nearswap", "model_a", {"t": 0.0001})),
    Case(BASIC + "test_della_merge", two_model("model_a", "model_b", "della", "model_c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
    # mergekit raises ValueError when it runs; hfmerge refuses the recipe before reading weights.
    Case(BASIC + "test_della_invalid_epsilon", two_model("model_a", "model_b", "della", "model_c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
         raises="epsilon"),
    Case(BASIC + "test_karcher_merge", two_model("model_a", "model_b", "karcher", "model_c", {"max_iter": 5, "tol": 1e-5})),
    # The configurations mergekit's tests run on both the Llamas and the LLaVAs.
    *shared_cases("", "model_a", "model_b", "model_c"),
    *shared_cases("_VLM", "vlm_a", "vlm_b", "vlm_c"),
    # test_chat_template.py
    Case("TestChatTemplate::test_template_chatml",
         {**two_model("model_base", "model_b", "linear", "model_base", weights=(0.5, 0.5)), "chat_template": "chatml"},
         checks=(chat_template("<|im_start|>"),), features=("chat_template",)),
    Case("TestChatTemplate::test_template_literal_jinja",
         {**two_model("model_base", "model_b", "linear", "model_base", weights=(0.5, 0.5)), "chat_template": "{{messages[0]['content']}}"},
         checks=(chat_template("{{messages[0]['content']}}"),), features=("chat_template",)),
    # test_tokenizer.py (test_legacy_mode: without tokenizer settings mergekit keeps the base's
    # tokenizer and cuts the embeddings to its size).
    Case(TOKENIZER + "test_legacy_mode", tokenizer_recipe(TOKENIZER_MODELS, "model_base"),
         checks=(vocabulary(64, added=3),), features=("legacy_vocab",)),
    Case(TOKENIZER + "test_source_base", tokenizer_recipe(TOKENIZER_MODELS, "model_base", tokenizer_source="base"),
         checks=(vocabulary(64, added=3),), features=("tokenizer_vocab",)),
    Case(TOKENIZER + "test_source_union", tokenizer_recipe(TOKENIZER_MODELS, "model_base", tokenizer_source="union"),
         checks=(vocabulary(66, added=5, contains=CHATML, excludes=tuple(f"<UNUSED_{i}>" for i in range(4))),
                 embedding_from("<|im_start|>", "model_chatml"),
                 embedding_from("<|im_end|>", "model_chatml", atol=1e-3, rtol=1e-4)),
         features=("tokenizer_vocab", "tokenizer_union")),
    Case(TOKENIZER + "test_source_model", tokenizer_recipe(TOKENIZER_MODELS, "model_base", tokenizer_source=ref("model_chatml")),
         checks=(vocabulary(66, contains=CHATML),), features=("tokenizer_vocab",)),
    Case(TOKENIZER + "test_slerp_union",
         tokenizer_recipe(["model_base", "model_chatml"], "model_base", "slerp", tokenizer_source="union", parameters={"t": 0.5}),
         checks=(vocabulary(66, contains=CHATML),), features=("tokenizer_vocab", "tokenizer_union")),
    Case(TOKENIZER + "test_force_token",
         tokenizer_recipe(["model_base", "model_chatml"], "model_base",
                          tokenizer={"source": "union", "tokens": {"_tok_10": {"source": ref("model_chatml"), "force": True},
                                                                   "_tok_11": {"source": ref("model_base"), "force": True}}}),
         checks=(vocabulary(66, contains=CHATML), embedding_from("_tok_10", "model_chatml"), embedding_from("_tok_11", "model_base")),
         features=("tokenizer_vocab", "tokenizer")),
    Case(TOKENIZER + "test_model_token_id",
         tokenizer_recipe(["model_base", "model_chatml"], "model_base",
                          tokenizer={"source": "base", "tokens": {
                              "_tok_20": {"source": {"kind": "model_token", "model": ref("model_chatml"), "token_id": 64}, "force": True},
                              "_tok_21": {"source": {"kind": "model_token", "model": ref("model_base"), "token": "<s>"}, "force": True}}}),
         checks=(vocabulary(64, contains=("_tok_10",)), embedding_from("_tok_20", "model_chatml", {"token_id": 64}),
                 embedding_from("_tok_21", "model_base", {"token": "<s>"})),
         features=("tokenizer_vocab", "tokenizer")),
    Case(TOKENIZER + "test_pad_to_multiple_of",
         tokenizer_recipe(["model_chatml"], "model_chatml", tokenizer={"source": "base", "pad_to_multiple_of": 16}),
         checks=(padded_vocabulary(80), vocabulary(66, contains=CHATML)), features=("tokenizer",)),
]

# mergekit's three merge-test modules hold this many merge configurations.
MERGEKIT_CONFIGURATION_COUNT = 59

# Case -> why it cannot run in hfmerge yet. Exactly the cases whose method is not registered or
# whose feature hfmerge refuses (`test_pending_is_exactly_what_hfmerge_lacks`); when one lands,
# delete its lines here.
PENDING: dict[str, str] = {
    # Vocabularies of 64, 64 and 66 rows without tokenizer settings: mergekit 0.1.5 itself stops
    # ("Tensor size mismatch for lm_head.weight ... tokenizer: {source: base}"), and so does
    # hfmerge, asking for tokenizer_source (`test_legacy_mode_is_refused_with_advice`).
    TOKENIZER + "test_legacy_mode": "feature legacy_vocab",
}

RUNNABLE = [c for c in CASES if c.name not in PENDING]


# -- what hfmerge supports -------------------------------------------------------------------


def substitute(value: Any, models: Mapping[str, str]) -> Any:
    """`value` with every ``${fixture}`` string replaced by the fixture's folder."""
    if isinstance(value, dict):
        return {k: substitute(v, models) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, models) for v in value]
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return models[value[2:-1]]
    return value


def _refused(recipe: dict, models: Mapping[str, str]) -> bool:
    """Whether hfmerge's recipe parser refuses `recipe` as something it does not support."""
    try:
        parse_recipe(substitute(recipe, models))
    except RecipeError as exc:
        return "not supported" in str(exc)
    return False


def _vocab_mismatch_refused(models: Mapping[str, str], **tokenizer: Any) -> bool:
    """Whether hfmerge refuses to merge models whose embedding matrices differ in rows (with
    these tokenizer settings)."""
    try:
        hfmerge.plan(parse_recipe(substitute(tokenizer_recipe(["model_base", "model_chatml"], "model_base", **tokenizer), models)))
    except IncompatibleCheckpointsError as exc:
        return "different shapes" in str(exc)
    return False


_PROBE = {"merge_method": "linear", "models": [{"model": ref("model_base"), "parameters": {"weight": 1.0}}]}

# Feature -> (what it is, whether hfmerge refuses it today). A feature counts as missing only
# when hfmerge itself says so; anything else runs and must pass.
FEATURES: dict[str, tuple[str, Callable[[Mapping[str, str]], bool]]] = {
    "slices": ("layer slicing (`slices:`)", lambda m: _refused(
        {"merge_method": "passthrough", "slices": [{"sources": [{"model": ref("model_base"), "layer_range": [0, 2]}]}]}, m)),
    "chat_template": ("`chat_template:`", lambda m: _refused({**_PROBE, "chat_template": "chatml"}, m)),
    "tokenizer": ("the `tokenizer:` section", lambda m: _refused({**_PROBE, "tokenizer": {"source": "base"}}, m)),
    "tokenizer_union": ("`tokenizer_source: union`", lambda m: _refused({**_PROBE, "tokenizer_source": "union"}, m)),
    "tokenizer_vocab": ("models whose vocabularies differ in size, re-indexed to a tokenizer source",
                        lambda m: _vocab_mismatch_refused(m, tokenizer_source="base")),
    "legacy_vocab": ("models whose vocabularies differ in size, without tokenizer settings (mergekit cuts the embeddings to the base's rows)",
                     _vocab_mismatch_refused),
}


@pytest.fixture(scope="module")
def missing_features(mergekit_models) -> set[str]:
    return {name for name, (_, refused) in FEATURES.items() if refused(mergekit_models)}


def lacks(case: Case, missing: set[str]) -> list[str]:
    """What `case` needs that hfmerge does not have: its method if unregistered, its refused features."""
    return ([case.method] if case.method not in METHODS else []) + [f for f in case.features if f in missing]


# -- the tests -------------------------------------------------------------------------------


def test_every_configuration_of_mergekit_s_tests_is_listed():
    names = [c.name for c in CASES]
    assert len(names) == MERGEKIT_CONFIGURATION_COUNT, f"{len(names)} configurations, mergekit's tests have {MERGEKIT_CONFIGURATION_COUNT}"
    assert len(set(names)) == len(names), "configuration names repeat"
    assert set(PENDING) <= set(names), f"PENDING names unknown cases: {sorted(set(PENDING) - set(names))}"
    assert all(set(c.features) <= set(FEATURES) for c in CASES)
    assert set(MERGEKIT_DIFFERS) <= set(names)
    assert len(RUNNABLE) + len(PENDING) == len(CASES)


def test_pending_is_exactly_what_hfmerge_lacks(missing_features):
    lacking = {c.name: lacks(c, missing_features) for c in CASES}
    now_supported = sorted(name for name in PENDING if not lacking[name])
    assert not now_supported, ("hfmerge now has every method and feature these configurations need; "
                               f"delete them from PENDING so that they run: {now_supported}")
    unmarked = sorted(f"{name} (needs {', '.join(need)})" for name, need in lacking.items() if need and name not in PENDING)
    assert not unmarked, f"these configurations need what hfmerge lacks; add them to PENDING with the reason: {unmarked}"
    known = {c.method for c in CASES} | set(FEATURES)
    stale = sorted(f"{name}: {reason!r} should name exactly {lacking[name]}" for name, reason in PENDING.items()
                   if set(re.findall(r"\w+", reason)) & known != set(lacking[name]))
    assert not stale, f"PENDING reasons to update: {stale}"


def test_required_names_extend_only_the_stacked_decoder():
    names = {"transformer.wte.weight", "transformer.h.0.mlp.weight", "transformer.h.1.mlp.weight", "tower.layers.0.fc.weight"}
    assert required_names(names, 2, 2) == names
    assert required_names(names, 2, 4) == names | {"transformer.h.2.mlp.weight", "transformer.h.3.mlp.weight"}


@pytest.mark.parametrize("damage", ["missing weight", "nan", "dtype", "no config"])
def test_the_common_checks_catch_a_broken_output(damage, mergekit_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = Path(mergekit_models["model_a"])
    state = load_file(source / "model.safetensors")
    dtype = None
    if damage == "missing weight":
        del state["model.layers.1.mlp.up_proj.weight"]
    elif damage == "nan":
        state["model.norm.weight"][3] = math.nan
    elif damage == "dtype":
        dtype = "bfloat16"
    out = tmp_path / "out"
    out.mkdir()
    save_file(state, out / "model.safetensors")
    if damage != "no config":
        (out / "config.json").write_bytes((source / "config.json").read_bytes())
    with pytest.raises(AssertionError, match={"missing weight": "up_proj", "nan": "non-finite", "dtype": "bfloat16", "no config": "config"}[damage]):
        check_merge_output(out, source, dtype)
    check_merge_output(source, source, "float32")  # the intact checkpoint passes


# (check, fixture it is applied to, whether it holds there): the test-specific checks tried on
# the input checkpoints, so that each is seen both to pass and to fail.
CHECK_PROBES = [
    (config_value("n_layer", 12), "gpt2_like", True),
    (config_value("n_layer", 24), "gpt2_like", False),
    (zeroed("o_proj", nonzero="lm_head"), "model_a", False),
    (vocabulary(64, added=3), "model_base", True),
    (vocabulary(66, added=5, contains=CHATML, excludes=("<UNUSED_0>",)), "model_chatml", True),
    (vocabulary(68, excludes=("<UNUSED_0>",)), "model_padded", False),
    (embedding_from("<|im_start|>", "model_chatml"), "model_chatml", True),
    (embedding_from("_tok_20", "model_chatml", {"token_id": 64}), "model_chatml", False),
    (embedding_from("_tok_21", "model_base", {"token": "<s>"}), "model_base", False),
    (padded_vocabulary(66), "model_chatml", True),
    (padded_vocabulary(80), "model_chatml", False),
    (chat_template("<|im_start|>"), "model_chatml", False),
]


@pytest.mark.parametrize(("index", "holds"), [pytest.param(i, holds, id=f"{i}-{fixture}-{'holds' if holds else 'fails'}")
                                              for i, (_, fixture, holds) in enumerate(CHECK_PROBES)])
def test_the_configuration_checks_hold_exactly_where_they_should(index, holds, mergekit_models):
    check, fixture, _ = CHECK_PROBES[index]
    if holds:
        check(Path(mergekit_models[fixture]), mergekit_models)
    else:
        with pytest.raises(AssertionError):
            check(Path(mergekit_models[fixture]), mergekit_models)


def _dtype_variants() -> list[Any]:
    params = []
    for case in RUNNABLE:
        params.append(pytest.param(case, None, id=case.name))
        if case.recipe.get("dtype") != "float32":
            params.append(pytest.param(case, "float32", id=f"{case.name}-float32"))
    return params


def reference_model(recipe: dict) -> Path:
    """The input whose weights the output must all have: the base model, else the first model
    (of the first slice for a slice recipe)."""
    if recipe.get("base_model"):
        return Path(recipe["base_model"])
    first = recipe["models"][0] if "models" in recipe else recipe["slices"][0]["sources"][0]
    return Path(first["model"])


def run_case(case: Case, models: Mapping[str, str], folder: Path, dtype: Optional[str]) -> tuple[Path, dict]:
    """Write the case's recipe (with `dtype` in place of its own when given) and merge it with hfmerge."""
    recipe = substitute(copy.deepcopy(case.recipe), models)
    if dtype is not None:
        recipe["dtype"] = dtype
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = folder / "merged"
    hfmerge.merge(path, output=out, progress=False)
    return out, recipe


@pytest.mark.parametrize(("case", "dtype"), _dtype_variants())
def test_mergekit_configuration(case: Case, dtype: Optional[str], mergekit_models, tmp_path):
    if case.raises is not None:
        with pytest.raises(RecipeError, match=re.escape(case.raises)):
            run_case(case, mergekit_models, tmp_path, dtype)
        assert not (tmp_path / "merged").exists()
        return
    out, recipe = run_case(case, mergekit_models, tmp_path, dtype)
    check_merge_output(out, reference_model(recipe), recipe.get("dtype"))
    for check in case.checks:
        check(out, mergekit_models)


# -- optional: the same outputs as mergekit --------------------------------------------------

MERGEKIT_PYTHON = os.environ.get("HFMERGE_MERGEKIT_PYTHON")

# Runnable cases whose mergekit output is not comparable, with the reason (mergekit 0.1.5).
MERGEKIT_DIFFERS: dict[str, str] = {
    c.name: "mergekit 0.1.5 under transformers 5 takes LLaVA's tensor names from the model class (model.language_model.*, "
            "model.vision_tower.*), not from the checkpoint (language_model.model.*, vision_tower.*): it writes no language-model "
            "weights and renames the others"
    for c in CASES if "_VLM_" in c.name
}


def run_mergekit(python: str, recipe: dict, folder: Path) -> Path:
    """Run ``mergekit-yaml`` of the virtualenv of `python` on `recipe` (CPU) into ``folder/mergekit``.

    Raises:
        RuntimeError: mergekit failed (the end of its log in the message).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mergekit.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = folder / "mergekit"
    script = Path(python).parent / "mergekit-yaml"
    proc = subprocess.run([str(script), str(path), str(out), "--no-lazy-unpickle", "--allow-crimes"], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


@dataclass
class Difference:
    """Two outputs compared tensor by tensor (float32)."""

    common: int  # tensors both hold
    only_ours: list[str]
    only_theirs: list[str]
    max_abs: float  # over the common tensors (0 when none)
    worst: str = ""  # the tensor where it is reached


def compare_outputs(ours: Path, theirs: Path, rename: Optional[Callable[[str], str]] = None) -> Difference:
    """Compare two outputs; `rename` maps a name of `theirs` to the name `ours` uses for it."""
    a, b = dict(tensors(ours)), dict(tensors(theirs))
    if rename is not None:
        b = {rename(k): v for k, v in b.items()}
    diff = Difference(len(set(a) & set(b)), sorted(set(a) - set(b)), sorted(set(b) - set(a)), 0.0)
    for name in sorted(set(a) & set(b)):
        d = (a[name].float() - b[name].float()).abs().max().item() if a[name].shape == b[name].shape else math.inf
        if not d <= diff.max_abs:
            diff.max_abs, diff.worst = d, name
    return diff


def deterministic(case: Case) -> bool:
    return case.raises is None and case.method in METHODS and not METHODS[case.method].random


@pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set HFMERGE_MERGEKIT_PYTHON to the python of a virtualenv with mergekit to compare")
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in RUNNABLE if deterministic(c) and c.name not in MERGEKIT_DIFFERS])
def test_same_output_as_mergekit(case: Case, mergekit_models, tmp_path):
    ours, recipe = run_case(case, mergekit_models, tmp_path, "float32")
    diff = compare_outputs(ours, run_mergekit(MERGEKIT_PYTHON, recipe, tmp_path))
    assert not diff.only_ours and not diff.only_theirs, f"only in hfmerge's: {diff.only_ours[:5]}; only in mergekit's: {diff.only_theirs[:5]}"
    assert diff.max_abs <= 1e-5, f"max |hfmerge - mergekit| = {diff.max_abs:.3g} at {diff.worst}"


def test_legacy_mode_is_refused_with_advice(mergekit_models):
    """mergekit 0.1.5 refuses the legacy configuration (different vocabulary sizes and no
    tokenizer settings) too; hfmerge's refusal names the tensor and the key that fixes it."""
    recipe = substitute(tokenizer_recipe(["model_base", "model_padded", "model_chatml"], "model_base"), mergekit_models)
    with pytest.raises(IncompatibleCheckpointsError, match=r"lm_head\.weight|embed_tokens\.weight") as info:
        hfmerge.plan(parse_recipe(recipe))
    assert "vocabulary sizes differ" in str(info.value) and "tokenizer_source" in str(info.value)
