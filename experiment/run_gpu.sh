#!/usr/bin/env bash
# The paper's comparison on one H100/H200 in one command, from the repo root:
#   bash experiment/pack_gpu.sh                     # here, once (experiment/carry, git-ignored)
#   run(command="bash experiment/run_gpu.sh", carry=["experiment/carry"], timeout_s=600)   # device tool
# Installs the carried wheels, runs `make experiment`'s GPU config (configs/experiment-debian.yaml) for at
# most $BUDGET seconds (default 540), then writes docs/results-gpu.md and docs/results-gpu/ from whatever
# report exists and puts them, the log and the runs' cost records into $OUT (tar parts < 16 MiB; here:
#   cat <files_at>/results-gpu.tgz.part-* | tar xz). A second invocation on the same (still warm) machine
# resumes: every stage keeps what it finished (checkpoints, shards, run files), so it does only the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/experiment-gpu-out}
mkdir -p "$OUT"
LOG=$OUT/experiment_gpu.log
python3 -m pip install -q --no-index --no-deps --target /tmp/site experiment/carry/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/experiment/carry/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$LOG"
started=$(date +%s)
timeout "${BUDGET:-540}" python3 -m experiment --config configs/experiment-debian.yaml "$@" 2>&1 \
  | grep --line-buffered -v "^Loading weights\|it/s]$" | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "experiment: exit $status after $(( $(date +%s) - started )) s" | tee -a "$LOG"
REPORT=runs/experiment-debian/report
if [ -f $REPORT/results.md ]; then
  rm -rf docs/results-gpu docs/results-gpu.md
  cp -r $REPORT/results docs/results-gpu
  sed 's#(results/#(results-gpu/#g; s#`results/#`results-gpu/#g' $REPORT/results.md > docs/results-gpu.md
fi
tar czf - docs/results-gpu.md docs/results-gpu $(ls runs/experiment-debian/*/train_summary.json 2>/dev/null) 2>/dev/null \
  | split -b 15m - "$OUT/results-gpu.tgz.part-"
ls -la "$OUT"
exit "$status"
