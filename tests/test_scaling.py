"""Tests for harness.scaling: the Hoffmann fitter, the inversions and their identities."""
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar

from harness import scaling as S

# Epoch AI's extraction of Hoffmann et al. 2022, Fig. 4 (see tests/data/README.md).
CHINCHILLA = Path(__file__).parent / "data" / "chinchilla_svg_extracted_data.csv"
TRUE = S.Law(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37, name="truth")


# --------------------------------------------------------------------------- fitting

# Hoffmann's procedure on the 240 lowest-loss points (Besiroglu et al. 2024 report A 477.84,
# B 2143.86, E 1.81724, alpha 0.34731, beta 0.36718 for it), and Epoch's own published fit of
# the same points, which must NOT pass for a reproduction of the procedure.
PROCEDURE = {"E": 1.81724, "A": 477.84, "B": 2143.86, "alpha": 0.34731, "beta": 0.36718}
EPOCH_FIT = {"E": 1.81686, "A": 482.00572, "B": 2085.43420, "alpha": 0.34781, "beta": 0.36585}
# Relative tolerance: the thin and full start grids agree to ~1e-8, and this fitter differs from
# the published procedure values by at most 2e-4 (B 2143.42); 1e-3 leaves a 5x margin while
# Epoch's fit is 2.7% off in B, 0.9% in A, 0.14% in alpha and 0.36% in beta.
CHINCHILLA_RTOL = 1e-3


def _off(params: dict) -> dict:
    return {k: abs(params[k] - PROCEDURE[k]) / PROCEDURE[k] for k in PROCEDURE
            if abs(params[k] - PROCEDURE[k]) > CHINCHILLA_RTOL * PROCEDURE[k]}


def test_chinchilla_reproduces_hoffmann_procedure():
    assert CHINCHILLA.is_file(), f"{CHINCHILLA} is part of the repository"
    N, D, loss = S.read_points(CHINCHILLA, lowest=240)
    assert len(loss) == 240 and loss.max() < 3.5
    law = S.fit_law(N, D, loss, n_boot=0)
    assert _off({p: getattr(law, p) for p in PROCEDURE}) == {}
    # the tolerance tells the two published fits apart: Epoch's would fail (B, A, alpha, beta)
    assert set(_off(EPOCH_FIT)) == {"A", "B", "alpha", "beta"}


def test_chinchilla_points_as_read():
    """read_points on Epoch's column names: D = C / (6 N), the 240 lowest losses kept."""
    import pandas as pd

    df = pd.read_csv(CHINCHILLA)
    assert len(df) == 245
    N, D, loss = S.read_points(CHINCHILLA, lowest=240)
    kept = df.sort_values("loss").iloc[:240]
    assert kept["loss"].iloc[-1] < df.sort_values("loss")["loss"].iloc[240]  # no tie at the cut
    got = sorted(zip(N, 6 * N * D, loss))
    want = sorted(zip(kept["Model Size"], kept["Training FLOP"], kept["loss"]))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12)


@pytest.fixture(scope="module")
def synthetic_fit():
    rng = np.random.default_rng(1)
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
    loss = TRUE.loss(N, D) * np.exp(rng.normal(0, 0.003, N.size))
    return S.fit_law(N, D, loss, n_boot=100, seed=0)


def test_synthetic_law_recovered_within_bootstrap_interval(synthetic_fit):
    law = synthetic_fit
    assert law.samples.shape == (100, 5)
    for p in S.PARAMS:
        lo, hi = law.interval[p + "_low"], law.interval[p + "_high"]
        assert lo <= getattr(TRUE, p) <= hi, f"{p}: true {getattr(TRUE, p)} not in [{lo}, {hi}]"
        assert lo <= getattr(law, p) <= hi


def test_family_and_checkpoint_fits_recover_curves():
    """The one-variable fits the family run and --reference-* use (harness/lawfit.py)."""
    from harness import lawfit

    rng = np.random.default_rng(2)
    N = np.geomspace(1.4e7, 2.8e9, 8)
    fam = lawfit.fit_curve(N, (1.9 + 300 / N**0.3) * np.exp(rng.normal(0, 0.002, N.size)), "N")
    for p, v in [("E", 1.9), ("alpha", 0.3)]:
        lo, hi = fam.plausible(p)
        assert lo <= v <= hi, p
    D = np.geomspace(1e9, 3e11, 12)
    ck = lawfit.fit_curve(D, 2.0 + 900 / D**0.33, "D")  # noise-free: exact recovery
    assert ck.law.var == "D"
    np.testing.assert_allclose([ck.law.E, ck.law.A, ck.law.alpha], [2.0, 900.0, 0.33], rtol=1e-3)
    assert set(ck.to_json()) >= {"E", "B", "beta", "E_low", "beta_high", "E_identified"}


