"""Tasks, rank-classification scoring, metrics and ``hfmerge eval`` (hfmerge.evaluation).

Everything runs offline on tiny models built here: a WordLevel tokenizer wrapped in
`PreTrainedTokenizerFast` and saved beside tiny T5 / GPT-2 / Llama checkpoints.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import hfmerge
from hfmerge.errors import EvaluationError, HfMergeError, MetricError, OptionError, RecipeError, TaskError
from hfmerge.evaluation import evaluate_model as evaluate_model_module
from hfmerge.cli import main as hfmerge_main
from hfmerge.evaluation.evaluate_model import EvalReport, TaskEvaluator, TaskResult, evaluate_model
from hfmerge.evaluation.metrics import LOCAL_METRICS, compute_metric, resolve_metric
from hfmerge.evaluation.scoring import OptionScores, score_options, score_options_naive
from hfmerge.evaluation.tasks import Example, load_task_data, load_tasks_file, match_tasks_to_models, parse_tasks
from hfmerge.testing import build_base

WORDS = [f"w{i}" for i in range(52)] + ["yes", "no", "maybe", "great", "terrible", "Answer:", "Review:", "Sentiment:"]
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]
VOCAB = SPECIALS + WORDS  # 64 entries: the tiny configs' vocabulary size


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads
    spin-waiting for each other make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tokenizer(append_eos: bool):
    """A whitespace WordLevel tokenizer; `append_eos` makes it close inputs with </s> like T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints with a tokenizer saved in each folder (loadable with Auto* classes)."""
    root = tmp_path_factory.mktemp("eval-models")
    out = {}
    for i, family in enumerate(("t5", "t5_v1_1", "gpt2", "llama")):
        folder = build_base(root / family, family, seed=10 + i)
        make_tokenizer(append_eos=family.startswith("t5")).save_pretrained(folder)
        out[family] = folder
    return out


def load(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def random_examples(n: int, seed: int = 0) -> list[Example]:
    """Prompts of 1-10 words and 2-4 options of 1-3 words: ragged in both directions."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS[:52]) for _ in range(rng.randint(1, 10))) + " Answer:"
        options = tuple(" ".join(rng.choice(WORDS[:60]) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 4)))
        examples.append(Example(prompt, options, 0))
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS[:52]) for _ in range(rng.randint(2, 6))), "label": i % 2, "answer": ["no", "yes"][i % 2],
             "options": ["no", "yes", "maybe"][: 2 + i % 2]} for i in range(n)]


def task(tmp_path: Path, rows: list[dict] | None = None, **overrides) -> dict:
    """A valid task mapping over a jsonl file in tmp_path (relative path), with overrides."""
    write_jsonl(tmp_path / "val.jsonl", sentiment_rows(12) if rows is None else rows)
    entry = {
        "task": "sentiment", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "val.jsonl"}},
        "validation_split": "validation", "doc_to_text": "Review: {{text}} Sentiment:", "doc_to_choice": ["no", "yes"],
        "doc_to_target": "label",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def parse_one(tmp_path: Path, entry: dict):
    return parse_tasks([entry], source="recipe.yaml", base_dir=tmp_path)[0]


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["t5", "t5_v1_1", "gpt2", "llama"])
def test_batched_scores_equal_naive_loop(tiny_models, family):
    model, tokenizer = load(tiny_models[family])
    examples = random_examples(24, seed=1)
    naive = score_options_naive(model, tokenizer, examples)
    for batch_size in (1, 5, 64):  # one pair per pass, ragged batches cutting examples, everything at once
        batched = score_options(model, tokenizer, examples, batch_size=batch_size)
        assert len(batched) == len(examples)
        for b, n, e in zip(batched, naive, examples):
            assert len(b.logprob_sums) == len(e.options)
            assert b.num_tokens == n.num_tokens
            assert b.logprob_sums == pytest.approx(n.logprob_sums, abs=1e-5)
            assert b.mean_logprobs == pytest.approx(n.mean_logprobs, abs=1e-5)


def test_encoder_decoder_counts_eos_decoder_only_does_not(tiny_models):
    example = [Example("w1 w2 Answer:", ("yes", "w3 w4 w5"), 0)]
    t5, t5_tok = load(tiny_models["t5"])
    gpt2, gpt2_tok = load(tiny_models["gpt2"])
    assert score_options(t5, t5_tok, example)[0].num_tokens == (2, 4)
    assert score_options(gpt2, gpt2_tok, example)[0].num_tokens == (1, 3)


