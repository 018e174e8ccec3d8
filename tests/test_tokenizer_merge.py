"""Output vocabularies and chat templates (mergekit's ``tokenizer_source``, ``tokenizer`` and
``chat_template``): tiny llama models whose tokenizers differ, merged through the public API,
with the checks of mergekit's tokenizer and chat-template tests plus exact row values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge.errors import CheckpointError, IncompatibleCheckpointsError, RecipeError
from hfmerge.recipe import parse_recipe
from hfmerge.testing import build_base, load_base_state
from hfmerge.tokenizer import CHAT_TEMPLATES, AlignInput, TokenizerSettings, align_rows, build_alignment

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
IM = ["<|im_start|>", "<|im_end|>"]
UNUSED = [f"<UNUSED_{i}>" for i in range(4)]


def make_tokenizer(folder: Path, size: int, added: list[str]) -> Path:
    """A BPE tokenizer of `size` tokens (<unk>, <s>, </s>, _tok_3, ...) plus `added` tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, size)]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, [], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_tokens(added)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """base: 64 rows and tokens; chatml: 66 rows, two chat tokens at 64 and 65; padded: 64
    rows, and four unused tokens past them in its tokenizer."""
    root = tmp_path_factory.mktemp("tokmodels")
    out = {}
    for name, rows, added, seed in (("base", 64, [], 0), ("chatml", 66, IM, 1), ("padded", 64, UNUSED, 2)):
        folder = build_base(root / name, "llama", seed=seed, vocab=rows)
        out[name] = make_tokenizer(folder, 64, added)
    return out


def run(tmp_path: Path, models: dict[str, Path], names: list[str], *, base: str | None = "base", method: str = "linear",
        out: str = "out", **extra) -> Path:
    recipe = {"merge_method": method, "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in names],
              "dtype": "float32", **extra}
    if base is not None:
        recipe["base_model"] = str(models[base])
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    hfmerge.merge(path, hfmerge.RunOptions(output=tmp_path / out, progress=False))
    return tmp_path / out


def tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def check_tokenizer(folder: Path, size: int, added: int | None = None, contains=(), lacks=()) -> dict[str, int]:
    tok = tokenizer(folder)
    vocab = tok.get_vocab()
    assert len(vocab) == size
    if added is not None:
        assert len(tok.added_tokens_decoder) == added
    assert all(t in vocab for t in contains)
    assert not any(t in vocab for t in lacks)
    return vocab


def rows_of(folder: Path, name: str = EMBED) -> tuple[torch.Tensor, dict[str, int]]:
    return load_base_state(folder)[name], tokenizer(folder).get_vocab()


def row(folder: Path, token: str, name: str = EMBED) -> torch.Tensor:
    weights, vocab = rows_of(folder, name)
    return weights[vocab[token]]


