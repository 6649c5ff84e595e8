"""Build the sentence-pair files `examples/st_starbucks.py` trains and evaluates on, from data/debian-pkgs-mini.

    python examples/make_debian_pairs.py   # writes examples/data/debian-pairs-{train,eval}.jsonl.gz

- train: one `(anchor, positive, negative)` triplet per training group: the package synopsis, its
  long description, and the description of the group's first (top BM25) hard negative;
- eval: per dev query two scored pairs, `(synopsis, its description, 1.0)` and `(synopsis, the
  best-ranked BM25 description that is not its own, 0.0)`, in `stsb`'s columns
  (`sentence1`, `sentence2`, `score`).
The same input gives byte-identical files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.bm25 import BM25  # noqa: E402
from retrieval.data import load_corpus, load_split, load_train_groups  # noqa: E402
from retrieval.io import atomic_write_gzip  # noqa: E402

MINI = ROOT / "data" / "debian-pkgs-mini"
OUT = ROOT / "examples" / "data"


def lines(rows) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]


def main() -> None:
    groups = load_train_groups(str(MINI / "train.jsonl.gz"), str(MINI))
    train = [{"anchor": g.query, "positive": g.positives[0], "negative": g.negatives[0]} for g in groups]
    corpus = load_corpus(str(MINI))
    dev = load_split("dev", str(MINI))
    bm25 = BM25(list(corpus), list(corpus.values()), progress=False)
    pairs = []
    for qid, judged in sorted(dev.qrels.items()):
        (positive,) = judged
        query = dev.queries[qid]
        hits = bm25.search(query, 1, exclude=positive)
        pairs.append({"sentence1": query, "sentence2": corpus[positive], "score": 1.0})
        if hits:
            pairs.append({"sentence1": query, "sentence2": corpus[hits[0][0]], "score": 0.0})
    OUT.mkdir(parents=True, exist_ok=True)
    atomic_write_gzip(OUT / "debian-pairs-train.jsonl.gz", lines(train))
    atomic_write_gzip(OUT / "debian-pairs-eval.jsonl.gz", lines(pairs))
    print(f"wrote {len(train)} training triplets and {len(pairs)} scored eval pairs to {OUT}")


if __name__ == "__main__":
    main()
