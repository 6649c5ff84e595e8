"""Deployment at every size and precision: quality, bytes per passage and single-query latency of a
model's sizes at fp16, int8 and binary, with and without re-scoring, on the shipped collections;
writes docs/deploy.md (its measured part) and the size chooser's plots.

    python bench/deploy.py --model runs/experiment-debian-cpu/srl/model

Per collection (debian-pkgs-mini dev, python-docs test: what ships), it runs the stages as a user
would (`encode`, `search` with `search.quantization`, `eval`, then the size chooser `eval.sizes`) in
`--out/<collection>`, so every figure comes from the toolkit's own files: quality from the run files
(pytrec_eval through `eval`), bytes from the index / shard files on disk, latency (tokenise, encode and
search one query, median) and encode throughput measured by `eval.sizes` on this machine. One JSON
line per (collection, size, precision).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import common
from encode.pipeline import encode_collection
from eval.pipeline import evaluate_experiment
from eval.sizes import main as choose_size
from retrieval.config import load_config
from retrieval.quantize import parse_quantization, split_run_name
from search.pipeline import search_collection

COLLECTIONS = {"debian-pkgs-mini": ("data/debian-pkgs-mini", "dev"), "python-docs": ("data/python-docs", "test")}
PRECISIONS = ["fp16", "int8", "int8-rescore40", "binary", "binary-rescore40"]
DOC = common.REPO / "docs" / "deploy.md"


def run_collection(name: str, directory: str, split: str, args) -> list[dict]:
    root = Path(args.out) / name
    root.mkdir(parents=True, exist_ok=True)
    config = root / "deploy.yaml"  # a config's data.eval_splits replaces the default's (dev and test of debian)
    config.write_text(
        json.dumps(
            {
                "base": str(common.REPO / "configs" / "default.yaml"),
                "name": f"deploy-{name}",
                "output_dir": str(root),
                "model": {"name_or_path": str(args.model)},
                "data": {"corpus": str(common.REPO / directory), "eval_splits": {split: str(common.REPO / directory)}},
                "encode": {"model": str(args.model), "sizes": args.sizes.split(",")},
                "search": {"quantization": args.precisions, "depth": 10},
                "eval": {"metrics": ["nDCG@10", "RR@10"], "plot": False},
            },
            indent=2,
        )
        + "\n"
    )
    cfg = load_config(config)
    started = time.perf_counter()
    encode_collection(cfg, progress=False)
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)
    print(f"deploy: {name}: encode, search, eval in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    choose_size(
        [
            str(root),
            "--split",
            split,
            "--queries",
            str(common.REPO / directory),
            "--passages",
            str(args.passages),
            "--query-sample",
            str(args.query_sample),
        ]
    )
    report = json.loads((root / "eval" / f"sizes-{split}.json").read_text())
    rows = []
    for r in report["sizes"]:
        row = {"collection": name, "split": split, **{k: r[k] for k in ("size", "layers", "dim", "precision")}}
        row.update(
            ndcg10=r["quality"],
            bytes_per_passage=r["bytes_per_passage"],
            latency_ms=r["latency_ms"],
            search_ms=r["search_ms"],
            passages_per_second=r["passages_per_second"],
        )
        common.emit("deploy", **row)
        rows.append(row)
    return rows


def write_doc(results: dict[str, list[dict]], args) -> None:
    """The measured part of docs/deploy.md, between its markers: per collection, nDCG@10 and bytes per
    passage (size x precision), the latency table and the chooser's plot."""
    parts = [
        f"Measured by `python bench/deploy.py --model {args.model}` on {args.date}, "
        f"{common.machine(common.pick_device('cpu'))}. Quality: nDCG@10 of the run files (`eval`); bytes: the "
        "searched files on disk over the passages (the fp16 shards; the int8 / binary FAISS index; with "
        "re-scoring the index plus the fp16 shards); latency: `eval.sizes`, median over "
        f"{args.query_sample} queries of tokenising, encoding and searching one query (top 10)."
    ]
    for name, rows in results.items():
        split = rows[0]["split"]
        sizes = list(dict.fromkeys(split_run_name(r["size"])[0] for r in rows))
        precisions = list(dict.fromkeys(r["precision"] for r in rows))
        cell = {(split_run_name(r["size"])[0], r["precision"]): r for r in rows}
        headers = ["size"] + [f"{p} nDCG@10 / bytes" for p in precisions]
        table = [
            [f"{s} ({cell[s, precisions[0]]['layers']}x{cell[s, precisions[0]]['dim']})"]
            + [
                f"{cell[s, p]['ndcg10']:.4f} / {cell[s, p]['bytes_per_passage']:.0f}" if (s, p) in cell else "-"
                for p in precisions
            ]
            for s in sizes
        ]
        latency = [
            [s] + [f"{cell[s, p]['latency_ms']:.2f}" if (s, p) in cell else "-" for p in precisions] for s in sizes
        ]
        plot = Path(args.out) / name / "eval" / f"sizes-{split}.png"
        target = DOC.parent / "deploy" / f"{name}-{split}.png"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(plot, target)
        parts += [
            f"### {name} ({split}): nDCG@10 / bytes per passage",
            common.table(headers, table),
            f"Single-query latency (ms): tokenise + encode + search top 10 of {name}'s passages.",
            common.table(["size", *precisions], latency),
            f"![{name}: the size chooser over layers, dims and precision](deploy/{target.name})",
        ]
    common.write_section("deploy_measured", "\n\n".join(parts), DOC)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Starbucks checkpoint (a model directory)")
    parser.add_argument("--out", default="runs/deploy", help="where the runs go (one directory per collection)")
    parser.add_argument("--sizes", default="demi,short,tall,grande,venti,trenta")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--collections", default=",".join(COLLECTIONS))
    parser.add_argument("--passages", type=int, default=256, help="passages timed per size (eval.sizes)")
    parser.add_argument("--query-sample", type=int, default=50, help="queries timed per size (eval.sizes)")
    parser.add_argument("--no-write", action="store_true", help="print the JSON lines only")
    args = parser.parse_args(argv)
    args.precisions = [parse_quantization(p).name for p in args.precisions.split(",")]
    args.date = common.today()
    results = {}
    for name in args.collections.split(","):
        directory, split = COLLECTIONS[name]
        results[name] = run_collection(name, directory, split, args)
    if not args.no_write:
        write_doc(results, args)


if __name__ == "__main__":
    main()
