#!/usr/bin/env bash
# Prepare what bench/run_gpu.sh needs on the device machine (which has torch, transformers and
# accelerate but no faiss, omegaconf or pytest, and no network): their wheels and MiniLM's config and
# tokenizer under bench/carry/ (git-ignored, ~19 MB; with the repo it fits one 64 MiB call).
# Speed does not depend on the weights, so MiniLM runs there with random weights, as BERT-base
# does. Then, with the device tool:
#   run(command="bash bench/run_gpu.sh", carry=["bench/carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf bench/carry && mkdir -p bench/carry/wheels
# the device's python is 3.12 (KINDS.md): fetch wheels for it, whatever python runs here
$PY -m pip download -q --only-binary=:all: --no-deps -d bench/carry/wheels --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 faiss-cpu omegaconf antlr4-python3-runtime ir_measures pytest pluggy iniconfig
$PY - <<'PY'
from transformers import AutoConfig, AutoTokenizer
from retrieval.modeling import resolve_model_path
src = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
AutoConfig.from_pretrained(src).save_pretrained("bench/carry/minilm")  # no weights: random init there
AutoTokenizer.from_pretrained(src).save_pretrained("bench/carry/minilm")
PY
du -sh bench/carry
