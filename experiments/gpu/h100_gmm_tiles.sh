#!/bin/bash
# Issue 4: grouped-matmul tiles around the first sweep's best, then the MoE layer (fwd, fwd+bwd) with the
# new best.  Usage: bash experiments/gpu/h100_gmm_tiles.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=.
T="128,256,64,8,3;128,256,64,8,4;128,256,32,8,4;128,256,64,4,3;256,256,64,8,3;128,256,128,8,2;64,256,64,4,3;256,128,64,8,4;128,128,128,8,3"
timeout 150 python3 experiments/bench_moe.py --mode sweep --iters 20 --tiles "$T" --out "$OUT/moe_sweep2.json" > "$OUT/moe_sweep2.log" 2>&1
best=$(python3 - "$OUT/moe_sweep2.json" <<'PY'
import json, re, sys
try:
    rows = [r for r in json.load(open(sys.argv[1]))["sweep"]["rows"] if "ms" in r and r["cfg"].startswith("bm")]
    bm, bn, bk, nw, ns = map(int, re.findall(r"\d+", min(rows, key=lambda r: r["ms"])["cfg"]))
    print(f"--block-m {bm} --block-n {bn} --block-k {bk} --num-warps {nw} --num-stages {ns}")
except Exception:
    print("")
PY
)
echo "best: $best"
timeout 120 python3 experiments/bench_moe.py --mode layer --impls dense,pallas --iters 20 --out "$OUT/moe_layer_default.json" > "$OUT/moe_layer_default.log" 2>&1
timeout 120 python3 experiments/bench_moe.py --mode layer --impls pallas --iters 20 $best --out "$OUT/moe_layer_best2.json" > "$OUT/moe_layer_best2.log" 2>&1
tail -12 "$OUT/moe_sweep2.log"; tail -4 "$OUT/moe_layer_default.log"; tail -3 "$OUT/moe_layer_best2.log"
