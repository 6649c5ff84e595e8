"""`python -m eval.suite`: two tiny BEIR collections x two tiny models against per-collection runs of the
stages and pytrec_eval; the average row; reuse of finished work; refusals."""

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from scipy.stats import ttest_rel

from conftest import REPO, beir_slice, tiny_bert
from eval.suite import main, parse_collection, parse_model
from retrieval.data import iter_corpus, load_split
from retrieval.runfile import read_run, read_run_record
from retrieval.store import PASSAGE_FIELDS

SIZES = ["1x8", "2x16", "4x32"]
DEPTH = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    from retrieval.checkpoint import resolve_model_path, save_encoder
    from retrieval.encoder import StarbucksEncoder

    root = tmp_path_factory.mktemp("suite")
    cols = {
        "pkgs": beir_slice(REPO / "data" / "debian-pkgs-mini", root / "pkgs", "dev", 8, 40),
        "docs": beir_slice(REPO / "data" / "python-docs", root / "docs", "test", 8, 40, skip=100),
    }
    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    models = {"a": root / "a" / "model", "b": root / "b" / "model"}
    lengths = {"query_max_length": 16, "passage_max_length": 48}
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=0), "cls"), models["a"], tok, lengths
    )
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=1), "mean", normalize=True),
        models["b"],
        tok,
        lengths,
    )
    out = root / "out"
    args = [
        "--models",
        *(f"{n}={p}" for n, p in models.items()),
        "--collections",
        *(f"{n}={p}" for n, p in cols.items()),
        "--sizes",
        ",".join(SIZES),
        "--metrics",
        "nDCG@10",
        "RR@10",
        "--depth",
        str(DEPTH),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "16",
    ]
    report = main(args)
    return root, cols, models, out, args, report


def stage_run(root: Path, model: Path, col: Path, name: str) -> Path:
    """The four stages' way: encode, search and eval of one model on one collection (zero-shot config)."""
    from encode.pipeline import encode_collection
    from eval.pipeline import evaluate_experiment
    from retrieval.config import load_config
    from search.pipeline import search_collection

    (root / f"{name}.yaml").write_text(f"""
name: {name}
output_dir: {root / name}
model: {{name_or_path: {model}}}
sizes: {json.dumps(SIZES)}
data: {{corpus: {col}, eval_splits: {{test: {col}}}}}
encode: {{model: {model}, batch_size: 16}}
search: {{depth: {DEPTH}, index: Flat}}
eval: {{metrics: [nDCG@10, RR@10], plot: false}}
""")
    cfg = load_config(root / f"{name}.yaml")
    encode_collection(cfg, progress=False)
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)
    return root / name


def pytrec(run: dict, qrels: dict, measure: str) -> dict[str, float]:
    values = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(run)
    return {q: values.get(q, {}).get(measure, 0.0) for q in qrels}


def test_suite_equals_the_stages_and_pytrec_eval(setup):
    root, cols, models, out, _, report = setup
    for m, model in models.items():
        for c, col in cols.items():
            stage = stage_run(root, model, col, f"stage-{m}-{c}")
            evaluated = {
                s["size"]: s["metrics"] for s in json.loads((stage / "eval" / "test.json").read_text())["sizes"]
            }
            qrels = load_split("test", str(col)).qrels
            for size in SIZES:
                mine = read_run(out / m / c / "runs" / "test" / f"{size}.trec")
                theirs = read_run(stage / "runs" / "test" / f"{size}.trec")
                assert {q: list(r) for q, r in mine.items()} == {q: list(r) for q, r in theirs.items()}
                records = [read_run_record(d / "runs" / "test" / f"{size}.trec") for d in (out / m / c, stage)]
                assert records[0]["passages"] == records[1]["passages"]  # every PASSAGE_FIELDS entry, one loop
                assert set(records[0]["passages"]) == set(PASSAGE_FIELDS)
                assert records[0]["queries"] == records[1]["queries"]
                ndcg = pytrec(mine, qrels, "ndcg_cut_10")
                rr = pytrec(
                    {q: dict(sorted(r.items(), key=lambda x: -x[1])[:10]) for q, r in mine.items()}, qrels, "recip_rank"
                )
                cell = report["tables"][m]
                assert cell["nDCG@10"][c][size] == pytest.approx(np.mean(list(ndcg.values())), abs=1e-9)
                assert cell["RR@10"][c][size] == pytest.approx(np.mean(list(rr.values())), abs=1e-9)
                assert cell["nDCG@10"][c][size] == pytest.approx(evaluated[size]["nDCG@10"], abs=1e-12)


