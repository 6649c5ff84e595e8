"""`python -m experiment` end to end with a tiny random BERT: every method of the paper's comparison
is trained, encoded, searched and evaluated, and the report's numbers are checked against
pytrec_eval and scipy on the run files; a second invocation redoes nothing."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import numpy as np
import pytest
import pytrec_eval
from scipy.stats import ttest_rel

from conftest import REPO, beir_slice, mini_slice, save_tiny_backbone
from experiment.__main__ import main
from experiment.pipeline import plan_runs
from retrieval.config import load_config
from retrieval.runfile import read_run


def per_query(qrels, run: dict, measure: str) -> dict[str, float]:
    """pytrec_eval's per-query values (recip_rank / ndcg_cut_10) of a run cut at rank 10."""
    top = {q: dict(sorted(docs.items(), key=lambda x: -x[1])[:10]) for q, docs in run.items()}
    out = pytrec_eval.RelevanceEvaluator(qrels, {measure}).evaluate(top)
    key = "ndcg_cut_10" if measure == "ndcg_cut.10" else measure
    return {q: out[q][key] if q in out else 0.0 for q in qrels}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    col, qids, dev = mini_slice(root / "col", queries=16, passages=200)
    shutil.copyfile(col / "qrels" / "dev.tsv", col / "qrels" / "test.tsv")
    save_tiny_backbone(root / "backbone", layers=4, hidden=32)
    docs = beir_slice(REPO / "data" / "python-docs", root / "docs", "test", queries=8, passages=40)
    (root / "suite.yaml").write_text(f"collections: [{{name: docs, source: {docs}}}]\nmetrics: [nDCG@10]\ndepth: 20\n")
    config = root / "exp.yaml"
    config.write_text(f"""
name: tiny
output_dir: {root / "runs"}
model: {{name_or_path: {root / "backbone"}, pooling: cls, normalize: false, query_max_length: 16, passage_max_length: 48}}
sizes: [{{name: a, layers: 1, dim: 8}}, {{name: b, layers: 2, dim: 16}}, {{name: c, layers: 4, dim: 32}}]
data: {{corpus: {col}, train: {col / "train.jsonl"}, eval_splits: {{dev: {col}, test: {col}}}}}
train: {{batch_size: 4, group_size: 2, max_steps: 2, save_steps: 2, learning_rate: 1.0e-3, temperature: 1.0}}
encode: {{batch_size: 32}}
search: {{depth: 20}}
eval: {{metrics: [RR@10, nDCG@10], plot: false}}
experiment:
  report_dir: {root / "report"}
  run_depth: 20
  grid_run_depth: 10
  smae: [pretrain.text={col / "corpus.jsonl.gz"}, pretrain.max_length=32, train.max_steps=2, train.batch_size=2]
  suite: {root / "suite.yaml"}
""")
    main(["--config", str(config)])
    qrels = {q: dev.qrels[q] for q in qids}
    return root, config, qrels


def test_plan_covers_every_method_with_identical_settings(finished):
    root, config, _ = finished
    cfg = load_config(config)
    runs = {r.name: r for r in plan_runs(cfg)}
    assert list(runs) == [
        "zeroshot",
        "full",
        "separate-a",
        "separate-b",
        "separate-c",
        "2dmse",
        "srl",
        "srl-matched",
        "srl-nokl",
        "smae",
        "smae-srl",
        "srl-depth",
        "srl-width",
        "hybrid",
    ]
    assert len(runs["srl"].sizes) == 4 * 3  # the whole grid: layers 1..4 x dims 8, 16, 32
    assert sorted((s.layers, s.dim) for s in runs["separate-b"].sizes) == [(2, 8), (2, 16), (2, 32)]
    assert "train.kl_weight=0" in runs["srl-nokl"].overrides
    assert f"model.name_or_path={root / 'runs' / 'smae' / 'model'}" in runs["smae-srl"].overrides
    # apart from name, output_dir and the method's own keys, every run shares the experiment's config
    assert all(r.overrides[1] == f"output_dir={root / 'runs' / r.name}" for r in runs.values())


