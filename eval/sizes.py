"""The size chooser: quality against cost for every size of one run, and the best size in a budget.

`python -m eval.sizes RUN_DIR` (and `starbucks sizes RUN_DIR`) reads, per size, the quality from
the run's eval (`RUN_DIR/eval/<split>.json`) and measures on this machine, for the model that made
the run's embeddings at that size (early exit at its layers, its first `dim` dims):

- encode throughput: passages per second over a sample of the run's corpus through `StarbucksModel`
  (batched, longest first, tokenising included);
- single-query latency: median milliseconds to tokenise one query of the split, encode it and
  search it as the run was searched: on the size's saved index (its parts in turn, with the run's
  search params) when the run used one, else exactly over its stored vectors (a flat index in memory);
- bytes per passage: the size's index files (`RUN_DIR/index/<size>.faiss` or its `.part-*` files)
  over its passages, or, without one (exact search reads the embedding store), the store's shards.

A size searched at a quantised precision (`search.quantization`: `grande.int8`,
`grande.binary-rescore100`, ...) is a point of its own: its quality from its run, its latency with its
search (the int8 / binary codes, then the re-scoring), its bytes the codes' index file plus, when it
re-scores, the fp16 shards. So the fronts and "best within a budget" span layers, dims and precision.

It writes `RUN_DIR/eval/sizes-<split>.{json,md,csv,png}` (the PNG: quality vs latency and vs bytes
with the Pareto front marked) and, with `--max-latency-ms` / `--max-bytes`, prints the best size
within the budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.data import iter_corpus, load_split
from retrieval.errors import StarbucksError, cli_entry
from retrieval.io import atomic_path, atomic_write_json, atomic_write_text
from retrieval.quantize import Quantization, QuantizedSearcher, index_path, split_run_name
from retrieval.sizes import Size
from retrieval.runfile import read_run_record, run_path
from retrieval.store import PASSAGE_FIELDS, EmbeddingStore
from retrieval.tables import markdown_table, size_label, text_table, write_csv

EVAL_PREFIXES = ("compare-", "sizes-")
DEFAULT_MEASURE = "nDCG@10"


@dataclass
class SizeCost:
    """One size's quality and what it costs."""

    size: Size
    quality: float
    passages_per_second: float
    encode_ms: float  # median single-query tokenise + encode
    search_ms: float  # median single-query exact search over the size's passages
    latency_ms: float  # median of their sum per query
    bytes_per_passage: float
    precision: str = "fp16"  # fp16 | int8 | binary, with -rescore<K>

    def record(self) -> dict:
        out = asdict(self)
        out["size"] = self.size.name
        return {"layers": self.size.layers, "dim": self.size.dim, **out}


# ---------------------------------------------------------------- choosing


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`(cost, quality)` `a` is at least as cheap and as good as `b`, and strictly one of them."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (in order) of the `(cost, quality)` points that no other point dominates."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def best_within(
    costs: Sequence[SizeCost], max_latency_ms: float | None = None, max_bytes: float | None = None
) -> SizeCost:
    """The best quality among the sizes within the budgets (ties: the faster, then the smaller)."""
    fits = [
        c
        for c in costs
        if (max_latency_ms is None or c.latency_ms <= max_latency_ms)
        and (max_bytes is None or c.bytes_per_passage <= max_bytes)
    ]
    if not fits:
        cheapest = min(costs, key=lambda c: (c.latency_ms, c.bytes_per_passage))
        raise StarbucksError(
            f"no size fits {_budget(max_latency_ms, max_bytes)}; the cheapest is {cheapest.size.name} "
            f"({cheapest.latency_ms:.2f} ms, {cheapest.bytes_per_passage:.0f} bytes per passage): raise the budget"
        )
    return max(fits, key=lambda c: (c.quality, -c.latency_ms, -c.bytes_per_passage))


def _budget(max_latency_ms, max_bytes) -> str:
    parts = ([f"--max-latency-ms {max_latency_ms:g}"] if max_latency_ms is not None else []) + (
        [f"--max-bytes {max_bytes:g}"] if max_bytes is not None else []
    )
    return " and ".join(parts)


# ---------------------------------------------------------------- reading the run


