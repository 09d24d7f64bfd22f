"""The family run (harness/jobs/family.py) on the committed miniature suite: the committed
results/family against independent computations, the manifest's promises, and one end-to-end run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, least_squares

from harness import lawfit
from harness.errors import UserError
from harness.jobs import family as family_run

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "family"


def _saved():
    return json.loads((RESULTS / "compute_equivalents.json").read_text())["family"]


def _plain_ce(folder: Path, tokens: torch.Tensor, special=(0,)) -> float:
    """Mean next-token CE over positions whose input token is not special (the family's one
    special token, <|endoftext|>, is id 0), with plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(tokens), 16):
            batch = tokens[i:i + 16]
            logp = torch.log_softmax(model(batch).logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]
            keep = ~torch.isin(batch[:, :-1], torch.tensor(special))
            total += float(nll[keep].sum())
            n += int(keep.sum())
    return total / n


def test_the_family_is_what_the_issue_asks_for():
    """>= 15 annealed (N, D) points spanning >= 30x in N at one depth; the SAE member interior
    (a larger width above it) at about 20 tokens per parameter; a second seed for the three
    smallest widths; at most four epochs of >= 10M unique tokens; >= 64k held-out tokens."""
    m = family_run.manifest()
    runs = m["runs"]
    assert m["annealed"] and len({(r["N_non_embedding"], r["D"]) for r in runs}) >= 15
    assert len({r["layers"] for r in runs}) == 1
    Ns = sorted({r["N_non_embedding"] for r in runs})
    assert Ns[-1] / Ns[0] >= 30
    member = next(r for r in runs if r["name"] == m["sae_member"])
    assert member["N_non_embedding"] < Ns[-2] and 15 <= member["D"] / member["N_non_embedding"] <= 25
    widths = sorted({r["width"] for r in runs})
    assert set(widths[:3]) <= {r["width"] for r in runs if r["seed"] == 1}
    assert all(len({r["D"] for r in runs if r["width"] == w}) >= 3 for w in widths)  # >= 3 budgets per width
    assert m["data"]["train_tokens"] >= 10_000_000 and m["data"]["max_epochs"] <= 4
    assert family_run.eval_rows().size >= 65536


def test_committed_runs_reproduce_their_losses_with_plain_transformers():
    """Every run's loss on the run's tokens, as results/family recorded it, equals a plain
    transformers CE of its folder; N is the non-embedding count of the loaded model."""
    from transformers import AutoModelForCausalLM

    fam = _saved()
    tokens = torch.from_numpy(np.load(RESULTS / "tokens.npy"))
    for p in fam["points"]:
        folder = family_run.FAMILY_DIR / "runs" / p["model"]
        assert _plain_ce(folder, tokens) == pytest.approx(p["loss"], abs=1e-5), p["model"]
    hf = AutoModelForCausalLM.from_pretrained(family_run.FAMILY_DIR / "runs" / fam["points"][-1]["model"])
    assert sum(t.numel() for t in hf.parameters()) - hf.get_input_embeddings().weight.numel() == fam["points"][-1]["N"]
    member = next(p for p in fam["points"] if p["model"] == fam["member"]["name"])
    assert fam["clean_ce_suite"] == pytest.approx(member["loss"], abs=1e-5)  # the CE suite's clean = the member


