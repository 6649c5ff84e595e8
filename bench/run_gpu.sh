#!/usr/bin/env bash
# Every GPU benchmark in one command, on the device machine (one H100/H200), from the repo root:
#   bash bench/pack_gpu.sh                      # here, once: wheels + MiniLM's config/tokenizer into bench/carry
#   run(command="bash bench/run_gpu.sh", carry=["bench/carry"])   # device tool: issue 7's set
#   run(command="bash bench/run_gpu.sh packing", carry=["bench/carry"])   # issue 19: packed, fp32 search
#   run(command="bash bench/run_gpu.sh compile", carry=["bench/carry"])   # issue 19: compile, MiniLM
#   run(command="bash bench/run_gpu.sh gradcache", carry=["bench/carry"])   # issue 17: BERT-base 128 x 8 cached
#   run(command="bash bench/run_gpu.sh hybrid", carry=["bench/carry"])   # issue 28: a two-model hybrid vs its parts
# Each set fits one device command (10 minutes).
# Installs the carried wheels, then times the SRL training step, encoding and exact search against
# the plain-transformers reference (issue 7's workloads), plus the variants tried (--no-write:
# JSON lines only). The markdown sections land in docs/benchmarks.md of the device's copy; that
# file and the whole log are copied to $OUT. Each step has its own time limit so that one slow
# step cannot take the others with it (the device runs one command for at most 10 minutes).
# bench/profile_gpu.py (not run here) says where the time goes.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d bench/carry/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/carry/wheels/*.whl && export PYTHONPATH=/tmp/site
fi
export BENCH_MINILM_DIR=${BENCH_MINILM_DIR:-$PWD/bench/carry/minilm}  # config + tokenizer: random weights
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/bench_gpu.log
step() { local limit=$1; shift; echo "### $*" | tee -a "$LOG"; timeout "$limit" python3 "$@" 2>&1 | grep -v "^Loading weights" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$LOG"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"
SET=${1:-issue7}
T="--model bert-base --group 8 --steps 5 --no-cudnn-sdp"
if [ "$SET" = packing ]; then
  # the CUDA-only tests first (varlen / flash-attn kernels against the padded reference, fused fp32 re-scoring)
  echo "### CUDA tests" | tee -a "$LOG"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_packing.py tests/test_exact_search.py -k cuda 2>&1 | tail -n 15 | tee -a "$LOG"
  python3 -c "import torch.nn.attention.varlen" 2>&1 | tail -n 1 | sed 's/^/torch varlen: /' | tee -a "$LOG"
  step 120 bench/train_step.py $T --queries 128 --packing both --skip-reference --tag _packing
  step 100 bench/encode_speed.py --model bert-base --passages 10000 --batch-size 512 --repeats 1 --only trenta,all \
    --packing both --skip-reference --tag _packing
  step 150 bench/search_speed.py --vectors 1000000 --queries 6980 --dims 32,128,768 --depth 1000 --batch-size 1024 \
    --topk block:16,block:32 --faiss-vectors 0 --skip-hnsw
elif [ "$SET" = compile ]; then
  # compiled layers on packed batches: dynamic shapes, then static shapes over token-count buckets
  step 200 bench/train_step.py $T --queries 128 --packing true --compile --skip-reference --tag _packing_compile
  step 200 bench/train_step.py $T --queries 128 --packing true --compile buckets --skip-reference --tag _packing_buckets
  step 80 bench/train_step.py --model minilm --group 8 --steps 5 --no-cudnn-sdp --queries 128 --packing both --skip-reference --tag _packing
  step 80 bench/encode_speed.py --model minilm --passages 5000 --batch-size 512 --repeats 1 --only trenta,all \
    --packing both --skip-reference --tag _packing
elif [ "$SET" = hybrid ]; then
  # a two-model hybrid (MiniLM-shaped, fp16) against its slowest part: parts one after the other vs in parallel
  step 300 bench/hybrid_latency.py --device cuda --queries 200 --passages 8192 --batch-size 512 --repeats 3
elif [ "$SET" = gradcache ]; then
  # gradient caching: peak memory and step time of BERT-base 128 x 8 per chunk size next to the uncached step
  # (issue 17's goal: under 16 GiB at no more than 1.4x the time); each configuration in its own process
  step 540 bench/grad_cache.py --model bert-base --batches 128x8 --chunks 0,32,64,128,256 --steps 3
else
# Training: ours with train.length_buckets=auto (0) against the reference, which runs out of memory at
# 128 x 8 without gradient checkpointing; then at 64 x 8, where both fit; then fixed bucket counts.
step 90 bench/train_step.py $T --queries 128 --buckets 0 --reference-checkpointing
step 80 bench/train_step.py $T --queries 64 --buckets 0 --tag _64x8
for b in 2 4 8; do step 60 bench/train_step.py $T --queries 128 --buckets $b --skip-reference --no-write; done
step 150 bench/encode_speed.py --model bert-base --passages 10000 --batch-size 512 --repeats 1
step 40 bench/encode_speed.py --model bert-base --passages 10000 --batch-size 512 --repeats 1 --only trenta,all --half --skip-reference --no-write
step 90 bench/encode_speed.py --model minilm --passages 5000 --batch-size 512 --repeats 1 --only demi,trenta,all
step 100 bench/search_speed.py --vectors 1000000 --queries 6980 --dims 32,128,768 --depth 1000 --batch-size 1024 \
  --topk topk,block:16,block:32,block:64 --faiss-vectors 100000 --skip-hnsw
fi
if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
grep -h '^{' "$LOG" | tail -n 60
