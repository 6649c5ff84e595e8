#!/usr/bin/env bash
# Every GPU benchmark in one command, on the device machine (one H100/H200), from the repo root:
#   bash bench/pack_gpu.sh                      # here, once: wheels + fp16 MiniLM into bench/carry
#   run(command="bash bench/run_gpu.sh", carry=["bench/carry"])   # device tool
# Installs the carried wheels, then times the SRL training step, encoding and exact search
# against the plain-transformers reference (issue 7's workloads) and prints the tables; the
# markdown sections land in docs/benchmarks.md of the device's copy and in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d bench/carry/wheels ]; then
  python -m pip install -q --no-index --find-links bench/carry/wheels faiss-cpu omegaconf || true
fi
export BENCH_MINILM_DIR=${BENCH_MINILM_DIR:-$PWD/bench/carry/minilm}  # config + tokenizer: random weights
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
python bench/train_step.py --model bert-base --queries 128 --group 8 --steps 10
python bench/train_step.py --model bert-base --queries 128 --group 8 --steps 10 --compile --no-write || true
python bench/encode_speed.py --model bert-base --passages 20000 --batch-size 512 --repeats 2
python bench/encode_speed.py --model minilm --passages 20000 --batch-size 512 --repeats 2
python bench/search_speed.py --vectors 1000000 --queries 6980 --dims 32,128,768 --depth 1000 \
  --batch-size 1024 --chunks 0,4096,16384,65536 --faiss-vectors 100000 --skip-hnsw
if [ -n "${OUT:-}" ]; then cp docs/benchmarks.md "$OUT/"; fi
