"""noise@S, noise-dir@S and S+error against independent plain-PyTorch computations."""

import pytest
import torch

import plain_hf
from conftest import make_topk_sae
from harness.evals import ce
from harness.errors import UserError
from harness.splice.replacements import Replacement, from_sae, wrap
from harness.splice.variants import Variant, build_variants

HOOK = "blocks.1.hook_resid_post"  # = the output of the HF model's decoder layer 1


def _seed(seed, key, call):
    """The documented seed of one noise draw (harness.splice.replacements.noise_seed), written out again."""
    return ((seed * 1_000_003 + key) * 1_000_033 + call) % (2**63 - 1)


def _variant(r):
    return Variant(r.spec, {r.hook: r})


@pytest.fixture(scope="module")
def setup(tiny_hf, tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    raw = make_topk_sae(32, 96, 6, HOOK, str(tiny_hf_dir), seed=1)
    sae = from_sae("sae", "sae", raw, {})
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = torch.randint(100, 2000, (6, 24))
    return tiny_hf, hf, raw, sae, tokens


def test_noise_matches_plain_pytorch_with_the_same_seed(setup):
    lm, hf, raw, sae, tokens = setup
    noise = wrap("noise", sae, seed=7)
    out = ce.evaluate(lm, [Variant("clean", {}), _variant(sae), _variant(noise)], tokens, batch_size=3,
                      calib_tokens=tokens, n_boot=200, massive_factor=None)
    rec = out.by_variant()

    reconstruct = plain_hf.topk_reconstruct(raw)
    nll_clean, nll_noise, norms = [], [], []
    for start in (0, 3):  # the CE suite's batches; the noise of a batch is keyed by its first row
        batch = tokens[start:start + 3]
        g = torch.randn((3, 24, 32), generator=torch.Generator().manual_seed(_seed(7, start, 0)))
        u = g / g.norm(dim=-1, keepdim=True)

        def noisy(x, _u=u):
            x_hat, _ = reconstruct(x)
            err = (x - x_hat).norm(dim=-1, keepdim=True)
            norms.append((err, x))
            return x + err * _u, None
        nll_clean.append(plain_hf.nll(plain_hf.forward(hf, batch), batch))
        seen = {}
        spliced = plain_hf.forward(hf, batch, {1: noisy}, record=seen)
        nll_noise.append(plain_hf.nll(spliced, batch))
        x, x_new, _ = seen[1]
        at = plain_hf.splice_positions(batch, [])
        moved = (x_new - x).norm(dim=-1)
        assert torch.allclose(moved, norms[-1][0][..., 0], rtol=1e-5, atol=1e-5)  # |x' - x| = |x - x_hat|
        assert at[:, 0].sum() == 0
    ce_clean = torch.cat(nll_clean).mean().item()
    ce_noise = torch.cat(nll_noise).mean().item()
    assert rec["clean"]["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert rec["noise@sae"]["ce_spliced"] == pytest.approx(ce_noise, abs=1e-5)
    # Same error norm at every spliced position: the explained variance is the SAE's.
    assert rec["noise@sae"]["explained_variance"] == pytest.approx(rec["sae"]["explained_variance"], abs=1e-6)
    assert rec["noise@sae"]["ce_spliced"] != pytest.approx(rec["sae"]["ce_spliced"], abs=1e-4)

    # The ratios on the SAE's row: dCE and KL of the SAE over its noise twin, paired intervals.
    s, n = rec["sae"], rec["noise@sae"]
    assert s["dce_over_noise"] == pytest.approx(s["dce"] / n["dce"], rel=1e-9)
    assert s["kl_over_noise"] == pytest.approx(s["kl"] / n["kl"], rel=1e-6)
    assert s["dce_over_noise_low"] <= s["dce_over_noise"] <= s["dce_over_noise_high"]
    assert s["kl_over_noise_low"] <= s["kl_over_noise"] <= s["kl_over_noise_high"]
    assert "dce_over_noise" not in n

    again = ce.evaluate(lm, [Variant("clean", {}), _variant(noise)], tokens, batch_size=3, calib_tokens=tokens,
                        n_boot=10, massive_factor=None)
    assert again.by_variant()["noise@sae"]["ce_spliced"] == rec["noise@sae"]["ce_spliced"]


def test_error_added_back_leaves_the_model_unchanged(setup):
    lm, _, _, sae, tokens = setup
    plus = wrap("error", sae)
    out = ce.evaluate(lm, [Variant("clean", {}), _variant(sae), _variant(plus)], tokens, batch_size=3,
                      calib_tokens=tokens, n_boot=50, massive_factor=None)
    rec = out.by_variant()["sae+error"]
    assert abs(rec["dce"]) < 1e-5 and abs(rec["kl"]) < 1e-6
    assert rec["l0"] == out.by_variant()["sae"]["l0"] and rec["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert abs(out.by_variant()["sae"]["dce"]) > 1e-3  # the SAE itself moves the loss here


def test_noise_dir_keeps_the_component_along_x_and_the_norm():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 16)
    inner = Replacement(name="pca", spec="pca:3", kind="pca", hook=HOOK, k=3)
    inner.fit(torch.randn(300, 16) * torch.linspace(0.1, 3, 16))
    r = wrap("noise-dir", inner, seed=3)
    x_hat, _ = inner(x)
    err = x - x_hat
    r.reseed(0)
    out, latents = r(x)
    err2 = x - out
    unit = x / x.norm(dim=-1, keepdim=True)
    assert latents is None
    assert torch.allclose(err2.norm(dim=-1), err.norm(dim=-1), atol=1e-5)
    assert torch.allclose((err2 * unit).sum(-1), (err * unit).sum(-1), atol=1e-5)
    perp, perp2 = err - (err * unit).sum(-1, keepdim=True) * unit, err2 - (err2 * unit).sum(-1, keepdim=True) * unit
    cos = torch.nn.functional.cosine_similarity(perp, perp2, dim=-1)
    assert cos.abs().max() < 0.9  # a new direction, not the SAE's
    r.reseed(0)
    assert torch.equal(r(x)[0], out)  # the same key draws the same noise
    r.reseed(1)
    assert not torch.equal(r(x)[0], out)


def test_spec_grammar_and_bad_specs():
    hook = "blocks.1.hook_resid_post"
    variants, repls = build_variants([f"pca:4@{hook}", f"noise@pca:4@{hook}", f"noise-dir@pca:4@{hook}",
                                      f"pca:4@{hook}+error"], False, "cpu")
    names = [v.name for v in variants]
    assert names == ["clean", "pca:4@1.resid_post", "noise@pca:4@1.resid_post", "noise-dir@pca:4@1.resid_post",
                     "pca:4@1.resid_post+error"]
    base = next(r for r in repls if r.spec == f"pca:4@{hook}")
    assert all(r.inner is base for r in repls if r.inner is not None)  # loaded once, calibrated once
    with pytest.raises(UserError, match="noise wrapper"):
        build_variants([f"noise@noise@pca:4@{hook}"], False, "cpu")
    with pytest.raises(UserError, match="empty part"):
        build_variants(["pca:4++neurons:4"], False, "cpu")
    with pytest.raises(UserError, match="not found"):
        build_variants(["noise@no-such-sae"], False, "cpu")
