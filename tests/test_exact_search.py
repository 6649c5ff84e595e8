"""The torch backend's exact search: fp16 (or bf16) pre-selection, fp32 re-scoring, ties by the lower row,
checked against a numpy fp32 brute force on vectors whose fp16 scores tie or round across each other."""

import numpy as np
import pytest
import torch

from retrieval.exact_search import ExactSearcher, torch_search
from search import SearchSettings, search_store
from test_store import write_store


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int):
    """fp32 scores, ranked by score then lower row (numpy's lexsort: the last key is the primary one)."""
    scores = queries.astype(np.float32) @ vectors.astype(np.float32).T
    rows = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def integer_vectors(n, d, high, queries=30, seed=0, dtype=np.float16):
    """Whole-number entries: every fp32 dot product is exact (so any summation order gives the same
    score), and above 2048 the fp16 scores are rounded to steps of 2-16: many ties and swaps there."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, high, (n, d)).astype(dtype)
    x[7] = x[3]  # exact duplicates: fp32 ties broken by the lower row
    x[n - 1] = x[3]
    q = rng.integers(0, high, (queries, d)).astype(dtype)
    return x, q


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("k,block", [(40, None), (10, 4), (2500, None)])
def test_torch_search_equals_fp32_brute_force(dtype, k, block):
    x, q = integer_vectors(3000, 16, 32)
    expected_scores, expected_rows = brute_force(x, q, k)
    scores32 = q.astype(np.float32) @ x.astype(np.float32).T
    scores16 = scores32.astype(np.float16)
    assert np.unique(scores16).size < 0.6 * np.unique(scores32).size  # fp16 rounding ties many distinct scores
    top16 = np.argsort(-scores16.astype(np.float32), axis=1, kind="stable")[:, :k]
    assert not np.array_equal(top16, expected_rows)  # an fp16 ranking is not the fp32 one
    searcher = ExactSearcher("torch", dtype=dtype, batch_size=7, topk_block=block)
    scores, rows = searcher.search(x, q, k)
    assert scores.dtype == np.float32
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)


def test_fp32_vectors_are_rescored_from_their_fp32_values():
    """Entries that fp16 cannot hold (odd whole numbers above 2048): the fp16 copy only pre-selects."""
    rng = np.random.default_rng(1)
    x = (2049 + 2 * rng.integers(0, 1000, (2000, 4))).astype(np.float32)
    q = rng.integers(0, 4, (25, 4)).astype(np.float32)
    assert not np.array_equal(x.astype(np.float16).astype(np.float32), x)
    expected_scores, expected_rows = brute_force(x, q, 30)
    scores, rows = ExactSearcher("torch", dtype="float16", batch_size=10).search(x, q, 30)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)


def test_a_query_with_more_near_ties_than_the_margin_is_searched_again(monkeypatch):
    """All 5000 rows score the same in fp16 and differ in fp32: the candidate count doubles to every row."""
    import retrieval.exact_search as exact_search

    x = np.zeros((5000, 2), dtype=np.float32)
    x[:, 0] = 4096
    x[:, 1] = np.arange(5000) % 4  # fp32 scores 4096 * 1 + 0..3 with q = (1, 1): one fp16 value (4096)
    q = np.ones((3, 2), dtype=np.float32)
    calls = []
    original = exact_search.block_topk
    monkeypatch.setattr(exact_search, "block_topk", lambda s, m, b: calls.append(m) or original(s, m, b))
    scores, rows = ExactSearcher("torch", dtype="float16").search(x, q, 20)
    expected_scores, expected_rows = brute_force(x, q, 20)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)
    assert calls == [276, 552, 1104, 2208, 4416]  # then every row


@pytest.mark.parametrize("shard_rows", [1200, 500])
def test_search_stage_fp16_torch_backend_equals_brute_force(tmp_path, shard_rows):
    """Through the search stage: fp16 shards, `search.torch_dtype=fp16`, shards merged; equal to an fp32 search."""
    x, q = integer_vectors(1200, 8, 64, queries=12, seed=3)
    store = write_store(tmp_path / "emb", x, [f"d{i}" for i in range(len(x))], shard_rows=shard_rows)
    scores, rows = search_store(
        store, q, SearchSettings(depth=60, backend="torch", torch_dtype="float16", batch_size=5)
    )
    expected_scores, expected_rows = brute_force(x, q, 60)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_array_equal(scores, expected_scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused re-scoring (fp16 bmm, fp32 output) needs CUDA")
def test_cuda_search_equals_fp32_brute_force():
    x, q = integer_vectors(20000, 32, 32, queries=64)
    expected_scores, expected_rows = brute_force(x, q, 100)
    scores, rows = torch_search(torch.from_numpy(x).cuda(), torch.from_numpy(q).cuda(), 100, 16, 32)
    np.testing.assert_array_equal(rows.cpu().numpy(), expected_rows)
    np.testing.assert_array_equal(scores.cpu().numpy(), expected_scores)
