"""One launch each of the selective-scan forward kernel (f32, bf16) and its access-pattern probe, for Nsight Compute.

B8 L4096 D2048 N16 with Mamba's features, the inputs of `ssm_kernel_times.py`.  Run it under ncu, which profiles
the kernels whose names match (the forward is `selective_scan_fwd`, the probe `ssm_access_probe`):
    ncu --clock-control none --set full --kernel-name regex:'selective_scan_fwd|ssm_access_probe' \\
        -o $OUT/scan python3 experiments/ssm_ncu.py ['{"scan_unroll": 1}']
The optional JSON gives ScanBlockConfig overrides, for both dtypes or per dtype ('{"float32": {...}, "bfloat16":
{...}}'); SSM_NCU_NO_PROBE=1 skips the probes.  Each kernel launches once (compiled first, no warm-up launches),
so ncu's launch order is: forward f32, forward bf16, probe f32, probe bf16.  GPU only.
"""
import functools
import importlib
import json
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssm_access_probe as probe  # noqa: E402

K = importlib.import_module("kernels.selective_scan")
b, l, d, n = 8, 4096, 2048, 16


def inputs(dt_):
    r = np.random.default_rng(0)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    return dict(u=f(b, l, d).astype(dt_), delta=(f(b, l, d) * 0.5).astype(dt_), A=-jnp.exp(f(d, n) * 0.5),
                B=f(b, l, 1, n).astype(dt_), C=f(b, l, 1, n).astype(dt_), D=f(d), z=f(b, l, d).astype(dt_),
                delta_bias=f(d) * 0.3 - 3.0)


def main():
    from jax.experimental import pallas as pl

    kw = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    data = {dn: inputs(jnp.dtype(dn)) for dn in ("float32", "bfloat16")}
    for dn, a in data.items():
        cfg = K.ScanBlockConfig(**(kw.get(dn, {}) if set(kw) <= set(data) else kw))
        fwd = jax.jit(lambda a, cfg=cfg: K.selective_scan_triton(**a, delta_softplus=True, config=cfg)[0])
        comp = fwd.lower(a).compile()
        jax.block_until_ready(comp(a))
        print("forward", dn, "launched", flush=True)
    if os.environ.get("SSM_NCU_NO_PROBE"):
        return
    T, bd, nw, ahead = probe.VARIANTS[0]
    for dn, a in data.items():
        call = pl.pallas_call(functools.partial(probe.probe_kernel, T=T, BD=bd, L=l, ahead=ahead),
                              out_shape=jax.ShapeDtypeStruct((b, l, d), a["u"].dtype), grid=(b, 1, d // bd),
                              compiler_params=K._compiler_params(nw, 1), name="ssm_access_probe")
        comp = jax.jit(call).lower(a["u"], a["delta"], a["z"], a["B"], a["C"]).compile()
        jax.block_until_ready(comp(a["u"], a["delta"], a["z"], a["B"], a["C"]))
        print("probe", dn, "launched", flush=True)


if __name__ == "__main__":
    main()
