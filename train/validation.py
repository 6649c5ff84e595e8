"""Validation during fine-tuning (`train.eval_steps`): every size's `train.eval_metric` on a dev split.

The split is `heldout` (training queries held back, `train.holdout_queries`: never trained on; their
candidates come from the training corpus) or, only when `train.eval_on_reported_split` says so, a
split the eval stage reports (`data.eval_splits`): keeping the best checkpoint or stopping early
there would select on the test data.

Candidates per query are either the whole corpus (exact search over every passage, the library's
ranking loop `retrieval.ranking` on the vectors in memory: small collections) or a pooled set, the
DPR-style validation: the query's judged passages, its BM25 top hits (bm25s) and seeded random
passages, `eval_candidates` in all. The pools are fixed when the run starts (a function of the seed
and the data), so every validation of a run, and of its resume, ranks the same candidates.
Embeddings come from `StarbucksModel` wrapping the training encoder (eval mode, one pass per batch
for every size); metrics from `retrieval.metrics`.
"""

from __future__ import annotations

import random
from typing import Sequence

import numpy as np

from retrieval.data import HELDOUT, EvalSplit, load_corpus, load_split
from retrieval.errors import StarbucksError
from retrieval.exact_search import ExactSearcher
from retrieval.metrics import evaluate, parse_measures
from retrieval.model import StarbucksModel
from retrieval.encoder import StarbucksEncoder
from retrieval.ranking import ExactRanking, ranked
from retrieval.sizes import Size
from train.mine import bm25_rankings

AUTO_CORPUS_LIMIT = 20000  # eval_candidates=auto: the full corpus up to this many passages, else pools of
AUTO_POOL = 1000
DEPTH = 1000  # ranked passages per query (R@1000 needs them)


def candidate_setting(value, passages: int) -> int | None:
    """`train.eval_candidates` as a pool size (None: the full corpus)."""
    if value == "auto":
        return None if passages <= AUTO_CORPUS_LIMIT else AUTO_POOL
    return None if value == "corpus" else int(value)


def keep_best_key(keep_best: str, sizes: Sequence[Size], metric: str) -> str:
    """The logged key `train.keep_best` follows: `eval/avg/<metric>` or `eval/<size>/<metric>`."""
    names = [s.name for s in sizes]
    if keep_best != "avg" and keep_best not in names:
        raise StarbucksError(f"train.keep_best = {keep_best!r} is not avg or one of the sizes {', '.join(names)}")
    return f"eval/{keep_best}/{metric}"


def bm25_pools(ids: Sequence[str], texts: Sequence[str], queries: Sequence[str], k: int) -> list[list[str]]:
    """The BM25 top `k` passage ids of each query (`retrieval.bm25`: English stopwords, ties by corpus position)."""
    if k <= 0:
        return [[] for _ in queries]
    ranked = bm25_rankings(ids, texts, dict(enumerate(queries)), k, progress=False)
    return [ranked[i] for i in range(len(queries))]


