"""The Fisher engine (hfmerge.fisher): diagonal Fisher in every mode and all three implementations,
offloaded parameters, Fisher files and cache, Fisher Mask Nodes, and the fisher /
fisher_nodes methods run from recipes on tiny experts trained in a fixture."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import hfmerge
from hfmerge.cli import main
from hfmerge.evaluation.tasks import Example
from hfmerge.errors import FisherError, NodeLayoutError, RecipeError
from hfmerge.fisher.diagonal import diagonal_fisher
from hfmerge.fisher.engine import FisherSettings, compute_fisher, encode_for_model, fisher_examples
from hfmerge.fisher.nodes import HEADS, NEURONS, node_layout
from hfmerge.testing import build_base, build_finetuned, keyword_rows, tiny_config, train_expert
from test_evaluation import make_tokenizer, random_examples, write_jsonl

warnings.filterwarnings("ignore", message=".*batching rule.*")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cls = {"t5": tf.T5ForConditionalGeneration, "t5_v1_1": tf.T5ForConditionalGeneration, "gpt2": tf.GPT2LMHeadModel,
           "llama": tf.LlamaForCausalLM}[family]
    model = cls(tiny_config(family)).eval()
    if family == "t5_v1_1":  # transformers ties T5's head whatever the config says; flan-T5 stores its own
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    return model, make_tokenizer(append_eos=family.startswith("t5"))


def encoded(model, tokenizer, n: int = 10, seed: int = 3):
    examples = [Example(e.prompt, e.options, j % len(e.options)) for j, e in enumerate(random_examples(n, seed=seed))]
    return examples, encode_for_model(model, tokenizer, examples)


# ---------------------------------------------------------------------------------------------
# The diagonal Fisher
# ---------------------------------------------------------------------------------------------


def assert_same_fisher(got, expected, rtol=1e-5):
    """Equal to float32 rounding: per tensor, relative to its own largest entry, and to the whole
    model's largest entry for tensors whose true Fisher is zero (BERT's key bias: softmax is
    blind to it, so both sides hold rounding noise only)."""
    assert set(got) == set(expected)
    top = max(float(v.abs().max()) for v in expected.values())
    for name in expected:
        scale = max(float(expected[name].abs().max()), 1e-6 * top)
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("family", ["t5", "t5_v1_1", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["exact", "sampled", "empirical"])
def test_hooks_vmap_and_loop_give_the_same_fisher(family, mode):
    model, tok = tiny(family)
    examples, enc = encoded(model, tok)
    labels = [e.label for e in examples]
    loop = diagonal_fisher(model, enc, labels, mode=mode, implementation="loop", seed=5)
    assert set(loop) == {n for n, _ in model.named_parameters()}
    for name in loop:
        assert float(loop[name].abs().max()) > 0, name
    for impl in ("vmap", "hooks"):
        stats = []
        got = diagonal_fisher(model, enc, labels, mode=mode, implementation=impl, seed=5, stats=stats)
        assert_same_fisher(got, loop)
        assert stats[0].implementation == impl and stats[0].num_gradients == (len(enc) if mode != "exact" else sum(len(e.option_ids) for e in enc))


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_hooks_fisher_in_small_chunks_equals_one_chunk(monkeypatch, mode):
    """Chunks never split an example (exact mode's p needs all its options; an example with
    more options than a chunk holds is a chunk of its own) and are sorted by length; the
    per-row, batched and Gram forms of Σ w·G² agree."""
    from hfmerge.fisher import hooks

    model, tok = tiny("t5", seed=7)
    examples, enc = encoded(model, tok, n=12)
    labels = [e.label for e in examples]
    assert max(len(e.option_ids) for e in enc) > 3
    whole = diagonal_fisher(model, enc, labels, mode=mode, implementation="hooks")
    monkeypatch.setattr(hooks, "HOOKS_CHUNK", 3)
    # and the other ways of summing w·G²: per row in tiles of 40 entries, or always as one product
    monkeypatch.setattr(hooks, "PER_ROW_MIN_ENTRIES", 1 if mode == "exact" else 1 << 30)
    monkeypatch.setattr(hooks, "TILE_ENTRIES", 40)
    monkeypatch.setattr(hooks, "GRAM_MAX_TOKENS", 0 if mode == "exact" else 1000)
    chunks = hooks.example_chunks([(n, k, 1.0) for n, e in enumerate(enc) for k in range(len(e.option_ids))], 3)
    assert all(len(c) <= 3 or len({n for n, _, _ in c}) == 1 for c in chunks) and len(chunks) > 4
    assert_same_fisher(diagonal_fisher(model, enc, labels, mode=mode, implementation="hooks"), whole)


def test_hooks_cover_every_parameter_of_the_tested_families_and_auto_picks_them():
    from hfmerge.fisher.diagonal import choose_implementation
    from hfmerge.fisher.hooks import uncovered_parameters

    for model in [tiny(f)[0] for f in ("t5", "t5_v1_1", "gpt2", "llama")] + [bert_classifier()]:
        assert uncovered_parameters(model) == []
        assert choose_implementation(model, "auto", offloaded=False) == "hooks"
        assert choose_implementation(model, "auto", offloaded=True) == "hooks"


def test_hooks_fisher_of_a_bert_classifier_equals_the_loop():
    model, tok = bert_classifier(seed=1), make_tokenizer(append_eos=False)
    examples = [Example(e.prompt, ("no", "yes"), j % 2) for j, e in enumerate(random_examples(7, seed=4))]
    enc = encode_for_model(model, tok, examples)
    labels = [e.label for e in examples]
    for mode in ("exact", "sampled", "empirical"):
        loop = diagonal_fisher(model, enc, labels, mode=mode, implementation="loop", seed=2)
        hooks = diagonal_fisher(model, enc, labels, mode=mode, implementation="hooks", seed=2)
        assert float(loop["bert.embeddings.position_embeddings.weight"].abs().sum()) > 0  # batch-1 ids, expanded per row
        assert_same_fisher(hooks, loop)


def test_hooks_fall_back_to_the_loop_for_parameters_they_do_not_cover(caplog):
    """A module the hooks do not know (a bare parameter) and an RMS norm that is not weight ⊙ n
    (Gemma-style 1 + weight) are computed one option at a time; the rest by the hooks."""
    import logging

    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from hfmerge.fisher.diagonal import choose_implementation
    from hfmerge.fisher.hooks import uncovered_parameters

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, inner.out_features))

        def forward(self, x):
            return self.inner(x) * self.scale

    class OnePlusRMSNorm(T5LayerNorm):
        def forward(self, x):
            return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    model, tok = tiny("t5_v1_1", seed=4)
    model.lm_head = Scaled(model.lm_head)
    norm = OnePlusRMSNorm(16)
    norm.weight.data.normal_(0, 0.1)
    model.decoder.final_layer_norm = norm
    assert uncovered_parameters(model) == ["lm_head.scale"]
    assert choose_implementation(model, "auto", offloaded=False) != "hooks"
    examples, enc = encoded(model, tok, n=5)
    labels = [e.label for e in examples]
    loop = diagonal_fisher(model, enc, labels, implementation="loop")
    with caplog.at_level(logging.INFO, logger="hfmerge.fisher.diagonal"):
        hooks = diagonal_fisher(model, enc, labels, implementation="hooks")
    assert "lm_head.scale" in caplog.text and "decoder.final_layer_norm.weight" in caplog.text
    assert_same_fisher(hooks, loop)


def naive_exact_fisher(model, examples, enc):
    """Σ_n Σ_k p_k (∇ℓ_k)² / N with ℓ_k = −(the model's own mean token loss), one option at a time."""
    params = [p for _, p in model.named_parameters()]
    total = [torch.zeros_like(p) for p in params]
    for e in enc:
        logliks = []
        for option in e.option_ids:
            out = model(input_ids=torch.tensor([e.prompt_ids]), labels=torch.tensor([option]))
            logliks.append(-out.loss)
        p = torch.softmax(torch.stack(logliks).detach().double(), 0)
        for k, ll in enumerate(logliks):
            grads = torch.autograd.grad(ll, params, retain_graph=True)
            for t, g in zip(total, grads):
                t.add_(float(p[k]) * g * g)
    return {n: t / len(enc) for (n, _), t in zip(model.named_parameters(), total)}


def test_exact_fisher_equals_a_naive_per_option_reference():
    model, tok = tiny("t5", seed=1)
    examples, enc = encoded(model, tok, n=6)
    reference = naive_exact_fisher(model, examples, enc)
    for impl in ("loop", "vmap", "hooks"):
        got = diagonal_fisher(model, enc, [0] * len(enc), implementation=impl)
        for name, ref in reference.items():
            torch.testing.assert_close(got[name], ref, rtol=1e-4, atol=1e-7 * float(ref.abs().max()))


def test_fisher_is_per_example_not_the_square_of_a_batch_sum():
    model, tok = tiny("t5", seed=2)
    examples, enc = encoded(model, tok, n=4)
    both = diagonal_fisher(model, enc[:2], [0, 0], mode="empirical")
    one = diagonal_fisher(model, enc[:1], [0], mode="empirical")
    two = diagonal_fisher(model, enc[1:2], [0], mode="empirical")
    for name in both:  # the mean of per-example squares, with no cross term
        torch.testing.assert_close(both[name], (one[name] + two[name]) / 2, rtol=1e-5, atol=1e-6 * float(both[name].abs().max()))


def test_sampled_mode_is_seeded_and_modes_differ():
    model, tok = tiny("t5", seed=3)
    examples, enc = encoded(model, tok)
    labels = [e.label for e in examples]
    a = diagonal_fisher(model, enc, labels, mode="sampled", seed=1)
    b = diagonal_fisher(model, enc, labels, mode="sampled", seed=1)
    exact = diagonal_fisher(model, enc, labels, mode="exact")
    name = "shared.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.allclose(a[name], exact[name])


def test_fisher_leaves_the_model_as_it_was():
    model, tok = tiny("t5")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    examples, enc = encoded(model, tok, n=3)
    diagonal_fisher(model, enc, [0, 0, 0], implementation="loop")
    assert model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None and p.requires_grad == flags[n]


def test_bad_fisher_requests_are_clear_errors():
    model, tok = tiny("t5")
    examples, enc = encoded(model, tok, n=2)
    with pytest.raises(FisherError, match="mode 'fuzzy'"):
        diagonal_fisher(model, enc, [0, 0], mode="fuzzy")
    with pytest.raises(FisherError, match="label 7 is out of range"):
        diagonal_fisher(model, enc, [7, 0], mode="empirical")
    with pytest.raises(FisherError, match="no examples"):
        diagonal_fisher(model, [], [])
    with pytest.raises(FisherError, match="at least one example"):
        FisherSettings(num_examples=0)


def test_fisher_with_a_block_offloaded_to_disk_equals_the_in_memory_one(tmp_path):
    from transformers import T5ForConditionalGeneration

    folder = build_base(tmp_path / "t5", "t5", seed=4)
    tok = make_tokenizer(append_eos=True)
    memory = T5ForConditionalGeneration.from_pretrained(folder).eval()
    device_map = {"shared": "cpu", "encoder.embed_tokens": "cpu", "encoder.block.0": "disk", "encoder.block.1": "cpu",
                  "encoder.final_layer_norm": "cpu", "decoder": "cpu", "lm_head": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offloaded = T5ForConditionalGeneration.from_pretrained(folder, device_map=device_map, offload_folder=str(tmp_path / "offload")).eval()
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    examples, enc = encoded(memory, tok, n=5)
    expected = diagonal_fisher(memory, enc, [0] * 5, implementation="loop")
    for impl in ("loop", "hooks"):
        stats = []
        got = diagonal_fisher(offloaded, enc, [0] * 5, implementation="auto" if impl == "hooks" else impl, stats=stats)
        assert stats[0].implementation == impl  # auto picks the hooks for an offloaded model
        assert_same_fisher(got, expected)
        assert float(got["encoder.block.0.layer.0.SelfAttention.q.weight"].abs().sum()) > 0
    with pytest.raises(FisherError, match="vmap"):
        diagonal_fisher(offloaded, enc, [0] * 5, implementation="vmap")


# ---------------------------------------------------------------------------------------------
# Fisher Mask Nodes
# ---------------------------------------------------------------------------------------------


def bert_classifier(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.BertForSequenceClassification(tiny_config("bert")).eval()


@pytest.mark.parametrize("family", ["t5", "t5_v1_1", "bert"])
def test_node_fisher_covers_every_head_and_neuron(family):
    if family == "bert":
        model, tok = bert_classifier(), make_tokenizer(append_eos=False)
        examples = [Example(e.prompt, ("no", "yes"), 1) for e in random_examples(6, seed=2)]
    else:
        model, tok = tiny(family)
        examples = random_examples(6, seed=2)
    fisher = compute_fisher(model, tok, examples, FisherSettings(kind="nodes"))
    layout = node_layout(model)
    expected_units = {"t5": 10, "t5_v1_1": 10, "bert": 4}[family]  # T5: 2 enc (attn, ffn) x2 + 2 dec (self, cross, ffn) x2
    assert len(layout.units) == expected_units and set(fisher) == {u.key for u in layout.units}
    for unit in layout.units:
        assert fisher[unit.key].shape == (unit.size,) and bool((fisher[unit.key] > 0).all())
    for name, p in model.named_parameters():  # every tensor gets an importance of a broadcastable shape
        assert torch.broadcast_shapes(layout.importance(fisher, name, p.shape).shape, p.shape) == p.shape


def test_node_fisher_equals_the_squared_gradient_of_explicit_head_masks():
    """The head mask applied at the output projection has the gradient of a mask on the heads' outputs."""
    model, tok = tiny("t5", seed=6)
    examples = [Example("w1 w2 w3 Answer:", ("yes", "no"), 0)]
    fisher = compute_fisher(model, tok, examples, FisherSettings(kind="nodes", mode="empirical"))
    enc = encode_for_model(model, tok, examples)[0]
    attention = model.encoder.block[1].layer[0].SelfAttention
    mask = torch.ones(attention.n_heads, requires_grad=True)
    original = attention.o.forward

    def masked(x):
        return original((x.view(*x.shape[:-1], attention.n_heads, -1) * mask[:, None]).view(x.shape))

    attention.o.forward = masked
    out = model(input_ids=torch.tensor([enc.prompt_ids]), labels=torch.tensor([enc.option_ids[0]]))
    (g,) = torch.autograd.grad(-out.loss, mask)
    attention.o.forward = original
    torch.testing.assert_close(fisher[HEADS + "encoder.block.1.layer.0.SelfAttention"], g * g, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("family", ["t5", "t5_v1_1"])
def test_batched_node_fisher_equals_one_row_at_a_time(family):
    """Per-row mask copies make a batch's single backward pass give every row's own gradient."""
    from hfmerge.fisher.nodes import node_fisher

    model, tok = tiny(family, seed=8)
    examples, enc = encoded(model, tok, n=9)
    labels = [e.label for e in examples]
    one = node_fisher(model, enc, labels, batch_size=1)
    batched = node_fisher(model, enc, labels, batch_size=32)
    for key in one:
        torch.testing.assert_close(batched[key], one[key], rtol=1e-4, atol=1e-6 * float(one[key].abs().max()))


def test_node_importance_spreads_to_the_right_rows():
    model, _ = tiny("t5")
    layout = node_layout(model)
    fisher = {u.key: torch.full((u.size,), 0.5) for u in layout.units}
    unit = HEADS + "encoder.block.0.layer.0.SelfAttention"
    fisher[unit] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ffn = NEURONS + "encoder.block.0.layer.1.DenseReluDense"
    fisher[ffn] = torch.arange(32, dtype=torch.float32)
    q = layout.importance(fisher, "encoder.block.0.layer.0.SelfAttention.q.weight", (16, 16))
    assert q.shape == (16, 1) and q[:4].eq(1).all() and q[4:8].eq(2).all() and q[12:].eq(4).all()  # d_kv = 4 rows per head
    assert float(layout.importance(fisher, "encoder.block.0.layer.0.SelfAttention.v.weight", (16, 16))) == 2.5  # mean head
    assert float(layout.importance(fisher, "encoder.block.0.layer.0.layer_norm.weight", (16,))) == 2.5  # the sub-layer's norm
    bias = layout.importance(fisher, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4))
    assert bias.shape == (1, 4) and bias.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]  # column per head
    wi = layout.importance(fisher, "encoder.block.0.layer.1.DenseReluDense.wi.weight", (32, 16))
    assert wi.flatten().tolist() == list(range(32))  # row per neuron
    assert float(layout.importance(fisher, "encoder.block.0.layer.1.DenseReluDense.wo.weight", (16, 32))) == 15.5
    heads = [f.mean() for k, f in fisher.items() if k.startswith(HEADS)]
    neurons = [f.mean() for k, f in fisher.items() if k.startswith(NEURONS)]
    universal = float(torch.stack(heads).mean() + torch.stack(neurons).mean())
    assert float(layout.importance(fisher, "shared.weight", (64, 16))) == pytest.approx(universal)


def test_fisher_nodes_refuses_architectures_it_cannot_mask():
    model, _ = tiny("gpt2")
    with pytest.raises(NodeLayoutError, match="use merge_method: fisher"):
        node_layout(model)


# ---------------------------------------------------------------------------------------------
# Recipes end to end, on experts trained for a few steps
# ---------------------------------------------------------------------------------------------

KEYWORDS = ("w1", "w2")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A tiny T5 base and two experts: "does the text contain w1?" and "... w2?" (yes/no)."""
    root = tmp_path_factory.mktemp("fisher-experts")
    tok = make_tokenizer(append_eos=True)
    base = build_base(root / "base", "t5", seed=11, d_model=32)
    tok.save_pretrained(base)
    data, models = [], []
    for i, kw in enumerate(KEYWORDS):
        rows = keyword_rows(48, keyword=kw, seed=i)
        for r in rows:
            r["answer"] = ["no", "yes"][r["label"]]
        path = write_jsonl(root / f"task{i}.jsonl", rows)
        data.append(path)
        pairs = [(f"Review: {r['text']} Answer:", r["answer"]) for r in rows]
        models.append(train_expert(base, root / f"expert{i}", tok, pairs, steps=30, lr=1e-2, seed=i))
    return {"root": root, "base": base, "models": models, "data": data}


def task_entries(experts, n: int | None = None) -> list[dict]:
    out = []
    for i, path in enumerate(experts["data"]):
        out.append({"task": f"has_{KEYWORDS[i]}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(path)}},
                    "validation_split": "validation", "doc_to_text": "Review: {{text}} Answer:", "doc_to_choice": ["no", "yes"],
                    "doc_to_target": "label", **({"num_validation_examples": n} if n else {})})
    return out


def write_recipe(path: Path, method: str, experts, parameters: dict | None = None, **extra) -> Path:
    recipe = {"merge_method": method, "base_model": str(experts["base"]), "models": [{"model": str(m)} for m in experts["models"]],
              "parameters": parameters or {}, "tasks": task_entries(experts, 24), **extra}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fisher_sources(recipe: Path) -> list[str]:
    return [r.source for r in hfmerge.compute_fishers(recipe, device="cpu", progress=False)]


def test_fisher_recipe_computes_caches_and_merges(experts, tmp_path):
    from hfmerge.evaluation.evaluate_model import evaluate_model
    from hfmerge.recipe import load_recipe

    recipe = write_recipe(tmp_path / "fisher.yaml", "fisher", experts, {"fisher_examples": 12})
    records = hfmerge.compute_fishers(recipe, device="cpu", progress=False)
    assert [r.source for r in records] == ["computed", "computed"]
    assert [r.task for r in records] == ["has_w1", "has_w2"] and all(r.path.is_file() for r in records)
    from safetensors import safe_open

    with safe_open(records[0].path, framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["task"] == "has_w1" and meta["num_examples"] == "12" and meta["mode"] == "exact" and meta["lambda"] == ""
    assert "shared.weight" in keys and "encoder.block.0.layer.0.SelfAttention.q.weight" in keys
    # A second run reuses the cache; a damaged entry is recomputed, never used.
    assert fisher_sources(recipe) == ["cache", "cache"]
    damaged = records[1].path
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert fisher_sources(recipe) == ["cache", "computed"]
    # Different inputs, different entry.
    other = write_recipe(tmp_path / "fisher16.yaml", "fisher", experts, {"fisher_examples": 16})
    assert fisher_sources(other) == ["computed", "computed"]
    # The merge reads the cached Fishers and evaluates the result.
    out = tmp_path / "merged"
    result = hfmerge.merge(recipe, output=out, progress=False)
    assert result.output == out and result.evaluation is not None and {r.task for r in result.evaluation.results} == {"has_w1", "has_w2"}
    report = evaluate_model(out, load_recipe(recipe).tasks, progress=False)
    assert 0.0 <= report.average <= 1.0 and (out / "eval_results.json").is_file()


def test_fisher_merge_with_equal_fishers_is_averaging_and_a_dominant_fisher_wins(experts, tmp_path):
    from safetensors.torch import load_file, save_file

    from hfmerge.testing import load_base_state

    states = [load_base_state(m) for m in experts["models"]]
    ones = tmp_path / "ones.safetensors"
    save_file({k: torch.ones_like(v) for k, v in states[0].items()}, ones)
    big = tmp_path / "big.safetensors"
    save_file({k: torch.full_like(v, 1e6) for k, v in states[0].items()}, big)
    for files, expected in (([ones, ones], lambda a, b: (a + b) / 2), ([big, ones], lambda a, b: a)):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [{"model": str(m), "fisher": str(f)} for m, f in zip(experts["models"], files)]}))
        out = tmp_path / f"out-{files[0].stem}"
        assert hfmerge.merge(recipe, output=out, progress=False).output == out
        merged = load_file(out / "model.safetensors")
        for name, value in merged.items():
            torch.testing.assert_close(value, expected(states[0][name], states[1][name]), rtol=1e-5, atol=1e-6)


def test_fisher_nodes_recipe_on_trained_t5_experts(experts, tmp_path):
    recipe = write_recipe(tmp_path / "nodes.yaml", "fisher_nodes", experts, {"fisher_examples": 12})
    out = tmp_path / "merged"
    assert hfmerge.merge(recipe, output=out, progress=False).output == out
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results["tasks"]) == {"has_w1", "has_w2"}
    from safetensors.torch import load_file

    from hfmerge.testing import load_base_state

    merged = load_file(out / "model.safetensors")
    a, b = (load_base_state(m) for m in experts["models"])
    for name, value in merged.items():  # a per-entry convex combination of the two experts
        lo, hi = torch.minimum(a[name], b[name]), torch.maximum(a[name], b[name])
        assert bool(((value >= lo - 1e-6) & (value <= hi + 1e-6)).all()), name


@pytest.mark.parametrize("family", ["t5_v1_1", "bert"])
def test_fisher_nodes_recipe_on_other_architectures(family, tmp_path):
    import transformers as tf

    if family == "bert":
        torch.manual_seed(0)
        base = tmp_path / "base"
        tf.BertForSequenceClassification(tiny_config("bert")).save_pretrained(base)
    else:
        base = build_base(tmp_path / "base", family, seed=0)
    make_tokenizer(append_eos=family != "bert").save_pretrained(base)
    models = [build_finetuned(base, tmp_path / f"ft{i}", seed=i, scale=0.05) for i in range(2)]
    rows = keyword_rows(10, keyword="w1", seed=0)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    task = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}}, "validation_split": "validation",
            "doc_to_text": "Review: {{text}} Answer:", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher_nodes", "base_model": str(base), "tokenizer_source": str(base),
                                      "models": [{"model": str(m)} for m in models], "parameters": {"fisher_examples": 6},
                                      "tasks": [dict(task, task="a"), dict(task, task="b")]}))
    out = tmp_path / "out"
    result = hfmerge.merge(recipe, output=out, evaluate=False, progress=False)
    assert result.output == out and result.evaluation is None
    loaded = tf.AutoModelForSequenceClassification.from_pretrained(out) if family == "bert" else tf.AutoModelForSeq2SeqLM.from_pretrained(out)
    assert sum(p.numel() for p in loaded.parameters()) > 0


def test_fisher_examples_are_drawn_once_with_the_seed(experts):
    from hfmerge.evaluation.tasks import load_task_data, parse_tasks

    spec = parse_tasks(task_entries(experts), source="r.yaml")[0]
    data = load_task_data(spec, ("validation",))
    a = fisher_examples(data, 10, seed=0)
    assert a == fisher_examples(data, 10, seed=0) and len(a) == 10
    assert a != fisher_examples(data, 10, seed=1)
    assert fisher_examples(data, 1000, seed=0) == data.validation


def test_a_fisher_recipe_without_files_or_tasks_fails_before_loading(experts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [{"model": str(m)} for m in experts["models"]]}))
    with pytest.raises(RecipeError, match=r"models\[0\]\.fisher: missing"):
        hfmerge.merge(recipe, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    recipe.write_text(yaml.safe_dump({"merge_method": "average", "models": [{"model": str(m)} for m in experts["models"]]}))
    with pytest.raises(RecipeError, match="uses no Fisher"):
        hfmerge.compute_fishers(recipe, progress=False)


def test_fisher_through_an_accelerate_device_map_with_disk_offload_equals_the_in_memory_one(experts, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "fisher.yaml", "fisher", experts, {"fisher_examples": 6, "fisher_mode": "empirical"})
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache-memory"))
    assert main(["fisher", str(recipe), "-q", "--device", "cpu", "--copy-to", str(tmp_path / "memory")]) == 0
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache-offload"))
    assert main(["fisher", str(recipe), "-q", "--device", "cpu", "--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "offload"),
                 "--copy-to", str(tmp_path / "offloaded")]) == 0
    # Those settings really offload: the model the engine loads has parameters off-device.
    from hfmerge.fisher.models import load_model_device_map
    from hfmerge.fisher.offload import is_offloaded
    from hfmerge.planning import build_plan
    from hfmerge.recipe import load_recipe

    plan = build_plan(load_recipe(recipe))
    offloaded = load_model_device_map(plan.models[0], device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload")
    assert is_offloaded(offloaded)
    for name in ("0-expert0.fisher.safetensors", "1-expert1.fisher.safetensors"):
        a, b = load_file(tmp_path / "memory" / name), load_file(tmp_path / "offloaded" / name)
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6 * float(a[key].abs().max()))


def test_every_fisher_implementation_is_a_recipe_choice(experts, tmp_path):
    from hfmerge.fisher.diagonal import IMPLEMENTATIONS
    from hfmerge.fisher.engine import settings_from_recipe
    from hfmerge.recipe import load_recipe

    for implementation in IMPLEMENTATIONS:
        recipe = write_recipe(tmp_path / f"{implementation}.yaml", "fisher", experts, {"fisher_implementation": implementation})
        assert settings_from_recipe(load_recipe(recipe)).implementation == implementation
    with pytest.raises(RecipeError, match="fisher_implementation"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", "fisher", experts, {"fisher_implementation": "hook"}))


def test_a_checkpoint_that_stores_its_lm_head_apart_is_loaded_untied(tmp_path):
    """transformers 5 ties T5's lm_head to the embedding whatever the config says; a flan-T5
    checkpoint stores its own head, and the live model must use it, as from_pretrained does."""
    import transformers

    from hfmerge.checkpoints import open_checkpoint
    from hfmerge.fisher.models import load_model
    from hfmerge.refs import parse_model_ref

    folder = build_base(tmp_path / "flan", "t5_v1_1")
    ckpt = open_checkpoint(parse_model_ref(str(folder)), label="flan")
    model = load_model(ckpt)
    reference = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    torch.testing.assert_close(model.lm_head.weight, ckpt.read("lm_head.weight"))
    torch.testing.assert_close(model.shared.weight, ckpt.read("shared.weight"))
    ids, labels = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[8, 9, 1]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, labels=labels).logits, reference(input_ids=ids, labels=labels).logits)
    # The Fisher then has one entry per stored tensor: the head's is not the embedding's.
    examples, enc = encoded(model, make_tokenizer(append_eos=True))
    fisher = diagonal_fisher(model, enc, [e.label for e in examples], implementation="loop")
    assert "lm_head.weight" in fisher and "shared.weight" in fisher
    assert not torch.equal(fisher["lm_head.weight"], fisher["shared.weight"])
