"""`python -m train.mine`: BM25 and dense hard negatives against independent rankings; the groups train."""

import numpy as np
import pytest
import yaml

from conftest import REPO, mini_slice
from retrieval.config import load_config
from retrieval.data import iter_corpus, load_split, load_train_groups
from retrieval.io import read_jsonl
from train.mine import MineSettings, main, mine

MINI = REPO / "data" / "debian-pkgs-mini"
pytestmark = pytest.mark.skipif(not MINI.is_dir(), reason="data/debian-pkgs-mini not built")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """20 dev queries of debian-pkgs-mini with their positives among 300 passages (qrels/dev.tsv)."""
    col, qids, _ = mini_slice(tmp_path_factory.mktemp("mine") / "col", queries=20, passages=300)
    return col


def config(tmp_path, col, **extra):
    data = {
        "name": "mine",
        "output_dir": str(tmp_path / "run"),
        "data": {"corpus": str(col), "train": str(col / "train.jsonl"), "eval_splits": {}},
    }
    for key, value in extra.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rows(path):
    return [row for _, row in read_jsonl(path)]


def bm25s_ranking(texts, query, depth):
    """A direct bm25s ranking (same tokenisation: English stopwords, no stemmer), ties by corpus position."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
    scores = retriever.get_scores([t for t in tokens if t in retriever.vocab_dict])
    order = np.lexsort((np.arange(len(texts)), -scores))
    return [int(i) for i in order[:depth] if scores[i] > 0]


def test_bm25_mining_is_a_direct_bm25s_ranking_without_the_positives(tmp_path, collection):
    cfg = load_config(config(tmp_path, collection))
    out = tmp_path / "groups.jsonl"
    summary = mine(cfg, MineSettings(split="dev", depth=12, negatives=5, skip_top=2, out=str(out), progress=False))
    ids, texts = map(list, zip(*iter_corpus(str(collection))))
    dev = load_split("dev", str(collection))
    got = {r["query_id"]: r for r in rows(out)}
    empty = 0
    for qid in dev.qrels:
        positives = set(dev.qrels[qid])
        ranked = [ids[i] for i in bm25s_ranking(texts, dev.queries[qid], 12)]
        expected = [d for d in ranked if d not in positives][2:7]
        if not expected:  # nothing left after the positives and the skipped top: no group
            assert qid not in got
            empty += 1
            continue
        assert got[qid]["negative_document_ids"] == expected, qid
        assert got[qid]["positive_document_ids"] == sorted(positives) and got[qid]["query"] == dev.queries[qid]
    assert (summary.groups, summary.without_negatives) == (len(got), empty) and len(got) + empty == len(dev.qrels)
    # a positive inside the depth is really dropped (else the test above would not test it)
    assert any(set(dev.qrels[q]) & {ids[i] for i in bm25s_ranking(texts, dev.queries[q], 12)} for q in got)


def test_bad_input_is_one_line(tmp_path, collection, capsys):
    cfg = config(tmp_path, collection)
    for argv, message in [
        (["--split", "train"], "qrels has no train.tsv"),
        (["--split", "dev", "--size", "demi"], "--size is for a dense retriever"),
        (["--split", "dev", "--depth", "0"], "--depth = 0 must be"),
    ]:
        with pytest.raises(SystemExit) as err:
            main(["--config", str(cfg), *argv, "--no-progress"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1 and message in lines[0], (argv, lines)


def test_split_from_eval_splits_without_qrels_is_one_line(tmp_path, collection, capsys):
    queries = collection / "queries.jsonl"
    cfg = config(tmp_path, collection, data={"eval_splits": {"extra": {"queries": str(queries)}}})
    with pytest.raises(SystemExit) as err:
        main(["--config", str(cfg), "--split", "extra", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert err.value.code == 2 and len(lines) == 1 and "no qrels" in lines[0]


SIZES = [{"name": "demi", "layers": 1, "dim": 8}, {"name": "full", "layers": 4, "dim": 32}]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """A tiny random BERT saved as a Starbucks checkpoint (mean pooling, dot product, sizes demi and full)."""
    from transformers import AutoTokenizer

    from conftest import tiny_bert
    from retrieval.checkpoint import resolve_model_path, save_encoder
    from retrieval.encoder import StarbucksEncoder

    d = tmp_path_factory.mktemp("dense-model")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    meta = {"sizes": SIZES, "query_max_length": 16, "passage_max_length": 48}
    save_encoder(StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size), "mean"), d, tok, meta)
    return d


def brute_force(model_dir, texts, max_length, layers=1, dim=8):
    """A plain HF forward: the masked mean of hidden_states[layers] over each text's tokens, first dims."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok, bert = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = bert(**batch, output_hidden_states=True).hidden_states[layers][..., :dim]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return ((states * mask).sum(1) / mask.sum(1)).numpy()


