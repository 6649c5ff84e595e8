"""The experiment's report: the paper's tables, plots and heatmaps, and the files behind them.

`write_report` reads what eval wrote for every run (`<eval>/<split>.json` and the per-query values
beside it, `retrieval.evalfile`; nothing is evaluated again) and writes to `experiment.report_dir`
(default `<output_dir>/report`):

- `results.md`: Table 4's shape (rows size x method; RR@10, nDCG@10, R@100 on each split; `*`
  where a method differs from `experiment.reference` at p < eval.alpha, paired t-test), Table
  1's shape (each method's average over the sizes), Table 2's ablation (SRL with and without KL),
  the hybrids (each against its parts alone, its parts' models and SRL at its bytes; the
  complementarity of its parts, per query),
  with `experiment.suite` the out-of-domain table (sizes x methods, nDCG@10 averaged over the
  suite's collections, from the `eval.suite` cells' eval files),
  what the numbers say about the paper's claims (computed, not written by hand), the commands,
  commit, machine and date; a hand-written `Discussion` between markers survives regeneration;
- `results/`: `summary.json` (every number and p-value), `sizes-<split>.png` (metric vs size per
  method), `grid-*.png` heatmaps over the (layer, dim) grid, and per run `<run>/runs/<split>/`
  run files (gzipped, cut to `experiment.run_depth`; grid cells off the size list to
  `experiment.grid_run_depth`) with their records, and `<run>/eval/<split>.json`, so every number
  re-derives with `python -m eval ... paths.runs=<report_dir>/results/<run>/runs`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from omegaconf import DictConfig

from retrieval.config import sizes_of
from retrieval.cost import total_cost
from retrieval.errors import StarbucksError
from retrieval.evalfile import SizeScores, read_split, read_summary
from retrieval.io import atomic_path, atomic_write_gzip, atomic_write_json, atomic_write_text
from retrieval.metrics import Evaluation, paired_ttest
from retrieval.names import parse_names
from retrieval.runfile import read_run_record, run_stem, write_run_record
from retrieval.sizes import Size
from retrieval.tables import markdown_table, plot_measures

DISCUSSION_START = "<!-- discussion: hand-written, kept when the report is regenerated -->"
DISCUSSION_END = "<!-- end of discussion -->"
# Report labels, in the paper's words (and the order of the tables).
LABELS = {
    "zeroshot": "zero-shot",
    "full": "full",
    "separate": "separate",
    "2dmse": "2DMSE",
    "srl": "SRL",
    "srl-matched": "SRL (separate's FLOPs)",
    "srl-nokl": "SRL w/o KL",
    "smae-srl": "SMAE+SRL",
    "srl-depth": "SRL depth-wise",
    "srl-width": "SRL width-wise",
    "hybrid": "hybrid",
}
HYBRID_BASE = "srl-depth"  # the run whose model a hybrid's unlabelled parts come from (`@<run>`: that run's)
SIZED = tuple(m for m in LABELS if m != "hybrid")  # the methods of the size tables (the hybrid has its own)

Key = tuple  # Size.ident: (layers, dim), a hybrid's (layers, dim, spec)
# method -> split -> Size.ident -> (run name, result)
Results = dict[str, dict[str, dict[Key, tuple[str, SizeScores]]]]


@dataclass(frozen=True)
class ReportedRun:
    """One evaluated run of the experiment: what it reports under and where eval wrote its files."""

    name: str
    method: str  # the row of the tables (`separate-<size>` runs all report under `separate`)
    sizes: tuple[Size, ...]  # the sizes it was evaluated for
    eval_dir: Path
    out_of_domain: tuple[tuple[str, str, Path], ...] = ()  # (collection, split, eval dir) of its eval.suite cells
    seed: int | None = None  # runs of one method and several seeds are averaged
    cost_dirs: tuple[Path, ...] = ()  # where its training cost is recorded (retrieval.cost)


@dataclass
class SeedScores(SizeScores):
    """A size's scores over several seeds: per-query values and means are the seeds' means (what the
    tables and t-tests use); `per_seed` holds each seed's mean of each measure (the tables' spread)."""

    per_seed: dict[str, list[float]] = field(default_factory=dict)


def report_splits(cfg: DictConfig) -> list[str]:
    """`eval.splits` (all: every configured split)."""
    names = parse_names(cfg.eval.splits) or list(cfg.data.eval_splits)
    unknown = [n for n in names if n not in cfg.data.eval_splits]
    if unknown:
        raise StarbucksError(
            f"unknown eval split {unknown[0]!r}; configured splits are "
            f"{sorted(cfg.data.eval_splits)} (data.eval_splits)"
        )
    return names


def split_queries(runs: Sequence[ReportedRun], split: str) -> int | str:
    """The split's judged queries, from the first run eval wrote it for."""
    for run in runs:
        summary = read_summary(run.eval_dir, split)
        if summary is not None:
            return summary["queries"]
    return "?"


def collect(runs: Sequence[ReportedRun], splits: Sequence[str], measures: Sequence[str]) -> Results:
    """Every run's scores as eval wrote them; the `separate` runs merge into one method. Where two
    separate models cover the same grid cell (sizes sharing a layer count), the model trained at that
    cell's size wins, else the first. A method run with several seeds gets its seeds' mean (`SeedScores`)."""
    seeds = list(dict.fromkeys(r.seed for r in runs))
    return merge_seeds([_collect_seed([r for r in runs if r.seed == seed], splits, measures) for seed in seeds])


def merge_seeds(per_seed: Sequence[Results]) -> Results:
    """One `Results` from one per seed: a cell present in several becomes their mean, per query and overall."""
    out: Results = {}
    for method in dict.fromkeys(m for results in per_seed for m in results):
        for split in dict.fromkeys(sp for results in per_seed for sp in results.get(method, {})):
            cells = out.setdefault(method, {}).setdefault(split, {})
            for key in dict.fromkeys(k for results in per_seed for k in results.get(method, {}).get(split, {})):
                hits = [
                    results[method][split][key] for results in per_seed if key in results.get(method, {}).get(split, {})
                ]
                cells[key] = hits[0] if len(hits) == 1 else (hits[0][0], _seed_mean([h for _, h in hits]))
    return out


