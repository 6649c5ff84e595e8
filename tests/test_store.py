"""The embedding store (shards, ids, meta, consistency checks) and TREC run files."""

import hashlib
import json

import numpy as np
import pytest

from retrieval.errors import StarbucksError
from retrieval.runfile import find_runs, read_run, run_path, write_run
from retrieval.sizes import Size
from retrieval.store import (
    EmbeddingStore,
    embedding_identity,
    ids_sha256,
    select_stores,
)

SIZE = Size("grande", 4, 8)


def identity(size=SIZE, model="m1", **kw):
    fields = dict(pooling="cls", normalize=False, max_length=32, prefix="", precision="fp32")
    fields.update(kw)
    return embedding_identity(model, size, **fields)


def write_store(directory, vectors, ids, shard_rows, size=SIZE, model="m1", finalize=True):
    """A store of `vectors` in shards of `shard_rows`, as encode writes it."""
    store = EmbeddingStore(directory)
    store.start({**identity(size, model), "shard_rows": shard_rows})
    for k, start in enumerate(range(0, len(ids), shard_rows)):
        store.write_shard(k, ids[start : start + shard_rows], vectors[start : start + shard_rows])
    if finalize:
        assert store.finalize(len(ids), ids_sha256(ids)) is not None
    return store


def random_vectors(n, d, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float16)