def test_scoring_is_deterministic_and_restores_training_mode(tiny_models):
    model, tokenizer = load(tiny_models["t5"])
    model.train()  # dropout on: the scorer must switch it off
    examples = random_examples(6, seed=2)
    first = score_options(model, tokenizer, examples, batch_size=4)
    second = score_options(model, tokenizer, examples, batch_size=4)
    assert first == second
    assert model.training


def test_decoder_only_prompt_longer_than_model_is_truncated_on_the_left(tiny_models):
    model, tokenizer = load(tiny_models["gpt2"])  # 32 positions
    long_prompt = " ".join(["w1"] * 40) + " Answer:"
    long = score_options(model, tokenizer, [Example(long_prompt, ("yes", "no"), 0)])[0]
    # Truncation keeps the last 32 - 1 tokens of the prompt for a 1-token option.
    kept = " ".join(["w1"] * 30) + " Answer:"
    assert long.logprob_sums == pytest.approx(score_options(model, tokenizer, [Example(kept, ("yes", "no"), 0)])[0].logprob_sums, abs=1e-5)


def _set_t5_logits(model, logits: torch.Tensor) -> None:
    """Make a T5 v1.1 model output `logits` at every decoder step, whatever the input.

    With every token embedding equal, every position of every sequence carries the same
    vector through the network (attention averages identical values), so the decoder's final
    hidden state is one constant vector h; an lm_head of outer(logits, h) / |h|^2 then maps it
    to exactly `logits`.
    """
    with torch.no_grad():
        model.shared.weight.fill_(0.5)
        probe = model(input_ids=torch.tensor([[5, 6, 1]]), decoder_input_ids=torch.tensor([[0, 7]]), output_hidden_states=True)
        h = probe.decoder_hidden_states[-1][0, 0]
        assert torch.allclose(probe.decoder_hidden_states[-1][0, 1], h, atol=1e-5)
        model.lm_head.weight.copy_(torch.outer(logits, h) / h.dot(h))


def _set_gpt2_logits(model, logits: torch.Tensor) -> None:
    """Make a GPT-2 model output `logits` at every position: ln_f's weight 0 and bias e_0 make
    the final hidden state e_0, and the (tied) lm_head row of token t is wte[t], so column 0
    of wte becomes the logits."""
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = logits


@pytest.mark.parametrize("family", ["t5_v1_1", "gpt2"])
def test_hand_set_model_prefers_the_known_option(tiny_models, family):
    model, tokenizer = load(tiny_models[family])
    yes, eos = VOCAB.index("yes"), VOCAB.index("</s>")
    logits = torch.zeros(len(VOCAB))
    logits[yes] = 6.0
    logits[eos] = 2.0
    (_set_t5_logits if family.startswith("t5") else _set_gpt2_logits)(model, logits)
    examples = [Example(p, opts, 0) for p, opts in [
        ("w1 w2 Answer:", ("yes", "no")),
        ("w9 Answer:", ("no", "maybe", "yes")),
        ("Answer:", ("great", "yes", "terrible", "no")),
    ]]
    scores = score_options(model, tokenizer, examples, batch_size=3)
    assert [s.best() for s in scores] == [0, 2, 1]
    # The exact values: log-softmax of the fixed logits, averaged over the option's tokens.
    logp = torch.log_softmax(logits.double(), dim=0).tolist()
    if family.startswith("t5"):  # option token + EOS
        assert scores[0].mean_logprobs == pytest.approx([(logp[yes] + logp[eos]) / 2, (logp[VOCAB.index("no")] + logp[eos]) / 2], abs=1e-4)
    else:
        assert scores[0].mean_logprobs == pytest.approx([logp[yes], logp[VOCAB.index("no")]], abs=1e-4)
    # And through the whole evaluation: labels pointing at "yes" score 1, at "no" 0.
    report = evaluate_model(model, [in_memory_task("yes-task", [Example(e.prompt, e.options, e.options.index("yes")) for e in examples])],
                            tokenizer=tokenizer, progress=False)
    assert report.scores == {"yes-task": 1.0}


def in_memory_task(name: str, examples: list[Example]):
    """A loaded task over in-memory examples (no file), for scorer-level tests."""
    from hfmerge.evaluation.tasks import TaskData, TaskSpec

    spec = TaskSpec(name=name, key="tasks[0]", source="test", dataset_path="memory", validation_split="validation",
                    metrics=(resolve_metric("accuracy"),))
    return TaskData(spec, validation=examples)


