"""Inner-product search of one block of vectors: FAISS (CPU or GPU) or an exact torch matmul + top-k."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from retrieval.errors import StarbucksError
from search.topk import block_topk

EXACT = "Flat"


def faiss_reason(err: Exception) -> str:
    """The useful part of a FAISS C++ error ("... failed: <reason>")."""
    line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for marker in ("failed: ", "Error: "):
        if marker in line:
            return line.split(marker, 1)[1]
    return line.rsplit(": ", 1)[-1]


def make_index(spec: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a FAISS `index_factory` string."""
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise StarbucksError(
            f"search.index = {spec!r} is not a usable FAISS index_factory string for {dim}-dim vectors: "
            f"{faiss_reason(err)}"
        ) from None


def set_params(index: faiss.Index, params: dict, gpu: bool = False) -> None:
    """Apply search parameters such as `{nprobe: 32}` or `{efSearch: 128}`."""
    space = faiss.GpuParameterSpace() if gpu else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, str(name), float(value))
        except RuntimeError:
            raise StarbucksError(f"search.params.{name} = {value} does not apply to this index; remove it") from None


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs (FAISS GPU build), or unchanged when a part of it has no GPU version."""
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):
        return index


def faiss_search(index: faiss.Index, queries: np.ndarray, k: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` `(scores, rows)` of every query, in batches."""
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
    of blocks of `topk_block` columns (`search.topk.block_topk`) or in one `torch.topk`."""
    import torch

    values, rows = [], []
    with torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            v, r = block_topk(queries[start:start + batch_size] @ vectors.T, k, topk_block)
            values.append(v)
            rows.append(r)
    return torch.cat(values), torch.cat(rows)
