"""Scoring by greedy generation (``output_type: generate_until``): batched generation, the
answer post-processing, exact_match and correlations over generated numbers, task checks, and
``hfmerge eval`` on a recipe with generation tasks.

The reference for the batched generator is the plainest possible loop: `model.generate` on one
prompt at a time, no padding, no stop-string criterion.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from hfmerge.cli import main as hfmerge_main
from hfmerge.errors import MetricError, TaskError
from hfmerge.evaluation import evaluate_model as evaluate_model_module
from hfmerge.evaluation.evaluate_model import EvalReport, TaskEvaluator, TaskResult, evaluate_model
from hfmerge.evaluation.generation import generate_texts, postprocess_generation
from hfmerge.evaluation.metrics import (
    NUMBER_FALLBACK, MetricSpec, compute_generation_metric, compute_metric, parse_number, resolve_metric,
)
from hfmerge.evaluation.tasks import Example, TaskData, TaskSpec, load_task_data, load_tasks_file, parse_tasks
from test_evaluation import (  # noqa: F401  (fixtures)
    SPECIALS, VOCAB, WORDS, _set_gpt2_logits, _set_t5_logits, load, one_torch_thread, parse_one, random_examples, sentiment_rows, task,
    tiny_models, write_jsonl,
)

FAMILIES = ["t5", "t5_v1_1", "gpt2", "llama"]


def naive_generate(model, tokenizer, prompts: list[str], max_gen_toks: int, until: list[str]) -> list[str]:
    """One prompt at a time through `model.generate`: greedy, stop at EOS, cut at the first stop string."""
    eos = sorted({model.generation_config.eos_token_id, tokenizer.eos_token_id})
    pad = tokenizer.pad_token_id
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                       max_new_tokens=max_gen_toks, pad_token_id=pad, eos_token_id=eos)
            new = generated[0, 1 if model.config.is_encoder_decoder else ids.shape[1]:].tolist()
            new = new[: next((k for k, t in enumerate(new) if t in eos), len(new))]
            text = tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text.strip())
    return out


def generation_task(name: str, examples: list[Example], metrics=("exact_match",), **settings) -> TaskData:
    """A loaded generate_until task over in-memory examples (no file)."""
    spec = TaskSpec(name=name, key="tasks[0]", source="test", dataset_path="memory", validation_split="validation",
                    metrics=tuple(resolve_metric(m) if isinstance(m, str) else m for m in metrics), output_type="generate_until",
                    **settings)
    return TaskData(spec, validation=examples)


# ---------------------------------------------------------------------------------------------
# Batched generation against the one-prompt-at-a-time loop
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_equals_naive_generate_loop(tiny_models, family):
    model, tokenizer = load(tiny_models[family])
    with torch.no_grad():  # livelier weights: answers that differ from prompt to prompt
        for p in model.parameters():
            p.mul_(3.0)
    prompts = [e.prompt for e in random_examples(23, seed=5)]  # 2 to 11 tokens: ragged batches
    untruncated = naive_generate(model, tokenizer, prompts, 6, [])
    assert len(set(untruncated)) > 3, untruncated  # not one answer for everything
    # Stop strings that occur inside some answers: the most frequent later word, and a pair.
    later = Counter(w for a in untruncated for w in a.split()[1:])
    stops = [later.most_common(1)[0][0], "great w1"]
    for until in ([], stops):
        naive = naive_generate(model, tokenizer, prompts, 6, until)
        for batch_size in (1, 4, 7, 64):
            assert generate_texts(model, tokenizer, prompts, max_gen_toks=6, until=until, batch_size=batch_size) == naive, (until, batch_size)
    assert naive != untruncated  # the stop strings did cut some answers


def test_decoder_only_prompt_is_cut_on_the_left_to_leave_room_for_new_tokens(tiny_models):
    model, tokenizer = load(tiny_models["gpt2"])  # 32 positions
    long_prompt = " ".join(WORDS[i % 50] for i in range(40)) + " Answer:"  # 41 tokens
    kept = " ".join(long_prompt.split()[-(32 - 5):])
    [answer] = generate_texts(model, tokenizer, [long_prompt], max_gen_toks=5, until=[])
    assert answer == naive_generate(model, tokenizer, [kept], 5, [])[0]
    assert generate_texts(model, tokenizer, [long_prompt, "w1 Answer:"], max_gen_toks=5, until=[], batch_size=2)[0] == answer
    with pytest.raises(ValueError, match="max_gen_toks 32 leaves no room for the prompt in the model's 32 positions"):
        generate_texts(model, tokenizer, ["w1"], max_gen_toks=32, until=[])


def test_generation_is_deterministic_and_restores_training_mode(tiny_models):
    model, tokenizer = load(tiny_models["t5_v1_1"])
    model.train()  # dropout on: the generator must switch it off
    prompts = [e.prompt for e in random_examples(6, seed=2)]
    first = generate_texts(model, tokenizer, prompts, max_gen_toks=4, batch_size=4)
    assert generate_texts(model, tokenizer, prompts, max_gen_toks=4, batch_size=3) == first
    assert model.training
    model.eval()
    assert first == naive_generate(model, tokenizer, prompts, 4, ["\n\n"])


# ---------------------------------------------------------------------------------------------
# Post-processing and metrics on hand-made answers
# ---------------------------------------------------------------------------------------------


def test_postprocess_cuts_at_the_first_stop_string_and_strips():
    assert postprocess_generation(" yes\n\nQuestion: no", ["\n\n"]) == "yes"
    assert postprocess_generation("a, b. c", [".", ","]) == "a"  # the earliest stop wins, whatever the list order
    assert postprocess_generation("  positive  ", []) == "positive"
    assert postprocess_generation("Answer: yes", ["", "Answer:"]) == ""  # empty stop strings are ignored
    assert postprocess_generation("no stop here", ["###"]) == "no stop here"


def test_exact_match_and_its_options():
    em = lambda preds, refs, **kw: compute_generation_metric(resolve_metric("exact_match", kw), preds, refs)  # noqa: E731
    preds, refs = ["yes", "Yes", "yes.", "no", "3"], ["yes", "yes", "yes", "yes", "4"]
    assert em(preds, refs) == pytest.approx(1 / 5)
    assert em(preds, refs, ignore_case=True) == pytest.approx(2 / 5)
    assert em(preds, refs, ignore_case=True, ignore_punctuation=True) == pytest.approx(3 / 5)
    assert em(preds, refs, ignore_case=True, ignore_punctuation=True, ignore_numbers=True) == pytest.approx(4 / 5)
    assert em(["the cat", "a dog"], ["cat", "dog"], regexes_to_ignore=[r"^(the|a) "]) == 1.0
    # Rank classification can report exact_match too: the chosen and the right option's texts.
    assert compute_metric(resolve_metric("exact_match"), [0, 1, 1], [0, 0, 1], [("no", "yes")] * 3) == pytest.approx(2 / 3)


def test_correlations_parse_generated_numbers_with_fallback():
    from scipy import stats

    assert [parse_number(t) for t in ("3.8", " 4 ", "-0.5", "1e-1", "3.8 out of 5", "", "nan", "inf", "yes")] == \
        [3.8, 4.0, -0.5, 0.1, None, None, None, None, None]
    generated = ["3.8", "1.0", "similar", "2.5", "", "4.9", "0.4"]
    references = ["4.0", "1.2", "3.0", "2.4", "0.6", "5.0", "0.0"]
    as_numbers = [3.8, 1.0, NUMBER_FALLBACK, 2.5, NUMBER_FALLBACK, 4.9, 0.4]  # FusionBench: float(text), else 0.0
    truth = [float(r) for r in references]
    assert NUMBER_FALLBACK == 0.0
    for name, reference in (("spearmanr", stats.spearmanr), ("pearsonr", stats.pearsonr), ("spearman", stats.spearmanr)):
        value = compute_generation_metric(resolve_metric(name), generated, references)
        assert value == pytest.approx(reference(truth, as_numbers)[0]), name
    with pytest.raises(MetricError, match="the reference 'high' is not a number"):
        compute_generation_metric(resolve_metric("spearmanr"), ["1", "2"], ["high", "2"])
    with pytest.raises(MetricError, match="compares option indices"):
        compute_generation_metric(resolve_metric("accuracy"), ["1"], ["1"])


@pytest.mark.parametrize("family", ["t5_v1_1", "gpt2"])
def test_forced_answers_score_as_expected(tiny_models, family):
    """A model whose every step prefers "yes": the answer is "yes" (one token, or cut at the
    first space), and exact_match counts the references that say so."""
    model, tokenizer = load(tiny_models[family])
    logits = torch.zeros(len(VOCAB))
    logits[VOCAB.index("yes")] = 6.0
    (_set_t5_logits if family.startswith("t5") else _set_gpt2_logits)(model, logits)
    examples = [Example(p, (ref,), 0) for p, ref in [("w1 w2 Answer:", "yes"), ("w9 Answer:", "no"), ("Answer:", "Yes"), ("w3", " yes ")]]
    assert generate_texts(model, tokenizer, [e.prompt for e in examples], max_gen_toks=3, until=[]) == ["yes yes yes"] * 4
    one_word = generation_task("forced", examples, ("exact_match", MetricSpec("exact_match_ci", "exact_match", {"ignore_case": True})),
                               until=(" ",), max_gen_toks=3)
    report = evaluate_model(model, [one_word], tokenizer=tokenizer, progress=False)
    result = report.results[0]
    assert result.output_type == "generate_until" and result.predictions == ["yes"] * 4
    assert list(result.metrics.values()) == [pytest.approx(2 / 4), pytest.approx(3 / 4)]  # " yes " is stripped; "Yes" needs ignore_case
    capped = evaluate_model(model, [generation_task("capped", examples, max_gen_toks=1, until=())], tokenizer=tokenizer, progress=False)
    assert capped.results[0].predictions == ["yes"] * 4 and capped.scores == {"capped": pytest.approx(0.5)}


def number_model(tiny_models, tmp_path: Path, family: str) -> Path:
    """A copy of a tiny model whose vocabulary is mostly numbers ("0.0" ... "4.9")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = SPECIALS + [f"{i / 10:.1f}" for i in range(50)] + ["similar", "different", "rate:", "and", "x", "y", "z", "w", "v", "u"]
    assert len(vocab) == len(VOCAB)
    folder = tmp_path / f"numbers-{family}"
    shutil.copytree(tiny_models[family], folder)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if family.startswith("t5"):
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["t5_v1_1", "llama"])
def test_spearman_of_generated_numbers_through_a_task(tiny_models, tmp_path, family):
    """An STS-B-like task: the reference is the label formatted as in FusionBench ("{:.1f}"),
    the prediction the number the model writes; the figure equals scipy's on the naive loop's
    answers parsed FusionBench's way."""
    from scipy import stats

    folder = number_model(tiny_models, tmp_path, family)
    model, tokenizer = load(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    rng = random.Random(0)
    rows = [{"s1": f"{rng.randrange(50) / 10:.1f} {rng.randrange(50) / 10:.1f}", "s2": f"{rng.randrange(50) / 10:.1f}",
             "label": rng.uniform(0, 5)} for _ in range(30)]
    write_jsonl(tmp_path / "stsb.jsonl", rows)
    entry = {"task": "stsb", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "stsb.jsonl"}},
             "validation_split": "validation", "output_type": "generate_until", "doc_to_text": "{{s1}} and {{s2}} rate:",
             "doc_to_target": "{{ '%.1f' | format(label) }}", "generation_kwargs": {"until": [" "], "max_gen_toks": 3, "do_sample": False},
             "metric_list": [{"metric": "spearmanr"}, {"metric": "pearsonr"}, {"metric": "exact_match"}]}
    spec = parse_one(tmp_path, entry)
    data = load_task_data(spec)
    assert [e.target for e in data.validation] == [f"{r['label']:.1f}" for r in rows]
    report = evaluate_model(model, [spec], tokenizer=tokenizer, batch_size=8, progress=False)
    answers = naive_generate(model, tokenizer, [e.prompt for e in data.validation], 3, [" "])
    assert report.results[0].predictions == answers and len(set(answers)) > 3

    def fusionbench_float(text):
        try:
            return float(text)
        except Exception:  # noqa: BLE001
            return 0.0

    predicted = [fusionbench_float(a) for a in answers]
    truth = [float(f"{r['label']:.1f}") for r in rows]
    metrics = report.results[0].metrics
    assert metrics["spearmanr"] == pytest.approx(stats.spearmanr(predicted, truth)[0])
    assert metrics["pearsonr"] == pytest.approx(stats.pearsonr(truth, predicted)[0])
    assert metrics["exact_match"] == pytest.approx(sum(a == f"{r['label']:.1f}" for a, r in zip(answers, rows)) / len(rows))


