"""Encode: shards equal the encoder's embeddings, early exit, resume, slices, refusals."""

import json
import random

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from encode import Slice, encode_collection, worker_slice
from encode import pipeline as encode_pipeline
from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.model import StarbucksModel
from retrieval.checkpoint import load_encoder, resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.sizes import Size
from retrieval.store import EmbeddingStore

SIZES = [{"name": "a", "layers": 1, "dim": 8}, {"name": "b", "layers": 2, "dim": 16}, "4x32"]
WORDS = "apt kernel python shell editor font library daemon network audio video image parser tool".split()
PASSAGES = 45  # shard_rows 16 -> shards of 16, 16, 13


def save_model(directory, seed=0, meta=True):
    """A tiny random BERT with the MiniLM tokenizer; `meta=False` saves a plain HF model (zero-shot)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    model = tiny_bert(layers=4, hidden=32, vocab=tokenizer.vocab_size, seed=seed)
    if meta:
        save_encoder(
            StarbucksEncoder(model, pooling="cls", normalize=False),
            directory,
            tokenizer,
            {"sizes": SIZES, "query_max_length": 12, "passage_max_length": 24},
        )
    else:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def write_collection(root, seed=0):
    rng = random.Random(seed)
    (root / "qrels").mkdir(parents=True)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 40))) for _ in range(PASSAGES)]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"p{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(WORDS, k=3))}) + "\n" for i in range(7))
    )
    (root / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tp{i}\t1\n" for i in range(7))
    )
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    return {"model": save_model(root / "model"), "collection": write_collection(root / "col"), "root": root}


@pytest.fixture(scope="module")
def full(workspace):
    """A complete encode of every size (read-only for the tests)."""
    out = workspace["root"] / "full"
    summary = encode_collection(make_config(workspace, out), progress=False)
    assert summary.complete and summary.passages_encoded == summary.passages_total == PASSAGES
    return out


def make_config(workspace, out, *overrides, model=None):
    cfg = load_config(
        None,
        [
            f"output_dir={out}",
            f"encode.model={model or workspace['model']}",
            f"data.corpus={workspace['collection']}",
            "encode.shard_rows=16",
            "encode.batch_size=5",
            *overrides,
        ],
    )
    cfg.data.eval_splits = {"dev": str(workspace["collection"])}
    return cfg


def stored(out, size_name):
    store = EmbeddingStore(out / "embeddings" / size_name)
    return store.ids(), np.concatenate([v for _, _, v in store.iter_shards()])


def shard_bytes(out):
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted((out / "embeddings").rglob("*"))
        if p.suffix in (".npy", ".txt")
    }


def test_shards_equal_the_encoders_embeddings_of_the_same_texts(workspace, full):
    out = full
    enc, tok, meta = load_encoder(str(workspace["model"]))
    rows = [json.loads(line) for line in (workspace["collection"] / "corpus.jsonl").read_text().splitlines()]
    queries = [json.loads(line) for line in (workspace["collection"] / "queries.jsonl").read_text().splitlines()]
    with torch.no_grad():
        want = enc.embed(
            tokenize(tok, [r["text"] for r in rows], 24), [Size("a", 1, 8), Size("b", 2, 16), Size("", 4, 32)]
        )
        want_q = enc.embed(tokenize(tok, [q["text"] for q in queries], 12), [Size("b", 2, 16)])
    for size, vectors in want.items():
        ids, got = stored(out, size.name)
        assert ids == [r["_id"] for r in rows] and got.dtype == np.float16 and got.shape == (PASSAGES, size.dim)
        np.testing.assert_allclose(got.astype(np.float32), vectors.numpy(), rtol=2e-3, atol=2e-3)
    meta = json.loads((out / "embeddings" / "b" / "meta.json").read_text())
    assert (meta["count"], meta["shards"], meta["pooling"], meta["max_length"]) == (PASSAGES, 3, "cls", 24)
    qids, qvec, qmeta = EmbeddingStore(out / "embeddings" / "b").load_queries("dev")
    assert qids == [q["_id"] for q in queries] and qmeta["max_length"] == 12
    np.testing.assert_allclose(qvec.astype(np.float32), want_q[Size("b", 2, 16)].numpy(), rtol=2e-3, atol=2e-3)


def test_one_size_exits_early_and_equals_the_all_sizes_pass(workspace, full, tmp_path, monkeypatch):
    import retrieval.encoder

    depths = []
    real, packed = StarbucksEncoder.hidden_states, retrieval.encoder.packed_hidden_states
    monkeypatch.setattr(
        StarbucksEncoder,
        "hidden_states",
        lambda self, batch, layers: depths.append(max(layers)) or real(self, batch, layers),
    )
    monkeypatch.setattr(
        retrieval.encoder,
        "packed_hidden_states",  # packed batches (model.packing: auto on the CPU)
        lambda backbone, layers, batch, wanted, *a: (
            depths.append(max(wanted)) or packed(backbone, layers, batch, wanted, *a)
        ),
    )
    encode_collection(make_config(workspace, tmp_path / "one", "encode.sizes=b"), progress=False)
    assert set(depths) == {2}
    assert sorted(p.name for p in (tmp_path / "one" / "embeddings").iterdir()) == ["b"]
    ids_all, all_sizes = stored(full, "b")
    ids_one, one_size = stored(tmp_path / "one", "b")
    assert ids_one == ids_all
    np.testing.assert_allclose(one_size.astype(np.float32), all_sizes.astype(np.float32), rtol=0, atol=1e-3)


def test_an_interrupted_encode_resumes_without_redoing_finished_shards(workspace, full, tmp_path, monkeypatch):
    out = tmp_path / "exp"
    real_write = EmbeddingStore.write_shard

    def killed_at_shard_2(self, k, ids, vectors, *rest):
        if k == 2:
            raise KeyboardInterrupt
        real_write(self, k, ids, vectors, *rest)

    monkeypatch.setattr(EmbeddingStore, "write_shard", killed_at_shard_2)
    with pytest.raises(KeyboardInterrupt):
        encode_collection(make_config(workspace, out), progress=False)
    assert not json.loads((out / "embeddings" / "b" / "meta.json").read_text())["complete"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "embeddings").rglob("shard-*.npy")}
    assert len(stamps) == 2 * 3  # shards 0 and 1 of each size

    monkeypatch.setattr(EmbeddingStore, "write_shard", real_write)
    encoded = []
    real_encode = StarbucksModel.embed_texts
    monkeypatch.setattr(
        StarbucksModel,
        "embed_texts",
        lambda model, texts, sizes, kind, *a, **k: (
            encoded.append((kind, len(texts))) or real_encode(model, texts, sizes, kind, *a, **k)
        ),
    )
    summary = encode_collection(make_config(workspace, out), progress=False)
    assert encoded == [("passage", PASSAGES - 32)]  # only block 2; the queries were already written
    assert summary.complete and summary.passages_encoded == PASSAGES - 32
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    assert shard_bytes(out) == shard_bytes(full)


def test_shard_slices_together_equal_the_whole(workspace, full, tmp_path):
    sliced = tmp_path / "sliced"
    first = encode_collection(make_config(workspace, sliced, "encode.shard=1/2"), progress=False)
    assert not first.complete and first.passages_encoded == 16  # block 1 only
    assert not (sliced / "embeddings" / "a" / "queries-dev.npy").exists()  # queries are slice 0's job
    second = encode_collection(make_config(workspace, sliced, "encode.shard=0/2"), progress=False)
    assert second.complete and second.passages_encoded == 16 + 13
    assert shard_bytes(sliced) == shard_bytes(full)
    assert json.loads((sliced / "embeddings" / "a" / "meta.json").read_text())["complete"]


def test_worker_slice_combines_shard_and_torchrun_rank():
    assert worker_slice(None, {}) == Slice(0, 1)
    assert worker_slice("1/2", {}) == Slice(1, 2)
    assert worker_slice(None, {"RANK": "3", "WORLD_SIZE": "4"}) == Slice(3, 4)
    s = worker_slice("1/2", {"RANK": "1", "WORLD_SIZE": "4"})
    assert s == Slice(5, 8) and [k for k in range(20) if s.owns(k)] == [5, 13]
    assert worker_slice(None, {"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}) == Slice(2, 3)
    assert worker_slice(None, {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == Slice(1, 2)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(StarbucksError, match="is not 'i/n'"):
            worker_slice(bad, {})


def test_another_model_into_the_same_embeddings_is_refused(workspace, tmp_path):
    out = tmp_path / "exp"
    encode_collection(make_config(workspace, out, "encode.sizes=a"), progress=False)
    other = save_model(tmp_path / "other", seed=1)
    with pytest.raises(StarbucksError, match=r"embeddings/a was encoded with model_sha256 = '[0-9a-f]+', now"):
        encode_collection(make_config(workspace, out, "encode.sizes=a", model=other), progress=False)


def test_another_precision_into_the_same_embeddings_is_refused(workspace, tmp_path):
    """A store encoded in fp32 and resumed in bf16 (the CPU's auto on a bf16 chip) would hold two
    precisions' vectors: refused in one line naming the setting."""
    out = tmp_path / "exp"
    encode_collection(make_config(workspace, out, "encode.sizes=a", "encode.precision=fp32"), progress=False)
    with pytest.raises(StarbucksError, match=r"embeddings/a was encoded with precision = 'fp32', now 'bf16'"):
        encode_collection(make_config(workspace, out, "encode.sizes=a", "encode.precision=bf16"), progress=False)


def test_a_changed_corpus_is_refused_on_resume(workspace, tmp_path):
    out = tmp_path / "exp"
    encode_collection(make_config(workspace, out, "encode.sizes=a"), progress=False)
    changed = tmp_path / "col"
    write_collection(changed, seed=0)
    lines = (changed / "corpus.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"p3"', '"renamed"')
    (changed / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    cfg = make_config(workspace, out, "encode.sizes=a", f"data.corpus={changed}")
    with pytest.raises(StarbucksError, match="ids-00000.txt lists other passages than block 0"):
        encode_collection(cfg, progress=False)


def test_zero_shot_model_takes_pooling_and_sizes_from_the_config(workspace, tmp_path):
    plain = save_model(tmp_path / "plain", meta=False)
    out = tmp_path / "exp"
    cfg = make_config(workspace, out, "model.pooling=mean", "model.normalize=true", "sizes=[2x8]", model=plain)
    encode_collection(cfg, progress=False)
    meta = json.loads((out / "embeddings" / "2x8" / "meta.json").read_text())
    assert (meta["pooling"], meta["normalize"], meta["max_length"]) == ("mean", True, cfg.model.passage_max_length)
    _, vectors = stored(out, "2x8")
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_model_choice_prefers_encode_model_then_trained_and_never_falls_back_silently(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(StarbucksError, match=r"no trained model in .*run `python -m train`.*encode.model="):
        encode_pipeline.model_source(cfg)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert encode_pipeline.model_source(cfg) == str(tmp_path / "model")
    cfg.encode.model = "elsewhere"
    assert encode_pipeline.model_source(cfg) == "elsewhere"


def test_tokenising_worker_processes_give_the_same_shards(workspace, full, tmp_path):
    out = tmp_path / "workers"
    encode_collection(make_config(workspace, out, "encode.dataloader_workers=2"), progress=False)
    assert shard_bytes(out) == shard_bytes(full)


def test_dataloader_workers_setting(workspace, tmp_path, monkeypatch):
    with pytest.raises(StarbucksError, match="encode.dataloader_workers"):
        encode_collection(make_config(workspace, tmp_path / "bad", "encode.dataloader_workers=-1"), progress=False)
    workers = encode_pipeline.loader_workers
    monkeypatch.setattr(encode_pipeline.os, "cpu_count", lambda: 16)
    assert workers("auto", torch.device("cpu")) == 0 and workers(3, torch.device("cpu")) == 3
    assert workers("auto", torch.device("cuda")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks share the 16 cores
    assert workers("auto", torch.device("cuda")) == 3
