#!/bin/bash
set -u
out=$OUT
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
cp benchmarks/results/nvidia-h200-small_init_vit_3e-3.jsonl $out/probe-3e-3.jsonl
cp benchmarks/results/nvidia-h200-small_init_vit_3e-2.jsonl $out/probe-3e-2.jsonl
common=(--tasks vit --inits 'std 0.01' --skip-ablations --workers 14
        --variants overshoot=2 overshoot=3 ramp_steps=0,lr_ramp=50)
timeout -k 10 ${1:-230} python benchmarks/probe_rule.py "${common[@]}" --lrs 0.003 --seeds $(seq 0 85) --out $out/probe-3e-3 > $out/probe-3e-3.log 2>&1
timeout -k 10 ${2:-110} python benchmarks/probe_rule.py "${common[@]}" --lrs 0.03 --seeds $(seq 0 31) --out $out/probe-3e-2 > $out/probe-3e-2.log 2>&1
wc -l $out/*.jsonl
tail -c 1500 $out/probe-3e-2.log | tr "\r" "\n" | grep -v "^train:" | tail -12
