"""The experiment's v3 arms end to end with a tiny random BERT: srl-depth and srl-width are trained, the
hybrid of their models is encoded, searched and evaluated at the bytes of a full-width vector, and the
report's hybrid table, t-tests, cost and claims are checked against pytrec_eval and scipy on the run files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import ttest_rel

from conftest import mini_slice, save_tiny_backbone
from experiment.__main__ import main
from experiment.pipeline import plan_runs
from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.runfile import read_run
from test_experiment import per_query


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment-hybrid")
    col, qids, dev = mini_slice(root / "col", queries=16, passages=200)
    save_tiny_backbone(root / "backbone", layers=4, hidden=32)
    config = root / "exp.yaml"
    config.write_text(f"""
name: tiny
output_dir: {root / "runs"}
model: {{name_or_path: {root / "backbone"}, pooling: cls, normalize: false, query_max_length: 16, passage_max_length: 48}}
sizes: [{{name: a, layers: 1, dim: 8}}, {{name: b, layers: 2, dim: 16}}, {{name: c, layers: 4, dim: 32}}]
data: {{corpus: {col}, train: {col / "train.jsonl"}, eval_splits: {{dev: {col}}}}}
train: {{batch_size: 4, group_size: 2, max_steps: 2, save_steps: 2, learning_rate: 1.0e-3, temperature: 1.0}}
encode: {{batch_size: 32}}
search: {{depth: 20}}
eval: {{metrics: [RR@10, nDCG@10], plot: false}}
experiment:
  methods: srl,srl-depth,srl-width,hybrid
  reference: srl
  grid: false
  report_dir: {root / "report"}
  run_depth: 20