def test_ids_hash_is_sha256_of_the_concatenated_ids_files(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    store = write_store(tmp_path / "s", random_vectors(10, 8), ids, shard_rows=4)
    files = b"".join(store.ids_path(k).read_bytes() for k in range(3))
    assert ids_sha256(ids) == hashlib.sha256(files).hexdigest() == store.read_meta()["ids_sha256"]


def test_shards_round_trip_in_corpus_order(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    vectors = random_vectors(10, 8)
    store = write_store(tmp_path / "s", vectors, ids, shard_rows=4)
    meta = store.read_meta()
    assert (meta["count"], meta["shards"], meta["complete"], meta["dtype"]) == (10, 3, True, "float16")
    assert [(k, row, len(v)) for k, row, v in store.iter_shards()] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert store.ids() == ids
    got = np.concatenate([v for _, _, v in store.iter_shards()])
    assert got.dtype == np.float16 and np.array_equal(got, vectors)
    assert store.size == SIZE


def test_missing_shard_leaves_store_incomplete_and_consumers_refuse(tmp_path):
    ids = [f"d{i}" for i in range(10)]
    store = EmbeddingStore(tmp_path / "s")
    store.start({**identity(), "shard_rows": 4})
    store.write_shard(0, ids[:4], random_vectors(4, 8))
    store.write_shard(2, ids[8:], random_vectors(2, 8))
    assert store.finalize(10, ids_sha256(ids)) is None
    with pytest.raises(StarbucksError, match="incomplete .2 shards written"):
        store.require_complete()
    with pytest.raises(StarbucksError, match="no embeddings"):
        EmbeddingStore(tmp_path / "none").require_complete()


def test_finalize_catches_shards_of_another_corpus(tmp_path):
    ids = [f"d{i}" for i in range(6)]
    store = write_store(tmp_path / "s", random_vectors(6, 8), ids, shard_rows=4, finalize=False)
    other = ids[:5] + ["x5"]
    with pytest.raises(StarbucksError, match="other passage ids than the corpus"):
        store.finalize(6, ids_sha256(other))


def test_start_refuses_another_identity_and_accepts_the_same(tmp_path):
    store = EmbeddingStore(tmp_path / "s")
    store.start({**identity(), "shard_rows": 4})
    store.start({**identity(), "shard_rows": 4})  # a resumed encode
    with pytest.raises(StarbucksError, match="model_sha256 = 'm1', now 'm2'"):
        store.start({**identity(model="m2"), "shard_rows": 4})
    with pytest.raises(StarbucksError, match="shard_rows = 4, now 8"):
        store.start({**identity(), "shard_rows": 8})
    assert not list(store.dir.glob(".tmp-*"))


def test_queries_from_another_model_or_size_are_refused(tmp_path):
    ids = [f"d{i}" for i in range(6)]
    store = write_store(tmp_path / "s", random_vectors(6, 8), ids, shard_rows=4)
    qv = random_vectors(3, 8, seed=1)
    store.write_queries("dev", ["q1", "q2", "q3"], qv, identity(max_length=16))
    qids, got, meta = store.load_queries("dev")
    assert qids == ["q1", "q2", "q3"] and np.array_equal(got, qv) and meta["max_length"] == 16
    assert store.query_splits() == ["dev"]
    store.write_queries("dev", ["q1"], qv[:1], identity(model="other"))
    with pytest.raises(
        StarbucksError,
        match="queries-dev.npy does not match .*model_sha256 is 'other' for the queries but 'm1' for the passages",
    ):
        store.load_queries("dev")
    store.write_queries("dev", ["q1"], qv[:1], identity(size=Size("tall", 3, 8)))
    with pytest.raises(StarbucksError, match="layers is 3 for the queries but 4 for the passages"):
        store.load_queries("dev")
    with pytest.raises(StarbucksError, match="no query embeddings for split 'test'"):
        store.load_queries("test")


def test_select_stores_by_name_or_layers_x_dim(tmp_path):
    ids = ["a", "b"]
    small = write_store(tmp_path / "demi", random_vectors(2, 4), ids, 4, size=Size("demi", 1, 4))
    big = write_store(tmp_path / "grande", random_vectors(2, 8), ids, 4)
    write_store(tmp_path / "partial", random_vectors(2, 8), ids, 4, size=Size("partial", 2, 8), finalize=False)
    assert [s.dir for s in select_stores(tmp_path, "all")] == [small.dir, big.dir]
    assert [s.dir for s in select_stores(tmp_path, "4x8,demi,grande")] == [big.dir, small.dir]
    with pytest.raises(StarbucksError, match="no finished embeddings for size 'partial'.*finished: demi, grande"):
        select_stores(tmp_path, "partial")
    with pytest.raises(StarbucksError, match="run `python -m encode` first"):
        select_stores(tmp_path / "empty", "all")


def test_run_file_round_trip_keeps_close_float32_scores_apart(tmp_path):
    a = float(np.float32(0.7123456))
    b = float(np.nextafter(np.float32(a), np.float32(0)))  # the next float32 below
    path = tmp_path / "dev" / "grande.trec"
    n = write_run(path, [("q1", [("d1", a), ("d2", b)]), ("q2", [("d3", -1.5)])], "exp-grande")
    assert n == 3
    lines = path.read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "d1", "1"] and lines[1].split()[3] == "2"
    run = read_run(path)
    assert {q: list(docs) for q, docs in run.items()} == {"q1": ["d1", "d2"], "q2": ["d3"]}
    assert np.float32(run["q1"]["d1"]) == np.float32(a) and np.float32(run["q1"]["d2"]) == np.float32(b)
    assert run["q1"]["d1"] > run["q1"]["d2"] and run["q2"]["d3"] == -1.5
    with pytest.raises(StarbucksError, match="tag"):
        write_run(path, [], "two words")
    path.write_text("q1 Q0 d1 1 0.5\n")
    with pytest.raises(StarbucksError, match="line 1: expected 6 fields"):
        read_run(path)


def test_find_runs_orders_by_size_and_reads_records(tmp_path):
    for name, layers, dim in [("venti", 5, 256), ("demi", 1, 32)]:
        p = run_path(tmp_path, "dev", name)
        write_run(p, [("q", [("d", 1.0)])], "t")
        p.with_suffix(".json").write_text(json.dumps({"size": name, "layers": layers, "dim": dim}))
    write_run(run_path(tmp_path, "dev", "2x64"), [("q", [("d", 1.0)])], "t")  # no record: LxD name
    write_run(run_path(tmp_path, "dev", "notes"), [("q", [("d", 1.0)])], "t")  # unknown size: ignored
    found = find_runs(tmp_path, "dev")
    assert [s for s, _ in found] == [Size("demi", 1, 32), Size("", 2, 64), Size("venti", 5, 256)]
