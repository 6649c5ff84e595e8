#!/usr/bin/env bash
# Prepare what bench/run_gpu.sh needs on the device machine (which has torch, transformers and
# accelerate but no faiss, omegaconf, ... and no network): wheels and an fp16 copy of MiniLM under
# bench/carry/ (git-ignored, ~40 MB). Then, with the device tool:
#   run(command="bash bench/run_gpu.sh", carry=["bench/carry"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p bench/carry/wheels
$PY -m pip download -q --only-binary=:all: --no-deps -d bench/carry/wheels \
  faiss-cpu omegaconf antlr4-python3-runtime ir-measures pytrec-eval-terrier cwl-eval
$PY - <<'PY'
import torch
from transformers import AutoModel, AutoTokenizer
from retrieval.modeling import resolve_model_path
src = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
AutoModel.from_pretrained(src, torch_dtype=torch.float16).save_pretrained("bench/carry/minilm")
AutoTokenizer.from_pretrained(src).save_pretrained("bench/carry/minilm")
PY
du -sh bench/carry
