#!/bin/bash
# Issue 9 H100 measurements in one device call (session 4): decode-attention block sweep with kernel-time
# timing (decode steps inside one jit, torch SDPA in a CUDA graph), and the int4 GEMV sweep at M = 1 with the
# 2-D accumulator option, plus the quant kernels' GPU parity check.
# Usage: bash experiments/gpu/h100_decode_int4.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=. PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 200 python3 experiments/bench_inference.py --only check,quant --sweep --quant-sweep-cases 4:1 \
  --quant-shapes 14336x4096,4096x14336 --reps 7 --out "$OUT/quant.json" > "$OUT/quant.log" 2>&1
echo "quant done $(( $(date +%s) - t0 )) s"
left=$(( 560 - ( $(date +%s) - t0 ) ))
timeout $left python3 experiments/bench_inference.py --only decode --sweep --decode-layouts paged --timer loop \
  --reps 7 --out "$OUT/decode_sweep.json" > "$OUT/decode_sweep.log" 2>&1
echo "all done $(( $(date +%s) - t0 )) s"
grep -i "fail\|kernel check" "$OUT/quant.log" | head; grep "speedup\|sweep best" "$OUT/quant.log" | grep -v "^quant sweep M\|sweep M" | tail -14
grep "paged\|copy\|sdpa\|torch" "$OUT/decode_sweep.log" | sort -t= -k4 -g | tail -12