def _seed_mean(scores: Sequence[SizeScores]) -> SeedScores:
    first = scores[0].evaluation
    per_query = {
        m: {q: float(np.mean([s.evaluation.per_query[m][q] for s in scores])) for q in values}
        for m, values in first.per_query.items()
    }
    per_seed = {m: [s.evaluation.aggregate[m] for s in scores] for m in first.aggregate}
    aggregate = {m: float(np.mean(v)) for m, v in per_seed.items()}
    return SeedScores(scores[0].size, scores[0].run, Evaluation(first.measures, per_query, aggregate), per_seed)


def _collect_seed(runs: Sequence[ReportedRun], splits: Sequence[str], measures: Sequence[str]) -> Results:
    out: Results = {}
    trained_at: dict[str, Key] = {}  # separate run -> the size it was trained for (its first size)
    for run in runs:
        wanted = {s.ident for s in run.sizes}
        if run.method == "separate":
            trained_at[run.name] = run.sizes[0].ident
        for name in splits:
            cells = out.setdefault(run.method, {}).setdefault(name, {})
            for r in read_split(run.eval_dir, name) or []:
                key = r.size.ident
                if key not in wanted:
                    continue
                missing = [m for m in measures if m not in r.evaluation.aggregate]
                if missing:
                    raise StarbucksError(
                        f"{run.eval_dir}: split {name!r} has no {missing[0]} (eval.metrics changed?); "
                        f"re-run `python -m experiment` to evaluate it again"
                    )
                held = cells.get(key)
                if held is None or (trained_at.get(run.name) == key and trained_at.get(held[0]) != key):
                    cells[key] = (run.name, r)
    return out


def _value(results: Results, method: str, split: str, key: Key, measure: str) -> float | None:
    hit = results.get(method, {}).get(split, {}).get(key)
    return None if hit is None else hit[1].evaluation.aggregate[measure]


def _spread(results: Results, method: str, split: str, key: Key, measure: str) -> float | None:
    """The sample standard deviation of the seeds' means (None for a single seed)."""
    hit = results.get(method, {}).get(split, {}).get(key)
    per_seed = getattr(hit[1], "per_seed", {}).get(measure) if hit else None
    return float(np.std(per_seed, ddof=1)) if per_seed else None


def _pvalue(results: Results, a: str, b: str, split: str, key: Key, measure: str) -> float | None:
    ra, rb = results.get(a, {}).get(split, {}).get(key), results.get(b, {}).get(split, {}).get(key)
    if ra is None or rb is None:
        return None
    return paired_ttest(ra[1].evaluation.per_query[measure], rb[1].evaluation.per_query[measure])


def summarise(cfg: DictConfig, results: Results, splits: Sequence[str]) -> dict:
    """Every number of the tables: per method, split, size and measure the value and the p-value vs
    the reference method; averages over the configured sizes."""
    sizes = sizes_of(cfg)
    measures = list(cfg.eval.metrics)
    ref = str(cfg.experiment.reference)
    methods = [m for m in SIZED if m in results]
    table, averages = [], {}
    for s in sizes:
        key = (s.layers, s.dim)
        for m in methods:
            row = {"size": s.name, "layers": s.layers, "dim": s.dim, "method": m, "splits": {}}
            for split in splits:
                for measure in measures:
                    v = _value(results, m, split, key, measure)
                    p = _pvalue(results, ref, m, split, key, measure) if m != ref else None
                    row["splits"].setdefault(split, {})[measure] = {
                        "value": v,
                        "p": p,
                        "sd": _spread(results, m, split, key, measure),
                    }
            table.append(row)
    spreads: dict = {}
    for m in methods:
        for split in splits:
            for measure in measures:
                vals = [_value(results, m, split, (s.layers, s.dim), measure) for s in sizes]
                if all(v is not None for v in vals):
                    averages.setdefault(m, {}).setdefault(split, {})[measure] = float(np.mean(vals))
                seeds = [
                    getattr(results[m][split][(s.layers, s.dim)][1], "per_seed", {}).get(measure)
                    if (s.layers, s.dim) in results[m].get(split, {})
                    else None
                    for s in sizes
                ]
                if all(seeds) and len({len(x) for x in seeds}) == 1:  # the sd over seeds of the size average
                    spreads.setdefault(m, {}).setdefault(split, {})[measure] = float(np.std(np.mean(seeds, 0), ddof=1))
    return {
        "average_sd": spreads,
        "reference": ref,
        "alpha": float(cfg.eval.alpha),
        "measures": measures,
        "splits": list(splits),
        "sizes": sizes.to_config(),
        "methods": methods,
        "table": table,
        "averages": averages,
    }


