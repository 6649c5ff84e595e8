"""Run files + qrels -> per-size metric tables, plots and significance tests.

`evaluate_experiment(cfg)` evaluates one experiment's runs (`<runs>/<split>/<size>.trec`) and
writes `<eval>/<split>.{json,md,csv,png}` and the per-query values `<eval>/<split>.perquery.json.gz`
(`retrieval.evalfile`); `compare_experiments(cfg, dirs)` puts several
experiments side by side with a paired two-sided t-test per size against a baseline and
writes `<eval>/compare-<split>.{json,md,csv,png}`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from retrieval.checkpoint import refresh_card
from retrieval.config import experiment_paths
from retrieval.data import EvalSplit, check_coverage, load_eval_splits, qrels_coverage
from retrieval.errors import StarbucksError
from retrieval.evalfile import write_per_query
from retrieval.io import atomic_write_json, atomic_write_text
from retrieval.names import parse_names
from retrieval.quantize import split_run_name
from retrieval.metrics import Evaluation, evaluate, paired_ttest, parse_measures
from retrieval.runfile import find_runs, read_run, verified_run
from retrieval.sizes import Size, hybrid_key
from retrieval.store import PASSAGE_FIELDS, EmbeddingStore
from retrieval.tables import markdown_table, plot_measures, size_label, text_table, write_csv


@dataclass
class SizeResult:
    size: Size
    run: Path
    evaluation: Evaluation
    run_queries: int = 0  # judged queries of the split that the run ranks anything for
    coverage: dict | None = None  # the qrels' relevant passages against the searched corpus (None: unknown)


def rel_level(cfg: DictConfig, split: str) -> int:
    """The minimum relevance of binary measures for a split (`eval.split_rel_level`, else `eval.rel_level`)."""
    return int((cfg.eval.split_rel_level or {}).get(split, cfg.eval.rel_level))


def split_names(cfg: DictConfig, runs_dirs: Sequence[Path]) -> list[str]:
    """`eval.splits`, or (all) every configured split that has run files in one of `runs_dirs`."""
    wanted = parse_names(cfg.eval.splits)
    if wanted is not None:
        return wanted
    found = [s for s in cfg.data.eval_splits if any((Path(d) / s).is_dir() for d in runs_dirs)]
    if not found:
        raise StarbucksError(f"no run files under {', '.join(map(str, runs_dirs))}; run `python -m search` first")
    return found


def select_runs(runs_dir: Path, split: str, spec, strict: bool = True) -> list[tuple[Size, Path]]:
    """The split's run files for the sizes in `spec` (names or `LxD`; `all`: every one)."""
    found = find_runs(runs_dir, split)
    wanted = parse_names(spec)
    if wanted is None:
        if strict and not found:
            raise StarbucksError(f"no run files in {runs_dir / split}; run `python -m search` first")
        return found
    picked = []
    for w in map(hybrid_key, wanted):
        # a size's own run (fp16), or one precision of it named in full (`grande.int8`) ...
        match = [(s, p) for s, p in found if w == s.name or (w == s.key and not _quantized(s))][:1]
        if match and not _quantized(match[0][0]):  # ... and a size named alone brings its other precisions
            match += [(s, p) for s, p in found if _quantized(s) and split_run_name(s.name)[0] == match[0][0].name]
        elif not match:  # searched at quantised precisions only
            match = [(s, p) for s, p in found if _quantized(s) and w in (split_run_name(s.name)[0], s.key)]
        if match:
            picked.extend(match)
        elif strict:
            raise StarbucksError(f"no run file for size {w!r} in {runs_dir / split}; run `python -m search` for it")
    return list(dict.fromkeys(picked))


def _quantized(size: Size) -> bool:
    """Whether a run's size is a quantised search of a size (`grande.int8`: `retrieval.runfile.find_runs`)."""
    return bool(size.precision)


def _searched_store(path: Path, record: dict | None) -> tuple[EmbeddingStore | None, dict | None]:
    """The embedding store a run's record names and its meta, when it is still there and finished. A run
    file copied or moved out of the experiment whose store it names (`cp -r runs/a runs/a-before`) is judged
    by the store at the same place in its own experiment (`<experiment>/embeddings/<size>` for
    `<experiment>/runs/<split>/<size>.trec`), when there is one; otherwise (`paths.runs` or
    `paths.embeddings` set apart from the experiment) by the store it names."""
    if not (record or {}).get("embeddings"):
        return None, None
    named = Path(record["embeddings"])
    if not path.resolve().is_relative_to(named.parent.parent.resolve()):
        own = path.parent.parent.parent / named.parent.name / named.name
        named = own if (own / "meta.json").is_file() else named
    store = EmbeddingStore(named)
    meta = store.read_meta()
    return (store, meta) if meta and meta.get("complete") else (None, None)


