"""Compute-equivalents where users read them (every CE record, compute_equivalents.json, the
`equiv` and `fit-law` commands) against scipy root finding on the law itself.

The references never use the closed forms in harness.scaling: the frontier is the numeric
minimum of L(N, C/6N) over N, and every inversion is a brentq root of "law(x) = loss".
"""

import json

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness import scaling as S
from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"


# --------------------------------------------------------------------------- references

def frontier_loss(law, C):
    """min over N of E + A/N^alpha + B/D^beta with D = C/(6N), numerically."""
    res = minimize_scalar(lambda lnN: law.loss(np.exp(lnN), C / (6 * np.exp(lnN))),
                          bounds=(np.log(1e2), np.log(C / 6 / 1e2)), method="bounded",
                          options={"xatol": 1e-12})
    return res.fun


def frontier_log_compute(law, L):
    """log C at which the numeric frontier reaches loss L."""
    return brentq(lambda lnC: frontier_loss(law, np.exp(lnC)) - L, np.log(1e8), np.log(1e45),
                  xtol=1e-13, rtol=1e-15)


def frontier_fraction(law, L_clean, L_spliced):
    return float(np.exp(frontier_log_compute(law, L_spliced) - frontier_log_compute(law, L_clean)))


def root(f, lo=0.0, hi=100.0):
    """exp of the root in log space of a decreasing loss curve."""
    return float(np.exp(brentq(f, lo, hi, xtol=1e-14, rtol=1e-15)))


LAW = S.Law(E=1.9, A=450.0, B=1800.0, alpha=0.33, beta=0.36, name="test-law")


# --------------------------------------------------------------------------- scaling.equivalents

def test_equivalents_at_fixed_tokens_and_fixed_size_match_root_finding():
    """N_eff/N at fixed D: solve law(N', D) = L for both losses; D_eff/D at fixed N likewise."""
    L_clean, L_spliced, N, D = 3.0, 3.12, 1.6e8, 2e9
    out = S.equivalents(LAW, L_clean, L_spliced, N=N, D=D)
    n_of = {L: root(lambda lnN: LAW.loss(np.exp(lnN), D) - L) for L in (L_clean, L_spliced)}
    d_of = {L: root(lambda lnD: LAW.loss(N, np.exp(lnD)) - L) for L in (L_clean, L_spliced)}
    assert out["n_eff_frac"] == pytest.approx(n_of[L_spliced] / n_of[L_clean], rel=1e-9)
    assert out["d_eff_frac"] == pytest.approx(d_of[L_spliced] / d_of[L_clean], rel=1e-9)
    assert out["compute_fraction"] == pytest.approx(frontier_fraction(LAW, L_clean, L_spliced), rel=1e-6)
    # the three readings are different questions and give different numbers
    assert len({round(out[k], 4) for k in ("n_eff_frac", "d_eff_frac", "compute_fraction")}) == 3
    assert set(out["assumptions"]) == {"frontier", "over_E", "n_eff", "d_eff"}


def test_equivalents_over_E_rows_match_root_finding():
    out = S.equivalents(LAW, 3.0, 3.2)
    rows = out["compute_fraction_over_E"]
    assert [r["E"] for r in rows] == pytest.approx(np.linspace(0, 2.7, 10))
    for r in rows[::3]:
        want = frontier_fraction(LAW.with_params(E=r["E"]), 3.0, 3.2)
        assert r["fraction"] == pytest.approx(want, rel=1e-6), r


