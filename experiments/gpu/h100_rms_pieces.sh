#!/bin/bash
# Session 6, H100 (issue 3): RMSNorm forward on equal power-of-2 column pieces (576 = 9 x 64, no masked lanes):
# GPU parity of the RMSNorm kernels, then the RMSNorm rows of profile_kernels (ours, XLA, torch F.rms_norm,
# torch.compile, copy ceiling, and the rows x warps sweep) in one run.  Usage: bash experiments/gpu/h100_rms_pieces.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=. PYTHONUNBUFFERED=1
t0=$(date +%s)
timeout 120 python3 experiments/check_kernels_gpu.py --only rms --out "$OUT/check_rms.json" > "$OUT/check_rms.log" 2>&1
grep -i "pass\|fail" "$OUT/check_rms.log" | tail -12
echo "check done $(( $(date +%s) - t0 )) s"
timeout 300 python3 experiments/profile_kernels.py --only rms --out "$OUT/profile_rms.json" > "$OUT/profile_rms.log" 2>&1
grep "^|" "$OUT/profile_rms.log" | grep -v "^| *-" | head -80
echo "profile done $(( $(date +%s) - t0 )) s"
