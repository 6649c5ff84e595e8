"""The out-of-domain suite: every model on every collection at every size (the paper's BEIR table).

    python -m eval.suite --models srl=runs/srl/model runs/full/model --collections data/python-docs \
        irds:beir/scifact/test [--suite configs/suites/offline.yaml] [--sizes ...] [--out runs/suite]

For each model and collection the library's ranking loop (`retrieval.ranking`, the encode and search
stages' own) encodes the corpus once for all sizes (one pass to the deepest layer, `StarbucksModel`)
and searches each size exactly (inner product over the stored vectors); the runs are evaluated
(`ir_measures`; nDCG@10 by default). Finished work is reused: the embedding stores, run files and
evaluations under `<out>/<model>/<collection>/` are checked against what they were made from and only
what is missing or stale is redone; a store whose shards list other passages than the corpus (it
changed since) is refused, as the encode stage refuses it.

A collection is a local BEIR directory (its `test` qrels, or `--split`), `irds:<id>` (e.g.
`irds:beir/scifact/test`), or either as `name=SOURCE`. Every passage its qrels judge relevant
must be in its corpus. Output in `<out>`: `suite.{json,md,csv}` (per model a table collections x
sizes with an average row; per collection and size the models side by side with a paired t-test
against the first) and `suite.png` (average of the first measure vs size, one line per model).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from retrieval.data import IRDS, EvalSplit, iter_corpus, load_split, qrels_coverage
from retrieval.errors import StarbucksError, cli_entry
from retrieval.evalfile import split_json, write_per_query
from retrieval.io import atomic_write_json, atomic_write_text
from retrieval.metrics import Evaluation, evaluate, paired_ttest, parse_measures
from retrieval.names import parse_names
from retrieval.ranking import corpus_blocks, default_searcher, encode_passages, encode_queries, open_stores, rank_store
from retrieval.runfile import read_run
from retrieval.sizes import Size, recorded_size
from retrieval.store import check_ids
from retrieval.tables import markdown_table, plot_measures, size_label, text_table, write_csv

DEFAULT_MEASURES = ("nDCG@10",)
DEFAULT_SPLIT = "test"
DEFAULT_DEPTH = 100
SHARD_ROWS = 50_000
ALPHA = 0.05


# ---------------------------------------------------------------- what to run


@dataclass(frozen=True)
class SuiteCollection:
    name: str
    source: str  # a BEIR directory or irds:<id>
    split: str
    # BEIR's identical-id rule: drop a retrieved passage whose id is the query's id (ArguAna, Quora: each
    # query is also a corpus passage). Off by default: in debian-pkgs and python-docs the relevant
    # passage has the query's id.
    ignore_identical_ids: bool = False


@dataclass(frozen=True)
class SuiteModel:
    name: str
    path: str
    defaults: Mapping | None = None  # settings of a model without starbucks.json (pooling, normalize, sizes, ...)


def _named(spec: str) -> tuple[str | None, str]:
    """`name=VALUE` -> (name, VALUE); `VALUE` -> (None, VALUE)."""
    name, sep, value = str(spec).partition("=")
    return (name.strip(), value.strip()) if sep and name.strip() and "/" not in name else (None, str(spec).strip())


COLLECTION_KEYS = ("name", "source", "split", "ignore_identical_ids")


def parse_collection(spec, split: str = DEFAULT_SPLIT, ignore_identical_ids: bool = False) -> SuiteCollection:
    """A collection from `SOURCE`, `name=SOURCE` or a suite file's `{name, source, split,
    ignore_identical_ids}` mapping."""
    if isinstance(spec, Mapping):
        if "source" not in spec:
            raise StarbucksError(f"suite collection {dict(spec)} needs a 'source' (a BEIR directory or irds:<id>)")
        unknown = sorted(set(spec) - set(COLLECTION_KEYS))
        if unknown:
            raise StarbucksError(
                f"suite collection {dict(spec)}: unknown key {unknown[0]!r}; a collection has "
                f"{', '.join(COLLECTION_KEYS)}"
            )
        flag = spec.get("ignore_identical_ids", ignore_identical_ids)
        if not isinstance(flag, bool):
            raise StarbucksError(
                f"suite collection {spec['source']}: ignore_identical_ids must be true or false, not {flag!r}"
            )
        name, source, split = spec.get("name"), str(spec["source"]), str(spec.get("split", split))
        ignore_identical_ids = flag
    else:
        name, source = _named(spec)
    if source.startswith(IRDS):  # irds:beir/scifact/test -> scifact, split test
        parts = source[len(IRDS) :].split("/")
        if parts[-1] in ("train", "dev", "test"):
            split = parts.pop()
        name = name or "-".join(parts[1:] if parts[0] == "beir" and len(parts) > 1 else parts)
    else:
        if not Path(source).is_dir():
            raise StarbucksError(
                f"collection {source!r} is neither a BEIR directory nor irds:<id> "
                f"(e.g. data/python-docs, irds:beir/scifact/test)"
            )
        name = name or Path(source).resolve().name
    return SuiteCollection(name, source, split, ignore_identical_ids)


def parse_model(spec: str, defaults: Mapping | None = None) -> SuiteModel:
    """`PATH` or `name=PATH`; the name defaults to the directory's name (its parent's for `.../model`)."""
    name, path = _named(spec)
    if name is None:
        p = Path(path)
        name = p.parent.name if p.name == "model" and p.parent.name else p.name
    return SuiteModel(name, path, defaults)


def _unique(items: Sequence, what: str) -> list:
    names = [item.name for item in items]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise StarbucksError(f"two {what}s are named {twice!r}; give each its own name as NAME=SOURCE")
    return list(items)


def read_suite_file(path: str | Path) -> dict:
    """A suite YAML: `collections` (specs or `{name, source, split}`), optional `models`, `metrics`,
    `sizes`, `split`, `depth`."""
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_file():
        raise StarbucksError(f"suite file {p} not found (see configs/suites/)")
    data = OmegaConf.to_container(OmegaConf.load(p), resolve=True) or {}
    unknown = sorted(set(data) - {"collections", "models", "metrics", "sizes", "split", "depth"})
    if unknown:
        raise StarbucksError(
            f"{p}: unknown key {unknown[0]!r}; a suite file has collections, models, metrics, sizes, split, depth"
        )
    return data


def suite_collections(suite: Mapping, split: str | None = None) -> list[SuiteCollection]:
    """The collections of a suite file's contents; their qrels split is `split`, else the file's, else `test`."""
    split = split or str(suite.get("split", DEFAULT_SPLIT))
    return [parse_collection(c, split) for c in suite.get("collections") or []]


# ---------------------------------------------------------------- one model on one collection


@dataclass
class LoadedCollection:
    """A collection's judged queries and its corpus ids (streamed once, checked against the qrels)."""

    spec: SuiteCollection
    split: EvalSplit
    count: int


def load_collection(spec: SuiteCollection) -> LoadedCollection:
    """Load the split, stream the corpus ids, refuse qrels that judge passages outside the corpus."""
    split = load_split(spec.split, spec.source)
    if not split.qrels:
        raise StarbucksError(f"collection {spec.name}: split {spec.split!r} of {spec.source} has no qrels")
    ids, count = set(), 0
    for _, block_ids, _ in corpus_blocks(iter_corpus(spec.source), SHARD_ROWS):
        check_ids(block_ids, f"corpus {spec.source}")
        count += len(block_ids)
        ids.update(block_ids)
    coverage = qrels_coverage(split.qrels, ids)
    if coverage["missing"]:
        raise StarbucksError(
            f"collection {spec.name}: its {spec.split} qrels judge {coverage['missing']} of {coverage['relevant']} "
            f"relevant passages that are not in its corpus (first: {coverage['first_missing']!r}); the corpus and "
            f"qrels of {spec.source} do not belong together"
        )
    return LoadedCollection(spec, split, count)


def write_cell_eval(eval_dir: Path, title: str, col: LoadedCollection, cells: Sequence["Cell"]) -> None:
    """`<eval>/<split>.json` and the per-query values beside it, as the eval stage writes them
    (`retrieval.evalfile`): the experiment's report reads them, and a suite cell directory is a run
    directory for `eval.sizes`."""
    atomic_write_json(
        split_json(eval_dir, col.spec.split),
        {
            "experiment": title,
            "split": col.spec.split,
            "rel_level": 1,
            "queries": len(col.split.qrels),
            "measures": {m: str(x) for m, x in cells[0].evaluation.measures.items()},
            "sizes": [
                {
                    "size": c.size.name,
                    "layers": c.size.layers,
                    "dim": c.size.dim,
                    "run": str(c.run),
                    "metrics": c.evaluation.aggregate,
                }
                for c in cells
            ],
        },
    )
    write_per_query(eval_dir, col.spec.split, [(c.size, c.evaluation) for c in cells])


# ---------------------------------------------------------------- the whole suite


def _note(line: str) -> None:
    print(f"suite: {line}", file=sys.stderr)


@dataclass
class Cell:
    """One model's evaluation of one size on one collection."""

    size: Size
    run: Path
    evaluation: Evaluation


def run_suite(
    models: Sequence[SuiteModel],
    collections: Sequence[SuiteCollection],
    out: str | Path,
    measures: Sequence[str] = DEFAULT_MEASURES,
    sizes=None,
    depth: int = DEFAULT_DEPTH,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
) -> dict:
    """Encode, search and evaluate every model on every collection; write the tables; return the report."""
    from retrieval import StarbucksModel
    from retrieval.settings import resolve_device

    models, collections = _unique(models, "model"), _unique(collections, "collection")
    if not models or not collections:
        raise StarbucksError("give at least one model (--models) and one collection (--collections or --suite)")
    parse_measures(measures)
    out = Path(out)
    loaded = [load_collection(c) for c in collections]  # every collection checked before any encoding
    torch_device = resolve_device(device, "--device")
    searcher = default_searcher(torch_device)
    cells: dict[str, dict[str, list[Cell]]] = {}
    for m in models:
        model = StarbucksModel.from_pretrained(m.path, torch_device, precision=precision, defaults=m.defaults)
        chosen = [model.size(s) for s in (parse_names(sizes) or [s.name for s in model.sizes])]
        for col in loaded:
            root = out / m.name / col.spec.name
            print(
                f"suite: {m.name} on {col.spec.name} ({col.count} passages, {len(col.split.qrels)} queries)",
                file=sys.stderr,
            )
            stores = open_stores(
                model, chosen, root / "embeddings", SHARD_ROWS, {"model": model.source, "corpus": col.spec.source}
            )
            encode_passages(
                model,
                stores,
                corpus_blocks(iter_corpus(col.spec.source), SHARD_ROWS),
                f"corpus {col.spec.source}",
                batch_size,
                note=_note,
            )
            encode_queries(model, stores, col.spec.split, col.split.queries, batch_size)
            done = cells.setdefault(m.name, {})[col.spec.name] = []
            for s in chosen:
                path = rank_store(
                    stores[s], col.spec.split, root / "runs", depth, searcher, "suite", col.spec.ignore_identical_ids
                )
                done.append(Cell(s, path, evaluate(read_run(path), col.split.qrels, measures)))
            write_cell_eval(root / "eval", f"{m.name} / {col.spec.name}", col, done)
        del model
    report = build_report(models, loaded, cells, measures)
    write_report(out, report, cells, measures)
    return report


def build_report(
    models: Sequence[SuiteModel],
    collections: Sequence[LoadedCollection],
    cells: Mapping[str, Mapping[str, Sequence[Cell]]],
    measures: Sequence[str],
) -> dict:
    """Per model and measure: collection -> size -> value, and the average row; per measure, collection
    and size: each model's value and its paired t-test p-value against the first model."""
    baseline = models[0].name
    tables, comparison = {}, {}
    for m in models:
        per_model = tables.setdefault(m.name, {})
        for measure in measures:
            table = {
                c.spec.name: {cell.size.name: cell.evaluation.aggregate[measure] for cell in cells[m.name][c.spec.name]}
                for c in collections
            }
            names = [cell.size.name for cell in cells[m.name][collections[0].spec.name]]
            table["average"] = {s: statistics.fmean(table[c.spec.name][s] for c in collections) for s in names}
            per_model[measure] = table
    for measure in measures:
        per_measure = comparison.setdefault(measure, {})
        for c in collections:
            base = {cell.size.key: cell for cell in cells[baseline][c.spec.name]}
            rows = per_measure.setdefault(c.spec.name, {})
            for m in models:
                for cell in cells[m.name][c.spec.name]:
                    ref = base.get(cell.size.key)
                    p = (
                        None
                        if m.name == baseline or ref is None
                        else paired_ttest(ref.evaluation.per_query[measure], cell.evaluation.per_query[measure])
                    )
                    rows.setdefault(cell.size.key, {})[m.name] = {"value": cell.evaluation.aggregate[measure], "p": p}
    return {
        "models": {m.name: m.path for m in models},
        "collections": {
            c.spec.name: {
                "source": c.spec.source,
                "split": c.spec.split,
                "passages": c.count,
                "queries": len(c.split.qrels),
                "ignore_identical_ids": c.spec.ignore_identical_ids,
            }
            for c in collections
        },
        "measures": list(measures),
        "baseline": baseline,
        "alpha": ALPHA,
        "sizes": {m.name: [cell.size.to_dict() for cell in cells[m.name][collections[0].spec.name]] for m in models},
        "tables": tables,
        "comparison": comparison,
    }


def _fmt(value: float) -> str:
    return f"{value:.4f}"


def write_report(out: Path, report: dict, cells, measures: Sequence[str]) -> None:
    """`suite.{json,md,csv,png}` in `out`, and the tables on the terminal."""
    sizes = {
        m: [recorded_size(s["name"], s["layers"], s["dim"]) for s in entries] for m, entries in report["sizes"].items()
    }
    sections, csv_rows = [], []
    for m, per_model in report["tables"].items():
        for measure, table in per_model.items():
            headers = ["collection", *(size_label(s) for s in sizes[m])]
            rows = [[c, *(_fmt(values[s.name]) for s in sizes[m])] for c, values in table.items()]
            sections.append((f"{m}: {measure}", headers, rows))
    baseline, alpha = report["baseline"], report["alpha"]
    models = list(report["models"])
    for measure, per_collection in report["comparison"].items():
        headers = ["collection", "size", *models]
        rows = []
        for c, per_size in per_collection.items():
            for key, per_model in per_size.items():
                row = [c, key]
                for m in models:
                    entry = per_model.get(m)
                    row.append(
                        "-"
                        if entry is None
                        else _fmt(entry["value"]) + ("*" if entry["p"] is not None and entry["p"] < alpha else "")
                    )
                    if entry is not None:
                        csv_rows.append([m, c, key, measure, entry["value"], "" if entry["p"] is None else entry["p"]])
                rows.append(row)
        if len(models) > 1:
            sections.append(
                (f"models compared: {measure}; * = p < {alpha} (paired t-test vs {baseline})", headers, rows)
            )
    for m, per_model in report["tables"].items():
        for measure, table in per_model.items():
            csv_rows += [[m, "average", s.key, measure, table["average"][s.name], ""] for s in sizes[m]]
    atomic_write_json(out / "suite.json", report)
    dropped = [c for c, entry in report["collections"].items() if entry.get("ignore_identical_ids")]
    note = (
        f"Self-hits dropped (BEIR's identical-id rule: a passage whose id is the query's is not ranked) in: "
        f"{', '.join(dropped)}.\n\n"
        if dropped
        else ""
    )
    atomic_write_text(
        out / "suite.md",
        "# Suite\n\n" + note + "".join(f"## {title}\n\n{markdown_table(h, r)}\n" for title, h, r in sections),
    )
    write_csv(out / "suite.csv", ["model", "collection", "size", "measure", "value", "p"], csv_rows)
    first = measures[0]
    plot_measures(
        {m: [(s, {first: report["tables"][m][first]["average"][s.name]}) for s in sizes[m]] for m in models},
        [first],
        out / "suite.png",
        f"average {first} over {len(report['collections'])} collections",
    )
    for title, h, r in sections:
        print(f"\n{title}\n{text_table(h, r)}")
    print(f"\nsuite: tables and plot in {out}", file=sys.stderr)


# ---------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.suite",
        description=(
            "Evaluate models on many collections at every size: encode once per model and collection, exact "
            "search, ir_measures; tables collections x sizes with an average row, paired t-tests between models."
        ),
    )
    p.add_argument("--models", nargs="+", default=[], metavar="[NAME=]PATH", help="model directories or hub ids")
    p.add_argument(
        "--collections",
        nargs="+",
        default=[],
        metavar="[NAME=]SOURCE",
        help="BEIR directories or irds:<id> (added to the suite file's)",
    )
    p.add_argument("--suite", help="a suite YAML (configs/suites/beir.yaml, configs/suites/offline.yaml)")
    p.add_argument("--sizes", help="sizes to evaluate, names or LxD, comma-separated (default: each model's own)")
    p.add_argument(
        "--ignore-identical-ids",
        action="store_true",
        help="BEIR's identical-id rule for the --collections given here: leave a passage whose id is "
        "the query's out of its ranking (ArguAna, Quora; a suite file sets it per collection)",
    )
    p.add_argument(
        "--split", help=f"qrels split of local collections (default: the suite file's, else {DEFAULT_SPLIT})"
    )
    p.add_argument("--metrics", nargs="+", help=f"ir_measures names (default: {' '.join(DEFAULT_MEASURES)})")
    p.add_argument("--depth", type=int, help=f"passages ranked per query (default {DEFAULT_DEPTH})")
    p.add_argument("--out", default="runs/suite", help="output directory (default runs/suite)")
    p.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        help="pooling of models without starbucks.json (plain HF encoders, zero-shot)",
    )
    p.add_argument("--normalize", action="store_true", help="L2-normalise such models' embeddings (cosine)")
    p.add_argument("--batch-size", type=int, default=64, help="encode batch size (default 64)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16 (default auto)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    suite = read_suite_file(args.suite) if args.suite else {}
    split = args.split or str(suite.get("split", DEFAULT_SPLIT))
    collections = [
        *suite_collections(suite, split),
        *(parse_collection(c, split, args.ignore_identical_ids) for c in args.collections),
    ]
    if args.normalize and not args.pooling:
        raise StarbucksError("--normalize applies to plain HF models, which need --pooling cls|mean too; add it")
    plain = {"pooling": args.pooling, "normalize": args.normalize} if args.pooling else None
    models = [parse_model(m, plain) for m in [*(suite.get("models") or []), *args.models]]
    depth = args.depth if args.depth is not None else int(suite.get("depth", DEFAULT_DEPTH))
    if depth < 1 or args.batch_size < 1:
        raise StarbucksError("--depth and --batch-size must be >= 1")
    return run_suite(
        models,
        collections,
        args.out,
        args.metrics or suite.get("metrics") or DEFAULT_MEASURES,
        args.sizes or suite.get("sizes"),
        depth,
        args.batch_size,
        args.device,
        args.precision,
    )


__all__ = [
    "DEFAULT_DEPTH",
    "DEFAULT_MEASURES",
    "SuiteCollection",
    "SuiteModel",
    "main",
    "parse_collection",
    "parse_model",
    "read_suite_file",
    "run_suite",
    "suite_collections",
]


if __name__ == "__main__":
    main()