def test_option_scores_normalisations():
    s = OptionScores((-4.0, -3.0), (4, 1))
    assert s.mean_logprobs == (-1.0, -3.0)
    assert s.best() == 0 and s.best("none") == 1
    assert s.normalized("char", ["abcd", "x"]) == (-1.0, -3.0)
    assert OptionScores((-1.0, -1.0), (1, 1)).best() == 0  # ties go to the first option
    with pytest.raises(ValueError):
        s.normalized("bytes")


# ---------------------------------------------------------------------------------------------
# Task parsing
# ---------------------------------------------------------------------------------------------


def test_parse_defaults_and_relative_paths(tmp_path):
    spec = parse_one(tmp_path, task(tmp_path))
    assert spec.name == "sentiment" and spec.key == "tasks[0]"
    assert spec.dataset_kwargs["data_files"] == {"validation": str(tmp_path / "val.jsonl")}
    assert [m.name for m in spec.metrics] == ["accuracy"]
    assert spec.seed == 0 and spec.normalization == "token" and spec.target_delimiter == " "
    assert spec.num_validation_examples is None and spec.test_split is None and spec.model is None


def test_a_pasted_harness_task_works(tmp_path):
    """An lm-evaluation-harness multiple-choice task, keys it ignores included."""
    write_jsonl(tmp_path / "boolq.jsonl", [{"passage": f"w{i} w2", "question": "w3 w4", "label": i % 2} for i in range(6)])
    entry = {
        "task": "boolq", "tag": ["super-glue-lm-eval-v1"], "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": "boolq.jsonl", "validation": "boolq.jsonl"}},
        "output_type": "multiple_choice", "training_split": "train", "validation_split": "validation",
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label", "doc_to_choice": ["no", "yes"],
        "should_decontaminate": True, "doc_to_decontamination_query": "passage",
        "metric_list": [{"metric": "acc"}], "metadata": {"version": 2.0}, "num_fewshot": 0,
    }
    spec = parse_one(tmp_path, entry)
    data = load_task_data(spec)
    assert data.validation[0] == Example("w0 w2\nQuestion: w3 w4?\nAnswer:", ("no", "yes"), 0)
    assert [m.name for m in spec.metrics] == ["acc"] and spec.metrics[0].module == "accuracy"


@pytest.mark.parametrize(("change", "path", "needle"), [
    ({"doc_to_txt": "x"}, "tasks[0].doc_to_txt", "did you mean 'doc_to_text'"),
    ({"task": None}, "tasks[0].task", "missing"),
    ({"doc_to_choice": ["only"]}, "tasks[0].doc_to_choice", "at least two options"),
    ({"doc_to_target": 5}, "tasks[0].doc_to_target", "out of range"),
    ({"validation_split": "val"}, "tasks[0].validation_split", "'validation'"),
    ({"validation_split": None}, "tasks[0].validation_split", "missing"),
    ({"dataset_kwargs": {"data_files": {"validation": "nope.jsonl"}}}, "tasks[0].dataset_kwargs.data_files.validation", "data file not found"),
    ({"dataset_kwargs": None}, "tasks[0].dataset_kwargs.data_files", "missing"),
    ({"dataset_path": "val.jsonl", "dataset_kwargs": None}, "tasks[0].dataset_path", "write dataset_path: json"),
    ({"dataset_path": "./no/such/folder", "dataset_kwargs": None}, "tasks[0].dataset_path", "folder not found"),
    ({"output_type": "loglikelihood"}, "tasks[0].output_type", "expected multiple_choice (rank classification over options, the default) or generate_until"),
    ({"num_fewshot": 5}, "tasks[0].num_fewshot", "few-shot"),
    ({"process_docs": "x"}, "tasks[0].process_docs", "not supported"),
    ({"validation_fraction": 1.5}, "tasks[0].validation_fraction", "(0, 1]"),
    ({"test_fraction": 0.5}, "tasks[0].test_fraction", "needs test_split"),
    ({"test_split": "validation", "validation_fraction": 0.7, "test_fraction": 0.5}, "tasks[0].test_fraction", "> 1"),
    ({"limit": 5, "num_validation_examples": 3}, "tasks[0].limit", "not both"),
    ({"num_validation_examples": 0}, "tasks[0].num_validation_examples", "positive"),
    ({"seed": "x"}, "tasks[0].seed", "whole number"),
    ({"normalization": "bytes"}, "tasks[0].normalization", "token, none, char"),
    ({"metric_list": []}, "tasks[0].metric_list", "non-empty"),
    ({"metric_list": [{"metric": "acc"}, {"metric": "acc"}]}, "tasks[0].metric_list[1].metric", "twice"),
    ({"metric_list": [{"metric": "./missing_metric"}]}, "tasks[0].metric_list[0].metric", "not an evaluate module"),
    ({"model": -1}, "tasks[0].model", "index"),
    ({"dataset_kwargs": {"data_files": {"validation": "val.jsonl"}, "trust_remote_code": True}}, "tasks[0].dataset_kwargs.trust_remote_code", "never run"),
])
def test_bad_task_keys_are_named(tmp_path, change, path, needle):
    entry = task(tmp_path)
    for k, v in change.items():
        if v is None:
            entry.pop(k, None)
        else:
            entry[k] = v
    with pytest.raises(TaskError) as info:
        parse_one(tmp_path, entry)
    message = str(info.value)
    assert message.startswith(f"recipe.yaml: {path}: "), message
    assert needle in message, message
    assert isinstance(info.value, RecipeError) and isinstance(info.value, HfMergeError)


