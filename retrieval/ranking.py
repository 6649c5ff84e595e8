"""The ranking loop: texts -> `StarbucksModel` -> `EmbeddingStore` -> exact top-k -> TREC run file.

Every part that ranks passages for queries runs it, or the part of it it needs:

- the encode stage: `corpus_blocks`, `open_stores`, `encode_passages`, `encode_queries`;
- the search stage: `ExactRanking` (its exact search), `run_record`, `saved_run`, `ranked`, `write_ranked_run`;
- the suite: the whole loop (the encode pieces, then `rank_store` per size);
- hard-negative mining: `corpus_blocks` and `ExactRanking` over blocks encoded in memory (its own
  resumable cache of each block's top-k, `train.mine.MiningParts`, keyed by `ids_sha256`);
- validation: `ExactRanking` over the candidates' vectors in memory.

So every ranker checks the same things: a store made by another model or from other passages is
refused (`EmbeddingStore.start`, `encode_passages`), a run file records what it was made from
(`run_record`: the store's `PASSAGE_FIELDS`, the queries', how it was searched) and is made again when
that or its bytes changed (`saved_run`, `check_run_file`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from retrieval.errors import StarbucksError
from retrieval.exact_search import ExactSearcher, TopK
from retrieval.runfile import check_run_file, read_run_record, run_path, write_run, write_run_record
from retrieval.sizes import Size
from retrieval.store import PASSAGE_FIELDS, EmbeddingStore, IdsHasher, check_ids, texts_sha256

if TYPE_CHECKING:
    from retrieval.model import StarbucksModel

log = logging.getLogger(__name__)

# Fields of a split's query vectors that a run made from them records.
QUERY_FIELDS = ("model_sha256", "ids_sha256", "max_length", "prefix", "precision")


# ---------------------------------------------------------------- texts -> model -> store


def corpus_blocks(pairs: Iterable[tuple[str, str]], rows: int) -> Iterator[tuple[int, list[str], list[str]]]:
    """`(block, ids, texts)` for consecutive blocks of `rows` `(id, text)` pairs; block `k` is shard `k`."""
    it = iter(pairs)
    for k, block in enumerate(iter(lambda: list(islice(it, rows)), [])):
        yield k, [i for i, _ in block], [t for _, t in block]


def open_stores(
    model: StarbucksModel, sizes: Sequence[Size], root: Path, shard_rows: int, info: Mapping
) -> dict[Size, EmbeddingStore]:
    """Each size's store under `root`, started with the model's passage identity (a store made by another
    model, with other settings or shards, is refused); `info` is recorded, not checked (and, for a hybrid
    with parts from other models, `part_models`: where they came from)."""
    stores = {s: EmbeddingStore(Path(root) / s.name) for s in sizes}
    for s, store in stores.items():
        extra = {"part_models": model.part_sources(s)} if s.models else {}
        store.start({**model.identity(s, "passage"), "shard_rows": shard_rows}, info={**info, **extra})
    return stores


@dataclass
class PassagesEncoded:
    """What `encode_passages` did."""

    count: int  # passages in the corpus, every block
    encoded: int  # passages encoded by this call
    complete: bool  # every store has all its shards (other workers' included) and is finalised


def encode_passages(
    model: StarbucksModel,
    stores: Mapping[Size, EmbeddingStore],
    blocks: Iterable[tuple[int, list[str], list[str]]],
    where: str,
    batch_size: int,
    *,
    owns: Callable[[int], bool] = lambda block: True,
    progress=None,
    workers: int = 0,
    note: Callable[[str], None] = log.info,
) -> PassagesEncoded:
    """Encode the blocks this worker `owns` into their shard of every store (one pass for all sizes, float16),
    leaving shards that are up to date; then finalise the stores if every shard is there.

    A shard that is missing, damaged or made from other texts of the same passages is encoded again (`note`
    says so); one that lists other passages than its block is refused: the corpus changed under the store."""
    hasher, encoded = IdsHasher(), 0
    for k, ids, texts in blocks:
        hasher.update(ids)
        if not owns(k):
            continue
        check_ids(ids, where)
        digest = texts_sha256(texts)
        problems = {s: store.shard_problem(k, digest, ids) for s, store in stores.items()}
        for s, problem in problems.items():
            if problem == "of other passages":
                raise StarbucksError(
                    f"{stores[s].ids_path(k)} lists other passages than block {k} of the corpus; the corpus changed "
                    f"since it was encoded: delete {stores[s].dir} and re-encode"
                )
        todo = [s for s, problem in problems.items() if problem]
        for s in todo:
            if problems[s] != "missing":
                note(f"{stores[s].shard_path(k)} is {problems[s]}; encoding it again")
        if not todo:
            continue
        vectors = model.embed_texts(texts, todo, "passage", batch_size, progress, workers, dtype=np.float16)
        for s in todo:
            stores[s].write_shard(k, ids, vectors[s], digest)
        encoded += len(ids)
    finished = [store.finalize(hasher.count, hasher.hexdigest()) for store in stores.values()]
    return PassagesEncoded(hasher.count, encoded, all(meta is not None for meta in finished))


def encode_queries(
    model: StarbucksModel,
    stores: Mapping[Size, EmbeddingStore],
    split: str,
    queries: Mapping[str, str],
    batch_size: int,
    progress: bool = False,
) -> list[Size]:
    """A split's query vectors in every store whose stored ones are missing or stale (other ids, or another
    model or settings); returns the sizes encoded."""
    ids = list(queries)
    todo = [s for s, store in stores.items() if not store.queries_up_to_date(split, ids, model.identity(s, "query"))]
    if not todo or not ids:
        return []
    check_ids(ids, f"eval split {split!r}")
    bar = tqdm(total=len(ids), unit="q", desc=f"queries {split}", disable=not progress, dynamic_ncols=True)
    vectors = model.embed_texts([queries[q] for q in ids], todo, "query", batch_size, bar, dtype=np.float16)
    bar.close()
    for s in todo:
        stores[s].write_queries(split, ids, vectors[s], model.identity(s, "query"), info={"model": model.source})
    return todo


# ---------------------------------------------------------------- exact top-k


def default_searcher(device) -> ExactSearcher:
    """Exact search where the vectors are: a torch matmul on a CUDA device, a flat FAISS index on the CPU."""
    return ExactSearcher("torch", str(device)) if str(device).startswith("cuda") else ExactSearcher()


class ExactRanking:
    """The exact top-`k` passages of each query over passages that arrive in blocks (a store's shards,
    corpus blocks encoded in memory, one array); rows are corpus positions."""

    def __init__(self, queries: np.ndarray, k: int, searcher: ExactSearcher | None = None):
        self.queries = queries
        self.searcher = searcher or ExactSearcher()
        self.top = TopK(len(queries), k)

    def search(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One block's top-k `(scores, rows)`, rows local to the block (for a caller that keeps them)."""
        return self.searcher.search(vectors, self.queries, self.top.k)

    def add(self, found: tuple[np.ndarray, np.ndarray], first_row: int) -> None:
        """Merge a block's `search` result; `first_row` is the block's first corpus position."""
        self.top.add(*found, offset=first_row)

    def add_vectors(self, vectors: np.ndarray, first_row: int = 0) -> None:
        self.add(self.search(vectors), first_row)

    def add_store(self, store: EmbeddingStore, shards: Iterable[tuple[int, int, np.ndarray]] | None = None) -> None:
        """Every shard of a finished store (`shards`: its `iter_shards()`, e.g. behind a progress bar)."""
        for _, first_row, vectors in store.iter_shards() if shards is None else shards:
            self.add_vectors(vectors, first_row)

    @property
    def scores(self) -> np.ndarray:
        return self.top.scores

    @property
    def rows(self) -> np.ndarray:
        return self.top.rows


