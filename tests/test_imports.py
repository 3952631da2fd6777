"""Package boundaries: iva_jax and kernels never import torch; kernels imports nothing of iva_jax."""

import subprocess
import sys

import pytest

MODULES = ["iva_jax", "iva_jax.config", "iva_jax.models", "iva_jax.inference", "iva_jax.layers.attention",
           "iva_jax.moe", "iva_jax.ssm", "iva_jax.hrm", "iva_jax.rl", "iva_jax.train", "iva_jax.parallel", "kernels"]


@pytest.mark.parametrize("mod", MODULES)
def test_no_torch_import(mod):
    code = f"import sys, {mod}; bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; " \
           f"print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert r.returncode == 0, f"{mod} imports torch: {r.stdout} {r.stderr[-2000:]}"


def test_kernels_do_not_import_iva_jax():
    code = "import sys, kernels, kernels.dispatch; bad = [m for m in sys.modules if m.startswith('iva_jax')]; " \
           "print(bad); sys.exit(1 if bad else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
