"""Quantised search (int8, binary, re-scoring) against brute force on the quantised vectors, written
here with numpy from the definitions (per-dim min/max ranges, bin middles, sign bits)."""

import json

import numpy as np
import pytest

from retrieval.errors import StarbucksError
from retrieval.quantize import (
    Quantization,
    gather_rows,
    load_or_build_index,
    parse_quantization,
    quantized_search,
    split_run_name,
)
from retrieval.sizes import Size
from tests.test_store import write_store

N, D, Q = 300, 24, 20  # 24 dims: three bytes of sign bits


def corpus(tmp_path, n=N, d=D, shard_rows=64, seed=0):
    rng = np.random.default_rng(seed)
    # a shared direction plus noise, scaled per dim: ranges differ by dim and scores cluster, as real ones do
    vectors = (rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, d) + rng.standard_normal(d)).astype(np.float16)
    ids = [f"p{i}" for i in range(n)]
    store = write_store(tmp_path / "s", vectors, ids, shard_rows, size=Size("grande", 4, d))
    queries = rng.standard_normal((Q, d)).astype(np.float32)
    return store, vectors.astype(np.float32), queries


def brute_topk(scores, k):
    """Best `k` per row by score, ties by the lower column."""
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def int8_brute(vectors):
    lo, hi = vectors.min(0), vectors.max(0)
    codes = np.clip(np.floor((vectors - lo) / (hi - lo) * 255), 0, 255)
    return lo + (codes + 0.5) * (hi - lo) / 255


def test_int8_search_equals_brute_force_on_the_decoded_vectors(tmp_path):
    store, vectors, queries = corpus(tmp_path)
    scores, rows = quantized_search(store, queries, 10, Quantization("int8"), tmp_path / "index")
    expected_scores, expected_rows = brute_topk(queries @ int8_brute(vectors).T, 10)
    np.testing.assert_array_equal(rows, expected_rows)
    assert np.linalg.norm(scores - expected_scores) <= 1e-5 * np.linalg.norm(expected_scores)
    # the calibrated ranges are kept with the index, and they are the corpus's per-dim min and max
    record = json.loads((tmp_path / "index" / "grande.int8.json").read_text())
    np.testing.assert_array_equal(np.float32(record["ranges"]["lo"]), vectors.min(0))
    np.testing.assert_array_equal(np.float32(record["ranges"]["hi"]), vectors.max(0))
    # int8 ranks most of the fp16 top 10
    _, exact_rows = brute_topk(queries @ vectors.T, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)])
    assert overlap >= 0.8, overlap


def test_binary_search_equals_brute_force_on_sign_vectors(tmp_path):
    store, vectors, queries = corpus(tmp_path)
    scores, rows = quantized_search(store, queries, 15, Quantization("binary"), tmp_path / "index")
    signs = np.where(vectors > 0, 1.0, -1.0)
    expected_scores, expected_rows = brute_topk(np.where(queries > 0, 1.0, -1.0) @ signs.T, 15)
    # scores are small whole numbers: many ties, broken by the lower row as the brute force does
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(rows, expected_rows)


def test_a_dim_count_not_divisible_by_8_pads_with_shared_bits(tmp_path):
    store, vectors, queries = corpus(tmp_path, d=13)
    scores, rows = quantized_search(store, queries, 5, Quantization("binary"))
    signs = np.where(vectors > 0, 1.0, -1.0)
    expected_scores, expected_rows = brute_topk(np.where(queries > 0, 1.0, -1.0) @ signs.T, 5)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(rows, expected_rows)


@pytest.mark.parametrize("kind, candidates", [("int8", 40), ("binary", 150)])  # 24 sign bits are coarse
def test_rescoring_restores_the_fp16_top_k_where_the_candidates_hold_it(tmp_path, kind, candidates):
    store, vectors, queries = corpus(tmp_path)
    k = 10
    scores, rows = quantized_search(store, queries, k, Quantization(kind, candidates), tmp_path / "index")
    exact_scores, exact_rows = brute_topk(queries @ vectors.T, k)
    _, held = quantized_search(store, queries, candidates, Quantization(kind), tmp_path / "index")
    holds = [set(e) <= set(h) for e, h in zip(exact_rows, held)]
    assert sum(holds) >= Q // 2, "the test needs queries whose candidates hold the exact top k"
    for i, ok in enumerate(holds):
        if ok:
            np.testing.assert_array_equal(rows[i], exact_rows[i])
            assert np.linalg.norm(scores[i] - exact_scores[i]) <= 1e-5 * np.linalg.norm(exact_scores[i])
        else:  # the best the candidates give, scored exactly
            assert set(rows[i]) <= set(held[i])
            np.testing.assert_allclose(scores[i], np.einsum("d,kd->k", queries[i], vectors[rows[i]]), rtol=1e-5)
    # re-scoring every passage is exact search
    _, all_rows = quantized_search(store, queries, k, Quantization(kind, N), tmp_path / "index")
    np.testing.assert_array_equal(all_rows, exact_rows)


def test_gather_rows_reads_across_shards(tmp_path):
    store, vectors, _ = corpus(tmp_path, shard_rows=7)
    rows = np.array([[0, 6, 7, 299], [150, -1, 13, 14]])
    got = gather_rows(store, rows)
    np.testing.assert_array_equal(got[0], vectors[[0, 6, 7, 299]])
    np.testing.assert_array_equal(got[1, 1], np.zeros(D))
    np.testing.assert_array_equal(got[1, [0, 2, 3]], vectors[[150, 13, 14]])


def test_a_saved_index_is_reused_and_rebuilt_when_the_store_changes(tmp_path):
    store, vectors, queries = corpus(tmp_path)
    index, _ = load_or_build_index(store, "int8", tmp_path / "index")
    path = tmp_path / "index" / "grande.int8.faiss"
    stamp = path.stat().st_mtime_ns
    load_or_build_index(store, "int8", tmp_path / "index")
    assert path.stat().st_mtime_ns == stamp  # reused
    other, _, _ = corpus(tmp_path / "other", seed=1)
    other_meta = other.read_meta()
    meta = store.read_meta()
    meta.update(ids_sha256=other_meta["ids_sha256"], texts_sha256="changed")
    store.meta_path.write_text(json.dumps(meta))
    load_or_build_index(store, "int8", tmp_path / "index")
    assert path.stat().st_mtime_ns != stamp  # the record no longer matches: rebuilt


def test_precision_specs_parse_and_bad_ones_are_one_line():
    assert parse_quantization("fp16") == Quantization()
    assert parse_quantization("binary-rescore100") == Quantization("binary", 100)
    assert parse_quantization(" int8 ").run_name("grande") == "grande.int8"
    assert Quantization().run_name("grande") == "grande"
    assert split_run_name("3x384+6x64.binary-rescore50") == ("3x384+6x64", Quantization("binary", 50))
    assert split_run_name("grande") == ("grande", Quantization())
    assert Quantization("binary", 100).bytes_per_passage(384) == 48 + 768
    assert Quantization("int8").bytes_per_passage(384) == 384
    for bad in ("int4", "fp16-rescore10", "binary-rescore0", "int8-rescore", "binary-rescore-5"):
        with pytest.raises(StarbucksError, match="is not a precision; use one of fp16, int8, binary"):
            parse_quantization(bad)