def eval_file(run_dir: Path, split: str | None) -> Path:
    """`RUN_DIR/eval/<split>.json` (without `split`: the only split evaluated there)."""
    eval_dir = run_dir / "eval"
    if split:
        path = eval_dir / f"{split}.json"
        if not path.is_file():
            raise StarbucksError(f"no {path}; run `python -m eval` for split {split!r} first")
        return path
    found = sorted(p for p in eval_dir.glob("*.json") if not p.name.startswith(EVAL_PREFIXES))
    if len(found) != 1:
        what = ", ".join(p.stem for p in found) if found else "none"
        raise StarbucksError(
            f"{eval_dir} holds the eval of {'splits ' + what if found else 'no split'}; "
            f"{'name one with --split' if found else 'run `python -m eval` first'}"
        )
    return found[0]


def quality_per_size(path: Path, measure: str | None) -> tuple[str, dict[str, float]]:
    """`(measure, {size name: value})` from an eval JSON; the measure defaults to nDCG@10 (the paper's),
    else the file's first."""
    record = json.loads(path.read_text())
    names = list(record.get("measures") or {})
    measure = measure or (DEFAULT_MEASURE if DEFAULT_MEASURE in names else names[0] if names else None)
    if measure not in names:
        raise StarbucksError(f"{path} has no measure {measure!r}; it has {', '.join(names) or 'none'} (--measure)")
    return measure, {s["size"]: float(s["metrics"][measure]) for s in record["sizes"]}


def queries_source(store: EmbeddingStore, split: str, given: str | None):
    """Where the split's query texts are: `--queries`, else the training config recorded with the model."""
    if given:
        return given
    from retrieval.checkpoint import read_meta, resolve_model_path

    meta = read_meta(resolve_model_path(store.read_meta()["model"])) or {}
    source = ((meta.get("config") or {}).get("data") or {}).get("eval_splits", {}).get(split)
    if source is None:
        raise StarbucksError(
            f"cannot tell where the queries of split {split!r} are (the model records no "
            f"data.eval_splits.{split}); give --queries DIR (a BEIR directory or irds:<id>)"
        )
    return source


def index_files(store: EmbeddingStore, index_dir: Path, factory: str | None = None) -> list[Path]:
    """The size's saved FAISS index (search.index other than Flat): one file, or its parts
    (search.shards_per_index); none without one. An index its record does not tie to the store's
    embeddings (another model, other passages) is refused in one line; one of another `factory` than the
    run was searched with (when given) is not the run's and does not count."""
    meta = store.require_complete()
    single = index_dir / f"{meta['size']}.faiss"
    paths = [single] if single.is_file() else sorted(index_dir.glob(f"{meta['size']}.part-*.faiss"))
    for path in paths:
        record_path = path.with_suffix(".json")
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if any(record.get(k) != meta.get(k) for k in ("size", "layers", "dim", *PASSAGE_FIELDS)):
            raise StarbucksError(
                f"{path} was not built from the embeddings in {store.dir}; re-run search "
                f"(make search) before choosing a size"
            )
        if factory is not None and record["factory"] != factory:
            return []  # left by a search with another index: not what the run's quality came from
    return paths


def store_bytes(
    store: EmbeddingStore, index_dir: Path, factory: str | None = None, quantization: Quantization = Quantization()
) -> float:
    """Bytes per passage of the size's index files, or of its embedding shards without one; at a quantised
    precision, its codes' index file plus, when it re-scores, the shards."""
    meta = store.require_complete()
    shards = [store.shard_path(k) for k in range(meta["shards"])]
    if quantization.quantized:
        files = [index_path(index_dir, meta["size"], quantization.kind), *(shards if quantization.rescore else [])]
    else:
        files = index_files(store, index_dir, factory) or shards
    return sum(f.stat().st_size for f in files) / meta["count"]


# ---------------------------------------------------------------- measuring