def test_without_tokenizer_settings_the_base_tokenizer_is_copied(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded"])
    check_tokenizer(out, 64, added=3)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_models_with_different_vocabulary_sizes_need_a_tokenizer_source(tmp_path, models):
    with pytest.raises(IncompatibleCheckpointsError, match=r"vocabulary sizes differ: set tokenizer_source"):
        run(tmp_path, models, ["base", "padded", "chatml"])


@pytest.mark.parametrize("source", ["base", "model:base"])
def test_source_base_reindexes_to_the_base_vocabulary(tmp_path, models, source):
    value = source if source == "base" else f"model:{models['base']}"
    out = run(tmp_path, models, ["base", "padded", "chatml"], tokenizer_source=value)
    check_tokenizer(out, 64, added=3)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64
    merged = load_base_state(out)
    for name in (EMBED, HEAD):
        # linear with weights 1, normalized: the mean of the three models' first 64 rows
        expected = sum(load_base_state(models[n])[name][:64] for n in ("base", "padded", "chatml")) / 3
        torch.testing.assert_close(merged[name], expected)


def test_source_union(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"], tokenizer_source="union")
    vocab = check_tokenizer(out, 66, added=5, contains=IM, lacks=UNUSED)
    assert vocab["<|im_start|>"] == 64 and vocab["<|im_end|>"] == 65 and vocab["_tok_10"] == 10
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    merged = load_base_state(out)
    inputs = {n: load_base_state(models[n]) for n in ("base", "padded", "chatml")}
    for name in (EMBED, HEAD):
        assert merged[name].shape == (66, 16)
        # shared tokens: each model's own row, averaged by the method
        torch.testing.assert_close(merged[name][:64], sum(s[name][:64] for s in inputs.values()) / 3)
        # tokens only chatml has: its row in every model, so the merged row is chatml's
        torch.testing.assert_close(merged[name][64:], inputs["chatml"][name][64:])
    torch.testing.assert_close(row(out, "<|im_start|>"), row(models["chatml"], "<|im_start|>"))


def test_source_union_without_base_takes_the_first_model_as_base(tmp_path, models):
    out = run(tmp_path, models, ["chatml", "base"], base=None, method="average", tokenizer_source="union")
    vocab = check_tokenizer(out, 66, contains=IM)
    assert vocab["<|im_end|>"] == 65


def test_source_model(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"], tokenizer_source=str(models["chatml"]))
    check_tokenizer(out, 66, contains=IM)
    assert load_base_state(out)[EMBED].shape == (66, 16)


def test_task_arithmetic_union_keeps_new_tokens_from_their_donor(tmp_path, models):
    """A method on task vectors: the base gets chatml's rows for the chat tokens too, so those
    rows' task vectors are zero except chatml's own (zero as well): the merged row is chatml's."""
    out = run(tmp_path, models, ["chatml"], method="task_arithmetic", tokenizer_source="union")
    check_tokenizer(out, 66, contains=IM)
    base, chat = load_base_state(models["base"]), load_base_state(models["chatml"])
    merged = load_base_state(out)
    torch.testing.assert_close(merged[EMBED][64:], chat[EMBED][64:])
    torch.testing.assert_close(merged[EMBED][:64], chat[EMBED][:64])  # lambda 1: base + (chat - base)
    assert not torch.equal(base[EMBED][:64], chat[EMBED][:64])


def test_force_token(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer={
        "source": "union",
        "tokens": {"_tok_10": {"source": str(models["chatml"]), "force": True},
                   "_tok_11": {"source": str(models["base"]), "force": True}}})
    check_tokenizer(out, 66, contains=IM)
    torch.testing.assert_close(row(out, "_tok_10"), row(models["chatml"], "_tok_10"))
    torch.testing.assert_close(row(out, "_tok_11"), row(models["base"], "_tok_11"))
    torch.testing.assert_close(row(out, "_tok_11", HEAD), row(models["base"], "_tok_11", HEAD))
    # an unforced shared token is still the mean
    torch.testing.assert_close(row(out, "_tok_12"), (row(models["base"], "_tok_12") + row(models["chatml"], "_tok_12")) / 2)


def test_model_token_by_id_and_by_token(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer={
        "source": "base",
        "tokens": {"_tok_20": {"source": {"kind": "model_token", "model": str(models["chatml"]), "token_id": 64}, "force": True},
                   "_tok_21": {"source": {"kind": "model_token", "model": str(models["base"]), "token": "<s>"}, "force": True}}})
    check_tokenizer(out, 64, contains=["_tok_10"])
    torch.testing.assert_close(row(out, "_tok_20"), load_base_state(models["chatml"])[EMBED][64])
    torch.testing.assert_close(row(out, "_tok_21"), row(models["base"], "<s>"))


def test_listed_new_tokens_are_added_and_zero_or_sourced(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer={
        "source": "base",
        "tokens": {"<new_zero>": {"source": {"kind": "zero"}},
                   "<new_copy>": {"source": {"kind": "model_token", "model": str(models["base"]), "token_id": 5}},
                   "<|im_end|>": {}}})
    vocab = check_tokenizer(out, 67, contains=["<new_zero>", "<new_copy>", "<|im_end|>"])
    weights = load_base_state(out)[EMBED]
    assert torch.count_nonzero(weights[vocab["<new_zero>"]]) == 0
    torch.testing.assert_close(weights[vocab["<new_copy>"]], load_base_state(models["base"])[EMBED][5])
    # no source given: the default rule, here chatml's own row (the only model that has it)
    torch.testing.assert_close(weights[vocab["<|im_end|>"]], load_base_state(models["chatml"])[EMBED][65])


def test_pad_to_multiple_of(tmp_path, models):
    out = run(tmp_path, models, ["chatml"], base="chatml", tokenizer={"source": "base", "pad_to_multiple_of": 16})
    check_tokenizer(out, 66, contains=IM)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80
    merged, chat = load_base_state(out), load_base_state(models["chatml"])
    for name in (EMBED, HEAD):
        assert merged[name].shape == (80, 16)
        torch.testing.assert_close(merged[name][:66], chat[name])
        torch.testing.assert_close(merged[name][66:], chat[name].mean(dim=0).expand(14, 16))


def test_padded_tokenizer_as_base_is_cut_to_its_rows(tmp_path, models):
    out = run(tmp_path, models, ["padded", "chatml"], base="padded", tokenizer_source="union")
    check_tokenizer(out, 66, contains=IM, lacks=UNUSED)


def test_chat_template_by_name(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded"], chat_template="chatml")
    tok = tokenizer(out)
    assert tok.chat_template == CHAT_TEMPLATES["chatml"]
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATES["chatml"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    check_tokenizer(out, 64, added=3)


def test_chat_template_literal(tmp_path, models):
    template = "{{ messages[0]['content'] }}!"
    out = run(tmp_path, models, ["base", "padded"], chat_template=template)
    tok = tokenizer(out)
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi!"


def test_chat_template_with_union(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer_source="union", chat_template="llama3")
    assert "<|start_header_id|>" in tokenizer(out).chat_template
    check_tokenizer(out, 66, contains=IM)


def test_chat_template_auto_takes_the_most_common(tmp_path, models):
    folders = {}
    for name, template in (("a", "{{ 'A' }}"), ("b", "{{ 'B' }}"), ("c", "{{ 'B' }}")):
        src = models["base"] if name == "a" else models["padded"]
        folder = tmp_path / name
        folder.mkdir()
        for f in src.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        tok = tokenizer(folder)
        tok.chat_template = template
        tok.save_pretrained(folder)
        folders[name] = folder
    out = run(tmp_path, folders, ["a", "b", "c"], base="a", chat_template="auto")
    assert tokenizer(out).chat_template == "{{ 'B' }}"


def test_chat_template_auto_without_templates_sets_none(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded"], chat_template="auto")
    assert not tokenizer(out).chat_template


def _recipe(models, **extra):
    return {"merge_method": "linear", "base_model": str(models["base"]),
            "models": [{"model": str(models["base"])}, {"model": str(models["chatml"])}], **extra}


@pytest.mark.parametrize(("extra", "pattern"), [
    ({"chat_template": "chatmlx"}, r"chat_template: unknown chat template name 'chatmlx'; expected 'auto', one of alpaca, chatml"),
    ({"chat_template": "{{ messages[0] }"}, r"chat_template: .*neither a template name"),
    ({"chat_template": "{% for m in messages %}{{ m }}"}, r"chat_template: the Jinja template does not parse"),
    ({"chat_template": 3}, r"chat_template: got 3; expected a template name"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, r"tokenizer: give either tokenizer_source or a tokenizer block"),
    ({"tokenizer": {"sauce": "union"}}, r"tokenizer.sauce: unknown key; did you mean 'source'"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, r"tokenizer.pad_to_multiple_of: got 0; expected a positive integer"),
    ({"tokenizer": {"tokens": {"x": {"source": "/no/such/model"}}}}, r"tokenizer.tokens.x.source: '/no/such/model' is not one of the merged models"),
    ({"tokenizer": {"tokens": {"x": {"force": True}}}}, r"tokenizer.tokens.x.force: a forced token needs a source"),
    ({"tokenizer": {"tokens": {"x": {"force": "yes"}}}}, r"tokenizer.tokens.x.force: got 'yes'; expected true or false"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "one"}}}}}, r"tokenizer.tokens.x.source.kind: got 'one'; expected 'zero' or 'model_token'"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "token_id": 1}}}}}, r"tokenizer.tokens.x.source.model: missing"),
    ({"config_source": "union"}, r"config_source: 'union' applies to tokenizers"),
])
def test_bad_settings_name_the_key_path(models, extra, pattern):
    with pytest.raises(RecipeError, match=pattern):
        parse_recipe(_recipe(models, **extra), source="r.yaml")


