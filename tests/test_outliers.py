"""Massive-activation detection and the metrics split on it, against plain PyTorch."""

import copy

import numpy as np
import pytest
import torch

from conftest import make_topk_sae
from harness.evals import ce
from harness.evals import outliers
from harness.evals.ce import HookStats
from harness.splice.replacements import from_sae
from harness.splice.variants import Variant

HOOK = "blocks.1.hook_resid_post"


def test_detect_finds_exactly_the_planted_outliers():
    torch.manual_seed(0)
    norms = 100 + 20 * torch.rand(6, 50)
    planted = [(1, 3), (4, 7), (5, 49)]
    for r, c in planted:
        norms[r, c] = 3000.0
    norms[0, 0] = 1e6  # huge but outside the set: never reported
    in_set = torch.ones(6, 50, dtype=torch.bool)
    in_set[:, 0] = False
    mask, median = outliers.detect(norms, in_set, 10.0)
    values = np.sort(norms[in_set].numpy().astype(np.float64))
    mid = len(values) // 2  # 294 values: the median is the mean of the two middle ones
    assert median == pytest.approx((values[mid - 1] + values[mid]) / 2)
    assert sorted(map(tuple, mask.nonzero().tolist())) == planted
    # A factor above the outliers' ratio finds nothing; a factor below 1 finds half the set.
    assert not outliers.detect(norms, in_set, 40.0)[0].any()
    assert int(outliers.detect(norms, in_set, 0.999)[0].sum()) > len(values) // 2
    with pytest.raises(ValueError, match="factor must be positive"):
        outliers.detect(norms, in_set, 0.0)


def _stats(x, x_hat):
    s = HookStats()
    s.add(x, x_hat, None)
    return s


def test_variance_share_and_robust_ev_against_plain_sums():
    """Two hooks, pooled: share of the variance around the full mean, EV without the outliers."""
    torch.manual_seed(1)
    truth = {"share_num": 0.0, "share_den": 0.0, "sq_rest": 0.0, "var_rest": 0.0}
    all_stats, massive_stats = {}, {}
    for hook, planted in (("a", [3, 17]), ("b", [40])):
        x = torch.randn(64, 8, dtype=torch.float64) * 2 + 1
        x[planted] = 300 * torch.randn(len(planted), 8, dtype=torch.float64)
        x_hat = x + 0.3 * torch.randn_like(x)
        x_hat[planted] += 25.0  # reconstructed worse in absolute terms, better relative to their size
        is_m = torch.zeros(64, dtype=torch.bool)
        is_m[planted] = True
        all_stats[hook], massive_stats[hook] = _stats(x, x_hat), _stats(x[is_m], x_hat[is_m])
        centred = x - x.mean(0)
        truth["share_num"] += float((centred[is_m] ** 2).sum())
        truth["share_den"] += float((centred ** 2).sum())
        rest, rest_hat = x[~is_m], x_hat[~is_m]
        truth["sq_rest"] += float(((rest - rest_hat) ** 2).sum())
        truth["var_rest"] += float(((rest - rest.mean(0)) ** 2).sum())
    got = outliers.reconstruction_split(all_stats, massive_stats)
    assert got["massive_var_share"] == pytest.approx(truth["share_num"] / truth["share_den"], rel=1e-9)
    assert got["massive_var_share"] > 0.9  # three vectors of sixty-four hold almost all the variance
    assert got["explained_variance_robust"] == pytest.approx(1 - truth["sq_rest"] / truth["var_rest"], rel=1e-9)
    # No outliers: the robust EV is the plain one and the share is zero.
    plain = outliers.reconstruction_split({"a": all_stats["a"]}, {})
    s = all_stats["a"]
    assert plain["explained_variance_robust"] == pytest.approx(1 - s.sq_err / s.total_variance(), rel=1e-12)
    assert plain["massive_var_share"] == 0.0


@pytest.fixture(scope="module")
def loud_model(tiny_hooked):
    """The tiny model with token 5's embedding scaled 400x: every position holding token 5
    carries a residual norm far above the rest, a planted massive activation."""
    lm = copy.deepcopy(tiny_hooked)
    with torch.no_grad():
        lm.model.W_E[5] *= 400.0
    return lm


