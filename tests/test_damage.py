"""Where the damage lives: damage.json against direct numpy on the saved per-token arrays."""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.evals import damage
from harness.cli.app import app
from harness.jobs.pipeline import RunConfig, run_job

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def run_dir(tiny_hf_dir, tmp_path_factory):
    """A real CE run on the tiny model: one SAE and the neurons baseline, 24 x 16 tokens."""
    tmp = tmp_path_factory.mktemp("damage")
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(tmp / "sae")
    cfg = RunConfig(model=str(tiny_hf_dir), dataset="builtin", saes=[str(tmp / "sae"), "neurons:4"], tokens=24 * 16, ctx=16,
                    calib_seqs=2, n_boot=10, out=str(tmp / "run"))
    run_job(cfg, ("ce",))
    return tmp / "run"


def test_damage_written_by_the_ce_run_equals_numpy(run_dir):
    report = json.loads((run_dir / "damage.json").read_text())
    per_token = np.load(run_dir / "per_token_dce.npz")
    tokens = np.load(run_dir / "tokens.npy")
    clean = per_token["clean"]
    in_t = ~np.isnan(clean)
    assert set(report["variants"]) == set(per_token.files) - {"clean"}
    assert len(report["variants"]) == 4  # the SAE, neurons:4, and their zero and mean baselines
    counts = Counter(tokens.ravel().tolist())
    positions = np.broadcast_to(np.arange(clean.shape[1]), clean.shape)
    for name, got in report["variants"].items():
        d = per_token[name][in_t].astype(np.float64)
        n = d.size
        desc = -np.sort(-d)
        assert got["n_tokens"] == n == int(in_t.sum())
        assert got["share_worst_1pct"] == pytest.approx(desc[:math.ceil(0.01 * n)].sum() / d.sum())
        assert got["share_worst_10pct"] == pytest.approx(desc[:math.ceil(0.1 * n)].sum() / d.sum())
        assert got["frac_worse"] == pytest.approx(np.mean(d > 0))
        assert got["frac_better"] == pytest.approx(np.mean(d < 0))
        assert got["mean_dce"] == pytest.approx(d.mean())
        # groups, each recomputed with its own explicit bounds
        p = np.exp(-clean[in_t])
        bounds = {"p<0.01": (0, 0.01), "0.01-0.1": (0.01, 0.1), "0.1-0.5": (0.1, 0.5), "0.5-0.9": (0.5, 0.9),
                  "p>=0.9": (0.9, 2)}
        for g in got["by_confidence"]:
            lo, hi = bounds[g["group"]]
            sel = (p >= lo) & (p < hi)
            assert g["n"] == sel.sum() and g["mean_dce"] == pytest.approx(d[sel].mean())
            assert g["share_of_dce"] == pytest.approx(d[sel].sum() / d.sum())
        assert sum(g["n"] for g in got["by_confidence"]) == n
        pos = positions[in_t]
        pos_bounds = {"0": (0, 1), "1-3": (1, 4), "4-15": (4, 16)}
        # (position 0 holds the BOS the tokenizer adds: not in T)
        assert [g["group"] for g in got["by_position"]] == ["1-3", "4-15"]
        for g in got["by_position"]:
            lo, hi = pos_bounds[g["group"]]
            sel = (pos >= lo) & (pos < hi)
            assert g["n"] == sel.sum() and g["mean_dce"] == pytest.approx(d[sel].mean())
        freq = np.array([counts[t] for t in tokens[:, 1:][in_t].tolist()])
        freq_bounds = {"1": (1, 2), "2-9": (2, 10), "10-99": (10, 100), "100-999": (100, 1000), ">=1000": (1000, 1e18)}
        for g in got["by_frequency"]:
            lo, hi = freq_bounds[g["group"]]
            sel = (freq >= lo) & (freq < hi)
            assert g["n"] == sel.sum() and g["mean_dce"] == pytest.approx(d[sel].mean())
        assert sum(g["n"] for g in got["by_kind"]) == n
        # the worst positions: the largest dCE, in order, with the saved arrays' values
        seq, where = np.nonzero(in_t)
        order = np.argsort(-d, kind="stable")[:20]
        assert [(w["seq"], w["pos"]) for w in got["worst"]] == [(int(seq[j]), int(where[j])) for j in order]
        for w in got["worst"]:
            assert w["dce"] == pytest.approx(per_token[name][w["seq"], w["pos"]])
            assert len(w["clean_top3"]) == 3 and len(w["spliced_top3"]) == 3


