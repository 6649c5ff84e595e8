"""Scale-out: a 2-process torchrun encode equals the single-process encode; search over its shards too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from encode import encode_collection
from retrieval.config import load_config
from retrieval.runfile import read_run
from retrieval.store import EmbeddingStore
from search import SearchSettings, search_collection, search_store
from test_encode import PASSAGES, make_config, save_model, write_collection

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The same collection encoded by one process and by `torchrun --nproc_per_node 2`."""
    root = tmp_path_factory.mktemp("scale")
    workspace = {"model": save_model(root / "model"), "collection": write_collection(root / "col")}
    single, multi = root / "single", root / "multi"
    encode_collection(make_config(workspace, single), progress=False)
    config = root / "multi.yaml"
    config.write_text(
        f"output_dir: {multi}\n"
        f"data:\n  corpus: {workspace['collection']}\n  eval_splits: {{dev: {workspace['collection']}}}\n"
        f"encode: {{model: {workspace['model']}, shard_rows: 16, batch_size: 5}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "encode", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return single, multi, done.stderr


def by_id(out, size):
    """`{id: vector bytes}` of every passage of a size."""
    store = EmbeddingStore(out / "embeddings" / size)
    ids = store.ids()
    vectors = np.concatenate([v for _, _, v in store.iter_shards()])
    return dict(zip(ids, (v.tobytes() for v in vectors)))


def test_two_rank_torchrun_encode_equals_single_process_byte_for_byte(encoded):
    single, multi, log = encoded
    assert "worker 0/2" in log and "worker 1/2" in log
    for size in ("a", "b", "4x32"):
        one, two = by_id(single, size), by_id(multi, size)
        assert len(one) == PASSAGES and sorted(one.items()) == sorted(two.items())
        meta_one = json.loads((single / "embeddings" / size / "meta.json").read_text())
        meta_two = json.loads((multi / "embeddings" / size / "meta.json").read_text())
        assert meta_two["complete"] and meta_two["ids_sha256"] == meta_one["ids_sha256"]
        q_one = EmbeddingStore(single / "embeddings" / size).load_queries("dev")
        q_two = EmbeddingStore(multi / "embeddings" / size).load_queries("dev")
        assert q_one[0] == q_two[0] and q_one[1].tobytes() == q_two[1].tobytes()
    # the ranks wrote disjoint shards: rank 0 blocks 0 and 2, rank 1 block 1
    assert f"worker 0/2 encoded {16 + 13} of {PASSAGES}" in log and f"worker 1/2 encoded 16 of {PASSAGES}" in log
    assert sorted(p.name for p in (multi / "embeddings" / "a").glob("shard-*.npy")) == [
        "shard-00000.npy",
        "shard-00001.npy",
        "shard-00002.npy",
    ]


def test_search_over_the_ranks_shards_equals_search_over_the_single_encode(encoded, tmp_path):
    single, multi, _ = encoded
    for out in (single, multi):
        splits = [
            f"data.eval_splits.dev={out.parent / 'col'}",
            "data.eval_splits.test=null",
        ]  # the encoded collection's
        assert (
            len(search_collection(load_config(None, [f"output_dir={out}", "search.depth=20", *splits]), progress=False))
            == 3
        )
    for size in ("a", "b", "4x32"):
        assert read_run(single / "runs" / "dev" / f"{size}.trec") == read_run(multi / "runs" / "dev" / f"{size}.trec")
    # per-shard IVF indexes (one per rank-written shard, every list probed) merge to the exact top-k
    store = EmbeddingStore(multi / "embeddings" / "b")
    _, queries, _ = store.load_queries("dev")
    exact = search_store(EmbeddingStore(single / "embeddings" / "b"), queries, SearchSettings(depth=20))
    parts = search_store(
        store,
        queries,
        SearchSettings(index="IVF2,Flat", params={"nprobe": 2}, depth=20, shards_per_index=1),
        tmp_path / "index",
    )
    np.testing.assert_array_equal(parts[1], exact[1])
    assert len(list((tmp_path / "index").glob("*.faiss"))) == 3
