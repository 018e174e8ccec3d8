"""The shipped community T5 recipes run end to end against stand-ins on the Hub test server.

The stand-ins have the real repo ids and file layouts: tiny random flan-T5-layout weights for
`google/flan-t5-base` and the eight `tanganke/flan-t5-base_glue-*` experts (with a WordLevel
tokenizer whose vocabulary covers the prompts' and answers' words), PEFT adapter folders for the
`_lora-16` ones, and a tiny `nyu-mll/glue` dataset repo with one parquet file per config and
split, as the real one has them. They are built once per module.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import hfmerge
from hfmerge.errors import TaskError
from hfmerge.evaluation.tasks import load_task_data, load_tasks_file, parse_tasks
from hfmerge.recipe import load_recipe
from hfmerge.testing import build_base, build_finetuned

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GLUE = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")
BASE = "google/flan-t5-base"
EXPERTS = [f"tanganke/flan-t5-base_glue-{t}" for t in GLUE]
ADAPTERS = [f"tanganke/flan-t5-base_glue-{t}_lora-16" for t in GLUE]

# FusionBench's GLUE templates and answer words, label order (spelling included).
FUSIONBENCH = {
    "cola": ("Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere 'acceptable' or 'unacceptable'.", ("unacceptable", "acceptable")),
    "mnli": ("Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.", ("entailment", "neutral", "contradiction")),
    "mrpc": ("Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with 'yes' or 'no'.", ("no", "yes")),
    "qnli": ("Given the context: '{sentence}', does the question '{question}' have an answer based on the information provided? Answer with 'yes' or 'no'.", ("yes", "no")),
    "qqp": ("Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.", ("no", "yes")),
    "rte": ("Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.", ("yes", "no")),
    "sst2": ("Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?", ("negative", "positive")),
    "stsb": ("Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 (completely similar), rate the similarity.", None),
}
COLUMNS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "mrpc": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
}
SPLITS = {t: ("train", "validation", "test") for t in GLUE} | {
    "mnli": ("train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")}
NUM_LABELS = {"mnli": 3, "stsb": 0}
WORDS = "the a cat dog sat ran on under mat house is was big small red blue today why how".split()
NUMBERS = [f"{i / 10:.1f}" for i in range(51)]


def glue_recipes() -> list[Path]:
    return sorted(RECIPES.glob("flan_t5_*_glue_*.yaml"))


# -- stand-ins -------------------------------------------------------------------------------


def vocabulary() -> list[str]:
    words = set(WORDS) | set(NUMBERS)
    for text, options in FUSIONBENCH.values():
        words |= set(re.sub(r"\{\w+\}", " ", text).split()) | set(options or ())
    return ["<pad>", "</s>", "<unk>", "<s>"] + sorted(words)


def make_tokenizer():
    """A whitespace WordLevel tokenizer closing inputs with </s> like T5's; unknown words are <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>"), len(vocab)


def glue_rows(task: str, split: str, n: int, seed: int) -> dict[str, list]:
    import random

    rng = random.Random(f"{task}:{split}:{seed}")
    cols: dict[str, list] = {c: [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))) for _ in range(n)] for c in COLUMNS[task]}
    if task == "stsb":
        cols["label"] = [round(rng.uniform(0, 5), 2) for _ in range(n)] if not split.startswith("test") else [-1.0] * n
    else:
        cols["label"] = [i % NUM_LABELS.get(task, 2) for i in range(n)] if not split.startswith("test") else [-1] * n
    cols["idx"] = list(range(n))
    return cols


