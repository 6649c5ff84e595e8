"""A running top-k per query, merged part by part so memory stays at `queries x 2k`."""

from __future__ import annotations

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


def torch_topk(scores, k: int, chunk: int | None = None):
    """Exact `torch.topk(scores, k, dim=1)` in two stages: the top `k` of every `chunk` columns, then
    the top `k` of those candidates. Every global top-k entry is in its chunk's top k, so the result
    is exact (ties at the k-th score may pick other rows with the same score). Narrow rows split over
    many chunks keep a GPU busy where one wide top-k per query does not. `chunk=None` or a chunk
    that does not leave at least two chunks of more than `2k` columns: plain `torch.topk`."""
    import torch

    n = scores.shape[1]
    k = min(k, n)
    if chunk is None or chunk <= 2 * k or n < 2 * chunk:
        return torch.topk(scores, k, dim=1)
    main = n - n % chunk
    parts = scores[:, :main].reshape(scores.shape[0], main // chunk, chunk)
    values, rows = torch.topk(parts, k, dim=2)
    rows = rows + torch.arange(0, main, chunk, device=scores.device).view(1, -1, 1)
    values, rows = values.flatten(1), rows.flatten(1)
    if main < n:
        tail = torch.topk(scores[:, main:], min(k, n - main), dim=1)
        values = torch.cat([values, tail.values], dim=1)
        rows = torch.cat([rows, tail.indices + main], dim=1)
    best = torch.topk(values, k, dim=1)
    return best.values, torch.gather(rows, 1, best.indices)