class Validator:
    """Ranks each sampled dev query's candidates at every size; `__call__(encoder)` -> logged metrics."""

    @staticmethod
    def check_settings(cfg) -> tuple[str, int]:
        """`(metric, relevance level)` of the validation settings, or one line; cheap, so every DDP rank runs
        it (only the main process builds the Validator: a rank-0-only error would leave the others waiting)."""
        t = cfg.train
        splits = cfg.data.eval_splits or {}
        if t.eval_split == HELDOUT:
            if not t.holdout_queries:
                raise StarbucksError(
                    f"train.eval_split = {HELDOUT} needs training queries held back for it: set "
                    f"train.holdout_queries (e.g. 200)"
                )
        elif t.eval_split not in splits:
            raise StarbucksError(
                f"train.eval_split = {t.eval_split!r} is neither {HELDOUT} nor in data.eval_splits "
                f"({', '.join(splits) or 'none configured'}); pick one"
            )
        elif not t.eval_on_reported_split:
            raise StarbucksError(
                f"train.eval_split = {t.eval_split!r} is a split the eval stage reports (data.eval_splits): selecting "
                f"checkpoints on it selects on the test data; validate on held-back training queries "
                f"(train.holdout_queries=200 train.eval_split={HELDOUT}) or set train.eval_on_reported_split=true"
            )
        level = int((cfg.eval.split_rel_level or {}).get(t.eval_split, cfg.eval.rel_level))
        parse_measures([str(t.eval_metric)], level)  # a bad name fails before training
        return str(t.eval_metric), level

    def __init__(self, cfg, sizes: Sequence[Size], tokenizer, seed: int, heldout: EvalSplit | None = None):
        """`heldout`: the held-back training queries (`retrieval.data.hold_out`) when the split is theirs."""
        t, m = cfg.train, cfg.model
        self.metric, self.rel_level = self.check_settings(cfg)
        self.sizes = list(sizes)
        self.tokenizer, self.model_cfg = tokenizer, m
        self.batch_size = int(cfg.encode.batch_size)
        self.precision = str(t.precision)
        if t.eval_split == HELDOUT:  # their positives are passages of the training corpus
            split, corpus = heldout, load_corpus(cfg.data.train_corpus or cfg.data.corpus)
        else:
            split, corpus = load_split(t.eval_split, cfg.data.eval_splits[t.eval_split]), load_corpus(cfg.data.corpus)
        qids = sorted(split.qrels)
        if t.eval_queries is not None and t.eval_queries < len(qids):
            qids = sorted(random.Random(f"{seed}:eval-queries").sample(qids, int(t.eval_queries)))
        self.split = EvalSplit(split.name, {q: split.queries[q] for q in qids}, {q: split.qrels[q] for q in qids})
        pool = candidate_setting(t.eval_candidates, len(corpus))
        self.pools = None if pool is None else self._pools(corpus, pool, seed)
        wanted = corpus if self.pools is None else {d: corpus[d] for d in sorted({d for p in self.pools for d in p})}
        self.passage_ids, self.passages = list(wanted), list(wanted.values())

    def _pools(self, corpus: dict[str, str], size: int, seed: int) -> list[list[str]]:
        """Per query: judged passages in the corpus, then BM25 hits, then random passages, `size` distinct in all."""
        ids = list(corpus)
        qids = list(self.split.queries)
        bm25 = bm25_pools(ids, list(corpus.values()), [self.split.queries[q] for q in qids], size // 2)
        pools = []
        for qid, hits in zip(qids, bm25):
            pool = dict.fromkeys(d for d in self.split.qrels[qid] if d in corpus)
            pool.update(dict.fromkeys(hits[: max(0, size // 2 - len(pool))]))
            rng = random.Random(f"{seed}:eval-pool:{qid}")
            while len(pool) < min(size, len(ids)):
                pool.setdefault(ids[rng.randrange(len(ids))])
            pools.append(list(pool))
        return pools

    def __call__(self, encoder: StarbucksEncoder) -> dict[str, float]:
        """`eval/<size>/<metric>` of every size and their mean `eval/avg/<metric>`."""
        m = self.model_cfg
        model = StarbucksModel(
            encoder,
            self.tokenizer,
            None,
            query_max_length=m.query_max_length,
            passage_max_length=m.passage_max_length,
            query_prefix=m.query_prefix,
            passage_prefix=m.passage_prefix,
            precision=self.precision,
        )
        was_training = encoder.training
        encoder.eval()
        try:
            queries = model.embed_texts(list(self.split.queries.values()), self.sizes, "query", self.batch_size)
            passages = model.embed_texts(self.passages, self.sizes, "passage", self.batch_size)
        finally:
            encoder.train(was_training)
        record = {}
        for size in self.sizes:
            run = self._rank(queries[size], passages[size])
            value = evaluate(run, self.split.qrels, [self.metric], self.rel_level).aggregate[self.metric]
            record[f"eval/{size.name}/{self.metric}"] = value
        record[f"eval/avg/{self.metric}"] = float(np.mean(list(record.values())))
        return record

    def _rank(self, q: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
        """`{qid: {docid: score}}` of each query's top `DEPTH` candidates (exact inner product)."""
        qids = list(self.split.queries)
        if self.pools is None:  # the library's exact top k (torch, fp32 scores, ties by the lower row)
            ranking = ExactRanking(q, min(DEPTH, len(p)), ExactSearcher("torch", "cpu", batch_size=256))
            ranking.add_vectors(p)
            return {qid: dict(hits) for qid, hits in ranked(qids, ranking.scores, ranking.rows, self.passage_ids)}
        row_of = {d: i for i, d in enumerate(self.passage_ids)}
        run = {}
        for i, (qid, pool) in enumerate(zip(qids, self.pools)):
            rows = [row_of[d] for d in pool]
            scores = p[rows] @ q[i]
            run[qid] = {pool[j]: float(scores[j]) for j in np.argsort(-scores, kind="stable")[:DEPTH]}
        return run
