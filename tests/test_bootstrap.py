"""The dCE interval against an independent numpy paired bootstrap over sequences.

The per-token losses come from a plain transformers forward with a decoder-layer hook
(tests/plain_hf.py), not from the harness. Each row is mostly one repeated token, so a row's
tokens share their damage: resampling tokens instead of sequences would give an interval about
half as wide, far outside the Monte Carlo tolerance used here.
"""

import numpy as np
import pytest
import torch

import plain_hf
from conftest import make_topk_sae
from harness.evals import ce
from harness.splice.replacements import from_sae
from harness.splice.variants import Variant

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def setup(tiny_hf, tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    raw = make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir), seed=3)
    g = torch.Generator().manual_seed(0)
    n, ctx = 24, 24
    base = torch.randint(3, 2000, (n, 1), generator=g).expand(n, ctx)
    noise = torch.randint(3, 2000, (n, ctx), generator=g)
    tokens = torch.where(torch.rand(n, ctx, generator=g) < 0.25, noise, base)
    tokens[::3, 0] = tiny_hf.tokenizer.bos_token_id  # some rows lose a position from T
    special = tiny_hf.special_ids()
    in_t = ~torch.isin(tokens[:, :-1], torch.tensor(special))
    clean = plain_hf.nll(plain_hf.forward(hf, tokens, {}, special), tokens)
    spliced = plain_hf.nll(plain_hf.forward(hf, tokens, {1: plain_hf.topk_reconstruct(raw)}, special), tokens)
    diff = torch.where(in_t, spliced - clean, torch.zeros_like(clean))
    per_seq = {"d": diff.sum(1).numpy(), "count": in_t.sum(1).numpy(), "per_token": diff[in_t].numpy()}
    variants = [Variant("clean", {}), Variant("sae", {HOOK: from_sae("sae", "sae", raw, {})})]
    return tiny_hf, variants, tokens, per_seq


N_BOOT, SEED = 2000, 7


@pytest.fixture(scope="module")
def rec(setup):
    lm, variants, tokens, _ = setup
    out = ce.evaluate(lm, variants, tokens, batch_size=8, calib_tokens=tokens, n_boot=N_BOOT, seed=SEED)
    return out.by_variant()["sae"]


def _sequence_bootstrap(d, count, idx):
    """dCE of each resample: the resampled sequences' summed differences over their token count."""
    return d[idx].sum(1) / count[idx].sum(1)


def test_dce_interval_equals_numpy_bootstrap_with_the_same_draws(setup, rec):
    """Same seed scheme (numpy default_rng(seed).integers over sequences): the same numbers."""
    *_, ref = setup
    n = len(ref["d"])
    assert rec["dce"] == pytest.approx(ref["d"].sum() / ref["count"].sum(), abs=1e-6)
    idx = np.random.default_rng(SEED).integers(0, n, size=(N_BOOT, n))
    low, high = np.percentile(_sequence_bootstrap(ref["d"], ref["count"], idx), [2.5, 97.5])
    assert rec["dce_ci_low"] == pytest.approx(low, abs=1e-6)
    assert rec["dce_ci_high"] == pytest.approx(high, abs=1e-6)


def test_dce_interval_matches_independent_bootstrap_statistically(setup, rec):
    """Another seed, 20,000 resamples: the endpoints agree within the Monte Carlo error of a
    2.5% quantile from 2,000 resamples (about 0.05 bootstrap SD; tolerance 0.2 SD), while a
    token-level bootstrap of the same data lands several SDs away."""
    *_, ref = setup
    n = len(ref["d"])
    rng = np.random.default_rng(12345)
    boot = _sequence_bootstrap(ref["d"], ref["count"], rng.integers(0, n, size=(20000, n)))
    sd = boot.std()
    low, high = np.percentile(boot, [2.5, 97.5])
    assert rec["dce_ci_low"] == pytest.approx(low, abs=0.2 * sd)
    assert rec["dce_ci_high"] == pytest.approx(high, abs=0.2 * sd)
    # The wrong unit of resampling, for contrast: the interval this test would reject.
    tokens = ref["per_token"]
    wrong = tokens[rng.integers(0, tokens.size, size=(20000, tokens.size))].mean(1)
    w_low, w_high = np.percentile(wrong, [2.5, 97.5])
    assert abs(w_low - low) > 1.0 * sd and abs(w_high - high) > 1.0 * sd
