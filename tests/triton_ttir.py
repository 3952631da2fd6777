"""Test helper: the Triton IR that Pallas' Triton lowering gives a kernel when lowered for CUDA on this CPU box."""

from __future__ import annotations

import jax


def cuda_ttir(call, *args) -> list[str]:
    """The TTIR text of every Pallas Triton kernel in jax.jit(call)(*args) (args: ShapeDtypeStructs), lowered for
    CUDA with jax.export; no GPU needed."""
    from jax import export
    from jax._src.pallas.triton import lowering as tl

    captured = []
    orig = tl.lower_jaxpr_to_triton_module

    def spy(*a, **k):
        res = orig(*a, **k)
        captured.append(res.module.operation.get_asm())
        return res

    tl.lower_jaxpr_to_triton_module = spy
    try:
        export.export(jax.jit(call), platforms=("cuda",),
                      disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        tl.lower_jaxpr_to_triton_module = orig
    return captured