def _load_model(store: EmbeddingStore, qmeta: dict, device: str, precision: str):
    """The `StarbucksModel` that made the store's embeddings (its settings from the store; a hybrid's other
    models from its `part_models`), refused if its weights changed since."""
    from retrieval import StarbucksModel

    meta = store.require_complete()
    model = StarbucksModel.from_pretrained(
        meta["model"],
        device,
        pooling=meta["pooling"],
        normalize=meta["normalize"],
        query_max_length=qmeta["max_length"],
        passage_max_length=meta["max_length"],
        query_prefix=qmeta["prefix"],
        passage_prefix=meta["prefix"],
        precision=precision,
        part_models=meta.get("part_models"),
    )
    return check_model(model, store)


def check_model(model, store: EmbeddingStore):
    """`model`, if it (with a hybrid's other models) is what encoded the store; else one line."""
    meta = store.require_complete()
    if model.identity(store.size, "passage")["model_sha256"] != meta["model_sha256"]:
        raise StarbucksError(
            f"the model at {meta['model']} changed since it encoded {store.dir}; "
            f"re-run encode, search and eval before choosing a size"
        )
    return model


def measure_size(
    model,
    store: EmbeddingStore,
    passages: Sequence[str],
    queries: Sequence[str],
    batch_size: int,
    index_dir: Path | None = None,
    run: dict | None = None,
    quantization: Quantization = Quantization(),
    throughput: float | None = None,
) -> tuple[float, float, float, float]:
    """`(passages per second, encode ms, search ms, latency ms)` of one size, through `StarbucksModel`;
    search on the size's saved index when there is one (the index its bytes are counted from; every part
    of it in turn, as the search stage does, with the search `params` of the `run` record, e.g. nprobe),
    at a quantised precision on its codes (then re-scoring), else exact. `throughput`: the size's encode
    rate when already measured (it does not depend on the precision searched)."""
    import faiss

    from retrieval.exact_search import faiss_search, set_params

    size = store.size
    saved = index_files(store, index_dir, (run or {}).get("index")) if index_dir is not None else []
    if quantization.quantized:
        searcher = QuantizedSearcher(store, quantization, index_dir)

        def search(vector):
            searcher.search(vector, 10)

    elif saved:
        indexes = [faiss.read_index(str(path)) for path in saved]
        for index in indexes:
            set_params(index, (run or {}).get("params") or {})
    else:
        indexes = [faiss.IndexFlatIP(size.dim)]
        for _, _, vectors in store.iter_shards():
            indexes[0].add(np.ascontiguousarray(vectors, dtype=np.float32))
    if not quantization.quantized:

        def search(vector):
            for index in indexes:
                faiss_search(index, vector, min(10, index.ntotal), 1)

    if throughput is None:
        model.embed_texts(passages[:batch_size], [size], "passage", batch_size)  # warm-up
        started = time.perf_counter()
        model.embed_texts(passages, [size], "passage", batch_size)
        throughput = len(passages) / (time.perf_counter() - started)
    encode_ms, search_ms, total_ms = [], [], []
    for i, text in enumerate([*queries[:3], *queries]):  # the first three warm up
        t0 = time.perf_counter()
        vector = model.embed_texts([text], [size], "query", 1)[size]
        t1 = time.perf_counter()
        search(vector)
        t2 = time.perf_counter()
        if i >= 3:
            encode_ms.append(1e3 * (t1 - t0))
            search_ms.append(1e3 * (t2 - t1))
            total_ms.append(1e3 * (t2 - t0))
    return throughput, statistics.median(encode_ms), statistics.median(search_ms), statistics.median(total_ms)