def _fmt(v: float | None, p: float | None = None, alpha: float = 0.05, sd: float | None = None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + ("*" if p is not None and p < alpha else "")


def table4(summary: dict) -> str:
    splits, measures, alpha = summary["splits"], summary["measures"], summary["alpha"]
    headers = ["size", "method", *[f"{sp} {m}" for sp in splits for m in measures]]
    rows, last = [], None
    for r in summary["table"]:
        label = f"{r['size']} ({r['layers']}x{r['dim']})"
        cells = [
            _fmt(r["splits"][sp][m]["value"], r["splits"][sp][m]["p"], alpha, r["splits"][sp][m]["sd"])
            for sp in splits
            for m in measures
        ]
        rows.append([label if label != last else "", LABELS[r["method"]], *cells])
        last = label
    return markdown_table(headers, rows)


def averages_table(summary: dict) -> str:
    """Each method's average over the sizes (± its spread over seeds) and its training cost."""
    splits, measures, cost = summary["splits"], summary["measures"], summary["cost"]
    headers = ["method", *[f"{sp} {m}" for sp in splits for m in measures], "train PFLOP", "train time"]

    def cost_cells(m: str) -> list[str]:
        c = cost.get(m)
        if c is None:
            return ["-", "-"]
        return [f"{c['flops'] / 1e15:.3g}", f"{c['seconds'] / 60:.1f} min"]

    rows = [
        [
            LABELS[m],
            *[
                _fmt(
                    summary["averages"].get(m, {}).get(sp, {}).get(x),
                    sd=summary["average_sd"].get(m, {}).get(sp, {}).get(x),
                )
                for sp in splits
                for x in measures
            ],
            *cost_cells(m),
        ]
        for m in summary["methods"]
    ]
    return markdown_table(headers, rows)


def method_costs(runs: Sequence[ReportedRun]) -> dict[str, dict]:
    """Per method the training cost of one seed's runs (separate: its models together; SMAE+SRL: with its
    pre-training), averaged over the seeds; a method with an unrecorded run is left out."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r.method for r in runs):
        per_seed = []
        for seed in dict.fromkeys(r.seed for r in runs if r.method == method):
            dirs = [d for r in runs if r.method == method and r.seed == seed for d in r.cost_dirs]
            per_seed.append(total_cost(dirs) if dirs else None)
        if per_seed and all(per_seed):
            out[method] = {
                "seeds": len(per_seed),
                "runs": per_seed[0]["runs"],
                "device": per_seed[0]["device"],
                **{k: float(np.mean([c[k] for c in per_seed])) for k in ("steps", "seconds", "flops")},
            }
    return out


def out_of_domain(cfg: DictConfig, runs: Sequence[ReportedRun], out_dir: Path | None = None) -> tuple[str, str] | None:
    """`(title, table)`: rows the size list, columns the methods, each cell the size's measure (nDCG@10 where
    the suite has it, else its first) averaged over the suite's collections, from the suite cells' eval files;
    None without a suite. A method that lacks a collection at a size shows `-` there. With `out_dir`, the
    table's values are also plotted against the size, one line per method (`out-of-domain.png`)."""
    cells = [(r, name, split, d) for r in runs for name, split, d in r.out_of_domain]
    if not cells:
        return None
    collections = sorted({name for _, name, _, _ in cells})
    values: dict[tuple[str, Key], dict[str, float]] = {}
    measure = None
    for r, name, split, eval_dir in cells:
        summary = read_summary(eval_dir, split)
        if summary is None:
            continue
        measure = measure or ("nDCG@10" if "nDCG@10" in summary["measures"] else next(iter(summary["measures"])))
        for entry in summary["sizes"]:
            values.setdefault((r.method, (entry["layers"], entry["dim"])), {})[name] = entry["metrics"][measure]
    if measure is None:
        return None
    methods = [m for m in SIZED if any(r.method == m for r in runs)]
    rows, means = [], {m: [] for m in methods}
    for s in sizes_of(cfg):
        cells = []
        for m in methods:
            v = values.get((m, (s.layers, s.dim)), {})
            cell = float(np.mean([v[c] for c in collections])) if set(v) == set(collections) else None
            means[m].append(cell)
            cells.append("-" if cell is None else _fmt(cell))
        rows.append([f"{s.name} ({s.key})", *cells])
    rows.append(
        ["average over the sizes", *("-" if None in means[m] else _fmt(float(np.mean(means[m]))) for m in methods)]
    )
    title = (
        f"Out-of-domain: {measure} averaged over {len(collections)} collection"
        f"{'s' if len(collections) > 1 else ''} ({', '.join(collections)}; `eval.suite`, {cfg.experiment.suite})"
    )
    table = markdown_table(["size", *(LABELS[m] for m in methods)], rows)
    series = {LABELS[m]: [(s, {measure: v}) for s, v in zip(sizes_of(cfg), means[m]) if v is not None] for m in methods}
    series = {label: points for label, points in series.items() if points}
    if out_dir is not None and series:
        plot_measures(
            series, [measure], out_dir / "out-of-domain.png", f"{cfg.name}: out of domain ({', '.join(collections)})"
        )
        table += "\n![out-of-domain.png](results/out-of-domain.png)\n"
    return title, table


def ablation_table(cfg: DictConfig, results: Results, splits: Sequence[str]) -> str | None:
    """SRL vs SRL without the KL term per size, with the paired t-test's p-value between the two."""
    if "srl" not in results or "srl-nokl" not in results:
        return None
    measures = list(cfg.eval.metrics)
    headers = ["size", *[f"{sp} {m} {lab}" for sp in splits for m in measures[:2] for lab in ("SRL", "w/o KL", "p")]]
    rows = []
    for s in sizes_of(cfg):
        key, row = (s.layers, s.dim), [f"{s.name} ({s.key})"]
        for sp in splits:
            for m in measures[:2]:
                p = _pvalue(results, "srl", "srl-nokl", sp, key, m)
                row += [
                    _fmt(_value(results, "srl", sp, key, m)),
                    _fmt(_value(results, "srl-nokl", sp, key, m)),
                    "-" if p is None else f"{p:.3f}",
                ]
        rows.append(row)
    return markdown_table(headers, rows)


def compare(results: Results, a: str, b: str, split: str, measure: str, sizes, alpha: float) -> dict | None:
    """Method `a` against `b` at each size: how often ahead, how often significantly ahead or behind
    (paired t-test on the per-query values, averaged over seeds), the mean and the worst difference."""
    if a not in results or b not in results:
        return None
    triples = []
    for s in sizes:
        key = (s.layers, s.dim)
        va, vb = _value(results, a, split, key, measure), _value(results, b, split, key, measure)
        if va is not None and vb is not None:
            triples.append((va, vb, _pvalue(results, a, b, split, key, measure)))
    return tally(triples, alpha)


