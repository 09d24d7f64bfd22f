"""Least-squares scaling fits with profile-likelihood intervals (harness/lawfit.py), on
synthetic families drawn from a known law: the stated interval must cover the truth, and a
family that cannot pin E must say so."""

import numpy as np
import pytest
from scipy.optimize import brentq, least_squares

from harness import lawfit

TRUE = dict(E=2.0, A=60.0, alpha=0.35, B=400.0, beta=0.3)
D_MAX = 8.388608e6
NS = np.geomspace(5e4, 1.8e6, 6)  # the shipped family's span (33x)
DS = np.array([1, 2, 4, 8]) * 1.048576e6


def _loss(N, D):
    return TRUE["E"] + TRUE["A"] / N ** TRUE["alpha"] + TRUE["B"] / D ** TRUE["beta"]


def _true_n_eff(N0, D, dce):
    """The true N_eff/N: the size at which the true law at D reaches the spliced loss, over the
    size at which it reaches the clean loss (brentq, not the closed form)."""
    L = _loss(N0, D)
    root = [np.exp(brentq(lambda ln: _loss(np.exp(ln), D) - target, 0, 60)) for target in (L + dce, L)]
    return root[0] / root[1]


def test_curve_fit_is_least_squares_and_matches_scipy():
    rng = np.random.default_rng(0)
    y = _loss(NS, D_MAX) + rng.normal(0, 0.01, len(NS))
    fit = lawfit.fit_curve(NS, y, "N")
    ref = least_squares(lambda p: p[0] + p[1] / NS ** p[2] - y, [fit.law.E + 0.1, fit.law.A, fit.law.alpha + 0.02],
                        xtol=1e-14, ftol=1e-14, gtol=1e-14)
    assert fit.sse == pytest.approx(2 * ref.cost, rel=1e-6)
    assert fit.law.E == pytest.approx(ref.x[0], abs=1e-3) and fit.law.alpha == pytest.approx(ref.x[2], abs=1e-3)


def test_family_interval_covers_the_true_n_eff_in_at_least_90_of_100_seeds():
    """Six members at one D with 0.01 nats of noise; the member 4th from the bottom is spliced
    (+0.05 nats). The fraction's interval is the profile-likelihood range."""
    dce, hits = 0.05, 0
    true = _true_n_eff(NS[3], D_MAX, dce)
    for seed in range(100):
        y = _loss(NS, D_MAX) + np.random.default_rng(seed).normal(0, 0.01, len(NS))
        r = lawfit.reading(lawfit.fit_curve(NS, y, "N"), "n_eff", y[3], dce)
        hits += r["low"] <= true <= r["high"]
    assert hits >= 90, hits


@pytest.mark.slow
def test_full_law_interval_covers_the_true_n_eff():
    """The full L(N, D) on the 6 x 4 grid of the shipped family: N_eff/N at the largest D."""
    NN, DD = (a.ravel() for a in np.meshgrid(NS, DS))
    dce, hits = 0.05, 0
    true = _true_n_eff(NS[3], DS[-1], dce)
    for seed in range(20):
        y = _loss(NN, DD) + np.random.default_rng(seed).normal(0, 0.01, len(NN))
        fit = lawfit.fit_law(NN, DD, y)
        r = lawfit.reading(fit, "n_eff", _loss(NS[3], DS[-1]), dce, D=DS[-1])
        hits += r["low"] <= true <= r["high"]
        assert fit.identified()["E"]
    assert hits >= 18, hits


def test_a_family_that_cannot_pin_e_says_so():
    """Four sizes within 2x of each other and noise: a flat profile over E. E is reported as
    not identified, its plausible range reaches a bound, and the reading's interval spans it."""
    N = np.geomspace(2e5, 4e5, 4)
    y = _loss(N, D_MAX) + np.random.default_rng(3).normal(0, 0.02, len(N))
    fit = lawfit.fit_curve(N, y, "N")
    assert fit.identified()["E"] is False
    lo, hi = fit.plausible("E")
    assert lo == 0.0 or hi > y.min() - 0.01
    r = lawfit.reading(fit, "n_eff", y[1], 0.05)
    assert not r["identified"] and r["high"] / r["low"] > 2
    assert fit.to_json()["E_identified"] is False


def test_reading_at_the_optimum_is_the_closed_form():
    rng = np.random.default_rng(1)
    y = _loss(NS, D_MAX) + rng.normal(0, 0.005, len(NS))
    fit = lawfit.fit_curve(NS, y, "N")
    r = lawfit.reading(fit, "n_eff", y[3], 0.05, (0.04, 0.06))
    law = fit.law
    closed = ((y[3] + 0.05 - law.E) / (y[3] - law.E)) ** (-1 / law.alpha)
    assert r["value"] == pytest.approx(closed, rel=1e-9)
    assert r["low"] <= closed <= r["high"]


def test_bad_points_are_one_line_errors():
    with pytest.raises(ValueError, match="need at least 4 points"):
        lawfit.fit_curve([1e5, 2e5, 4e5], [3.0, 2.9, 2.8], "N")
    with pytest.raises(ValueError, match="finite and positive"):
        lawfit.fit_curve([1e5, -2e5, 4e5, 8e5], [3.0, 2.9, 2.8, 2.7], "N")


def test_weighted_fit_equals_scaled_least_squares():
    """With sigma, the fit minimises sum((residual / sigma)^2): scipy's least_squares on the
    scaled residuals finds the same E and alpha; equal sigmas change nothing."""
    rng = np.random.default_rng(3)
    N = np.geomspace(1e5, 3e7, 8)
    sigma = np.array([0.2, 0.2, 0.01, 0.01, 0.01, 0.01, 0.2, 0.2])
    loss = 2.0 + 40.0 / N**0.3 + rng.normal(0, 1, 8) * sigma
    fit = lawfit.fit_curve(N, loss, "N", sigma=sigma)
    ref = least_squares(lambda t: (t[0] + t[1] / N**t[2] - loss) / sigma, [1.5, 30.0, 0.3],
                        bounds=([0, 0, 0.01], [loss.min(), np.inf, 2.0]))
    assert fit.law.E == pytest.approx(ref.x[0], abs=2e-3) and fit.law.alpha == pytest.approx(ref.x[2], abs=2e-3)
    assert fit.rmse == pytest.approx(np.sqrt(np.mean((loss - fit.law.loss(N)) ** 2)), rel=1e-6)  # in nats
    same = lawfit.fit_curve(N, loss, "N", sigma=np.full(8, 0.05))
    plain = lawfit.fit_curve(N, loss, "N")
    assert same.law.E == pytest.approx(plain.law.E, abs=1e-9)
    assert same.plausible("E") == pytest.approx(plain.plausible("E"), abs=1e-9)
    with pytest.raises(ValueError, match="sigma"):
        lawfit.fit_curve(N, loss, "N", sigma=np.zeros(8))