def test_token_source_must_be_a_merged_model(models):
    recipe = _recipe(models, tokenizer={"tokens": {"x": {"source": str(models["padded"])}}})
    with pytest.raises(RecipeError, match=r"tokenizer.tokens.x.source: '.*padded' is not one of the merged models"):
        parse_recipe(recipe, source="r.yaml")
    both = {"kind": "model_token", "model": str(models["chatml"]), "token_id": 1, "token": "<s>"}
    with pytest.raises(RecipeError, match=r"tokenizer.tokens.x.source: give exactly one of token_id and token"):
        parse_recipe(_recipe(models, tokenizer={"tokens": {"x": {"source": both}}}), source="r.yaml")


@pytest.mark.parametrize(("source", "pattern"), [
    ({"kind": "model_token", "model": "chatml", "token_id": 66}, r"tokenizer.tokens._tok_5.source.token_id: .* has no row for token_id 66"),
    ({"kind": "model_token", "model": "base", "token": "<nope>"}, r"tokenizer.tokens._tok_5.source.token: .* has no row for token '<nope>'"),
    ("base", r"tokenizer.tokens.<\|im_end\|>.source: .* has no token '<\|im_end\|>'"),
])
def test_rows_that_do_not_exist_are_refused_in_the_plan(tmp_path, models, source, pattern):
    token = "<|im_end|>" if source == "base" else "_tok_5"
    if isinstance(source, dict):
        source = {**source, "model": str(models[source["model"]])}
    else:
        source = str(models[source])
    recipe = _recipe(models, tokenizer={"tokens": {token: {"source": source, "force": True}}})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match=pattern):
        hfmerge.plan(path)


