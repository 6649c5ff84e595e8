"""What the benchmarks share: the machine line, JSON output, the markdown sections of
docs/benchmarks.md, the workloads (debian-pkgs texts, the two backbones), FLOP counts and MFU
(against a GPU's datasheet peak, or this CPU's peak as bench/roofline.py measured it)."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from retrieval.malloc import tune_malloc  # noqa: E402
from retrieval.settings import resolve_device as pick_device  # noqa: E402,F401  (re-exported for the bench scripts)
from retrieval.tables import markdown_table  # noqa: E402
from train.flops import encoder_flops  # noqa: E402

# the allocator as the stages' command lines set it (retrieval/malloc.py; STARBUCKS_MALLOC_TUNE=0: glibc's default)
MALLOC_TUNED = tune_malloc()
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# Dense bf16/fp16 tensor-core peaks (no sparsity), FLOP/s, for the MFU figures.
# Matched in this order against torch.cuda.get_device_name ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
PAPER_SIZES = "2x32,4x64,6x128,8x256,10x512,12x768"  # the paper's six sizes on BERT-base
# This CPU's measured matmul peaks per thread count (bench/roofline.py writes it, peak_flops reads it).
ROOFLINE = REPO / "bench" / "results" / "roofline-cpu.json"


def cpu_model() -> str:
    return next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )


def machine(device: torch.device) -> str:
    what = f"{os.cpu_count()} cores ({cpu_model()})"
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)}, {what}"
    allocator = "glibc malloc " + ("tuned (retrieval/malloc.py)" if MALLOC_TUNED else "default")
    return f"{what}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {allocator}"


def today() -> str:
    return datetime.date.today().isoformat()


def emit(bench: str, **fields) -> None:
    """One JSON line per figure on stdout."""
    print(json.dumps({"bench": bench, **fields}), flush=True)


def write_section(mark: str, markdown: str, path: Path = REPO / "docs" / "benchmarks.md") -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md, between its markers."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {mark}:start -->", f"<!-- {mark}:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def table(headers: list[str], rows: list[list]) -> str:
    return markdown_table(headers, rows).rstrip("\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Best wall time and best CPU time of this process (all its threads; what a shared machine's
    other load disturbs least) of `repeats` calls after `warmup` untimed ones (the device synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def best_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls after `warmup` untimed ones (the device synchronised)."""
    return best_times(fn, device, repeats, warmup)[0]


def peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """FLOP/s the MFU of a row that ran in `precision` (fp32, bf16, fp16, int8) on `device` counts
    against. GPU: the datasheet's dense bf16/fp16 peak (`PEAK_FLOPS`). CPU: the peak bench/roofline.py
    measured on this CPU at this run's thread count (`ROOFLINE`; fp16 rows count against bf16's); None
    when it has not measured it (run `python bench/roofline.py` first, with the same OMP_NUM_THREADS)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if all(part in name for part in key.split()):
                return value
        return None
    if not ROOFLINE.is_file():
        return None
    record = json.loads(ROOFLINE.read_text())
    if record.get("cpu") != cpu_model():
        return None
    peaks = record.get("threads", {}).get(str(torch.get_num_threads()), {}).get("peaks", {})
    return peaks.get({"fp16": "bf16"}.get(precision, precision))


def mfu(flops: float, seconds: float, device: torch.device, precision: str) -> float | None:
    """Model FLOPs per second over the peak of `precision` on `device` (None: no peak known)."""
    peak = peak_flops(device, precision)
    return flops / seconds / peak if peak and seconds > 0 else None


def mfu_cell(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def mfu_note(device: torch.device, precision: str, what: str = "model FLOPs of the real tokens") -> str:
    """What a section's MFU column counts against, in words."""
    peak = peak_flops(device, precision)
    if device.type == "cuda":
        return (
            f"MFU: {what} / time / the datasheet's dense bf16/fp16 peak ({peak / 1e12:.0f} TFLOP/s)"
            if peak
            else "MFU: - (no datasheet peak for this GPU in bench/common.py)"
        )
    threads = torch.get_num_threads()
    if peak is None:
        return (
            f"MFU: - (no {precision} peak measured for {threads} threads on this CPU: run "
            f"`{'OMP_NUM_THREADS=1 ' if threads == 1 else ''}python bench/roofline.py` first)"
        )
    return (
        f"MFU: {what} / time / this CPU's measured {precision} matmul peak on {threads} threads "
        f"({peak / 1e9:.0f} GFLOP/s, bench/roofline.py)"
    )


def bert_flops(config, layers: int, lengths: list[int], backward: bool = False) -> float:
    """Model FLOPs of `layers` encoder layers over sequences of `lengths` real tokens (padding not
    counted; train/flops.py's count); x3 with backward."""
    return (3 if backward else 1) * encoder_flops(lengths, layers, config)


def debian_texts(kind: str, count: int, seed: int = 0) -> list[str]:
    """`count` passages (or queries) of the full debian-pkgs collection, sampled with a fixed seed."""
    name = {"passage": "corpus.jsonl.gz", "query": "queries.jsonl.gz"}[kind]
    with gzip.open(REPO / "data" / "debian-pkgs" / name, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    return [texts[i] for i in rng.sample(range(len(texts)), min(count, len(texts)))]


def load_backbone(name: str):
    """`(model, tokenizer)`: "minilm" (all-MiniLM-L6-v2, offline; random weights when BENCH_MINILM_DIR
    holds only its config) or "bert-base" (random weights, BERT-base config: 12 layers, 768 dims;
    speed does not depend on the weights)."""
    from transformers import BertConfig, BertModel

    from retrieval.checkpoint import load_backbone as load

    path = os.environ.get("BENCH_MINILM_DIR") or MINILM
    if os.path.isdir(path) and not any(Path(path).glob("*.safetensors")):
        # run_gpu.sh carries MiniLM's config and tokenizer only: random weights, the same speed
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModel.from_config(
            AutoConfig.from_pretrained(path), add_pooling_layer=False, attn_implementation="sdpa"
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        model, tokenizer = load(path, torch_dtype=torch.float32)
    if name == "minilm":
        return model, tokenizer
    if name == "bert-base":
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, attn_implementation="sdpa")
        return BertModel(config, add_pooling_layer=False), tokenizer
    raise SystemExit(f"unknown model {name!r}: minilm or bert-base")


def sizes_for(name: str):
    """The six sizes of a backbone as a SizeList: the paper's on BERT-base, the default config's on MiniLM."""
    from retrieval.config import load_config, sizes_of
    from retrieval.sizes import Size, SizeList

    default = sizes_of(load_config(REPO / "configs" / "default.yaml"))
    if name == "bert-base":
        return SizeList(
            Size(s.name, int(key.split("x")[0]), int(key.split("x")[1]))
            for s, key in zip(default, PAPER_SIZES.split(","))
        )
    return default