def test_task_list_errors(tmp_path):
    entry = task(tmp_path)
    assert parse_tasks(None, source="r", base_dir=tmp_path) == []
    with pytest.raises(TaskError, match=r"^r: tasks: got"):
        parse_tasks({"task": "x"}, source="r", base_dir=tmp_path)
    with pytest.raises(TaskError, match=r"tasks\[1\]\.task: the name 'sentiment' is already used by tasks\[0\]"):
        parse_tasks([entry, dict(entry)], source="r", base_dir=tmp_path)
    with pytest.raises(TaskError, match=r"tasks\[0\]: got 'sst2'; expected a task mapping"):
        parse_tasks(["sst2"], source="r", base_dir=tmp_path)


def test_hub_dataset_is_accepted_when_parsed_and_fails_clearly_offline(tmp_path):
    spec = parse_one(tmp_path, task(tmp_path, dataset_path="glue", dataset_name="sst2", dataset_kwargs=None,
                                    doc_to_text="{{sentence}}"))
    assert spec.dataset_path == "glue" and spec.dataset_name == "sst2"
    with pytest.raises(TaskError, match=r"tasks\[0\]\.validation_split: could not load split 'validation' of glue \(sst2\) for task 'sentiment'.*network"):
        load_task_data(spec)


def test_function_tags_are_reported(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", sentiment_rows(4))
    (tmp_path / "recipe.yaml").write_text(
        "merge_method: task_arithmetic\ntasks:\n  - task: t\n    dataset_path: json\n    dataset_kwargs: {data_files: {validation: val.jsonl}}\n"
        "    validation_split: validation\n    doc_to_text: !function utils.doc_to_text\n    doc_to_choice: [no, yes]\n    doc_to_target: label\n")
    with pytest.raises(TaskError, match=r"tasks\[0\]\.doc_to_text: '!function utils.doc_to_text' is not supported"):
        load_tasks_file(tmp_path / "recipe.yaml")


def test_match_tasks_to_models(tmp_path):
    a, b = task(tmp_path, task="a"), task(tmp_path, task="b")
    two = parse_tasks([a, b], base_dir=tmp_path)
    assert match_tasks_to_models(two, ["org/x", "org/y"]) == [0, 1]  # one task per model, in order
    assert match_tasks_to_models(two, ["org/x"]) == [None, None]  # evaluation-only tasks
    by_ref = parse_tasks([{**a, "model": "org/y"}, {**b, "model": 0}], base_dir=tmp_path)
    assert match_tasks_to_models(by_ref, ["org/x@main", "org/y"]) == [1, 0]
    with pytest.raises(TaskError, match=r"tasks\[0\]\.model: 'org/z' is not one of the recipe's models"):
        match_tasks_to_models(parse_tasks([{**a, "model": "org/z"}], base_dir=tmp_path), ["org/x"])
    with pytest.raises(TaskError, match="out of range"):
        match_tasks_to_models(parse_tasks([{**a, "model": 3}], base_dir=tmp_path), ["org/x"])
    with pytest.raises(TaskError, match="already has task 'a'"):
        match_tasks_to_models(parse_tasks([{**a, "model": 0}, {**b, "model": 0}], base_dir=tmp_path), ["org/x"])


# ---------------------------------------------------------------------------------------------
# Data loading and rendering
# ---------------------------------------------------------------------------------------------


def test_choice_and_target_forms(tmp_path):
    rows = sentiment_rows(6)
    cases = [
        ({"doc_to_choice": ["no", "yes"], "doc_to_target": "label"}, lambda r: (("no", "yes"), r["label"])),
        ({"doc_to_choice": ["no", "yes"], "doc_to_target": "answer"}, lambda r: (("no", "yes"), ["no", "yes"].index(r["answer"]))),
        ({"doc_to_choice": "options", "doc_to_target": "answer"}, lambda r: (tuple(r["options"]), r["options"].index(r["answer"]))),
        ({"doc_to_choice": "{{ options }}", "doc_to_target": "{{ label }}"}, lambda r: (tuple(r["options"]), r["label"])),
        ({"doc_to_choice": "{{ ['bad', 'good'] }}", "doc_to_target": 1}, lambda r: (("bad", "good"), 1)),
        ({"doc_to_choice": {"a": "no", "b": "yes"}, "doc_to_target": "{{ answer }}"}, lambda r: (("no", "yes"), r["label"])),
    ]
    for change, expected in cases:
        data = load_task_data(parse_one(tmp_path, task(tmp_path, rows, **change)))
        assert [(e.options, e.label) for e in data.validation] == [expected(r) for r in rows], change


def test_description_and_field_prompt(tmp_path):
    rows = sentiment_rows(3)
    data = load_task_data(parse_one(tmp_path, task(tmp_path, rows, doc_to_text="text", description="Classify. ")))
    assert [e.prompt for e in data.validation] == [f"Classify. {r['text']}" for r in rows]


def test_csv_parquet_and_saved_dataset_folders(tmp_path):
    import datasets

    rows = [{"text": r["text"], "label": r["label"]} for r in sentiment_rows(8)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "val.csv"), index=False)
    ds.to_parquet(str(tmp_path / "val.parquet"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))
    expected = [Example(f"Review: {r['text']} Sentiment:", ("no", "yes"), r["label"]) for r in rows]
    base = task(tmp_path)
    for change in ({"dataset_path": "csv", "dataset_kwargs": {"data_files": {"validation": "val.csv"}}},
                   {"dataset_path": "parquet", "dataset_kwargs": {"data_files": {"validation": "val.parquet"}}},
                   {"dataset_path": "saved", "dataset_kwargs": None}):
        entry = {**base, **{k: v for k, v in change.items() if v is not None}}
        if change.get("dataset_kwargs", 1) is None:
            entry.pop("dataset_kwargs")
        assert load_task_data(parse_one(tmp_path, entry)).validation == expected, change


