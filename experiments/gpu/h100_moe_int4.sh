#!/bin/bash
# Session 4, H100: Mosaic grouped kernels (issue 4: GPU parity + the MoE layer vs dense / Triton / jax's
# ragged_dot_mgpu) and the int4 GEMV (issue 9: per-kernel times, M=1 sweep with unit codes).
# Usage: bash experiments/gpu/h100_moe_int4.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=. PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 300 python3 experiments/bench_moe.py --mode check,layer --impls dense,pallas,mosaic,ragged_mgpu --iters 10 \
  --out "$OUT/moe_mosaic.json" > "$OUT/moe_mosaic.log" 2>&1
echo "moe done $(( $(date +%s) - t0 )) s"
timeout 60 python3 experiments/kernel_times.py --out "$OUT/kernel_times.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
left=$(( 560 - ( $(date +%s) - t0 ) ))
timeout $left python3 experiments/bench_inference.py --only quant --sweep --quant-sweep-cases 4:1 \
  --quant-shapes 14336x4096,4096x14336 --reps 7 --out "$OUT/quant.json" > "$OUT/quant.log" 2>&1
echo "all done $(( $(date +%s) - t0 )) s"
grep -i "pass\|fail\|x dense\|ms" "$OUT/moe_mosaic.log" | tail -40
grep "speedup" "$OUT/quant.log" | grep "^|" | grep "M1" ; grep "sweep best" "$OUT/quant.log"