def measure_run(
    run_dir: str | Path,
    split: str | None = None,
    measure: str | None = None,
    queries: str | None = None,
    corpus: str | None = None,
    passages: int = 256,
    query_sample: int = 50,
    batch_size: int = 32,
    device: str = "auto",
    precision: str = "auto",
) -> tuple[str, str, list[SizeCost]]:
    """`(split, measure, costs)` for every size of the run that was evaluated and has its embeddings."""
    run_dir = Path(run_dir)
    path = eval_file(run_dir, split)
    split = path.stem
    measure, quality = quality_per_size(path, measure)
    searched = {s: split_run_name(s) for s in quality}  # run name -> (size name, precision)
    stores = {s: EmbeddingStore(run_dir / "embeddings" / searched[s][0]) for s in quality}
    missing = [s for s, st in stores.items() if not (st.read_meta() or {}).get("complete")]
    if missing:
        raise StarbucksError(
            f"{path} evaluates size {missing[0]} but {stores[missing[0]].dir} holds no finished "
            f"embeddings; re-run `python -m encode` for it"
        )
    if not stores:
        raise StarbucksError(f"{path} evaluates no size; run `python -m eval` first")
    first = next(iter(stores.values()))
    corpus = corpus or first.read_meta().get("corpus")
    if not corpus:
        raise StarbucksError(f"{first.meta_path} records no corpus; give --corpus DIR")
    texts = [t for _, t in islice(iter_corpus(str(corpus)), passages)]
    query_texts = list(load_split(split, queries_source(first, split, queries)).queries.values())[:query_sample]
    if not texts or not query_texts:
        raise StarbucksError(f"no passages in {corpus} or no queries in split {split!r} to measure with")

    costs, model, loaded, rates = [], None, None, {}
    for name, store in stores.items():
        _, _, qmeta = store.load_queries(split)
        meta = store.read_meta()
        settings = (
            meta["model"],
            json.dumps(meta.get("part_models") or {}, sort_keys=True),
            meta["pooling"],
            meta["normalize"],
            meta["max_length"],
            meta["prefix"],
            qmeta["max_length"],
            qmeta["prefix"],
        )
        if settings != loaded:  # one model in memory at a time, with the settings its store was encoded with
            model, loaded = _load_model(store, qmeta, device, precision), settings
        check_model(model, store)
        record = read_run_record(run_path(run_dir / "runs", split, name))
        quantization = searched[name][1]
        rate, enc_ms, search_ms, latency = measure_size(
            model,
            store,
            texts,
            query_texts,
            batch_size,
            run_dir / "index",
            record,
            quantization,
            rates.get(store.dir),
        )
        rates[store.dir] = rate
        costs.append(
            SizeCost(
                dataclasses.replace(
                    store.size, name=name, precision=quantization.name if quantization.quantized else ""
                ),
                quality[name],
                rate,
                enc_ms,
                search_ms,
                latency,
                store_bytes(store, run_dir / "index", (record or {}).get("index"), quantization),
                quantization.name,
            )
        )
        print(f"sizes: {name}: {rate:.1f} passages/s, {latency:.2f} ms per query", file=sys.stderr)
    return split, measure, costs


# ---------------------------------------------------------------- writing


HEADERS = [
    "size",
    "precision",
    "quality",
    "passages/s",
    "encode ms",
    "search ms",
    "latency ms",
    "bytes/passage",
    "front",
]


def _size_of(cost: SizeCost):
    """The size a cost row measures, named without its precision."""
    return dataclasses.replace(cost.size, name=split_run_name(cost.size.name)[0], precision="")


def table_rows(costs: Sequence[SizeCost]) -> list[list[str]]:
    """One row per size; `front` marks the Pareto front by latency (`L`) and by bytes (`B`)."""
    by_latency = set(pareto_front([(c.latency_ms, c.quality) for c in costs]))
    by_bytes = set(pareto_front([(c.bytes_per_passage, c.quality) for c in costs]))
    return [
        [
            size_label(_size_of(c)),
            c.precision,
            f"{c.quality:.4f}",
            f"{c.passages_per_second:.1f}",
            f"{c.encode_ms:.2f}",
            f"{c.search_ms:.2f}",
            f"{c.latency_ms:.2f}",
            f"{c.bytes_per_passage:.0f}",
            ("L" if i in by_latency else "") + ("B" if i in by_bytes else ""),
        ]
        for i, c in enumerate(costs)
    ]