def test_fractions_carve_disjoint_reproducible_splits(tmp_path):
    rows = [{"text": f"w{i}", "label": i % 2} for i in range(40)]
    entry = task(tmp_path, rows, test_split="validation", validation_fraction=0.25, seed=3)
    first = load_task_data(parse_one(tmp_path, entry))
    again = load_task_data(parse_one(tmp_path, entry))
    assert len(first.validation) == 10 and len(first.test) == 30  # the test split gets the rest
    val, test = {e.prompt for e in first.validation}, {e.prompt for e in first.test}
    assert not val & test and len(val | test) == 40
    assert first.validation == again.validation
    other_seed = load_task_data(parse_one(tmp_path, {**entry, "seed": 4}))
    assert other_seed.validation != first.validation
    both = load_task_data(parse_one(tmp_path, {**entry, "test_fraction": 0.5}))
    assert len(both.validation) == 10 and len(both.test) == 20
    assert not {e.prompt for e in both.validation} & {e.prompt for e in both.test}


def test_subsets_and_limit(tmp_path):
    rows = [{"text": f"w{i}", "label": i % 2} for i in range(30)]
    sub = load_task_data(parse_one(tmp_path, task(tmp_path, rows, num_validation_examples=7, seed=1)))
    assert len(sub.validation) == 7
    assert sub.validation == load_task_data(parse_one(tmp_path, task(tmp_path, rows, num_validation_examples=7, seed=1))).validation
    assert [e.prompt for e in sub.validation] != [f"Review: w{i} Sentiment:" for i in range(7)]  # random, not the first
    limited = load_task_data(parse_one(tmp_path, task(tmp_path, rows, limit=4)))
    assert [e.prompt for e in limited.validation] == [f"Review: w{i} Sentiment:" for i in range(4)]
    everything = load_task_data(parse_one(tmp_path, task(tmp_path, rows, num_validation_examples=100)))
    assert len(everything.validation) == 30


