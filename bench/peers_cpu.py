"""Peers on the CPU: each size of MiniLM encoded by this toolkit, by sentence-transformers and by ONNX
Runtime, on the same passages and threads.

    python bench/peers_cpu.py                                   # 256 passages, batch 64, best of 2 (~2.5 min)
    python bench/peers_cpu.py --passages 128 --only demi,trenta --no-write   # a quick look

The model: all-MiniLM-L6-v2 (offline) with the sizes of configs/default.yaml (demi 1x32 ... trenta
6x384), its pooling and normalisation (mean, cosine), passages cut at `--max-length` tokens. Per size:
(a) ours: `StarbucksModel.encode_passages(texts, size)` with the toolkit's defaults (precision and
packing as `auto` resolves them here); (b) sentence-transformers: the size exported by
`train.export` (`SentenceTransformer(DIR).encode_document`); (c) ONNX Runtime: the size's graph from
`train.export --onnx` (ORT_ENABLE_ALL, intra-op threads = this run's torch threads), batches of texts
sorted by length (as the other two do), tokenised by the exported tokenizer. Every implementation
tokenises inside the timed call. Best of `--repeats` after one warm-up batch; the vectors of each peer
are checked against ours (largest difference, relative to each vector's norm). One JSON line per
figure; the section `peers_cpu` of docs/benchmarks.md. Needs the onnx extra (onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

import common
from retrieval.config import load_config, sizes_of
from retrieval.data import iter_corpus
from retrieval.model import StarbucksModel
from retrieval.packing import use_packing
from retrieval.settings import resolve_precision
from train.export import ONNX_META, export_onnx, export_size
from train.flops import encoder_flops

CORPUS = common.REPO / "data" / "debian-pkgs-mini"


class OnnxEncoder:
    """A user's ONNX Runtime loop over an exported size: sort by length, tokenise each batch, run."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.meta = json.loads((folder / ONNX_META).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(
            str(folder / self.meta["file"]), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.empty((len(texts), self.meta["size"]["dim"]), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer(
                [self.meta["passage_prefix"] + texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=self.meta["passage_max_length"],
                return_tensors="np",
                return_token_type_ids=False,
            )
            out[rows] = self.session.run(["embedding"], {k: v.astype(np.int64) for k, v in batch.items()})[0]
        return out


def max_difference(got: np.ndarray, want: np.ndarray) -> float:
    """The largest `||got_i - want_i|| / ||want_i||` over the vectors."""
    return float((np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)).max())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma list of size names (default: all six)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the loading and saving bars of each size's export

    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    cfg = load_config(common.REPO / "configs" / "default.yaml")
    sizes = sizes_of(cfg)
    wanted = [s for s in sizes if not args.only or s.name in args.only.split(",")]
    corpus = [text for _, text in iter_corpus(str(CORPUS))]
    texts = [corpus[i] for i in random.Random(0).sample(range(len(corpus)), min(args.passages, len(corpus)))]
    ours = StarbucksModel.from_pretrained(
        common.MINILM,
        "cpu",
        pooling=cfg.model.pooling,
        normalize=cfg.model.normalize,
        sizes=sizes,
        passage_max_length=args.max_length,
    )
    precision = resolve_precision(ours.precision, cpu, "precision")
    packed = use_packing(ours.encoder.packing, ours.encoder.backbone, cpu)
    lengths = [
        len(ids)
        for ids in ours.tokenizer(
            [ours.passage_prefix + t for t in texts], truncation=True, max_length=args.max_length
        )["input_ids"]
    ]
    mark = "peers_cpu"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for size in wanted:  # what `starbucks export MODEL --size S --out DIR --onnx DIR` writes
            st_model = SentenceTransformer(str(export_size(ours, size, work / "st" / size.name)), device="cpu")
            onnx_model = OnnxEncoder(export_onnx(ours, size, work / "onnx" / size.name), threads)
            peers = {
                "ours": lambda x, size=size: ours.encode_passages(x, size.name, batch_size=args.batch_size),
                "sentence-transformers": lambda x, m=st_model: m.encode_document(x, batch_size=args.batch_size),
                "onnxruntime": lambda x, m=onnx_model: m.encode(x, args.batch_size),
            }
            flops = encoder_flops(lengths, size.layers, ours.encoder.config)
            result = {}
            for name, encode in peers.items():
                encode(texts[: args.batch_size])  # warm-up: one batch
                vectors = {}
                seconds = common.best_time(
                    lambda encode=encode: vectors.__setitem__("v", encode(texts)), cpu, args.repeats, warmup=0
                )
                ran_in = precision if name == "ours" else "fp32"
                mfu = common.mfu(flops, seconds, cpu, ran_in)
                result[name] = (len(texts) / seconds, mfu, np.asarray(vectors["v"], dtype=np.float32))
                diff = None if name == "ours" else max_difference(result[name][2], result["ours"][2])
                common.emit(
                    mark,
                    size=size.name,
                    key=size.key,
                    impl=name,
                    passages_per_s=round(len(texts) / seconds, 1),
                    precision=ran_in,
                    mfu=mfu and round(mfu, 4),
                    **({} if diff is None else {"max_difference_vs_ours": float(f"{diff:.2g}")}),
                )
            rate = {name: r[0] for name, r in result.items()}
            diffs = [max_difference(result[n][2], result["ours"][2]) for n in ("sentence-transformers", "onnxruntime")]
            rows.append(
                [
                    size.name,
                    size.key,
                    *[f"{rate[n]:.1f}" for n in peers],
                    f"{rate['ours'] / rate['sentence-transformers']:.2f}x",
                    f"{rate['ours'] / rate['onnxruntime']:.2f}x",
                    *[common.mfu_cell(result[n][1]) for n in peers],
                    " / ".join(f"{d:.0e}" for d in diffs),
                ]
            )
    md = "\n".join(
        [
            "## Peers on the CPU: MiniLM per size, ours vs sentence-transformers vs ONNX Runtime (peers_cpu)",
            "",
            f"- command: `python bench/peers_cpu.py --passages {args.passages} --batch-size {args.batch_size} "
            f"--max-length {args.max_length} --repeats {args.repeats}{' --only ' + args.only if args.only else ''}`",
            f"- machine: {common.machine(cpu)}; onnxruntime {__import__('onnxruntime').__version__}, "
            f"sentence-transformers {__import__('sentence_transformers').__version__}",
            f"- date: {common.today()}",
            f"- {len(texts)} debian-pkgs-mini passages (<= {args.max_length} tokens, mean "
            f"{sum(lengths) / len(lengths):.0f}), batches of {args.batch_size}, best of {args.repeats} after a warm-up "
            f"batch, tokenising included; all-MiniLM-L6-v2, mean pooling, normalised. Ours: "
            f"`StarbucksModel.encode_passages` with its defaults here ({precision}, "
            f"{'packed' if packed else 'padded'} batches); sentence-transformers: `SentenceTransformer(export).encode_document`"
            f" of the size's `train.export`, fp32; ONNX Runtime: the size's `train.export --onnx` graph, fp32, "
            f"ORT_ENABLE_ALL, {threads} intra-op threads. diff: the largest difference from ours' vector, relative to "
            f"its norm (sentence-transformers / ONNX Runtime). {common.mfu_note(cpu, 'fp32')}"
            + (f" (ours against the {precision} peak)" if precision != "fp32" else ""),
            "",
            common.table(
                [
                    "size",
                    "layers x dim",
                    "ours passages/s",
                    "sentence-transformers passages/s",
                    "ONNX Runtime passages/s",
                    "ours / ST",
                    "ours / ORT",
                    "MFU ours",
                    "MFU ST",
                    "MFU ORT",
                    "diff",
                ],
                rows,
            ),
        ]
    )
    print(md)
    if not args.no_write:
        common.write_section(mark, md)


if __name__ == "__main__":
    main()
