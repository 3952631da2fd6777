#!/usr/bin/env bash
# HRM vs its two baselines (hrm_1cycle, transformer) on held-out 6x6 Sudoku, several seeds (vmapped),
# each model trained for BUDGET seconds (compile excluded), then scored on the whole test set.
# Config: configs/hrm_study_gpu.yaml (HRM_STUDY_CONFIG overrides; it documents the choices).
# Writes only <out>/results.json and <out>/results.md (out = $OUT/hrm_study when $OUT is set, else
# runs/hrm_study); per-model telemetry stays in runs/hrm_study_runs.
#
#   bash experiments/hrm_gpu_study.sh 130                      # all three models in one call (~8-9 min)
#   bash experiments/hrm_gpu_study.sh 420 0,1,2 hrm            # or one model per call, longer budgets ...
#   bash experiments/hrm_gpu_study.sh 420 0,1,2 hrm_1cycle
#   bash experiments/hrm_gpu_study.sh 420 0,1,2 transformer    # ... each call re-aggregates what is done
#   bash experiments/hrm_gpu_study.sh 60 0,1 hrm,hrm_1cycle,transformer --tiny   # CPU smoke (4x4)
# Extra arguments go to experiments/hrm_study.py (key=value config overrides, --tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET="${1:-130}"
SEEDS="${2:-0,1,2}"
MODELS="${3:-hrm,hrm_1cycle,transformer}"
shift $(( $# < 3 ? $# : 3 ))
STUDY_OUT="${HRM_STUDY_OUT:-${OUT:+$OUT/hrm_study}}"
STUDY_OUT="${STUDY_OUT:-runs/hrm_study}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
python experiments/hrm_study.py --config "${HRM_STUDY_CONFIG:-configs/hrm_study_gpu.yaml}" --budget_per_model_s "$BUDGET" --seeds "$SEEDS" \
  --models "$MODELS" --out "$STUDY_OUT" "$@"