def test_law_json_round_trip(synthetic_fit):
    d = synthetic_fit.to_json()
    for p in S.PARAMS:
        assert {p, p + "_low", p + "_high"} <= set(d)
    back = S.Law.from_json(d)
    assert back.to_json() == d


# --------------------------------------------------------------------------- frontier

@pytest.mark.parametrize("name", ["hoffmann", "hoffmann-exact", "epoch"])
def test_frontier_closed_form_matches_numeric_minimum(name):
    law = S.preset(name)
    for C in (1e18, 1e21, 1e24):
        res = minimize_scalar(lambda lnN: law.loss(np.exp(lnN), C / (6 * np.exp(lnN))),
                              bounds=(np.log(1e3), np.log(C / 6 / 1e3)), method="bounded",
                              options={"xatol": 1e-10})
        assert law.frontier_loss(C) == pytest.approx(res.fun, rel=1e-9)
        N_opt, _ = law.optimal_allocation(C)
        assert np.log(N_opt) == pytest.approx(res.x, abs=1e-3)


def _numeric_frontier(law, C):
    """min over N of the full law at C = 6ND, without using the closed form."""
    return minimize_scalar(lambda lnN: law.loss(np.exp(lnN), C / (6 * np.exp(lnN))),
                           bounds=(np.log(1e2), np.log(C / 6 / 1e2)), method="bounded",
                           options={"xatol": 1e-12}).fun


@pytest.mark.parametrize("name", ["hoffmann", "epoch"])
@pytest.mark.parametrize("increase", [0.01, 0.1, 0.5])
def test_compute_fraction_matches_root_finding_on_full_law(name, increase):
    law, L_clean = S.preset(name), 2.6
    L_spliced = L_clean + increase

    def log_compute_at(L):
        return brentq(lambda lnC: _numeric_frontier(law, np.exp(lnC)) - L,
                      np.log(1e12), np.log(1e40), xtol=1e-13, rtol=1e-15)

    numeric = np.exp(log_compute_at(L_spliced) - log_compute_at(L_clean))
    assert S.compute_fraction(law, L_clean, L_spliced)["fraction"] == \
        pytest.approx(numeric, rel=1e-6)


# --------------------------------------------------------------------------- inversions

FAMILY = S.Curve(E=1.9, A=300.0, alpha=0.3, var="N", name="fam")
CKPT = S.Curve(E=2.0, A=900.0, alpha=0.33, var="D", name="ck")


def _fractions(L_clean, L_spliced):
    return {
        "hoffmann": S.compute_fraction(S.preset("hoffmann"), L_clean, L_spliced)["fraction"],
        "kaplan": S.compute_fraction(S.preset("kaplan"), L_clean, L_spliced)["fraction"],
        "n_eff": S.n_eff_fraction(FAMILY, L_clean, L_spliced, N=1.6e8)["fraction"],
        "d_eff": S.d_eff_fraction(CKPT, L_clean, L_spliced)["fraction"],
    }


def test_zero_increase_gives_exactly_one():
    assert all(f == 1.0 for f in _fractions(3.1, 3.1).values())


def test_fractions_strictly_decrease_with_the_increase():
    rows = [_fractions(3.1, 3.1 + d) for d in np.linspace(0, 0.6, 13)]
    for key in rows[0]:
        series = np.array([r[key] for r in rows])
        assert np.all(np.diff(series) < 0), key
        assert series[-1] < 1.0


def test_every_inversion_states_its_assumptions():
    law = S.preset("epoch")
    outs = [S.compute_fraction(law, 3.0, 3.1), S.compute_fraction(S.preset("kaplan"), 3.0, 3.1),
            S.compute_fraction_over_E(law, 3.0, 3.1), S.n_eff_fraction(FAMILY, 3.0, 3.1, 1e8),
            S.d_eff_fraction(CKPT, 3.0, 3.1, D=3e11), S.fraction_interval(law, 3.0, (0.05, 0.1))]
    for out in outs:
        assert isinstance(out["assumptions"], str) and len(out["assumptions"]) > 80


def test_n_eff_matches_root_finding_on_curve():
    L_clean, L_spliced, N = 3.0, 3.2, 4.1e8

    def invert(L):
        return np.exp(brentq(lambda lnN: FAMILY.loss(np.exp(lnN)) - L, 0.0, 60.0, xtol=1e-14))

    out = S.n_eff_fraction(FAMILY, L_clean, L_spliced, N)
    ratio = invert(L_spliced) / invert(L_clean)
    assert out["fraction"] == pytest.approx(ratio, rel=1e-9)
    assert out["N_eff"] == pytest.approx(ratio * N, rel=1e-9)
    assert out["C_fraction"] == out["fraction"]


