import gzip
import json

import pytest

from retrieval.data import (
    TrainGroup,
    iter_corpus,
    load_eval_splits,
    load_split,
    load_train_groups,
    read_qrels_file,
    read_queries_file,
    sample_negatives,
)
from retrieval.errors import StarbucksError


def write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


@pytest.fixture
def beir(tmp_path):
    """A small BEIR collection, gzipped corpus and queries."""
    d = tmp_path / "col"
    (d / "qrels").mkdir(parents=True)
    write_jsonl(
        d / "corpus.jsonl.gz",
        [
            {"_id": "d1", "text": "alpha passage"},
            {"_id": "d2", "title": "Beta", "text": "beta passage"},
            {"_id": "d3", "text": "gamma passage"},
        ],
        gz=True,
    )
    write_jsonl(
        d / "queries.jsonl.gz",
        [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "beta?"}, {"_id": "q3", "text": "gamma?"}],
        gz=True,
    )
    (d / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq3\td3\t2\n")
    return d


def test_beir_gz_corpus_and_splits(beir):
    assert list(iter_corpus(str(beir))) == [
        ("d1", "alpha passage"),
        ("d2", "Beta beta passage"),
        ("d3", "gamma passage"),
    ]
    splits = load_eval_splits({"dev": str(beir), "test": str(beir)})
    assert splits["dev"].queries == {"q1": "alpha?", "q2": "beta?"}  # only the split's judged queries
    assert splits["dev"].qrels == {"q1": {"d1": 1}, "q2": {"d2": 1}}
    assert splits["test"].qrels == {"q3": {"d3": 2}}
    with pytest.raises(StarbucksError, match="unknown eval split 'train'"):
        load_eval_splits({"dev": str(beir)}, "train")
    with pytest.raises(StarbucksError, match="no train.tsv.*available: \\['dev', 'test'\\]"):
        load_split("train", str(beir))


def test_real_msmarco_dev_topics_and_qrels(msmarco_qrels_dir):
    d = msmarco_qrels_dir
    split = load_split(
        "dev",
        {"queries": d / "topics.msmarco-passage.dev-subset.txt", "qrels": d / "qrels.msmarco-passage.dev-subset.txt"},
    )
    assert len(split.queries) == 6980
    assert sum(len(v) for v in split.qrels.values()) == 7437
    assert set(r for v in split.qrels.values() for r in v.values()) == {1}
    assert split.queries["1048585"] == "what is paula deen's brother"
    assert split.queries["2"] == "Androgen receptor define"  # leading space stripped


def test_real_dl19_dl20(msmarco_qrels_dir):
    d = msmarco_qrels_dir
    dl19 = load_split("dl19", {"queries": d / "topics.dl19-passage.txt", "qrels": d / "qrels.dl19-passage.txt"})
    assert len(dl19.queries) == 43 and len(dl19.qrels) == 43
    assert sum(len(v) for v in dl19.qrels.values()) == 9260
    assert set(r for v in dl19.qrels.values() for r in v.values()) == {0, 1, 2, 3}
    assert dl19.qrels["19335"]["1017759"] == 0
    topics20 = read_queries_file(d / "topics.dl20.txt")
    assert len(topics20) == 200 and not any(t.endswith("\r") for t in topics20.values())  # CRLF file
    dl20 = load_split("dl20", {"queries": d / "topics.dl20.txt", "qrels": d / "qrels.dl20-passage.txt"})
    assert len(dl20.queries) == 54 and sum(len(v) for v in dl20.qrels.values()) == 11386


def test_bad_input_is_one_clear_line(tmp_path, beir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n')
    with pytest.raises(StarbucksError, match="bad.jsonl line 2: not valid JSON"):
        list(iter_corpus(str(bad)))
    qrels = tmp_path / "q.txt"
    qrels.write_text("1 0 d1 1\n2 0 d2\n")
    with pytest.raises(StarbucksError, match="q.txt line 2: expected"):
        read_qrels_file(qrels)
    with pytest.raises(StarbucksError, match="not found"):
        list(iter_corpus(str(tmp_path / "nope.jsonl")))
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq9\td2\t1\n")
    with pytest.raises(StarbucksError, match="qrels name 1 queries that are not in its queries \\(first: 'q9'\\)"):
        load_split("dev", str(beir))


def test_train_groups_ids_only_and_inline(tmp_path, beir):
    ids = tmp_path / "train.jsonl"
    write_jsonl(
        ids,
        [{"query_id": "q1", "query": "alpha?", "positive_document_ids": ["d1"], "negative_document_ids": ["d2", "d3"]}],
    )
    [g] = load_train_groups(str(ids), str(beir))
    assert g == TrainGroup("q1", "alpha?", ["alpha passage"], ["Beta beta passage", "gamma passage"], ("d1",))
    inline = tmp_path / "inline.jsonl.gz"
    write_jsonl(
        inline,
        [
            {
                "query_id": "7",
                "query": "q",
                "positive_passages": [{"docid": "1", "title": "T", "text": "p"}],
                "negative_passages": [{"docid": "2", "title": "", "text": "n"}],
            }
        ],
        gz=True,
    )
    assert load_train_groups(str(inline)) == [TrainGroup("7", "q", ["T p"], ["n"], ("1",))]
    write_jsonl(ids, [{"query_id": "q1", "query": "a", "positive_document_ids": ["zz"]}])
    with pytest.raises(StarbucksError, match="train.jsonl line 1: document id 'zz' is not in the corpus"):
        load_train_groups(str(ids), str(beir))


def test_negatives_rotate_through_the_whole_list():
    g = TrainGroup("q", "q", ["p"], [f"n{i}" for i in range(7)])
    seen = [sample_negatives(g, 3, epoch, seed=1) for epoch in range(3)]
    flat = [n for s in seen for n in s]
    assert set(flat[:7]) == set(g.negatives)  # every negative used before any repeats
    assert sample_negatives(g, 3, 0, seed=1) == seen[0]  # deterministic
    assert len(sample_negatives(TrainGroup("q", "q", ["p"], ["a"]), 4, 0, 0)) == 4


@pytest.mark.parametrize("name", ["debian-pkgs-mini", "debian-pkgs"])
def test_shipped_collections_load_with_the_counts_of_their_readme(repo_root, name):
    """The project's loaders see exactly what data/<name>/stats.json (and its README) report."""
    root = repo_root / "data" / name
    stats = json.loads((root / "stats.json").read_text())
    corpus = dict(iter_corpus(str(root)))
    assert len(corpus) == stats["passages"]
    splits = load_eval_splits({s: str(root) for s in ("train", "dev", "test")})
    assert {s: len(sp.queries) for s, sp in splits.items()} == stats["queries"]
    for sp in splits.values():  # exactly one relevant passage per query, present in the corpus
        assert all(len(docs) == 1 and next(iter(docs)) in corpus for docs in sp.qrels.values())
    assert not set(splits["dev"].queries) & set(splits["test"].queries)
    groups = load_train_groups(str(root / "train.jsonl.gz"), str(root))
    assert len(groups) == stats["train_groups"] == stats["queries"]["train"]
    assert {len(g.negatives) for g in groups} <= set(
        range(stats["negatives_per_group"]["min"], stats["negatives_per_group"]["max"] + 1)
    )
    g = groups[0]
    assert g.positives == [corpus[next(iter(splits["train"].qrels[g.query_id]))]]
    assert g.query == splits["train"].queries[g.query_id] and g.positives[0] not in g.negatives
