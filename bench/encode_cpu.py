"""Encoding speed per Starbucks size on the CPU (early exit), and all sizes in one pass.

    python bench/encode_cpu.py [--config configs/default.yaml] [--passages 512] [--repeats 2]

Encodes the first `--passages` passages of the config's corpus with the config's backbone,
once per size alone and once for every size in one forward pass; prints one JSON line per
figure and writes the table into docs/benchmarks.md (between this benchmark's markers).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from encode.pipeline import encode_texts, load_model  # noqa: E402
from retrieval.config import load_config, sizes_of  # noqa: E402
from retrieval.data import iter_corpus  # noqa: E402

MARK = "encode_cpu"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_rate(model, texts, sizes, batch_size, repeats) -> float:
    """Passages per second, best of `repeats` timed runs after one warm-up batch."""
    device = torch.device("cpu")
    encode_texts(model, texts[:batch_size], sizes, "passage", batch_size, device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode_texts(model, texts, sizes, "passage", batch_size, device)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def write_section(markdown: str) -> None:
    path = REPO / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {MARK}:start -->", f"<!-- {MARK}:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    cfg.encode.model = cfg.model.name_or_path  # the backbone itself, not a trained model of the experiment
    sizes = list(sizes_of(cfg))
    model = load_model(cfg, torch.device("cpu"))
    texts = [text for _, text in itertools.islice(iter_corpus(str(cfg.data.corpus)), args.passages)]

    rows = []
    for label, wanted in [(s.name, [s]) for s in sizes] + [("all sizes, one pass", sizes)]:
        rate = best_rate(model, texts, wanted, args.batch_size, args.repeats)
        rows.append((label, "+".join(s.key for s in wanted), rate))
        print(json.dumps({"bench": MARK, "sizes": label, "passages_per_s": round(rate, 1)}), flush=True)
    by_name = {label: rate for label, _, rate in rows}
    ratio = by_name[sizes[0].name] / by_name[sizes[-1].name]
    print(json.dumps({"bench": MARK, "ratio": f"{sizes[0].name}/{sizes[-1].name}", "value": round(ratio, 2)}))

    table = [
        f"## Encoding per size on the CPU ({MARK})",
        "",
        f"- command: `python bench/encode_cpu.py --passages {args.passages} --batch-size {args.batch_size} "
        f"--repeats {args.repeats}`",
        f"- machine: {machine()}",
        f"- date: {datetime.date.today().isoformat()}",
        f"- model: `{cfg.model.name_or_path}`, fp32; the first {len(texts)} passages of `{cfg.data.corpus}` "
        f"(max {cfg.model.passage_max_length} tokens), longest first, best of {args.repeats}",
        "",
        "| sizes | layers x dim | passages/s |",
        "|---|---|---:|",
        *[f"| {label} | {keys} | {rate:.1f} |" for label, keys, rate in rows],
        "",
        f"{sizes[0].name} is {ratio:.1f}x faster than {sizes[-1].name} (early exit). "
        f"All sizes in one pass cost {by_name[sizes[-1].name] / rows[-1][2]:.2f}x the time of {sizes[-1].name} alone.",
    ]
    markdown = "\n".join(table)
    print(markdown)
    if not args.no_write:
        write_section(markdown)


if __name__ == "__main__":
    main()