def test_saved_top3_match_a_plain_forward(run_dir, tiny_hf_dir):
    """The clean top-3 the CE run saved equal a plain Hugging Face forward's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    tokens = torch.from_numpy(np.load(run_dir / "tokens.npy"))
    top3 = np.load(run_dir / "per_token_top3.npz")
    report = json.loads((run_dir / "damage.json").read_text())
    with torch.no_grad():
        probs = torch.softmax(hf(tokens[:4]).logits[:, :-1].double(), -1)
    want = probs.topk(3, dim=-1)
    np.testing.assert_array_equal(top3["clean.ids"][:4], want.indices.numpy())
    np.testing.assert_allclose(top3["clean.p"][:4], want.values.numpy(), atol=1e-5)
    w = report["variants"]["tiny-sae" if "tiny-sae" in report["variants"] else next(iter(report["variants"]))]["worst"][0]
    with torch.no_grad():
        p = torch.softmax(hf(tokens[w["seq"]:w["seq"] + 1]).logits[0, w["pos"]].double(), -1)
    best = p.topk(3)
    assert [t for t, _ in w["clean_top3"]] == [tok.decode([int(i)]) for i in best.indices]
    assert w["next_token"] == tok.decode([int(tokens[w["seq"], w["pos"] + 1])])
    assert w["p_clean"] == pytest.approx(float(p[tokens[w["seq"], w["pos"] + 1]]), rel=1e-4)


def test_token_kind():
    assert damage.token_kind(" the") == "word start"
    assert damage.token_kind("the", "\n") == "word start"
    assert damage.token_kind("ing", " the") == "other"
    assert damage.token_kind(",") == "punctuation"
    assert damage.token_kind(" 42") == "digit"
    assert damage.token_kind("\n\n") == "whitespace"


def test_damage_command_rebuilds_the_report(run_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "damage.json").unlink()
    result = CliRunner().invoke(app, ["damage", str(copy)])
    assert result.exit_code == 0, result.stderr
    assert json.loads((copy / "damage.json").read_text()) == json.loads((run_dir / "damage.json").read_text())
    assert "worst 1% of tokens carry" in result.stdout and (copy / "damage.md").exists()


def test_damage_without_per_token_data(tmp_path):
    (tmp_path / "metrics.json").write_text("[]")
    result = CliRunner().invoke(app, ["damage", str(tmp_path)])
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.exit_code == 2 and lines == [f"error: {tmp_path} has no per-token data "
                                               "(per_token_dce.npz and tokens.npy come from a CE run)"]


def test_massive_positions_in_damage_equal_numpy():
    """Planted massive positions (as config.json lists them per hook): counts, mean dCE on them
    and elsewhere, share and rank equal a direct numpy computation; a variant at another hook
    gets no massive section."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 20, size=(6, 12))
    clean = rng.uniform(0.1, 3.0, size=(6, 11))
    clean[:, 0] = np.nan  # position 0 is not in T
    clean[5, 4] = np.nan  # nor is a special token
    dce = rng.normal(0.05, 0.2, size=(6, 11))
    dce[2, 1] = 5.0  # the massive position is also the most damaged one
    massive = [(2, 1), (4, 7), (5, 4), (3, 11)]  # (5, 4): not in T; (3, 11): the last position predicts nothing
    run = {"per_token": {"clean": clean, "a": dce, "b": -dce}, "tokens": tokens, "top3": {},
           "text": {i: f" t{i}" for i in range(20)},
           "massive": {"blocks.1.hook_resid_post": massive}, "variant_hooks": {"a": ["blocks.1.hook_resid_post"],
                                                                                 "b": ["blocks.0.hook_resid_post"]}}
    report = damage.analyse(run)["variants"]
    assert "massive" not in report["b"]
    got = report["a"]["massive"]
    in_t = ~np.isnan(clean)
    on = np.zeros_like(in_t)
    on[2, 1] = on[4, 7] = on[5, 4] = True
    assert got["n"] == 3 and got["n_in_t"] == 2
    assert got["mean_dce"] == pytest.approx(np.mean([dce[2, 1], dce[4, 7]]))
    assert got["mean_dce_rest"] == pytest.approx(dce[in_t & ~on].mean())
    assert got["share_of_dce"] == pytest.approx((dce[2, 1] + dce[4, 7]) / dce[in_t].sum())
    all_t = dce[in_t]
    assert [(p["seq"], p["pos"], p["rank"]) for p in got["positions"]] == [
        (2, 1, 1), (4, 7, int((all_t > dce[4, 7]).sum()) + 1)]
    assert got["positions"][0]["next_token"] == f" t{tokens[2, 2]}"
    md = damage.markdown({"variants": report})
    assert "## Massive activations" in md and "| a | 3 (2) |" in md
