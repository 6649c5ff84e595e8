"""Quantised passage vectors: a store's precision is data like its size.

- `fp16`: the embedding store as encoded (2 bytes per dim), searched exactly (`retrieval.ranking`).
- `int8`: scalar quantisation, one byte per dim. Each dim's range `[lo, hi]` is calibrated on the
  corpus (its minimum and maximum over every passage vector, as sentence-transformers'
  `quantize_embeddings` does with the corpus as its calibration set); a value `x` gets the code
  `j = floor(255 (x - lo) / (hi - lo))` in 0..255 (the signed int8 `j - 128` of
  sentence-transformers, shifted) and stands for the middle of its bin, `lo + (j + 0.5) (hi - lo) / 255`.
  A query is not quantised: the score is its exact inner product with the decoded passage
  (asymmetric, FAISS `IndexScalarQuantizer` QT_8bit with these ranges).
- `binary`: sign bits, one bit per dim (`np.packbits(x > 0)`, sentence-transformers' `ubinary`);
  queries are binarised too and the score is `d - 2 * hamming`, the inner product of the two +-1
  vectors (FAISS `IndexBinaryFlat`).

`<precision>-rescore<K>` re-scores the best `max(K, depth)` candidates of the quantised search with
the fp16 vectors of the store (fp32 inner products with the fp32 query), so every passage of a run
has an exact score; it costs the store's 2 bytes per dim beside the codes.

A quantised index is built once per store and saved beside the search stage's other indexes
(`index/<size>.<precision>.faiss`) with a `.json` record of the embeddings it holds and, for int8,
its calibrated ranges; a changed store makes it stale and it is rebuilt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import StarbucksError
from retrieval.io import atomic_path, atomic_write_json
from retrieval.store import PASSAGE_FIELDS, EmbeddingStore

QUANTIZED_VERSION = 1
_SPEC = re.compile(r"^(fp16|int8|binary)(?:-rescore([1-9][0-9]*))?$")
FORMS = "fp16, int8, binary, int8-rescore<K>, binary-rescore<K> (K a whole number >= 1)"


@dataclass(frozen=True)
class Quantization:
    """How a size's passages are searched: `kind` (fp16 | int8 | binary) and `rescore`, the number of
    candidates re-scored with the fp16 vectors (0: none)."""

    kind: str = "fp16"
    rescore: int = 0

    @property
    def name(self) -> str:
        return self.kind + (f"-rescore{self.rescore}" if self.rescore else "")

    @property
    def quantized(self) -> bool:
        return self.kind != "fp16"

    def run_name(self, size_name: str) -> str:
        """The name of a size's run at this precision: the size's own for fp16, else `<size>.<precision>`."""
        return f"{size_name}.{self.name}" if self.quantized else size_name

    def code_bytes(self, dim: int) -> float:
        """Bytes per passage of the searched codes: 2 d (fp16), d (int8), ceil(d / 8) (binary)."""
        return {"fp16": 2 * dim, "int8": dim, "binary": -(-dim // 8)}[self.kind]

    def bytes_per_passage(self, dim: int) -> float:
        """The codes plus, when re-scoring, the fp16 vectors (2 d)."""
        return self.code_bytes(dim) + (2 * dim if self.rescore else 0)


def parse_quantization(spec, key: str = "search.quantization") -> Quantization:
    """`fp16`, `int8`, `binary`, `int8-rescore<K>` or `binary-rescore<K>`; anything else is one line."""
    match = _SPEC.match(str(spec).strip())
    if not match or (match.group(1) == "fp16" and match.group(2)):
        raise StarbucksError(f"{key}: {spec!r} is not a precision; use one of {FORMS}")
    return Quantization(match.group(1), int(match.group(2) or 0))


def split_run_name(name: str) -> tuple[str, Quantization]:
    """`(size name, quantization)` of a run name (`grande.int8-rescore100` -> grande, int8-rescore100)."""
    stem, dot, last = name.rpartition(".")
    if dot and _SPEC.match(last) and not last.startswith("fp16"):
        return stem, parse_quantization(last)
    return name, Quantization()


# ---------------------------------------------------------------- the codes


def int8_ranges(store: EmbeddingStore) -> tuple[np.ndarray, np.ndarray]:
    """Each dim's minimum and maximum over every passage vector of a finished store (float32)."""
    lo = hi = None
    for _, _, vectors in store.iter_shards():
        if not len(vectors):
            continue
        v = np.asarray(vectors, dtype=np.float32)
        lo = v.min(0) if lo is None else np.minimum(lo, v.min(0))
        hi = v.max(0) if hi is None else np.maximum(hi, v.max(0))
    if lo is None:
        raise StarbucksError(f"{store.dir} holds no passages to calibrate int8 ranges on")
    return lo, hi


