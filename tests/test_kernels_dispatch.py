"""The kernel dispatcher: resolution rules, errors, logging once, and the Mosaic kernels' pure pieces."""

import importlib
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from kernels import dispatch

fa = importlib.import_module("kernels.flash_attention")
fam = importlib.import_module("kernels.flash_attention_mosaic")


def test_cpu_auto_is_xla_and_interpret_picks_triton():
    assert dispatch.device_info().platform == "cpu"
    assert dispatch.compute_capability() is None
    assert dispatch.select_impl("op", "auto", log=False) == "xla"
    assert dispatch.select_impl("op", "auto", interpret=True, log=False) == "triton"
    assert dispatch.select_impl("op", "pallas", interpret=True, log=False) == "triton"
    assert dispatch.select_impl("op", "xla", log=False) == "xla"


def test_explicit_impl_that_cannot_run_raises():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        dispatch.select_impl("op", "triton")
    with pytest.raises(ValueError, match="no interpret mode"):
        dispatch.select_impl("op", "mosaic", interpret=True)
    with pytest.raises(ValueError, match="no Pallas kernel can run"):
        dispatch.select_impl("op", "pallas")
    with pytest.raises(ValueError, match="head_dim 80"):
        dispatch.select_impl("op", "triton", interpret=True, unsupported={"triton": "head_dim 80"})
    with pytest.raises(ValueError, match="unknown impl"):
        dispatch.select_impl("op", "cuda")


def test_shape_reason_falls_back_to_xla_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="iva_jax.kernels")
    dispatch._LOGGED.clear()
    for _ in range(3):
        assert dispatch.select_impl("opx", "auto", interpret=True, unsupported={"triton": "too big"}) == "xla"
    msgs = [r.getMessage() for r in caplog.records if "opx" in r.getMessage()]
    assert len(msgs) == 1 and "xla" in msgs[0] and "too big" in msgs[0]


def test_disable_env_var(monkeypatch):
    monkeypatch.setenv("IVA_KERNELS_DISABLE", "triton")
    assert dispatch.select_impl("op", "auto", interpret=True, log=False) == "xla"
    choice, why = dispatch.explain("op", interpret=True)
    assert choice == "xla" and "disabled" in why


def test_describe_reports_every_op():
    d = dispatch.describe()
    assert d["device"]["platform"] == "cpu"
    for op in ("rms_norm", "flash_attention", "swiglu"):
        entries = [v for k, v in d.items() if k.startswith(op + "[")]
        assert entries and all(e["impl"] == "xla" and e["why"] for e in entries)


def test_public_ops_route_through_dispatcher(caplog):
    caplog.set_level(logging.INFO, logger="iva_jax.kernels")
    dispatch._LOGGED.clear()
    q = jnp.ones((1, 4, 2, 16))
    fa.flash_attention(q, q, q, impl="auto")
    assert any("flash_attention -> xla" in r.getMessage() for r in caplog.records)


def test_mosaic_validation_gate(monkeypatch):
    assert fam.unsupported_reason(jnp.bfloat16, 128) is None
    # non-causal and rows with no key passed the H100 check
    assert fam.unsupported_reason(jnp.bfloat16, 128, causal=False) is None
    assert fam.unsupported_reason(jnp.bfloat16, 64, q_offset=-3) is None
    assert "float16" in fam.unsupported_reason(jnp.float16, 128)
    assert "float32" in fam.unsupported_reason(jnp.float32, 128)
    assert "multiple of 64" in fam.unsupported_reason(jnp.bfloat16, 80)
    monkeypatch.setenv("IVA_KERNELS_ALLOW_UNVALIDATED", "1")
    assert fam.unsupported_reason(jnp.float16, 128, causal=False) is None


def test_triton_noncausal_is_kept_off_the_gpu(monkeypatch):
    """The non-causal Triton kernel failed to lower on the H100; only interpret mode may use it."""
    import importlib

    fa_mod = importlib.import_module("kernels.flash_attention")
    gpu = fa_mod._unsupported(jnp.bfloat16, 64, True, False, causal=False, interpret=False)
    assert "non-causal" in gpu["triton"]
    assert fa_mod._unsupported(jnp.bfloat16, 64, True, False, causal=False, interpret=True)["triton"] is None


@pytest.mark.parametrize("causal,window,q_offset", [(True, None, 0), (True, 17, 63), (True, 300, 5),
                                                     (False, None, 0), (True, None, -40), (True, 40, 130)])
def test_mosaic_tile_ranges_cover_exactly_the_visible_keys(causal, window, q_offset):
    """The Mosaic kernels' pure index maths: streamed tiles hold every visible key, unmasked tiles no hidden one."""
    sq, skv, bq, bk = 100, 250, 16, 32
    vis = np.asarray(fa.visibility(sq, skv, causal=causal, sliding_window=window, q_offset=q_offset)[0])
    for r0 in range(0, sq, bq):
        rows = vis[r0:r0 + bq]
        p0, p1 = q_offset + r0, q_offset + min(r0 + bq, sq) - 1
        lo, hi = (int(t) for t in fam._kv_range(p0, p1, skv, bk, causal, window))
        seen = np.nonzero(rows.any(0))[0]
        if seen.size:
            assert lo * bk <= seen.min() and seen.max() < hi * bk
        a, b = (int(t) for t in fam._full_kv_range(p0, p0 + bq - 1, skv, bk, lo, hi, causal, window, False))
        assert lo <= a <= b <= hi
        full = rows[:, a * bk:b * bk]
        if r0 + bq <= sq:
            assert full.all()
