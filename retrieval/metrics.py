"""Retrieval metrics with `ir_measures`, per query and averaged, plus paired significance tests.

Averages are over every judged query of the split (qrels); a query the run does not answer
counts 0 (trec_eval's `-c`). Binary measures (RR, R, P, AP, ...) count a passage relevant at
`rel_level` or above; graded ones (nDCG) use the judgments as gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import ir_measures
import numpy as np

from retrieval.errors import StarbucksError

DEFAULT_MEASURES = ("RR@10", "nDCG@10", "R@100", "R@1000")


def parse_measures(names: Sequence[str], rel_level: int = 1) -> dict[str, object]:
    """`{name: ir_measures measure}`; binary measures get `rel=rel_level` unless the name sets it."""
    out = {}
    for name in names:
        name = str(name).strip()
        try:
            measure = ir_measures.parse_measure(name)
        except (NameError, ValueError, KeyError, SyntaxError):
            raise StarbucksError(
                f"unknown metric {name!r} in eval.metrics; use ir_measures names such as RR@10, nDCG@10, R@1000, AP"
            ) from None
        if rel_level != 1 and "rel" in measure.SUPPORTED_PARAMS and "rel" not in measure.params:
            measure = measure(rel=int(rel_level))
        same = [n for n, m in out.items() if m == measure]
        if same:
            raise StarbucksError(f"metrics {same[0]!r} and {name!r} are the same measure ({measure}); list it once")
        out[name] = measure
    return out


@dataclass
class Evaluation:
    """Per-query values and means of each measure over the judged queries."""

    measures: dict[str, object]  # display name -> ir_measures measure actually computed
    per_query: dict[str, dict[str, float]]  # name -> qid -> value
    aggregate: dict[str, float]  # name -> mean over judged queries

    @property
    def queries(self) -> int:
        return len(next(iter(self.per_query.values()), {}))


def evaluate(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    rel_level: int = 1,
) -> Evaluation:
    """Evaluate a run `{qid: {docid: score}}` against qrels `{qid: {docid: relevance}}`."""
    if not qrels:
        raise StarbucksError("cannot evaluate against empty qrels; check the split's qrels file")
    parsed = parse_measures(measures, rel_level)
    name_of = {m: name for name, m in parsed.items()}
    per_query = {name: dict.fromkeys(qrels, 0.0) for name in parsed}
    if run:
        for metric in ir_measures.iter_calc(list(name_of), qrels, run):
            if metric.query_id in qrels:
                per_query[name_of[metric.measure]][metric.query_id] = float(metric.value)
    aggregate = {name: float(np.mean(list(values.values()))) for name, values in per_query.items()}
    return Evaluation(parsed, per_query, aggregate)


def paired_ttest(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Two-sided paired t-test p-value over the queries of `a` (missing in `b`: 0).

    Identical values give 1.0; a constant non-zero difference (zero variance) gives 0.0.
    """
    from scipy.stats import ttest_rel

    qids = list(a)
    x = np.array([a[q] for q in qids])
    y = np.array([b.get(q, 0.0) for q in qids])
    diff = x - y
    if len(qids) < 2 or np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        return 1.0 if len(qids) < 2 or abs(diff[0]) <= 1e-12 else 0.0
    return float(ttest_rel(x, y).pvalue)
