"""Scaling-law fits: the broken power law recovers known slopes and breakpoint (exactly without noise,
within tight bounds with 1% multiplicative noise), predicts on both sides, and rejects bad input."""

import math

import numpy as np
import pytest

from iva_jax.analysis.scaling_law import BrokenPowerLaw, fit_broken_power_law, fit_power_law

BREAK, L_BREAK, S_LOW, S_HIGH = 3.7e18, 2.9, -0.31, -0.07


def truth(compute):
    d = np.log(np.asarray(compute, np.float64) / BREAK)
    return L_BREAK * np.exp(S_LOW * np.minimum(d, 0) + S_HIGH * np.maximum(d, 0))


@pytest.fixture(scope="module")
def compute():
    # 37 points, unevenly spaced over six decades, the break between two samples
    rng = np.random.default_rng(0)
    return np.sort(10 ** rng.uniform(15.0, 21.0, 37))


def test_noiseless_recovery_is_exact(compute):
    fit = fit_broken_power_law(compute, truth(compute))
    assert fit.slope_low == pytest.approx(S_LOW, abs=1e-8)
    assert fit.slope_high == pytest.approx(S_HIGH, abs=1e-8)
    assert fit.breakpoint == pytest.approx(BREAK, rel=1e-6)
    assert fit.loss_at_breakpoint == pytest.approx(L_BREAK, rel=1e-8)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.rmse < 1e-8 and fit.n == compute.size


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_recovery_within_tight_tolerances(compute, seed):
    rng = np.random.default_rng(seed)
    loss = truth(compute) * np.exp(0.01 * rng.standard_normal(compute.size))  # 1% noise
    fit = fit_broken_power_law(compute, loss)
    assert abs(fit.slope_low - S_LOW) < 0.01, fit
    assert abs(fit.slope_high - S_HIGH) < 0.01, fit
    assert abs(math.log10(fit.breakpoint / BREAK)) < 0.15, fit  # within 0.15 decade (x1.4)
    assert fit.r2 > 0.999
    assert 0.005 < fit.rmse < 0.02  # the residual matches the noise we put in
    # the reported standard errors are honest: the true slopes lie within 4 of them
    assert abs(fit.slope_low - S_LOW) < 4 * fit.slope_low_stderr
    assert abs(fit.slope_high - S_HIGH) < 4 * fit.slope_high_stderr


def test_predict_both_sides_and_shapes(compute):
    fit = fit_broken_power_law(compute, truth(compute))
    probe = np.array([1e14, 1e16, BREAK, 1e20, 1e23])  # incl. extrapolation beyond the data
    np.testing.assert_allclose(fit.predict(probe), truth(probe), rtol=1e-6)
    assert fit.predict(1e19).shape == () and fit.predict([[1e16, 1e20]]).shape == (1, 2)
    with pytest.raises(ValueError, match="compute"):
        fit.predict([1e18, 0.0])
    d = fit.to_dict()
    assert BrokenPowerLaw(**d) == fit


def test_broken_fit_beats_single_power_law(compute):
    loss = truth(compute)
    single = fit_power_law(compute, loss)
    assert S_LOW < single.slope < S_HIGH  # a single line averages the two regimes
    assert single.r2 < 0.99 < fit_broken_power_law(compute, loss).r2
    # and on a true single power law, both fits agree (the break is irrelevant)
    pure = 5.0 * compute ** -0.2
    broken = fit_broken_power_law(compute, pure)
    assert fit_power_law(compute, pure).slope == pytest.approx(-0.2, abs=1e-10)
    assert broken.slope_low == pytest.approx(-0.2, abs=1e-6) and broken.slope_high == pytest.approx(-0.2, abs=1e-6)


@pytest.mark.parametrize("compute_, loss, match", [
    ([1, 2, 3, 0, 5, 6], [1, 1, 1, 1, 1, 1], r"compute\[3\] = 0.0"),
    ([1, 2, 3, 4, 5, 6], [1, 1, -2, 1, 1, 1], r"loss\[2\] = -2.0"),
    ([1, 2, 3, 4, 5, 6], [1, 1, np.nan, 1, 1, 1], r"loss\[2\] = nan"),
    ([1, 2, 3, 4], [4, 3, 2, 1], "at least 5"),
    ([1, 2, 3, 4, 5], [4, 3, 2, 1], "same length"),
    ([[1, 2, 3, 4, 5]], [[4, 3, 2, 1, 1]], "one-dimensional"),
    ([7, 7, 7, 7, 7, 7], [4, 3, 2, 1, 1, 1], "two distinct"),
    ([1, 1, 1, 1, 2, 2], [4, 3, 2, 1, 1, 1], "too clustered"),
])
def test_bad_input_raises_clear_errors(compute_, loss, match):
    with pytest.raises(ValueError, match=match):
        fit_broken_power_law(compute_, loss)


def test_single_power_law_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1.0, 2.0], [2.0, 1.0])
    with pytest.raises(ValueError, match="min_points_per_segment"):
        fit_broken_power_law(np.arange(1, 9), np.arange(1, 9), min_points_per_segment=1)
