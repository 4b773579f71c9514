#!/bin/bash
# The `mima bench` table at SD v1.4 shapes (random weights, bf16 autocast) and the fd (bf16) / exact (fp32)
# agreement at N = 2, on one NVIDIA H100/H200 (about 8 minutes); fd and first-order again with block-wise
# gradient checkpointing.
# Needs PyTorch with CUDA; diffusers is installed from the wheels in .whl/ (see benchmarks/README.md).
# Results: $OUT/bench.jsonl, $OUT/bench-checkpointing.jsonl and $OUT/agreement.jsonl (one JSON object per line).
set -o pipefail
OUT=${OUT:-/tmp/mima-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 330 python3 -m engine.bench --arch sd1 --device cuda --n 2 3 10 | tee "$OUT/bench.jsonl"
timeout 150 python3 -m engine.bench --arch sd1 --device cuda --n 3 10 --modes fd first-order --checkpointing \
  | tee "$OUT/bench-checkpointing.jsonl"
timeout 150 python3 -m engine.bench --arch sd1 --device cuda --agreement --n 2 --latent 32 | tee "$OUT/agreement.jsonl"