def test_report_numbers_equal_pytrec_eval_and_scipy_on_the_run_files(finished):
    root, _, qrels = finished
    summary = json.loads((root / "report" / "results" / "summary.json").read_text())
    rows = {(r["size"], r["method"]): r["splits"] for r in summary["table"]}
    assert summary["methods"] == [
        "zeroshot",
        "full",
        "separate",
        "2dmse",
        "srl",
        "srl-matched",
        "srl-nokl",
        "smae-srl",
        "srl-depth",
        "srl-width",
    ]  # the hybrid has a table of its own (test_experiment_hybrid)
    runs = root / "runs"
    for size, method, run_dir in [
        ("c", "srl", "srl"),
        ("a", "separate", "separate-a"),
        ("b", "separate", "separate-b"),
        ("b", "2dmse", "2dmse"),
    ]:
        run = read_run(runs / run_dir / "runs" / "dev" / f"{size}.trec")
        expected = per_query(qrels, run, "recip_rank")
        assert rows[(size, method)]["dev"]["RR@10"]["value"] == pytest.approx(
            np.mean(list(expected.values())), abs=1e-9
        )
        reference = per_query(qrels, read_run(runs / "smae-srl" / "runs" / "dev" / f"{size}.trec"), "recip_rank")
        x = np.array([reference[q] for q in qrels])
        y = np.array([expected[q] for q in qrels])
        p = rows[(size, method)]["dev"]["RR@10"]["p"]
        if np.ptp(x - y) > 1e-12:
            assert p == pytest.approx(ttest_rel(x, y).pvalue, rel=1e-9)
        else:  # a constant difference: no variance to test
            assert p in (0.0, 1.0)
        if method == "srl":  # the per-query values published beside the report
            published = json.loads(gzip.decompress((root / "report" / "results" / "per_query.json.gz").read_bytes()))
            assert published["srl"]["dev"][size]["RR@10"] == pytest.approx(expected, abs=1e-12)
    assert rows[("c", "smae-srl")]["dev"]["RR@10"]["p"] is None  # the reference is not tested against itself
    averages = summary["averages"]["srl"]["test"]["nDCG@10"]
    assert averages == pytest.approx(np.mean([rows[(s, "srl")]["test"]["nDCG@10"]["value"] for s in "abc"]))


def test_grid_heatmap_cells_are_differences_of_the_runs(finished):
    root, _, qrels = finished
    md = (root / "report" / "results.md").read_text()
    assert "| a (1x8) | zero-shot |" in md and "|  | SMAE+SRL |" in md
    for png in ("grid-srl.png", "grid-srl-minus-2dmse.png", "grid-srl-minus-separate.png", "sizes-dev.png"):
        assert (root / "report" / "results" / png).stat().st_size > 1000
    section = md[md.index("### SRL - 2DMSE") :]
    row3 = next(line for line in section.splitlines() if line.startswith("| 3 |"))
    cell = float(row3.split("|")[3])  # layer 3, dim 16
    runs = root / "runs"
    values = [
        np.mean(list(per_query(qrels, read_run(runs / m / "runs" / "dev" / "3x16.trec"), "ndcg_cut.10").values()))
        for m in ("srl", "2dmse")
    ]
    assert cell == pytest.approx(values[0] - values[1], abs=6e-4)
    # the separate grid row of layer 2 is the separate-b model cut to each dim
    section = md[md.index("### SRL - separate") :]
    row = next(line for line in section.splitlines() if line.startswith("| 2 |"))
    assert re.match(r"\| 2 \| [+-]\d\.\d{3} \| [+-]\d\.\d{3} \| [+-]\d\.\d{3} \|", row)
    assert next(line for line in section.splitlines() if line.startswith("| 3 |")).count("-") >= 3  # no model


def test_published_runs_rederive_the_numbers(finished):
    root, config, qrels = finished
    pub = root / "report" / "results" / "srl" / "runs" / "dev"
    with gzip.open(pub / "c.trec.gz", "rt") as f:
        assert max(int(line.split()[3]) for line in f) == 20  # run_depth
    with gzip.open(pub / "3x16.trec.gz", "rt") as f:
        assert max(int(line.split()[3]) for line in f) == 10  # grid_run_depth
    from eval.__main__ import main as eval_main

    eval_main(
        [
            "--config",
            str(config),
            f"paths.runs={root / 'report' / 'results' / 'srl' / 'runs'}",
            f"paths.eval={root / 're-eval'}",
            "eval.sizes=all",
            "eval.splits=dev",
        ]
    )
    again = json.loads((root / "re-eval" / "dev.json").read_text())
    original = json.loads((root / "runs" / "srl" / "eval" / "dev.json").read_text())
    assert {r["size"]: r["metrics"] for r in again["sizes"]} == {r["size"]: r["metrics"] for r in original["sizes"]}


