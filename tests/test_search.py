"""Search: exact FAISS and torch backends against brute force, shard merging, saved indexes, run files."""

import shutil

import numpy as np
import pytest

from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.runfile import read_run
from retrieval.sizes import Size
from retrieval.store import EmbeddingStore, ids_sha256
from search import SearchSettings, TopK, search_collection, search_store
from search import pipeline as search_pipeline
from test_store import identity, random_vectors, write_store

SIZE = Size("grande", 4, 8)


def brute_force(vectors, queries, k):
    """Top-k by a float64 numpy matmul and a full sort."""
    scores = queries.astype(np.float64) @ vectors.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, rows, axis=1), rows


@pytest.fixture
def data():
    vectors = random_vectors(300, 8, seed=0)
    queries = random_vectors(25, 8, seed=1)
    return vectors, queries, [f"d{i}" for i in range(300)]


def test_faiss_flat_equals_numpy_brute_force(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "one", vectors, ids, shard_rows=300)
    scores, rows = search_store(store, queries, SearchSettings(depth=20))
    want_scores, want_rows = brute_force(vectors, queries, 20)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_torch_backend_equals_faiss(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "one", vectors, ids, shard_rows=300)
    faiss_scores, faiss_rows = search_store(store, queries, SearchSettings(depth=20))
    torch_scores, torch_rows = search_store(store, queries, SearchSettings(depth=20, backend="torch", batch_size=7))
    np.testing.assert_array_equal(torch_rows, faiss_rows)
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_three_shards_equal_the_concatenated_vectors(tmp_path, data, backend):
    vectors, queries, ids = data
    whole = write_store(tmp_path / "one", vectors, ids, shard_rows=300)
    sharded = write_store(tmp_path / "three", vectors, ids, shard_rows=100)
    assert sharded.read_meta()["shards"] == 3
    settings = SearchSettings(depth=30, backend=backend)
    s1, r1 = search_store(whole, queries, settings)
    s3, r3 = search_store(sharded, queries, settings)
    np.testing.assert_array_equal(r3, r1)
    np.testing.assert_allclose(s3, s1, rtol=1e-6, atol=1e-6)


def test_depth_beyond_the_corpus_returns_every_passage(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "s", vectors[:12], ids[:12], shard_rows=5)
    scores, rows = search_store(store, queries, SearchSettings(depth=100))
    assert rows.shape == (25, 12)
    assert all(sorted(r) == list(range(12)) for r in rows)


def test_topk_merge_keeps_the_best_and_breaks_ties_by_order():
    top = TopK(2, 3)
    top.add(np.array([[5.0, 1.0], [2.0, -np.inf]], dtype=np.float32), np.array([[0, 1], [0, -1]]))
    top.add(np.array([[5.0, 3.0], [4.0, 2.0]], dtype=np.float32), np.array([[0, 1], [0, 1]]), offset=10)
    assert top.rows.tolist() == [[0, 10, 11], [10, 0, 11]]
    assert top.scores.tolist() == [[5.0, 5.0, 3.0], [4.0, 2.0, 2.0]]


def test_per_shard_ivf_indexes_are_saved_reused_and_merged(tmp_path, data, monkeypatch):
    vectors, queries, ids = data
    store = write_store(tmp_path / "emb", vectors, ids, shard_rows=100)
    index_dir = tmp_path / "index"
    # nprobe = nlist visits every list, so the IVF search is exact and must equal brute force
    settings = SearchSettings(index="IVF4,Flat", params={"nprobe": 4}, depth=20, shards_per_index=2)
    scores, rows = search_store(store, queries, settings, index_dir)
    assert sorted(p.name for p in index_dir.iterdir()) == [
        "grande.part-00000.faiss",
        "grande.part-00000.json",
        "grande.part-00001.faiss",
        "grande.part-00001.json",
    ]
    want_scores, want_rows = brute_force(vectors, queries, 20)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)

    def no_build(*_a, **_k):
        raise AssertionError("the saved index should have been reused")

    stamps = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}
    monkeypatch.setattr(search_pipeline, "training_sample", no_build)
    again = search_store(store, queries, settings, index_dir)
    np.testing.assert_array_equal(again[1], rows)
    assert stamps == {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir()}