def tally(triples, alpha: float) -> dict | None:
    """`(value of a, value of b, p)` per compared cell -> how often `a` is ahead, significantly ahead or
    behind, the mean and the worst difference; None for no cell."""
    gaps = [va - vb for va, vb, _ in triples]
    if not gaps:
        return None
    return {
        "sizes": len(gaps),
        "ahead": sum(va > vb for va, vb, _ in triples),
        "significantly_ahead": sum(va > vb and p < alpha for va, vb, p in triples),
        "significantly_behind": sum(va < vb and p < alpha for va, vb, p in triples),
        "mean_difference": float(np.mean(gaps)),
        "worst_difference": float(min(gaps)),
    }


# The paper's claims: (title, method, against, which sizes, how it is judged). "ahead": the method must be
# ahead at every size; "close": it must not be significantly behind at any size.
CLAIMS = (
    ("SRL > 2DMSE at every size", "srl", "2dmse", "all", "ahead"),
    ("SRL close to the separately trained models on the diagonal", "srl", "separate", "all", "close"),
    ("SMAE pre-training helps the small sizes (SMAE+SRL > SRL)", "smae-srl", "srl", "small", "ahead"),
    ("KL alignment helps (SRL > SRL w/o KL)", "srl", "srl-nokl", "all", "ahead"),
    (
        "Not the paper's: one SRL run for the FLOPs of the six separate models, against them",
        "srl-matched",
        "separate",
        "all",
        "close",
    ),
)


def verdict(c: dict, kind: str, unit: str = "sizes") -> str:
    """Whether a claim holds on one split and measure, and how strongly, in words (`unit`: what was compared)."""
    n, ahead, sig_w, sig_l = c["sizes"], c["ahead"], c["significantly_ahead"], c["significantly_behind"]
    if kind == "close":
        if sig_l == 0:
            word = "holds" + (f" (and ahead at every {unit.rstrip('s')})" if ahead == n else "")
        else:
            word = "holds in part" if sig_l < n / 2 else "does not hold"
        return (
            f"{word}: significantly behind at {sig_l} of {n} {unit}, ahead at {ahead} ({sig_w} significantly); "
            f"mean difference {c['mean_difference']:+.4f}, largest deficit {min(c['worst_difference'], 0):+.4f}"
        )
    if ahead == n and sig_l == 0:
        word = "holds strongly" if sig_w == n else "holds" if sig_w >= n / 2 else "holds weakly"
    elif ahead > n / 2 and (
        sig_l == 0 or sig_w > sig_l
    ):  # mostly ahead, and more often significantly ahead than behind
        word = "holds in part"
    else:
        word = "does not hold"
    return (
        f"{word}: ahead at {ahead} of {n} {unit} ({sig_w} significantly, {sig_l} significantly behind); "
        f"mean difference {c['mean_difference']:+.4f}"
    )


