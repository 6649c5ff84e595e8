"""Exact inner-product search, shared by the search stage, hard-negative mining and the suite: a
running top-k per query merged part by part (`TopK`), an exact top-k of a score matrix through
block maxima (`block_topk`), a torch matmul search (`torch_search`) and a flat FAISS search
(`ExactSearcher`, `faiss_search`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class TopK:
    """The best `k` (score, row) pairs per query seen so far; rows are global corpus positions.

    Rows `< 0` (FAISS's "no result") never enter. Ties keep the pair added first: merging parts in
    corpus order ranks a tie between two parts by the lower row; within a part, tied pairs keep the
    order the part gives them (by row from `torch_search`; FAISS promises no order).
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


def set_params(index, params: dict, gpu: bool = False) -> None:
    """Apply FAISS search parameters such as `{nprobe: 32}` or `{efSearch: 128}`."""
    import faiss

    from retrieval.errors import StarbucksError

    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, str(name), float(value))
        except RuntimeError:
            raise StarbucksError(f"search.params.{name} = {value} does not apply to this index; remove it") from None


def faiss_search(index, queries: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` `(scores, rows)` of every query from a FAISS index, in batches."""
    scores = np.empty((len(queries), k), dtype=np.float32)
    rows = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch_size):
        q = np.ascontiguousarray(queries[start : start + batch_size], dtype=np.float32)
        scores[start : start + len(q)], rows[start : start + len(q)] = index.search(q, k)
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
        exact = torch.from_numpy(np.array(vectors)).to(self.device)  # copies the memory-mapped shard
        block = exact.to(dtype)
        if block.dtype.itemsize >= exact.dtype.itemsize:
            exact = block  # lossless: re-score from the one copy
        q = torch.from_numpy(np.ascontiguousarray(queries)).to(self.device)
        values, rows = torch_search(block, q.to(dtype), k, self.batch_size, self.topk_block, exact, q.float())
        return values.cpu().numpy(), rows.cpu().numpy()


# Unit roundoff of the pre-selection's matmul (fp32: exact up to the order of its sums, unless TF32 is on).
_ROUNDOFF = {torch_dtype: u for torch_dtype, u in (("float16", 2.0**-11), ("bfloat16", 2.0**-8), ("float32", 0.0))}
# gathered candidate vector entries per re-scoring chunk: 64 MiB in fp32 on the CPU; 256 MiB of 16-bit rows
# on a GPU (1,024 queries x 2,000 candidates x 768 dims in 12 chunks, not 100: each costs kernel launches)
_RESCORE_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def _roundoff(vectors) -> float:
    import torch

    if vectors.dtype == torch.float32 and vectors.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11  # TF32 keeps 10 mantissa bits
    return _ROUNDOFF[str(vectors.dtype).removeprefix("torch.")]


class _Rescorer:
    """fp32 scores of candidate rows: `queries[i] . vectors[candidates[i, j]]`, in chunks of
    `_RESCORE_ELEMENTS` gathered entries; on CUDA, when both sides are exact in the vectors' 16-bit
    dtype, a batched matmul of the 16-bit rows with fp32 accumulation and output (no fp32 copies), else
    an fp32 elementwise product and sum (never a TF32 matmul)."""

    def __init__(self, vectors, queries):
        import torch

        self.vectors, self.queries = vectors, queries
        half = vectors.dtype in (torch.float16, torch.bfloat16)
        self.fused = vectors.is_cuda and half and torch.equal(queries.to(vectors.dtype).float(), queries)

    def __call__(self, rows_of_queries, candidates):
        import torch

        n_queries, m = candidates.shape
        d = self.vectors.shape[1]
        budget = _RESCORE_ELEMENTS.get(candidates.device.type, _RESCORE_ELEMENTS["cpu"])
        cols = max(1, min(m, budget // d))
        rows = max(1, budget // (cols * d))
        out = torch.empty(n_queries, m, dtype=torch.float32, device=candidates.device)
        for r in range(0, n_queries, rows):
            q = self.queries[rows_of_queries[r : r + rows]]
            for c in range(0, m, cols):
                gathered = self.vectors[candidates[r : r + rows, c : c + cols]]  # (rows, cols, d)
                if self.fused:
                    dots = torch.bmm(gathered, q.to(gathered.dtype).unsqueeze(2), out_dtype=torch.float32)[..., 0]
                else:
                    dots = (gathered.float() * q[:, None, :]).sum(-1)
                out[r : r + rows, c : c + cols] = dots
        return out


def rank_exactly(scores, rows, k: int):
    """The top `k` of `(scores, rows)` by score, ties by the lower row."""
    import torch

    by_row = torch.argsort(rows, dim=1)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), rows.gather(1, order)


def torch_search(
    vectors, queries, k: int, batch_size: int, topk_block: int | None = None, exact_vectors=None, exact_queries=None
):
    """Exact top-`k` `(scores, rows)` of device tensors, as an fp32 exact search gives them: fp32 scores,
    ties by the lower row. A matmul per query batch in the tensors' dtype (fp16 on a GPU: the fast
    part) pre-selects the best `m` rows through the maxima of blocks of `topk_block` columns
    (`block_topk`) or one `torch.topk`. In fp16/bf16 (or TF32) the `m = max(2k, k + 256)` candidates
    are re-scored in fp32 from `exact_vectors`/`exact_queries` (default: `vectors`/`queries`, upcast:
    exact for the stored fp16 vectors); an fp32 matmul's scores are kept (`m = k + 16`, for the ties).

    Exact: each matmul score is within `e = (5u + d 2^-24) |q| max|x|` of the exact one (`u` the
    dtype's unit roundoff: 2u for rounding fp32 inputs to it, u for rounding the output, 2u for
    reduced-precision split-K sums; `d 2^-24` for the fp32 accumulation), so every row of the exact
    top k, ties included, has a matmul score >= the k-th's - 2e. A query whose m-th pre-selected
    score is not below that is run again with `m` doubled, up to every row."""
    import torch

    exact_vectors = vectors if exact_vectors is None else exact_vectors
    exact_queries = (queries if exact_queries is None else exact_queries).float()
    n, d = vectors.shape
    k = min(k, n)
    u = _roundoff(vectors)
    with torch.inference_mode():
        rescore = _Rescorer(exact_vectors, exact_queries) if u else None
        error = (5 * u + d * 2.0**-24) * torch.linalg.vector_norm(exact_vectors.float(), dim=1).max() if u else 0.0
        margin = max(k, 256) if u else 16
        values, rows = [], []
        for start in range(0, len(queries), batch_size):
            end = min(start + batch_size, len(queries))
            bound = 2 * error * torch.linalg.vector_norm(exact_queries[start:end], dim=1)
            batch = torch.arange(start, end, device=vectors.device)
            v, r = _exact_topk(queries[start:end] @ vectors.T, batch, bound, k, min(n, k + margin), rescore, topk_block)
            values.append(v)
            rows.append(r)
    return torch.cat(values), torch.cat(rows)


def _exact_topk(scores, query_rows, bound, k: int, m: int, rescore, topk_block: int | None):
    """One query batch of `torch_search`: its matmul `scores`, `bound` = twice the error bound per query."""
    import torch

    n = scores.shape[1]
    out_scores = torch.empty(len(scores), k, dtype=torch.float32, device=scores.device)
    out_rows = torch.empty(len(scores), k, dtype=torch.long, device=scores.device)
    todo = torch.arange(len(scores), device=scores.device)
    while len(todo):
        part = scores if len(todo) == len(scores) else scores[todo]  # (a copy only for queries run again)
        if m >= n:
            values, candidates = part, torch.arange(n, device=scores.device).expand(len(todo), -1)
            complete = torch.ones(len(todo), dtype=torch.bool, device=scores.device)
        else:
            values, candidates = block_topk(part, m, topk_block)
            complete = values[:, m - 1].float() < values[:, k - 1].float() - bound[todo]
        exact = rescore(query_rows[todo], candidates) if rescore else values.float()
        top_scores, top_rows = rank_exactly(exact, candidates, k)
        out_scores.index_copy_(0, todo, top_scores)
        out_rows.index_copy_(0, todo, top_rows)
        todo = todo[~complete]
        m = min(n, 2 * m)
    return out_scores, out_rows