def test_the_family_fit_is_least_squares_on_the_saved_points():
    """(a) L(N) at the member's D: the saved E, A, alpha minimise the squared residuals (scipy's
    least_squares from the saved optimum finds no better point), and N_eff/N is the closed form
    and the root of the fitted curve."""
    fam = _saved()
    law, mem = fam["fits"]["family"], fam["member"]
    pts = [p for p in fam["points"] if p["D"] == mem["D"]]  # every seed
    N, L = np.array([p["N"] for p in pts], float), np.array([p["loss"] for p in pts])
    ref = least_squares(lambda t: t[0] + t[1] / N ** t[2] - L, [law["E"], law["A"], law["alpha"]],
                        bounds=([0, 0, 0.01], [L.min(), np.inf, 2]), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert 2 * ref.cost >= law["sse"] * (1 - 1e-6)
    clean = fam["clean_ce_suite"]
    curve = lambda n: law["E"] + law["A"] / n ** law["alpha"]  # noqa: E731
    n_at = lambda target: brentq(lambda ln: curve(np.exp(ln)) - target, -50, 80, xtol=1e-14)  # noqa: E731
    for name, v in fam["variants"].items():
        closed = ((v["ce_spliced"] - law["E"]) / (clean - law["E"])) ** (-1 / law["alpha"])
        assert v["n_eff_frac_family"] == pytest.approx(closed, rel=1e-9), name
        assert v["n_eff_frac_family"] == pytest.approx(np.exp(n_at(v["ce_spliced"]) - n_at(clean)), rel=1e-6)
        for key, _ in family_run.READINGS:
            if v[key] is not None:
                assert v[f"{key}_low"] <= v[key] <= v[f"{key}_high"], (name, key)


def test_full_law_refit_gives_the_saved_law():
    fam = _saved()
    pts = fam["points"]
    fit = lawfit.fit_law([p["N"] for p in pts], [p["D"] for p in pts], [p["loss"] for p in pts])
    saved = fam["fits"]["full"]
    for p in ("E", "A", "B", "alpha", "beta"):
        assert saved[p] == pytest.approx(getattr(fit.law, p), rel=1e-6, abs=1e-9), p


def test_a_run_not_marked_annealed_is_refused(monkeypatch):
    """A manifest that marks a run as not annealed: one line, before any fit."""
    m = json.loads((family_run.FAMILY_DIR / "manifest.json").read_text())
    m["runs"][0] = {**m["runs"][0], "annealed": False}
    with pytest.raises(UserError, match="is not marked annealed"):
        family_run.measure_runs(m, torch.zeros((1, 4), dtype=torch.long), 1, [0])


def test_a_loss_the_curve_cannot_place_is_one_error():
    fam = _saved()
    pts = [p for p in fam["points"] if p["D"] == fam["member"]["D"] and p["seed"] == 0]
    fit = lawfit.fit_curve([p["N"] for p in pts], [p["loss"] for p in pts], "N")
    records = [{"variant": "clean", "ce_clean": fit.law.E - 0.1},
               {"variant": "x", "ce_spliced": fit.law.E + 0.5, "dce_ci_low": 0.5, "dce_ci_high": 0.7, "dce": 0.6}]
    fits = {"family": fit, "budgets": fit, "full": fit}
    with pytest.raises(UserError, match="cannot place the clean loss"):
        family_run.readings(records, fits, fam["points"], fam["member"])


@pytest.mark.slow
def test_family_run_end_to_end(tmp_path):
    """A short family run: the files, a reading per fit for each variant, the good SAE less
    damaging than the small sparse one under every reading."""
    out = tmp_path / "family"
    details = family_run.run(family_run.FamilyConfig(tokens=2048, n_boot=50, out=str(out)), say=lambda m: None)
    fam = details["family"]
    assert np.load(out / "tokens.npy").shape == (8, 256)
    good, small = fam["variants"]["l2-w384-k16"], fam["variants"]["l2-w192-k4"]
    for key, _ in family_run.READINGS:
        if good[key] is None:  # a preset whose floor at the family's D lies above the loss
            assert key.endswith(family_run.PRESETS) and "irreducible" in good[f"{key}_why"]
            continue
        assert 0 < small[key] < good[key] <= 1, key
    for name in ("compute_equivalents.json", "metrics.json", "equivalents.md", "family.png", "config.json"):
        assert (out / name).is_file()
    assert "(a) N_eff/N, L(N) at fixed D" in (out / "equivalents.md").read_text()
    with pytest.raises(UserError, match="already exists"):
        family_run.run(family_run.FamilyConfig(tokens=2048, n_boot=50, out=str(out)), say=lambda m: None)


def test_each_fits_profile_agrees_with_its_plausible_range():
    """The profile over E drawn in family.png: every E whose profile residual is below the
    threshold lies in the stated plausible range, and a fit marked identified rejects E = 0
    (its profile there is above the threshold)."""
    fam = _saved()
    for key in ("family", "budgets", "full"):
        fit = fam["fits"][key]
        prof = fit["E_profile"]
        step = prof[1]["E"] - prof[0]["E"]
        below = [r["E"] for r in prof if r["sse"] <= fit["threshold_sse"]]
        assert below and fit["E_low"] - step <= min(below) and max(below) <= fit["E_high"] + step, key
        if fit["E_identified"]:
            assert prof[0]["E"] == 0 and prof[0]["sse"] > fit["threshold_sse"], key
