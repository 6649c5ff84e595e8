"""Embeddings -> TREC run files, one per (split, size).

Exact search (`search.index: Flat`, the default) reads the float16 shards one at a time and
merges each shard's top-k into one running top-k, so memory holds one shard and `queries x 2k`
results; nothing is written to `index/`: the shards are the index. That search, the run files and
their records (`retrieval.ranking`: `ExactRanking`, `run_record`, `write_ranked_run`) are the
library's ranking loop, which the suite, mining and validation run too. Any other FAISS
`index_factory` string is built once (trained on a sample), saved to `index/<size>.faiss` with a
`.json` record of the embeddings it holds, and reused; with `search.shards_per_index: N` each
group of N shards gets its own index (`index/<size>.part-00000.faiss`, ...) for corpora whose
index does not fit in memory, searched in turn and merged the same way.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from retrieval.config import DEFAULTS, experiment_paths
from retrieval.errors import StarbucksError
from retrieval.exact_search import ExactSearcher, TopK, faiss_search, set_params, to_gpu
from retrieval.io import atomic_path, atomic_write_json
from retrieval.names import parse_names
from retrieval.settings import resolve_device, resolve_precision
from retrieval.data import check_coverage, load_eval_splits, qrels_coverage
from retrieval.quantize import Quantization, parse_quantization, quantized_search
from retrieval.ranking import ExactRanking, ranked, run_record, saved_run, write_ranked_run
from retrieval.runfile import check_run_file, run_path
from retrieval.store import PASSAGE_FIELDS, EmbeddingStore, select_stores
from search.backends import EXACT, faiss_reason, make_index

INDEX_VERSION = 1
# What identifies the passage vectors of a store: a saved index or run made from other values is stale
# (same weights and ids but, say, another pooling or max_length give other vectors).
_DTYPES = {"fp16": "float16", "fp32": "float32"}


def topk_block(value, device: str) -> int | None:
    """`search.topk_block` (checked by the schema) resolved: auto is 32 on a GPU, where one wide
    `torch.topk` is the slow part of exact search, and a plain top-k (None) on the CPU; null/0: None."""
    if value == "auto":
        return 32 if device.startswith("cuda") else None
    return None if value is None else (int(value) or None)


_SEARCH = DEFAULTS["search"]  # the config's defaults, stated once (retrieval.schema)


@dataclass
class SearchSettings:
    """How to search: the `search` section of a config the schema checked, with device, backend,
    dtype and top-k blocks resolved (`from_config`). A hand-made one holds the schema's defaults,
    their `auto`s resolved on the CPU (`tests/test_config.py` checks it is `from_config` of the
    default config with `search.device=cpu`)."""

    index: str = _SEARCH["index"]
    params: dict = field(default_factory=lambda: dict(_SEARCH["params"]))
    depth: int = _SEARCH["depth"]
    batch_size: int = _SEARCH["batch_size"]
    backend: str = "faiss"  # auto on the CPU; faiss | torch
    device: str = "cpu"
    faiss_gpu: bool = False
    torch_dtype: str = "float32"  # auto on the CPU; float16 | float32
    topk_block: int | None = None  # auto on the CPU
    train_rows: int = _SEARCH["train_rows"]
    shards_per_index: int | None = _SEARCH["shards_per_index"]
    rebuild: bool = _SEARCH["rebuild"]
    seed: int = DEFAULTS["seed"]
    quantization: tuple[Quantization, ...] = tuple(parse_quantization(q) for q in _SEARCH["quantization"])

    @property
    def exact(self) -> bool:
        return self.index.strip() == EXACT

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SearchSettings":
        """Resolve `auto` device/backend: FAISS on CPU, FAISS GPU if built with it, else torch on CUDA.
        The schema checked each key; what is left is what needs this machine or two keys together."""
        s = cfg.search
        device = str(resolve_device(s.device, "search.device"))
        gpus = faiss.get_num_gpus() if device.startswith("cuda") else 0
        exact = str(s.index).strip() == EXACT
        backend = str(s.backend)
        if backend == "auto":
            backend = "torch" if device.startswith("cuda") and not gpus and exact else "faiss"
        if backend == "torch" and not exact:
            raise StarbucksError(
                f"the torch backend searches exactly (search.index=Flat), not {s.index!r}; set search.backend=faiss"
            )
        dtype = resolve_precision(s.torch_dtype, torch.device(device), "search.torch_dtype", cpu_auto_bf16=False)
        return cls(
            index=str(s.index),
            params=dict(OmegaConf.to_container(s.params)) if s.params else {},
            depth=int(s.depth),
            batch_size=int(s.batch_size),
            backend=backend,
            device=device,
            faiss_gpu=backend == "faiss" and gpus > 0,
            torch_dtype=_DTYPES[dtype],
            topk_block=topk_block(s.topk_block, device),
            train_rows=int(s.train_rows),
            shards_per_index=s.shards_per_index,
            rebuild=bool(s.rebuild),
            seed=int(cfg.seed),
            quantization=tuple(parse_quantization(q) for q in s.quantization),  # names the schema checked
        )

    def describe(self) -> str:
        where = "GPU" if self.faiss_gpu else self.device
        return f"{self.index} ({self.backend} on {where})"


# ---------------------------------------------------------------- saved indexes


@dataclass(frozen=True)
class IndexPart:
    """A saved index over the embedding shards `[first_shard, end_shard)`."""

    path: Path
    first_shard: int
    end_shard: int
    first_row: int
    rows: int


def index_parts(meta: dict, index_dir: Path, shards_per_index: int | None) -> list[IndexPart]:
    """One part for all shards, or one per `shards_per_index` consecutive shards."""
    shards, shard_rows, count = meta["shards"], meta["shard_rows"], meta["count"]
    per = shards_per_index or max(shards, 1)
    starts = list(range(0, shards, per))
    parts = []
    for i, first in enumerate(starts):
        end = min(first + per, shards)
        first_row = first * shard_rows
        rows = min(end * shard_rows, count) - first_row
        name = f"{meta['size']}.faiss" if len(starts) == 1 else f"{meta['size']}.part-{i:05d}.faiss"
        parts.append(IndexPart(index_dir / name, first, end, first_row, rows))
    return parts


def _index_record(meta: dict, part: IndexPart, settings: SearchSettings) -> dict:
    return {
        "format_version": INDEX_VERSION,
        "factory": settings.index,
        "size": meta["size"],
        "layers": meta["layers"],
        "dim": meta["dim"],
        **{k: meta.get(k) for k in PASSAGE_FIELDS},
        "shards": [part.first_shard, part.end_shard],
        "train_rows": settings.train_rows,
        "seed": settings.seed,
    }


def _part_vectors(store: EmbeddingStore, part: IndexPart) -> Iterator[tuple[int, np.ndarray]]:
    """`(first_row_in_part, vectors)` of each shard of a part."""
    offset = 0
    for k in range(part.first_shard, part.end_shard):
        vectors = store.load_shard(k)
        yield offset, vectors
        offset += len(vectors)


def training_sample(store: EmbeddingStore, part: IndexPart, rows: int, seed: int) -> np.ndarray:
    """Up to `rows` vectors of a part, drawn uniformly without replacement (float32)."""
    n = min(rows, part.rows)
    chosen = np.sort(np.random.default_rng(seed).choice(part.rows, size=n, replace=False))
    pieces = []
    for offset, vectors in _part_vectors(store, part):
        local = chosen[(chosen >= offset) & (chosen < offset + len(vectors))] - offset
        pieces.append(np.asarray(vectors[local], dtype=np.float32))
    return np.concatenate(pieces)


def load_or_build_index(store: EmbeddingStore, part: IndexPart, settings: SearchSettings) -> faiss.Index:
    """The saved index of a part if it matches the embeddings; else build, train and save it."""
    meta = store.require_complete()
    expected = _index_record(meta, part, settings)
    record_path = part.path.with_suffix(".json")
    saved = json.loads(record_path.read_text()) if record_path.is_file() and part.path.is_file() else None
    if saved == expected:
        return faiss.read_index(str(part.path))
    if saved is not None and not settings.rebuild:
        key = next((k for k in sorted(set(expected) | set(saved)) if saved.get(k) != expected.get(k)))
        raise StarbucksError(
            f"index {part.path} was built with {key} = {saved.get(key)!r}, the embeddings/config now give "
            f"{expected.get(key)!r}; delete it or set search.rebuild=true to rebuild"
        )
    index = make_index(settings.index, meta["dim"])
    try:
        if not index.is_trained:
            index.train(training_sample(store, part, settings.train_rows, settings.seed))
        for _, vectors in _part_vectors(store, part):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    except RuntimeError as err:
        raise StarbucksError(
            f"cannot build index {settings.index!r} over {part.rows} vectors: {faiss_reason(err)}"
        ) from None
    with atomic_path(part.path) as tmp:
        faiss.write_index(index, str(tmp))
    atomic_write_json(record_path, expected)  # written last: marks the index complete
    return index


# ---------------------------------------------------------------- search


def search_store(
    store: EmbeddingStore,
    queries: np.ndarray,
    settings: SearchSettings,
    index_dir: str | Path | None = None,
    progress: bool = False,
    quantization: Quantization = Quantization(),
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` `(scores, rows)` of each query over a finished store; rows index `store.ids()`.

    Exact search goes shard by shard; other indexes part by part (built and saved under
    `index_dir` on first use). Either way results are merged into one top-k. An int8 or binary
    `quantization` searches the store's quantised index instead (`retrieval.quantize`).
    """
    meta = store.require_complete()
    if queries.ndim != 2 or queries.shape[1] != meta["dim"]:
        raise StarbucksError(f"queries have shape {queries.shape}, the passages in {store.dir} have {meta['dim']} dims")
    if quantization.quantized:
        return quantized_search(store, queries, settings.depth, quantization, index_dir)
    if settings.exact:
        searcher = ExactSearcher(
            settings.backend,
            settings.device,
            settings.faiss_gpu,
            settings.torch_dtype,
            settings.batch_size,
            settings.topk_block,
        )
        ranking = ExactRanking(queries, min(settings.depth, meta["count"]), searcher)
        ranking.add_store(
            store,
            tqdm(
                store.iter_shards(),
                total=meta["shards"],
                unit="shard",
                desc=f"search {meta['size']}",
                disable=not progress,
            ),
        )
        return ranking.scores, ranking.rows
    if index_dir is None:
        raise ValueError("a non-flat index needs an index_dir to be saved in")
    top = TopK(len(queries), min(settings.depth, meta["count"]))
    set_params(make_index(settings.index, meta["dim"]), settings.params)  # bad settings fail before any build
    parts = index_parts(meta, Path(index_dir), settings.shards_per_index)
    for part in tqdm(parts, unit="index", desc=f"search {meta['size']}", disable=not progress):
        index = load_or_build_index(store, part, settings)
        if settings.faiss_gpu:
            index = to_gpu(index)
        set_params(index, settings.params, gpu=settings.faiss_gpu)
        top.add(*faiss_search(index, queries, min(top.k, part.rows), settings.batch_size), offset=part.first_row)
        del index  # one part in memory at a time
    return top.scores, top.rows


