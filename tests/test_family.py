"""The family run (harness/jobs/family.py) on the committed miniature suite, not monkeypatched:
the committed results/family against independent computations, and one end-to-end run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, curve_fit

from harness.jobs import family as family_run
from harness import scaling
from harness.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "family"


def _saved():
    return json.loads((RESULTS / "compute_equivalents.json").read_text())["family"]


def _plain_ce(folder: Path, tokens: torch.Tensor) -> float:
    """Mean next-token CE over positions whose input token is not special, with plain
    transformers (the harness's token set, docs/design.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    special = torch.tensor(AutoTokenizer.from_pretrained(folder).all_special_ids)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(tokens), 16):
            batch = tokens[i:i + 16]
            logp = torch.log_softmax(model(batch).logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, batch[:, 1:, None])[..., 0]
            keep = ~torch.isin(batch[:, :-1], special)
            total += float(nll[keep].sum())
            n += int(keep.sum())
    return total / n


def test_committed_family_loads_with_transformers_and_reproduces_its_losses():
    """Every member and checkpoint: plain AutoModelForCausalLM, the recorded loss on the
    committed tokens to 1e-5, and N (non-embedding) as recorded."""
    from transformers import AutoModelForCausalLM

    fam = _saved()
    tokens = torch.from_numpy(np.load(RESULTS / "tokens.npy"))
    m = family_run.manifest()
    folders = {mem["name"]: mem["folder"] for mem in m["members"]}
    largest = next(mem for mem in m["members"] if mem["name"] == m["largest"])
    folders |= {Path(c["folder"]).name: c["folder"] for c in largest["checkpoints"]}
    points = fam["points"] + fam["checkpoints"]["points"][:-1]
    assert len(fam["points"]) >= 5 and len(fam["checkpoints"]["points"]) >= 7
    for p in points:
        folder = family_run.FAMILY_DIR / folders[p["model"]]
        assert _plain_ce(folder, tokens) == pytest.approx(p["loss"], abs=1e-5), p["model"]
    for p in fam["points"]:
        hf = AutoModelForCausalLM.from_pretrained(family_run.FAMILY_DIR / folders[p["model"]])
        emb = hf.get_input_embeddings().weight.numel()
        assert sum(t.numel() for t in hf.parameters()) - emb == p["N"]
    Ns = [p["N"] for p in fam["points"]]
    assert max(Ns) / min(Ns) >= 30


def test_n_eff_is_the_fitted_curves_inverse():
    """N_eff/N from the table equals the closed form from the fitted E, A, alpha, and the root
    of the fitted curve found numerically (brentq)."""
    fam = _saved()
    law, clean = fam["law"], fam["clean"]["loss"]
    E, A, alpha = law["E"], law["A"], law["alpha"]
    curve = lambda N: E + A / N ** alpha  # noqa: E731

    def n_at(L):
        return brentq(lambda logn: curve(np.exp(logn)) - L, -50, 80, xtol=1e-14)

    for name, v in fam["variants"].items():
        closed = ((v["ce_spliced"] - E) / (clean - E)) ** (-1 / alpha)
        assert v["n_eff_frac"] == pytest.approx(closed, rel=1e-9), name
        assert v["n_eff_frac"] == pytest.approx(np.exp(n_at(v["ce_spliced"]) - n_at(clean)), rel=1e-6), name
        for key in ("n_eff_frac", "d_eff_frac", "c_eff_frac_full", "c_eff_frac_hoffmann", "c_eff_frac_epoch"):
            assert v[f"{key}_low"] <= v[key] <= v[f"{key}_high"], (name, key)


def test_checkpoint_curve_matches_scipy_curve_fit():
    """The L(D) fit on the committed checkpoints' losses against scipy's curve_fit minimising
    the same objective (Huber, delta 1e-3, on log loss) by another algorithm (TRF)."""
    ck = _saved()["checkpoints"]
    D = np.array([p["D"] for p in ck["points"]])
    L = np.array([p["loss"] for p in ck["points"]])
    ours = scaling.fit_checkpoints(D, L, seed=0)

    def log_curve(d, E, B, beta):
        return np.log(E + B / d ** beta)

    theirs, _ = curve_fit(log_curve, D, np.log(L), p0=[1.0, 30.0, 0.1], bounds=([0, 0, 0], [10, 1e6, 2]),
                          loss="huber", f_scale=1e-3, method="trf", max_nfev=100000)
    assert ours.A == pytest.approx(theirs[1], rel=0.02) and ours.alpha == pytest.approx(theirs[2], rel=0.02)
    assert ours.loss(D) == pytest.approx(np.exp(log_curve(D, *theirs)), rel=0.02)
    assert ck["law"]["B"] == pytest.approx(ours.A, rel=1e-6)


def test_full_law_is_hoffmanns_fit_of_the_saved_points():
    fam = _saved()
    both = fam["points"] + fam["checkpoints"]["points"][:-1]
    law = scaling.fit_law([p["N"] for p in both], [p["D"] for p in both], [p["loss"] for p in both], seed=0)
    saved = fam["full"]["law"]
    for p in ("E", "A", "B", "alpha", "beta"):
        assert saved[p] == pytest.approx(getattr(law, p), rel=1e-6, abs=1e-9), p


def test_a_loss_the_curve_cannot_place_is_one_error():
    fam = _saved()
    law = scaling.Curve.from_json(fam["law"])
    records = [{"variant": "clean", "ce_clean": law.E - 0.1},
               {"variant": "x", "ce_spliced": law.E + 0.5, "dce_ci_low": 0.5, "dce_ci_high": 0.7, "dce": 0.6}]
    laws = {"family": law, "checkpoints": scaling.Curve.from_json(fam["checkpoints"]["law"]),
            "full": scaling.Law.from_json(fam["full"]["law"])}
    with pytest.raises(UserError, match="irreducible"):
        family_run.readings(records, laws, fam["points"], fam["checkpoints"]["points"])


@pytest.mark.slow
def test_family_run_end_to_end(tmp_path):
    """A short family run: every member evaluated on the run's tokens equals a plain CE, the
    three fits and the presets give an interval around each reading, the files are written."""
    out = tmp_path / "family"
    details = family_run.run(family_run.FamilyConfig(tokens=1024, n_boot=50, out=str(out)), say=lambda m: None)
    fam = details["family"]
    tokens = torch.from_numpy(np.load(out / "tokens.npy"))
    assert tokens.shape == (8, 128)
    smallest = min(fam["points"], key=lambda p: p["N"])
    assert _plain_ce(family_run.FAMILY_DIR / smallest["model"], tokens) == pytest.approx(smallest["loss"], abs=1e-5)
    assert fam["clean"]["loss"] == pytest.approx(max(fam["points"], key=lambda p: p["N"])["loss"], abs=1e-9)
    assert set(fam["variants"]) >= {"l2-w640-k16", "l2-w320-k4"}
    good, small = fam["variants"]["l2-w640-k16"], fam["variants"]["l2-w320-k4"]
    for key in ("n_eff_frac", "d_eff_frac", "c_eff_frac_full", "c_eff_frac_hoffmann"):
        assert 0 < small[key] < good[key] < 1, key  # the sparse, narrow SAE does more damage
    for name in ("compute_equivalents.json", "metrics.json", "equivalents.md", "family.png", "config.json"):
        assert (out / name).is_file()
    assert "(a) N_eff/N family" in (out / "equivalents.md").read_text()
