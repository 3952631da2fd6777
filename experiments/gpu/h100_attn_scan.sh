#!/bin/bash
# Session 10 (issues 3 and 6), one mode per device call:
#   attn | scan | both: GPU parity of the Mosaic attention and its B4 S4096 H16 D128 profile with the launch-order
#     sweep; selective-scan parity and kernel times
#   attn_kt: attention at kernel time (CUPTI, interleaved rounds), all shapes
#   scan_kt [json]: scan kernel times with extra ScanBlockConfig overrides; scan_unroll: unroll 1 and 2, with parity
#   scan_probe: the scan forward's access pattern without the scan (variants: chunks ahead, chunk, block_d)
#   scan_ncu [json]: Nsight Compute (full set) of the scan forward f32 / bf16 and its probe
#   scan_cfg CHECK_JSON KT_JSON: parity of a list of ScanBlockConfig overrides, then kernel times of named ones
# Two options the session measured and removed ran from their own commits' copies of this script:
# fma_exp2_steps (4317a34) and Tiles.fold_scale (ef975e4).
# Usage: bash experiments/gpu/h100_attn_scan.sh $OUT [mode] [json [json]]
set -u
OUT=${1:-.}
WHAT=${2:-both}
case "$WHAT" in
  attn|scan|both|attn_kt|scan_kt|scan_probe|scan_unroll|scan_ncu|scan_cfg) ;;
  *) echo "h100_attn_scan.sh: unknown mode '$WHAT' (attn, scan, both, attn_kt, scan_kt, scan_probe, scan_unroll, scan_ncu, scan_cfg)" >&2
     exit 2 ;;
esac
export PYTHONPATH=.
t0=$(date +%s)
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm --format=csv > "$OUT/gpu.txt" 2>&1
if [ "$WHAT" = attn ] || [ "$WHAT" = both ]; then
  CHECK_ATTN_IMPLS=mosaic timeout 240 python3 experiments/check_kernels_gpu.py --only attention \
    --out "$OUT/check_attn.json" > "$OUT/check_attn.log" 2>&1
  echo "attention check rc=$? $(( $(date +%s) - t0 )) s"
  timeout 150 python3 experiments/profile_kernels.py --only attention --attn main \
    --out "$OUT/profile_attn.json" > "$OUT/profile_attn.log" 2>&1
  echo "attention profile rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan ] || [ "$WHAT" = both ]; then
  timeout 150 python3 experiments/bench_ssm.py --only check --skip-slow --out "$OUT/ssm_check.json" \
    > "$OUT/ssm_check.log" 2>&1
  echo "scan check rc=$? $(( $(date +%s) - t0 )) s"
  left=$(( 595 - ( $(date +%s) - t0 ) ))
  OUT=$OUT timeout $left python3 experiments/ssm_kernel_times.py > "$OUT/ssm_kernel_times.log" 2>&1
  echo "scan kernel times rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = attn_kt ]; then  # attention at kernel time (CUPTI), interleaved rounds
  timeout 200 python3 experiments/attn_kernel_times.py --configs main --orders --out "$OUT/attn_kt_main.json" \
    > "$OUT/attn_kt_main.log" 2>&1
  echo "attention kernel times (main) rc=$? $(( $(date +%s) - t0 )) s"
  left=$(( 590 - ( $(date +%s) - t0 ) ))
  timeout $left python3 experiments/attn_kernel_times.py --configs s1k,s8k,s16k,d64,gqa4,window1024 --rounds 3 \
    --out "$OUT/attn_kt_all.json" > "$OUT/attn_kt_all.log" 2>&1
  echo "attention kernel times (all) rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan_kt ]; then  # scan forward configs at kernel time; $3: JSON of extra configs
  OUT=$OUT timeout 580 python3 experiments/ssm_kernel_times.py "${3:-{\}}" > "$OUT/ssm_kernel_times.log" 2>&1
  echo "scan kernel times rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan_ncu ]; then  # hardware counters and per-instruction stall samples of the forward
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
  timeout 300 "$NCU" --clock-control none --set full --import-source no -f -o "$OUT/scan_ncu" \
    --kernel-name regex:'selective_scan_fwd|ssm_access_probe' --launch-count ${NCU_LAUNCHES:-4} \
    python3 experiments/ssm_ncu.py "${3:-{\}}" > "$OUT/scan_ncu.log" 2>&1
  echo "ncu rc=$? $(( $(date +%s) - t0 )) s"
  "$NCU" -i "$OUT/scan_ncu.ncu-rep" --page details > "$OUT/scan_ncu_details.txt" 2>&1
  "$NCU" -i "$OUT/scan_ncu.ncu-rep" --page source --csv --print-source sass > "$OUT/scan_ncu_source.csv" 2>&1
  echo "ncu export rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan_probe ]; then  # the forward's access pattern without the scan
  OUT=$OUT timeout 300 python3 experiments/ssm_access_probe.py > "$OUT/ssm_access_probe.log" 2>&1
  echo "probe rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan_unroll ]; then  # the chunked forward at scan_unroll 1 and 2 beside the default: parity, times
  timeout 150 python3 experiments/bench_ssm.py --only check --skip-slow --out "$OUT/ssm_check_unroll.json" \
    --check-configs '[{"scan_unroll": 1}, {"scan_unroll": 2}]' > "$OUT/ssm_check_unroll.log" 2>&1
  echo "scan check rc=$? $(( $(date +%s) - t0 )) s"
  left=$(( 590 - ( $(date +%s) - t0 ) ))
  OUT=$OUT timeout $left python3 experiments/ssm_kernel_times.py \
    '{"scan_unroll 1": {"scan_unroll": 1}, "scan_unroll 2": {"scan_unroll": 2}}' > "$OUT/ssm_kernel_times.log" 2>&1
  echo "scan kernel times rc=$? $(( $(date +%s) - t0 )) s"
fi
if [ "$WHAT" = scan_cfg ]; then  # parity of configs ($3), then kernel times of named configs ($4)
  timeout 200 python3 experiments/bench_ssm.py --only check --skip-slow --out "$OUT/ssm_check_cfg.json" \
    --check-configs "${3:-[]}" > "$OUT/ssm_check_cfg.log" 2>&1
  echo "scan check rc=$? $(( $(date +%s) - t0 )) s"
  left=$(( 590 - ( $(date +%s) - t0 ) ))
  SSM_KT_NO_PER_STEP=1 OUT=$OUT timeout $left python3 experiments/ssm_kernel_times.py "${4:-{\}}" \
    > "$OUT/ssm_kernel_times.log" 2>&1
  echo "scan kernel times rc=$? $(( $(date +%s) - t0 )) s"
fi