def test_equivalents_from_curves_match_root_finding():
    family = S.Curve(E=2.0, A=300.0, alpha=0.3, var="N", name="fam")
    out = S.equivalents(family, 3.0, 3.1, N=4e8)
    want = root(lambda lnN: family.loss(np.exp(lnN)) - 3.1) / root(lambda lnN: family.loss(np.exp(lnN)) - 3.0)
    assert out["n_eff_frac"] == out["compute_fraction"] == pytest.approx(want, rel=1e-9)
    assert out["n_eff"] == pytest.approx(want * 4e8, rel=1e-9)
    ckpt = S.Curve(E=2.1, A=900.0, alpha=0.33, var="D", name="ck")
    out = S.equivalents(ckpt, 2.5, 2.6)
    want = root(lambda lnD: ckpt.loss(np.exp(lnD)) - 2.6) / root(lambda lnD: ckpt.loss(np.exp(lnD)) - 2.5)
    assert out["d_eff_frac"] == out["compute_fraction"] == pytest.approx(want, rel=1e-9)
    assert "n_eff_frac" not in out


# --------------------------------------------------------------------------- load_law, read_points

def test_load_law_reads_fit_law_json_and_curves(tmp_path):
    law = S.Law(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37, name="mine",
                interval={"E_low": 1.7, "E_high": 1.9})
    path = tmp_path / "law.json"
    path.write_text(json.dumps(law.to_json()))
    back = S.load_law(str(path))
    assert isinstance(back, S.Law)
    assert (back.E, back.A, back.B, back.alpha, back.beta, back.name) == (1.8, 480.0, 2100.0, 0.35, 0.37, "mine")
    assert back.interval == {"E_low": 1.7, "E_high": 1.9}
    # a checkpoint curve's JSON names its parameters B and beta
    ck = tmp_path / "ck.json"
    ck.write_text(json.dumps({"name": "ck", "var": "D", "E": 2.0, "B": 900.0, "beta": 0.33}))
    curve = S.load_law(str(ck))
    assert isinstance(curve, S.Curve) and (curve.var, curve.E, curve.A, curve.alpha) == ("D", 2.0, 900.0, 0.33)
    fam = tmp_path / "fam.json"
    fam.write_text(json.dumps(S.Curve(E=2.0, A=300.0, alpha=0.3, var="N", name="f").to_json()))
    curve = S.load_law(str(fam))
    assert (curve.var, curve.E, curve.A, curve.alpha) == ("N", 2.0, 300.0, 0.3)
    by_hand = tmp_path / "hand.json"  # E, A, alpha only: a family curve in N
    by_hand.write_text(json.dumps({"E": 2.0, "A": 300.0, "alpha": 0.3}))
    curve = S.load_law(str(by_hand))
    assert isinstance(curve, S.Curve) and (curve.var, curve.E, curve.A, curve.alpha) == ("N", 2.0, 300.0, 0.3)
    assert S.load_law("epoch").B == 2085.43420


def test_load_law_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"law 'nope\.json' is neither a preset \(epoch, hoffmann"):
        S.load_law("nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{E: 1")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        S.load_law(str(bad))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"E": 1.8, "A": 400.0, "B": 300.0, "alpha": 0.3}))
    with pytest.raises(ValueError, match=r"partial\.json is not a usable law: lacks law parameters \['beta'\]"):
        S.load_law(str(partial))


def test_read_points_columns_and_lowest(tmp_path):
    plain = tmp_path / "nd.csv"
    plain.write_text("N,D,loss\n1e6,2e9,3.0\n2e6,4e9,2.5\n4e6,8e9,2.8\n")
    N, D, L = S.read_points(plain)
    assert N.tolist() == [1e6, 2e6, 4e6] and D.tolist() == [2e9, 4e9, 8e9] and L.tolist() == [3.0, 2.5, 2.8]
    N, D, L = S.read_points(plain, lowest=2)
    assert sorted(zip(N, D, L)) == [(2e6, 4e9, 2.5), (4e6, 8e9, 2.8)]
    flops = tmp_path / "c.csv"  # Epoch's column names: D = C / (6 N)
    flops.write_text("Model Size,Training FLOP,loss\n1e6,6e15,3.0\n5e6,3e17,2.5\n")
    N, D, L = S.read_points(flops)
    assert D.tolist() == pytest.approx([6e15 / 6e6, 3e17 / 3e7], rel=1e-15)
    missing = tmp_path / "m.csv"
    missing.write_text("N,loss\n1e6,3.0\n")
    with pytest.raises(ValueError, match=r"m\.csv needs columns N, loss and D or C \(has N, loss\)"):
        S.read_points(missing)
    with pytest.raises(ValueError, match=r"nowhere\.csv not found"):
        S.read_points(tmp_path / "nowhere.csv")


