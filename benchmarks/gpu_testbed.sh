#!/bin/bash
# One prepared device run (H100/H200) for issue #3: two testbed builds on the GPU, one per zigler drawing of
# benchmarks/zigler_variants.py (chevron, lines), side by side, every stage but the judge's (the judge stage renders
# its batches on the CPU and takes as long there as here; run it here, then check here):
#   run(command="bash benchmarks/gpu_testbed.sh", carry=[".whl"], timeout_s=590)
#   then here, for each VARIANT (files from the device in F):
#   python benchmarks/zigler_variants.py unpack F/build_VARIANT.tar F/text_VARIANT.safetensors DIR
#   python benchmarks/zigler_variants.py build VARIANT DIR --stages judge --check
# The device has PyTorch but not diffusers and the rest: carry them as wheels in .whl (benchmarks/README.md).
# 2026-12-04, beside a 12-process personalization sweep on the same GPU, the builds reached UNet step 1000 of 8000
# in 470 s (data 60 s, VAE 100 s, judge 200 s, then about 17 UNet steps a second): run them alone.
# Results under $OUT: build_<variant>.tar (the pipeline without its text encoder's weights and tokenizer, config.json,
# timings.json, *.done markers) and text_<variant>.safetensors; logs.tar.gz.
# DEVICE=cpu PY=.venv/bin/python SKIP_PIP=1 BUILD_ARGS=--tiny: a CPU smoke run
set -o pipefail
OUT=${OUT:-/tmp/mima-gpu}
PY=${PY:-python3}; DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
[ -n "$SKIP_PIP" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
LOGS=/tmp/logs; mkdir -p $LOGS
for v in chevron lines; do
  (OMP_NUM_THREADS=${BUILD_THREADS:-4} timeout ${BUILD_S:-540} $PY benchmarks/zigler_variants.py build $v /tmp/b_$v \
     --device $DEVICE --stages data,vae,latents,text,unet,export $BUILD_ARGS > $LOGS/build_$v.log 2>&1;
   echo "build $v exit $?" >> $LOGS/build_$v.log) &
done
wait
for v in chevron lines; do
  b=/tmp/b_$v
  [ -d $b/pipeline ] || continue
  tar -cf "$OUT/build_$v.tar" -C $b --exclude=pipeline/text_encoder/model.safetensors --exclude=pipeline/tokenizer pipeline config.json \
    timings.json $(cd $b && ls *.done)
  cp $b/pipeline/text_encoder/model.safetensors "$OUT/text_$v.safetensors"
done
tail -n 3 $LOGS/build_*.log
tar -czf "$OUT/logs.tar.gz" -C $LOGS .
