#!/usr/bin/env bash
# The CPU benchmarks on 2 cores with the MiniLM backbone (make setup first), from the repo root:
#   bash bench/run_cpu.sh
# First this CPU's peak matmul rates (bench/roofline.py, on 2 threads and on 1: the denominators of
# every row's MFU, kept in bench/results/roofline-cpu.json); then
# per-size encoding (early exit) and all six in one pass vs the reference, one SRL training step
# vs the reference (ours in fp32 and in bf16, each with the default packing: packed on the CPU), exact search (torch, FAISS) vs the reference, FAISS flat vs HNSW on the
# embedded collection (embeddings of the CPU experiment, runs/experiment-debian-cpu), packed vs
# padded training and encoding (issue 19), and each size of MiniLM encoded by ours, sentence-transformers
# and ONNX Runtime (bench/peers_cpu.py; needs the onnx extra: pip install -e '.[onnx]'), and a
# two-model hybrid against its slowest part (bench/hybrid_latency.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY bench/roofline.py
OMP_NUM_THREADS=1 $PY bench/roofline.py
$PY bench/encode_speed.py --model minilm --passages 512 --batch-size 64 --repeats 2 --precision both
# glibc's default allocator instead of the stages' setting (retrieval/malloc.py), beside the rows above
STARBUCKS_MALLOC_TUNE=0 $PY bench/encode_speed.py --model minilm --passages 512 --batch-size 64 --repeats 2 \
  --only trenta,all --skip-reference --tag _malloc_default
$PY bench/train_step.py --model minilm --queries 8 --group 4 --steps 3 --warmup 2 --precision both
$PY bench/search_speed.py --vectors 200000 --queries 1024 --dims 32,128,384 --depth 1000 --topk topk,block:32 \
  --faiss-vectors 200000 --repeats 2
# Packed vs padded batches (model.packing), on one thread: with other load on the machine, this
# process's CPU time then measures its own work (two threads also count the threads' spin-waits)
OMP_NUM_THREADS=1 $PY bench/train_step.py --model minilm --queries 8 --group 4 --steps 3 --warmup 1 --packing both \
  --skip-reference --tag _packing
OMP_NUM_THREADS=1 $PY bench/encode_speed.py --model minilm --passages 256 --batch-size 64 --repeats 1 --only trenta,all \
  --packing both --skip-reference --workers 0 --tag _packing
$PY bench/hybrid_latency.py --queries 50 --passages 128 --repeats 3
$PY bench/peers_cpu.py