def test_average_row_and_t_tests(setup):
    _, cols, models, out, _, report = setup
    for m in models:
        for measure in ("nDCG@10", "RR@10"):
            table = report["tables"][m][measure]
            for size in SIZES:
                assert table["average"][size] == pytest.approx(np.mean([table[c][size] for c in cols]), abs=1e-12)
    for c, col in cols.items():
        qrels = load_split("test", str(col)).qrels
        for size in SIZES:
            a, b = (
                pytrec(read_run(out / m / c / "runs" / "test" / f"{size}.trec"), qrels, "ndcg_cut_10") for m in "ab"
            )
            entry = report["comparison"]["nDCG@10"][c][size]
            assert entry["a"]["p"] is None
            qids = sorted(qrels)
            x, y = [a[q] for q in qids], [b[q] for q in qids]
            expected = 1.0 if np.allclose(x, y) else ttest_rel(x, y).pvalue
            assert entry["b"]["p"] == pytest.approx(expected, rel=1e-9)
    from retrieval.evalfile import read_split  # each cell in eval's format, per-query values included

    cell = read_split(out / "b" / "docs" / "eval", "test")
    assert [c.size.key for c in cell] == SIZES
    assert cell[1].evaluation.aggregate == pytest.approx(
        {m: report["tables"]["b"][m]["docs"]["2x16"] for m in ("nDCG@10", "RR@10")}, abs=1e-12
    )
    md = (out / "suite.md").read_text()
    assert "## a: nDCG@10" in md and "| average |" in md and "models compared: nDCG@10" in md
    assert (out / "suite.png").stat().st_size > 0 and (out / "suite.csv").read_text().startswith("model,collection")


def test_a_second_run_reuses_everything(setup, monkeypatch):
    from retrieval.model import StarbucksModel

    _, _, _, out, args, report = setup
    runs = sorted(out.rglob("*.trec"))
    stamps = [p.stat().st_mtime_ns for p in runs]

    def refuse(*_a, **_k):
        raise AssertionError("encoded again")

    monkeypatch.setattr(StarbucksModel, "embed_texts", refuse)
    assert main(args) == report
    assert [p.stat().st_mtime_ns for p in runs] == stamps  # not searched again either


def one_size_args(model, col, out) -> list[str]:
    """The suite on one model (`a`) and one copied collection (`pkgs`) at size 1x8."""
    return ["--models", f"a={model}", "--collections", f"pkgs={col}", "--sizes", "1x8", "--out", str(out),
            "--device", "cpu", "--depth", str(DEPTH)]  # fmt: skip