def test_union_needs_a_loadable_base_tokenizer(tmp_path, models):
    folder = tmp_path / "notok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((models["base"] / name).read_bytes())
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "base_model": str(folder), "tokenizer_source": "union",
                                    "models": [{"model": str(folder)}, {"model": str(models["chatml"])}]}))
    with pytest.raises(CheckpointError, match=r"tokenizer_source: base_model .*no tokenizer that transformers can load"):
        hfmerge.plan(path)


def test_plan_reports_the_output_vocabulary_shape(tmp_path, models):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**_recipe(models), "tokenizer_source": "union"}))
    planned = hfmerge.plan(path)
    shapes = {t.name: t.shape for t in planned.tensors}
    assert shapes[EMBED] == (66, 16) and shapes[HEAD] == (66, 16)
    assert {t.name for t in planned.tensors if t.vocabulary} == {EMBED, HEAD}
    assert hfmerge.plan_summary(planned)["vocabulary"] == {"tokens": 66, "rows": 66, "tensors": [HEAD, EMBED]}  # file order


def test_align_rows_follows_the_default_rules(tmp_path, models):
    """Hand-made vocabularies: rows of tokens some inputs lack come from the base when it has
    them, from the only input that has them, are zero when none has them, else the mean."""
    base = make_tokenizer(tmp_path / "t0", 5, [])                 # <unk> <s> </s> _tok_3 _tok_4
    one = make_tokenizer(tmp_path / "t1", 4, ["<a>", "<b>"])      # ... _tok_3, <a>=4, <b>=5
    two = make_tokenizer(tmp_path / "t2", 4, ["<b>", "<a>"])      # ... _tok_3, <b>=4, <a>=5
    inputs = [AlignInput("0", "base", base, 5), AlignInput("1", "one", one, 6), AlignInput("2", "two", two, 6)]
    settings = TokenizerSettings("union", ())
    al = build_alignment(settings, inputs, base_index=0, input_of=lambda ref: -1)
    vocab = al.tokenizer.get_vocab()
    assert al.tokens == al.rows == 7 and [vocab[t] for t in ("_tok_4", "<a>", "<b>")] == [4, 5, 6]
    x = [torch.arange(n, dtype=torch.float32).mul(10 ** k).unsqueeze(1).repeat(1, 2) for k, n in ((0, 5), (1, 6), (2, 6))]
    y = align_rows(x, al)
    assert y[0] is x[0] or y[0].shape == (7, 2)
    # _tok_4 (id 4): only the base has it -> its row 4 everywhere
    assert [float(t[4, 0]) for t in y] == [4.0, 4.0, 4.0]
    # <a>: base lacks it; one has it at 4, two at 5 -> the base gets their mean (40 + 500) / 2
    assert [float(t[5, 0]) for t in y] == [270.0, 40.0, 500.0]
    # <b>: one at 5, two at 4
    assert [float(t[6, 1]) for t in y] == [(50 + 400) / 2, 50.0, 400.0]
    # shared tokens keep each input's own row
    assert [float(t[3, 0]) for t in y] == [3.0, 30.0, 300.0]


