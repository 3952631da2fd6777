"""Independent references for the SSM tests (imported by tests/test_ssm_*.py and test_kernels_selective_scan.py).

`scan_ref_np`: a float64 numpy port of mamba_ssm's `selective_scan_ref` (mamba layout [batch, dim, seqlen]).
`scan_ref_vjp`: the same recurrence written in torch float64, whose autograd gives the reference VJPs.
The two are written independently of iva_jax and checked against each other and a closed form below.
"""

from __future__ import annotations

import numpy as np
import pytest

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# jit options for test programs: XLA:CPU compile time dominates these tiny tests, not run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _softplus_np(x):
    return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def _expand_groups_np(x, dim):
    """[b, n, l] -> [b, dim, n, l]; [b, g, n, l] -> each group shared by dim // g consecutive dims."""
    if x.ndim == 3:
        x = x[:, None]
    return np.repeat(x, dim // x.shape[1], axis=1)


def scan_ref_np(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                return_last_state=False):
    """float64 selective_scan_ref: loops over time, h_t = exp(dt A) h + dt u B_t, y = <h, C_t> + D u."""
    u, delta, A = (np.asarray(x, np.float64) for x in (u, delta, A))
    batch, dim, seqlen = u.shape
    dt = delta + (0.0 if delta_bias is None else np.asarray(delta_bias, np.float64)[:, None])
    if delta_softplus:
        dt = _softplus_np(dt)
    Bx = _expand_groups_np(np.asarray(B, np.float64), dim)  # [b, d, n, l]
    Cx = _expand_groups_np(np.asarray(C, np.float64), dim)
    h = np.zeros((batch, dim, A.shape[1]))
    ys = np.zeros((batch, dim, seqlen))
    for t in range(seqlen):
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[:, :, None] * Bx[..., t]
        ys[:, :, t] = np.sum(h * Cx[..., t], axis=-1)
    if D is not None:
        ys = ys + u * np.asarray(D, np.float64)[:, None]
    if z is not None:
        zz = np.asarray(z, np.float64)
        ys = ys * zz / (1.0 + np.exp(-zz))
    return (ys, h) if return_last_state else ys


def scan_ref_vjp(args: dict, delta_softplus: bool, g_out, g_last):
    """torch float64 selective_scan_ref: (out, {name: grad}) with grads the VJP of (g_out, g_last)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for k, v in args.items() if v is not None}
    u, delta, A = t["u"], t["delta"], t["A"]
    dim = u.shape[1]

    def expand(x):
        x = x[:, None] if x.dim() == 3 else x
        return x.repeat_interleave(dim // x.shape[1], dim=1)

    dt = delta + t["delta_bias"][:, None] if "delta_bias" in t else delta
    if delta_softplus:
        dt = F.softplus(dt)
    Bx, Cx = expand(t["B"]), expand(t["C"])
    h = torch.zeros(u.shape[0], dim, A.shape[1], dtype=torch.float64)
    ys = []
    for i in range(u.shape[2]):
        h = torch.exp(dt[:, :, i, None] * A) * h + (dt[:, :, i] * u[:, :, i])[:, :, None] * Bx[..., i]
        ys.append((h * Cx[..., i]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if "D" in t:
        y = y + u * t["D"][:, None]
    if "z" in t:
        y = y * F.silu(t["z"])
    loss = (y * torch.tensor(np.asarray(g_out, np.float64))).sum()
    if g_last is not None:
        loss = loss + (h * torch.tensor(np.asarray(g_last, np.float64))).sum()
    loss.backward()
    return y.detach().numpy(), {k: v.grad.numpy() for k, v in t.items()}


def make_inputs(rng, batch=2, dim=5, seqlen=37, dstate=3, groups=None, D=True, z=True, bias=True):
    """Random mamba-layout inputs (float64 numpy); A < 0 as S4D-real gives; B/C grouped iff groups."""
    bc_shape = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    return {
        "u": rng.standard_normal((batch, dim, seqlen)),
        "delta": 0.5 * rng.standard_normal((batch, dim, seqlen)),
        "A": -np.exp(0.5 * rng.standard_normal((dim, dstate))),
        "B": rng.standard_normal(bc_shape),
        "C": rng.standard_normal(bc_shape),
        "D": rng.standard_normal(dim) if D else None,
        "z": rng.standard_normal((batch, dim, seqlen)) if z else None,
        "delta_bias": 0.3 * rng.standard_normal(dim) if bias else None,
    }


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| (float64)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-12))


# ---- the references checked against each other and a closed form -----------------------------------
def test_numpy_and_torch_references_agree():
    rng = np.random.default_rng(1)
    args = make_inputs(rng, groups=None)
    torch = pytest.importorskip("torch")
    y_np = scan_ref_np(**args, delta_softplus=True)
    y_t, g = scan_ref_vjp(args, True, np.ones_like(y_np), None)
    np.testing.assert_allclose(y_t, y_np, rtol=1e-12, atol=1e-12)
    # d(sum y)/dD = sum over (b, l) of u * silu(z): a closed form for one gradient.
    z = args["z"]
    np.testing.assert_allclose(g["D"], np.sum(args["u"] * z / (1 + np.exp(-z)), axis=(0, 2)), rtol=1e-12)
    assert torch.get_default_dtype() == torch.float32  # we did not change torch's global state
    assert y_np.shape == args["u"].shape


def test_numpy_reference_closed_form():
    """A = 0, B = C = 1: y_t = dstate * sum_{s<=t} dt_s u_s + D u_t (a cumulative sum)."""
    rng = np.random.default_rng(2)
    b, d, n, l = 2, 3, 4, 9
    u, delta = rng.standard_normal((b, d, l)), rng.random((b, d, l))
    D = rng.standard_normal(d)
    y, last = scan_ref_np(u, delta, np.zeros((d, n)), np.ones((b, n, l)), np.ones((b, n, l)), D=D,
                          return_last_state=True)
    np.testing.assert_allclose(y, n * np.cumsum(delta * u, axis=-1) + D[:, None] * u, rtol=1e-12)
    np.testing.assert_allclose(last, np.repeat(np.sum(delta * u, -1)[..., None], n, -1), rtol=1e-12)


def test_numpy_reference_groups():
    """Grouped B/C equals the ungrouped scan run per group on that group's dims."""
    rng = np.random.default_rng(3)
    args = make_inputs(rng, dim=6, groups=2, D=False, z=False, bias=False)
    y = scan_ref_np(**args)
    for gi in range(2):
        sl = slice(3 * gi, 3 * gi + 3)
        y_g = scan_ref_np(args["u"][:, sl], args["delta"][:, sl], args["A"][sl], args["B"][:, gi], args["C"][:, gi])
        np.testing.assert_allclose(y[:, sl], y_g, rtol=1e-12)
