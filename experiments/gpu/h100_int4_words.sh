#!/bin/bash
# Session 5, H100: the int4 kernels on 32-bit words (issue 9): GPU parity of every quant kernel path, the
# decode-shape timing vs the bf16 matmul (loop timing as before, and per-kernel GPU time through CUPTI).
# Usage: bash experiments/gpu/h100_int4_words.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=. PYTHONUNBUFFERED=1 IVA_KERNELS_ALLOW_UNVALIDATED=1
t0=$(date +%s)
timeout 200 python3 experiments/bench_inference.py --only check --out "$OUT/check.json" > "$OUT/check.log" 2>&1
grep -i "quant" "$OUT/check.log" | grep -i "pass\|fail" | head -30
echo "check done $(( $(date +%s) - t0 )) s"
timeout 200 python3 experiments/bench_inference.py --only quant --quant-shapes 4096x14336,14336x4096 --reps 15 \
  --out "$OUT/quant.json" > "$OUT/quant.log" 2>&1
grep "speedup\|^|" "$OUT/quant.log" | head -40
echo "quant done $(( $(date +%s) - t0 )) s"
timeout 150 python3 experiments/kernel_times.py --out "$OUT/kernel_times.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
echo "all done $(( $(date +%s) - t0 )) s"
