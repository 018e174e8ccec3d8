"""The merge lab (benchmarks/lab) end to end in quick mode: the table for the methods that exist
(which builds the models first), then a build that finds everything cached. Runs the commands
a user runs (`python -m benchmarks.lab table|build|probe --quick`) in child processes, with the
lab's cache in a temporary folder so the test starts from nothing, and checks what the lab
promises: ordinary model folders, fine-tuning that lowers each model's training loss, a cached
second build, every row of the table present (a method hfmerge lacks is listed as not
implemented), and accuracies that are fractions.

Quick mode is sized so that the whole file costs about half a minute of CPU; the child
processes have no time limit, so a loaded machine makes the test slower, never wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "lab" / "data"
TASKS = ("topic", "sentiment", "relation", "usage", "category")
NEW_ROWS = ("regmean", "tsv_merge", "iso_c", "iso_cts", "ta_weights_search", "ta_depth_weights_search", "ties_search")
DFMERGE_VARIANTS = ("dfmerge_capped", "dfmerge_kept", "dfmerge_capped_t05")


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks.lab ARGS` to completion; fail with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lab", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def quick_lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab-work")
    env = {**os.environ, "HFMERGE_LAB_WORK": str(work), "HF_HUB_OFFLINE": "1"}
    results = tmp_path_factory.mktemp("lab-results")
    # `table` alone is enough (it builds what is missing), so the build runs once, inside it.
    table = _run(["table", "--quick", "--results", str(results), "--search-seed", "3", "--search-trials", "3",
                  "--methods", "zero_shot,experts,multitask,average,task_arithmetic,fisher,dfmerge," + ",".join(NEW_ROWS + DFMERGE_VARIANTS)], env)
    again = _run(["build", "--quick"], env)
    return {"work": work, "again": again, "results": results, "table": table}


def test_committed_data_is_complete_and_small():
    manifest = json.loads((DATA / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == sorted(TASKS)
    total = 0
    for task in TASKS:
        for split in ("train", "validation", "test"):
            path = DATA / task / f"{split}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(rows) == manifest["tasks"][task][split]["examples"] > 0
            for r in rows[:50]:
                assert isinstance(r["prompt"], str) and r["prompt"]
                assert 2 <= len(r["options"]) and 0 <= r["label"] < len(r["options"])
            total += path.stat().st_size
        # No test prompt appears in the task's train or validation split.
        test = {json.loads(line)["prompt"] for line in (DATA / task / "test.jsonl").read_text().splitlines()}
        for split in ("train", "validation"):
            other = {json.loads(line)["prompt"] for line in (DATA / task / f"{split}.jsonl").read_text().splitlines()}
            assert not test & other, f"{task}: test prompts also in {split}"
    total += (DATA / "corpus.txt.gz").stat().st_size
    assert total < 6_000_000
    assert (DATA / "SOURCES.md").exists()


def test_build_writes_hf_folders_and_caches(quick_lab):
    from transformers import AutoConfig, AutoTokenizer

    root = quick_lab["work"] / "quick"
    folders = [p.parent for p in root.rglob("lab.json")]
    names = {p.name for p in folders}
    assert {"multitask", *TASKS} <= names and any(n.startswith("base-") for n in names) and any(n.startswith("tokenizer-") for n in names)
    for folder in folders:
        if folder.name.startswith("tokenizer-"):
            continue
        config = AutoConfig.from_pretrained(folder)
        assert config.model_type == "t5" and config.feed_forward_proj == "relu" and config.tie_word_embeddings
        assert (folder / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(next(f for f in folders if f.name == "multitask"))
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok("is this a word?")["input_ids"][-1] == 1  # EOS appended, as T5's tokenizer does
    assert "<extra_id_0>" in tok.get_vocab()
    # Fine-tuning learns: every expert's and the multitask model's loss ends below where it began.
    for folder in folders:
        info = json.loads((folder / "lab.json").read_text())
        if info["stage"] in ("expert", "multitask"):
            losses = info["losses"]
            assert len(losses) == info["steps"] >= 10, folder.name
            assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (folder.name, losses)
    assert "everything cached" in quick_lab["again"].stdout


def test_table_rows_and_accuracies(quick_lab):
    results = quick_lab["results"]
    report = json.loads((results / "results.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert {"chance", "zero_shot", "experts", "multitask", "average", "task_arithmetic", "fisher", "dfmerge"} <= set(rows)
    for key, row in rows.items():
        if row["status"] != "ok":
            assert row["status"].startswith(("not implemented yet", "failed"))
            assert not row["status"].startswith("failed"), f"{key}: {row['status']}"
            continue
        assert set(row["scores"]) == set(TASKS), key
        assert all(0.0 <= v <= 1.0 for v in row["scores"].values()), key
    for key in ("zero_shot", "experts", "multitask", "average", "task_arithmetic"):
        assert rows[key]["status"] == "ok", rows[key]["status"]
    # No accuracy is compared with chance: quick mode's models are too small and too briefly
    # trained to beat it reliably (that is the full lab's job); that they learn at all is
    # checked on their training losses in test_build_writes_hf_folders_and_caches.
    # --search-seed reaches the DF-Merge recipe (its sampler and Fisher examples), not the models' build settings.
    assert "seed=3" in rows["dfmerge"]["setting"], rows["dfmerge"]["setting"]
    assert report["settings"]["search_seed"] == 3 and report["settings"]["seed"] == 0 == report["build"]["settings"]["seed"]
    table = (results / "table.md").read_text()
    assert "| Task Arithmetic |" in table and "## Ablation" in table
    assert "Zero-shot" in quick_lab["table"].stdout


def test_new_method_rows_choose_on_validation_and_searches_follow_seed_and_budget(quick_lab):
    """RegMean, the singular-value merges and the two searched recipes are ordinary rows:
    scored on every task, chosen on validation, with a wall time; the searched rows take the
    search seed and the --search-trials budget, and report their best validation score."""
    report = json.loads((quick_lab["results"] / "results.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    for key in NEW_ROWS:
        row = rows[key]
        assert row["status"] == "ok", f"{key}: {row['status']}"
        assert row["uses_validation"] is True and set(row["scores"]) == set(TASKS), key
        assert 0.0 <= row["validation_average"] <= 1.0 and row["seconds"] > 0, key
    # Grid rows: the best of their quick grid (regmean's α grid, task arithmetic's for the SVD merges).
    assert "(best of 2 on validation)" in rows["regmean"]["setting"] and "4 validation inputs per task" in rows["regmean"]["setting"]
    for key in ("tsv_merge", "iso_c", "iso_cts"):
        assert rows[key]["setting"].endswith("(best of 3 on validation)"), rows[key]["setting"]
    assert "3 trials (3 random), seed=3" in rows["ties_search"]["setting"], rows["ties_search"]["setting"]
    assert "lambda = " in rows["ties_search"]["setting"] and "density = " in rows["ties_search"]["setting"]
    weights = rows["ta_weights_search"]["setting"].split("weights = ")[1].split(", ")
    assert len(weights) == len(TASKS) and all(0.0 <= float(w) <= 1.0 for w in weights)
    # The depth-wise weight search: two searched gradient points per model, each in [0, 1].
    depth = rows["ta_depth_weights_search"]["setting"]
    points = [part.split(" = ") for part in depth.split("; ", 1)[1].split(", ")]
    assert len(points) == 2 * len(TASKS) and all(0.0 <= float(v) <= 1.0 for _, v in points), depth
    assert all(f"models[{i}].weight" in depth for i in range(len(TASKS))), depth
    assert report["settings"]["search_trials"] == 3
    # DF-Merge's opt-in weightings run as searches of their own, seeded like DF-Merge.
    for key in DFMERGE_VARIANTS:
        assert rows[key]["status"] == "ok" and "seed=3" in rows[key]["setting"], (key, rows[key]["status"], rows[key]["setting"])
        assert set(rows[key]["scores"]) == set(TASKS), key
    table = (quick_lab["results"] / "table.md").read_text()
    for label in ("| RegMean | ✓ |", "| TSV-Merge | ✓ |", "| Iso-C | ✓ |", "| Iso-CTS | ✓ |", "| TIES, λ and density searched (GP) | ✓ |"):
        assert label in table, label


def test_seeds_summary_is_mean_and_sample_sd_over_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.lab import seeds

    def row(key, test, valid, secs, status="ok"):
        return {"key": key, "label": key.upper(), "status": status, "average": test, "validation_average": valid, "seconds": secs}

    folders = []
    for seed, (a, b) in enumerate([(0.4908, 0.50), (0.4658, 0.52), (0.4527, 0.51)]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        rows = [row("dfmerge", a, 0.49, 400.0 + seed), row("grid", b, None, 10.0),
                row("broken", None, None, None, status="failed: x" if seed == 1 else "ok")]
        (folder / "results.json").write_text(json.dumps({"settings": {"search_seed": seed}, "rows": rows}))
        folders.append(folder)
    summary = {e["key"]: e for e in seeds.summarise(seeds.load_runs(folders))}
    assert set(summary) == {"dfmerge", "grid"}  # a row missing (or failed) in one run is left out
    d = summary["dfmerge"]
    assert d["seeds"] == [0, 1, 2] and d["test_mean"] == pytest.approx(0.46977, abs=1e-5)
    assert d["test_sd"] == pytest.approx(0.019355, abs=1e-5)  # sample sd (n - 1), as the docs' seed tables
    assert d["validation_sd"] == pytest.approx(0.0) and d["seconds_mean"] == pytest.approx(401.0)
    assert summary["grid"]["validation_mean"] is None and summary["grid"]["test_sd"] == pytest.approx(0.01)
    text = seeds.seeds_table(list(summary.values()))
    assert "| DFMERGE | 49.08 | 46.58 | 45.27 | 46.98 ± 1.94 |" in text
    out = tmp_path / "s.json"
    assert seeds.main([*map(str, folders), "--out", str(out)]) == 0
    assert json.loads(out.read_text())[0]["key"] == "dfmerge"


def test_weights_statistics_on_hand_computed_fishers(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import torch

    from benchmarks.lab.weights import roughness, weight_statistics

    trials = [{"params": [0.0, 0.0], "score": 0.50}, {"params": [0.1, 0.0], "score": 0.53}, {"params": [1.0, 1.0], "score": 0.90},
              {"params": [0.1, 0.0], "score": 0.1, "state": "FAIL"}]
    pairs, median, mean = roughness(trials)  # one pair of neighbours; the far trial and the failed one do not count
    assert pairs == 1 and median == pytest.approx(0.03) and mean == pytest.approx(0.03)
    assert roughness(trials[2:3]) == (0, None, None)

    # Shares of model 0: 0.25 and 0.95; model 1 (λ = 0) holds the rest. w_0 = 2 · share = 0.5, 1.9.
    fishers = [{"t": torch.tensor([1.0, 19.0])}, {"t": torch.tensor([3.0, 1.0])}]
    got = weight_statistics([0.5, 0.0], fishers)
    assert got["entries"] == 2 and got["kept"] == 1 and got["models"] == 2
    assert got["one_model_90"] == pytest.approx(0.5)  # only the second entry
    assert got["switched_off_share"] == pytest.approx((0.75 + 0.05) / 2)
    assert got["kept_weight"] == pytest.approx((0.5 + 1.9) / 2)
    assert got["stretched"] == pytest.approx(0.5)
    assert got["max_kept_weight_p99"] == pytest.approx(0.5 + 0.99 * 1.4, abs=1e-5)
    # Equal Fishers and every λ ≠ 0: every weight is 1, nothing dominant or stretched.
    flat = weight_statistics([0.3, 0.7], [{"t": torch.ones(4)}, {"t": torch.ones(4)}])
    assert flat["one_model_90"] == 0 and flat["stretched"] == 0 and flat["kept_weight"] == pytest.approx(1.0)


def test_weights_command_reads_a_dfmerge_run(quick_lab, tmp_path):
    runs = [p.parent.parent for p in quick_lab["work"].glob("**/table/dfmerge-*/merged/dfmerge_search.json")
            if json.loads(p.read_text()).get("fisher") and (p.parent.parent / "hfmerge-cache" / "fisher").is_dir()]
    assert runs, "the quick lab ran no Fisher-weighted DF-Merge"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "w.json"
    proc = _run(["weights", str(runs[0]), "--json", str(out)], env)
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and rows[0]["entries"] > 0 and 0.0 <= rows[0]["one_model_90"] <= 1.0
    assert rows[0]["pairs"] >= 0 and rows[0]["weighting"] in ("paper", "kept", "capped") + tuple(f"capped, α = {a}" for a in (0.5,))
    assert f"| {runs[0].name} |" in proc.stdout


def test_probe_reports_context_use_linearity_and_interference(quick_lab, tmp_path):
    env = {**os.environ, "HFMERGE_LAB_WORK": str(quick_lab["work"]), "HF_HUB_OFFLINE": "1"}
    proc = _run(["probe", "--quick", "--results", str(tmp_path), "--validation-examples", "16"], env)
    report = json.loads((tmp_path / "probe.json").read_text())
    ctx = report["context_use"]
    assert ctx["blocks"] > 0
    for key in ("loss", "loss_swapped_inputs", "span_token_loss", "span_token_loss_swapped_inputs"):
        assert 0.0 < ctx[key] < 20.0, key
    assert 0.0 < ctx["unigram_entropy"] < 8.0  # at most log(vocabulary size): log(1000) in quick mode
    tv = report["task_vectors"]
    assert set(tv["rows"]) == set(TASKS)
    for task, row in tv["rows"].items():
        assert {"alpha=0", "alpha=0.5", "alpha=1", "+ other task vectors", "+ random, same norms"} <= set(row)
        assert all(0.0 <= v <= 100.0 for v in row.values()), task
    for a in TASKS:
        assert tv["cosines"][a][a] == pytest.approx(1.0, abs=1e-4)
        for b in TASKS:
            assert tv["cosines"][a][b] == pytest.approx(tv["cosines"][b][a], abs=1e-5)
        assert tv["relative_norms"][a] > 0
    assert "## Does the base read its input?" in proc.stdout and (tmp_path / "probe.md").exists()


def test_probe_states_are_the_experts_and_random_vectors_match_norms(quick_lab, monkeypatch):
    monkeypatch.setenv("HFMERGE_LAB_WORK", str(quick_lab["work"]))
    monkeypatch.syspath_prepend(str(REPO))
    import importlib

    import torch

    settings_mod = importlib.reload(importlib.import_module("benchmarks.lab.settings"))
    build = importlib.reload(importlib.import_module("benchmarks.lab.build"))
    probe = importlib.reload(importlib.import_module("benchmarks.lab.probe"))
    from transformers import T5ForConditionalGeneration

    settings = settings_mod.settings_for(True)
    paths = build.lab_paths(settings)
    p = probe.TaskVectorProbe(settings, paths, validation_examples=4)
    expert = T5ForConditionalGeneration.from_pretrained(paths["expert:usage"]).state_dict()
    state = p.state({"usage": 1.0})
    assert max((state[k] - expert[k]).abs().max().item() for k in state) < 1e-6
    # Restricting the other vectors to one group leaves every other tensor at the expert's value.
    mixed = p.state({"usage": 1.0, "topic": 1.0}, only="encoder FFN", only_tasks=("topic",))
    for k in mixed:
        if probe.group_of(k) == "encoder FFN":
            assert torch.allclose(mixed[k], expert[k] + p.vectors["topic"][k], atol=1e-6), k
        else:
            assert torch.allclose(mixed[k], expert[k], atol=1e-6), k
    noise = p.random_like(["topic"], seed=0)
    for k, v in p.vectors["topic"].items():
        assert noise[k].norm().item() == pytest.approx(v.norm().item(), rel=1e-4, abs=1e-7), k
    assert {probe.group_of(k) for k in p.base} == set(probe.GROUPS)


def test_pretraining_mixture_draws_supervised_rows_from_train_only(quick_lab, monkeypatch):
    """From `supervised_from` on, each batch carries `supervised_per_batch` supervised train
    examples (the prompt and its gold answer), never a test prompt; before it,
    only span corruption (sentinels in every input)."""
    monkeypatch.setenv("HFMERGE_LAB_WORK", str(quick_lab["work"]))
    monkeypatch.syspath_prepend(str(REPO))
    import dataclasses
    import importlib

    settings_mod = importlib.reload(importlib.import_module("benchmarks.lab.settings"))
    build = importlib.reload(importlib.import_module("benchmarks.lab.build"))
    base = settings_mod.settings_for(True)
    tokenizer = build.load_tokenizer(build.lab_paths(base)["tokenizer"])
    settings = dataclasses.replace(base, pretrain=dataclasses.replace(
        base.pretrain, batch_size=8, supervised_per_batch=3, supervised_examples=20, supervised_from=5))
    batches, info = build.pretraining_batches(settings, tokenizer)
    assert info["supervised_examples"] == 20 * len(TASKS)

    sentinel = tokenizer.convert_tokens_to_ids("<extra_id_0>")

    def prompts(split):
        return {tuple(x) for task in TASKS for x, _ in build.finetune_examples(settings, tokenizer, task, split)}

    train, test = prompts("train"), prompts("test")
    for step in range(4):
        batch = batches(step)
        assert batch["input_ids"].shape[0] == 8
        assert all(sentinel in row.tolist() for row in batch["input_ids"]), step
    for step in range(5, 9):
        batch = batches(step)
        plain = [tuple(i for i in row.tolist() if i != 0) for row in batch["input_ids"] if sentinel not in row.tolist()]
        assert len(plain) == 3, step
        for row in plain:
            assert row in train and row not in test, tokenizer.decode(row)
    bad = dataclasses.replace(base, pretrain=dataclasses.replace(base.pretrain, supervised_per_batch=2, supervised_examples=0))
    with pytest.raises(ValueError, match="supervised_examples"):
        build.pretraining_batches(bad, tokenizer)


def test_tokenizer_pieces_get_a_canonical_order(monkeypatch):
    """The Unigram trainer emits equal-score pieces, and the rare characters it appends, in a
    run-dependent order; the lab's tokenizer puts them in one order, so ids are reproducible."""
    monkeypatch.syspath_prepend(str(REPO))
    import importlib
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers

    build = importlib.import_module("benchmarks.lab.build")
    special = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]]
    regular = [["▁the", -2.0], ["▁a", -2.5], ["▁cat", -4.0], ["▁dog", -4.0 + 1e-12], ["▁sat", -4.0], ["s", -4.2]]
    appended = [["#", -9.1], ["=", -9.1001], ["^", -9.1002], ["$", -9.1002]]  # scores step down, clamped

    def trained(seed):
        rng = random.Random(seed)
        pieces = regular[:]
        rng.shuffle(pieces)
        pieces.sort(key=lambda p: -round(p[1], 6))  # the trainer's order: by score, ties in any order
        chars = [p[0] for p in appended]
        rng.shuffle(chars)  # the appended characters get the stepped scores in hash order
        vocab = special + pieces + [[c, s] for c, (_, s) in zip(chars, appended)]
        tok = Tokenizer(models.Unigram([tuple(p) for p in vocab], unk_id=2))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        return tok

    canon = [build._canonical_unigram(trained(seed)) for seed in range(6)]
    vocabs = [json.loads(t.to_str())["model"]["vocab"] for t in canon]
    assert all(v == vocabs[0] for v in vocabs[1:])
    assert [p for p, _ in vocabs[0][:3]] == ["<pad>", "</s>", "<unk>"]
    assert [p for p, _ in vocabs[0][-4:]] == ["#", "$", "=", "^"]
    assert [s for _, s in vocabs[0][-4:]] == [-9.1, -9.1001, -9.1002, -9.1002]
    # "▁cat" and "▁dog" differ by 1e-12: rounded, they tie and sort by piece; "s" stays a regular piece.
    assert vocabs[0][3:10] == [["▁the", -2.0], ["▁a", -2.5], ["▁cat", -4.0], ["▁dog", -4.0], ["▁sat", -4.0], ["s", -4.2],
                               ["#", -9.1]]
    assert {tuple(canon[0].encode("the cat sat").ids)} == {tuple(t.encode("the cat sat").ids) for t in canon}
