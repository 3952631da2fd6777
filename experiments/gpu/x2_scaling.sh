#!/bin/bash
# Issue 4 + 7 two-GPU measurements (nvidia-h200-x2): data / FSDP scaling of the ~1B training step and
# expert parallelism EP=2 vs EP=1 of the MoE layer.  Usage: bash experiments/gpu/x2_scaling.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/x2_gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/x2_gpus.txt" 2>&1
common="--impls auto --remats none --param_dtypes bfloat16 --batches 8 --no_torch"
timeout 230 python3 experiments/bench_train.py $common --mesh data=2 --budget_s 200 --out "$OUT/train_data2.json" > "$OUT/train_data2.log" 2>&1
timeout 170 python3 experiments/bench_train.py $common --mesh fsdp=2 --budget_s 150 --out "$OUT/train_fsdp2.json" > "$OUT/train_fsdp2.log" 2>&1
timeout 150 python3 experiments/bench_moe.py --mode ep --iters 10 --out "$OUT/moe_ep.json" > "$OUT/moe_ep.log" 2>&1
tail -n 12 "$OUT"/*.log