def _tokens():
    torch.manual_seed(2)
    tokens = torch.randint(6, 97, (6, 20))
    tokens[0, 4] = tokens[2, 9] = tokens[3, 1] = tokens[5, 12] = 5
    tokens[1, 0] = 5  # position 0: never spliced, never massive
    tokens[4, 19] = 5  # last position: predicts nothing, not in T
    return tokens


def test_ce_records_split_on_massive_positions(loud_model):
    """Count, variance share, EV with and without, dCE / KL on them vs elsewhere: plain hooks."""
    model = loud_model.model
    tokens = _tokens()
    sae = from_sae("tiny", "tiny", make_topk_sae(32, 64, 4, HOOK, "tiny-hooked"), {})
    out = ce.evaluate(loud_model, [Variant("clean", {}), Variant("tiny", {HOOK: sae})], tokens, batch_size=4,
                      calib_tokens=tokens, n_boot=20)
    rec = out.by_variant()["tiny"]
    planted = [[0, 4], [2, 9], [3, 1], [5, 12]]
    assert out.massive["hooks"][HOOK]["positions"] == planted
    assert out.massive["factor"] == 10.0 and out.massive["excluded"] is False

    splice = torch.ones_like(tokens, dtype=torch.bool)
    splice[:, 0] = False  # position 0 is left alone
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        x = cache[HOOK]
        x_hat = sae.sae.decode(sae.sae.encode(x))
        logp_clean = torch.log_softmax(model(tokens)[:, :-1].double(), -1)
        logp_sae = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(
            HOOK, lambda a, hook: torch.where(splice[..., None], x_hat, a))])[:, :-1].double(), -1)
    norms = x.norm(dim=-1)
    in_set = splice.clone()
    in_set[:, -1] = False
    med = norms[in_set].median()  # the set has an even size, so compare with a gap, not exact ties
    is_m = in_set & (norms > 10 * med)
    assert sorted(is_m.nonzero().tolist()) == planted
    assert rec["n_massive"] == 4

    xs, xhs, m = x[in_set].double(), x_hat[in_set].double(), is_m[in_set]
    centred = xs - xs.mean(0)
    share = float((centred[m] ** 2).sum() / (centred ** 2).sum())
    ev = 1 - float(((xs - xhs) ** 2).sum() / (centred ** 2).sum())
    rest, rest_hat = xs[~m], xhs[~m]
    ev_rest = 1 - float(((rest - rest_hat) ** 2).sum() / ((rest - rest.mean(0)) ** 2).sum())
    assert rec["massive_var_share"] == pytest.approx(share, rel=1e-6)
    assert share > 0.5
    assert rec["explained_variance"] == pytest.approx(ev, abs=1e-6)
    assert rec["explained_variance_robust"] == pytest.approx(ev_rest, abs=1e-6)
    assert abs(ev - ev_rest) > 0.05  # the two really part here

    targets = tokens[:, 1:, None]
    dce = (logp_clean.gather(-1, targets) - logp_sae.gather(-1, targets))[..., 0]
    kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)
    on, off = is_m[:, :-1], ~is_m[:, :-1]  # every predicted position is in T (no special tokens)
    assert rec["dce_massive"] == pytest.approx(float(dce[on].mean()), abs=1e-5)
    assert rec["dce_rest"] == pytest.approx(float(dce[off].mean()), abs=1e-5)
    assert rec["kl_massive"] == pytest.approx(float(kl[on].mean()), abs=1e-5)
    assert rec["kl_rest"] == pytest.approx(float(kl[off].mean()), abs=1e-5)
    assert rec["dce"] == pytest.approx(float(dce.mean()), abs=1e-5)