def test_stale_index_is_refused_unless_rebuild(tmp_path, data):
    vectors, queries, ids = data
    index_dir = tmp_path / "index"
    settings = SearchSettings(index="IVF2,Flat", params={"nprobe": 2}, depth=5)
    search_store(write_store(tmp_path / "a", vectors, ids, 100), queries, settings, index_dir)
    other = write_store(tmp_path / "b", vectors, ids, 100, model="m2")
    with pytest.raises(
        StarbucksError, match=r"index .*grande.faiss was built with model_sha256 = 'm1'.*search.rebuild=true"
    ):
        search_store(other, queries, settings, index_dir)
    settings.rebuild = True
    search_store(other, queries, settings, index_dir)
    assert '"m2"' in (index_dir / "grande.json").read_text()


def test_index_and_run_are_stale_after_re_encoding_with_another_pooling(tmp_path, data):
    """Same weights and ids, other vectors: neither the saved index nor the run file may be reused."""
    vectors, queries, ids = data

    def encode(pooling, seed):
        directory = tmp_path / "embeddings" / "grande"
        if directory.exists():
            shutil.rmtree(directory)  # what the store tells a user to do before re-encoding
        store = EmbeddingStore(directory)
        store.start({**identity(pooling=pooling), "shard_rows": 300})
        store.write_shard(0, ids, random_vectors(300, 8, seed))
        store.finalize(300, ids_sha256(ids))
        store.write_queries("dev", ["q0"], queries[:1], identity(pooling=pooling))
        return store

    settings = SearchSettings(index="IVF2,Flat", params={"nprobe": 2}, depth=5)
    search_store(encode("cls", 0), queries, settings, tmp_path / "index")
    [out] = search_collection(config(tmp_path), progress=False)
    store = encode("mean", 1)
    with pytest.raises(StarbucksError, match="grande.faiss was built with pooling = 'cls'.*now give 'mean'"):
        search_store(store, queries, settings, tmp_path / "index")
    assert search_collection(config(tmp_path), progress=False) == [out]


def test_bad_index_string_and_params_are_one_line_errors(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "a", vectors, ids, 100)
    with pytest.raises(StarbucksError, match="'IVF4,PQ3' is not a usable FAISS index_factory string"):
        search_store(store, queries, SearchSettings(index="IVF4,PQ3"), tmp_path / "index")
    with pytest.raises(StarbucksError, match="search.params.nprobe = 3 does not apply"):
        search_store(store, queries, SearchSettings(index="HNSW8", params={"nprobe": 3}), tmp_path / "index")
    with pytest.raises(StarbucksError, match="cannot build index 'IVF512,Flat' over 300 vectors"):
        search_store(store, queries, SearchSettings(index="IVF512,Flat"), tmp_path / "index")


def config(tmp_path, *overrides):
    """The synthetic stores' splits have no qrels: the default collection's splits are removed."""
    return load_config(
        None,
        [f"output_dir={tmp_path}", "name=exp", "data.eval_splits.dev=null", "data.eval_splits.test=null", *overrides],
    )


def test_settings_resolve_devices_and_refuse_impossible_choices(tmp_path):
    s = SearchSettings.from_config(config(tmp_path))
    assert (s.backend, s.device, s.faiss_gpu, s.torch_dtype, s.exact) == ("faiss", "cpu", False, "float32", True)
    assert SearchSettings.from_config(config(tmp_path, "search.backend=torch")).backend == "torch"
    with pytest.raises(StarbucksError, match="the torch backend searches exactly"):
        SearchSettings.from_config(config(tmp_path, "search.backend=torch", "search.index=HNSW32"))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(StarbucksError, match="CUDA is not available"):
            SearchSettings.from_config(config(tmp_path, "search.device=cuda"))


