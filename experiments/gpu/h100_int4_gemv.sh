#!/bin/bash
# Session 6, H100 (issue 9): how fast can the int4 weights be *read* (experiments/int4_stream_probe.py), and the
# GEMV tiling grid at M=1 4096->14336 (zero-point codes, the library default), then the 4 best configs at both
# decode shapes and M=1/2, and with symmetric codes.  Usage: bash experiments/gpu/h100_int4_gemv.sh $OUT
# (The session's multi-warp GEMV variant, measured with this script and not kept, is
# experiments/results/int4_gemv_multiwarp_h100_2026-11-23.patch; its grid was words x warps x unroll x
# gemv_warps_per_sm.)
set -u
OUT=${1:-.}
export PYTHONPATH=. PYTHONUNBUFFERED=1 IVA_KERNELS_ALLOW_UNVALIDATED=1
t0=$(date +%s)
timeout 120 python3 experiments/int4_stream_probe.py --out "$OUT/probe.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
timeout 200 python3 experiments/bench_inference.py --only check --out "$OUT/check.json" > "$OUT/check.log" 2>&1
grep -i "quant" "$OUT/check.log" | grep -i "pass\|fail" | head -40
echo "check done $(( $(date +%s) - t0 )) s"
timeout 240 python3 experiments/sweep_int4_gemv.py --out "$OUT/grid.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
echo "grid done $(( $(date +%s) - t0 )) s"
TOP=$(python3 -c "
import json; r=[x for x in json.load(open('$OUT/grid.json'))['results'] if 'us' in x]
print(json.dumps([x['cfg'] for x in sorted(r, key=lambda x: x['us'])[:4]]))")
timeout 150 python3 experiments/sweep_int4_gemv.py --configs "$TOP" --shapes 4096x14336,14336x4096 --rows 1,2 \
  --out "$OUT/top.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
timeout 80 python3 experiments/sweep_int4_gemv.py --configs "$TOP" --shapes 4096x14336,14336x4096 --rows 1 --sym \
  --out "$OUT/top_sym.json" 2>&1 | grep -v "^USDT\|Warn\|warn"
echo "all done $(( $(date +%s) - t0 )) s"
