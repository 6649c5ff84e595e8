"""Where the time goes on the GPU (a diagnostic for bench/run_gpu.sh's figures, not a benchmark):
tokenisation rates, the encoder's forward alone, a profiled training step, and the stages of the
exact search's top-k. Prints plain lines; nothing is written to docs/.

    python bench/profile_gpu.py [--part tok,fwd,train,search]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import common
from retrieval.encoder import StarbucksEncoder, tokenize


def timed(fn, device, repeats=3):
    return common.best_time(fn, device, repeats)


def part_tok(tokenizer, texts, device):
    batches = [texts[i : i + 512] for i in range(0, len(texts), 512)]
    seq = timed(lambda: [tokenize(tokenizer, b, 196) for b in batches], device, 1)
    print(f"tok sequential batches of 512: {len(texts) / seq:.0f} passages/s")
    one = timed(lambda: tokenizer(texts, truncation=True, max_length=196), device, 1)
    print(f"tok one call, no tensors: {len(texts) / one:.0f} passages/s")
    raw = timed(lambda: [tokenizer(b, truncation=True, max_length=196) for b in batches], device, 1)
    print(f"tok batches, no padding/tensors: {len(texts) / raw:.0f} passages/s")
    for workers in (4, 8, 16):
        with ThreadPoolExecutor(workers) as pool:
            t = timed(lambda: list(pool.map(lambda b: tokenize(tokenizer, b, 196), batches)), device, 1)
        print(f"tok {workers} threads: {len(texts) / t:.0f} passages/s")


def part_fwd(backbone, tokenizer, texts, device, sizes):
    order = sorted(texts, key=len, reverse=True)
    batches = [tokenize(tokenizer, order[i : i + 512], 196).to(device) for i in range(0, len(order), 512)]
    tokens = [common.bert_flops(backbone.config, 12, [int(x) for x in b["attention_mask"].sum(1)]) for b in batches]
    peak = common.peak_flops(device) or 989e12
    for label, model, cast in (("autocast fp16", backbone, True), ("fp16 weights", backbone.half(), False)):
        enc = StarbucksEncoder(model, "cls")
        for wanted in ([sizes[-1]], [sizes[0]]):

            def run():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cast):
                    for b in batches:
                        enc.embed(b, wanted)

            t = timed(run, device)
            mfu = sum(tokens) * wanted[0].layers / 12 / t / peak
            print(f"fwd {label} {wanted[0].name}: {len(texts) / t:.0f} passages/s, MFU {100 * mfu:.1f}%")
    backbone.float()


def part_train(backbone, tokenizer, device, sizes):
    from retrieval.losses import InfoNCE, StarbucksLoss

    q = common.debian_texts("query", 128, seed=1)
    p = common.debian_texts("passage", 1024, seed=2)
    qb, pb = tokenize(tokenizer, q, 32).to(device), tokenize(tokenizer, p, 196).to(device)
    enc = StarbucksEncoder(backbone.train(), "cls").train()
    enc.length_buckets = 8
    loss_fn = StarbucksLoss(InfoNCE(1.0), sizes, kl_weight=1.0)
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-5, fused=True)
    marks = {}

    def step(record=False):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = loss_fn(enc(qb, list(sizes)), enc(pb, list(sizes)), list(sizes))
        common.sync(device)
        t1 = time.perf_counter()
        out.loss.backward()
        common.sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(device)
        if record:
            marks.update(fwd=t1 - t0, bwd=t2 - t1, opt=time.perf_counter() - t2)

    for _ in range(2):
        step()
    step(record=True)
    print("train split (s):", {k: round(v, 4) for k, v in marks.items()})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


def part_search(device):
    from retrieval.exact_search import block_topk
    from search_speed import random_unit, same_results

    v = random_unit(1_000_000, 32, 0, device, torch.float16)
    q = random_unit(1024, 32, 1, device, torch.float16)
    s = q @ v.T
    ref = torch.topk(s, 1000, dim=1)
    got = block_topk(s, 1000, 64)
    bad = (ref.values != got[0]).nonzero()
    print("block identical:", same_results(ref, got), "value mismatches:", len(bad))
    if len(bad):
        i, j = bad[0].tolist()
        print(
            "row",
            i,
            "rank",
            j,
            "ref",
            ref.values[i, max(0, j - 3) : j + 3].tolist(),
            "got",
            got[0][i, max(0, j - 3) : j + 3].tolist(),
        )
        print(
            "ref sorted?",
            bool((ref.values[:, 1:] <= ref.values[:, :-1]).all()),
            "got sorted?",
            bool((got[0][:, 1:] <= got[0][:, :-1]).all()),
        )
    stages = {
        "matmul": lambda: q @ v.T,
        "topk full": lambda: torch.topk(s, 1000, dim=1),
        "amax b64": lambda: s.unflatten(1, (-1, 64)).amax(2),
    }
    m = s.unflatten(1, (-1, 64)).amax(2)
    cand = s[:, :64000].contiguous()
    stages.update(
        {
            "topk maxima 15625": lambda: torch.topk(m, 1000, dim=1),
            "sort maxima 15625": lambda: torch.sort(m, dim=1, descending=True),
            "topk cand 64000": lambda: torch.topk(cand, 1000, dim=1),
            "sort cand 64000": lambda: torch.sort(cand, dim=1, descending=True),
            "topk k=100 full": lambda: torch.topk(s, 100, dim=1),
            "kthvalue maxima": lambda: torch.kthvalue(-m.float(), 1000, dim=1),
            "block_topk 64": lambda: block_topk(s, 1000, 64),
        }
    )
    for name, fn in stages.items():
        t = timed(fn, device, 5)
        print(f"search stage {name}: {1000 * t:.3f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", default="tok,fwd,train,search")
    args = parser.parse_args()
    device = common.pick_device("auto")
    parts = args.part.split(",")
    backbone, tokenizer = common.load_backbone("bert-base")
    backbone.to(device)
    sizes = common.sizes_for("bert-base")
    texts = common.debian_texts("passage", 10000)
    if "tok" in parts:
        part_tok(tokenizer, texts, device)
    if "search" in parts:
        part_search(device)
    if "fwd" in parts:
        part_fwd(backbone.eval(), tokenizer, texts, device, sizes)
    if "train" in parts:
        part_train(backbone, tokenizer, device, sizes)


if __name__ == "__main__":
    main()