def test_dense_mining_at_demi_is_a_brute_force_search_of_demi_embeddings(tmp_path, collection, dense_model):
    cfg = load_config(config(tmp_path, collection))
    out = tmp_path / "dense.jsonl.gz"
    settings = MineSettings(
        split="dev",
        retriever=str(dense_model),
        size="demi",
        depth=10,
        negatives=4,
        skip_top=1,
        out=str(out),
        shard_rows=64,
        batch_size=16,
        device="cpu",
        progress=False,
    )
    mine(cfg, settings)
    ids, texts = map(list, zip(*iter_corpus(str(collection))))
    dev = load_split("dev", str(collection))
    qids = sorted(dev.qrels)
    scores = brute_force(dense_model, [dev.queries[q] for q in qids], 16) @ brute_force(dense_model, texts, 48).T
    got = {r["query_id"]: r["negative_document_ids"] for r in rows(out)}
    assert sorted(got) == qids
    for i, qid in enumerate(qids):
        order = np.argsort(-scores[i], kind="stable")[:10]
        gaps = -np.diff(scores[i][order])
        assert gaps.min() > 1e-5 * abs(scores[i][order]).max(), "near-tied scores: the comparison would be fragile"
        expected = [ids[j] for j in order if ids[j] not in dev.qrels[qid]][1:5]
        assert got[qid] == expected, qid
    assert not out.with_name(out.name + ".parts").exists()  # cleaned up once the groups are written


def test_dense_mining_resumes_from_finished_blocks_and_refuses_other_settings(
    tmp_path, collection, dense_model, monkeypatch
):
    from retrieval.model import StarbucksModel

    cfg = load_config(config(tmp_path, collection))
    out = tmp_path / "dense.jsonl"
    settings = MineSettings(
        split="dev",
        retriever=str(dense_model),
        size="demi",
        depth=10,
        negatives=4,
        out=str(out),
        shard_rows=100,
        batch_size=32,
        device="cpu",
        progress=False,
    )
    mine(cfg, settings)
    reference = out.read_text()
    parts = out.with_name(out.name + ".parts")
    encoded = []
    original = StarbucksModel.embed_texts

    def embed_and_die(self, texts, sizes, kind, *args, **kwargs):
        encoded.append((kind, len(texts)))
        if kind == "passage" and sum(n for k, n in encoded if k == "passage") > 100:
            raise KeyboardInterrupt  # killed while encoding the second block
        return original(self, texts, sizes, kind, *args, **kwargs)

    monkeypatch.setattr(StarbucksModel, "embed_texts", embed_and_die)
    out.unlink()
    with pytest.raises(KeyboardInterrupt):
        mine(cfg, settings)
    assert sorted(p.name for p in parts.glob("topk-*")) == ["topk-00000.npz"] and not out.exists()
    with pytest.raises(Exception, match="other settings \\(depth\\)"):
        mine(cfg, MineSettings(**{**settings.__dict__, "depth": 20}))

    def embed_and_count(self, texts, sizes, kind, *args, **kwargs):
        encoded.append((kind, len(texts)))
        return original(self, texts, sizes, kind, *args, **kwargs)

    encoded.clear()
    monkeypatch.setattr(StarbucksModel, "embed_texts", embed_and_count)
    mine(cfg, settings)  # the resumed run encodes only the unfinished blocks and gives the same groups
    assert sum(n for kind, n in encoded if kind == "passage") == 200
    assert out.read_text() == reference


def test_groups_load_in_train_and_a_step_runs(tmp_path, collection, dense_model):
    from train.finetune import run_training

    cfg = load_config(config(tmp_path, collection))
    out = tmp_path / "bm25.jsonl.gz"
    mine(cfg, MineSettings(split="dev", depth=20, negatives=3, out=str(out), progress=False))
    groups = load_train_groups(str(out), str(collection))
    assert groups and all(1 <= len(g.negatives) <= 3 for g in groups)
    train_cfg = load_config(
        config(
            tmp_path,
            collection,
            model={"name_or_path": str(dense_model), "pooling": "mean", "normalize": False, "passage_max_length": 48},
            train={"max_steps": 1, "batch_size": 4, "group_size": 3, "save_steps": 10},
        ),
        [f"data.train={out}", "sizes=[1x8,4x32]"],
    )
    result = run_training(train_cfg)
    assert result.steps == 1


def test_a_size_the_model_lacks_is_one_line(tmp_path, collection, dense_model, capsys):
    cfg = config(tmp_path, collection)
    for size, message in [("8x32", "asks for 8 layers"), ("venti", "unknown size 'venti'")]:
        with pytest.raises(SystemExit) as err:
            main(
                [
                    "--config",
                    str(cfg),
                    "--split",
                    "dev",
                    "--retriever",
                    str(dense_model),
                    "--size",
                    size,
                    "--device",
                    "cpu",
                    "--no-progress",
                ]
            )
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and message in lines[-1] and lines[-1].startswith("error:"), lines
