#!/bin/bash
# One prepared run on a lent GPU machine (device tool): the JAX code runs there, and its speed.
#   wheels the GPU image lacks travel in .whl/ (diffusers, ml_collections and their missing deps);
#   results land in $OUT. Usage there: bash benchmarks/gpu_check.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())" | tee -a $OUT/gpu.txt
bench() { python3 -m benchmarks.duo_step --torch_device=cuda "$@" 2>&1 | grep -v Warn | tail -1 | tee -a $OUT/log.txt; }
bench --config=small --pairs=4 --repeats=20 --out=$OUT/duo_small.json
bench --config=sd15 --rank=32 --pairs=1 --repeats=10 --out=$OUT/duo_sd15.json
JAX_TRACEBACK_FILTERING=off timeout 120 python3 launch/train_duo.py \
  --config=configs/duo/digits.py:tiny --workdir=/tmp/duo_tiny > $OUT/train_duo_tiny.log 2>&1
echo "train_duo tiny rc=$?"; grep -v Warn $OUT/train_duo_tiny.log | tail -40
# The same launcher in bf16 (the `model` block: bf16 activations and frozen base).
JAX_TRACEBACK_FILTERING=off timeout 120 python3 launch/train_duo.py --config=configs/duo/digits.py:tiny \
  --config.model.dtype=bfloat16 --workdir=/tmp/duo_tiny_bf16 > $OUT/train_duo_tiny_bf16.log 2>&1
echo "train_duo tiny bf16 rc=$?"; grep -v Warn $OUT/train_duo_tiny_bf16.log | tail -20
bench --config=small --pairs=4 --repeats=20 --attention_impl=jax --out=$OUT/duo_small_jax.json
# GOAR: vmapped vs sequential retraining on the accelerator (CPU numbers in BENCHMARKS.md).
timeout 240 python3 benchmarks/retrain_vmap.py --task=digits --models=15,75 2>&1 | grep '^{' | tee -a $OUT/retrain_vmap.txt
timeout 180 python3 benchmarks/retrain_vmap.py --task=digits_cnn --models=15 2>&1 | grep '^{' | tee -a $OUT/retrain_vmap.txt