def _coverage(record: dict | None, split: EvalSplit, store: EmbeddingStore | None, meta: dict | None) -> dict | None:
    """The split's relevant passages against the corpus the run searched: from its embedding store when it
    is still there, else the numbers search recorded."""
    record = record or {}
    if meta and meta.get("ids_sha256") == record.get("passages", {}).get("ids_sha256"):
        if _PASSAGE_IDS.get("sha") != meta["ids_sha256"]:  # the sizes of a corpus share their ids: read them once
            _PASSAGE_IDS.update(sha=meta["ids_sha256"], ids=frozenset(store.ids()))
        return qrels_coverage(split.qrels, _PASSAGE_IDS["ids"])
    return record.get("qrels_coverage")


_PASSAGE_IDS: dict = {}  # the ids of the last corpus looked at, by its ids_sha256


def _check_current(path: Path, record: dict | None, store: EmbeddingStore | None, meta: dict | None) -> None:
    """Refuse a run whose embedding store now holds other vectors than it was searched on: re-encoded
    since, and this run (say a precision no longer in search.quantization) not searched again."""
    saved = (record or {}).get("passages") or {}
    changed = next((k for k in PASSAGE_FIELDS if meta and k in saved and saved[k] != meta.get(k)), None)
    if changed:
        raise StarbucksError(
            f"run file {path} was searched on other embeddings than {store.dir} holds now ({changed} changed "
            f"since): re-run `python -m search` (with its precision in search.quantization) or delete it"
        )


def evaluate_run(size: Size, path: Path, split: EvalSplit, measures: Sequence[str], level: int) -> SizeResult:
    """Evaluate one run file after checking it is the file search wrote and covers what it should:
    qrels with none of their passages in the corpus are refused, missing passages and queries the run
    does not rank are warned about (and counted in the result)."""
    record = verified_run(path)
    store, meta = _searched_store(path, record)
    _check_current(path, record, store, meta)
    coverage = _coverage(record, split, store, meta)
    if coverage is not None:
        warning = check_coverage(split.name, coverage, "searched")
        if warning:
            print(f"eval: warning: {path.name}: {warning}", file=sys.stderr)
    run = read_run(path)
    covered = sum(1 for q in split.qrels if run.get(q))
    if covered < len(split.qrels):
        print(
            f"eval: warning: {path} ranks passages for {covered} of the {len(split.qrels)} judged queries of split "
            f"{split.name!r}; the others count as 0: re-run `python -m search` if that is not intended",
            file=sys.stderr,
        )
    return SizeResult(size, path, evaluate(run, split.qrels, measures, level), covered, coverage)


def evaluate_runs(
    runs: Sequence[tuple[Size, Path]], split: EvalSplit, measures: Sequence[str], level: int
) -> list[SizeResult]:
    return [evaluate_run(size, path, split, measures, level) for size, path in runs]


def _measures(cfg: DictConfig) -> list[str]:
    """`eval.metrics`, checked before any run is read."""
    names = [str(m) for m in cfg.eval.metrics]
    parse_measures(names)
    return names


def _fmt(value: float) -> str:
    return f"{value:.4f}"


# ---------------------------------------------------------------- one experiment


def evaluate_experiment(cfg: DictConfig) -> dict[str, list[SizeResult]]:
    """Evaluate each split's run files, print one table per split, write json/md/csv (and png)."""
    paths = experiment_paths(cfg)
    measures = _measures(cfg)
    names = split_names(cfg, [paths.runs])
    out: dict[str, list[SizeResult]] = {}
    for name, split in load_eval_splits(cfg.data.eval_splits, names).items():
        level = rel_level(cfg, name)
        results = evaluate_runs(select_runs(paths.runs, name, cfg.eval.sizes), split, measures, level)
        out[name] = results
        headers = ["size", *measures]
        rows = [[size_label(r.size), *(_fmt(r.evaluation.aggregate[m]) for m in measures)] for r in results]
        title = f"{cfg.name} / {name}: {len(split.qrels)} queries, relevant at level >= {level}"
        print(f"\n{title}\n{text_table(headers, rows)}")
        base = paths.eval / name
        atomic_write_text(base.with_suffix(".md"), f"# {title}\n\n{markdown_table(headers, rows)}")
        write_csv(
            base.with_suffix(".csv"),
            ["size", "layers", "dim", *measures],
            [[r.size.name, r.size.layers, r.size.dim, *(r.evaluation.aggregate[m] for m in measures)] for r in results],
        )
        atomic_write_json(
            base.with_suffix(".json"),
            {
                "experiment": str(cfg.name),
                "split": name,
                "rel_level": level,
                "queries": len(split.qrels),
                "qrels_coverage": next((r.coverage for r in results if r.coverage is not None), None),
                "measures": {m: str(x) for m, x in results[0].evaluation.measures.items()} if results else {},
                "sizes": [
                    {
                        "size": r.size.name,
                        "layers": r.size.layers,
                        "dim": r.size.dim,
                        "run": str(r.run),
                        "run_queries": r.run_queries,
                        "relevant_missing": None if r.coverage is None else r.coverage["missing"],
                        "metrics": r.evaluation.aggregate,
                    }
                    for r in results
                ],
            },
        )
        write_per_query(paths.eval, name, [(r.size, r.evaluation) for r in results])
        if cfg.eval.plot and results:
            plot_measures(
                {str(cfg.name): [(r.size, r.evaluation.aggregate) for r in results]},
                measures,
                base.with_suffix(".png"),
                title,
            )
    print(f"\neval: tables and plots in {paths.eval}", file=sys.stderr)
    card = refresh_card(paths.model, paths.eval, list(out), paths.embeddings, cfg.data.eval_splits)  # per-size results
    if card is not None:
        print(f"eval: results added to the model card {card}", file=sys.stderr)
    return out