def ranked(
    qids: Sequence[str],
    scores: np.ndarray,
    rows: np.ndarray,
    ids: Sequence[str],
    depth: int | None = None,
    ignore_identical_ids: bool = False,
) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """`(qid, [(passage id, score), ...])` of each query, best first, from top-k `scores` and `rows` (rows < 0:
    no result). `ignore_identical_ids` (BEIR's rule): a passage whose id is the query's is left out, and the
    ranking cut to `depth` (search one deeper to keep `depth`)."""
    for i, qid in enumerate(qids):
        hits = [(ids[r], float(s)) for r, s in zip(rows[i], scores[i]) if r >= 0]
        yield qid, [h for h in hits if h[0] != qid][:depth] if ignore_identical_ids else hits


# ---------------------------------------------------------------- run files


def run_record(store: EmbeddingStore, meta: Mapping, qmeta: Mapping, **how) -> dict:
    """What a run of a store's queries was made from (the store, its passages' `PASSAGE_FIELDS`, the queries'
    `QUERY_FIELDS`) and `how` it was searched; a run whose record differs is ranked again."""
    return {
        "embeddings": str(store.dir),
        "size": meta["size"],
        "layers": meta["layers"],
        "dim": meta["dim"],
        "passages": {k: meta.get(k) for k in PASSAGE_FIELDS},
        "queries": {k: qmeta.get(k) for k in QUERY_FIELDS},
        **how,
    }


def saved_run(out: Path, record: Mapping) -> dict | None:
    """The saved record of the run file at `out` if it was made from `record` (its bytes still to be checked
    with `check_run_file`), else None."""
    saved = read_run_record(out) if out.is_file() else None
    return saved if saved is not None and {k: v for k, v in saved.items() if k != "file"} == record else None


def write_ranked_run(
    out: Path, rankings: Iterable[tuple[str, Sequence[tuple[str, float]]]], tag: str, record: Mapping
) -> Path:
    """The run file, then its record (which ends with the file's checksum)."""
    write_run(out, rankings, tag)
    write_run_record(out, dict(record))
    return out


def rank_store(
    store: EmbeddingStore,
    split: str,
    runs: Path,
    depth: int,
    searcher: ExactSearcher,
    tag: str,
    ignore_identical_ids: bool = False,
) -> Path:
    """The size's run file of the split's stored queries (`<runs>/<split>/<size>.trec`, exact search over the
    store's shards, tagged `<tag>-<size>`), unless an up-to-date one exists."""
    meta = store.require_complete()
    qids, queries, qmeta = store.load_queries(split)
    out = run_path(runs, split, meta["size"])
    record = run_record(store, meta, qmeta, index="exact", depth=depth, ignore_identical_ids=ignore_identical_ids)
    saved = saved_run(out, record)
    if saved is not None and check_run_file(out, saved) is None:  # a run file cut or edited since is made again
        return out
    ranking = ExactRanking(queries, min(depth + ignore_identical_ids, meta["count"]), searcher)  # + the self-hit
    ranking.add_store(store)
    rankings = ranked(qids, ranking.scores, ranking.rows, store.ids(), depth, ignore_identical_ids)
    return write_ranked_run(out, rankings, f"{tag}-{meta['size']}", record)