def _splits_of(store: EmbeddingStore, spec) -> list[str]:
    have = store.query_splits()
    wanted = parse_names(spec)
    if wanted is None and not have:
        raise StarbucksError(f"no query embeddings in {store.dir}; run `python -m encode` first")
    return have if wanted is None else wanted


def _split_coverage(cfg: DictConfig, split: str, store: EmbeddingStore, passage_ids: set[str]) -> dict | None:
    """The split's qrels against the store's passages: an error when none is there, a warning when some are not."""
    if split not in (cfg.data.eval_splits or {}):
        return None  # queries of a split no longer configured: nothing to check against
    qrels = load_eval_splits(cfg.data.eval_splits, [split])[split].qrels
    coverage = qrels_coverage(qrels, passage_ids)
    warning = check_coverage(split, coverage, f"of the embeddings in {store.dir}")
    if warning:
        print(f"search: warning: {warning}", file=sys.stderr)
    return coverage


def _index_of(settings: SearchSettings, quantization: Quantization) -> tuple[str, dict]:
    """What a run's record says it searched: the configured index for fp16, the FAISS index of the codes
    (`SQ8` over int8, `BFlat` over sign bits) otherwise."""
    if quantization.quantized:
        return {"int8": "SQ8", "binary": "BFlat"}[quantization.kind], {}
    return settings.index, settings.params


