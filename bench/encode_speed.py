"""Encoding speed: the toolkit (early exit, one pass for every size, length-sorted batches with
dynamic padding) against the plain-transformers reference (bench/reference.py: one full forward
per size, batches in corpus order padded to the longest, multiple of 16).

    python bench/encode_speed.py --model minilm --passages 512            # 2 CPU cores
    python bench/encode_speed.py --model bert-base --passages 20000       # GPU (fp16 autocast)
    python bench/encode_speed.py --model minilm --passages 512 --packing both --skip-reference  # packed vs padded

Texts: debian-pkgs passages (capped at 196 tokens). Prints one JSON line per figure and writes
a table into docs/benchmarks.md (section `encode_<model>_<device>`): passages/s per size alone,
all six in one pass vs the reference's six passes, and ours' MFU (model FLOPs of the real tokens
through the deepest layer a row runs, train/flops.py) against the GPU's datasheet peak or this CPU's
measured peak (bench/roofline.py) of the precision ours ran in.
"""

from __future__ import annotations

import argparse
import copy

import torch

import common
import reference
from encode.pipeline import encode_texts, loader_workers
from retrieval.model import StarbucksModel
from retrieval.encoder import StarbucksEncoder
from retrieval.settings import resolve_precision


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=196)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--half", action="store_true", help="ours: fp16 weights instead of fp16 autocast")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="dynamic",
        choices=["dynamic", "buckets"],
        help="ours: torch.compile the encoder layers (buckets: static shapes, packed token counts "
        "rounded up to a few buckets)",
    )
    parser.add_argument("--only", default=None, help="comma list of size names to time (default: each + all six)")
    parser.add_argument(
        "--packing",
        default="auto",
        choices=["auto", "true", "false", "both"],
        help="ours: model.packing (both: time ours padded and packed)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16", "both"],
        help="ours: encode.precision (auto: fp16 autocast on a GPU, bf16 on a CPU with native bf16, "
        "else fp32; both: fp32 and bf16 side by side); the reference runs fp32 on the CPU",
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="ours: tokenising processes (default: encode's auto)")
    parser.add_argument("--tag", default="", help="suffix of the docs/benchmarks.md section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    backbone, tokenizer = common.load_backbone(args.model)
    backbone.to(device).eval()
    sizes = common.sizes_for(args.model)
    mine = copy.deepcopy(backbone).half() if args.half else backbone
    encoder = StarbucksEncoder(mine, "cls", normalize=False)
    if args.compile:
        encoder.compile_layers(args.compile == "buckets")
    ours = StarbucksModel(
        encoder,
        tokenizer,
        sizes,
        query_max_length=32,
        passage_max_length=args.max_length,
        source=args.model,
        precision="fp32" if args.half else "auto",
    )
    texts = common.debian_texts("passage", args.passages)
    workers = loader_workers(args.workers if args.workers is not None else "auto", device)
    dtype = torch.float16 if device.type == "cuda" else None
    lengths = [
        min(len(x), args.max_length) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    ]
    mark = f"encode_{args.model}_{device.type}{args.tag}"

    packings = {"both": {"padded": False, "packed": True}}.get(args.packing, {"": args.packing})
    precisions = ["fp32", "bf16"] if args.precision == "both" else ["fp32" if args.half else args.precision]
    resolved = {p: resolve_precision(p, device, "--precision") for p in precisions}
    variants = {
        " ".join(x for x in (resolved[p] if len(precisions) > 1 else "", k) if x) or "ours": (p, v)
        for p in precisions
        for k, v in packings.items()
    }

    def ours_rate(wanted, variant) -> tuple[float, float]:
        """passages/s by wall time and by this process's CPU time"""
        ours.precision, encoder.packing = variant
        wall, cpu = common.best_times(
            lambda: encode_texts(ours, texts, wanted, "passage", args.batch_size, workers=workers), device, args.repeats
        )
        return len(texts) / wall, len(texts) / cpu

    def reference_rate(wanted) -> float:
        if args.skip_reference:
            return float("nan")
        keys = [(s.layers, s.dim) for s in wanted]
        t = common.best_time(
            lambda: reference.encode(backbone, tokenizer, texts, keys, args.batch_size, args.max_length, device, dtype),
            device,
            args.repeats,
        )
        return len(texts) / t

    rows = []
    plan = [(s.name, [s]) for s in sizes] + [("all six, one pass", list(sizes))]
    if args.only:
        plan = [(label, wanted) for label, wanted in plan if label.split()[0].rstrip(",") in args.only.split(",")]
    for label, wanted in plan:
        rates = {name: ours_rate(wanted, variant) for name, variant in variants.items()}
        best = max(rates, key=lambda name: rates[name][0])
        mine, ref = rates[best][0], reference_rate(wanted)
        ran_in = resolved[variants[best][0]]  # what the MFU counts against: the best variant's precision
        deepest = max(s.layers for s in wanted)
        mfu = common.mfu(common.bert_flops(backbone.config, deepest, lengths), len(texts) / mine, device, ran_in)
        gain = [rates["packed"][j] / rates["padded"][j] for j in (0, 1)] if set(rates) == {"padded", "packed"} else None
        rows.append(
            [
                label,
                "+".join(s.key for s in wanted) if len(wanted) < 3 else "all",
                *[f"{r[0]:.1f}" for r in rates.values()],
                *([f"{gain[0]:.2f}x ({gain[1]:.2f}x)"] if gain else []),
                *(["-", "-"] if args.skip_reference else [f"{ref:.1f}", f"{mine / ref:.2f}x"]),
                f"{common.mfu_cell(mfu)} ({best})" if len(rates) > 1 else common.mfu_cell(mfu),
            ]
        )
        common.emit(
            mark,
            sizes=label,
            **{f"{name.replace(' ', '_')}_passages_per_s": round(r[0], 1) for name, r in rates.items()},
            **(
                {"packed_over_padded": round(gain[0], 3), "packed_over_padded_cpu_time": round(gain[1], 3)}
                if gain
                else {}
            ),
            reference_passages_per_s=round(ref, 1),
            speedup=round(mine / ref, 2),
            precision=ran_in,
            mfu=None if mfu is None else round(mfu, 4),
        )
    md = "\n".join(
        [
            f"## Encoding: {args.model} on {device.type} ({mark})",
            "",
            f"- command: `python bench/encode_speed.py --model {args.model} --passages {args.passages} "
            f"--batch-size {args.batch_size} --repeats {args.repeats}{' --half' if args.half else ''}"
            f"{' --only ' + args.only if args.only else ''}{' --compile ' + args.compile if args.compile else ''}"
            f"{' --packing ' + args.packing if args.packing != 'auto' else ''}"
            f"{' --precision ' + args.precision if args.precision != 'auto' else ''}"
            f"{' --workers ' + str(args.workers) if args.workers is not None else ''}"
            f"{' --skip-reference' if args.skip_reference else ''}{' --tag ' + args.tag if args.tag else ''}`",
            f"- machine: {common.machine(device)}",
            f"- date: {common.today()}",
            f"- {len(texts)} debian-pkgs passages (<= {args.max_length} tokens, mean {sum(lengths) / len(lengths):.0f}), "
            f"ours in {' and '.join(sorted(set(resolved.values())))}{' (fp16 weights)' if args.half else ''} "
            f"(precision {args.precision}), the reference in {'fp16 autocast' if dtype else 'fp32'}, CLS pooling, "
            f"best of {args.repeats}; reference: "
            "bench/reference.py (one full forward per size, corpus order, padded to the longest x16); ours tokenises in "
            f"{workers} DataLoader worker processes (encode.dataloader_workers)"
            + (
                "; packed: model.packing (retrieval/packing.py; on the CPU padded only inside attention), "
                "packed/padded by wall time (by this process's CPU time)"
                if len(variants) == 2
                else ""
            )
            + f"; {common.mfu_note(device, resolved[precisions[-1]])}"
            + (
                "; each row's MFU counts against the peak of its fastest variant's precision (named)"
                if len(rates) > 1
                else ""
            ),
            "",
            common.table(
                [
                    "sizes",
                    "layers x dim",
                    *[f"ours {name} passages/s" if name != "ours" else "ours passages/s" for name in variants],
                    *(["packed/padded"] if set(variants) == {"padded", "packed"} else []),
                    "reference passages/s",
                    "speedup",
                    "MFU (ours)",
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
