#!/bin/bash
# One prepared device run (H100/H200) for issues #3 and #5, about 8 minutes:
#  - two whole testbed builds on the GPU, one per zigler drawing of benchmarks/zigler_variants.py (chevron, lines),
#    each followed by the quality gates of `mima testbed check` (check.json) and the concept grid;
#  - beside them, benchmarks/personal_sweep.py: the personalization budget sweep on the shipped testbed.
# The device has PyTorch but not diffusers and the rest: carry them as wheels in .whl (benchmarks/README.md), e.g.
#   run(command="bash benchmarks/gpu_testbed.sh", carry=[".whl"], timeout_s=580)
# Results under $OUT: sweep.jsonl, logs.tar.gz, build_<variant>.tar (pipeline without its text encoder, judge,
# check.json, grid.png, timings.json) and text_<variant>.safetensors.
set -o pipefail
OUT=${OUT:-/tmp/mima-gpu}
mkdir -p "$OUT"
# DEVICE=cpu PY=.venv/bin/python SKIP_PIP=1 BUILD_ARGS="--tiny --check-n 2" SWEEP_ARGS=--smoke: a CPU smoke run
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}
[ -n "$SKIP_PIP" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
LOGS=/tmp/logs; mkdir -p $LOGS
for v in chevron lines; do
  (OMP_NUM_THREADS=${BUILD_THREADS:-2} timeout ${BUILD_S:-470} $PY benchmarks/zigler_variants.py build $v /tmp/b_$v --device $DEVICE $BUILD_ARGS > $LOGS/build_$v.log 2>&1;
   echo "build $v exit $?" >> $LOGS/build_$v.log) &
done
timeout ${SWEEP_S:-440} $PY benchmarks/personal_sweep.py --out "$OUT/sweep.jsonl" --device $DEVICE $SWEEP_ARGS --workers ${WORKERS:-12} \
  --concepts redstar,blueheart,purplehouse,orangemoon > $LOGS/sweep.log 2>&1
echo "sweep exit $?" >> $LOGS/sweep.log
wait
for v in chevron lines; do
  b=/tmp/b_$v
  [ -d $b/pipeline ] || continue
  tar -cf "$OUT/build_$v.tar" -C $b --exclude=pipeline/text_encoder --exclude=pipeline/tokenizer pipeline judge.safetensors check.json grid.png timings.json
  cp $b/pipeline/text_encoder/model.safetensors "$OUT/text_$v.safetensors"
done
grep -h '"variant"' $LOGS/build_*.log
tail -n 3 $LOGS/build_*.log
wc -l "$OUT/sweep.jsonl"
tar -czf "$OUT/logs.tar.gz" -C $LOGS .