def search_collection(cfg: DictConfig, progress: bool = True) -> list[Path]:
    """Search every selected size, precision (`search.quantization`) and split; returns the run files
    written (up-to-date ones are kept)."""
    settings = SearchSettings.from_config(cfg)
    paths = experiment_paths(cfg)
    tag = "_".join(str(cfg.name).split()) or "run"
    written = []
    coverages: dict[tuple[str, str], dict | None] = {}  # (ids_sha256, split) -> coverage: stores share a corpus
    id_sets: dict[str, set[str]] = {}  # the last corpus's ids, by ids_sha256 (read only when a coverage is new)
    for store in select_stores(paths.embeddings, cfg.search.sizes):
        meta = store.require_complete()
        pending = []
        for split in _splits_of(store, cfg.search.splits):
            qids, qvecs, qmeta = store.load_queries(split)
            if (meta["ids_sha256"], split) not in coverages:
                if meta["ids_sha256"] not in id_sets:
                    id_sets = {meta["ids_sha256"]: set(store.ids())}
                coverages[meta["ids_sha256"], split] = _split_coverage(cfg, split, store, id_sets[meta["ids_sha256"]])
            for quantization in settings.quantization:
                index, params = _index_of(settings, quantization)
                out = run_path(paths.runs, split, quantization.run_name(meta["size"]))
                record = run_record(
                    store,
                    meta,
                    qmeta,
                    index=index,
                    params=params,
                    depth=settings.depth,
                    qrels_coverage=coverages[meta["ids_sha256"], split],
                    **({"quantization": quantization.name} if quantization.quantized else {}),
                )
                saved = saved_run(out, record)
                if saved is not None:
                    problem = check_run_file(out, saved)
                    if problem is None:
                        print(f"search: {out} is up to date", file=sys.stderr)
                        continue
                    print(f"search: {out} is not the file written ({problem}); searching it again", file=sys.stderr)
                pending.append((quantization, qids, qvecs, out, record))
        passage_ids = store.ids() if pending else None
        for quantization in settings.quantization:
            todo = [p for p in pending if p[0] == quantization]
            if not todo:
                continue
            started = time.perf_counter()
            queries = np.concatenate([q for _, _, q, _, _ in todo])
            scores, rows = search_store(store, queries, settings, paths.index, progress, quantization)
            seconds = time.perf_counter() - started
            start = 0
            name = quantization.run_name(meta["size"])
            for _, qids, _, out, record in todo:
                end = start + len(qids)
                rankings = ranked(qids, scores[start:end], rows[start:end], passage_ids)
                written.append(write_ranked_run(out, rankings, f"{tag}-{name}", record))
                start = end
            how = f"{quantization.name} codes" if quantization.quantized else settings.describe()
            print(
                f"search: {name} ({meta['layers']}x{meta['dim']}): {len(queries)} queries x {meta['count']} "
                f"passages, depth {min(settings.depth, meta['count'])}, {how}: {seconds:.2f}s",
                file=sys.stderr,
            )
    return written