def test_d_eff_matches_root_finding_on_curve():
    def invert(L):
        return np.exp(brentq(lambda lnD: CKPT.loss(np.exp(lnD)) - L, 0.0, 80.0, xtol=1e-14))

    out = S.d_eff_fraction(CKPT, 2.5, 2.7, D=3e11)
    assert out["fraction"] == pytest.approx(invert(2.7) / invert(2.5), rel=1e-9)
    assert out["D_eff"] == pytest.approx(out["fraction"] * 3e11, rel=1e-12)


def test_kaplan_inversion_independent_formula():
    law = S.preset("kaplan")
    C_c = 3.1e8 * 1e15 * 86400
    assert law.C_c == pytest.approx(C_c)
    L_clean, L_spliced = 3.3, 3.45
    assert S.compute_fraction(law, L_clean, L_spliced)["fraction"] == \
        pytest.approx((L_spliced / L_clean) ** (-1 / 0.050), rel=1e-12)
    # and via the curve itself: the compute at which (C_c/C)^0.05 equals each loss
    C_s, C_cl = C_c / L_spliced ** 20, C_c / L_clean ** 20
    assert law.frontier_loss(C_s) == pytest.approx(L_spliced)
    assert S.compute_fraction(law, L_clean, L_spliced)["fraction"] == pytest.approx(C_s / C_cl)


def test_fraction_over_E_table():
    law = S.preset("hoffmann")
    out = S.compute_fraction_over_E(law, 2.4, 2.5, [0.0, 1.0, law.E, 2.0, 2.45, 3.0])
    fr = [r["fraction"] for r in out["table"]]
    assert fr[2] == pytest.approx(S.compute_fraction(law, 2.4, 2.5)["fraction"])
    assert fr[-2] is None and fr[-1] is None  # E above a loss: no answer
    assert np.all(np.diff(fr[:4]) < 0)  # larger E -> the same increase costs more compute


def test_fraction_interval_brackets_point_estimate(synthetic_fit):
    L_clean = 2.9
    point = S.compute_fraction(synthetic_fit, L_clean, L_clean + 0.075)["fraction"]
    out = S.fraction_interval(synthetic_fit, L_clean, (0.05, 0.1))
    assert out["low"] < point < out["high"] < 1.0
    assert out["n_laws"] + out["n_skipped"] == 100
    # a preset has no samples: the interval is just the dCE interval mapped through the law
    law = S.preset("epoch")
    only = S.fraction_interval(law, L_clean, (0.05, 0.1))
    assert only["low"] == pytest.approx(S.compute_fraction(law, L_clean, L_clean + 0.1)["fraction"])
    assert only["high"] == pytest.approx(S.compute_fraction(law, L_clean, L_clean + 0.05)["fraction"])


# --------------------------------------------------------------------------- bad input

def test_spliced_loss_below_E_is_an_error():
    law = S.preset("epoch")
    with pytest.raises(ValueError, match="irreducible loss E=1.8169"):
        S.compute_fraction(law, 2.5, 1.7)
    with pytest.raises(ValueError, match="irreducible"):
        S.compute_fraction(law, 1.5, 2.5)
    with pytest.raises(ValueError, match="irreducible"):
        S.n_eff_fraction(FAMILY, 3.0, 1.8, 1e8)
    with pytest.raises(ValueError, match="irreducible"):
        S.d_eff_fraction(CKPT, 3.0, 1.9)


def test_too_few_points_is_an_error():
    N, D = np.geomspace(1e7, 1e9, 5), np.geomspace(1e9, 1e11, 5)
    with pytest.raises(ValueError, match="at least 6 points"):
        S.fit_law(N, D, TRUE.loss(N, D), n_boot=0)
    from harness import lawfit

    with pytest.raises(ValueError, match="at least 4 points"):
        lawfit.fit_curve(N[:3], FAMILY.loss(N[:3]), "N")
    with pytest.raises(ValueError, match="at least 4 points"):
        lawfit.fit_curve(D[:3], CKPT.loss(D[:3]), "D")


@pytest.mark.parametrize("bad,message", [
    ("N0", r"N must be finite and positive \(got min 0\)"),
    ("Nneg", r"N must be finite and positive \(got min -1e\+08\)"),
    ("D0", r"D must be finite and positive \(got min 0\)"),
    ("nan_loss", r"loss must be finite and positive for every point"),
    ("shape", r"N has 10 values but loss has 9"),
])
def test_bad_fit_input_is_an_error(bad, message):
    N, D = np.geomspace(1e7, 1e9, 10), np.geomspace(1e9, 1e11, 10)
    loss = TRUE.loss(N, D)
    if bad == "N0":
        N[3] = 0
    elif bad == "Nneg":
        N[3] = -1e8
    elif bad == "D0":
        D[0] = 0
    elif bad == "nan_loss":
        loss[2] = np.nan
    else:
        loss = loss[:-1]
    with pytest.raises(ValueError, match=message):
        S.fit_law(N, D, loss, n_boot=0)


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown scaling-law preset"):
        S.preset("chinchilla-2")