def plot_fronts(costs: Sequence[SizeCost], measure: str, path: Path, title: str) -> None:
    """Quality vs latency and vs bytes per passage, each with its Pareto front drawn and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, (label, cost) in zip(
        axes,
        [("single-query latency (ms)", lambda c: c.latency_ms), ("bytes per passage", lambda c: c.bytes_per_passage)],
    ):
        points = [(cost(c), c.quality) for c in costs]
        front = sorted(pareto_front(points), key=lambda i: points[i])
        for n, precision in enumerate(dict.fromkeys(c.precision for c in costs)):  # one colour and marker each
            mine = [p for c, p in zip(costs, points) if c.precision == precision]
            ax.scatter(*zip(*mine), color=f"C{n}", marker="os^vD<>P"[n % 8], alpha=0.7, label=precision)
        ax.plot(
            [points[i][0] for i in front], [points[i][1] for i in front], "-", color="0.2", lw=1, label="Pareto front"
        )
        for c, (x, y) in zip(costs, points):
            ax.annotate(_size_of(c).name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(measure)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(run_dir: Path, split: str, measure: str, costs: Sequence[SizeCost], device: str) -> Path:
    """`RUN_DIR/eval/sizes-<split>.{json,md,csv,png}`; returns the stem."""
    stem = run_dir / "eval" / f"sizes-{split}"
    title = f"{run_dir.name} / {split}: {measure} vs cost per size on {device}"
    rows = table_rows(costs)
    atomic_write_text(
        stem.with_suffix(".md"),
        f"# {title}\n\n{markdown_table(HEADERS, rows)}\n"
        "front: on the Pareto front of quality vs latency (L) / vs bytes per passage (B)\n",
    )
    records = [c.record() for c in costs]
    write_csv(stem.with_suffix(".csv"), list(records[0]), [list(r.values()) for r in records])
    atomic_write_json(
        stem.with_suffix(".json"),
        {
            "run": str(run_dir),
            "split": split,
            "measure": measure,
            "device": device,
            "sizes": records,
            "front_latency": [costs[i].size.name for i in pareto_front([(c.latency_ms, c.quality) for c in costs])],
            "front_bytes": [
                costs[i].size.name for i in pareto_front([(c.bytes_per_passage, c.quality) for c in costs])
            ],
        },
    )
    plot_fronts(costs, measure, stem.with_suffix(".png"), title)
    print(f"\n{title}\n{text_table(HEADERS, rows)}")
    return stem


# ---------------------------------------------------------------- command line


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.sizes",
        description=(
            "Quality vs cost per size of one run (its eval, plus encode throughput, single-query latency and "
            "bytes per passage measured here), the Pareto fronts, and the best size within a budget."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="an experiment directory (runs/<name>) after eval")
    p.add_argument("--split", help="the evaluated split (default: the only one in RUN_DIR/eval)")
    p.add_argument("--measure", help="quality measure from the eval (default: nDCG@10, else its first)")
    p.add_argument("--max-latency-ms", type=_positive(float), help="print the best size within this latency")
    p.add_argument("--max-bytes", type=_positive(float), help="print the best size within these bytes per passage")
    p.add_argument("--queries", help="where the split's queries are (default: the model's training config)")
    p.add_argument("--corpus", help="passages to time encoding on (default: the run's corpus)")
    p.add_argument("--passages", type=_positive(int), default=256, help="passages timed per size (default 256)")
    p.add_argument("--query-sample", type=_positive(int), default=50, help="queries timed per size (default 50)")
    p.add_argument("--batch-size", type=_positive(int), default=32, help="encode batch size (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--precision", default="auto", help="auto, fp32, fp16 or bf16 (default auto)")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> SizeCost | None:
    args = parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    split, measure, costs = measure_run(
        run_dir,
        args.split,
        args.measure,
        args.queries,
        args.corpus,
        args.passages,
        args.query_sample,
        args.batch_size,
        args.device,
        args.precision,
    )
    from retrieval.settings import resolve_device

    stem = write_report(run_dir, split, measure, costs, str(resolve_device(args.device, "--device")))
    print(f"\nsizes: tables and plot in {stem}.*", file=sys.stderr)
    if args.max_latency_ms is None and args.max_bytes is None:
        return None
    best = best_within(costs, args.max_latency_ms, args.max_bytes)
    print(
        f"best within {_budget(args.max_latency_ms, args.max_bytes)}: {size_label(best.size)}: {measure} "
        f"{best.quality:.4f}, {best.latency_ms:.2f} ms per query, {best.bytes_per_passage:.0f} bytes per passage"
    )
    return best


__all__ = ["SizeCost", "best_within", "main", "measure_run", "pareto_front", "write_report"]


if __name__ == "__main__":
    main()