def write_glue(folder: Path) -> Path:
    """nyu-mll/glue's layout: {config}/{split}-00000-of-00001.parquet and a README declaring the configs."""
    import datasets

    configs = []
    for task in GLUE:
        files = []
        for split in SPLITS[task]:
            path = folder / task / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(glue_rows(task, split, 4, 0)).to_parquet(str(path))
            files.append({"split": split, "path": f"{task}/{split}-*"})
        configs.append({"config_name": task, "data_files": files})
    (folder / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n# GLUE (test stand-in)\n")
    return folder


def write_adapter(folder: Path, base_state: dict[str, torch.Tensor], seed: int, base_repo: str) -> Path:
    """A PEFT LoRA adapter (r = 16 on every attention q and v) as peft saves it."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, weight in base_state.items():
        if re.search(r"Attention\.(q|v)\.weight$", name):
            module = name[: -len(".weight")]
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, weight.shape[1], generator=gen) * 0.05
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(weight.shape[0], 16, generator=gen) * 0.05
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
              "target_modules": ["q", "v"], "base_model_name_or_path": base_repo, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "modules_to_save": None, "revision": None, "use_rslora": False, "use_dora": False,
              "rank_pattern": {}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The stand-ins are tiny: one thread avoids intra-op synchronisation, which dominates (and
    varies with machine load) at this size."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def standins(hub_server, tmp_path_factory):
    """Upload the stand-ins to the (session-wide) test server once for this module."""
    from hfmerge.testing import load_base_state

    root = tmp_path_factory.mktemp("community")
    tokenizer, vocab_size = make_tokenizer()
    base = build_base(root / "base", "t5_v1_1", seed=5, vocab=vocab_size)
    tokenizer.save_pretrained(base)
    readme = b"---\nlicense: apache-2.0\n---\n"
    hub_server.create_repo_direct(BASE, {**folder_files(base), "README.md": readme}, exist_ok=True)
    for i, repo in enumerate(EXPERTS):
        folder = build_finetuned(base, root / f"expert-{i}", seed=100 + i, scale=0.05)
        tokenizer.save_pretrained(folder)
        if (base / "generation_config.json").is_file():
            (folder / "generation_config.json").write_bytes((base / "generation_config.json").read_bytes())
        hub_server.create_repo_direct(repo, {**folder_files(folder), "README.md": readme}, exist_ok=True)
    state = load_base_state(base)
    for i, repo in enumerate(ADAPTERS):
        folder = write_adapter(root / f"lora-{i}", state, 200 + i, BASE)
        hub_server.create_repo_direct(repo, {**folder_files(folder), "README.md": readme}, exist_ok=True)
    hub_server.create_repo_direct("nyu-mll/glue", folder_files(write_glue(root / "glue")), repo_type="dataset", exist_ok=True)
    return root


def card_metadata(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1])


def assert_loadable_merge(out: Path, inputs: list[str]) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["Given the sentence 'the cat sat', determine the sentiment."], return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[0] == 1
    meta = card_metadata(out)
    assert set(inputs) <= set(meta["base_model"]), meta["base_model"]
    assert meta["base_model_relation"] == "merge"


# -- the task definitions --------------------------------------------------------------------


def test_glue_task_definitions_are_fusionbench_s_and_the_same_in_every_recipe():
    canonical = {t.name: t for t in load_tasks_file(RECIPES / "tasks" / "glue.yaml")}
    assert list(canonical) == list(GLUE)
    for name, (text, options) in FUSIONBENCH.items():
        spec = canonical[name]
        assert spec.doc_to_text == re.sub(r"\{(\w+)\}", r"{{\1}}", text)
        assert spec.generates and spec.max_gen_toks == 10
        assert spec.doc_to_choice == (options or ())
        assert spec.metrics[0].name == ("spearmanr" if name == "stsb" else "exact_match")
        assert spec.validation_split == ("validation_matched" if name == "mnli" else "validation")
    keys = ("doc_to_text", "doc_to_choice", "doc_to_target", "output_type", "until", "max_gen_toks", "metrics", "dataset_path", "dataset_name")
    paths = glue_recipes()
    assert len(paths) == 7
    for path in paths:
        recipe = load_recipe(path)
        assert [t.name for t in recipe.tasks] == list(GLUE), path.name
        for spec in recipe.tasks:
            assert {k: getattr(spec, k) for k in keys} == {k: getattr(canonical[spec.name], k) for k in keys}, (path.name, spec.name)
            if recipe.method.needs_importance or recipe.method.search:
                # searched / Fisher data: a seeded train slice; reported: GLUE validation
                assert (spec.validation_split, spec.num_validation_examples, spec.test_split) == ("train", 100, canonical[spec.name].validation_split)
            else:
                assert (spec.validation_split, spec.test_split) == (canonical[spec.name].validation_split, None)
        models = [m.ref.text for m in recipe.models]
        assert [re.search(r"glue-(\w+?)(_lora-16)?$", m).group(1) for m in models] == list(GLUE), path.name


def test_each_glue_task_is_defined_in_one_file_that_every_recipe_includes():
    defined: dict[str, list[str]] = {t: [] for t in GLUE}

    def definitions(node):  # every mapping that writes a GLUE prompt itself
        if isinstance(node, dict):
            if node.get("dataset_name") in GLUE and "doc_to_text" in node:
                yield node["dataset_name"]
            for value in node.values():
                yield from definitions(value)
        elif isinstance(node, list):
            for value in node:
                yield from definitions(value)

    for path in sorted(RECIPES.rglob("*.yaml")):
        for name in definitions(yaml.safe_load(path.read_text())):
            defined[name].append(str(path.relative_to(RECIPES)))
    assert defined == {t: [f"tasks/glue/{t}.yaml"] for t in GLUE}
    users = [*glue_recipes(), RECIPES / "dfmerge_example.yaml"]
    for path in users:
        for spec in load_recipe(path).tasks:
            assert spec.origins["doc_to_text"] == RECIPES / "tasks" / "glue" / f"{spec.name}.yaml", (path.name, spec.name)
    for spec in load_tasks_file(RECIPES / "tasks" / "glue.yaml"):
        assert spec.origins["doc_to_text"] == RECIPES / "tasks" / "glue" / f"{spec.name}.yaml"


def test_the_example_recipe_scores_the_included_glue_tasks_by_rank_classification():
    canonical = {t.name: t for t in load_tasks_file(RECIPES / "tasks" / "glue.yaml")}
    for spec in load_recipe(RECIPES / "dfmerge_example.yaml").tasks:
        assert not spec.generates and [m.name for m in spec.metrics] == ["accuracy"]
        assert (spec.validation_split, spec.test_split, spec.validation_fraction) == ("validation", "validation", 0.5)
        assert (spec.doc_to_text, spec.doc_to_choice) == (canonical[spec.name].doc_to_text, canonical[spec.name].doc_to_choice)


def test_glue_tasks_load_from_the_hub_dataset_layout(hub, standins):
    recipe = load_recipe(RECIPES / "flan_t5_base_glue_dfmerge.yaml")
    for spec in recipe.tasks:
        data = load_task_data(spec)
        assert len(data.validation) == 4 and len(data.test) == 4  # all 4 train rows (fewer than 100), GLUE validation
        example = data.test[0]
        columns = glue_rows(spec.name, spec.test_split, 4, 0)
        text, options = FUSIONBENCH[spec.name]
        assert example.prompt == text.format(**{c: columns[c][0] for c in COLUMNS[spec.name]})
        if options is None:
            assert example.options == (f"{columns['label'][0]:.1f}",)
        else:
            assert example.target == options[columns["label"][0]]


# -- end to end ------------------------------------------------------------------------------


def test_flan_t5_base_ties_recipe_runs_against_the_hub(hub, standins, tmp_path):
    out = tmp_path / "ties"
    assert hfmerge.merge(RECIPES / "flan_t5_base_glue_ties.yaml", output=out, progress=False).output == out
    assert_loadable_merge(out, [BASE, *EXPERTS])
    scores = json.loads((out / "eval_results.json").read_text())
    assert set(scores["tasks"]) == set(GLUE)
    assert scores["tasks"]["mnli"]["dataset_split"] == "validation_matched"
    assert scores["tasks"]["stsb"]["primary_metric"] == "spearmanr"


def test_flan_t5_base_dfmerge_recipe_runs_against_the_hub(hub, standins, tmp_path):
    out = tmp_path / "dfmerge"
    result = hfmerge.merge(RECIPES / "flan_t5_base_glue_dfmerge.yaml", output=out, n_trials=2, progress=False)
    assert result.output == out and len(result.search.trials) == 2
    assert_loadable_merge(out, [BASE, *EXPERTS])
    search = json.loads((out / "dfmerge_search.json").read_text())
    assert search["test"]["tasks"]["cola"]["dataset_split"] == "validation"
    assert set(search["test"]["tasks"]) == set(GLUE)
    found = yaml.safe_load((out / "hfmerge_recipe.yaml").read_text())
    assert all(isinstance(m["parameters"]["weight"], float) for m in found["models"])
    # The tasks are written whole: the recipe beside the merge does not need the included files.
    assert [t["task"] for t in found["tasks"]] == list(GLUE) and not any("include" in t for t in found["tasks"])


def test_flan_t5_base_fisher_recipe_computes_fishers_of_generation_tasks(hub, standins, tmp_path, monkeypatch):
    monkeypatch.setenv("HFMERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fisher"
    assert hfmerge.merge(RECIPES / "flan_t5_base_glue_fisher.yaml", output=out, progress=False).output == out
    assert_loadable_merge(out, [BASE, *EXPERTS])
    scores = json.loads((out / "eval_results.json").read_text())
    assert scores["tasks"]["stsb"]["dataset_split"] == "train"  # the Fisher data's slice; GLUE validation is --split test


def test_flan_t5_base_lora_dfmerge_recipe_runs_against_the_hub(hub, standins, tmp_path):
    out = tmp_path / "lora"
    result = hfmerge.merge(RECIPES / "flan_t5_base_glue_lora_dfmerge.yaml", output=out, n_trials=1, evaluate=False, progress=False)
    assert result.output == out and len(result.search.trials) == 1 and result.evaluation is None
    assert_loadable_merge(out, [BASE, *ADAPTERS])
    assert "LoRA adapter" in (out / "README.md").read_text()


# -- the DF-Merge paper's setup --------------------------------------------------------------


def test_paper_recipe_tasks_follow_the_reference_splits():
    recipe = load_recipe(RECIPES / "dfmerge_t5_paper.yaml")
    assert recipe.method.name == "dfmerge" and len(recipe.models) == 6
    splits = {t.name: (t.validation_split, t.test_split) for t in recipe.tasks}
    assert splits == {
        "paws": ("validation", "test"), "qasc": ("validation[:463]", "validation[463:]"), "quartz": ("validation", "test"),
        "story_cloze": ("test[:935]", "test[935:]"), "wiki_qa": ("validation", "test"),
        "winogrande": ("validation[:633]", "validation[633:]"),
    }
    assert all(not t.generates for t in recipe.tasks)  # rank classification, as the paper scores


def test_story_cloze_without_its_manual_download_names_the_task_and_says_how(tmp_path):
    raw = yaml.safe_load((RECIPES / "dfmerge_t5_paper.yaml").read_text())
    entry = next(t for t in raw["tasks"] if t["task"] == "story_cloze")
    spec = parse_tasks([entry], source="paper.yaml", base_dir=tmp_path)[0]  # validates without the file
    with pytest.raises(TaskError, match=r"paper.yaml: tasks\[0\]\.dataset_kwargs\.data_files: the data of task 'story_cloze' is not there "
                                        r"\(.*cloze_test_ALL_test\.csv not found\).*https://cs\.rochester\.edu/nlp/rocstories/"):
        load_task_data(spec)
    # Once the file is there, the halves are the file's first and second parts, in order.
    import csv

    path = tmp_path / "data" / "story_cloze" / "cloze_test_test__spring2016 - cloze_test_ALL_test.csv"
    path.parent.mkdir(parents=True)
    header = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
              "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(1871):
            writer.writerow([f"id{i}", f"S{i}.", "B.", "C.", "D.", "Good end.", "Bad end.", 1 + i % 2])
    data = load_task_data(spec)
    assert (len(data.validation), len(data.test)) == (935, 936)
    assert data.validation[0].prompt == "S0. B. C. D. What is a possible continuation for the story given the following options ? - Good end.\n- Bad end."
    assert data.test[0].prompt.startswith("S935. ") and [e.label for e in data.validation[:2]] == [0, 1]


def test_manual_download_instructions_must_be_text(tmp_path):
    with pytest.raises(TaskError, match=r"tasks\[0\]\.manual_download_instructions: got empty text"):
        parse_tasks([{"task": "t", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": "x.jsonl"}},
                      "manual_download_instructions": " ", "validation_split": "validation", "doc_to_text": "{{a}}",
                      "doc_to_choice": ["no", "yes"], "doc_to_target": 0}], source="r.yaml", base_dir=tmp_path)