def test_fisher_methods_refuse_reindexing(tmp_path, models):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "fisher", "base_model": str(models["base"]), "tokenizer_source": "union",
                                    "models": [{"model": str(models[n]), "fisher": f"{n}.safetensors"} for n in ("base", "chatml")]}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"tokenizer_source: re-indexing vocabularies is not supported with merge_method 'fisher'"):
        hfmerge.plan(path)


def test_tied_embeddings_are_reindexed_once(tmp_path):
    """gpt2 stores one tied embedding (wte): re-indexed like any vocabulary tensor, while the
    position table (wpe, as many rows as the vocabulary here) is left alone."""
    a = make_tokenizer(build_base(tmp_path / "a", "gpt2", seed=0, vocab=32), 30, [])
    b = make_tokenizer(build_base(tmp_path / "b", "gpt2", seed=1, vocab=32), 30, ["<x>", "<y>"])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"merge_method": "average", "base_model": str(a), "tokenizer_source": "union",
                                                     "models": [{"model": str(a)}, {"model": str(b)}]}))
    planned = hfmerge.plan(tmp_path / "r.yaml")
    assert {t.name for t in planned.tensors if t.vocabulary} == {"transformer.wte.weight"}
    out = tmp_path / "out"
    hfmerge.merge(tmp_path / "r.yaml", hfmerge.RunOptions(output=out, progress=False))
    vocab = check_tokenizer(out, 32, contains=["<x>", "<y>"])
    wa, wb, merged = (load_base_state(p)["transformer.wte.weight"] for p in (a, b, out))
    torch.testing.assert_close(merged[:30], (wa[:30] + wb[:30]) / 2)
    torch.testing.assert_close(merged[vocab["<x>"]], wb[30])


def _copy(src: Path, dst: Path, names: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in names:
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_tokenizer_source_outside_the_merged_models(tmp_path, models):
    tok_only = _copy(models["chatml"], tmp_path / "tok", ("config.json", "tokenizer.json", "tokenizer_config.json"))
    out = run(tmp_path, models, ["base", "chatml"], tokenizer_source=str(tok_only))
    vocab = check_tokenizer(out, 66, contains=IM)
    torch.testing.assert_close(load_base_state(out)[EMBED][vocab["<|im_end|>"]], load_base_state(models["chatml"])[EMBED][65])


def test_a_model_without_tokenizer_is_taken_to_share_the_base_ids(tmp_path, models):
    bare = _copy(models["padded"], tmp_path / "bare", ("config.json", "model.safetensors"))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "average", "base_model": str(models["base"]), "tokenizer_source": "union",
                                    "models": [{"model": str(bare)}, {"model": str(models["chatml"])}]}))
    result = hfmerge.merge(path, hfmerge.RunOptions(output=tmp_path / "out", progress=False))
    assert any("models[0].model" in w and "token ids are taken to be those of base_model" in w for w in result.warnings)
    merged, padded = load_base_state(tmp_path / "out")[EMBED], load_base_state(bare)[EMBED]
    chat = load_base_state(models["chatml"])[EMBED]
    torch.testing.assert_close(merged[:64], (padded + chat[:64]) / 2)


