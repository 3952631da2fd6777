#!/bin/bash
# Issue 6 / 7 / 4 H100 measurements in one device call: selective-scan parity + benchmark + block/option
# sweep, the training step with SwiGLU saved products, GPU parity of the grouped matmul (default tiles)
# and swiglu save_products.  Usage: bash experiments/gpu/h100_ssm_train.sh $OUT
set -u
OUT=${1:-.}
export PYTHONPATH=.
t0=$(date +%s)
timeout 100 python3 experiments/bench_train.py --impls auto --remats none --param_dtypes bfloat16 --batches 8 \
  --no_torch --save_products --budget_s 95 --out "$OUT/train_save_products.json" > "$OUT/train_save_products.log" 2>&1
echo "train done $(( $(date +%s) - t0 )) s"
timeout 120 python3 experiments/check_kernels_gpu.py --only gmm,swiglu --cases "groups,save_products" \
  --out "$OUT/check_gmm_swiglu.json" > "$OUT/check_gmm_swiglu.log" 2>&1
echo "checks done $(( $(date +%s) - t0 )) s"
python3 - > "$OUT/ssm_options_parity.log" 2>&1 <<'PY'
import importlib, jax, jax.numpy as jnp, numpy as np
K = importlib.import_module("kernels.selective_scan")
from iva_jax.ssm import scan as S
rng = np.random.default_rng(0)
b, l, d, n, g = 2, 1000, 384, 16, 1
f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
u, dt, z = f(b, l, d), f(b, l, d) * 0.5, f(b, l, d)
A = -jnp.exp(f(d, n) * 0.5); B, C = f(b, l, g, n), f(b, l, g, n); D, bias = f(d), f(d)
def run(cfg):
    fn = lambda u, dt, B, C: K.selective_scan(u, dt, A, B, C, D, z, bias, True, impl="triton", config=cfg)[0]
    y, vjp = jax.vjp(fn, u, dt, B, C)
    return [y] + list(vjp(jnp.ones_like(y)))
ref = run(K.ScanBlockConfig())
for kw in (dict(prefetch=True), dict(prefetch=True, chunk=4), dict(time_splits=4), dict(time_splits=8), dict(time_splits=4, prefetch=True)):
    try:
        got = run(K.ScanBlockConfig(**kw))
        err = max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r))) for a, r in zip(got, ref))
        print(kw, f"max rel err vs default kernel {err:.2e}", "PASS" if err < 1e-4 else "FAIL")
    except Exception as ex:
        print(kw, "ERROR", type(ex).__name__, str(ex)[:300])
PY
echo "ssm parity done $(( $(date +%s) - t0 )) s"
left=$(( 575 - ( $(date +%s) - t0 ) ))
timeout $left python3 experiments/bench_ssm.py --only check,copy,scan,sweep --skip-slow --reps 10 --out "$OUT/bench_ssm.json" > "$OUT/bench_ssm.log" 2>&1
echo "all done $(( $(date +%s) - t0 )) s"
grep "| auto" "$OUT/train_save_products.log"; tail -4 "$OUT/check_gmm_swiglu.log"; cat "$OUT/ssm_options_parity.log"
tail -45 "$OUT/bench_ssm.log"
