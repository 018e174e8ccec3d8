"""Regenerate the merge lab's task files and pre-training corpus from installed sources.

The files this script writes are committed under ``benchmarks/lab/data/``, so the lab itself
never needs the sources below; run this only to rebuild or change them. Sources (see
``data/SOURCES.md`` for their licences):

- Debian ``wordnet-base`` (WordNet 3.0 database, ``/usr/share/wordnet``);
- Debian ``fortunes`` / ``fortunes-min`` (fortune-mod's quotation files,
  ``/usr/share/games/fortunes``);
- the VADER sentiment lexicon, ``vader_lexicon.txt`` inside the PyPI package
  ``vaderSentiment`` (``pip install --no-deps vaderSentiment``, or ``--vader PATH``).

Five tasks of different types, every label made by people (WordNet's lexicographers, the
fortune files' curators, VADER's ten human raters per word):

=============  ====================================  ==========================================
task           input                                 label
=============  ====================================  ==========================================
topic          a quotation from the fortune files    the fortune file it is filed under
sentiment      a word and its WordNet definition     the sign of VADER's mean human rating
relation       two words, the first with definition  the WordNet pointer linking them
usage          a WordNet example sentence + a word   yes if the word is used as a verb there
category       a WordNet noun definition             the synset's lexicographer file
=============  ====================================  ==========================================

The pre-training corpus is a random 5 MB of WordNet (each synset as "lemmas: definition;
examples") and the fortune files, after removing every synset and quotation whose text
appears in a test prompt.

Usage::

    python benchmarks/lab/build_data.py [--out benchmarks/lab/data] [--vader PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from collections import defaultdict
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
SEED = 20240601
CORPUS_BYTES = 5_000_000
SIZES = {"train": 1200, "validation": 200, "test": 300}  # per task, at most

# WordNet's lexicographer files, in lex_filenum order (lexnames(5WN)).
LEXNAMES = [
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group",
    "noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition", "verb.consumption",
    "verb.contact", "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
]
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

TOPICS = ["computers", "food", "law", "politics", "science", "sports"]
CATEGORIES = {"noun.animal": "animal", "noun.plant": "plant", "noun.food": "food", "noun.person": "person",
              "noun.artifact": "object", "noun.location": "place"}
RELATIONS = ["synonym", "antonym", "kind of", "part of", "derived form"]


# --------------------------------------------------------------------------- WordNet

class Synset:
    __slots__ = ("key", "pos", "lexname", "lemmas", "pointers", "definition", "examples")

    def __init__(self, key, pos, lexname, lemmas, pointers, definition, examples):
        self.key, self.pos, self.lexname, self.lemmas = key, pos, lexname, lemmas
        self.pointers, self.definition, self.examples = pointers, definition, examples


def _split_gloss(gloss: str) -> tuple[str, list[str]]:
    examples = re.findall(r'"([^"]+)"', gloss)
    definition = re.sub(r'"[^"]*"', "", gloss).strip().strip(";").strip()
    definition = re.sub(r"\s*;\s*(;\s*)*", "; ", definition).strip("; ").strip()
    return definition, [e.strip() for e in examples if e.strip()]


def read_wordnet(root: Path) -> dict[str, Synset]:
    """Every synset of the four data files, keyed "pos:offset" (satellites count as adjectives)."""
    synsets = {}
    for pos, name in POS_FILES.items():
        for line in (root / f"data.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            offset, lexnum, n_words = f[0], int(f[1]), int(f[3], 16)
            lemmas = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]) for i in range(n_words)]
            i = 4 + 2 * n_words
            n_ptr = int(f[i])
            pointers = []
            for j in range(n_ptr):
                sym, target, tpos, st = f[i + 1 + 4 * j: i + 5 + 4 * j]
                pointers.append((sym, f"{'a' if tpos == 's' else tpos}:{target}", int(st[:2], 16), int(st[2:], 16)))
            definition, examples = _split_gloss(gloss)
            key = f"{pos}:{offset}"
            synsets[key] = Synset(key, pos, LEXNAMES[lexnum], lemmas, pointers, definition, examples)
    return synsets


def read_first_senses(root: Path) -> dict[tuple[str, str], str]:
    """(lemma, pos) -> the synset of its most frequent sense (index files list senses by frequency)."""
    first = {}
    for pos, name in POS_FILES.items():
        for line in (root / f"index.{name}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):
                continue
            f = line.split()
            lemma, synset_cnt, p_cnt = f[0], int(f[2]), int(f[3])
            offsets = f[4 + p_cnt + 2:]
            if len(offsets) == synset_cnt and offsets:
                first[(lemma, pos)] = f"{pos}:{offsets[0]}"
    return first


def words(lemma: str) -> str:
    return lemma.replace("_", " ")


# --------------------------------------------------------------------------- fortunes

def read_fortunes(root: Path, name: str) -> list[str]:
    text = (root / name).read_text(encoding="utf-8", errors="replace")
    quotes = []
    for chunk in re.split(r"^%\s*$", text, flags=re.M):
        q = re.sub(r"\s+", " ", chunk).strip()
        if q:
            quotes.append(q)
    return quotes


def fortune_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and "." not in p.name)


# --------------------------------------------------------------------------- VADER

def find_vader(path: str | None) -> Path:
    if path:
        return Path(path)
    import importlib.util

    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("vaderSentiment is not installed: pip install --no-deps vaderSentiment, or pass --vader PATH/vader_lexicon.txt")
    return Path(list(spec.submodule_search_locations)[0]) / "vader_lexicon.txt"


def read_vader(path: Path) -> dict[str, tuple[float, float]]:
    out = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        f = line.split("\t")
        if len(f) >= 3:
            out[f[0]] = (float(f[1]), float(f[2]))
    return out


# --------------------------------------------------------------------------- tasks

def _balanced(groups: dict[str, list], per_class: int, rng: random.Random) -> list:
    """At most `per_class` items of each label, shuffled."""
    out = []
    for label in sorted(groups):
        items = list(groups[label])
        rng.shuffle(items)
        out += items[:per_class]
    rng.shuffle(out)
    return out


def _split(examples: list[dict], rng: random.Random) -> dict[str, list[dict]]:
    """Stratified by label: test, validation and train sizes capped by SIZES (or 20/15/65%)."""
    by_label = defaultdict(list)
    for e in examples:
        by_label[e["label"]].append(e)
    total = len(examples)
    n_test = min(SIZES["test"], round(0.2 * total))
    n_val = min(SIZES["validation"], round(0.15 * total))
    n_train = min(SIZES["train"], total - n_test - n_val)
    out = {s: [] for s in SIZES}
    for label in sorted(by_label):
        items = by_label[label]
        rng.shuffle(items)
        share = len(items) / total
        k_test, k_val = round(n_test * share), round(n_val * share)
        out["test"] += items[:k_test]
        out["validation"] += items[k_test:k_test + k_val]
        out["train"] += items[k_test + k_val:k_test + k_val + round(n_train * share)]
    for s in out:
        rng.shuffle(out[s])
    return out


def task_topic(rng: random.Random) -> list[dict]:
    groups = {}
    for topic in TOPICS:
        quotes = [q for q in read_fortunes(FORTUNES, topic) if 30 <= len(q) <= 320]
        groups[topic] = [{"text": q, "topic": topic} for q in dict.fromkeys(quotes)]
    out = []
    for item in _balanced(groups, 240, rng):
        out.append({
            "prompt": f"Quote: {item['text']}\nIs this quote about computers, food, law, politics, science or sports?",
            "options": TOPICS, "label": TOPICS.index(item["topic"]), "source": f"fortunes:{item['topic']}",
            "_quote": item["text"],
        })
    return out


def task_sentiment(wn, first, vader, rng) -> list[dict]:
    groups = defaultdict(list)
    for word, (mean, sd) in sorted(vader.items()):
        if not re.fullmatch(r"[a-z]{3,}", word) or abs(mean) < 1.0 or sd > 1.3:
            continue
        key = next((first[(word, p)] for p in ("a", "n", "v", "r") if (word, p) in first), None)
        if key is None:
            continue
        s = wn[key]
        groups["positive" if mean > 0 else "negative"].append({
            "prompt": f"Word: {word}\nMeaning: {s.definition}\nIs this word positive or negative?",
            "options": ["negative", "positive"], "label": int(mean > 0), "source": f"vader:{word} wordnet:{key}",
            "_synsets": [key],
        })
    return _balanced(groups, min(len(v) for v in groups.values()), rng)


def _single(lemma: str) -> bool:
    return bool(re.fullmatch(r"[a-z]{3,}", lemma))


def task_relation(wn, rng) -> list[dict]:
    groups = defaultdict(list)

    def add(rel, s1, w1, s2, w2):
        if _single(w1) and _single(w2) and w1 != w2 and s1.definition:
            groups[rel].append((s1.key, w1, s2.key, w2))

    for s in wn.values():
        single = [l for l in s.lemmas if _single(l)]
        if len(single) >= 2:
            add("synonym", s, single[0], s, single[1])
        for sym, target, src, dst in s.pointers:
            t = wn.get(target)
            if t is None:
                continue
            w1 = s.lemmas[src - 1] if src else s.lemmas[0]
            w2 = t.lemmas[dst - 1] if dst else t.lemmas[0]
            if sym == "!":
                add("antonym", s, w1, t, w2)
            elif sym == "@" and s.pos == "n":
                add("kind of", s, w1, t, w2)
            elif sym == "#p":
                add("part of", s, w1, t, w2)
            elif sym == "+" and src and dst:
                add("derived form", s, w1, t, w2)
    rows = {}
    for rel, items in groups.items():
        rows[rel] = [{
            "prompt": f"First word: {w1} ({wn[k1].definition})\nSecond word: {w2}\n"
                      "Is the first word a synonym, an antonym, a kind of, a part of or a derived form of the second?",
            "options": RELATIONS, "label": RELATIONS.index(rel), "source": f"wordnet:{k1}->{k2}", "_synsets": [k1],
        } for k1, w1, k2, w2 in dict.fromkeys(items)]
    return _balanced(rows, 360, rng)


def task_usage(wn, rng) -> list[dict]:
    """Yes/no: is the word a verb in this WordNet example sentence (of a noun or verb synset)?"""
    noun_lemmas = {l.lower() for s in wn.values() if s.pos == "n" for l in s.lemmas}
    verb_lemmas = {l.lower() for s in wn.values() if s.pos == "v" for l in s.lemmas}
    both = {l for l in noun_lemmas & verb_lemmas if _single(l)}
    groups = defaultdict(list)
    for s in wn.values():
        if s.pos not in "nv":
            continue
        for lemma in dict.fromkeys(l.lower() for l in s.lemmas):
            if lemma not in both:
                continue
            for ex in s.examples:
                if re.search(rf"\b{lemma}\b", ex, flags=re.I) and len(ex) <= 200:
                    groups[s.pos].append({
                        "prompt": f"Sentence: {ex}\nQuestion: is \"{lemma}\" used as a verb in this sentence?",
                        "options": ["no", "yes"], "label": int(s.pos == "v"), "source": f"wordnet:{s.key}",
                        "_synsets": [s.key],
                    })
                    break
    return _balanced(groups, 850, rng)


def task_category(wn, rng) -> list[dict]:
    options = list(CATEGORIES.values())
    groups = defaultdict(list)
    for s in wn.values():
        if s.pos == "n" and s.lexname in CATEGORIES and 15 <= len(s.definition) <= 200:
            groups[s.lexname].append({
                "prompt": f"Definition: {s.definition}\nIs this an animal, a plant, a food, a person, an object or a place?",
                "options": options, "label": options.index(CATEGORIES[s.lexname]), "source": f"wordnet:{s.key} {s.lexname}",
                "_synsets": [s.key],
            })
    return _balanced(groups, 285, rng)


# --------------------------------------------------------------------------- corpus

def corpus_lines(wn, excluded_synsets: set[str], excluded_quotes: set[str], rng: random.Random) -> list[str]:
    lines = []
    for s in wn.values():
        if s.key in excluded_synsets or not s.definition:
            continue
        text = ", ".join(words(l) for l in s.lemmas) + ": " + s.definition
        if s.examples:
            text += "; " + "; ".join(f'"{e}"' for e in s.examples)
        lines.append(text)
    for name in fortune_files(FORTUNES):
        for q in read_fortunes(FORTUNES, name):
            if q not in excluded_quotes and len(q) >= 20:
                lines.append(q)
    lines = list(dict.fromkeys(lines))
    rng.shuffle(lines)
    kept, size = [], 0
    for line in lines:  # a random subset of CORPUS_BYTES keeps the committed file small
        size += len(line.encode("utf-8")) + 1
        if size > CORPUS_BYTES:
            break
        kept.append(line)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "data"))
    p.add_argument("--vader", help="path of vader_lexicon.txt (default: from the installed vaderSentiment package)")
    args = p.parse_args(argv)
    out = Path(args.out)
    for path in (WORDNET / "data.noun", FORTUNES / "computers"):
        if not path.exists():
            raise SystemExit(f"{path} not found: apt-get install wordnet-base fortunes fortunes-min")
    vader_path = find_vader(args.vader)

    wn = read_wordnet(WORDNET)
    first = read_first_senses(WORDNET)
    vader = read_vader(vader_path)
    tasks = {
        "topic": task_topic(random.Random(SEED + 1)),
        "sentiment": task_sentiment(wn, first, vader, random.Random(SEED + 2)),
        "relation": task_relation(wn, random.Random(SEED + 3)),
        "usage": task_usage(wn, random.Random(SEED + 4)),
        "category": task_category(wn, random.Random(SEED + 5)),
    }
    excluded_synsets: set[str] = set()
    excluded_quotes: set[str] = set()
    manifest = {"seed": SEED, "tasks": {}}
    for name, examples in tasks.items():
        splits = _split(examples, random.Random(SEED + 10 + len(name)))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        manifest["tasks"][name] = {}
        for split, rows in splits.items():
            if split == "test":
                for r in rows:
                    excluded_synsets.update(r.get("_synsets", []))
                    if "_quote" in r:
                        excluded_quotes.add(r["_quote"])
            text = "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n" for r in rows)
            (folder / f"{split}.jsonl").write_text(text, encoding="utf-8")
            counts = defaultdict(int)
            for r in rows:
                counts[r["options"][r["label"]]] += 1
            manifest["tasks"][name][split] = {"examples": len(rows), "labels": dict(sorted(counts.items())),
                                              "sha256": hashlib.sha256(text.encode()).hexdigest()}
    lines = corpus_lines(wn, excluded_synsets, excluded_quotes, random.Random(SEED + 99))
    corpus = ("\n".join(lines) + "\n").encode("utf-8")
    # mtime=0 keeps the gzip bytes identical from run to run.
    with open(out / "corpus.txt.gz", "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write(corpus)
    manifest["corpus"] = {"lines": len(lines), "bytes": len(corpus), "sha256": hashlib.sha256(corpus).hexdigest(),
                          "excluded_synsets": len(excluded_synsets), "excluded_quotes": len(excluded_quotes)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for name, info in manifest["tasks"].items():
        print(f"{name:10s} " + "  ".join(f"{s} {v['examples']} {v['labels']}" for s, v in info.items()))
    print(f"corpus: {len(lines)} lines, {len(corpus) / 1e6:.1f} MB ({(out / 'corpus.txt.gz').stat().st_size / 1e6:.1f} MB gzipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
