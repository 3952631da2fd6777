"""`python -m iva_jax.env`: versions, devices and the kernel choice of `auto` for every op, with reasons;
the report follows the device (a described H100 / T4), and a missing kernel module is reported, not skipped."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from iva_jax import env
from kernels import dispatch

ROOT = Path(__file__).resolve().parents[1]
OPS = ("rms_norm", "flash_attention", "swiglu", "grouped_matmul", "selective_scan", "decode_attention", "quant_matmul")


@pytest.fixture(scope="module")
def rep():
    return env.report()


def test_report_covers_versions_devices_and_every_kernel(rep):
    import flax
    import jax

    v = rep["versions"]
    assert v["jax"] == jax.__version__ and v["flax"] == flax.__version__
    assert v["optax"] and v["orbax-checkpoint"] and v["jaxlib"]
    d = rep["devices"]
    assert d["backend"] == "cpu" and d["count"] == jax.device_count() == len(d["devices"])
    assert d["compute_capability"] is None
    for op in OPS:
        rows = {k: r for k, r in rep["kernels"].items() if k.startswith(op + "[")}
        assert rows, f"no kernel row for {op}: {sorted(rep['kernels'])}"
        for r in rows.values():
            assert r["impl"] == "xla", r  # CPU: never a Pallas kernel without interpret=True
            assert "triton:" in r["why"] and "CUDA GPU" in r["why"], r
    assert rep["fp8"]["enabled"] is False and "sm89" in rep["fp8"]["why"]
    text = env.format_report(rep)
    assert "rms_norm[hidden=4096]" in text and "-> xla" in text and "fp8: disabled" in text
    json.dumps(rep)


def _with_device(monkeypatch, info):
    monkeypatch.setattr(dispatch, "device_info", lambda: info)


def test_report_follows_the_device(monkeypatch):
    _with_device(monkeypatch, dispatch.DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 132))
    k = env.kernel_choices()
    assert k["rms_norm[hidden=4096]"]["impl"] == "triton"
    assert k["flash_attention[bf16 d128 fwd]"]["impl"] == "mosaic"
    assert env.fp8_decision()["enabled"] is True
    _with_device(monkeypatch, dispatch.DeviceInfo("cuda", "Tesla T4", (7, 5), 40))
    k = env.kernel_choices()
    assert all(r["impl"] == "xla" for r in k.values()), k
    assert "sm80+" in k["rms_norm[hidden=4096]"]["why"] and "sm75" in k["rms_norm[hidden=4096]"]["why"]
    f = env.fp8_decision()
    assert f["enabled"] is False and "T4" in f["why"]


def test_missing_kernel_module_is_reported(monkeypatch):
    monkeypatch.setattr(env, "EXTRA_KERNELS", env.EXTRA_KERNELS + ("no_such_kernel",))
    k = env.kernel_choices()
    assert k["no_such_kernel"]["impl"] == "not available"
    assert "ModuleNotFoundError" in k["no_such_kernel"]["why"]


def test_cli_json_and_text():
    out = subprocess.run([sys.executable, "-m", "iva_jax.env", "--json"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["devices"]["platform"] == "cpu" and "quant_matmul[bf16 M=1 g128]" in rep["kernels"]
    assert "torch" in rep["versions"]  # reported from package metadata; torch is never imported
