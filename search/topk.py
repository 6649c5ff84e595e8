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