def claims(cfg: DictConfig, results: Results, splits: Sequence[str]) -> list[str]:
    """Each claim of the paper checked against the numbers: per split and measure, whether it holds and how strongly."""
    sizes = list(sizes_of(cfg))
    small = sizes[: max(1, len(sizes) // 2)]
    alpha = float(cfg.eval.alpha)
    lines = []
    for title, a, b, which, kind in CLAIMS:
        found = [
            (sp, m, compare(results, a, b, sp, m, small if which == "small" else sizes, alpha))
            for sp in splits
            for m in list(cfg.eval.metrics)[:2]
        ]
        found = [(sp, m, c) for sp, m, c in found if c]
        if not found:
            continue
        scope = f" ({', '.join(s.name for s in small)})" if which == "small" else ""
        lines.append(f"**{title}**{scope}:\n")
        lines += [f"- {sp} {m}: {verdict(c, kind)}" for sp, m, c in found]
        lines.append("")
    return lines


# ---------------------------------------------------------------- hybrids (the paper's v3, as this toolkit reads it)


@dataclass(frozen=True)
class HybridCells:
    """Where a hybrid's comparisons are in `Results`: `(method, key)` of the hybrid, of each part alone (its
    model at the part's size), of each part's model at the hybrid's layers-of-the-part and bytes (`equal`),
    and of SRL at the hybrid's layers and bytes; `labels[i]`: the method of part `i`."""

    size: Size
    labels: tuple[str, ...]
    hybrid: tuple[str, Key]
    parts: tuple[tuple[str, Key], ...]
    equal: tuple[tuple[str, Key], ...]
    srl: tuple[str, Key]


def hybrid_cells(runs: Sequence[ReportedRun]) -> list[HybridCells]:
    """The hybrids the experiment evaluated, each with the cells it is compared with; a part's model is the
    run it names (`@<run>`), else `HYBRID_BASE`."""
    method_of = {r.name: r.method for r in runs}
    out = []
    for run in runs:
        if run.method != "hybrid":
            continue
        for h in run.sizes:
            labels = tuple(method_of.get(p.model or HYBRID_BASE, p.model or HYBRID_BASE) for p in h.parts)
            out.append(
                HybridCells(
                    h,
                    labels,
                    ("hybrid", h.ident),
                    tuple((m, (p.size.layers, p.size.dim)) for m, p in zip(labels, h.parts)),
                    tuple((m, (p.size.layers, h.dim)) for m, p in zip(labels, h.parts)),
                    ("srl", (h.layers, h.dim)),
                )
            )
    return out


def _cell(results: Results, split: str, cell: tuple[str, Key]) -> SizeScores | None:
    hit = results.get(cell[0], {}).get(split, {}).get(cell[1])
    return None if hit is None else hit[1]


def compare_cells(results: Results, pairs, split: str, measure: str, alpha: float) -> dict | None:
    """`compare` over pairs of cells `(a, b)` (each `(method, key)`): how often `a` is ahead, significantly
    ahead or behind (paired t-test), the mean and the worst difference; None when no pair has both."""
    triples = []
    for a, b in pairs:
        ra, rb = _cell(results, split, a), _cell(results, split, b)
        if ra is not None and rb is not None:
            ea, eb = ra.evaluation, rb.evaluation
            triples.append(
                (
                    ea.aggregate[measure],
                    eb.aggregate[measure],
                    paired_ttest(ea.per_query[measure], eb.per_query[measure]),
                )
            )
    return tally(triples, alpha)


def complementarity(a: SizeScores, b: SizeScores, measure: str) -> dict:
    """How two embeddings' per-query results complement each other on one measure: the queries each is
    better at (`wins_a`, `wins_b`, `ties`); the Jaccard overlap of the queries each scores above 0 at
    (a relevant passage in its top 10 for RR@10 / nDCG@10): low = each finds what the other misses; the
    oracle gain, the mean per query of the better of the two over the better mean, and the paired t-test
    of the per-query better-of-two against the better embedding alone."""
    qa, qb = a.evaluation.per_query[measure], b.evaluation.per_query[measure]
    queries = sorted(qa)
    x, y = np.array([qa[q] for q in queries]), np.array([qb.get(q, 0.0) for q in queries])
    solved_a, solved_b = set(np.flatnonzero(x > 0)), set(np.flatnonzero(y > 0))
    union = solved_a | solved_b
    best = np.maximum(x, y)
    better = x if x.mean() >= y.mean() else y
    return {
        "queries": len(queries),
        "wins_a": int((x > y).sum()),
        "wins_b": int((y > x).sum()),
        "ties": int((x == y).sum()),
        "jaccard": len(solved_a & solved_b) / len(union) if union else 1.0,
        "oracle_gain": float(best.mean() - better.mean()),
        "p": paired_ttest(dict(zip(queries, best)), dict(zip(queries, better))),
    }


def complementary_verdict(found: Sequence[dict], alpha: float) -> str:
    """Depth- and width-wise parts complement each other, over the hybrids of one split and measure: *holds*
    when at every hybrid each part is better at some queries and the better-of-two per query beats the
    better part significantly; *holds in part* when at some; else it *does not hold*."""
    ok = sum(c["wins_a"] > 0 and c["wins_b"] > 0 and c["oracle_gain"] > 0 and c["p"] < alpha for c in found)
    word = "holds" if ok == len(found) else "holds in part" if ok else "does not hold"
    wins_a, wins_b, ties = (sum(c[k] for c in found) for k in ("wins_a", "wins_b", "ties"))
    return (
        f"{word}: at {ok} of {len(found)} hybrids each part is better at some queries and the per-query "
        f"better of the two beats the better part (p < {alpha}); queries won by the first part / the second / "
        f"tied: {wins_a} / {wins_b} / {ties}; mean Jaccard overlap of the queries each scores above 0 at: "
        f"{np.mean([c['jaccard'] for c in found]):.3f}; mean oracle gain "
        f"{np.mean([c['oracle_gain'] for c in found]):+.4f}"
    )


def _cell_label(method: str, key: Key, note: str) -> str:
    return f"{LABELS.get(method, method)} {key[0]}x{key[1]} ({note})"


def hybrid_section(
    cfg: DictConfig, results: Results, splits: Sequence[str], hybrids: Sequence[HybridCells], cost: dict
) -> tuple[str, dict] | None:
    """The hybrids' table and claims (Markdown) and their numbers (for summary.json); None without hybrids."""
    if not hybrids:
        return None
    measures, alpha = list(cfg.eval.metrics)[:2], float(cfg.eval.alpha)
    headers = ["hybrid", "embedding", *[f"{sp} {m}" for sp in splits for m in measures]]
    rows, record = [], {"hybrids": [], "claims": {}}
    for h in hybrids:
        lines = [(h.hybrid, f"hybrid {h.size.layers}x{h.size.dim}")]
        lines += [(c, _cell_label(*c, "part")) for c in h.parts]
        lines += [(c, _cell_label(*c, "equal bytes")) for c in dict.fromkeys(h.equal)]
        lines += [(h.srl, _cell_label(*h.srl, "equal bytes and layers"))]
        entry = {"hybrid": h.size.key, "layers": h.size.layers, "dim": h.size.dim, "cells": []}
        for i, (cell, label) in enumerate(lines):
            values = {}
            row = [h.size.key if i == 0 else "", label]
            for sp in splits:
                base, r = _cell(results, sp, h.hybrid), _cell(results, sp, cell)
                for m in measures:
                    p = (
                        None
                        if i == 0 or r is None or base is None
                        else paired_ttest(base.evaluation.per_query[m], r.evaluation.per_query[m])
                    )
                    v = None if r is None else r.evaluation.aggregate[m]
                    row.append(_fmt(v, p, alpha))
                    values.setdefault(sp, {})[m] = {"value": v, "p": p}
            rows.append(row)
            entry["cells"].append({"embedding": label, "method": cell[0], "key": list(cell[1]), "splits": values})
        record["hybrids"].append(entry)
    claims_md = []
    plans = [
        (
            "The hybrid beats both parts at equal bytes (each part's model at the hybrid's bytes)",
            lambda h: [(h.hybrid, c) for c in dict.fromkeys(h.equal)],
            "ahead",
            "comparisons",
        ),
        ("Beside SRL: the hybrid beats SRL at its layers and bytes", lambda h: [(h.hybrid, h.srl)], "ahead", "hybrids"),
    ]
    for title, pairs, kind, unit in plans:
        found = [
            (sp, m, compare_cells(results, [x for h in hybrids for x in pairs(h)], sp, m, alpha))
            for sp in splits
            for m in measures
        ]
        found = [(sp, m, c) for sp, m, c in found if c]
        if found:
            claims_md += [f"**{title}**:\n", *(f"- {sp} {m}: {verdict(c, kind, unit)}" for sp, m, c in found), ""]
            record["claims"][title] = {f"{sp} {m}": c for sp, m, c in found}
    title = "Depth- and width-wise are complementary (the hybrid's parts, per query)"
    found = []
    for sp in splits:
        for m in measures:
            per = []
            for h in hybrids:
                distinct = list(dict.fromkeys(h.parts))  # the first two parts from different models
                a = distinct[0]
                b = next((c for c in distinct[1:] if c[0] != a[0]), None)
                ra, rb = _cell(results, sp, a), None if b is None else _cell(results, sp, b)
                if ra is not None and rb is not None:
                    per.append(complementarity(ra, rb, m))
            if per:
                found.append((sp, m, per))
    if found:
        claims_md += [
            f"**{title}**:\n",
            *(f"- {sp} {m}: {complementary_verdict(per, alpha)}" for sp, m, per in found),
            "",
        ]
        record["claims"][title] = {f"{sp} {m}": per for sp, m, per in found}
    spent = cost.get("hybrid")
    text = (
        "Each hybrid against its parts alone, each part's model at the hybrid's bytes (`equal bytes`: the "
        "same bytes per passage spent on one model's embedding at the part's layers) and SRL at the hybrid's "
        f"layers and bytes; `*`: differs from the hybrid at p < {alpha} (paired t-test). The parts of two "
        "models are encoded at the same time (bench/hybrid_latency.py: the latency of a hybrid against its "
        "slowest part). "
        + (
            f"Its models cost {spent['flops'] / 1e15:.3g} PFLOP and {spent['seconds'] / 60:.1f} min to train "
            f"together ({spent['runs']} runs). "
            if spent
            else ""
        )
        + "This reading of the paper's v3 abstract is the toolkit's (docs/training.md).\n\n"
        + markdown_table(headers, rows)
        + "\n"
        + "\n".join(claims_md)
    )
    return text, record


# ---------------------------------------------------------------- plots


def _heatmap(
    grid: np.ndarray, rows: Sequence[int], cols: Sequence[int], title: str, path: Path, diverging: bool, marks: set[Key]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.4 + 0.9 * len(cols), 1.2 + 0.6 * len(rows)))
    finite = grid[np.isfinite(grid)]
    if diverging:
        lim = float(np.abs(finite).max()) if finite.size else 1.0
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim or -1, vmax=lim or 1, origin="lower", aspect="auto")
    else:
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i, n in enumerate(rows):
        for j, d in enumerate(cols):
            if np.isfinite(grid[i, j]):
                weight = "bold" if (n, d) in marks else "normal"
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:+.3f}" if diverging else f"{grid[i, j]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    fontweight=weight,
                )
    ax.set_xticks(range(len(cols)), [str(d) for d in cols])
    ax.set_yticks(range(len(rows)), [str(n) for n in rows])
    ax.set_xlabel("embedding dims")
    ax.set_ylabel("layers")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def grid_values(results: Results, method: str, split: str, measure: str, rows, cols) -> np.ndarray:
    out = np.full((len(rows), len(cols)), np.nan)
    for i, n in enumerate(rows):
        for j, d in enumerate(cols):
            v = _value(results, method, split, (n, d), measure)
            out[i, j] = np.nan if v is None else v
    return out