def _widths(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """`hi - lo`, with a constant dim given width 1 (its one value gets code 0)."""
    return np.where(hi > lo, hi - lo, 1.0).astype(np.float32)


def int8_codes(vectors: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The uint8 codes of `vectors` (values outside `[lo, hi]` clip to the end bins)."""
    scaled = np.floor((np.asarray(vectors, dtype=np.float32) - lo) / _widths(lo, hi) * 255)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """Sign bits, 8 dims a byte (the first dim in the highest bit); a dim count not divisible by 8 is
    padded with zero bits, which every vector shares."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


# ---------------------------------------------------------------- indexes


def _new_index(kind: str, dim: int, lo=None, hi=None):
    import faiss

    if kind == "binary":
        return faiss.IndexBinaryFlat(8 * -(-dim // 8))
    index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(np.concatenate([lo, _widths(lo, hi)]).astype(np.float32), index.sq.trained)
    index.is_trained = True
    return index


def index_path(index_dir: str | Path, size_name: str, kind: str) -> Path:
    return Path(index_dir) / f"{size_name}.{kind}.faiss"


def _record(meta: dict, kind: str) -> dict:
    return {
        "format_version": QUANTIZED_VERSION,
        "precision": kind,
        "size": meta["size"],
        "layers": meta["layers"],
        "dim": meta["dim"],
        **{k: meta.get(k) for k in PASSAGE_FIELDS},
    }


def build_index(store: EmbeddingStore, kind: str):
    """`(index, ranges)`: the int8 or binary FAISS index of a finished store's passages, in corpus order,
    and the int8 ranges (`{"lo": [...], "hi": [...]}`, None for binary)."""
    meta = store.require_complete()
    ranges = None
    if kind == "int8":
        lo, hi = int8_ranges(store)
        ranges = {"lo": lo.tolist(), "hi": hi.tolist()}
        index = _new_index(kind, meta["dim"], lo, hi)
    elif kind == "binary":
        index = _new_index(kind, meta["dim"])
    else:
        raise ValueError(f"no quantised index for precision {kind!r}")
    for _, _, vectors in store.iter_shards():
        if kind == "binary":
            index.add(binary_codes(vectors))
        else:  # the codes as defined here (FAISS's own encoder may round a value on a bin edge the other way)
            index.add_sa_codes(int8_codes(vectors, lo, hi))
    return index, ranges


def load_or_build_index(store: EmbeddingStore, kind: str, index_dir: str | Path | None):
    """The saved quantised index of a store when its record matches the store, else built (and saved under
    `index_dir` when given). Returns `(index, record)`; the record holds the int8 ranges."""
    import faiss

    meta = store.require_complete()
    expected = _record(meta, kind)
    path = index_path(index_dir, meta["size"], kind) if index_dir is not None else None
    if path is not None and path.is_file() and path.with_suffix(".json").is_file():
        saved = json.loads(path.with_suffix(".json").read_text())
        if {k: v for k, v in saved.items() if k != "ranges"} == expected:
            read = faiss.read_index_binary if kind == "binary" else faiss.read_index
            return read(str(path)), saved
    index, ranges = build_index(store, kind)
    record = {**expected, **({"ranges": ranges} if ranges else {})}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)  # an old record must not vouch for the new index
        write = faiss.write_index_binary if kind == "binary" else faiss.write_index
        with atomic_path(path) as tmp:
            write(index, str(tmp))
        atomic_write_json(path.with_suffix(".json"), record)  # written last: marks the index complete
    return index, record


# ---------------------------------------------------------------- search


def _search_codes(index, kind: str, queries: np.ndarray, k: int, batch_size: int = 1024):
    """Top-`k` `(scores, rows)` of a quantised index: int8 scores are the fp32 query's inner products with
    the decoded passages; binary scores `d - 2 * hamming` with the binarised query."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores = np.empty((len(q), k), dtype=np.float32)
    rows = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        part = q[start : start + batch_size]
        if kind == "binary":
            distances, found = index.search(binary_codes(part), k)
            scores[start : start + len(part)] = queries.shape[1] - 2 * distances.astype(np.float32)
        else:
            scores[start : start + len(part)], found = index.search(part, k)
        rows[start : start + len(part)] = found
    return scores, rows


def _top(index, kind: str, queries: np.ndarray, k: int, n: int):
    """Top-`k` `(scores, rows)`, ties by the lower row (binary scores tie often): more candidates are asked
    for until the last one scores below the k-th, so a tie at the k-th score is seen whole."""
    if k == 0:
        return np.empty((len(queries), 0), dtype=np.float32), np.empty((len(queries), 0), dtype=np.int64)
    m = min(n, k + 1)  # one more than asked: whether the k-th score ties beyond
    while True:
        scores, rows = _search_codes(index, kind, queries, m)
        if m >= n or bool(np.all(scores[:, m - 1] < scores[:, k - 1])):
            break
        m = min(n, 2 * m)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


class QuantizedSearcher:
    """A store searched at a quantised precision, its index and shards opened once (a server keeps them
    open: per-query costs are the search's own). `search(queries, depth)`: top-`depth` `(scores, rows)`
    per query (rows index `store.ids()`); with re-scoring, the best `max(K, depth)` candidates re-scored
    with the fp16 vectors, ties by the lower row."""

    def __init__(self, store: EmbeddingStore, quantization: Quantization, index_dir=None, index=None):
        if not quantization.quantized:
            raise ValueError("fp16 is searched exactly over the store (retrieval.ranking), not here")
        self.store, self.quantization = store, quantization
        self.meta = store.require_complete()
        self.index = index if index is not None else load_or_build_index(store, quantization.kind, index_dir)[0]
        self.shards = [store.load_shard(k) for k in range(self.meta["shards"])] if quantization.rescore else []

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The fp32 vectors of the passages at global `rows` (any shape; -1 gives zeros)."""
        return _gather(self.shards, self.meta["shard_rows"], self.meta["dim"], rows)

    def rescore(self, queries: np.ndarray, rows: np.ndarray, depth: int):
        """The candidates `rows` of each query ranked by the fp32 inner product with their fp16 vectors: the
        best `depth`, ties by the lower row."""
        exact = np.einsum("qd,qkd->qk", np.asarray(queries, dtype=np.float32), self.gather(rows))
        exact = np.where(rows < 0, -np.inf, exact).astype(np.float32)
        order = np.lexsort((rows, -exact), axis=1)[:, :depth]  # by score, then by row
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(rows, order, axis=1)

    def search(self, queries: np.ndarray, depth: int):
        dim, count = self.meta["dim"], self.meta["count"]
        if queries.ndim != 2 or queries.shape[1] != dim:
            raise StarbucksError(
                f"queries have shape {queries.shape}, the passages in {self.store.dir} have {dim} dims"
            )
        depth = min(depth, count)
        candidates = min(max(self.quantization.rescore, depth), count)
        scores, rows = _top(self.index, self.quantization.kind, queries, candidates, count)
        if self.quantization.rescore:
            return self.rescore(queries, rows, depth)
        return scores[:, :depth], rows[:, :depth]


def _gather(shards, shard_rows: int, dim: int, rows: np.ndarray) -> np.ndarray:
    flat = rows.reshape(-1)
    out = np.zeros((len(flat), dim), dtype=np.float32)
    shard_of = np.where(flat >= 0, flat // shard_rows, -1)
    for k in np.unique(shard_of[shard_of >= 0]):
        where = np.nonzero(shard_of == k)[0]
        out[where] = shards[int(k)][flat[where] - k * shard_rows]
    return out.reshape(*rows.shape, dim)


def gather_rows(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    """The fp32 vectors of a finished store's passages at global `rows` (any shape; -1 gives zeros), from
    its memory-mapped fp16 shards."""
    meta = store.require_complete()
    return _gather([store.load_shard(k) for k in range(meta["shards"])], meta["shard_rows"], meta["dim"], rows)


def quantized_search(
    store: EmbeddingStore, queries: np.ndarray, depth: int, quantization: Quantization, index_dir=None
):
    """`QuantizedSearcher(store, quantization, index_dir).search(queries, depth)`: the index loaded, or
    built (and saved under `index_dir` when given)."""
    return QuantizedSearcher(store, quantization, index_dir).search(queries, depth)


__all__ = [
    "FORMS",
    "Quantization",
    "QuantizedSearcher",
    "binary_codes",
    "gather_rows",
    "int8_codes",
    "int8_ranges",
    "load_or_build_index",
    "parse_quantization",
    "quantized_search",
    "split_run_name",
]
