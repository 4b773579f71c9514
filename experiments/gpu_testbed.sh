#!/bin/bash
# Two whole testbed builds on one GPU (H100/H200), one per zigler drawing of experiments/zigler_variants.py (chevron,
# lines), side by side, each with its judge trained by a second process (the judge stage depends on the world alone
# and renders its batches on the CPU). Then, for each VARIANT (the files of $OUT in F):
#   python experiments/zigler_variants.py unpack F/build_VARIANT.tar F/text_VARIANT.safetensors DIR
#   python experiments/zigler_variants.py check VARIANT DIR
# Needs PyTorch with CUDA; the other packages are installed from the wheels in .whl/ (see benchmarks/README.md).
# A build still training at DEADLINE_S (seconds after this script starts) is stopped and exported from its last
# checkpoint (written every minute); timings.json says how far it got.
# Results under $OUT: build_<variant>.tar (the pipeline without its text encoder's weights and tokenizer, the judge,
# config.json, timings.json, *.done markers) and text_<variant>.safetensors; logs.tar.gz.
# DEVICE=cpu PY=.venv/bin/python SKIP_PIP=1 BUILD_ARGS=--tiny: a CPU smoke run
set -o pipefail
START=$(date +%s)
OUT=${OUT:-/tmp/mima-gpu}
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
[ -n "$SKIP_PIP" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
LOGS=/tmp/logs; mkdir -p $LOGS
ZV="$PY experiments/zigler_variants.py"
left() { echo $(( ${DEADLINE_S:-540} - ($(date +%s) - START) )); }
for v in chevron lines; do
  (OMP_NUM_THREADS=4 timeout $(left) $ZV build $v /tmp/b_$v --device $DEVICE --set checkpoint_minutes=1.0 \
     --stages data,vae,latents,text,unet,export $BUILD_ARGS > $LOGS/build_$v.log 2>&1
   echo "build $v exit $?" >> $LOGS/build_$v.log
   if [ ! -d /tmp/b_$v/pipeline ] && [ -f /tmp/b_$v/unet.ckpt ]; then
     $ZV build $v /tmp/b_$v --device $DEVICE --set checkpoint_minutes=1.0 --stages export $BUILD_ARGS \
       >> $LOGS/build_$v.log 2>&1; echo "early export $v exit $?" >> $LOGS/build_$v.log
   fi) &
  (OMP_NUM_THREADS=4 timeout $(left) $ZV build $v /tmp/j_$v --device $DEVICE --stages judge $BUILD_ARGS \
     > $LOGS/judge_$v.log 2>&1; echo "judge $v exit $?" >> $LOGS/judge_$v.log) &
done
wait
for v in chevron lines; do
  b=/tmp/b_$v
  [ -d $b/pipeline ] || continue
  [ -f /tmp/j_$v/judge.safetensors ] && cp /tmp/j_$v/judge.safetensors $b/ && cp /tmp/j_$v/timings.json $b/judge_timings.json
  tar -cf "$OUT/build_$v.tar" -C $b --exclude=pipeline/text_encoder/model.safetensors --exclude=pipeline/tokenizer \
    pipeline config.json timings.json $(cd $b && ls *.done judge.safetensors judge_timings.json 2>/dev/null)
  cp $b/pipeline/text_encoder/model.safetensors "$OUT/text_$v.safetensors"
done
tail -n 3 $LOGS/*.log
tar -czf "$OUT/logs.tar.gz" -C $LOGS .
