#!/bin/bash
# Many seeds of the small-init ViT cells on one GPU, several runs at once
# (each run is small: one alone leaves the GPU mostly idle).
#
#   OUT=benchmarks/results bash benchmarks/small_init_gpu.sh [SECONDS]
#
# Each part stops after its share of SECONDS (default 480); finished runs are
# in the .jsonl files, and `python benchmarks/small_init.py <same args>
# --report-only` tabulates them if a part was cut short.
set -u
budget=${1:-480}
out=${OUT:?set OUT to the results folder}
name=$(python -c "import jax; print(jax.devices()[0].device_kind.lower().replace(' ', '-'))")
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Runs of one setting differ only in their seed: compile each program once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax-cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
workers=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
common=(--tasks vit --inits 'std 0.01' --skip-ablations --workers "$workers"
        --variants weight_floor=2 ramp_steps=25)
# The unmet cell (AdamW + warmup's best rate), then the high rate.
timeout -k 10 $(( budget * 2 / 3 )) python benchmarks/small_init.py \
  "${common[@]}" --lrs 0.003 --seeds $(seq 0 95) \
  --out "$out/$name-small_init_vit_3e-3" > "$out/$name-3e-3.log" 2>&1
timeout -k 10 $(( budget / 3 )) python benchmarks/small_init.py \
  "${common[@]}" --lrs 0.03 --seeds $(seq 0 31) \
  --out "$out/$name-small_init_vit_3e-2" > "$out/$name-3e-2.log" 2>&1
wc -l "$out"/*.jsonl
tail -c 1200 "$out"/*.log | tr "\r" "\n" | grep -v "^train:" | tail -20
