"""CE suite numbers against independent computations (plain PyTorch, sae-lens' run_evals)."""

import numpy as np
import pytest
import torch

from conftest import make_topk_sae
from harness.evals import ce
from harness.splice.replacements import Replacement, from_sae
from harness.splice.variants import Variant


def _variant(repl):
    return Variant(repl.name, {repl.hook: repl})


def test_identity_splice_changes_nothing(tiny_hf):
    tokens = torch.randint(3, 2000, (6, 16))
    ident = Replacement(name="identity", spec="identity", kind="identity", hook="blocks.2.hook_resid_post")
    out = ce.evaluate(tiny_hf, [Variant("clean", {}), _variant(ident)], tokens, batch_size=4,
                      calib_tokens=tokens, n_boot=50)
    rec = {r["variant"]: r for r in out.records}["identity"]
    assert rec["dce"] == 0.0 and rec["kl"] == pytest.approx(0.0, abs=1e-7)
    assert rec["dce_ci_low"] == 0.0 and rec["dce_ci_high"] == 0.0
    assert rec["explained_variance"] == 1.0


def _plain_ce(model, tokens, hook_fn=None, exclude=()):
    """Reference CE / per-position log-probs with a plain HookedTransformer hook."""
    fwd = [("blocks.1.hook_resid_post", hook_fn)] if hook_fn else []
    logits = model.run_with_hooks(tokens, fwd_hooks=fwd)
    logp = torch.log_softmax(logits[:, :-1], -1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    keep = ~torch.isin(tokens[:, :-1], torch.tensor(list(exclude), dtype=torch.long))
    return nll[keep].mean().item(), logp, keep


def test_ce_metrics_against_plain_pytorch(tiny_hooked):
    """CE, zero/mean baselines, KL, EV and L0 recomputed by hand on a tiny HookedTransformer."""
    model = tiny_hooked.model
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (5, 20))
    calib = torch.randint(0, 97, (4, 20))
    hook = "blocks.1.hook_resid_post"
    sae = from_sae("tiny", "tiny", make_topk_sae(32, 64, 4, hook, "tiny-hooked"), {})
    out = ce.evaluate(tiny_hooked, [Variant("clean", {}), _variant(sae)], tokens, batch_size=2,
                      calib_tokens=calib, n_boot=200, keep_first=False)
    rec = {r["variant"]: r for r in out.records}["tiny"]

    with torch.no_grad():
        _, cache = model.run_with_cache(calib, names_filter=hook)
        mean = cache[hook][:, 1:].reshape(-1, 32).double().mean(0).float()  # calibration skips position 0
        ce_clean, logp_clean, _ = _plain_ce(model, tokens)
        acts = {}

        def sae_hook(x, hook):
            acts["x"] = x.clone()
            lat = sae.sae.encode(x)
            acts["lat"] = lat
            acts["xh"] = sae.sae.decode(lat)
            return acts["xh"]
        ce_sae, logp_sae, _ = _plain_ce(model, tokens, sae_hook)
        ce_zero, _, _ = _plain_ce(model, tokens, lambda x, hook: torch.zeros_like(x))
        ce_mean, _, _ = _plain_ce(model, tokens, lambda x, hook: mean.expand_as(x))
    kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1).mean().item()
    x, xh = acts["x"][:, :-1].reshape(-1, 32).double(), acts["xh"][:, :-1].reshape(-1, 32).double()
    ev = 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert rec["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert rec["ce_spliced"] == pytest.approx(ce_sae, abs=1e-5)
    assert rec["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)
    assert rec["ce_mean"] == pytest.approx(ce_mean, abs=1e-4)
    assert rec["loss_recovered_zero"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), abs=1e-4)
    assert rec["loss_recovered_mean"] == pytest.approx((ce_mean - ce_sae) / (ce_mean - ce_clean), abs=1e-3)
    assert rec["kl"] == pytest.approx(kl, abs=1e-5)
    assert rec["explained_variance"] == pytest.approx(ev.item(), abs=1e-5)
    assert rec["l0"] == pytest.approx(4.0)
    assert rec["dce_ci_low"] < rec["dce"] < rec["dce_ci_high"]


def test_loss_recovered_and_kl_match_sae_lens_run_evals(tiny_hooked):
    """sae-lens' own run_evals on the same batch.

    Definitional differences, tested around: run_evals averages KL over *every* position,
    including the last one (which predicts nothing); our KL covers predicted positions only.
    Our CE on tokens[:, :T+1] therefore sees exactly the positions run_evals' KL sees on
    tokens[:, :T]. (sae-lens also zeroes special positions in its zero baseline while we keep
    them; this model has no special tokens, so that difference does not arise here. By default
    the harness also leaves position 0, the attention sink, unspliced; run_evals splices it, so
    the comparison turns that rule off.)"""
    from sae_lens import run_evals
    from sae_lens.evals import EvalConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    torch.manual_seed(3)
    hook = "blocks.1.hook_resid_post"
    raw = make_topk_sae(32, 64, 6, hook, "tiny-hooked", seed=3)
    sae = from_sae("tiny", "tiny", raw, {})
    tokens = torch.randint(0, 97, (6, 17))

    class OneBatch:  # run_evals only asks the store for token batches
        store_batch_size_prompts = 6
        context_size = 16

        def reset_input_dataset(self):
            pass

        def get_batch_tokens(self, n):
            return tokens[:, :16]

    cfg = EvalConfig(batch_size_prompts=6, n_eval_reconstruction_batches=1, compute_kl=True,
                     compute_ce_loss=True, n_eval_sparsity_variance_batches=0, compute_l2_norms=False,
                     compute_sparsity_metrics=False, compute_variance_metrics=False,
                     compute_featurewise_density_statistics=False, compute_featurewise_weight_based_metrics=False)
    metrics, _ = run_evals(raw, OneBatch(), tiny_hooked.model, ActivationScaler(), cfg,
                           exclude_special_tokens=False)
    perf, behav = metrics["model_performance_preservation"], metrics["model_behavior_preservation"]

    same = ce.evaluate(tiny_hooked, [Variant("clean", {}), _variant(sae)], tokens[:, :16], 3, tokens, 10,
                       keep_first=False)
    longer = ce.evaluate(tiny_hooked, [Variant("clean", {}), _variant(sae)], tokens, 3, tokens, 10,
                         keep_first=False)
    rec = {r["variant"]: r for r in same.records}["tiny"]
    rec_long = {r["variant"]: r for r in longer.records}["tiny"]
    assert rec["ce_clean"] == pytest.approx(perf["ce_loss_without_sae"], abs=1e-5)
    assert rec["ce_spliced"] == pytest.approx(perf["ce_loss_with_sae"], abs=1e-5)
    assert rec["ce_zero"] == pytest.approx(perf["ce_loss_with_ablation"], abs=1e-5)
    assert rec["loss_recovered_zero"] == pytest.approx(perf["ce_loss_score"], abs=1e-5)
    assert rec_long["kl"] == pytest.approx(behav["kl_div_with_sae"], abs=1e-5)


def test_baselines_against_numpy(tiny_hooked):
    torch.manual_seed(0)
    acts = torch.randn(200, 8) @ torch.randn(8, 8) + 3.0
    pca = Replacement(name="pca:3", spec="pca:3", kind="pca", hook="h", k=3)
    pca.fit(acts)
    x = torch.randn(5, 8)
    got, lat = pca(x)
    a = acts.double().numpy()
    mu = a.mean(0)
    _, vecs = np.linalg.eigh(np.cov((a - mu).T))
    top = vecs[:, ::-1][:, :3]
    want = (x.double().numpy() - mu) @ top @ top.T + mu
    np.testing.assert_allclose(got.numpy(), want, atol=1e-4)
    assert lat.shape == (5, 3)

    neurons = Replacement(name="neurons:2", spec="neurons:2", kind="neurons", hook="h", k=2)
    y = torch.tensor([[0.1, -5.0, 2.0, 0.3], [4.0, 0.0, -0.5, 1.0]])
    got, lat = neurons(y)
    assert got.tolist() == [[0.0, -5.0, 2.0, 0.0], [4.0, 0.0, 0.0, 1.0]]
    assert int((lat != 0).sum(-1).max()) == 2


def test_joint_splice_reports_joint_and_alone(tiny_hooked):
    from harness.splice.variants import build_variants

    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    variants, _ = build_variants([f"pca:4@{hooks[0]}+neurons:4@{hooks[1]}"], False, "cpu")
    names = [v.name for v in variants]
    assert names == ["clean", "pca:4@0.resid_post", "neurons:4@2.resid_post",
                     "pca:4@0.resid_post+neurons:4@2.resid_post"]
    tokens = torch.randint(0, 97, (4, 12))
    out = ce.evaluate(tiny_hooked, variants, tokens, 2, tokens, 20)
    recs = {r["variant"]: r for r in out.records}
    joint = recs[names[3]]
    assert joint["hooks"] == hooks
    assert recs["zero@0.resid_post+zero@2.resid_post"]["ce_spliced"] == joint["ce_zero"]
    assert joint["l0"] == pytest.approx(8.0)  # 4 PCA latents + 4 neurons per token
    # The single-hook variants have their own single-hook baselines.
    assert recs[names[1]]["ce_zero"] == recs["zero@0.resid_post"]["ce_spliced"]