# ---------------------------------------------------------------------------------------------
# Task keys
# ---------------------------------------------------------------------------------------------


def gen_task(tmp_path: Path, rows=None, **overrides) -> dict:
    return task(tmp_path, rows, **{"output_type": "generate_until", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 10, "do_sample": False},
                                   **overrides})


def test_generation_keys_parse_with_harness_defaults(tmp_path):
    spec = parse_one(tmp_path, gen_task(tmp_path))
    assert spec.generates and spec.until == ("\n",) and spec.max_gen_toks == 10
    assert [m.name for m in spec.metrics] == ["exact_match"]  # the harness's default metric for generate_until
    bare = parse_one(tmp_path, gen_task(tmp_path, generation_kwargs=None, doc_to_choice=None, doc_to_target="answer"))
    assert bare.until == ("\n\n",) and bare.max_gen_toks == 256 and bare.doc_to_choice == ()
    one_string = parse_one(tmp_path, gen_task(tmp_path, generation_kwargs={"until": "</s>", "temperature": 0.0}))
    assert one_string.until == ("</s>",)
    mc = parse_one(tmp_path, task(tmp_path))
    assert mc.output_type == "multiple_choice" and not mc.generates and [m.name for m in mc.metrics] == ["accuracy"]


def test_one_glue_task_definition_serves_both_output_types(tmp_path):
    """With doc_to_choice, the label index picks the reference text for generation."""
    rows = sentiment_rows(6)
    mc = load_task_data(parse_one(tmp_path, task(tmp_path, rows)))
    gen = load_task_data(parse_one(tmp_path, gen_task(tmp_path, rows)))
    assert mc.validation == gen.validation
    assert [e.target for e in gen.validation] == [["no", "yes"][r["label"]] for r in rows]
    free = load_task_data(parse_one(tmp_path, gen_task(tmp_path, rows, doc_to_choice=None, doc_to_target="answer")))
    assert [(e.options, e.label, e.target) for e in free.validation] == [((r["answer"],), 0, r["answer"]) for r in rows]
    one_option = load_task_data(parse_one(tmp_path, gen_task(tmp_path, rows, doc_to_choice=["yes"], doc_to_target=0)))
    assert {e.target for e in one_option.validation} == {"yes"}  # a single option is fine when nothing is ranked