# --------------------------------------------------------------------------- CLI success paths

TRUE = S.Law(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37, name="truth")


def test_fit_law_and_equiv_commands(tmp_path):
    """fit-law on noise-free points of a known law writes that law; equiv reads it back and
    prints fractions equal to root finding on the true law."""
    N, D = (g.ravel() for g in np.meshgrid(np.geomspace(1e7, 1e10, 5), np.geomspace(1e9, 1e12, 5)))
    points = tmp_path / "points.csv"
    points.write_text("N,D,loss\n" + "".join(f"{float(n)!r},{float(d)!r},{float(TRUE.loss(n, d))!r}\n" for n, d in zip(N, D)))
    law_json = tmp_path / "law.json"
    res = CliRunner().invoke(app, ["fit-law", str(points), "--out", str(law_json), "--n-boot", "4"])
    assert res.exit_code == 0, res.stderr
    assert "fitted on 25 points" in res.stdout
    fitted = json.loads(law_json.read_text())
    for p in S.PARAMS:
        assert fitted[p] == pytest.approx(getattr(TRUE, p), rel=1e-3), p
        assert fitted[p + "_low"] <= fitted[p + "_high"]

    L_clean, L_spliced, n, d = 2.9, 3.0, 3e8, 6e9
    res = CliRunner().invoke(app, ["equiv", "--clean", str(L_clean), "--spliced", str(L_spliced), "--law",
                                   str(law_json), "--params", str(n), "--tokens", str(d), "--json"])
    assert res.exit_code == 0, res.stderr
    got = json.loads(res.stdout)
    n_of = {L: root(lambda lnN: TRUE.loss(np.exp(lnN), d) - L) for L in (L_clean, L_spliced)}
    d_of = {L: root(lambda lnD: TRUE.loss(n, np.exp(lnD)) - L) for L in (L_clean, L_spliced)}
    # the fit recovers the law to ~1e-4, which moves these fractions by well under 1%
    assert got["compute_fraction"] == pytest.approx(frontier_fraction(TRUE, L_clean, L_spliced), rel=1e-2)
    assert got["n_eff_frac"] == pytest.approx(n_of[L_spliced] / n_of[L_clean], rel=1e-2)
    assert got["d_eff_frac"] == pytest.approx(d_of[L_spliced] / d_of[L_clean], rel=1e-2)

    # the text output of a preset, on stdout, with the assumptions on stderr
    res = CliRunner().invoke(app, ["equiv", "--clean", "3.0", "--spliced", "3.2", "--law", "epoch"])
    assert res.exit_code == 0, res.stderr
    line = next(l for l in res.stdout.splitlines() if "C_eff/C on the frontier" in l)
    assert float(line.split()[-1]) == pytest.approx(frontier_fraction(S.preset("epoch"), 3.0, 3.2), rel=1e-3)
    assert "[frontier]" in res.stderr and "[over_E]" in res.stderr
    # --dce is the same question asked as a loss increase
    by_dce = CliRunner().invoke(app, ["equiv", "--clean", "3.0", "--dce", "0.2", "--law", "epoch"])
    assert by_dce.exit_code == 0 and by_dce.stdout == res.stdout
    both = CliRunner().invoke(app, ["equiv", "--clean", "3.0", "--dce", "0.2", "--spliced", "3.2"])
    assert both.exit_code == 2 and both.stderr.strip().startswith("error: give the spliced loss")


# --------------------------------------------------------------------------- in the pipeline

