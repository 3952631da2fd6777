"""Scaling-law fits of loss against compute in log-log space: one power law, or two joined at a breakpoint.

The broken (piecewise) power law is continuous at the breakpoint C_b:

    log L = log L_b + s_low  * min(log C - log C_b, 0) + s_high * max(log C - log C_b, 0)

For a fixed breakpoint this is linear least squares in (log L_b, s_low, s_high); the breakpoint is
found by a grid search over log C (every data point and `grid` even steps between the allowed
bounds) followed by a golden-section refinement of the sum of squared log residuals around the best
grid point.  No scipy needed; the result is deterministic.  R^2 and residuals are in log L.

    fit = fit_broken_power_law(compute, loss)
    fit.slope_low, fit.slope_high, fit.breakpoint, fit.r2
    fit.predict([1e21, 1e22])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Tuple

import numpy as np

ArrayLike = Any
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _as_positive(name: str, values: ArrayLike) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {np.shape(values)}")
    bad = np.flatnonzero(~np.isfinite(a) | (a <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must be finite and > 0 (log-log fit); {name}[{i}] = {float(a[i])!r} "
                         f"({bad.size} bad value{'s' if bad.size > 1 else ''})")
    return a


def _inputs(compute: ArrayLike, loss: ArrayLike, min_points: int) -> Tuple[np.ndarray, np.ndarray]:
    c = _as_positive("compute", compute)
    l_ = _as_positive("loss", loss)
    if c.shape != l_.shape:
        raise ValueError(f"compute {c.shape} and loss {l_.shape} must have the same length")
    if c.size < min_points:
        raise ValueError(f"need at least {min_points} (compute, loss) points for this fit, got {c.size}")
    x, y = np.log(c), np.log(l_)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.unique(x).size < 2:
        raise ValueError(f"compute must take at least two distinct values, got {np.unique(c).tolist()}")
    return x, y


def _r2(y: np.ndarray, sse: float) -> float:
    sst = float(np.sum((y - y.mean()) ** 2))
    if sst == 0.0:
        return 1.0 if sse <= 1e-24 else 0.0
    return 1.0 - sse / sst


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L = exp(log_prefactor) * C ** slope, fitted by least squares in log-log space."""

    log_prefactor: float
    slope: float
    r2: float
    rmse: float  # root mean squared residual of log L
    n: int

    def predict(self, compute: ArrayLike) -> np.ndarray:
        """Predicted loss at `compute` (> 0)."""
        x = np.log(_as_positive("compute", np.ravel(compute)))
        return np.exp(self.log_prefactor + self.slope * x).reshape(np.shape(compute))

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


def fit_power_law(compute: ArrayLike, loss: ArrayLike) -> PowerLaw:
    """Least-squares fit of log L = log A + s log C (at least 3 points, all > 0)."""
    x, y = _inputs(compute, loss, 3)
    X = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    sse = float(np.sum((X @ coef - y) ** 2))
    return PowerLaw(float(coef[0]), float(coef[1]), _r2(y, sse), math.sqrt(sse / x.size), int(x.size))


@dataclasses.dataclass(frozen=True)
class BrokenPowerLaw:
    """Two power laws joined continuously at `breakpoint` (in the units of the compute given to the fit).

    slope_* are d log L / d log C on each side; *_stderr are their standard errors from the linear
    least squares at the fitted breakpoint (conditional on it; NaN with no residual degrees of freedom).
    """

    breakpoint: float
    loss_at_breakpoint: float
    slope_low: float
    slope_high: float
    r2: float
    rmse: float  # root mean squared residual of log L
    n: int
    slope_low_stderr: float = float("nan")
    slope_high_stderr: float = float("nan")

    def predict(self, compute: ArrayLike) -> np.ndarray:
        """Predicted loss at `compute` (> 0), on either side of the breakpoint (extrapolates linearly in log-log)."""
        d = np.log(_as_positive("compute", np.ravel(compute))) - math.log(self.breakpoint)
        logl = (math.log(self.loss_at_breakpoint) + self.slope_low * np.minimum(d, 0)
                + self.slope_high * np.maximum(d, 0))
        return np.exp(logl).reshape(np.shape(compute))

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


def _solve(x: np.ndarray, y: np.ndarray, xb: float):
    d = x - xb
    X = np.stack([np.ones_like(x), np.minimum(d, 0.0), np.maximum(d, 0.0)], 1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = X @ coef - y
    return float(r @ r), coef, X


def fit_broken_power_law(compute: ArrayLike, loss: ArrayLike, *, min_points_per_segment: int = 2,
                         grid: int = 256, tol: float = 1e-10) -> BrokenPowerLaw:
    """Fit two power-law segments joined at a fitted breakpoint (see the module docstring).

    The breakpoint is constrained so that each segment spans at least `min_points_per_segment`
    distinct compute values (a point at the breakpoint counts for both); needs >= 2 * that + 1
    points (>= 5).
    """
    if min_points_per_segment < 2:
        raise ValueError(f"min_points_per_segment must be >= 2, got {min_points_per_segment}")
    if grid < 2:
        raise ValueError(f"grid must be >= 2, got {grid}")
    x, y = _inputs(compute, loss, 2 * min_points_per_segment + 1)
    n, m = x.size, min_points_per_segment
    ux = np.unique(x)
    if ux.size < 2 * m - 1:
        raise ValueError(f"compute values are too clustered for two segments of >= {m} distinct compute values "
                         f"each (sharing the breakpoint): {ux.size} distinct values")
    lo, hi = ux[m - 1], ux[ux.size - m]
    cand = np.unique(np.concatenate([np.linspace(lo, hi, grid), x[(x >= lo) & (x <= hi)]]))
    sses = np.array([_solve(x, y, xb)[0] for xb in cand])
    i = int(np.argmin(sses))
    a, b = cand[max(i - 1, 0)], cand[min(i + 1, cand.size - 1)]
    best_x, best_sse = float(cand[i]), float(sses[i])
    # golden-section search on [a, b]: SSE(xb) is continuous, and near its minimum unimodal
    c_, d_ = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _solve(x, y, c_)[0], _solve(x, y, d_)[0]
    for _ in range(200):
        if b - a <= tol * max(1.0, abs(a)):
            break
        if fc < fd:
            b, d_, fd = d_, c_, fc
            c_ = b - _GOLDEN * (b - a)
            fc = _solve(x, y, c_)[0]
        else:
            a, c_, fc = c_, d_, fd
            d_ = a + _GOLDEN * (b - a)
            fd = _solve(x, y, d_)[0]
    for xb, f in ((c_, fc), (d_, fd)):
        if f < best_sse:
            best_x, best_sse = float(xb), float(f)
    sse, coef, X = _solve(x, y, best_x)
    dof = n - 4  # intercept, two slopes, breakpoint
    se = (float("nan"), float("nan"))
    if dof > 0:
        try:
            cov = (sse / dof) * np.linalg.inv(X.T @ X)
            se = (math.sqrt(max(cov[1, 1], 0.0)), math.sqrt(max(cov[2, 2], 0.0)))
        except np.linalg.LinAlgError:
            pass
    return BrokenPowerLaw(breakpoint=math.exp(best_x), loss_at_breakpoint=math.exp(float(coef[0])),
                          slope_low=float(coef[1]), slope_high=float(coef[2]), r2=_r2(y, sse),
                          rmse=math.sqrt(sse / n), n=int(n), slope_low_stderr=se[0], slope_high_stderr=se[1])


__all__ = ["PowerLaw", "BrokenPowerLaw", "fit_power_law", "fit_broken_power_law"]
