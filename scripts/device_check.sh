#!/usr/bin/env bash
# One short GPU session (H100/H200): environment, GPU tests, fp16/bf16 training check, the GPU works-with matrix,
# throughput presets.
# Usage on the device machine, from the repo root: OUT=/some/dir bash scripts/device_check.sh
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT="${OUT:-benchmarks}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
status=0
for preset in gpt2-350m gpt2-124m; do
  timeout 170 python3 scripts/benchmark_throughput.py --device cuda --bf16 --preset "$preset" --rounds 3 --steps 6 \
    --json "$OUT/throughput_${preset}.json" 2>&1 | tee "$OUT/throughput_${preset}.log" || status=1
done
if [ -f scripts/gpu_check.py ]; then
  timeout 150 python3 scripts/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log" || status=1
fi
if [ -f scripts/gpu_check_works_with.py ]; then
  timeout 170 python3 scripts/gpu_check_works_with.py 2>&1 | tee "$OUT/gpu_check_works_with.log" || status=1
fi
if python3 -c "import datasets" 2>/dev/null && [ -f tests/test_gpu.py ]; then
  timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1
else
  echo "datasets not importable here: GPU pytest skipped"
fi
exit $status