def test_a_pasted_harness_generate_until_task_works(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": f"w{i} w2", "answer": "yes" if i % 2 else "no"} for i in range(4)])
    text = """
task: qa
dataset_path: json
dataset_kwargs: {data_files: {validation: qa.jsonl}}
output_type: generate_until
validation_split: validation
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_target: answer
target_delimiter: " "
generation_kwargs:
  until: ["\\n", "Question:"]
  do_sample: false
  temperature: 0.0
  max_gen_toks: 10
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata: {version: 1.0}
"""
    (tmp_path / "qa.yaml").write_text(text)
    [spec] = load_tasks_file(tmp_path / "qa.yaml")
    assert spec.until == ("\n", "Question:") and dict(spec.metrics[0].kwargs) == {"ignore_case": True, "ignore_punctuation": True}
    assert [e.target for e in load_task_data(spec).validation] == ["no", "yes", "no", "yes"]


@pytest.mark.parametrize(("change", "path", "needle"), [
    ({"doc_to_target": None}, "tasks[0].doc_to_target", "missing"),
    ({"output_type": "generate"}, "tasks[0].output_type", "expected multiple_choice"),
    ({"generation_kwargs": {"do_sample": True}}, "tasks[0].generation_kwargs.do_sample", "only greedy decoding is supported"),
    ({"generation_kwargs": {"temperature": 0.7}}, "tasks[0].generation_kwargs.temperature", "only greedy decoding is supported"),
    ({"generation_kwargs": {"top_p": 0.9}}, "tasks[0].generation_kwargs.top_p", "only greedy decoding"),
    ({"generation_kwargs": {"num_beams": 4}}, "tasks[0].generation_kwargs.num_beams", "one beam"),
    ({"generation_kwargs": {"max_new_tokens": 10}}, "tasks[0].generation_kwargs.max_new_tokens", "write max_gen_toks"),
    ({"generation_kwargs": {"untill": ["\n"]}}, "tasks[0].generation_kwargs.untill", "did you mean 'until'"),
    ({"generation_kwargs": {"until": ["\n", ""]}}, "tasks[0].generation_kwargs.until[1]", "non-empty stop string"),
    ({"generation_kwargs": {"until": 5}}, "tasks[0].generation_kwargs.until", "list of stop strings"),
    ({"generation_kwargs": {"max_gen_toks": 0}}, "tasks[0].generation_kwargs.max_gen_toks", "positive whole number"),
    ({"generation_kwargs": "greedy"}, "tasks[0].generation_kwargs", "expected a mapping"),
    ({"normalization": "char"}, "tasks[0].normalization", "rank classification"),
    ({"metric_list": [{"metric": "acc"}]}, "tasks[0].metric_list[0].metric", "use exact_match"),
    ({"metric_list": [{"metric": "exact_match"}, {"metric": "acc_norm"}]}, "tasks[0].metric_list[1].metric", "rank classification"),
    ({"metric_list": [{"metric": "f1"}]}, "tasks[0].metric_list[0].metric", "generated text"),
    ({"metric_list": [{"metric": "mcc"}]}, "tasks[0].metric_list[0].metric", "generated text"),
    ({"metric_list": [{"metric": "exact_match", "ignore_cas": True}]}, "tasks[0].metric_list[0].ignore_cas", "did you mean 'ignore_case'"),
    ({"metric_list": [{"metric": "exact_match", "ignore_case": "yes"}]}, "tasks[0].metric_list[0].ignore_case", "true or false"),
    ({"metric_list": [{"metric": "exact_match", "regexes_to_ignore": ["("]}]}, "tasks[0].metric_list[0].regexes_to_ignore[0]", "regular expression"),
])
def test_bad_generation_specs_are_named(tmp_path, change, path, needle):
    entry = gen_task(tmp_path)
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


def test_multiple_choice_tasks_refuse_generation_keys(tmp_path):
    with pytest.raises(TaskError, match=r"^recipe.yaml: tasks\[0\].generation_kwargs: only used with output_type: generate_until"):
        parse_one(tmp_path, task(tmp_path, generation_kwargs={"until": ["\n"]}))
    with pytest.raises(TaskError, match=r"tasks\[0\].doc_to_choice: missing"):  # still required for rank classification
        parse_one(tmp_path, task(tmp_path, doc_to_choice=None))
    with pytest.raises(TaskError, match=r"tasks\[0\].filter_list: not supported: filters are not run"):
        parse_one(tmp_path, gen_task(tmp_path, filter_list=[{"name": "strip"}]))


@pytest.mark.parametrize(("rows", "change", "needle"), [
    ([{"text": "w1", "label": 0, "score": "high"}], {"doc_to_target": "score", "doc_to_choice": None, "metric_list": ["spearmanr"]},
     "example 0 of split 'validation' of task 'sentiment': the reference 'high' is not a number, which spearmanr compares"),
    ([{"text": "w1", "label": 0, "answer": ""}], {"doc_to_target": "answer", "doc_to_choice": None}, "the reference answer is empty"),
    ([{"text": "w1", "label": 0, "answer": ["a", "b"]}], {"doc_to_target": "answer", "doc_to_choice": None}, "several reference answers"),
    ([{"text": "w1", "label": 2}], {}, "label 2 is out of range for 2 options"),
])
def test_bad_generation_data_is_reported_before_any_model(tmp_path, monkeypatch, rows, change, needle):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks were checked")

    monkeypatch.setattr(evaluate_model_module, "load_model_for_eval", no_model)
    spec = parse_one(tmp_path, gen_task(tmp_path, rows, **change))
    with pytest.raises(TaskError) as info:
        evaluate_model(tmp_path / "no-model-here", [spec], progress=False)
    assert str(info.value).startswith("recipe.yaml: tasks[0].doc_to_target: ") and needle in str(info.value), str(info.value)


# ---------------------------------------------------------------------------------------------
# Through the evaluator, the report and the command line
# ---------------------------------------------------------------------------------------------


def test_task_evaluator_mixes_output_types_and_reuses_prompts(tmp_path, tiny_models):
    model, tokenizer = load(tiny_models["t5_v1_1"])
    rows = sentiment_rows(10)
    mc, gen = parse_tasks([task(tmp_path, rows), gen_task(tmp_path, rows, task="sentiment-gen")], source="recipe.yaml", base_dir=tmp_path)
    evaluator = TaskEvaluator([mc, gen], tokenizer, batch_size=4)
    assert set(evaluator.scores(model)) == {"sentiment"} and set(evaluator.generations(model)) == {"sentiment-gen"}
    report = evaluator.evaluate(model)
    assert [r.output_type for r in report.results] == ["multiple_choice", "generate_until"]
    # The multiple-choice figures are those of the task evaluated alone.
    assert report.results[0].metrics == evaluate_model(model, [mc], tokenizer=tokenizer, progress=False).results[0].metrics
    prompts = [e.prompt for e in load_task_data(gen).validation]
    assert report.results[1].predictions == naive_generate(model, tokenizer, prompts, 10, ["\n"])
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # a "new merge" in place
    again = evaluator.generations(model)["sentiment-gen"]
    assert len(evaluator._prompts) == 1 and again == naive_generate(model, tokenizer, prompts, 10, ["\n"])


def test_report_names_the_output_type():
    results = [
        TaskResult("rte", "validation", "validation", 4, {"accuracy": 0.5}, "accuracy", [0, 1], "glue", "rte", {"accuracy": "accuracy"}),
        TaskResult("stsb", "validation", "validation", 4, {"spearmanr": 0.25, "exact_match": 0.0}, "spearmanr", ["1.0", "x"], "glue", "stsb",
                   {"spearmanr": "spearmanr", "exact_match": "exact_match"}, "generate_until"),
    ]
    report = EvalReport("m", "validation", results)
    lines = report.to_table().splitlines()
    assert lines[0].split() == ["task", "split", "output", "examples", "metric", "score"]
    assert "multiple_choice" in lines[2] and "generate_until" in lines[3] and "exact_match" in lines[4]
    plain = EvalReport("m", "validation", results[:1]).to_table().splitlines()[0].split()
    assert plain == ["task", "split", "examples", "metric", "score"]  # unchanged without generation tasks
    data = json.loads(report.to_json(predictions=True))
    assert data["tasks"]["stsb"]["output_type"] == "generate_until" and data["tasks"]["stsb"]["predictions"] == ["1.0", "x"]
    assert data["tasks"]["rte"]["output_type"] == "multiple_choice"
    index = report.to_model_index("merged")[0]["results"]
    assert index[0]["task"]["type"] == "multiple-choice" and index[0]["metrics"][0]["name"] == "accuracy (rank classification)"
    assert index[1]["task"]["type"] == "text-generation" and index[1]["metrics"][0]["name"] == "spearmanr (greedy generation)"
    evals = report.to_eval_results()
    assert [(e.task_type, e.metric_name) for e in evals][1:] == [("text-generation", "spearmanr (greedy generation)"),
                                                                ("text-generation", "exact_match (greedy generation)")]


@pytest.mark.parametrize("family", ["t5_v1_1", "gpt2"])
def test_eval_command_with_generation_tasks(tmp_path, tiny_models, family, capsys):
    rows = sentiment_rows(9)
    write_jsonl(tmp_path / "val.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "tasks": [
        {"task": "sentiment", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "val.jsonl"}},
         "validation_split": "validation", "doc_to_text": "Review: {{text}} Sentiment:", "doc_to_choice": ["no", "yes"], "doc_to_target": "label"},
        {"task": "sentiment-gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "val.jsonl"}},
         "validation_split": "validation", "output_type": "generate_until", "doc_to_text": "Review: {{text}} Sentiment:",
         "doc_to_choice": ["no", "yes"], "doc_to_target": "label", "generation_kwargs": {"until": ["w5"], "max_gen_toks": 4},
         "metric_list": [{"metric": "exact_match"}]},
    ]}))
    out = tmp_path / "scores.json"
    code = hfmerge_main(["eval", str(recipe), "--model", str(tiny_models[family]), "--json", str(out), "--predictions",
                         "--batch-size", "4", "--device", "cpu", "-q"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "generate_until" in printed and "exact_match" in printed and "multiple_choice" in printed
    data = json.loads(out.read_text())
    entry = data["tasks"]["sentiment-gen"]
    assert entry["output_type"] == "generate_until" and entry["primary_metric"] == "exact_match" and entry["num_examples"] == 9
    model, tokenizer = load(tiny_models[family])
    answers = naive_generate(model, tokenizer, [f"Review: {r['text']} Sentiment:" for r in rows], 4, ["w5"])
    assert entry["predictions"] == answers
    assert entry["metrics"]["exact_match"] == pytest.approx(sum(a == ["no", "yes"][r["label"]] for a, r in zip(answers, rows)) / 9)
    assert data["tasks"]["sentiment"]["output_type"] == "multiple_choice"
    assert data["average"] == pytest.approx((data["tasks"]["sentiment"]["score"] + entry["score"]) / 2)
    assert not math.isnan(entry["score"])