""")
    main(["--config", str(config)])
    return root, config, {q: dev.qrels[q] for q in qids}


def test_plan_of_the_v3_arms(finished):
    root, config, _ = finished
    runs = {r.name: r for r in plan_runs(load_config(config))}
    assert list(runs) == ["srl", "srl-depth", "srl-width", "hybrid"]
    # derived hybrids: per size below the full one in both, depth (n, D-d) + width (N, d): 32 dims each
    assert [h.key for h in runs["hybrid"].sizes] == ["1x24+4x8@srl-width", "2x16+4x16@srl-width"]
    assert runs["hybrid"].train is None and runs["hybrid"].overrides[2:] == (
        f"encode.model={root / 'runs' / 'srl-depth' / 'model'}",
        f"encode.part_models.srl-width={root / 'runs' / 'srl-width' / 'model'}",
    )
    # the part models evaluate the configured sizes (by LxD: their models list their 1D sizes), their own
    # sizes, each part alone and at the hybrid's bytes; SRL the hybrid's layers and bytes
    assert [s.key for s in runs["srl-depth"].sizes] == ["1x8", "2x16", "4x32", "1x32", "2x32", "1x24"]
    assert [s.key for s in runs["srl-width"].sizes] == ["1x8", "2x16", "4x32", "4x8", "4x16"]
    assert {s.key for s in runs["srl"].sizes} == {"1x8", "2x16", "4x32"}
    meta = json.loads((root / "runs" / "srl-width" / "model" / "starbucks.json").read_text())
    assert [s["name"] for s in meta["sizes"]] == ["4x8", "4x16", "c"]  # the sizes it was trained on


def test_hybrid_table_and_tests_equal_pytrec_eval_and_scipy(finished):
    root, _, qrels = finished
    summary = json.loads((root / "report" / "results" / "summary.json").read_text())
    assert summary["methods"] == ["srl", "srl-depth", "srl-width"]  # the size tables; the hybrid has its own
    runs = root / "runs"

    def values(run_dir, size, measure="recip_rank"):
        return per_query(qrels, read_run(runs / run_dir / "runs" / "dev" / f"{size}.trec"), measure)

    hybrid = next(h for h in summary["hybrids"]["hybrids"] if h["hybrid"] == "1x24+4x8@srl-width")
    assert (hybrid["layers"], hybrid["dim"]) == (4, 32)
    cells = {c["embedding"]: c["splits"]["dev"]["RR@10"] for c in hybrid["cells"]}
    assert list(cells) == [
        "hybrid 4x32",
        "SRL depth-wise 1x24 (part)",
        "SRL width-wise 4x8 (part)",
        "SRL depth-wise 1x32 (equal bytes)",
        "SRL width-wise 4x32 (equal bytes)",
        "SRL 4x32 (equal bytes and layers)",
    ]
    mine = values("hybrid", "1x24+4x8@srl-width")
    assert cells["hybrid 4x32"]["value"] == pytest.approx(np.mean(list(mine.values())), abs=1e-9)
    for label, run_dir, size in [
        ("SRL depth-wise 1x32 (equal bytes)", "srl-depth", "1x32"),
        ("SRL width-wise 4x32 (equal bytes)", "srl-width", "c"),
        ("SRL width-wise 4x8 (part)", "srl-width", "4x8"),
        ("SRL 4x32 (equal bytes and layers)", "srl", "c"),
    ]:
        theirs = values(run_dir, size)
        assert cells[label]["value"] == pytest.approx(np.mean(list(theirs.values())), abs=1e-9), label
        x, y = np.array([mine[q] for q in qrels]), np.array([theirs[q] for q in qrels])
        if np.ptp(x - y) > 1e-12:
            assert cells[label]["p"] == pytest.approx(ttest_rel(x, y).pvalue, rel=1e-9), label
        else:
            assert cells[label]["p"] in (0.0, 1.0)
    md = (root / "report" / "results.md").read_text()
    section = md[md.index("## Hybrids: depth- and width-wise embeddings joined") :].split("\n## ")[0]
    assert "| 1x24+4x8@srl-width | hybrid 4x32 |" in section
    assert "This reading of the paper's v3 abstract is the toolkit's" in section
    for claim in (
        "The hybrid beats both parts at equal bytes",
        "the hybrid beats SRL at its layers and bytes",
        "Depth- and width-wise are complementary",
    ):
        assert f"**{claim}" in section or claim in section
    assert "| a (1x8) | SRL depth-wise |" in md or "| a (1x8) | SRL |" in md  # Table 4 has the 1D arms' rows


def test_complementarity_is_the_parts_per_query_wins(finished):
    """The complementarity claim's numbers from the parts' run files: queries each part wins, the Jaccard
    overlap of the queries each ranks a relevant passage in its top 10, the oracle gain and its t-test."""
    root, _, qrels = finished
    summary = json.loads((root / "report" / "results" / "summary.json").read_text())
    claim = summary["hybrids"]["claims"]["Depth- and width-wise are complementary (the hybrid's parts, per query)"]
    found = claim["dev RR@10"]
    assert len(found) == 2
    runs = root / "runs"
    for entry, (depth, width) in zip(found, [("1x24", "4x8"), ("2x16", "4x16")]):
        a = per_query(qrels, read_run(runs / "srl-depth" / "runs" / "dev" / f"{depth}.trec"), "recip_rank")
        b = per_query(qrels, read_run(runs / "srl-width" / "runs" / "dev" / f"{width}.trec"), "recip_rank")
        x, y = np.array([a[q] for q in sorted(qrels)]), np.array([b[q] for q in sorted(qrels)])
        assert (entry["wins_a"], entry["wins_b"], entry["ties"]) == (
            int((x > y).sum()),
            int((y > x).sum()),
            int((x == y).sum()),
        )
        sa, sb = set(np.flatnonzero(x > 0)), set(np.flatnonzero(y > 0))
        assert entry["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb) if sa | sb else 1.0)
        better = x if x.mean() >= y.mean() else y
        assert entry["oracle_gain"] == pytest.approx(np.maximum(x, y).mean() - better.mean())


def test_hybrid_cost_is_its_models_training(finished):
    root, _, _ = finished
    summary = json.loads((root / "report" / "results" / "summary.json").read_text())
    cost = summary["cost"]
    assert cost["hybrid"]["flops"] == pytest.approx(cost["srl-depth"]["flops"] + cost["srl-width"]["flops"])
    assert cost["hybrid"]["runs"] == 2


def test_hybrid_settings_and_refusals(finished, capsys):
    _, config, _ = finished
    runs = {r.name: r for r in plan_runs(load_config(config, ["experiment.hybrids=[0.5*1x32+4x16@srl]"]))}
    assert [h.key for h in runs["hybrid"].sizes] == ["0.5*1x32+4x16@srl"]
    assert any(o.startswith("encode.part_models.srl=") for o in runs["hybrid"].overrides)
    assert {s.key for s in runs["srl"].sizes} >= {"4x16", "4x48"} - {"4x48"}  # the part alone (48 > D: no equal bytes)
    with pytest.raises(StarbucksError, match="comes from run 'srl-width', which this experiment does not train"):
        plan_runs(load_config(config, ["experiment.methods=srl,srl-depth,hybrid"]))
    with pytest.raises(StarbucksError, match="4x32 is not a hybrid"):
        plan_runs(load_config(config, ["experiment.hybrids=[4x32]"]))
    main(["--config", str(config), "--dry-run"])
    out = capsys.readouterr().out
    assert "hybrid" in out and "encode.part_models.srl-width=" in out