def test_slices_reindex_embeddings_among_the_first_slice_and_the_head_among_the_last(tmp_path, models):
    """passthrough stack: layers of base then chatml. The embeddings come from base alone, which
    lacks the chat tokens (zero rows, as in mergekit); the head from chatml, which has them."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
                                    "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 1]}]},
                                               {"sources": [{"model": str(models["chatml"]), "layer_range": [1, 2]}]}]}))
    result = hfmerge.merge(path, hfmerge.RunOptions(output=tmp_path / "out", progress=False))
    out = tmp_path / "out"
    vocab = check_tokenizer(out, 66, contains=IM)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    merged, base, chat = load_base_state(out), load_base_state(models["base"]), load_base_state(models["chatml"])
    torch.testing.assert_close(merged[EMBED][:64], base[EMBED])
    assert torch.count_nonzero(merged[EMBED][vocab["<|im_start|>"]]) == 0
    torch.testing.assert_close(merged[HEAD], chat[HEAD])
    assert any("'<|im_start|>' of the output vocabulary is in no merged model" in w for w in result.warnings)


def test_slices_token_source_must_feed_the_vocabulary_tensors(tmp_path, models):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "passthrough", "tokenizer": {"source": "union", "tokens": {
                                        "_tok_5": {"source": str(models["chatml"]), "force": True}}},
                                    "slices": [{"sources": [{"model": str(models["base"]), "layer_range": [0, 1]}]},
                                               {"sources": [{"model": str(models["chatml"]), "layer_range": [1, 2]}]}]}))
    with pytest.raises(RecipeError, match=r"tokenizer.tokens._tok_5.source: .*chatml.* does not feed the vocabulary tensors"):
        hfmerge.plan(path)


def test_a_missing_tokenizer_source_folder_names_its_key(tmp_path, models):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**_recipe(models), "tokenizer": {"source": str(tmp_path / "gone")}}))
    with pytest.raises(CheckpointError, match=r"r.yaml: tokenizer.source: folder .*gone' not found"):
        hfmerge.plan(path)


def test_no_copy_tokenizer_still_writes_a_tokenizer_the_recipe_names(tmp_path, models):
    recipe = {"merge_method": "linear", "base_model": str(models["base"]), "chat_template": "chatml",
              "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}} for n in ("base", "chatml")]}
    (tmp_path / "union.yaml").write_text(yaml.safe_dump({**recipe, "tokenizer_source": "union"}))
    hfmerge.merge(tmp_path / "union.yaml", hfmerge.RunOptions(output=tmp_path / "union", progress=False, copy_tokenizer=False))
    check_tokenizer(tmp_path / "union", 66, contains=IM)
    assert tokenizer(tmp_path / "union").chat_template == CHAT_TEMPLATES["chatml"]
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({**recipe, "models": [{"model": str(models["base"])}, {"model": str(models["padded"])}]}))
    hfmerge.merge(tmp_path / "plain.yaml", hfmerge.RunOptions(output=tmp_path / "plain", progress=False, copy_tokenizer=False))
    assert not (tmp_path / "plain" / "tokenizer.json").exists() and not (tmp_path / "plain" / "chat_template.jinja").exists()


def test_slerp_union(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], method="slerp", tokenizer_source="union", parameters={"t": 0.5})
    check_tokenizer(out, 66, contains=IM)
    # the base takes chatml's rows for the chat tokens; slerp weighs whole tensors, so those
    # rows come out as chatml's rows scaled by one factor (as mergekit's do)
    merged, chat = load_base_state(out)[HEAD][64:], load_base_state(models["chatml"])[HEAD][64:]
    scale = merged / chat
    torch.testing.assert_close(scale, scale.mean().expand_as(scale), rtol=1e-4, atol=1e-5)
    assert abs(float(scale.mean()) - 1) > 1e-3  # not simply chatml's rows
