#!/usr/bin/env bash
# One short GPU session (H100/H200) in at most TOTAL seconds (default 530): environment; the FSDP2 Trainer check on one
# GPU (world size 1: the sharded code path, DTensor parameters, its update against the formula); the GPU works-with
# matrix; the fp16/bf16 training check; the GPU tests; the throughput and peak memory of the headline methods (the
# free preset among them) on the GPT-2 350M shape.
# Each step has its own time limit and none runs past TOTAL: a step the budget no longer covers is skipped and counted
# as a failure. Logs (and the throughput JSON) go to $OUT, one file per step.
# Usage on the device machine, from the repo root: OUT=/some/dir bash scripts/device_check.sh
#   bash scripts/device_check.sh --plan     # print the steps and their limits, run nothing
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-benchmarks}"
TOTAL="${TOTAL:-530}"
PLAN=0
[ "${1:-}" = "--plan" ] && PLAN=1
status=0

# step NAME LIMIT CMD...: run CMD for at most LIMIT seconds, and never past TOTAL; its output in $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [ "$PLAN" = 1 ]; then
    echo "$name: at most ${limit}s: $*"
    planned=$((planned + limit))
    return
  fi
  local left=$((TOTAL - SECONDS - 5))
  if [ "$left" -lt 30 ]; then
    echo "SKIP $name: ${left}s left of TOTAL=${TOTAL}s"
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most ${limit}s, ${SECONDS}s elapsed)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "FAIL $name (exit $rc$([ "$rc" -eq 124 ] && echo ': time limit'))"
    status=1
  fi
}

planned=30  # the environment lines below
if [ "$PLAN" = 0 ]; then
  mkdir -p "$OUT"
  timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 25 python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
fi
step fsdp2_check 140 accelerate launch --config_file scripts/accelerate_configs/fsdp2.yaml --num_processes 1 \
  scripts/gpu_check_fsdp2.py
step gpu_check_works_with 90 python3 scripts/gpu_check_works_with.py
step gpu_check 60 python3 scripts/gpu_check.py
if [ "$PLAN" = 1 ] || python3 -c "import datasets" 2>/dev/null; then
  step gpu_tests 90 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
else
  echo "datasets not importable here: GPU pytest skipped"
fi
# The headline methods only (all of them take about 150 s a preset): AdamW, full SAM, the layer-wise default (k=1
# with reuse), its stale ascent, full SAM over the last 20% of the run (sam_preset="fast") and the recommended
# sam_preset="free" (Momentum-SAM on every parameter, one pass); peak memory (max_memory_allocated) beside each.
step throughput_gpt2-350m 120 python3 scripts/benchmark_throughput.py --device cuda --bf16 --preset gpt2-350m \
  --rounds 3 --steps 10 --k 1 --methods '^adamw$' '^full SAM$' '^LW-SAM k=1 reuse$' '^LW-SAM k=1 stale$' \
  '^full SAM late from 80%$' '^free preset$' --json "$OUT/throughput_gpt2-350m.json"
if [ "$PLAN" = 1 ]; then
  echo "total: at most ${planned}s of TOTAL=${TOTAL}s"
  [ "$planned" -le "$TOTAL" ] || exit 1
  exit 0
fi
echo "device_check: ${SECONDS}s, exit $status"
exit $status
