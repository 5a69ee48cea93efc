#!/usr/bin/env bash
# The GPU check of docs/performance.md and docs/scaling.md, in at most about 8 minutes on one
# GPU, everything under $OUT:
#   agreement   stacked against one-at-a-time training on the device (benchmarks/device_agreement.py)
#   throughput  models per minute, one at a time and in stacks of K = 1, 16, 64, 256, for the
#               paper's GPT-2 at depths 2 and 12 (benchmarks/batched.py)
#   slice       the paper preset at depth 2, one pipeline, the full 17-point grid, stacks of a
#               grid point's 9 conditions (stopped at its time limit; finished stacks count)
#   projection  the whole paper preset's wall time on this device (benchmarks/project_paper.py)
# It runs the project from source with the machine's own python3 (a CUDA build of torch), so
# nothing needs installing. A step whose output is done is skipped: rerun the same command to
# redo only what failed. SMOKE=1 DEVICE=cpu runs every step on tiny settings to check the
# script itself on a CPU (its figures mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the directory for the results}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
SLICE_S=${SLICE_S:-210}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
AGREE=() THROUGH=(--k 1 16 64 256 --baseline 4 --epochs 2) SLICE=()
if [ "${SMOKE:-0}" = 1 ]; then
  AGREE=(--smoke) THROUGH=(--k 1 2 --baseline 1 --epochs 1)
  SLICE=(--set numbers=40 --set base_samples=400 --set base_val=50 --set subtask_samples=300
         --set base_fit.epochs=2 --set discovery.epochs=2 --set induction_fit.epochs=2
         --set 'grid=[0, 10, 40]' --set n_val=50 --set n_test=50 --set gates.enforce=false)
fi

step() {  # step NAME SECONDS COMMAND...: run unless done, time it, keep its log
  local name=$1 limit=$2 start rc
  shift 2
  if [ -e "$OUT/$name.done" ]; then echo "== $name: done before, skipped"; return 0; fi
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)"
  grep -v -i warning "$OUT/$name.log" | tail -n 12
  if [ $rc -eq 0 ]; then touch "$OUT/$name.done"; fi
  return 0
}

{ nvidia-smi || true
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} > "$OUT/machine.txt" 2>&1
step agreement 120 $PY benchmarks/device_agreement.py --device "$DEVICE" \
  --out "$OUT/agreement" "${AGREE[@]}"
step throughput 120 $PY benchmarks/batched.py --archs paper-L2 paper-L12 "${THROUGH[@]}" \
  --rounds 1 --device "$DEVICE" --json "$OUT/throughput.json"
# The slice is stopped by its limit on purpose when the device is slow: the projection uses
# the stacks that finished (each grid point's 9 models train a fixed 100 epochs).
step slice "$SLICE_S" $PY -m instill arithmetic --preset paper --layers 2 --replicates 1 \
  --device "$DEVICE" --workers 1 --set induction_batch=64 --set pipeline_batch=3 \
  --set activation=gelu_pytorch_tanh --set base_fit.fused=true --set discovery.fused=true \
  --set induction_fit.fused=true --set base_fit.dropout_rng=counter \
  --set induction_fit.dropout_rng=counter "${SLICE[@]}" --out "$OUT/slice"
step projection 30 $PY benchmarks/project_paper.py "$OUT/slice" "$OUT/throughput.json" \
  --json "$OUT/projection.json"
