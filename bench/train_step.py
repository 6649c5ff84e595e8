"""One SRL training step: the toolkit's (train/finetune.py's task: StarbucksEncoder with early exit
per size set, StarbucksLoss, the trainer's AdamW, fused on CUDA and the CPU, and its dropout masks) against the plain-transformers
reference (bench/reference.py), on the same batches.

    python bench/train_step.py --model minilm --queries 8 --group 4 --steps 3          # 2 CPU cores
    python bench/train_step.py --model bert-base --queries 128 --group 8 --steps 10    # GPU, bf16
    python bench/train_step.py --model minilm --queries 8 --group 4 --packing both --skip-reference  # packed vs padded

Queries are debian-pkgs synopses (<= 32 tokens), passages debian-pkgs descriptions (<= 196).
Reports queries/s, step time, peak GPU memory and MFU (model FLOPs of the real tokens: forward
and backward of every layer once and of each size's score matrix, train/flops.py's
retrieval_step_flops; against the GPU's datasheet peak or this CPU's measured peak, bench/roofline.py,
of the precision the step ran in), one JSON line per figure, and a table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy

import torch

import common
import reference
from retrieval.losses import InfoNCE, StarbucksLoss
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.settings import resolve_precision
from retrieval.dropout import use_fast_dropout
from train.flops import retrieval_step_flops


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", choices=["minilm", "bert-base"])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--group", type=int, default=4, help="passages per query (1 positive + hard negatives)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="dynamic",
        choices=["dynamic", "buckets"],
        help="torch.compile the toolkit's encoder layers (buckets: static shapes, packed token "
        "counts rounded up to a few buckets)",
    )
    parser.add_argument(
        "--buckets",
        type=int,
        default=0,
        help="ours: a batch runs as this many length-sorted sub-batches (train.length_buckets; 0: auto)",
    )
    parser.add_argument(
        "--packing",
        default="auto",
        choices=["auto", "true", "false", "both"],
        help="ours: model.packing (both: time ours padded and packed)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "both"],
        help="ours: train.precision (auto: bf16 on a GPU or a CPU with native bf16, else fp32; both: "
        "fp32 and bf16 side by side); the reference: bf16 autocast on a GPU, fp32 on the CPU",
    )
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--reference-checkpointing",
        action="store_true",
        help="the reference with gradient checkpointing (what a user does when it runs out of memory)",
    )
    parser.add_argument("--tag", default="", help="suffix of the docs/benchmarks.md section")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (4: every batch shape seen once)")
    parser.add_argument("--no-cudnn-sdp", action="store_true", help="keep SDPA off the cuDNN attention kernels")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)

    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if cuda else None
    backbone, tokenizer = common.load_backbone(args.model)
    sizes = common.sizes_for(args.model)
    keys = [(s.layers, s.dim) for s in sizes]
    batches = []
    queries = common.debian_texts("query", args.queries * 4, seed=1)
    passages = common.debian_texts("passage", args.queries * args.group * 4, seed=2)
    for b in range(4):
        q = queries[b * args.queries : (b + 1) * args.queries]
        p = passages[b * args.queries * args.group : (b + 1) * args.queries * args.group]
        batches.append((q, p))
    # tokenised ahead for both (the toolkit's trainer tokenises in its DataLoader): a step is GPU work
    ours_batches = [(tokenize(tokenizer, q, 32).to(device), tokenize(tokenizer, p, 196).to(device)) for q, p in batches]
    ref_batches = [
        (reference.tokenize(tokenizer, q, 32, device), reference.tokenize(tokenizer, p, 196, device))
        for q, p in batches
    ]
    results = {}
    packing_variants = {"both": {"padded": False, "packed": True}}.get(args.packing, {"": args.packing})
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    resolved = {p: resolve_precision(p, device, "--precision", gpu_default="bf16", cpu_fp16=False) for p in precisions}
    packings = {
        " ".join(x for x in ("ours", resolved[p] if len(precisions) > 1 else "", k) if x): (p, v)
        for p in precisions
        for k, v in packing_variants.items()
    }
    ran_in = {name: resolved[p] for name, (p, _) in packings.items()}
    ran_in["reference"] = "bf16" if dtype is not None else "fp32"
    for name in tuple(packings) + (() if args.skip_reference else ("reference",)):
        model = copy.deepcopy(backbone).to(device).train()
        if name in packings:
            encoder = StarbucksEncoder(model, "cls", normalize=False).train()
            if device.type == "cpu":  # as the trainer does (train.dropout_masks: auto)
                use_fast_dropout(encoder)
            encoder.length_buckets = args.buckets
            encoder.packing = packings[name][1]
            ours_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[ran_in[name]]
            step_model = encoder.compile_layers(args.compile == "buckets") if args.compile else encoder
            loss_fn = StarbucksLoss(InfoNCE(1.0), sizes, kl_weight=1.0)
            optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=device.type in ("cuda", "cpu"))

            def step(
                i, encoder=encoder, step_model=step_model, loss_fn=loss_fn, optimizer=optimizer, ours_dtype=ours_dtype
            ):
                qb, pb = ours_batches[i % len(batches)]
                with torch.autocast(device.type, dtype=ours_dtype, enabled=ours_dtype is not None):
                    out = loss_fn(step_model(qb, list(sizes)), step_model(pb, list(sizes)), list(sizes))
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
            if args.reference_checkpointing:
                model.gradient_checkpointing_enable()

            def step(i, model=model, optimizer=optimizer):
                qb, pb = ref_batches[i % len(batches)]
                reference.train_step(model, optimizer, qb, pb, keys, args.group, device, dtype)

        try:
            for i in range(args.warmup):
                step(i)
            common.sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = [common.best_times(lambda i=i: step(i), device, repeats=1, warmup=0) for i in range(args.steps)]
        except torch.OutOfMemoryError:
            print(f"{name}: out of GPU memory", flush=True)
            times = None
            results[name] = None
        if times:
            seconds = sorted(t[0] for t in times)[len(times) // 2]  # median step
            cpu_seconds = sorted(t[1] for t in times)[len(times) // 2]
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            results[name] = (seconds, peak, cpu_seconds)
        model = optimizer = step = None  # freed before the next implementation loads its copy
        if cuda:
            torch.cuda.empty_cache()

    # model FLOPs of a step, the mean over the batches the steps cycle through (real tokens only)
    flops = sum(
        retrieval_step_flops(backbone.config, qb["attention_mask"], pb["attention_mask"], list(sizes))
        for qb, pb in ours_batches
    ) / len(ours_batches)
    mark = f"train_{args.model}_{device.type}{args.tag}"
    rows = []
    for name, result in results.items():
        label = name + (" (gradient checkpointing)" if name == "reference" and args.reference_checkpointing else "")
        if result is None:
            rows.append([label, ran_in[name], "out of memory", "-", "-", "-", "-"])
            common.emit(mark, impl=name, out_of_memory=True)
            continue
        seconds, mem, cpu_seconds = result
        mfu = common.mfu(flops, seconds, device, ran_in[name])
        qps = args.queries / seconds
        rows.append(
            [
                label,
                ran_in[name],
                f"{seconds * 1000:.0f}",
                f"{cpu_seconds * 1000:.0f}",
                f"{qps:.1f}",
                "-" if mem is None else f"{mem:.2f}",
                common.mfu_cell(mfu),
            ]
        )
        common.emit(
            mark,
            impl=name,
            step_s=round(seconds, 4),
            cpu_s=round(cpu_seconds, 4),
            queries_per_s=round(qps, 2),
            peak_gib=None if mem is None else round(mem, 3),
            precision=ran_in[name],
            mfu=None if mfu is None else round(mfu, 4),
        )
    ours = min((r for n, r in results.items() if n in packings and r is not None), key=lambda r: r[0], default=None)
    speedup = results["reference"][0] / ours[0] if ours and results.get("reference") else None
    common.emit(mark, ratio="ours/reference queries_per_s", value=speedup and round(speedup, 3))
    packed_gain = None
    if args.packing == "both" and len(precisions) == 1 and results["ours padded"] and results["ours packed"]:
        packed_gain = [results["ours padded"][j] / results["ours packed"][j] for j in (0, 2)]  # wall, CPU time
        common.emit(
            mark,
            ratio="packed/padded queries_per_s",
            value=round(packed_gain[0], 3),
            cpu_time_ratio=round(packed_gain[1], 3),
        )
    md = "\n".join(
        [
            f"## SRL training step: {args.model} on {device.type} ({mark})",
            "",
            f"- command: `python bench/train_step.py --model {args.model} --queries {args.queries} --group {args.group} "
            f"--steps {args.steps} --buckets {args.buckets}{' --compile ' + args.compile if args.compile else ''}"
            f"{' --packing ' + args.packing if args.packing != 'auto' else ''}"
            f"{' --precision ' + args.precision if args.precision != 'auto' else ''}"
            f"{' --skip-reference' if args.skip_reference else ''}"
            f"{' --reference-checkpointing' if args.reference_checkpointing else ''}{' --no-cudnn-sdp' if args.no_cudnn_sdp else ''}"
            f"{' --tag ' + args.tag if args.tag else ''}`",
            f"- machine: {common.machine(device)}",
            f"- date: {common.today()}",
            f"- {args.queries} queries x {args.group} passages per step, six sizes ({', '.join(s.key for s in sizes)}), "
            f"ours in {' and '.join(sorted(set(resolved.values())))} (precision {args.precision}), the reference in "
            f"{'bf16 autocast' if dtype else 'fp32'}, median of {args.steps} steps after {args.warmup} warm-up steps, "
            "wall and CPU time (the host's, all threads) "
            "(4 batches in turn, tokenised ahead); packed: model.packing (retrieval/packing.py), padded: one padded batch"
            f"{'' if cuda else ' (on the CPU the packed path pads only inside attention)'}; "
            f"{common.mfu_note(device, resolved[precisions[-1]], 'model FLOPs of a step (real tokens, train/flops.py)')} "
            "(wall time; each row against the peak of its own precision)",
            "",
            common.table(["implementation", "precision", "step ms", "CPU ms", "queries/s", "peak GiB", "MFU"], rows),
            "",
            f"Ours is {speedup:.2f}x the reference's queries/s." if speedup else "The reference did not run.",
            *(
                [
                    f"Packed is {packed_gain[0]:.2f}x padded's queries/s ({packed_gain[1]:.2f}x by CPU time, this process's "
                    "threads: what other load on a shared machine disturbs least)."
                ]
                if packed_gain
                else []
            ),
        ]
    )
    print(md)
    if not args.no_write:
        common.write_section(mark, md)


if __name__ == "__main__":
    main()
