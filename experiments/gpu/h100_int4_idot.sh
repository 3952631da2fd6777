#!/bin/bash
# Sessions 8-9, H100 (issue 9): the int4 GEMV on integer dot products (dp2a, 16-bit activations; `Int4Blocks.idot`):
# GPU parity (f32 out vs the f32 reference, NaN rows; and bench_inference's quant checks), then kernel time against
# the f32 GEMV (`idot: false`) and the bf16 GEMM at both decode shapes, with and without zero points.
# Usage: bash experiments/gpu/h100_int4_idot.sh $OUT ['[configs]'] [rows] ['[parity configs]']
# (configs: Int4Blocks overrides; the session's tuning runs passed their own lists, see BENCHMARKS.md)
set -u
OUT=${1:-.}
CFG=${2:-'[{"idot": false}, {"idot_groups": 1}, {}]'}
ROWS=${3:-1,2}
PCFG=${4:-'[{}, {"idot_groups": 1}, {"idot_groups": 2, "idot_unroll": 4, "idot_parts": 2}, {"warps": 2}]'}
export PYTHONPATH=. PYTHONUNBUFFERED=1 IVA_KERNELS_ALLOW_UNVALIDATED=1
t0=$(date +%s)
F='^USDT\|Warn\|warn'
timeout 240 python3 experiments/sweep_int4_gemv.py --parity --configs "$PCFG" 2>&1 | grep -v "$F" | tee "$OUT/parity.log" \
  | grep -v "^PASS"
timeout 200 python3 experiments/bench_inference.py --only check --out "$OUT/check.json" > "$OUT/check.log" 2>&1
grep -i "quant" "$OUT/check.log" | grep -ci "pass" | sed 's/^/bench_inference quant checks passed: /'
grep -i "quant" "$OUT/check.log" | grep -i "fail" | head
echo "parity done $(( $(date +%s) - t0 )) s"
timeout 200 python3 experiments/sweep_int4_gemv.py --configs "$CFG" --shapes 4096x14336,14336x4096 --rows "$ROWS" \
  --out "$OUT/idot_grid.json" 2>&1 | grep -v "$F"
echo "grid done $(( $(date +%s) - t0 )) s"
timeout 100 python3 experiments/sweep_int4_gemv.py --configs "$CFG" --shapes 4096x14336,14336x4096 --rows 1 --sym \
  --out "$OUT/idot_grid_sym.json" 2>&1 | grep -v "$F"
echo "all done $(( $(date +%s) - t0 )) s"