def heatmaps(cfg: DictConfig, results: Results, out_dir: Path) -> list[tuple[str, str, str]]:
    """Grid heatmaps on `experiment.grid_split`: SRL itself, SRL - 2DMSE, SRL - separate (the paper's
    Figures 3-5). Returns (title, file, markdown table) per heatmap."""
    split, measure = str(cfg.experiment.grid_split), str(cfg.experiment.heatmap_metric)
    sizes = sizes_of(cfg)
    rows = list(range(1, sizes.largest.layers + 1))
    cols = sorted({s.dim for s in sizes})
    marks = {(s.layers, s.dim) for s in sizes}
    made = []
    if "srl" not in results:
        return made
    srl = grid_values(results, "srl", split, measure, rows, cols)
    plans = [("srl", None, f"SRL {measure} on {split}", False)]
    plans += [
        (f"srl-minus-{other}", other, f"SRL - {LABELS[other]} {measure} on {split}", True)
        for other in ("2dmse", "separate")
        if other in results
    ]
    for stem, other, title, diverging in plans:
        grid = srl if other is None else srl - grid_values(results, other, split, measure, rows, cols)
        if not np.isfinite(grid).any():
            continue
        path = out_dir / f"grid-{stem}.png"
        _heatmap(grid, rows, cols, title + " (bold: the configured sizes)", path, diverging, marks)
        fmt = "{:+.3f}" if diverging else "{:.3f}"
        table = markdown_table(
            ["layers \\ dims", *map(str, cols)],
            [[str(n), *[fmt.format(v) if np.isfinite(v) else "-" for v in grid[i]]] for i, n in enumerate(rows)][::-1],
        )
        made.append((title, path.name, table))
    return made


def size_plots(cfg: DictConfig, results: Results, splits: Sequence[str], out_dir: Path) -> list[str]:
    sizes = sizes_of(cfg)
    files = []
    for sp in splits:
        series = {}
        for m in SIZED:
            if m not in results:
                continue
            pts = [
                (s, results[m][sp][(s.layers, s.dim)][1].evaluation.aggregate)
                for s in sizes
                if (s.layers, s.dim) in results[m].get(sp, {})
            ]
            if pts:
                series[LABELS[m]] = pts
        if series:
            path = out_dir / f"sizes-{sp}.png"
            plot_measures(series, list(cfg.eval.metrics), path, f"{cfg.name} / {sp}")
            files.append(path.name)
    return files


# ---------------------------------------------------------------- files behind the numbers


