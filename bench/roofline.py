"""This machine's peak matmul rate on the threads the run has (`torch.get_num_threads()`): the
denominator of every CPU benchmark's MFU.

    python bench/roofline.py                       # fp32, bf16, int8 at 2048 and 4096
    OMP_NUM_THREADS=1 python bench/roofline.py     # the peak of the one-thread rows of run_cpu.sh

Square matmuls, best of `--repeats` per size and precision after one warm-up; a precision's peak
is its best over the sizes (int8: `torch._int_mm`, int8 x int8 -> int32, where this torch has it
on the CPU). The peaks go into `bench/results/roofline-cpu.json`, one entry per thread count
(a run keeps the other thread counts' entries of the same CPU), which the other benchmarks read
(`common.peak_flops`); one JSON line per figure; the section `roofline_cpu` of docs/benchmarks.md
shows every thread count of the file.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx2", "fma")  # what the section lists


def matmul_rate(n: int, precision: str, repeats: int) -> float | None:
    """Best FLOP/s (int8: integer ops/s) of an `n x n x n` matmul; None where torch cannot run it."""
    g = torch.Generator().manual_seed(0)
    if precision == "int8":
        if not hasattr(torch, "_int_mm"):
            return None
        a, b = (torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8) for _ in range(2))
        run = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a, b = (torch.randn(n, n, generator=g).to(DTYPES[precision]) for _ in range(2))
        run = lambda: a @ b  # noqa: E731
    try:
        run()
    except (RuntimeError, NotImplementedError):
        return None
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_flags() -> list[str]:
    have = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            break
    return [f for f in FLAGS if f in have]


def section(record: dict) -> str:
    ns = sorted({n for entry in record["threads"].values() for n in entry["sizes"]}, key=int)  # every entry's sizes
    rows = []
    for threads, entry in sorted(record["threads"].items(), key=lambda kv: int(kv[0])):
        for precision, peak in entry["peaks"].items():
            sizes = entry["by_size"][precision]
            rows.append(
                [
                    threads,
                    precision,
                    *[f"{sizes[n] / 1e9:.1f}" if sizes.get(n) else "-" for n in ns],
                    f"**{peak / 1e9:.1f}**",
                    entry["repeats"],
                    entry["date"],
                ]
            )
    return "\n".join(
        [
            "## Peak matmul rate of this CPU (roofline_cpu)",
            "",
            "- command: `python bench/roofline.py` (and `OMP_NUM_THREADS=1 python bench/roofline.py`, as run_cpu.sh)",
            f"- machine: {record['cores']} cores ({record['cpu']}), torch {record['torch']}; "
            f"flags: {', '.join(record['flags']) or 'none of ' + ', '.join(FLAGS)}",
            "- square n x n x n matmuls (`a @ b`; int8: `torch._int_mm`, int8 x int8 -> int32), the best of a few "
            "after one warm-up; 2 n^3 FLOPs (int8: integer ops) per product; the peak is the best "
            "over the sizes. These peaks (`bench/results/roofline-cpu.json`) are the denominators of the CPU rows' MFU: "
            "the rate of the precision the row ran in, on the thread count it ran on.",
            "",
            common.table(
                ["threads", "precision", *[f"n={n} GFLOP/s" for n in ns], "peak GFLOP/s", "best of", "date"], rows
            ),
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096", help="comma list of n (n x n x n matmuls)")
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(common.ROOFLINE), help="the peaks file the other benchmarks read")
    parser.add_argument("--no-write", action="store_true", help="print only: leave the peaks file and the docs alone")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    sizes = [int(s) for s in args.sizes.split(",")]
    by_size: dict[str, dict[str, float | None]] = {}
    for precision in args.precisions.split(","):
        if precision not in DTYPES:
            raise SystemExit(f"--precisions: {precision!r} is not one of {', '.join(DTYPES)}")
        by_size[precision] = {}
        for n in sizes:
            rate = matmul_rate(n, precision, args.repeats)
            by_size[precision][str(n)] = rate
            common.emit(
                "roofline_cpu",
                threads=threads,
                precision=precision,
                n=n,
                gflops=None if rate is None else round(rate / 1e9, 2),
            )
    peaks = {p: max(r for r in rates.values() if r) for p, rates in by_size.items() if any(rates.values())}
    for precision, peak in peaks.items():
        common.emit("roofline_cpu", threads=threads, precision=precision, peak_gflops=round(peak / 1e9, 2))
    cpu = common.cpu_model()
    record = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "flags": cpu_flags(), "threads": {}}
    path = common.Path(args.out)
    if path.is_file():
        before = json.loads(path.read_text())
        if before.get("cpu") == cpu and before.get("torch") == torch.__version__:
            record["threads"] = before.get("threads", {})  # the other thread counts of this CPU stay
    record["threads"][str(threads)] = {
        "peaks": peaks,
        "by_size": by_size,
        "sizes": [str(n) for n in sizes],
        "repeats": args.repeats,
        "date": common.today(),
    }
    md = section(record)
    print(md)
    if not args.no_write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        common.write_section("roofline_cpu", md)


if __name__ == "__main__":
    main()