@pytest.mark.parametrize(("rows", "change", "key", "needle"), [
    # template fields not in the data: the task, the key and the field are named
    (None, {"doc_to_text": "Review: {{txt}} Sentiment:"}, "doc_to_text", "template field 'txt' is not in the data of task 'sentiment' (validation split fields: text, label, answer, options); did you mean 'text'?"),
    (None, {"doc_to_target": "labels"}, "doc_to_target", "field 'labels' is not in the data of task 'sentiment'"),
    (None, {"doc_to_choice": "choices"}, "doc_to_choice", "field 'choices' is not in the data"),
    (None, {"description": "{{ topic }}: "}, "description", "template field 'topic'"),
    (None, {"doc_to_text": "{{ text.nope }}"}, "doc_to_text", "example 0 of split 'validation' of task 'sentiment'"),
    # labels
    ([{"text": "w1", "label": 0}, {"text": "w2", "label": 2}], {}, "doc_to_target", "example 1 of split 'validation' of task 'sentiment': label 2 is out of range for 2 options (0..1)"),
    ([{"text": "w1", "label": -1}], {}, "doc_to_target", "without labels"),
    ([{"text": "w1", "label": "maybe"}], {}, "doc_to_target", "label 'maybe' is not among the options ['no', 'yes']"),
    # options
    ([{"text": "w1", "opts": ["yes"], "label": 0}], {"doc_to_choice": "opts"}, "doc_to_choice", "got 1 option(s) ['yes']; expected at least two"),
    ([{"text": "w1", "opts": "yes", "label": 0}], {"doc_to_choice": "opts"}, "doc_to_choice", "not a list literal"),
    ([{"text": "w1", "opts": ["yes", ""], "label": 0}], {"doc_to_choice": "opts"}, "doc_to_choice", "option 1 is empty"),
    # an empty split
    ([], {}, "validation_split", "split 'validation' of task 'sentiment' is empty"),
    ([{"text": "w1", "label": 0}], {"validation_fraction": 0.2}, "validation_fraction", "leaves no validation examples"),
])
def test_bad_data_is_reported_before_any_model(tmp_path, rows, change, key, needle):
    entry = task(tmp_path, rows, **change)
    if rows == []:
        (tmp_path / "val.jsonl").write_text("")
    with pytest.raises(TaskError) as info:
        load_task_data(parse_one(tmp_path, entry))
    message = str(info.value)
    assert message.startswith(f"recipe.yaml: tasks[0].{key}: "), message
    assert needle in message, message