def test_a_second_run_redoes_nothing(finished, capsys):
    root, config, _ = finished
    runs = root / "runs"
    # the embedding shards and run files are kept (the stores' meta.json is rewritten, same content)
    watched = [p for p in runs.glob("*/embeddings/*/*") if p.name != "meta.json"] + [*runs.glob("*/runs/*/*.trec")]
    watched += [*runs.glob("suite/*/docs/runs/test/*.trec")]  # the out-of-domain suite's runs too
    before = {p: p.stat().st_mtime_ns for p in watched}
    logs = {p: p.read_text() for p in runs.glob("*/train_log.jsonl")}
    assert len(watched) > 100 and len(logs) == 12
    main(["--config", str(config)])
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    assert {p: p.read_text() for p in logs} == logs
    assert "already trained" in capsys.readouterr().out


def test_out_of_domain_table_is_the_suite_runs_ndcg(finished):
    """The report's out-of-domain table: each method's every size on the suite's collection, from the
    suite's run files (pytrec_eval), the separate models each at their own size."""
    from retrieval.data import load_split

    root, _, _ = finished
    md = (root / "report" / "results.md").read_text()
    section = md[md.index("## Out-of-domain: nDCG@10 averaged over 1 collection (docs") :].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| size |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns == [
        "size",
        "zero-shot",
        "full",
        "separate",
        "2DMSE",
        "SRL",
        "SRL (separate's FLOPs)",
        "SRL w/o KL",
        "SMAE+SRL",
        "SRL depth-wise",
        "SRL width-wise",
    ]  # the hybrid is not in the suite
    qrels = load_split("test", str(root / "docs")).qrels
    runs = {
        "zero-shot": "zeroshot",
        "full": "full",
        "2DMSE": "2dmse",
        "SRL": "srl",
        "SRL w/o KL": "srl-nokl",
        "SMAE+SRL": "smae-srl",
        "SRL (separate's FLOPs)": "srl-matched",
    }
    for size in "abc":
        row = next(line for line in section.splitlines() if line.startswith(f"| {size} ("))
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|"))))
        for label, run in {**runs, "separate": f"separate-{size}"}.items():
            path = root / "runs" / "suite" / run / "docs" / "runs" / "test" / f"{size}.trec"
            expected = np.mean(list(per_query(qrels, read_run(path), "ndcg_cut.10").values()))
            assert float(cells[label]) == pytest.approx(expected, abs=5e-5), (size, label)
    table = [
        dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| size |")
    ]
    *per_size, average = table
    assert "![out-of-domain.png](results/out-of-domain.png)" in section
    assert (root / "report" / "results" / "out-of-domain.png").stat().st_size > 0
    assert average["size"] == "average over the sizes" and len(per_size) == 3
    depth = [r["SRL depth-wise"] for r in per_size]
    assert depth[:2] == ["-", "-"]  # the depth-wise model is run at its own sizes (1x32, 2x32, c) only
    path = root / "runs" / "suite" / "srl-depth" / "docs" / "runs" / "test" / "c.trec"
    expected = np.mean(list(per_query(qrels, read_run(path), "ndcg_cut.10").values()))
    assert float(depth[2]) == pytest.approx(expected, abs=5e-5)
    for label in columns[1:-2]:
        assert float(average[label]) == pytest.approx(np.mean([float(r[label]) for r in per_size]), abs=1e-4), label


