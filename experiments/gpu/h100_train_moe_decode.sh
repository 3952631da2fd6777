#!/bin/bash
# Issue 4 / 7 / 9 H100 measurements in one device call: training-step breakdown and fused projections,
# grouped-matmul tile sweep + MoE layer with the best tiles, decode-attention block sweep.
# Usage: bash experiments/gpu/h100_train_moe_decode.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=.
t0=$(date +%s)
tr="--impls auto --remats none --param_dtypes bfloat16 --batches 8 --no_torch --budget_s 170"
timeout 180 python3 experiments/bench_train.py $tr --breakdown --out "$OUT/train_breakdown.json" > "$OUT/train_breakdown.log" 2>&1
timeout 120 python3 experiments/bench_train.py $tr --fused --out "$OUT/train_fused.json" > "$OUT/train_fused.log" 2>&1
echo "train done $(( $(date +%s) - t0 )) s"
timeout 80 python3 experiments/bench_moe.py --mode sweep --iters 10 --out "$OUT/moe_sweep.json" > "$OUT/moe_sweep.log" 2>&1
best=$(python3 - "$OUT/moe_sweep.json" <<'PY'
import json, re, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["sweep"]["rows"] if "ms" in r and r["cfg"].startswith("bm")]
    bm, bn, bk, nw, ns = map(int, re.findall(r"\d+", min(rows, key=lambda r: r["ms"])["cfg"]))
    print(f"--block-m {bm} --block-n {bn} --block-k {bk} --num-warps {nw} --num-stages {ns}")
except Exception as ex:
    print("")
PY
)
echo "best gmm tiles: $best"
timeout 100 python3 experiments/bench_moe.py --mode layer --impls dense,pallas,capacity --iters 10 $best --out "$OUT/moe_layer_best.json" > "$OUT/moe_layer_best.log" 2>&1
echo "moe done $(( $(date +%s) - t0 )) s"
left=$(( 570 - ( $(date +%s) - t0 ) ))
timeout $left python3 experiments/bench_inference.py --only decode --sweep --reps 7 --out "$OUT/decode_sweep.json" > "$OUT/decode_sweep.log" 2>&1
echo "all done $(( $(date +%s) - t0 )) s"
grep -A12 "breakdown of" "$OUT/train_breakdown.log"; grep "| auto" "$OUT"/train_*.log
tail -12 "$OUT/moe_sweep.log"; tail -8 "$OUT/moe_layer_best.log"
