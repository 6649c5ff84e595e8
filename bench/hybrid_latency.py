"""Latency of a two-model hybrid against its slowest part: the paper's v3 claim of "minimal latency
overhead due to parallelization", measured for this toolkit's hybrid (parts of two models encoded in a
thread each, on a GPU each on a CUDA stream of its own; retrieval/model.py).

    python bench/hybrid_latency.py                                   # MiniLM, 2 CPU cores
    python bench/hybrid_latency.py --device cuda --passages 4096     # a GPU

Two MiniLM-shaped models (the second a copy: speed does not depend on the weights) stand for a
depth-wise and a width-wise model; the hybrid `--hybrid` (default `3x320+6x64@width`: the depth-wise
model's first 3 layers, 320 dims, beside the width-wise model's 6 layers, 64 dims; one full-width
vector's bytes) against each part alone, and against the two parts encoded one after the other.
Two workloads: single-query latency (median over `--queries` queries, batch 1: a search's encoding)
and passages per second (`--passages` debian-pkgs passages in batches of `--batch-size`). One JSON line
per row; the section `hybrid_latency_<device>` of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import common
from retrieval.model import StarbucksModel
from retrieval.encoder import StarbucksEncoder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hybrid", default="3x320+6x64@width", help="a hybrid of the first model and @width")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tag", default="", help="suffix of the docs/benchmarks.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    backbone, tokenizer = common.load_backbone("minilm")
    precision = "fp16" if device.type == "cuda" else "fp32"

    def model(weights) -> StarbucksModel:
        return StarbucksModel(
            StarbucksEncoder(weights.to(device).eval(), "mean", normalize=True),
            tokenizer,
            common.sizes_for("minilm"),
            query_max_length=32,
            passage_max_length=196,
            source="minilm",
            precision=precision,
        )

    width = model(copy.deepcopy(backbone))
    depth = model(backbone)
    depth.part_models = {"width": width}
    hybrid = depth.size(args.hybrid)
    if hybrid.models != ["width"] or all(p.model for p in hybrid.parts):
        raise SystemExit(f"--hybrid {args.hybrid}: give parts of the first model and of @width")
    own = [p.size for p in hybrid.parts if not p.model]  # several parts of one model: one pass
    other = [p.size for p in hybrid.parts if p.model]
    queries = common.debian_texts("query", args.queries)
    passages = common.debian_texts("passage", args.passages)

    runs = {
        f"depth part {', '.join(s.key for s in own)}": lambda texts, kind, bs: depth.embed_texts(texts, own, kind, bs),
        f"width part {', '.join(s.key for s in other)}": lambda texts, kind, bs: width.embed_texts(
            texts, other, kind, bs
        ),
        "hybrid, parts one after the other": lambda texts, kind, bs: hybrid_of(False, texts, kind, bs),
        "hybrid, parts in parallel": lambda texts, kind, bs: hybrid_of(True, texts, kind, bs),
    }

    def hybrid_of(parallel: bool, texts, kind, bs):
        depth.parallel_parts = parallel  # encode.parallel_parts
        return depth.embed_texts(texts, [hybrid], kind, bs)

    def timed(fn, *call) -> float:
        started = time.perf_counter()
        fn(*call)
        common.sync(device)
        return time.perf_counter() - started

    # the variants take turns (query by query, repeat by repeat), so a busy machine's load falls on all alike
    for fn in runs.values():  # warm-up
        for text in queries[:5]:
            fn([text], "query", 1)
        fn(passages[: args.batch_size], "passage", args.batch_size)
    query_times = {label: [] for label in runs}
    for text in queries:
        for label, fn in runs.items():
            query_times[label].append(1e3 * timed(fn, [text], "query", 1))
    passage_times = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, fn in runs.items():
            passage_times[label].append(timed(fn, passages, "passage", args.batch_size))

    mark = f"hybrid_latency_{device.type}{args.tag}"
    measured = {
        label: (statistics.median(query_times[label]), len(passages) / min(passage_times[label])) for label in runs
    }
    slowest = max(measured[label][0] for label in list(runs)[:2])
    slowest_rate = min(measured[label][1] for label in list(runs)[:2])
    rows = []
    for label, (ms, rate) in measured.items():
        rows.append([label, f"{ms:.2f}", f"{ms / slowest:.2f}x", f"{rate:.1f}", f"{slowest_rate / rate:.2f}x"])
        common.emit(
            mark,
            run=label,
            query_ms=round(ms, 3),
            query_ms_over_slowest_part=round(ms / slowest, 3),
            passages_per_s=round(rate, 1),
            time_over_slowest_part=round(slowest_rate / rate, 3),
        )
    md = "\n".join(
        [
            f"## Hybrid of two models vs its slowest part on {device.type} ({mark})",
            "",
            f"- command: `python bench/hybrid_latency.py --hybrid {args.hybrid} --queries {args.queries} "
            f"--passages {args.passages} --batch-size {args.batch_size} --repeats {args.repeats}"
            f"{' --tag ' + args.tag if args.tag else ''}`",
            f"- machine: {common.machine(device)}",
            f"- date: {common.today()}",
            f"- two MiniLM-shaped models (mean pooling, cosine; {'fp16 autocast' if precision == 'fp16' else 'fp32'}): "
            f"the hybrid {hybrid.key} ({hybrid.dim} dims) encodes its parts one after the other or at the same time "
            "(`encode.parallel_parts`), the second model then in a thread of its own"
            + (" on a CUDA stream of its own" if device.type == "cuda" else "")
            + f"; query latency: median over {len(queries)} debian-pkgs queries, one at a time, tokenising included; "
            f"passages: {len(passages)} debian-pkgs passages (<= 196 tokens) in batches of {args.batch_size}, best of "
            f"{args.repeats}; the four take turns (query by query, repeat by repeat); `x slowest part`: against the "
            "slower of the two parts alone",
            "",
            common.table(["encoding", "query ms", "x slowest part", "passages/s", "time x slowest part"], rows),
            "",
            verdict(measured, list(runs)),
        ]
    )
    print(md)
    if not args.no_write:
        common.write_section(mark, md)


def verdict(measured: dict, labels: list[str]) -> str:
    """What the rows say about running the parts at the same time, in words (computed, not hand-written)."""
    (q_one, r_one), (q_par, r_par) = measured[labels[2]], measured[labels[3]]
    slowest = max(measured[labels[0]][0], measured[labels[1]][0])
    if q_par < q_one:
        return (
            f"In parallel a query took {q_par / slowest:.2f}x its slowest part's time, against {q_one / slowest:.2f}x "
            f"one after the other: the overlap paid {q_one / q_par:.2f}x; passages {r_par / r_one:.2f}x as fast."
        )
    return (
        f"In parallel a query took {q_par / slowest:.2f}x its slowest part's time, against {q_one / slowest:.2f}x "
        f"one after the other (passages: {r_par / r_one:.2f}x as fast in parallel): the two models' threads "
        "share the same cores, and a query gains nothing from running its parts together here "
        "(`encode.parallel_parts: auto` runs them one after the other on the CPU)."
    )


if __name__ == "__main__":
    main()