def copy_run(src: Path, dst: Path, depth: int) -> None:
    """A run file cut to `depth` per query, gzipped."""
    kept: dict[str, int] = {}

    def lines():
        with open(src, encoding="utf-8") as f:
            for line in f:
                qid = line.split(" ", 1)[0]
                if kept.get(qid, 0) < depth:
                    kept[qid] = kept.get(qid, 0) + 1
                    yield line

    atomic_write_gzip(dst, lines())


GRID_METHODS = ("srl", "2dmse", "separate")  # the heatmaps' methods


def published_cells(cfg: DictConfig, results: Results, hybrids: Sequence[HybridCells] = ()):
    """`(method, split, key, run name, result, depth)` of every run file the report shows: the configured
    sizes of every method on every split, every cell of the hybrids' table, and the other grid cells of the
    heatmaps' methods on the grid split."""
    named = {(s.layers, s.dim) for s in sizes_of(cfg)}
    shown = {c for h in hybrids for c in (h.hybrid, *h.parts, *h.equal, h.srl)}
    for method, per_split in results.items():
        for split, cells in per_split.items():
            for key, (run_name, r) in sorted(cells.items()):
                if key in named or (method, key) in shown:
                    yield method, split, key, run_name, r, int(cfg.experiment.run_depth)
                elif method in GRID_METHODS and split == str(cfg.experiment.grid_split):
                    yield method, split, key, run_name, r, int(cfg.experiment.grid_run_depth)


def publish_files(cfg: DictConfig, results: Results, out_dir: Path, runs: Sequence[ReportedRun]) -> int:
    """Copy the report's run files (cut, gzipped) with their records, each run's eval JSON, and the
    per-query values behind every number of the tables (`per_query.json.gz`)."""
    copied = 0
    per_query: dict = {}
    named = {(s.layers, s.dim) for s in sizes_of(cfg)} | {h.hybrid[1] for h in hybrid_cells(runs)}
    named |= {c[1] for h in hybrid_cells(runs) for c in (*h.parts, *h.equal, h.srl)}
    for method, split, key, run_name, r, depth in published_cells(cfg, results, hybrid_cells(runs)):
        dst = out_dir / run_name / "runs" / split / f"{run_stem(r.run)}.trec.gz"
        copy_run(r.run, dst, depth)
        record = {k: v for k, v in (read_run_record(r.run) or {}).items() if k != "file"}
        write_run_record(dst, {**record, "published_depth": depth})  # the summary of the cut copy
        copied += 1
        if key in named:
            per_query.setdefault(method, {}).setdefault(split, {})[r.size.name] = r.evaluation.per_query
    atomic_write_gzip(out_dir / "per_query.json.gz", [json.dumps(per_query, sort_keys=True)])
    for run in runs:
        for f in sorted(run.eval_dir.glob("*.json")):
            target = out_dir / run.name / "eval" / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    return copied


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(cfg_path: str | None, overrides: Sequence[str], report_dir: Path) -> dict:
    import torch

    commit = _git("rev-parse", "HEAD")
    # uncommitted changes outside the report's own directory (regenerating the report changes it)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){report_dir}")
    return {
        "command": " ".join(["python -m experiment", *(["--config", str(cfg_path)] if cfg_path else []), *overrides]),
        "commit": commit + (" (with uncommitted changes)" if dirty and dirty != "unknown" else ""),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }


def _discussion(path: Path) -> str:
    if path.is_file():
        text = path.read_text()
        if DISCUSSION_START in text and DISCUSSION_END in text:
            return text[text.index(DISCUSSION_START) : text.index(DISCUSSION_END) + len(DISCUSSION_END)]
    return f"{DISCUSSION_START}\n_(not written yet)_\n{DISCUSSION_END}"


def seeds_sentence(cfg: DictConfig, runs: Sequence[ReportedRun]) -> str:
    seeds = list(dict.fromkeys(r.seed for r in runs if r.method == "srl")) or [cfg.seed]
    if len(seeds) == 1:
        return f"Seed {seeds[0]}."
    repeated = sorted({LABELS[r.method] for r in runs if r.seed != seeds[0]})
    return (
        f"{', '.join(repeated)} ran with seeds {', '.join(map(str, seeds))}: their cells are the mean over the "
        f"seeds ± the standard deviation of the seeds' means, and their t-tests use the per-query values "
        f"averaged over the seeds; the other methods ran with seed {seeds[0]}."
    )


def cost_ratio(cost: dict) -> str:
    """How srl-matched's budget came about, from the recorded numbers."""
    matched, separate, srl = cost["srl-matched"], cost.get("separate"), cost.get("srl")
    text = f"{matched['steps']:.0f} steps"
    if separate and srl:
        text += (
            f": the FLOPs of the separate models together ({separate['flops'] / 1e15:.3g} PFLOP) over SRL's "
            f"{srl['flops'] / srl['steps'] / 1e12:.3g} TFLOP per step"
        )
    return text + "."


