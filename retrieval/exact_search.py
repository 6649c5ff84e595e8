"""Exact inner-product search, shared by the search stage, hard-negative mining and the suite: a
running top-k per query merged part by part (`TopK`), an exact top-k of a score matrix through
block maxima (`block_topk`), a torch matmul search (`torch_search`) and a flat FAISS search
(`ExactSearcher`, `faiss_search`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TopK:
    """The best `k` (score, row) pairs per query seen so far; rows are global corpus positions.

    Rows `< 0` (FAISS's "no result") never enter. Ties keep the pair added first, so merging
    parts in corpus order breaks ties by the lower row.
    """

    def __init__(self, queries: int, k: int):
        self.k = int(k)
        self.scores = np.full((queries, self.k), -np.inf, dtype=np.float32)
        self.rows = np.full((queries, self.k), -1, dtype=np.int64)

    def add(self, scores: np.ndarray, rows: np.ndarray, offset: int = 0) -> None:
        """Merge `(queries, k')` scores and part-local rows (shifted by `offset`)."""
        rows = np.where(rows < 0, -1, rows.astype(np.int64) + offset)
        scores = np.where(rows < 0, -np.inf, scores.astype(np.float32))
        all_scores = np.concatenate([self.scores, scores], axis=1)
        all_rows = np.concatenate([self.rows, rows], axis=1)
        best = np.argsort(-all_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(all_scores, best, axis=1)
        self.rows = np.take_along_axis(all_rows, best, axis=1)


def block_topk(scores, k: int, block: int | None = None):
    """Exact `torch.topk(scores, k, dim=1)` through block maxima: the columns fall into
    `n // block` blocks of `block` columns each (block `j` holds columns `j, j + n//block, ...`: a
    strided split, so the maxima are one coalesced pass over the scores), the `k` blocks with
    the highest maxima are kept, then the top `k` of their entries (`k * block` candidates per
    query instead of every column).

    Exact: a block holding an entry >= the k-th score `s` has a maximum >= `s`. If `k` or more
    blocks do, the kept blocks' maxima are `k` entries >= `s`, and every entry above `s` is kept
    (fewer than `k` blocks have a maximum above `s`, and they rank first); if fewer do, all of
    them are kept, and with them every entry >= `s`. Either way the candidates' top `k` is the
    top `k` (ties at the k-th score may pick other rows with the same score). One `torch.topk` over all columns is a multi-pass radix select over
    the whole score matrix; this reads it once and selects among a small fraction of it.
    `block=None`, or too few blocks for it to pay (fewer than `4k`): plain `torch.topk`."""
    import torch

    n = scores.shape[1]
    k = min(k, n)
    if block is None or block < 2 or n // block < 4 * k:
        return torch.topk(scores, k, dim=1)
    blocks = n // block
    main = blocks * block
    grid = scores[:, :main].unflatten(1, (block, blocks))  # grid[q, i, j] = column i * blocks + j
    chosen = torch.topk(grid.amax(dim=1), k, dim=1).indices  # (q, k) block numbers
    candidates = grid.gather(2, chosen.unsqueeze(1).expand(-1, block, -1)).flatten(1)  # (q, block * k)
    cols = (torch.arange(block, device=scores.device).view(1, -1, 1) * blocks + chosen.unsqueeze(1)).flatten(1)
    if main < n:  # the last columns, in no block: all of them are candidates
        candidates = torch.cat([candidates, scores[:, main:]], dim=1)
        tail = torch.arange(main, n, device=scores.device).expand(scores.shape[0], -1)
        cols = torch.cat([cols, tail], dim=1)
    best = torch.topk(candidates, k, dim=1)
    return best.values, torch.gather(cols, 1, best.indices)


def to_gpu(index):
    """The FAISS index on all GPUs (FAISS GPU build), or unchanged when a part of it has no GPU version."""
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def faiss_search(index, queries: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` `(scores, rows)` of every query from a FAISS index, in batches."""
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        q = np.ascontiguousarray(queries[start:start + batch_size], dtype=np.float32)
        scores[start:start + len(q)], rows[start:start + len(q)] = index.search(q, k)
    return scores, rows


@dataclass
class ExactSearcher:
    """Exact inner-product search of one block of vectors (kept in memory only while searched).

    `backend="faiss"`: an `IndexFlatIP` (on the GPUs when `gpu`); `backend="torch"`: a matmul in
    `dtype` on `device` and `torch.topk`, for CUDA machines without faiss-gpu.
    """

    backend: str = "faiss"
    device: str = "cpu"
    gpu: bool = False
    dtype: str = "float32"
    batch_size: int = 1024
    topk_block: int | None = None  # torch backend: exact top-k through the maxima of blocks of this many columns

    def search(self, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` `(scores, rows)` of each query among `vectors` (rows local to the block)."""
        k = min(k, len(vectors))
        if self.backend == "torch":
            return self._torch_search(vectors, queries, k)
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        if self.gpu:
            index = to_gpu(index)
        return faiss_search(index, queries, k, self.batch_size)

    def _torch_search(self, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        dtype = getattr(torch, self.dtype)
        block = torch.from_numpy(np.array(vectors)).to(self.device, dtype)  # copies the memory-mapped shard
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device, dtype)
        values, rows = torch_search(block, q, k, self.batch_size, self.topk_block)
        return values.float().cpu().numpy(), rows.cpu().numpy()


def torch_search(vectors, queries, k: int, batch_size: int, topk_block: int | None = None):
    """Exact top-`k` `(scores, rows)` of device tensors: a matmul per query batch, then the top k in the
    matmul's dtype (a float copy of all scores would cost more than the matmul), through the maxima
    of blocks of `topk_block` columns (`block_topk`) or in one `torch.topk`."""
    import torch

    values, rows = [], []
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            v, r = block_topk(queries[start:start + batch_size] @ vectors.T, k, topk_block)
            values.append(v)
            rows.append(r)
    return torch.cat(values), torch.cat(rows)
