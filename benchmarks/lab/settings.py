"""The lab's settings (full and quick), its paths and its tasks.

Every figure the lab produces is a function of one `LabSettings`; its hash names the cache
folder, so changing any setting builds a new lab beside the old one instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent.parent
DATA_DIR = LAB_DIR / "data"
# The cache of built models and merges (git-ignored); HFMERGE_LAB_WORK moves it (the tests do).
WORK_DIR = Path(os.environ.get("HFMERGE_LAB_WORK") or REPO / "benchmarks" / "_work" / "lab")
RESULTS_DIR = LAB_DIR / "results"

TASKS = ("topic", "sentiment", "relation", "usage", "category")
# Bumped when the tokenizer's training changes what it produces (2: pieces in a canonical
# order, so a build is reproducible), which gives every stage a new cache key.
TOKENIZER_FORMAT = 2
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ModelSettings:
    """An original-layout T5: ReLU FFN, tied embeddings, relative position buckets."""

    vocab_size: int = 8000
    d_model: int = 128
    d_ff: int = 512
    d_kv: int = 32
    num_heads: int = 4
    num_layers: int = 4
    num_decoder_layers: int = 4
    dropout_rate: float = 0.0


@dataclass(frozen=True)
class PretrainSettings:
    """Span corruption (T5's objective): 15% noise, mean span 3, packed blocks."""

    steps: int = 1000
    batch_size: int = 64
    input_length: int = 128
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # or "adafactor" (lr is then relative to each parameter's RMS)
    schedule: str = "cosine"  # or "constant" after the warm-up
    # T5's pre-training mixture: from step `supervised_from` on, this many of each batch's rows
    # are supervised examples drawn from the last `supervised_examples` rows of every task's
    # train split (0: span corruption only). Test and validation examples are never used.
    supervised_per_batch: int = 0
    supervised_examples: int = 0
    supervised_from: int = 0


@dataclass(frozen=True)
class FinetuneSettings:
    """The same for every expert; the multitask model gets `multitask_steps` (default: `steps` ×
    the number of tasks, so it sees each task as often as its expert does)."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 40
    weight_decay: float = 0.0
    max_input_tokens: int = 160
    train_examples: int | None = None  # per task; None = all
    multitask_steps: int | None = None


@dataclass(frozen=True)
class LabSettings:
    name: str
    seed: int = 0
    threads: int = 2
    model: ModelSettings = field(default_factory=ModelSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    corpus_bytes: int | None = None  # use only the first bytes of the corpus (quick mode)
    # Table: validation / test examples per task (None = the whole split) and search budgets.
    eval_validation: int | None = None
    eval_test: int | None = None
    dfmerge_trials: int = 60
    dfmerge_startup: int = 10
    search_seed: int = 0  # the DF-Merge recipes' seed and fisher_seed: the sampler and the Fisher's examples (not the models)
    fisher_examples: int | None = None  # validation inputs per task for Fisher methods (None: hfmerge's default, 30)
    fractions: tuple[float, ...] = (0.05, 0.1, 0.3, 0.5, 1.0)
    # Figure 5 for DF-Merge: one new search per fraction below 1 (the grid methods re-select for free).
    dfmerge_fractions: tuple[float, ...] = (0.05, 0.3, 1.0)
    # Completed trials of the searched recipes (table.SEARCH_ROWS); None: dfmerge_trials.
    search_trials: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def stage_keys(self) -> dict[str, str]:
        """Short hashes of what each stage depends on: tokenizer ⊂ base ⊂ fine-tuned models.

        Changing the fine-tuning settings keeps the cached tokenizer and pre-trained base;
        changing the table's budgets (evaluation sizes, trials) rebuilds nothing.
        """
        def h(d: dict) -> str:
            return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

        data = data_fingerprint()
        tok = {"data": data, "corpus_bytes": self.corpus_bytes, "vocab_size": self.model.vocab_size,
               "tokenizer_format": TOKENIZER_FORMAT}
        base = {**tok, "seed": self.seed, "model": asdict(self.model), "pretrain": asdict(self.pretrain)}
        tuned = {**base, "finetune": asdict(self.finetune)}
        return {"tokenizer": h(tok), "base": h(base), "finetune": h(tuned)}

    def key(self) -> str:
        """The key of the whole lab (its fine-tuned models)."""
        return self.stage_keys()["finetune"]

    @property
    def root(self) -> Path:
        return WORK_DIR / self.name


# The full lab's base: T5's optimiser (Adafactor, constant relative step after warm-up) for
# 5000 steps of span corruption, the last 1000 of them mixed with a few supervised rows (T5's
# pre-training mixture). AdamW pre-training of this model stayed on the unigram plateau and
# Adafactor without the mixture gave a base whose experts did not merge (docs/benchmarks.md).
FULL = LabSettings(
    name="full",
    model=ModelSettings(vocab_size=2000),
    pretrain=PretrainSettings(steps=5000, batch_size=32, input_length=64, lr=1e-2, warmup=100, optimizer="adafactor",
                              schedule="constant", supervised_per_batch=2, supervised_examples=100, supervised_from=4000),
)

# The quick lab is a smoke test of the pipeline, not a benchmark: every stage, every row and
# both figures run, on models too small and too briefly trained to beat chance reliably, so
# the whole build, table and probe cost seconds of CPU. One torch thread: at this size a
# second thread only spins (it tripled the CPU time of a quick build and table).
QUICK = LabSettings(
    name="quick",
    threads=1,
    model=ModelSettings(vocab_size=1000, d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=1, num_decoder_layers=1),
    pretrain=PretrainSettings(steps=30, batch_size=8, input_length=64, lr=1e-2, warmup=5, optimizer="adafactor",
                              schedule="constant", supervised_per_batch=2, supervised_examples=20, supervised_from=20),
    finetune=FinetuneSettings(steps=40, batch_size=8, lr=2e-3, warmup=5, max_input_tokens=48, train_examples=64,
                              multitask_steps=80),
    corpus_bytes=100_000,
    eval_validation=16,
    eval_test=24,
    dfmerge_trials=4,  # 3 random trials, then one guided by the Gaussian process
    dfmerge_startup=3,
    fisher_examples=4,
    fractions=(0.5, 1.0),
    dfmerge_fractions=(0.5, 1.0),
)


def settings_for(quick: bool) -> LabSettings:
    return QUICK if quick else FULL


def data_file(task: str, split: str) -> Path:
    return DATA_DIR / task / f"{split}.jsonl"


def data_fingerprint() -> str:
    """The data manifest's hash: rebuilt data means rebuilt models."""
    return hashlib.sha256((DATA_DIR / "manifest.json").read_bytes()).hexdigest()[:16]


def task_entries(settings: LabSettings, *, validation_examples: int | None = None, seed: int = 0) -> list[dict]:
    """The recipe's `tasks:` section: lm-evaluation-harness multiple-choice keys on the jsonl files.

    Args:
        settings: Gives the default validation / test subset sizes.
        validation_examples: Override the number of validation examples per task (Figure 5).
        seed: Seed of the validation subset.
    """
    entries = []
    for i, task in enumerate(TASKS):
        entry = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data_file(task, "validation")), "test": str(data_file(task, "test"))}},
            "validation_split": "validation",
            "test_split": "test",
            "doc_to_text": "prompt",
            "doc_to_choice": "options",
            "doc_to_target": "label",
            "metric_list": [{"metric": "accuracy"}],
            "model": i,
            "seed": seed,
        }
        n_val = validation_examples if validation_examples is not None else settings.eval_validation
        if n_val is not None:
            entry["num_validation_examples"] = n_val
        if settings.eval_test is not None:
            entry["num_test_examples"] = settings.eval_test
        entries.append(entry)
    return entries