def test_search_collection_writes_runs_and_skips_up_to_date_ones(tmp_path, data, capsys):
    vectors, queries, ids = data
    store = write_store(tmp_path / "embeddings" / "grande", vectors, ids, shard_rows=128)
    qids = [f"q{i}" for i in range(25)]
    store.write_queries("dev", qids, queries, identity(max_length=16))
    cfg = config(tmp_path, "search.depth=10")
    [out] = search_collection(cfg, progress=False)
    assert out == tmp_path / "runs" / "dev" / "grande.trec"
    run = read_run(out)
    _, want_rows = brute_force(vectors, queries, 10)
    assert [list(run[q]) for q in qids] == [[ids[r] for r in row] for row in want_rows]
    assert out.read_text().split("\n")[0].endswith(" exp-grande")
    assert search_collection(cfg, progress=False) == []
    assert "is up to date" in capsys.readouterr().err
    assert search_collection(config(tmp_path, "search.depth=5"), progress=False) == [out]
    assert len(read_run(out)["q0"]) == 5


def test_search_refuses_queries_from_another_model(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "embeddings" / "grande", vectors, ids, shard_rows=128)
    store.write_queries("dev", ["q0"], queries[:1], identity(model="zero-shot"))
    with pytest.raises(StarbucksError, match="queries-dev.npy does not match the passages"):
        search_collection(config(tmp_path), progress=False)
    with pytest.raises(StarbucksError, match="no finished embeddings for size 'venti'"):
        search_collection(config(tmp_path, "search.sizes=venti"), progress=False)
    assert isinstance(store, EmbeddingStore)


@pytest.mark.parametrize(
    "n,k,block", [(1000, 10, 16), (1003, 7, 20), (997, 20, 8), (4099, 30, 32), (300, 5, None), (300, 50, 4)]
)
def test_block_maxima_topk_equals_a_full_sort(n, k, block):
    import torch

    from retrieval.exact_search import block_topk

    rng = np.random.default_rng(n)
    scores = rng.standard_normal((9, n)).astype(np.float32)
    values, rows = block_topk(torch.from_numpy(scores), k, block)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # distinct scores: a unique answer
    np.testing.assert_array_equal(rows.numpy(), order)
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(scores, order, axis=1))


def test_block_maxima_topk_with_ties_gives_the_top_scores_and_their_own_rows():
    import torch

    from retrieval.exact_search import block_topk

    rng = np.random.default_rng(3)
    scores = torch.from_numpy(rng.integers(0, 40, size=(6, 5003)).astype(np.float16))  # many exact ties
    values, rows = block_topk(scores, 100, 8)
    expected = np.sort(scores.float().numpy(), axis=1)[:, ::-1][:, :100]
    np.testing.assert_array_equal(values.float().numpy(), expected)  # the k best scores, in order
    np.testing.assert_array_equal(torch.gather(scores, 1, rows).numpy(), values.numpy())  # rows hold them
    assert all(len(set(r)) == 100 for r in rows.tolist())  # no row twice


def test_torch_backend_with_block_topk_equals_faiss(tmp_path, data):
    vectors, queries, ids = data
    store = write_store(tmp_path / "one", vectors, ids, shard_rows=300)
    exact = search_store(store, queries, SearchSettings(depth=20))
    blocked = search_store(store, queries, SearchSettings(depth=20, backend="torch", batch_size=7, topk_block=2))
    np.testing.assert_array_equal(blocked[1], exact[1])
    np.testing.assert_allclose(blocked[0], exact[0], rtol=1e-6, atol=1e-6)


def test_topk_block_setting():
    from search.pipeline import topk_block

    assert topk_block("auto", "cuda:0") == 32 and topk_block("auto", "cpu") is None
    assert topk_block(None, "cuda") is None and topk_block(0, "cuda") is None and topk_block(64, "cpu") == 64
    from retrieval.config import load_config

    with pytest.raises(StarbucksError, match="search.topk_block"):  # the schema checks it, once
        load_config(None, ["search.topk_block=1"])
