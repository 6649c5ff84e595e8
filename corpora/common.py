"""Pieces every builder of a shipped collection shares (`corpora.debian_pkgs`, `corpora.python_docs`).

- splitting by a stable hash (`split_key`, `assign_splits`);
- near-duplicate collapsing and repeated-query dropping (`collapse_near_duplicates`, `drop_repeated`);
- BM25 (bm25s, deterministic ties), hard-negative mining and the README's reference scores
  (`BM25`, `mine_negatives`, `bm25_reference`);
- deterministic writing of the BEIR layout (`Collection.write`, `write_stats`): rebuilding from
  the same source gives byte-identical data files;
- the README's tables (`collection_stats`, `count_rows`, `count_table`, `bm25_table`) and the
  command-line options every builder has (`add_common_arguments`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Sequence, TypeVar

from tqdm import tqdm

from retrieval.bm25 import BM25
from retrieval.data import load_corpus, load_split
from retrieval.errors import StarbucksError
from retrieval.io import atomic_path, atomic_write_gzip, atomic_write_json
from retrieval.metrics import evaluate

SPLITS = ("train", "dev", "test")  # the order of every split listing (README, qrels)
BM25_METRICS = ("RR@10", "nDCG@10", "R@100")
BM25_DEPTH = 1000

T = TypeVar("T")


def normalize(text: str) -> str:
    """Whitespace-normalise `text`."""
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Splits and duplicates
# --------------------------------------------------------------------------------------------


def split_key(name: str) -> str:
    """The stable split hash of a record name (sha1 hex)."""
    return hashlib.sha1(name.encode("utf-8")).hexdigest()


def assign_splits(names: Iterable[str], dev_size: int, test_size: int) -> dict[str, list[str]]:
    """Sort names by `split_key`; first `dev_size` -> dev, next `test_size` -> test, rest -> train.

    Each split's list is in hash order.
    """
    ordered = sorted(names, key=lambda n: (split_key(n), n))
    if dev_size < 0 or test_size < 0:
        raise StarbucksError("--dev-size and --test-size must be >= 0")
    if len(ordered) < dev_size + test_size:
        raise StarbucksError(
            f"only {len(ordered)} records kept, fewer than --dev-size {dev_size} + --test-size {test_size}"
        )
    return {
        "dev": ordered[:dev_size],
        "test": ordered[dev_size : dev_size + test_size],
        "train": ordered[dev_size + test_size :],
    }


def collapse_near_duplicates(
    items: Iterable[T], family: Callable[[T], Hashable], rank: Callable[[T], object]
) -> tuple[list[T], int]:
    """One representative per family (items with equal `family(item)`): the one with the lowest
    `rank(item)`. Returns the representatives (families in first-seen order) and how many were dropped."""
    families: dict[Hashable, list[T]] = defaultdict(list)
    for item in items:
        families[family(item)].append(item)
    representatives = [min(members, key=rank) for members in families.values()]
    return representatives, sum(len(members) - 1 for members in families.values())


def drop_repeated(items: Sequence[T], key: Callable[[T], Hashable]) -> tuple[list[T], int]:
    """Drop every item whose `key` occurs more than once (all occurrences), so each query has one
    relevant passage. Returns the kept items (in order) and how many were dropped."""
    count = Counter(key(item) for item in items)
    kept = [item for item in items if count[key(item)] == 1]
    return kept, len(items) - len(kept)


# --------------------------------------------------------------------------------------------
# BM25
# --------------------------------------------------------------------------------------------
# (`BM25` itself is the library's, retrieval/bm25.py: train.mine ranks with it too.)


def mine_negatives(
    bm25: BM25, queries: Sequence[tuple[str, str, str]], num_negatives: int, progress: bool = True
) -> list[dict]:
    """Training groups: for each (query id, query, positive id) the BM25 top `num_negatives`, positive excluded."""
    groups = []
    for qid, text, pos in tqdm(queries, desc="mining BM25 negatives", disable=not progress):
        negs = [did for did, _ in bm25.search(text, num_negatives, exclude=pos)]
        groups.append({"query_id": qid, "query": text, "positive_document_ids": [pos], "negative_document_ids": negs})
    return groups


def bm25_reference(
    dataset_dir: str | Path,
    splits: Sequence[str] = ("dev", "test"),
    depth: int = BM25_DEPTH,
    stemmer: str | None = None,
    bm25: BM25 | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """BM25 (bm25s) RR@10 / nDCG@10 / R@100 per split of a BEIR `dataset_dir` (`retrieval.metrics`).

    Each split's queries are searched (top `depth`) over the whole corpus; a query with no
    hit counts as 0. The stemmer defaults to the one recorded in the directory's stats.json.
    """
    dataset_dir = Path(dataset_dir)
    if stemmer is None:
        stats_path = dataset_dir / "stats.json"
        stemmer = json.loads(stats_path.read_text())["bm25"]["stemmer"] if stats_path.exists() else "none"
    if bm25 is None:
        corpus = load_corpus(str(dataset_dir))
        bm25 = BM25(list(corpus), list(corpus.values()), stemmer=stemmer, progress=progress)
    results: dict[str, dict[str, float]] = {}
    for split in splits:
        judged = load_split(split, str(dataset_dir))
        run = {}
        for qid in tqdm(sorted(judged.qrels), desc=f"BM25 {split}", disable=not progress):
            hits = bm25.search(judged.queries[qid], depth)
            if hits:
                run[qid] = dict(hits)
        scores = evaluate(run, judged.qrels, BM25_METRICS).aggregate
        results[split] = {name: round(value, 4) for name, value in scores.items()}
    return results


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_jsonl_gz(path: Path, rows: Iterable[dict]) -> None:
    """Write rows as gzip'd JSON lines, deterministically (no name or time in the header)."""
    atomic_write_gzip(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_qrels(path: Path, pairs: Iterable[tuple[str, str]]) -> None:
    """Write BEIR qrels (header, score 1), sorted by query id."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for qid, did in sorted(pairs):
            fh.write(f"{qid}\t{did}\t1\n")


def write_stats(out: Path, stats: dict) -> None:
    """Write the machine-readable stats.json (no dates: rebuilds stay byte-identical)."""
    atomic_write_json(out / "stats.json", stats)


def sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file (the README's record of its source)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Collection:
    """An in-memory dataset: corpus, queries, per-split query ids, one relevant passage per query
    and training groups (for the `train` split)."""

    corpus: dict[str, str]
    queries: dict[str, str]
    splits: dict[str, list[str]]  # split -> query ids, in hash order
    positive: dict[str, str]  # query id -> doc id
    groups: list[dict]
    info: dict = field(default_factory=dict)  # extra stats (e.g. a subset's recipe)

    @property
    def split_names(self) -> list[str]:
        """The collection's splits, in `SPLITS` order."""
        return [s for s in SPLITS if s in self.splits]

    def qrels(self) -> dict[str, list[tuple[str, str]]]:
        return {s: [(q, self.positive[q]) for q in self.splits[s]] for s in self.split_names}

    def write(self, out: Path) -> None:
        """Write the BEIR layout (plus `train.jsonl.gz` when there is a train split) into `out`,
        replacing the qrels there."""
        out.mkdir(parents=True, exist_ok=True)
        if (out / "qrels").exists():
            shutil.rmtree(out / "qrels")
        (out / "qrels").mkdir()
        write_jsonl_gz(out / "corpus.jsonl.gz", ({"_id": i, "text": self.corpus[i]} for i in sorted(self.corpus)))
        write_jsonl_gz(out / "queries.jsonl.gz", ({"_id": i, "text": self.queries[i]} for i in sorted(self.queries)))
        for split, pairs in self.qrels().items():
            write_qrels(out / "qrels" / f"{split}.tsv", pairs)
        if "train" in self.splits:
            write_jsonl_gz(out / "train.jsonl.gz", sorted(self.groups, key=lambda g: g["query_id"]))


# --------------------------------------------------------------------------------------------
# Stats and README tables
# --------------------------------------------------------------------------------------------


def collection_stats(col: Collection) -> dict:
    """Counts of a collection (what its README and stats.json report)."""
    negs = [len(g["negative_document_ids"]) for g in col.groups]
    return {
        "passages": len(col.corpus),
        "queries": {s: len(col.splits[s]) for s in col.split_names},
        "train_groups": len(col.groups),
        "negatives_per_group": {"min": min(negs, default=0), "max": max(negs, default=0)},
        **col.info,
    }


def count_rows(stats: dict) -> list[tuple[str, object]]:
    """The README count table rows every collection has, from its stats.json."""
    rows: list[tuple[str, object]] = [("passages", stats["passages"])]
    rows += [(f"queries ({s})", stats["queries"][s]) for s in SPLITS if s in stats["queries"]]
    rows += [("train groups", stats["train_groups"])]
    rows += [
        ("negatives per group (min)", stats["negatives_per_group"]["min"]),
        ("negatives per group (max)", stats["negatives_per_group"]["max"]),
    ]
    return rows


def count_table(rows: Sequence[tuple[str, object]]) -> str:
    lines = ["| count | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def bm25_table(ref: dict[str, dict[str, float]]) -> str:
    lines = ["| split | " + " | ".join(BM25_METRICS) + " |", "|---|" + "---:|" * len(BM25_METRICS)]
    for split, scores in ref.items():
        lines.append(f"| {split} | " + " | ".join(f"{scores[m]:.4f}" for m in BM25_METRICS) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_common_arguments(p: argparse.ArgumentParser, dev_size: int, test_size: int, negatives: int) -> None:
    """The options of every builder: split sizes, BM25 negatives and stemmer, build date, progress."""
    p.add_argument("--dev-size", type=int, default=dev_size)
    p.add_argument("--test-size", type=int, default=test_size)
    p.add_argument("--negatives", type=int, default=negatives, help="BM25 hard negatives per training group")
    p.add_argument("--stemmer", default="none", help="PyStemmer language for BM25 (default: none)")
    p.add_argument("--date", default=_dt.date.today().isoformat(), help="build date for the READMEs (YYYY-MM-DD)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def check_date(date: str) -> None:
    """Refuse a `--date` that is not YYYY-MM-DD."""
    try:
        _dt.date.fromisoformat(date)
    except ValueError:
        raise StarbucksError(f"--date {date!r} is not YYYY-MM-DD") from None