def test_an_edited_passage_is_encoded_and_searched_again(setup, tmp_path):
    import shutil

    _, cols, models, *_ = setup
    col = shutil.copytree(cols["pkgs"], tmp_path / "pkgs")
    args = one_size_args(models["a"], col, tmp_path / "out")
    first = main(args)
    shard = tmp_path / "out" / "a" / "pkgs" / "embeddings" / "1x8" / "shard-00000.npy"
    run_file = tmp_path / "out" / "a" / "pkgs" / "runs" / "test" / "1x8.trec"
    before, searched = np.load(shard), read_run_record(run_file)["passages"]["texts_sha256"]
    rows = [json.loads(line) for line in gzip.open(col / "corpus.jsonl.gz", "rt")]
    relevant = next(iter(load_split("test", str(col)).qrels.values()))
    edited = next(i for i, r in enumerate(rows) if r["_id"] in relevant)
    rows[edited]["text"] = "a completely different passage about nothing in particular"
    with gzip.open(col / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    second = main(args)
    after = np.load(shard)
    assert not np.array_equal(before[edited], after[edited])  # re-encoded ...
    np.testing.assert_array_equal(np.delete(before, edited, 0), np.delete(after, edited, 0))  # ... the same elsewhere
    meta = json.loads((shard.parent / "meta.json").read_text())
    assert read_run_record(run_file)["passages"]["texts_sha256"] == meta["texts_sha256"] != searched  # searched again
    qrels = load_split("test", str(col)).qrels
    assert second["tables"]["a"]["nDCG@10"]["pkgs"]["1x8"] == pytest.approx(
        np.mean(list(pytrec(read_run(run_file), qrels, "ndcg_cut_10").values())), abs=1e-9
    )
    assert first["collections"] == second["collections"]


def test_a_store_encoded_from_other_passages_is_refused_as_encode_refuses_it(setup, tmp_path, capsys):
    """The suite runs the encode stage's loop (`retrieval.ranking.encode_passages`): a shard whose ids are not
    its corpus block any more (a passage renamed since) is refused in one line, not silently re-encoded."""
    import shutil

    _, cols, models, *_ = setup
    col = shutil.copytree(cols["pkgs"], tmp_path / "pkgs")
    args = one_size_args(models["a"], col, tmp_path / "out")
    main(args)
    store = tmp_path / "out" / "a" / "pkgs" / "embeddings" / "1x8"
    kept = {p.name: p.read_bytes() for p in store.iterdir()}
    rows = [json.loads(line) for line in gzip.open(col / "corpus.jsonl.gz", "rt")]
    judged = {d for judged in load_split("test", str(col)).qrels.values() for d in judged}
    renamed = next(r for r in rows if r["_id"] not in judged)
    renamed["_id"] = "renamed-passage"
    with gzip.open(col / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    assert f"{store / 'ids-00000.txt'} lists other passages than block 0 of the corpus" in err[-1]
    assert f"delete {store} and re-encode" in err[-1]
    assert {p.name: p.read_bytes() for p in store.iterdir()} == kept  # nothing overwritten


def test_qrels_naming_passages_missing_from_the_corpus_are_refused(setup, tmp_path, capsys):
    root, cols, models, *_ = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ("corpus.jsonl.gz", "queries.jsonl"):
        (bad / f).write_bytes((cols["pkgs"] / f).read_bytes())
    (bad / "qrels").mkdir()
    qrels = (cols["pkgs"] / "qrels" / "test.tsv").read_text().splitlines()
    qrels[1] = qrels[1].split("\t")[0] + "\tno-such-passage\t1"
    (bad / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["--models", str(models["a"]), "--collections", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "judge 1 of" in err and "'no-such-passage'" in err and "not in its corpus" in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_collection_and_model_specs(tmp_path):
    assert parse_collection("irds:beir/scifact/test") == parse_collection("irds:beir/scifact/test", "dev")
    c = parse_collection("irds:beir/webis-touche2020/v2")
    assert (c.name, c.split) == ("webis-touche2020-v2", "test")
    assert parse_collection({"name": "x", "source": "irds:beir/fiqa/dev"}).split == "dev"
    assert parse_collection(f"docs={tmp_path}", "dev") == parse_collection(
        {"name": "docs", "source": str(tmp_path)}, "dev"
    )
    assert parse_model("runs/srl/model").name == "srl" and parse_model("m=runs/x").name == "m"
    with pytest.raises(Exception, match="neither a BEIR directory nor irds"):
        parse_collection(str(tmp_path / "missing"))


@pytest.mark.parametrize("suite", ["beir", "offline"])
def test_suite_files_parse(suite):
    from eval.suite import read_suite_file

    data = read_suite_file(REPO / "configs" / "suites" / f"{suite}.yaml")
    collections = [parse_collection(c, data.get("split", "test")) for c in data["collections"]]
    if suite == "beir":
        assert len(collections) == 12 and all(c.source.startswith("irds:beir/") for c in collections)
    else:
        assert [c.name for c in collections] == ["python-docs"]


def test_a_suite_cell_is_a_run_directory_for_the_size_chooser(setup):
    from eval.sizes import main as choose

    _, cols, _, out, _, report = setup
    best = choose(
        [
            str(out / "b" / "docs"),
            "--queries",
            str(cols["docs"]),
            "--passages",
            "8",
            "--query-sample",
            "2",
            "--device",
            "cpu",
            "--max-bytes",
            "1000",
        ]
    )
    chosen = json.loads((out / "b" / "docs" / "eval" / "sizes-test.json").read_text())
    assert {s["size"]: s["quality"] for s in chosen["sizes"]} == report["tables"]["b"]["nDCG@10"]["docs"]
    assert best.quality == max(report["tables"]["b"]["nDCG@10"]["docs"].values())


def test_a_plain_model_needs_its_pooling(setup, tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    from retrieval.checkpoint import resolve_model_path

    _, cols, _, _, _, _ = setup
    plain = tmp_path / "plain"  # long enough for the default passage length (196 tokens)
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=256,
        )
    ).save_pretrained(plain)
    AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")).save_pretrained(plain)
    args = [
        "--models",
        f"plain={plain}",
        "--collections",
        str(cols["pkgs"]),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit):
        main(args)
    assert "pooling is unknown" in capsys.readouterr().err
    report = main([*args, "--pooling", "mean", "--sizes", "1x8,2x16"])
    assert list(report["tables"]["plain"]["nDCG@10"]["pkgs"]) == ["1x8", "2x16"]


def self_hit_collection(source: Path, out: Path, queries: int = 6) -> Path:
    """An ArguAna-like collection: each query is also a corpus passage under the query's own id (its
    text, so it ranks itself first), while the passage judged relevant to it is another one (the same
    words and a few more: it ranks near the top)."""
    passages = [(d, t) for d, t in itertools.islice(iter_corpus(str(source)), 40)]
    (out / "qrels").mkdir(parents=True)
    texts = [" ".join(t.split()[:6]) for _, t in passages[:queries]]  # short: the same tokens as query and passage
    corpus = [{"_id": d, "text": t} for d, t in passages[queries:]]
    corpus += [{"_id": f"arg-{i}", "text": text} for i, text in enumerate(texts)]
    corpus += [{"_id": f"rel-{i}", "text": f"{text} {passages[i][1].split()[6]}"} for i, text in enumerate(texts)]
    (out / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (out / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"arg-{i}", "text": text}) + "\n" for i, text in enumerate(texts))
    )
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"arg-{i}\trel-{i}\t1\n" for i in range(queries))
    )
    return out