def test_bad_experiment_input_is_one_line(finished, capsys):
    _, config, _ = finished
    for args, message in [
        (["experiment.methods=srl,bm25"], "unknown method 'bm25'"),
        (["--only", "srll"], "--only 'srll' is not a run"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config), *args])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def evaluated_separate_runs(tmp_path):
    """Two separate models (sizes 1x8 and 1x16, sharing layer 1), each with run files for both sizes
    (query q1's relevant passage at a chosen rank) evaluated by eval; returns their reported runs."""
    from eval.pipeline import evaluate_experiment
    from experiment.pipeline import reported_runs, run_config
    from retrieval.runfile import write_run_record

    col = tmp_path / "col"
    (col / "qrels").mkdir(parents=True)
    (col / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n')
    (col / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    config = tmp_path / "exp.yaml"
    config.write_text(f"""
name: share
output_dir: {tmp_path / "runs"}
sizes: [{{name: a, layers: 1, dim: 8}}, {{name: b, layers: 1, dim: 16}}]
data: {{corpus: {col}, eval_splits: {{dev: {col}}}}}
eval: {{metrics: [RR@10]}}
experiment: {{methods: separate}}
""")
    runs = plan_runs(load_config(config))
    assert [r.name for r in runs] == ["separate-a", "separate-b"]
    rank_of_d1 = {"separate-a": {"1x8": 1, "1x16": 3}, "separate-b": {"1x8": 4, "1x16": 2}}
    names = {"1x8": "a", "1x16": "b"}
    for run, ranks in rank_of_d1.items():
        for key, rank in ranks.items():
            path = tmp_path / "runs" / run / "runs" / "dev" / f"{names[key]}.trec"  # as search names them
            path.parent.mkdir(parents=True, exist_ok=True)
            docs = ["d9", "d8", "d7", "d6"]
            docs.insert(rank - 1, "d1")
            path.write_text("".join(f"q1 Q0 {d} {i} {10 - i} t\n" for i, d in enumerate(docs, 1)))
            layers, dim = map(int, key.split("x"))
            write_run_record(path, {"size": names[key], "layers": layers, "dim": dim})
    for run in runs:
        evaluate_experiment(run_config(str(config), [], run))
    return reported_runs(str(config), [], runs)


def test_separate_models_sharing_a_layer_count_keep_their_own_size(tmp_path):
    """Sizes 1x8 and 1x16 share layer 1: each size's row must come from the model trained at it."""
    from experiment.report import collect

    results = collect(evaluated_separate_runs(tmp_path), ["dev"], ["RR@10"])
    cells = results["separate"]["dev"]
    assert cells[(1, 8)][0] == "separate-a" and cells[(1, 8)][1].evaluation.aggregate["RR@10"] == 1.0
    assert cells[(1, 16)][0] == "separate-b" and cells[(1, 16)][1].evaluation.aggregate["RR@10"] == 0.5


def test_report_reads_what_eval_wrote(tmp_path):
    """The report takes eval's files as they are (no re-evaluation of the run files): values edited
    consistently in both files show up, and a per-query file that disagrees with the means is refused."""
    from experiment.report import collect
    from retrieval.errors import StarbucksError
    from retrieval.evalfile import per_query_path, split_json

    reported = evaluated_separate_runs(tmp_path)
    eval_dir = reported[0].eval_dir  # separate-a: d1 at rank 1 for 1x8, at rank 3 for 1x16
    summary = json.loads(split_json(eval_dir, "dev").read_text())
    values = json.loads(gzip.decompress(per_query_path(eval_dir, "dev").read_bytes()))
    for entry in summary["sizes"]:
        entry["metrics"]["RR@10"] = 0.125
    for entry in values["sizes"]:
        entry["per_query"]["RR@10"]["q1"] = 0.125
    split_json(eval_dir, "dev").write_text(json.dumps(summary))
    per_query_path(eval_dir, "dev").write_bytes(gzip.compress(json.dumps(values).encode()))
    cells = collect(reported, ["dev"], ["RR@10"])["separate"]["dev"]
    assert cells[(1, 8)][0] == "separate-a" and cells[(1, 8)][1].evaluation.aggregate["RR@10"] == 0.125
    assert cells[(1, 8)][1].evaluation.per_query["RR@10"] == {"q1": 0.125}

    values["sizes"][0]["per_query"]["RR@10"]["q1"] = 1.0  # no longer the mean eval wrote
    per_query_path(eval_dir, "dev").write_bytes(gzip.compress(json.dumps(values).encode()))
    with pytest.raises(StarbucksError, match="does not hold the per-query values of size 1x8"):
        collect(reported, ["dev"], ["RR@10"])
    per_query_path(eval_dir, "dev").unlink()
    with pytest.raises(StarbucksError, match="dev.perquery.json.gz is missing"):
        collect(reported, ["dev"], ["RR@10"])