def _check_record(law, rec, clean):
    want = frontier_fraction(law, clean, rec["ce_spliced"])
    assert rec["compute_fraction"] == pytest.approx(want, rel=1e-6), rec["variant"]
    # a law without bootstrap draws: the interval is the dCE interval read through the law
    assert rec["compute_fraction_low"] == pytest.approx(
        frontier_fraction(law, clean, clean + rec["dce_ci_high"]), rel=1e-6)
    assert rec["compute_fraction_high"] == pytest.approx(
        frontier_fraction(law, clean, clean + rec["dce_ci_low"]), rel=1e-6)


def test_ce_command_writes_compute_equivalents(tiny_hf_dir, tmp_path):
    """`sae-harness ce` on a tiny model: every record of metrics.json carries compute_fraction
    and its interval, equal to root finding on the Hoffmann law; compute_equivalents.json
    repeats them with the table over E."""
    sae = tmp_path / "sae"
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(sae)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--dataset", "builtin", "--tokens", "64",
                                   "--ctx", "16", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    records = json.loads((out / "metrics.json").read_text())
    details = json.loads((out / "compute_equivalents.json").read_text())
    law = S.preset("hoffmann")
    clean = records[0]["ce_clean"]
    assert records[0]["variant"] == "clean" and records[0]["compute_fraction"] == 1.0
    assert [r["variant"] for r in records[1:]] == [str(sae), "zero@1.resid_post", "mean@1.resid_post"]
    assert details["law"] == "hoffmann" and set(details["variants"]) == {r["variant"] for r in records}
    for rec in records:
        assert rec["law"] == "hoffmann"
        _check_record(law, rec, clean)
        saved = details["variants"][rec["variant"]]
        assert saved["compute_fraction"] == rec["compute_fraction"]
        row = saved["compute_fraction_over_E"][4]
        assert row["fraction"] == pytest.approx(
            frontier_fraction(law.with_params(E=row["E"]), clean, rec["ce_spliced"]), rel=1e-6)
    assert 0 < records[1]["compute_fraction_low"] < records[1]["compute_fraction"] < records[1]["compute_fraction_high"]
    assert records[2]["compute_fraction"] < 0.99  # zero ablation raises the loss


def test_compute_equivalents_from_a_law_file(tmp_path):
    """The pipeline step with a fitted law read from JSON, and a variant its E cannot place."""
    from harness.jobs.pipeline import compute_equivalents
    from harness.jobs.runfolder import write_compute_equivalents

    law_json = tmp_path / "law.json"
    law_json.write_text(json.dumps(LAW.to_json()))
    records = [
        {"variant": "clean", "ce_clean": 3.0, "ce_spliced": 3.0, "dce_ci_low": 0.0, "dce_ci_high": 0.0},
        {"variant": "a", "ce_clean": 3.0, "ce_spliced": 3.15, "dce_ci_low": 0.1, "dce_ci_high": 0.2},
        {"variant": "b", "ce_clean": 3.0, "ce_spliced": 1.5, "dce_ci_low": -1.6, "dce_ci_high": -1.4},
    ]
    details, band = compute_equivalents(records, S.load_law(str(law_json)), str(law_json))
    write_compute_equivalents(tmp_path, details)
    assert records[0]["compute_fraction"] == 1.0
    _check_record(LAW, records[1], 3.0)
    assert np.isnan(records[2]["compute_fraction"]) and np.isnan(records[2]["compute_fraction_low"])
    saved = json.loads((tmp_path / "compute_equivalents.json").read_text())
    assert "irreducible loss E=1.9000" in saved["variants"]["b"]["error"]
    assert saved["variants"]["a"]["compute_fraction"] == records[1]["compute_fraction"]
    assert saved["law_params"]["B"] == LAW.B and band == pytest.approx((0.5 * LAW.E, 0.95 * 3.0))


def _root_n(law, L, D):
    """The N at which the full law reaches loss L at fixed D (an independent brentq inversion)."""
    return np.exp(brentq(lambda ln: law.loss(np.exp(ln), D) - L, -20, 80))


def _root_d(law, L, N):
    return np.exp(brentq(lambda ld: law.loss(N, np.exp(ld)) - L, -20, 80))