def test_exclude_massive_treats_them_like_position_zero(loud_model):
    """Not spliced, not in T, for every variant and baseline: CE, KL and EV recomputed by hand."""
    model = loud_model.model
    tokens = _tokens()
    sae = from_sae("tiny", "tiny", make_topk_sae(32, 64, 4, HOOK, "tiny-hooked", seed=4), {})
    out = ce.evaluate(loud_model, [Variant("clean", {}), Variant("tiny", {HOOK: sae})], tokens, batch_size=4,
                      calib_tokens=tokens, n_boot=20, exclude_massive=True)
    recs = out.by_variant()
    rec = recs["tiny"]
    assert out.massive["excluded"] is True
    dropped = torch.zeros_like(tokens, dtype=torch.bool)
    for r, c in ([0, 4], [2, 9], [3, 1], [5, 12]):
        dropped[r, c] = True
    splice = ~dropped
    splice[:, 0] = False
    keep_t = ~dropped[:, :-1]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=HOOK)
        x = cache[HOOK]
        x_hat = sae.sae.decode(sae.sae.encode(x))

        def ce_of(replacement):
            fwd = [(HOOK, lambda a, hook: torch.where(splice[..., None], replacement(a), a))] if replacement else []
            logp = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=fwd)[:, :-1].double(), -1)
            return float(-logp.gather(-1, tokens[:, 1:, None])[..., 0][keep_t].mean()), logp
        ce_clean, logp_clean = ce_of(None)
        ce_sae, logp_sae = ce_of(lambda a: x_hat)
        ce_zero, _ = ce_of(torch.zeros_like)
    kl = (logp_clean.exp() * (logp_clean - logp_sae)).sum(-1)[keep_t].mean()
    stat = splice.clone()
    stat[:, -1] = False
    xs, xhs = x[stat].double(), x_hat[stat].double()
    ev = 1 - float(((xs - xhs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())
    assert rec["n_tokens"] == 6 * 19 - 4
    assert rec["ce_clean"] == pytest.approx(ce_clean, abs=1e-5)
    assert rec["ce_spliced"] == pytest.approx(ce_sae, abs=1e-5)
    assert rec["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)
    assert rec["kl"] == pytest.approx(float(kl), abs=1e-5)
    assert rec["explained_variance"] == pytest.approx(ev, abs=1e-6)
    assert rec["explained_variance_robust"] == pytest.approx(ev, abs=1e-12)
    assert rec["n_massive"] == 4 and rec["massive_var_share"] == 0.0
    assert np.isnan(rec["dce_massive"]) and np.isnan(rec["kl_massive"])
    assert np.isnan(out.per_token_dce["tiny"][dropped[:, :-1].numpy()]).all()


def test_no_detection_without_a_factor(loud_model):
    tokens = _tokens()
    sae = from_sae("tiny", "tiny", make_topk_sae(32, 64, 4, HOOK, "tiny-hooked"), {})
    variants = [Variant("clean", {}), Variant("tiny", {HOOK: sae})]
    out = ce.evaluate(loud_model, variants, tokens, 4, tokens, 20, massive_factor=None)
    rec = out.by_variant()["tiny"]
    assert out.massive is None and np.isnan(rec["n_massive"])
    assert np.isnan(rec["explained_variance_robust"])
    with pytest.raises(ce.UserError, match="excluding massive activations needs their detection"):
        ce.evaluate(loud_model, variants, tokens, 4, tokens, 20, massive_factor=None, exclude_massive=True)


def test_massive_in_sequences_of_any_length(loud_model):
    """Prompts of different lengths: pooled median, (sequence, position) of each planted token."""
    seqs = [[7, 8, 5, 9], [5, 11, 12, 13, 14, 5, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    got = outliers.massive_in_sequences(loud_model, [HOOK], seqs)[HOOK]
    norms = []
    with torch.no_grad():
        for s in seqs:
            _, cache = loud_model.model.run_with_cache(torch.tensor([s]), names_filter=HOOK)
            norms.append(cache[HOOK][0, 1:].norm(dim=-1))  # position 0 is never spliced
    assert got["median_norm"] == pytest.approx(float(np.median(torch.cat(norms).double().numpy())), rel=1e-6)
    assert got["positions"] == [[0, 2], [1, 5]] and got["count"] == 2 and got["n_positions"] == 17
    assert got["max_norm"] == pytest.approx(float(torch.cat(norms).max()), rel=1e-6)


def test_cli_records_the_option_and_shows_robust_ev(tiny_hf_dir, tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("COLUMNS", "400")  # a terminal wide enough for every column of the CE table

    from typer.testing import CliRunner

    from harness.cli.app import app

    args = ["ce", "--model", str(tiny_hf_dir), "--sae", "pca:4@blocks.1.hook_resid_post", "--dataset", "builtin", "--tokens", "64",
            "--ctx", "16"]
    bad = CliRunner().invoke(app, [*args, "--massive-factor", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --massive-factor must be positive, got 0.0"
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "run"
    result = CliRunner().invoke(app, [*args, "--exclude-massive", "--massive-factor", "3", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["exclude_massive"] is True and config["run"]["massive_factor"] == 3.0
    found = config["massive"]["hooks"]["blocks.1.hook_resid_post"]
    assert config["massive"]["excluded"] is True and found["threshold"] == pytest.approx(3 * found["median_norm"])
    header = [c.strip() for c in (out / "ce.md").read_text().splitlines()[0].split("|")]
    assert header.index("EV w/o massive (n)") == header.index("EV") + 1
    csv_header = (out / "ce.csv").read_text().splitlines()[0].split(",")
    assert {"n_massive", "massive_var_share", "explained_variance_robust", "dce_massive", "kl_rest"} <= set(csv_header)
    rec = {r["variant"]: r for r in json.loads((out / "metrics.json").read_text())}["pca:4@1.resid_post"]
    assert rec["n_massive"] == found["count"]
    assert rec["explained_variance_robust"] == pytest.approx(rec["explained_variance"], abs=1e-12)
    assert "EV w/o massive (n)" in result.stdout
    page = (out / "report.html").read_text()
    assert "EV without<br>massive (n)" in page and f"{rec['explained_variance_robust']:.3f} ({found['count']})" in page


@pytest.mark.slow
def test_embedded_default_detects_the_known_massive_positions(embedded_dir):
    """SmolLM2-135M at layer 15 on main-job rows known to hold two massive activations: a plain
    transformers forward hook finds them above 10x the median norm, and the harness reports
    exactly those two positions, and the robust EV of the demo SAE from the same plain forward."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model.loading import load_model
    from harness.splice.variants import build_variants
    from harness.splice.replacements import DEMO_DIR
    from test_embedded import plain_topk_sae

    tokens = torch.tensor(np.load(Path(__file__).parent / "data" / "massive_tokens.npy"))
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    reconstruct, layer = plain_topk_sae(DEMO_DIR / "l15-w2304-k32")
    assert layer == 15
    seen = {}

    class Stop(Exception):
        pass

    def grab(module, args, out):
        seen["x"] = (out[0] if isinstance(out, tuple) else out).detach()
        raise Stop

    handle = model.model.layers[15].register_forward_hook(grab)
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    except Stop:
        pass
    finally:
        handle.remove()
    x = seen["x"]
    in_set = ~torch.isin(tokens, torch.tensor(sorted(set(tok.all_special_ids))))
    in_set[:, 0] = False
    in_set[:, -1] = False
    norms = x.norm(dim=-1)
    median = float(norms[in_set].median())
    big = (in_set & (norms > 10 * median)).nonzero().tolist()
    assert big == [[0, 1], [7, 1]]
    assert float(norms[in_set & (norms < 10 * median)].max()) < 3 * median  # a wide gap either side of 10x

    lm = load_model("smollm2-135m")
    variants, _ = build_variants(["l15-w2304-k32"], False, "cpu")
    out = ce.evaluate(lm, variants, tokens, 4, tokens, n_boot=10)
    found = out.massive["hooks"]["blocks.15.hook_resid_post"]
    assert found["positions"] == [[0, 1], [7, 1]]
    assert found["median_norm"] == pytest.approx(median, rel=1e-3)
    rec = out.by_variant()["l15-w2304-k32"]
    assert rec["n_massive"] == 2

    is_m = torch.zeros_like(in_set)
    is_m[0, 1] = is_m[7, 1] = True
    with torch.no_grad():
        xs, xhs = x[in_set].double(), reconstruct(x)[in_set].double()
    m = is_m[in_set]
    centred = xs - xs.mean(0)
    rest, rest_hat = xs[~m], xhs[~m]
    share = float((centred[m] ** 2).sum() / (centred ** 2).sum())
    ev = 1 - float(((xs - xhs) ** 2).sum() / (centred ** 2).sum())
    ev_rest = 1 - float(((rest - rest_hat) ** 2).sum() / ((rest - rest.mean(0)) ** 2).sum())
    assert rec["massive_var_share"] == pytest.approx(share, abs=1e-4)
    assert rec["explained_variance"] == pytest.approx(ev, abs=1e-4)
    assert rec["explained_variance_robust"] == pytest.approx(ev_rest, abs=1e-4)
    assert ev - ev_rest > 0.05  # two positions of ~1,000 lift the EV visibly