# ---------------------------------------------------------------- several experiments


def _experiment_names(dirs: Sequence[Path]) -> list[str]:
    names = [d.name for d in dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in dirs]


def compare_experiments(cfg: DictConfig, dirs: Sequence[str | Path]) -> dict[str, dict]:
    """Side-by-side metrics of several experiment directories (each with `runs/`), tested per size
    against `eval.baseline` (a name or path among `dirs`; default the first) with a paired t-test."""
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not (d / "runs").is_dir():
            raise StarbucksError(f"{d} has no runs/ directory; give experiment directories such as runs/<name>")
    names = _experiment_names(dirs)
    baseline = names[0]
    if cfg.eval.baseline:
        wanted = str(cfg.eval.baseline)
        hits = [n for n, d in zip(names, dirs) if wanted in (n, str(d), d.name)]
        if not hits:
            raise StarbucksError(f"eval.baseline = {wanted!r} is not one of the experiments given ({', '.join(names)})")
        baseline = hits[0]
    measures = _measures(cfg)
    alpha = float(cfg.eval.alpha)
    out_dir = experiment_paths(cfg).eval
    report = {}
    splits = load_eval_splits(cfg.data.eval_splits, split_names(cfg, [d / "runs" for d in dirs]))
    for split_name, split in splits.items():
        level = rel_level(cfg, split_name)
        results = {
            n: {
                r.size.ident: r
                for r in evaluate_runs(
                    select_runs(d / "runs", split_name, cfg.eval.sizes, strict=False), split, measures, level
                )
            }
            for n, d in zip(names, dirs)
        }
        keys = sorted({k for per in results.values() for k in per})
        headers = ["size"] + [f"{m} {n}" for m in measures for n in names]
        rows, csv_rows, record = [], [], []
        for key in keys:
            size = next(results[n][key].size for n in names if key in results[n])
            base = results[baseline].get(key)
            row, entry = [size_label(size)], {"size": size.name, "layers": size.layers, "dim": size.dim, "results": {}}
            for m in measures:
                for n in names:
                    r = results[n].get(key)
                    if r is None:
                        row.append("-")
                        continue
                    p = None
                    if n != baseline and base is not None:
                        p = paired_ttest(base.evaluation.per_query[m], r.evaluation.per_query[m])
                    value = r.evaluation.aggregate[m]
                    row.append(_fmt(value) + ("*" if p is not None and p < alpha else ""))
                    entry["results"].setdefault(n, {})[m] = {"value": value, "p": p}
                    csv_rows.append([size.name, size.layers, size.dim, n, m, value, "" if p is None else p])
            rows.append(row)
            record.append(entry)
        title = (
            f"{split_name}: {len(split.qrels)} queries, relevant at level >= {level}; "
            f"* = p < {alpha} (paired t-test vs {baseline})"
        )
        print(f"\n{title}\n{text_table(headers, rows)}")
        stem = out_dir / f"compare-{split_name}"
        atomic_write_text(stem.with_suffix(".md"), f"# {title}\n\n{markdown_table(headers, rows)}")
        write_csv(stem.with_suffix(".csv"), ["size", "layers", "dim", "experiment", "measure", "value", "p"], csv_rows)
        report[split_name] = {
            "split": split_name,
            "rel_level": level,
            "queries": len(split.qrels),
            "baseline": baseline,
            "alpha": alpha,
            "experiments": dict(zip(names, map(str, dirs))),
            "sizes": record,
        }
        atomic_write_json(stem.with_suffix(".json"), report[split_name])
        if cfg.eval.plot and keys:
            series = {n: [(r.size, r.evaluation.aggregate) for _, r in sorted(results[n].items())] for n in names}
            plot_measures(series, measures, stem.with_suffix(".png"), f"{split_name} ({len(split.qrels)} queries)")
    print(f"\neval: comparison tables and plots in {out_dir}", file=sys.stderr)
    return report