def test_fixed_tokens_readings_against_closed_form_and_root_finding():
    """N_eff/N at the model's own D and D_eff/D at its own N, as the pipeline records them: the
    closed form ((L_s - E')/(L_c - E'))^(-1/alpha) with E' = E + B/D^beta, and the ratio of two
    brentq inversions of the law; the interval is the same reading at the dCE interval's ends;
    the E band swaps E alone."""
    from harness.jobs.pipeline import compute_equivalents

    law = S.preset("hoffmann")
    N, D = 1.35e8, 2e12  # SmolLM2-135M: 2T tokens
    clean = 3.3
    records = [{"variant": "clean", "ce_clean": clean, "ce_spliced": clean, "dce_ci_low": 0.0, "dce_ci_high": 0.0},
               {"variant": "s", "ce_clean": clean, "ce_spliced": clean + 0.12, "dce_ci_low": 0.1, "dce_ci_high": 0.15}]
    details, _ = compute_equivalents(records, law, "hoffmann", {"N": N, "D": D})
    r = records[1]
    floor = law.E + law.B / D**law.beta
    closed = ((clean + 0.12 - floor) / (clean - floor)) ** (-1 / law.alpha)
    assert r["n_eff_frac_fixed_d"] == pytest.approx(closed, rel=1e-12)
    assert r["n_eff_frac_fixed_d"] == pytest.approx(_root_n(law, clean + 0.12, D) / _root_n(law, clean, D), rel=1e-8)
    assert r["n_eff_frac_fixed_d_low"] == pytest.approx(_root_n(law, clean + 0.15, D) / _root_n(law, clean, D), rel=1e-8)
    assert r["n_eff_frac_fixed_d_high"] == pytest.approx(_root_n(law, clean + 0.1, D) / _root_n(law, clean, D), rel=1e-8)
    assert r["d_eff_frac_fixed_n"] == pytest.approx(_root_d(law, clean + 0.12, N) / _root_d(law, clean, N), rel=1e-8)
    # far past the frontier the fixed-D reading is much milder than the frontier's
    assert r["compute_fraction"] < r["n_eff_frac_fixed_d"] < 1
    band = details["variants"]["s"]["n_eff_frac_fixed_d_over_E"]
    row = band[3]
    floor_e = row["E"] + law.B / D**law.beta
    assert row["fraction"] == pytest.approx(((clean + 0.12 - floor_e) / (clean - floor_e)) ** (-1 / law.alpha))
    assert records[0]["n_eff_frac_fixed_d"] == 1.0


def test_fixed_tokens_reading_without_d_is_empty_and_says_how_to_supply_it():
    from harness.known_models import training_tokens
    from harness.jobs.pipeline import compute_equivalents

    records = [{"variant": "clean", "ce_clean": 3.0, "ce_spliced": 3.0, "dce_ci_low": 0.0, "dce_ci_high": 0.0},
               {"variant": "s", "ce_clean": 3.0, "ce_spliced": 3.1, "dce_ci_low": 0.05, "dce_ci_high": 0.15}]
    compute_equivalents(records, S.preset("hoffmann"), "hoffmann", {"N": 1e8, "D": None})
    assert records[1]["n_eff_frac_fixed_d"] is None and records[1]["d_eff_frac_fixed_n"] is not None
    assert "--train-tokens" in training_tokens(["my-own-model"])["source"]


def test_known_models_table():
    from harness.known_models import lookup, training_tokens

    assert lookup("smollm2-135m").tokens == 2e12
    assert lookup("HuggingFaceTB/SmolLM2-135M-Instruct").tokens == 2e12
    assert lookup("EleutherAI/pythia-70m-deduped").tokens == 299_892_736_000
    assert lookup("google/gemma-2-2b-it").tokens == 2e12
    assert lookup("gpt2").tokens is None  # never published: unknown, not guessed
    assert lookup("/data/models/my-model") is None
    assert training_tokens(["smollm2-135m"], 5e9) == {"tokens": 5e9, "source": "--train-tokens"}
