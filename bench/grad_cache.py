"""Memory and time of one SRL training step with and without gradient caching (train/gradcache.py).

    python bench/grad_cache.py --model minilm --batches 4x8,8x8,16x8 --chunks 0,8,32          # CPU
    python bench/grad_cache.py --model bert-base --batches 128x8 --chunks 0,32,64,128         # GPU, bf16

`--batches` are queries x passages per query; `--chunks` texts per re-run chunk (0: the plain,
uncached step). Each configuration runs in a fresh process. Peak memory: on a GPU
`torch.cuda.max_memory_allocated` during the timed steps; on the CPU the process's peak RSS above
its RSS before the first step (weights, optimizer state and gradients included, like on the GPU)
and, exact and independent of the allocator, the peak bytes of the tensors autograd saves for
backward. One JSON line per configuration, a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

import common
from retrieval.losses import InfoNCE, StarbucksLoss
from retrieval.encoder import StarbucksEncoder, tokenize


class SavedTensors:
    """Bytes of the storages autograd holds for backward (each storage once, however many views of it
    are saved), now and at the peak."""

    holders: dict[int, list[int]] = {}  # storage address -> [bytes, saved views alive]
    live = peak = 0

    def __init__(self, t):
        self.t, self.key = t, t.untyped_storage().data_ptr()
        entry = SavedTensors.holders.setdefault(self.key, [t.untyped_storage().nbytes(), 0])
        entry[1] += 1
        if entry[1] == 1:
            SavedTensors.live += entry[0]
            SavedTensors.peak = max(SavedTensors.peak, SavedTensors.live)

    def __del__(self):
        entry = SavedTensors.holders[self.key]
        entry[1] -= 1
        if entry[1] == 0:
            SavedTensors.live -= entry[0]
            del SavedTensors.holders[self.key]

    def unpack(self):
        return self.t


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one(args) -> dict:
    """One configuration in this process: median step time and peak memory."""
    from accelerate import Accelerator

    from retrieval.dropout import use_fast_dropout
    from train.gradcache import cached_backward

    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no")
    queries, group = (int(x) for x in args.batch.split("x"))
    backbone, tokenizer = common.load_backbone(args.model)
    sizes = list(common.sizes_for(args.model))
    encoder = StarbucksEncoder(backbone, "cls").to(device).train()
    if device.type == "cpu":  # as the trainer does (train.dropout_masks: auto)
        use_fast_dropout(encoder)
    loss_fn = StarbucksLoss(InfoNCE(1.0), sizes, kl_weight=1.0)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu"))
    q_texts = common.debian_texts("query", queries * 2, seed=1)
    p_texts = common.debian_texts("passage", queries * group * 2, seed=2)
    batches = [
        {
            "queries": tokenize(tokenizer, q_texts[b * queries : (b + 1) * queries], 32).to(device),
            "passages": tokenize(tokenizer, p_texts[b * queries * group : (b + 1) * queries * group], 196).to(device),
        }
        for b in range(2)
    ]

    def step(i):
        batch = {k: dict(v) for k, v in batches[i % 2].items()}
        if args.chunk:
            cached_backward(
                accelerator, encoder, batch, sizes, lambda e: loss_fn(e["queries"], e["passages"], sizes), args.chunk
            )
        else:
            with accelerator.autocast():
                out = loss_fn(encoder(batch["queries"], sizes), encoder(batch["passages"], sizes), sizes)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(SavedTensors, SavedTensors.unpack):
        step(0)  # warm-up (allocates the optimizer state)
        common.sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = [common.best_times(lambda i=i: step(i), device, repeats=1, warmup=0)[0] for i in range(args.steps)]
    record = {
        "bench": f"grad_cache_{args.model}_{device.type}",
        "batch": args.batch,
        "chunk": args.chunk or None,
        "step_s": round(sorted(times)[len(times) // 2], 3),
        "saved_activations_gib": round(SavedTensors.peak / 2**30, 3),
    }
    if cuda:
        record["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    else:
        record["peak_rss_above_start_gib"] = round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**30, 3
        )
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--batches", default="4x8,8x8,16x8", help="queries x passages per query, comma list")
    parser.add_argument("--chunks", default="0,8,32", help="texts per chunk, comma list (0: no gradient caching)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after 1 warm-up step)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip", default="", help="configurations to leave out, e.g. 32x8/0 (too big for the machine)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--batch", help=argparse.SUPPRESS)  # one configuration (the child process)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch:
        print(json.dumps(one(args)), flush=True)
        return

    device = common.pick_device(args.device)
    records = []
    skip = set(filter(None, args.skip.split(",")))
    for batch in args.batches.split(","):
        for chunk in (int(c) for c in args.chunks.split(",")):
            if f"{batch}/{chunk}" in skip:
                continue
            child = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--batch",
                    batch,
                    "--chunk",
                    str(chunk),
                    "--model",
                    args.model,
                    "--steps",
                    str(args.steps),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
            )
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            record = (
                json.loads(lines[-1])
                if child.returncode == 0 and lines
                else {
                    "bench": f"grad_cache_{args.model}_{device.type}",
                    "batch": batch,
                    "chunk": chunk or None,
                    "failed": (child.stderr.strip().splitlines() or ["?"])[-1],
                }
            )
            print(json.dumps(record), flush=True)
            records.append(record)

    cuda = device.type == "cuda"
    plain = {r["batch"]: r for r in records if r["chunk"] is None and "step_s" in r}
    rows = []
    for r in records:
        if "step_s" not in r:
            rows.append([r["batch"], r["chunk"] or "-", "failed: " + r["failed"][:60], "-", "-", "-"])
            continue
        memory = r["peak_gib"] if cuda else r["peak_rss_above_start_gib"]
        base = plain.get(r["batch"])
        rows.append(
            [
                r["batch"],
                r["chunk"] or "- (plain)",
                f"{memory:.2f}",
                f"{r['saved_activations_gib']:.3f}",
                f"{r['step_s']:.2f}",
                f"{r['step_s'] / base['step_s']:.2f}x" if base else "-",
            ]
        )
    mark = f"grad_cache_{args.model}_{device.type}"
    memory_name = "peak GiB" if cuda else "peak RSS GiB"
    md = "\n".join(
        [
            f"## Gradient caching: {args.model} on {device.type} ({mark})",
            "",
            f"- command: `python bench/grad_cache.py --model {args.model} --batches {args.batches} --chunks {args.chunks} "
            f"--steps {args.steps}{' --skip ' + args.skip if args.skip else ''}`",
            f"- machine: {common.machine(device)}",
            f"- date: {common.today()}",
            f"- one SRL step (six sizes, KL on, AdamW), {'bf16 autocast' if cuda else 'fp32'}, CLS pooling, passages "
            f"<= 196 tokens; median of {args.steps} steps after one warm-up; each row a fresh process. "
            + (
                "peak GiB: torch.cuda.max_memory_allocated. "
                if cuda
                else "peak RSS: the process's peak resident memory above its memory before the first step. "
            )
            + "Saved activations: peak bytes of the tensors autograd keeps for backward.",
            "",
            common.table(
                ["queries x passages", "chunk", memory_name, "saved activations GiB", "step s", "time vs plain"], rows
            ),
        ]
    )
    print(md)
    if not args.no_write:
        common.write_section(mark, md)


if __name__ == "__main__":
    main()
