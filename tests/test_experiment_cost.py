"""The experiment's seeds, training cost and srl-matched arm, on hand-made run records (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

from experiment.pipeline import matched_steps, plan_runs, reported_runs, run_config
from retrieval.config import load_config
from retrieval.cost import TRAIN_SUMMARY
from retrieval.errors import StarbucksError


def write_config(
    tmp_path,
    methods: str,
    seeds=None,
    extra: str = "",
    sizes: str = "[{name: a, layers: 1, dim: 8}, {name: b, layers: 2, dim: 16}]",
) -> str:
    col = tmp_path / "col"
    (col / "qrels").mkdir(parents=True, exist_ok=True)
    (col / "queries.jsonl").write_text('{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": "y"}\n')
    (col / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    config = tmp_path / "exp.yaml"
    config.write_text(f"""
name: cost
seed: 7
output_dir: {tmp_path / "runs"}
sizes: {sizes}
data: {{corpus: {col}, eval_splits: {{dev: {col}}}}}
eval: {{metrics: [RR@10]}}
experiment: {{methods: "{methods}", grid: false, reference: srl, seeds: {json.dumps(seeds)}}}
{extra}""")
    return str(config)


def record(run_dir, flops, steps, seconds=1.0):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / TRAIN_SUMMARY).write_text(
        json.dumps({"steps": steps, "seconds": seconds, "flops": flops, "device": "cpu", "processes": 1})
    )


def test_seeds_repeat_srl_2dmse_and_separate_only(tmp_path):
    config = write_config(tmp_path, "full,separate,2dmse,srl", seeds=[7, 11])
    runs = plan_runs(load_config(config))
    assert [(r.name, r.seed) for r in runs] == [
        ("full", 7),
        ("separate-a", 7),
        ("separate-b", 7),
        ("separate-a-seed11", 11),
        ("separate-b-seed11", 11),
        ("2dmse", 7),
        ("2dmse-seed11", 11),
        ("srl", 7),
        ("srl-seed11", 11),
    ]
    by_name = {r.name: r for r in runs}
    assert "seed=11" in by_name["srl-seed11"].overrides and not any("seed=" in o for o in by_name["srl"].overrides)
    assert run_config(config, [], by_name["srl-seed11"]).seed == 11
    assert run_config(config, [], by_name["srl"]).seed == 7
    # the first seed seeds every run when it is not the config's own
    first = plan_runs(load_config(config, ["experiment.seeds=[3]"]))[0]
    assert run_config(config, ["experiment.seeds=[3]"], first).seed == 3
    for bad in ("[1,1]", "[]", "[1.5]"):
        with pytest.raises(StarbucksError, match="experiment.seeds"):
            plan_runs(load_config(config, [f"experiment.seeds={bad}"]))
    with pytest.raises(StarbucksError, match="srl-matched needs srl and separate"):
        plan_runs(load_config(config, ["experiment.methods=srl,srl-matched"]))


def test_srl_matched_steps_follow_from_the_separate_models_flops(tmp_path):
    config = write_config(tmp_path, "separate,srl,srl-matched")
    runs = plan_runs(load_config(config))
    matched = next(r for r in runs if r.name == "srl-matched")
    with pytest.raises(StarbucksError, match="recorded cost of separate-a"):
        matched_steps(config, [], runs, matched)
    root = tmp_path / "runs"
    record(root / "separate-a", flops=3.0e12, steps=60)
    record(root / "separate-b", flops=5.5e12, steps=60)
    record(root / "srl", flops=4.0e12, steps=40)  # 1e11 FLOPs per SRL step
    assert matched_steps(config, [], runs, matched) == 85  # (3 + 5.5) e12 / 1e11
    record(root / "srl", flops=3.0e12, steps=40)  # 7.5e10 per step: 113.33 -> 113
    assert matched_steps(config, [], runs, matched) == 113


def fake_eval(config, runs, ranks: dict[str, dict[str, int]]):
    """Run files of size a with q1's / q2's relevant passage at the given ranks, evaluated by eval."""
    from eval.pipeline import evaluate_experiment
    from retrieval.runfile import write_run_record

    by_name = {r.name: r for r in runs}
    for name, per_query in ranks.items():
        path = Path(load_config(config).output_dir) / name / "runs" / "dev" / "a.trec"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for q, rank in per_query.items():
            docs = ["d7", "d8", "d9", "d6"]
            docs.insert(rank - 1, {"q1": "d1", "q2": "d2"}[q])
            lines += [f"{q} Q0 {d} {i} {10 - i} t\n" for i, d in enumerate(docs, 1)]
        path.write_text("".join(lines))
        write_run_record(path, {"size": "a", "layers": 1, "dim": 8})
        evaluate_experiment(run_config(config, [], by_name[name]))


def test_seeds_average_per_query_and_spread_and_cost(tmp_path):
    from experiment.report import SeedScores, collect, method_costs, summarise

    config = write_config(tmp_path, "2dmse,srl", seeds=[7, 11], sizes="[{name: a, layers: 1, dim: 8}]")
    runs = plan_runs(load_config(config))
    ranks = {
        "srl": {"q1": 1, "q2": 2},
        "srl-seed11": {"q1": 4, "q2": 2},
        "2dmse": {"q1": 2, "q2": 5},
        "2dmse-seed11": {"q1": 1, "q2": 4},
    }
    fake_eval(config, runs, ranks)
    reported = reported_runs(config, [], runs)
    results = collect(reported, ["dev"], ["RR@10"])
    srl = results["srl"]["dev"][(1, 8)][1]
    assert isinstance(srl, SeedScores) and srl.per_seed["RR@10"] == [0.75, 0.375]
    assert srl.evaluation.per_query["RR@10"] == {"q1": (1 + 0.25) / 2, "q2": 0.5}
    assert srl.evaluation.aggregate["RR@10"] == pytest.approx(0.5625)
    summary = summarise(load_config(config), results, ["dev"])
    row = next(r for r in summary["table"] if r["method"] == "2dmse" and r["size"] == "a")
    cell = row["splits"]["dev"]["RR@10"]
    assert cell["sd"] == pytest.approx(np.std([(0.5 + 0.2) / 2, (1 + 0.25) / 2], ddof=1))
    # the t-test pairs the per-query values averaged over the seeds
    expected = ttest_rel([0.625, 0.5], [(0.5 + 1) / 2, (0.2 + 0.25) / 2]).pvalue
    assert cell["p"] == pytest.approx(expected)

    root = tmp_path / "runs"
    assert method_costs(reported) == {}  # nothing recorded yet
    for name, flops in [("srl", 4e12), ("srl-seed11", 6e12), ("2dmse", 1e12), ("2dmse-seed11", 1e12)]:
        record(root / name, flops=flops, steps=10, seconds=60.0)
    costs = method_costs(reported)
    assert costs["srl"]["flops"] == 5e12 and costs["srl"]["seeds"] == 2 and costs["2dmse"]["seconds"] == 60.0


def test_cost_of_separate_is_its_models_and_smae_srl_includes_pretraining(tmp_path):
    from experiment.report import method_costs

    config = write_config(tmp_path, "separate,smae-srl")
    runs = plan_runs(load_config(config))
    reported = reported_runs(config, [], runs)
    root = tmp_path / "runs"
    record(root / "separate-a", flops=1e12, steps=5, seconds=10)
    record(root / "separate-b", flops=2e12, steps=5, seconds=20)
    record(root / "smae" / "head-warmup", flops=1e11, steps=3, seconds=1)
    record(root / "smae-srl", flops=3e12, steps=5, seconds=30)
    assert "smae-srl" not in method_costs(reported)  # only the head warm-up of the pre-training has finished
    record(root / "smae", flops=4e12, steps=7, seconds=40)
    costs = method_costs(reported)
    assert costs["separate"]["flops"] == 3e12 and costs["separate"]["runs"] == 2 and costs["separate"]["seconds"] == 30
    assert costs["smae-srl"]["flops"] == 3e12 + 4e12 + 1e11 and costs["smae-srl"]["steps"] == 15


def test_claim_verdicts_follow_the_counts():
    """The words of a verdict from hand-made counts: every size ahead / mostly ahead / contradicted."""
    from experiment.report import cost_ratio, verdict

    def counts(ahead, sig_w, sig_l, n=6, mean=0.01, worst=-0.01):
        return {
            "sizes": n,
            "ahead": ahead,
            "significantly_ahead": sig_w,
            "significantly_behind": sig_l,
            "mean_difference": mean,
            "worst_difference": worst,
        }

    assert verdict(counts(6, 6, 0), "ahead").startswith("holds strongly:")
    assert verdict(counts(6, 3, 0), "ahead").startswith("holds:")
    assert verdict(counts(6, 1, 0), "ahead").startswith("holds weakly:")
    assert verdict(counts(5, 5, 1), "ahead").startswith("holds in part:")  # one size against, five for
    assert verdict(counts(4, 0, 0), "ahead").startswith("holds in part:")
    assert verdict(counts(4, 1, 1), "ahead").startswith("does not hold:")  # as often significantly behind
    assert verdict(counts(3, 3, 0), "ahead").startswith("does not hold:")  # not ahead at most sizes
    assert verdict(counts(0, 0, 0), "close").startswith("holds:")
    assert verdict(counts(6, 2, 0), "close").startswith("holds (and ahead at every size):")
    assert verdict(counts(0, 0, 2), "close").startswith("holds in part:")
    assert verdict(counts(0, 0, 3), "close").startswith("does not hold:")
    cost = {"srl-matched": {"steps": 210}, "separate": {"flops": 6.48e13}, "srl": {"flops": 1.85e13, "steps": 60}}
    assert cost_ratio(cost) == (
        "210 steps: the FLOPs of the separate models together (0.0648 PFLOP) over SRL's 0.308 TFLOP per step."
    )
    assert cost_ratio({"srl-matched": {"steps": 210}}) == "210 steps."