def test_evaluate_model_checks_tasks_before_loading_the_model(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(evaluate_model_module, "load_model_for_eval", no_model)
    spec = parse_one(tmp_path, task(tmp_path, doc_to_text="{{ missing_field }}"))
    with pytest.raises(TaskError, match="missing_field"):
        evaluate_model(tmp_path / "no-model-here", [spec], progress=False)
    bad_metric = parse_one(tmp_path, task(tmp_path, metric_list=[{"metric": "bleu"}]))  # a Hub metric, offline
    with pytest.raises(MetricError, match="metric 'bleu' could not be loaded"):
        evaluate_model(tmp_path / "no-model-here", [bad_metric], progress=False)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_local_metric_modules_work_offline_and_agree_with_references():
    import numpy as np
    from scipy import stats

    rng = random.Random(0)
    preds = [rng.randrange(2) for _ in range(50)]
    refs = [rng.randrange(2) for _ in range(50)]
    m = lambda name, **kw: compute_metric(resolve_metric(name, kw), preds, refs)  # noqa: E731
    assert m("accuracy") == pytest.approx(np.mean(np.array(preds) == np.array(refs)))
    assert m("acc") == m("accuracy")
    tp = sum(p == r == 1 for p, r in zip(preds, refs))
    fp = sum(p == 1 and r == 0 for p, r in zip(preds, refs))
    fn = sum(p == 0 and r == 1 for p, r in zip(preds, refs))
    assert m("f1") == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # For two classes MCC is the Pearson correlation of the labels (phi coefficient).
    assert m("matthews_correlation") == pytest.approx(np.corrcoef(preds, refs)[0, 1])
    assert m("mcc") == m("matthews_correlation")
    assert m("pearsonr") == pytest.approx(stats.pearsonr(refs, preds)[0])
    assert m("spearmanr") == pytest.approx(stats.spearmanr(refs, preds)[0])
    three = [0, 1, 2, 2, 1, 0]
    macro = compute_metric(resolve_metric("f1", {"average": "macro"}), three, [0, 2, 2, 2, 1, 1])
    assert macro == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    with pytest.raises(MetricError, match="average='binary' needs at most two classes"):
        compute_metric(resolve_metric("f1"), three, [0, 2, 2, 2, 1, 1])
    assert set(LOCAL_METRICS) == {"accuracy", "f1", "matthews_correlation", "spearmanr", "pearsonr", "exact_match"}


def test_correlation_metrics_use_numeric_option_values():
    options = [("1.0", "2.0", "4.0")] * 4
    spec = resolve_metric("pearsonr")
    # indices 0,1,2 map to 1,2,4: predicting the truth exactly gives 1 whatever the spacing
    assert compute_metric(spec, [0, 1, 2, 1], [0, 1, 2, 1], options) == pytest.approx(1.0)
    assert compute_metric(spec, [0, 1, 2, 2], [0, 1, 2, 1], options) == pytest.approx(
        float(__import__("numpy").corrcoef([1, 2, 4, 4], [1, 2, 4, 2])[0, 1]))


def test_metric_module_folder_of_ones_own(tmp_path):
    source = (Path(__file__).parents[1] / "hfmerge/evaluation/metric_modules/accuracy/accuracy.py").read_text()
    (tmp_path / "my_acc").mkdir()
    (tmp_path / "my_acc" / "my_acc.py").write_text(source)
    spec = parse_one(tmp_path, task(tmp_path, metric_list=[{"metric": "my_acc/"}]))
    assert spec.metrics[0].module == str((tmp_path / "my_acc").resolve())
    assert compute_metric(spec.metrics[0], [1, 0], [1, 1]) == 0.5


def test_acc_norm_uses_character_normalisation(tmp_path):
    # Option 0: sum -4 over 4 tokens and 2 characters; option 1: sum -3 over 1 token and 9 characters.
    scores = [OptionScores((-4.0, -3.0), (4, 1))]
    assert scores[0].best("token") == 0 and scores[0].best("char", ["ab", "abcdefghi"]) == 1
    assert resolve_metric("acc_norm").normalization == "char" and resolve_metric("acc").normalization is None


# ---------------------------------------------------------------------------------------------
# Reports and the command line
# ---------------------------------------------------------------------------------------------


def test_report_table_json_and_model_index():
    results = [
        TaskResult("rte", "validation", "validation", 64, {"accuracy": 0.5625}, "accuracy", [0, 1], "super_glue", "rte", {"accuracy": "accuracy"}),
        TaskResult("cola", "validation", "validation", 32, {"mcc": 0.25, "acc": 0.75}, "mcc", [1], "glue", "cola",
                   {"mcc": "matthews_correlation", "acc": "accuracy"}),
        TaskResult("stsb", "validation", "validation", 8, {"pearsonr": float("nan")}, "pearsonr", [], "local", None, {"pearsonr": "pearsonr"}),
    ]
    report = EvalReport("some/model", "validation", results[:2], 1.5)
    assert report.average == pytest.approx((0.5625 + 0.25) / 2)
    table = report.to_table()
    assert "rte" in table and "0.5625" in table and "0.4062" in table and table.splitlines()[-1].startswith("average")
    data = json.loads(report.to_json())
    assert data["tasks"]["cola"]["metrics"] == {"mcc": 0.25, "acc": 0.75} and data["average"] == pytest.approx(0.40625)
    nan_report = EvalReport("m", "validation", results[2:])
    assert json.loads(nan_report.to_json())["tasks"]["stsb"]["score"] is None  # NaN is not JSON
    index = report.to_model_index("merged")
    assert index[0]["name"] == "merged"
    first = index[0]["results"][0]
    assert first["dataset"] == {"name": "rte", "type": "super_glue", "split": "validation", "config": "rte"}
    assert first["metrics"][0]["type"] == "accuracy" and first["metrics"][0]["value"] == 0.5625
    assert index[0]["results"][1]["metrics"][0]["type"] == "matthews_correlation"
    evals = report.to_eval_results()
    assert len(evals) == 3 and evals[0].metric_value == 0.5625


def _recipe(tmp_path: Path, rows: list[dict]) -> Path:
    write_jsonl(tmp_path / "val.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:5])
    (tmp_path / "recipe.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: some/base\nmodels:\n  - model: some/ft\n"
        "tasks:\n"
        "  - task: sentiment\n    dataset_path: json\n"
        "    dataset_kwargs: {data_files: {validation: val.jsonl, test: test.jsonl}}\n"
        "    validation_split: validation\n    test_split: test\n"
        "    doc_to_text: 'Review: {{text}} Sentiment:'\n    doc_to_choice: ['terrible', 'great']\n    doc_to_target: label\n"
        "    metric_list: [{metric: accuracy}, {metric: f1}]\n"
        "  - task: answer\n    dataset_path: json\n    dataset_kwargs: {data_files: {validation: val.jsonl}}\n"
        "    validation_split: validation\n    doc_to_text: '{{text}} Answer:'\n    doc_to_choice: options\n    doc_to_target: answer\n"
        "    metric_list: [{metric: mcc}]\n")
    return tmp_path / "recipe.yaml"


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_eval_command_prints_table_and_writes_json(tmp_path, tiny_models, family, capsys):
    recipe = _recipe(tmp_path, sentiment_rows(10))
    out = tmp_path / "scores.json"
    code = hfmerge_main(["eval", str(recipe), "--model", str(tiny_models[family]), "--json", str(out), "--batch-size", "4", "--device", "cpu", "-q"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "sentiment" in printed and "answer" in printed and "average" in printed
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"sentiment", "answer"}
    assert data["tasks"]["sentiment"]["num_examples"] == 10 and set(data["tasks"]["sentiment"]["metrics"]) == {"accuracy", "f1"}
    # The same figures as the library call.
    model, tokenizer = load(tiny_models[family])
    direct = evaluate_model(model, load_tasks_file(recipe), tokenizer=tokenizer, progress=False)
    assert data["tasks"]["sentiment"]["score"] == pytest.approx(direct.scores["sentiment"])
    assert data["average"] == pytest.approx(direct.average)
    code = hfmerge_main(["eval", str(recipe), "--model", str(tiny_models[family]), "--split", "test", "--tasks", "sentiment", "-q"])
    assert code == 0 and "test" in capsys.readouterr().out


def test_evaluate_refuses_a_missing_model_split_or_task_naming_what_is_wrong(tmp_path, tiny_models):
    recipe = _recipe(tmp_path, sentiment_rows(4))
    with pytest.raises(EvaluationError) as refused:
        hfmerge.evaluate(tmp_path / "nothing", recipe, progress=False)
    assert refused.value.options == ("model",) and "folder not found" in refused.value.detail
    with pytest.raises(TaskError, match=r"tasks\[1\]\.test_split: missing; task 'answer' has no test split"):
        hfmerge.evaluate(tiny_models["t5"], recipe, split="test", progress=False)
    with pytest.raises(OptionError) as refused:
        hfmerge.evaluate(tiny_models["t5"], recipe, task_names=["nope"], progress=False)
    assert refused.value.options == ("task_names",) and refused.value.detail.startswith("'nope' not in")
    (tmp_path / "plain.yaml").write_text("merge_method: linear\n")
    with pytest.raises(RecipeError, match="tasks: missing"):
        hfmerge.evaluate(tiny_models["t5"], tmp_path / "plain.yaml", progress=False)


def test_eval_command_errors_are_one_line_naming_its_flags(tmp_path, tiny_models, capsys):
    recipe = _recipe(tmp_path, sentiment_rows(4))
    assert hfmerge_main(["eval", str(recipe), "--model", str(tmp_path / "nothing"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "error: --model: folder not found" in err and len(err.strip().splitlines()) == 1
    assert hfmerge_main(["eval", str(recipe), "--model", str(tiny_models["t5"]), "--tasks", "nope", "-q"]) == 1
    assert "--tasks: 'nope' not in" in capsys.readouterr().err


def test_task_evaluator_reuses_encodings_across_weight_changes(tmp_path, tiny_models):
    model, tokenizer = load(tiny_models["t5"])
    spec = parse_one(tmp_path, task(tmp_path))
    evaluator = TaskEvaluator([spec], tokenizer, batch_size=8)
    before = evaluator.scores(model)["sentiment"]
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # a "new merge" in place
    after = evaluator.scores(model)["sentiment"]
    assert len(evaluator._encoded) == 1 and before != after
    assert after == score_options(model, tokenizer, load_task_data(spec).validation, batch_size=8)


def test_a_model_folder_without_a_tokenizer_is_refused_not_scored_at_chance(tiny_models, tmp_path):
    import shutil

    from hfmerge.errors import EvaluationError
    from hfmerge.evaluation.evaluate_model import load_model_for_eval

    folder = Path(shutil.copytree(tiny_models["t5"], tmp_path / "no-tokenizer"))
    for p in folder.iterdir():
        if p.name not in ("config.json", "generation_config.json", "model.safetensors"):
            p.unlink()
    with pytest.raises(EvaluationError, match="has no tokenizer"):
        load_model_for_eval(folder)
    model, tokenizer = load_model_for_eval(tiny_models["t5"])
    assert len(tokenizer) > 0