def test_beir_identical_id_rule_drops_self_hits_per_collection(setup, tmp_path):
    _, _, models, *_ = setup
    col = self_hit_collection(REPO / "data" / "debian-pkgs-mini", tmp_path / "args")
    qrels = load_split("test", str(col)).qrels
    base = [
        "--models",
        f"b={models['b']}",
        "--sizes",
        "2x16",
        "--depth",
        str(DEPTH),
        "--device",
        "cpu",
        "--metrics",
        "nDCG@10",
    ]
    kept = main([*base, "--collections", f"args={col}", "--out", str(tmp_path / "kept")])
    dropped = main(
        [*base, "--collections", f"args={col}", "--ignore-identical-ids", "--out", str(tmp_path / "dropped")]
    )
    with_self = read_run(tmp_path / "kept" / "b" / "args" / "runs" / "test" / "2x16.trec")
    without = read_run(tmp_path / "dropped" / "b" / "args" / "runs" / "test" / "2x16.trec")
    # the self-hit is each query's first passage (a normalised model: the same text, cosine 1) ...
    assert all(max(r, key=r.get) == q for q, r in with_self.items())

    # ... and the rule leaves it out and still ranks `depth` passages: the run without it, one deeper
    def ranked(run: dict) -> list[str]:
        return sorted(run, key=lambda d: -run[d])

    for q, r in without.items():
        assert q not in r and len(r) == DEPTH
        assert ranked(r)[: DEPTH - 1] == [d for d in ranked(with_self[q]) if d != q]
    expect_dropped = np.mean(
        list(
            pytrec(
                {q: {d: s for d, s in r.items() if d != q} for q, r in with_self.items()}, qrels, "ndcg_cut_10"
            ).values()
        )
    )
    expect_kept = np.mean(list(pytrec(with_self, qrels, "ndcg_cut_10").values()))
    assert dropped["tables"]["b"]["nDCG@10"]["args"]["2x16"] == pytest.approx(expect_dropped, abs=1e-9)
    assert kept["tables"]["b"]["nDCG@10"]["args"]["2x16"] == pytest.approx(expect_kept, abs=1e-9)
    assert expect_kept < expect_dropped  # the self-hit pushed each relevant passage down a rank
    # recorded: the run record, the report, the page
    assert read_run_record(tmp_path / "dropped" / "b" / "args" / "runs" / "test" / "2x16.trec")["ignore_identical_ids"]
    assert not read_run_record(tmp_path / "kept" / "b" / "args" / "runs" / "test" / "2x16.trec")["ignore_identical_ids"]
    assert (
        dropped["collections"]["args"]["ignore_identical_ids"]
        and not kept["collections"]["args"]["ignore_identical_ids"]
    )
    assert "Self-hits dropped" in (tmp_path / "dropped" / "suite.md").read_text()
    assert "Self-hits dropped" not in (tmp_path / "kept" / "suite.md").read_text()


def test_the_beir_suite_drops_self_hits_where_beir_does():
    from eval.suite import read_suite_file

    data = read_suite_file(REPO / "configs" / "suites" / "beir.yaml")
    flagged = {c.name for c in (parse_collection(c) for c in data["collections"]) if c.ignore_identical_ids}
    assert flagged == {"arguana", "quora"}
    assert not parse_collection("irds:beir/scifact/test").ignore_identical_ids  # off by default
    with pytest.raises(Exception, match="ignore_identical_ids must be true or false"):
        parse_collection({"source": "irds:beir/quora/test", "ignore_identical_ids": "yes"})
    with pytest.raises(Exception, match="unknown key 'ignore_identical_id'"):
        parse_collection({"source": "irds:beir/quora/test", "ignore_identical_id": True})