def write_report(cfg: DictConfig, runs: Sequence[ReportedRun], cfg_path: str | None, overrides: Sequence[str]) -> Path:
    """Read eval's files, tabulate, plot, copy; returns the path of results.md."""
    report_dir = Path(cfg.experiment.report_dir) if cfg.experiment.report_dir else Path(cfg.output_dir) / "report"
    out_dir = report_dir / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = report_splits(cfg)
    results = collect(runs, names, list(cfg.eval.metrics))
    summary = summarise(cfg, results, names)
    summary["cost"] = method_costs(runs)
    prov = provenance(cfg_path, overrides, report_dir)
    plots = size_plots(cfg, results, names, out_dir)
    maps = heatmaps(cfg, results, out_dir)
    copied = publish_files(cfg, results, out_dir, runs)
    hybrid = hybrid_section(cfg, results, names, hybrid_cells(runs), summary["cost"])
    if hybrid:
        summary["hybrids"] = hybrid[1]
    atomic_write_json(out_dir / "summary.json", {**summary, "provenance": prov})

    md = report_dir / "results.md"
    budget = f"{cfg.train.max_steps} steps" if cfg.train.max_steps else f"{cfg.train.epochs} epoch(s) of steps"
    queries = ", ".join(f"{n} {split_queries(runs, n)} queries" for n in names)
    ablation = ablation_table(cfg, results, names)
    parts = [
        f"# Results: {cfg.name}\n",
        "Generated by `python -m experiment` (experiment/report.py); the tables, plots and claims below are "
        "recomputed from eval's files (per-size means, per-query values) on every run.\n",
        "| | |\n|---|---|\n"
        + "".join(f"| {k} | {'`' + v + '`' if k in ('command', 'commit') else v} |\n" for k, v in prov.items()),
        f"Collection: corpus `{cfg.data.corpus}`; {queries}; training groups `{cfg.data.train}`. "
        f"Backbone `{cfg.model.name_or_path}` ({cfg.model.pooling} pooling, normalize={cfg.model.normalize}). "
        f"Every fine-tuned run: {budget} of "
        f"{cfg.train.batch_size} queries x {cfg.train.group_size} passages, lr {cfg.train.learning_rate}, "
        f"temperature {cfg.train.temperature}, passages <= {cfg.model.passage_max_length} tokens. "
        f"{seeds_sentence(cfg, runs)} 2DMSE samples its layer and dim per step as "
        + (
            "the paper does (`n ~ U(1, N-1)`, `d ~ U(1, D-1)`, `train.twodmse_dims: uniform`)."
            if cfg.train.twodmse_dims == "uniform"
            else "sentence-transformers' Matryoshka2dLoss does (`d` from the size list, `train.twodmse_dims: list`)."
        )
        + (
            f" SRL (separate's FLOPs) is SRL trained for {cost_ratio(summary['cost'])}"
            if "srl-matched" in summary["cost"]
            else ""
        )
        + "\n",
        f"## Table 4: every size and method\n\n`*`: differs from {LABELS.get(summary['reference'], summary['reference'])} "
        f"at p < {summary['alpha']} (two-sided paired t-test over the queries).\n\n{table4(summary)}",
        f"## Table 1: averages over the {len(sizes_of(cfg))} sizes, and what training cost\n\n"
        "Train PFLOP: model FLOPs of the training runs (forward + backward of the matrix products on the real "
        "tokens, only the layers each step runs; `train/flops.py`), wall time as recorded by the runs "
        f"({', '.join(sorted({c['device'] for c in summary['cost'].values()})) or '-'}). `separate` is its "
        f"{len(sizes_of(cfg))} models together, SMAE+SRL includes the pre-training and its head warm-up; "
        "with several seeds, one seed's cost.\n\n"
        f"{averages_table(summary)}",
    ]
    if ablation:
        parts.append(f"## Table 2: SRL with and without the KL term\n\np: paired t-test between the two.\n\n{ablation}")
    if hybrid:
        parts.append("## Hybrids: depth- and width-wise embeddings joined\n\n" + hybrid[0])
    ood = out_of_domain(cfg, runs, out_dir)
    if ood:
        parts.append(f"## {ood[0]}\n\nThe models trained above, never trained on these collections.\n\n{ood[1]}")
    parts.append(
        "## The paper's claims, checked\n\nPer split and measure: ahead = better mean at a size; "
        f"significantly = paired t-test p < {cfg.eval.alpha}; the cost of each method is in Table 1. "
        "A claim that one method is better *holds strongly* / *holds* / *holds weakly* when it is ahead at "
        "every size and significantly behind at none, significantly ahead at all / at least half / fewer "
        "of them; *holds in part* when it is ahead at most sizes and either never significantly behind or "
        "more often significantly ahead than behind; else it *does not hold*. A claim that one is close to "
        "another *holds* when it is significantly behind at no size, *in part* at fewer than half.\n\n"
        + "\n".join(claims(cfg, results, names))
        + "\n"
    )
    parts.append("## Metric vs size\n\n" + "\n".join(f"![{p}](results/{p})" for p in plots) + "\n")
    if maps:
        parts.append(
            f"## The (layer, dim) grid ({cfg.experiment.grid_split}, {cfg.experiment.heatmap_metric})\n\n"
            "Every layer x every dim of the size list. A `separate` model is trained at one size and has only its "
            "layers: its row of the grid is that model cut to each dim (the diagonal cell is the size it was "
            "trained for).\n\n" + "\n".join(f"### {t}\n\n![{f}](results/{f})\n\n{tab}" for t, f, tab in maps)
        )
    depth, grid_depth = int(cfg.experiment.run_depth), int(cfg.experiment.grid_run_depth)
    deep = [m for m in cfg.eval.metrics if re.search(r"@(\d+)$", m) and int(m.rsplit("@", 1)[1]) > depth]
    parts.append(
        f"## Files\n\n`results/summary.json` holds every number and p-value, `results/per_query.json.gz` the "
        f"per-query values behind them (each method, split, size and measure). {copied} run files are under "
        f"`results/<run>/runs/<split>/` (gzipped, cut to depth {depth}; the heatmaps' other grid cells to depth "
        f"{grid_depth}) with each run's eval JSON in `results/<run>/eval/`. Re-derive a run's numbers with\n\n"
        f"    python -m eval --config {cfg_path or 'CONFIG'} paths.runs={out_dir}/srl/runs "
        f"paths.eval=/tmp/srl-eval eval.sizes=all\n\n"
        + (
            f"{', '.join(deep)} need{'s' if len(deep) == 1 else ''} deeper runs than published (the full runs stay "
            f"under `{cfg.output_dir}/<run>/runs/`, {cfg.search.depth} deep; re-running the experiment remakes them); "
            f"their per-query values are in `per_query.json.gz`.\n"
            if deep
            else ""
        )
    )
    parts.append("## Discussion\n\n" + _discussion(md) + "\n")
    atomic_write_text(md, "\n".join(parts))
    print(f"experiment: report in {md}", file=sys.stderr)
    return md
