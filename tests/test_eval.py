"""Eval: ir_measures metrics against pytrec_eval on the real MS MARCO / DL19 qrels, tables, comparisons."""

import json
import random

import numpy as np
import pytest

from eval import compare_experiments, evaluate, evaluate_experiment, paired_ttest, parse_measures
from eval.__main__ import main as eval_main
from retrieval.config import load_config
from retrieval.data import read_qrels_file
from retrieval.errors import StarbucksError
from retrieval.evalfile import per_query_path, read_split
from retrieval.runfile import run_path, write_run
from retrieval.sizes import Size

pytrec_eval = pytest.importorskip("pytrec_eval")


def synthetic_run(qrels, depth, seed, skip_every=0):
    """Per query: its judged passages (relevant or not) mixed with unjudged ones, distinct random scores."""
    rng = random.Random(seed)
    run = {}
    for i, (qid, judged) in enumerate(sorted(qrels.items())):
        if skip_every and i % skip_every == 0:
            continue  # unanswered query: counts 0
        docs = list(judged)[: depth // 2] + [f"x{qid}-{j}" for j in range(depth - min(len(judged), depth // 2))]
        scores = rng.sample(range(10 * depth), len(docs))
        run[qid] = {d: s / 7.0 for d, s in zip(docs, scores)}
    return run


def pytrec_reference(run, qrels, level):
    """RR@10, nDCG@10 and R@1000 from pytrec_eval, averaged over every judged query (missing: 0)."""

    def top(docs, k):
        return dict(sorted(docs.items(), key=lambda kv: -kv[1])[:k])

    ev = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut.10", "recall.1000"}, relevance_level=level)
    full = ev.evaluate({q: top(d, 1000) for q, d in run.items()})
    rr = ev.evaluate({q: top(d, 10) for q, d in run.items()})  # trec_eval's recip_rank has no cutoff
    per_query = {
        "RR@10": {q: rr.get(q, {}).get("recip_rank", 0.0) for q in qrels},
        "nDCG@10": {q: full.get(q, {}).get("ndcg_cut_10", 0.0) for q in qrels},
        "R@1000": {q: full.get(q, {}).get("recall_1000", 0.0) for q in qrels},
    }
    return per_query, {m: float(np.mean(list(v.values()))) for m, v in per_query.items()}


@pytest.mark.parametrize(
    "qrels_file, level, depth, skip_every",
    [
        ("qrels.dl19-passage.txt", 2, 1500, 0),
        ("qrels.dl20-passage.txt", 2, 1200, 9),
        ("qrels.msmarco-passage.dev-subset.txt", 1, 60, 50),
    ],
)
def test_metrics_equal_pytrec_eval_on_real_qrels(msmarco_qrels_dir, qrels_file, level, depth, skip_every):
    qrels = read_qrels_file(msmarco_qrels_dir / qrels_file)
    run = synthetic_run(qrels, depth, seed=len(qrels), skip_every=skip_every)
    got = evaluate(run, qrels, ["RR@10", "nDCG@10", "R@1000"], rel_level=level)
    want_per_query, want = pytrec_reference(run, qrels, level)
    assert got.queries == len(qrels)
    for m in want:
        assert got.aggregate[m] == pytest.approx(want[m], abs=1e-9)
        assert max(abs(got.per_query[m][q] - want_per_query[m][q]) for q in qrels) <= 1e-9
    assert 0 < got.aggregate["RR@10"] < 1 and 0 < got.aggregate["R@1000"] < 1


def test_dl_relevance_level_by_hand():
    qrels = {"q1": {"a": 1, "b": 2, "c": 0}, "q2": {"d": 3}}
    run = {"q1": {"a": 3.0, "c": 2.0, "b": 1.0}}  # q2 unanswered
    one = evaluate(run, qrels, ["RR@10", "R@2", "nDCG@10"], rel_level=1)
    two = evaluate(run, qrels, ["RR@10", "R@2", "nDCG@10"], rel_level=2)
    assert one.per_query["RR@10"] == {"q1": 1.0, "q2": 0.0} and one.aggregate["RR@10"] == 0.5
    assert two.per_query["RR@10"]["q1"] == pytest.approx(1 / 3)
    assert one.per_query["R@2"]["q1"] == 0.5 and two.per_query["R@2"]["q1"] == 0.0
    # nDCG is graded, the same at both levels: gains 1, 0, 2 at ranks 1..3; ideal 2, 1
    dcg = 1 + 0 + 2 / np.log2(4)
    ideal = 2 + 1 / np.log2(3)
    assert one.per_query["nDCG@10"]["q1"] == pytest.approx(dcg / ideal) == two.per_query["nDCG@10"]["q1"]


def test_parse_measures_applies_rel_level_to_binary_measures_only():
    m = parse_measures(["RR@10", "nDCG@10", "R@1000", "P(rel=3)@5"], rel_level=2)
    assert [str(x) for x in m.values()] == ["RR(rel=2)@10", "nDCG@10", "R(rel=2)@1000", "P(rel=3)@5"]
    with pytest.raises(StarbucksError, match="unknown metric 'Foo@10'"):
        parse_measures(["Foo@10"])
    with pytest.raises(StarbucksError, match="same measure"):
        parse_measures(["RR@10", "RR(rel=2)@10"], rel_level=2)


def test_paired_ttest_matches_scipy():
    from scipy.stats import ttest_rel

    a = {f"q{i}": v for i, v in enumerate([0.1, 0.5, 0.3, 0.9, 0.4, 0.2])}
    b = {f"q{i}": v for i, v in enumerate([0.2, 0.6, 0.2, 1.0, 0.6, 0.3])}
    assert paired_ttest(a, b) == pytest.approx(ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert paired_ttest(a, dict(a)) == 1.0
    assert paired_ttest(a, {q: v + 0.25 for q, v in a.items()}) == 0.0  # every query better by the same amount


# ---------------------------------------------------------------- experiments on disk

QRELS = {f"q{i}": {f"d{i}": 1} for i in range(30)}


def write_collection(root):
    """A BEIR directory holding only queries and dev/test qrels (eval needs no corpus)."""
    (root / "qrels").mkdir(parents=True)
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": q}) + "\n" for q in QRELS))
    for split in ("dev", "test"):
        rows = "".join(f"{q}\t{d}\t{r}\n" for q, docs in QRELS.items() for d, r in docs.items())
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


def write_runs(exp, split, sizes, rank_of):
    """Run files where query i's relevant passage sits at rank `rank_of(size, i)`."""
    for name, layers, dim in sizes:
        path = run_path(exp / "runs", split, name)
        rankings = []
        for i in range(30):
            docs = [f"x{j}" for j in range(10)]
            docs.insert(rank_of(layers, i) - 1, f"d{i}")
            rankings.append((f"q{i}", [(d, 100.0 - r) for r, d in enumerate(docs)]))
        write_run(path, rankings, "t")
        path.with_suffix(".json").write_text(json.dumps({"size": name, "layers": layers, "dim": dim}))


SIZES = [("venti", 5, 256), ("demi", 1, 32)]


def eval_config(tmp_path, exp, *overrides):
    col = write_collection(tmp_path / "col") if not (tmp_path / "col").exists() else tmp_path / "col"
    cfg = load_config(None, [f"output_dir={exp}", "name=exp", "eval.metrics=[RR@10,R@5]", *overrides])
    cfg.data.eval_splits = {"dev": str(col), "test": str(col)}
    return cfg


def test_evaluate_experiment_writes_tables_and_plot(tmp_path, capsys):
    exp = tmp_path / "exp"
    write_runs(exp, "dev", SIZES, lambda layers, i: 1 if layers == 5 else 2 + i % 5)
    results = evaluate_experiment(eval_config(tmp_path, exp))
    assert list(results) == ["dev"]  # test has no run files
    demi, venti = results["dev"]
    assert (demi.size.name, venti.size.name) == ("demi", "venti")
    assert venti.evaluation.aggregate == {"RR@10": 1.0, "R@5": 1.0}
    ranks = [2 + i % 5 for i in range(30)]
    assert demi.evaluation.aggregate["RR@10"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert demi.evaluation.aggregate["R@5"] == pytest.approx(np.mean([r <= 5 for r in ranks]))
    out = capsys.readouterr().out
    assert out.index("demi (1x32)") < out.index("venti (5x256)")
    saved = json.loads((exp / "eval" / "dev.json").read_text())
    assert [s["size"] for s in saved["sizes"]] == ["demi", "venti"] and saved["queries"] == 30
    assert (exp / "eval" / "dev.csv").read_text().splitlines()[0] == "size,layers,dim,RR@10,R@5"
    assert "| venti (5x256) | 1.0000 | 1.0000 |" in (exp / "eval" / "dev.md").read_text()
    assert (exp / "eval" / "dev.png").read_bytes()[:4] == b"\x89PNG"
    only = evaluate_experiment(eval_config(tmp_path, exp, "eval.sizes=5x256", "eval.plot=false"))
    assert [r.size.name for r in only["dev"]] == ["venti"]
    with pytest.raises(StarbucksError, match="no run file for size 'grande'"):
        evaluate_experiment(eval_config(tmp_path, exp, "encode.sizes=grande"))


def test_eval_writes_the_per_query_values(tmp_path):
    exp = tmp_path / "exp"
    write_runs(exp, "dev", SIZES, lambda layers, i: 1 if layers == 5 else 2 + i % 5)
    evaluate_experiment(eval_config(tmp_path, exp, "eval.plot=false"))
    demi, venti = read_split(exp / "eval", "dev")
    assert (demi.size, venti.size) == (Size("demi", 1, 32), Size("venti", 5, 256))
    assert demi.run == run_path(exp / "runs", "dev", "demi")
    assert demi.evaluation.per_query["RR@10"] == {f"q{i}": 1 / (2 + i % 5) for i in range(30)}  # by hand
    assert demi.evaluation.per_query["R@5"] == {f"q{i}": float(2 + i % 5 <= 5) for i in range(30)}
    assert venti.evaluation.per_query == {"RR@10": dict.fromkeys(QRELS, 1.0), "R@5": dict.fromkeys(QRELS, 1.0)}
    assert venti.evaluation.aggregate == {"RR@10": 1.0, "R@5": 1.0}
    first = per_query_path(exp / "eval", "dev").read_bytes()
    evaluate_experiment(eval_config(tmp_path, exp, "eval.plot=false"))
    assert per_query_path(exp / "eval", "dev").read_bytes() == first  # same values, same bytes
    assert read_split(exp / "eval", "test") is None  # eval wrote no test split


def test_split_rel_level_applies_to_its_split(tmp_path):
    exp = tmp_path / "exp"
    write_runs(exp, "dev", SIZES, lambda layers, i: 1)
    write_runs(exp, "test", SIZES, lambda layers, i: 1)
    results = evaluate_experiment(eval_config(tmp_path, exp, "eval.split_rel_level={test: 2}", "eval.plot=false"))
    assert results["dev"][0].evaluation.aggregate["RR@10"] == 1.0
    assert results["test"][0].evaluation.aggregate["RR@10"] == 0.0  # every judgment is 1 < 2


def test_compare_marks_significant_differences(tmp_path, capsys):
    good, same, bad = tmp_path / "good", tmp_path / "same", tmp_path / "bad"
    write_runs(good, "dev", SIZES, lambda layers, i: 1)
    write_runs(same, "dev", SIZES, lambda layers, i: 1)
    write_runs(bad, "dev", SIZES[:1], lambda layers, i: 3 + i % 4)
    cfg = eval_config(tmp_path, tmp_path / "report")
    report = compare_experiments(cfg, [good, same, bad])["dev"]
    assert report["baseline"] == "good"
    venti, demi = report["sizes"][1], report["sizes"][0]
    assert venti["results"]["same"]["RR@10"]["p"] == 1.0
    assert venti["results"]["bad"]["RR@10"]["p"] < 1e-6
    assert "bad" not in demi["results"]
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("venti"))
    assert row.split()[2:5] == ["1.0000", "1.0000", f"{np.mean([1 / (3 + i % 4) for i in range(30)]):.4f}*"]
    assert (tmp_path / "report" / "eval" / "compare-dev.png").is_file()
    with pytest.raises(StarbucksError, match="eval.baseline = 'nope'"):
        compare_experiments(eval_config(tmp_path, tmp_path / "r", "eval.baseline=nope"), [good, bad])


def test_cli_separates_experiment_dirs_from_overrides(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    write_runs(a, "dev", SIZES, lambda layers, i: 1)
    write_runs(b, "dev", SIZES, lambda layers, i: 2)
    col = write_collection(tmp_path / "col")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\ndata:\n  eval_splits: {{dev: {col}}}\n")
    eval_main(["--config", str(cfg), str(a), str(b), "eval.baseline=b", "eval.plot=false"])
    saved = json.loads((tmp_path / "out" / "eval" / "compare-dev.json").read_text())
    assert saved["baseline"] == "b" and list(saved["experiments"]) == ["a", "b"]
    with pytest.raises(SystemExit) as err:
        eval_main(["--config", str(cfg), str(tmp_path / "missing")])
    assert err.value.code == 2
