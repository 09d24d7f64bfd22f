"""Explainability (harness/evals/interp.py): a planted latent is explained exactly, a random one is
not, the records are what a plain loop finds, and sparse probing is an independent
scikit-learn fit."""

import numpy as np
import pytest
import torch

from harness.evals import interp
from harness.text import sources
from harness.errors import UserError
from harness.splice.replacements import from_sae
from harness.splice.session import prepare

PRE = "blocks.0.hook_resid_pre"  # a Llama's token embedding
DEEP = "blocks.3.hook_resid_post"


def _relu_sae(w_enc: torch.Tensor, b_enc: torch.Tensor, hook: str):
    """A hand-made ReLU SAE (sae-lens StandardSAE) with the given encoder rows [d_sae, d_in]."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_sae, d_in = w_enc.shape
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu",
                                        apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=hook, model_name="tiny")))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc.T)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_enc)
        sae.b_dec.zero_()
    return from_sae("planted", f"planted@{hook}", sae, {})


@pytest.fixture(scope="module")
def text(tiny_hf_dir):
    session = prepare(str(tiny_hf_dir), ctx=32, text=sources.TextRequest(sources.BUILTIN), eval_seqs=64)
    return session.lm, session.tokens


def test_planted_token_latent_is_explained_by_its_token(text):
    lm, tokens = text
    ids, counts = torch.unique(tokens[:, 1:], return_counts=True)
    target = int(ids[counts.argmax()])  # the most frequent token of the text
    emb = lm.model.original_model.get_input_embeddings().weight.detach() if lm.kind == "bridge" else lm.model.W_E
    e = emb[target] / emb[target].norm() ** 2  # e . emb[target] = 1
    others = emb[torch.unique(tokens)] @ e
    others = others[torch.unique(tokens) != target]
    assert others.max() < 0.9  # the planted latent can separate the token
    sae = _relu_sae(e[None], torch.tensor([-(1 + float(others.max())) / 2]), PRE)
    rec = interp.collect(lm, sae, tokens, batch_size=8, seed=0)
    out = interp.explain(rec, 0, tokens.numpy())
    assert out["terms"] == [[target]]
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["f1"] == 1.0
    assert out["recall_w"] == pytest.approx(1.0) and out["precision_w"] == pytest.approx(1.0)
    # its firing rate is the token's share of the positions the splice covers
    covered = tokens[:, 1:][~torch.isin(tokens[:, 1:], torch.tensor(lm.special_ids()))]
    assert out["firing_rate"] == pytest.approx(float((covered == target).float().mean()), rel=1e-6)


@pytest.mark.slow
def test_random_direction_latents_score_near_their_base_rate():
    """Random directions of the embedded model's layer-15 residual: their n-gram explanations
    predict firing barely better than the firing rate itself, and explain little of it."""
    session = prepare("smollm2-135m", ctx=64, text=sources.TextRequest(sources.BUILTIN), eval_seqs=64)
    lm, tokens = session.lm, session.tokens
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, lm.d_model, generator=g)
    sae = _relu_sae(w / w.norm(dim=1, keepdim=True), torch.zeros(16), "blocks.15.hook_resid_post")
    rec = interp.collect(lm, sae, tokens, batch_size=8, seed=0)
    outs = [interp.explain(rec, j, tokens.numpy()) for j in rec.live()]
    assert len(outs) >= 12
    assert abs(np.mean([o["precision"] - o["firing_rate"] for o in outs])) < 0.25
    assert np.mean([o["f1"] for o in outs]) < 0.3


def test_records_match_a_plain_loop(text):
    """Firing counts, the strongest positions and the sampled positions' values against the
    latents of every position computed at once."""
    lm, tokens = text
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, lm.d_model, generator=g)
    sae = _relu_sae(w / w.norm(dim=1, keepdim=True), torch.full((6,), -0.2), DEEP)
    rec = interp.collect(lm, sae, tokens, batch_size=8, seed=0, top_k=4, sample=8)
    acts = {}
    with torch.no_grad(), lm.model.hooks(fwd_hooks=[(DEEP, lambda x, hook: acts.setdefault("x", x))]):
        lm.model(tokens)
    with torch.no_grad():
        lat = sae.sae.encode(acts["x"]).numpy()  # [n, ctx, 6]
    lat[:, 0] = -np.inf  # position 0 is never spliced, nor recorded, nor are special tokens
    lat[torch.isin(tokens, torch.tensor(lm.special_ids())).numpy()] = -np.inf
    flat = lat.reshape(-1, 6)
    rows = np.repeat(np.arange(len(tokens)), tokens.shape[1])
    valid = np.isfinite(flat[:, 0])
    for s in range(2):
        part = valid & (rows % 2 == s)
        assert (rec.fires[s] == (flat[part] > 0).sum(0)).all()  # (-inf rows are outside `part`)
        assert rec.n_positions[s] == part.sum()
        for j in range(6):
            idx = rec.fire_index[s][j][rec.fire_index[s][j] >= 0]
            assert len(idx) == min(8, (flat[part, j] > 0).sum())
            assert np.allclose(flat[idx, j], rec.fire_value[s][j][rec.fire_index[s][j] >= 0], atol=1e-5)
            assert (rows[idx] % 2 == s).all() and (flat[idx, j] > 0).all()
            q = rec.quiet_index[s][j][rec.quiet_index[s][j] >= 0]
            assert (flat[q, j] <= 0).all() and (rows[q] % 2 == s).all()
    for j in range(6):
        top = np.sort(flat[valid, j])[::-1][:4]
        assert np.allclose(rec.top_value[j], top, atol=1e-5)
        assert np.allclose(flat[rec.top_index[j], j], top, atol=1e-5)


def test_sparse_probing_is_an_independent_sklearn_fit():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    X = rng.normal(size=(120, 40))
    X[:, 7] += (labels == 2) * 2.0  # one informative feature for class 2
    ours = interp.sparse_probing(X, labels, ks=(1, 5), seed=0)
    accs = []
    for tr, y_tr, te, y_te in interp.binary_tasks(labels, 0):
        diff = np.abs(X[tr][y_tr == 1].mean(0) - X[tr][y_tr == 0].mean(0))
        cols = np.argsort(-diff, kind="stable")[:5]
        scaler = StandardScaler().fit(X[tr][:, cols])
        clf = LogisticRegression(max_iter=2000, random_state=0).fit(scaler.transform(X[tr][:, cols]), y_tr)
        accs.append((clf.predict(scaler.transform(X[te][:, cols])) == y_te).mean())
    assert ours["5"] == pytest.approx(np.mean(accs), abs=1e-12)
    tasks = interp.binary_tasks(labels, 0)
    tr, y_tr = tasks[2][0], tasks[2][1]
    assert interp.select_by_mean_difference(X[tr], y_tr, 1)[0] == 7
    with pytest.raises(UserError, match="two classes"):
        interp.sparse_probing(X, np.zeros(120, int))


def test_too_few_live_latents_is_refused(text):
    lm, tokens = text
    sae = _relu_sae(torch.randn(3, lm.d_model), torch.full((3,), -1e6), DEEP)  # never fires
    rec = interp.collect(lm, sae, tokens, batch_size=8)
    with pytest.raises(UserError, match="0 live latents"):
        interp.sample_latents(rec, 2, 0, "planted")


def test_interp_command_on_a_run_folder(tiny_hf_dir, tmp_path):
    """`sae-harness interp RUN`: the table for every single SAE and baseline, beside the run's
    own L0 and dCE, the frontier figure in the redrawn report; bad input writes nothing."""
    import json

    from typer.testing import CliRunner

    from conftest import make_topk_sae
    from harness.cli.app import app

    sae = tmp_path / "sae"
    make_topk_sae(32, 64, 4, DEEP, str(tiny_hf_dir)).save_model(sae)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--sae", f"pca:4@{DEEP}",
                                   "--sae", f"neurons:4@{DEEP}", "--dataset", "builtin", "--tokens", "256",
                                   "--ctx", "32", "--out", str(run)])
    assert res.exit_code == 0, res.stderr
    args = ["interp", str(run), "--tokens", "1024", "--probe-questions", "12"]
    bad = CliRunner().invoke(app, [*args, "--latents", "500"])  # more than the SAE's 64
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.exit_code == 2 and len(errors) == 1 and "live latents" in errors[0]
    assert bad.stderr.splitlines()[-1] == errors[0]  # progress lines before it, nothing after
    assert not (run / "interp.json").exists() and not list(tmp_path.glob(".run.interp*"))
    res = CliRunner().invoke(app, [*args, "--latents", "4"])
    assert res.exit_code == 0, res.stderr
    details = json.loads((run / "interp.json").read_text())
    metrics = {m["variant"]: m for m in json.loads((run / "metrics.json").read_text())}
    assert len(details["variants"]) == 3 and set(details["variants"]) <= set(metrics)
    for name, row in details["variants"].items():
        assert row["dce"] == metrics[name]["dce"] and row["l0"] == metrics[name]["l0"]
        assert row["n_latents"] == 4 and 0 <= row["f1"]["low"] <= row["f1"]["mean"] <= row["f1"]["high"] <= 1
        assert set(row["probing"]) == {"1", "2", "5", "20", "all"}
    assert (run / "frontier.png").is_file() and (run / "interp.md").is_file()
    page = (run / "report.html").read_text()
    assert "Explainability against fidelity" in page and "(e) Fidelity against explainability" in page
