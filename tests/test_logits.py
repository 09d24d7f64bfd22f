"""Logits a chunk of positions at a time (harness/model/logits.py): the same numbers as the unchunked
log-softmax at 1e-6, a budget too small for one position refused in one line, and the issue's
262k-vocabulary CE run inside 6 GiB of resident memory."""

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.evals import ce
from harness.model import logits
from harness.model.loading import load_model
from harness.errors import UserError
from harness.splice.session import prepare


def test_chunked_stats_equal_the_unchunked_log_softmax():
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 3, 11, 16, 997
    W = torch.randn(V, d, generator=g) / d**0.5  # logits of a few units, as a trained head gives
    head = lambda h: h @ W.T
    clean = torch.randn(B, T, d, generator=g)
    variants = [clean + 0.3 * torch.randn(B, T, d, generator=g) for _ in range(2)]
    targets = torch.randint(0, V, (B, T), generator=g)
    budget = 7 * V * 4 * logits.LIVE_TENSORS  # 7 positions a chunk: 33 positions in 5 chunks
    s_c, s_v = logits.chunked_stats(head, clean, variants, targets, budget, vocab=V)

    lp_c = F.log_softmax(head(clean), -1)
    nll_c = -lp_c.gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(s_c.nll, nll_c, atol=1e-6, rtol=1e-6)
    top = lp_c.topk(3, -1)
    assert torch.equal(s_c.top_ids.long(), top.indices)
    assert torch.allclose(s_c.top_p, top.values.exp(), atol=1e-6, rtol=1e-6)
    for h, s in zip(variants, s_v):
        lp_v = F.log_softmax(head(h), -1)
        nll_v = -lp_v.gather(-1, targets[..., None])[..., 0]
        kl = (lp_c.exp() * (lp_c - lp_v)).sum(-1)
        assert torch.allclose(s.nll, nll_v, atol=1e-6, rtol=1e-6)
        assert torch.allclose(s.kl, kl, atol=1e-6, rtol=1e-6)
        assert s.kl.abs().max() > 1e-3  # the variants really differ from the clean model


def test_a_budget_below_one_position_is_refused():
    with pytest.raises(UserError, match="too small for one position"):
        logits.positions_per_chunk(49152, 1000)


@pytest.mark.parametrize("model", ["random:1x64"])
def test_ce_suite_is_the_same_at_any_budget(embedded_dir, model):
    """One position a chunk against every position in one chunk (the unchunked computation)."""
    session = prepare(model, ["pca:4@blocks.0.hook_resid_post", "zero@blocks.0.hook_resid_post"], ctx=32,
                      calib_seqs=4, batch_size=4)
    lm = session.lm
    V = int(lm.model.cfg.d_vocab)
    tokens = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    run = lambda budget: ce.evaluate(lm, session.variants, tokens, 4, session.calib_tokens, n_boot=10,
                                     logits_budget=budget)
    tiny, whole = run(V * 4 * logits.LIVE_TENSORS), run(4 * 32 * V * 4 * logits.LIVE_TENSORS)
    for a, b in zip(tiny.records, whole.records):
        for key, value in a.items():
            if isinstance(value, float) and np.isfinite(value):
                assert abs(value - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (a["sae"], key, value, b[key])
    for name in tiny.per_token_dce:
        assert np.allclose(tiny.per_token_dce[name], whole.per_token_dce[name], atol=1e-6, equal_nan=True)


@pytest.mark.slow
def test_ce_at_a_262k_vocabulary_stays_under_6_gib(embedded_dir, tmp_path):
    """The issue's command, in its own process so that its peak resident memory is its own; the
    clean per-token losses of its first sequence equal a plain full-vocabulary log-softmax."""
    model, out = "random:2x256:v262144", tmp_path / "ce"
    cmd = [sys.executable, "-m", "harness", "ce", "--model", model, "--dataset", "builtin", "--tokens", "8192",
           "--ctx", "1024", "--batch-size", "8", "--sae", "pca:8@blocks.1.hook_resid_post", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    assert peak < 6 * 2**30, f"peak resident memory {peak / 2**30:.2f} GiB"

    lm = load_model(model)
    tokens = torch.from_numpy(np.load(out / "tokens.npy"))[:1, :256].long()
    with torch.no_grad():
        lp = F.log_softmax(lm.model(tokens).float(), -1)
    nll = -lp[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0].numpy()
    ours = np.load(out / "per_token_dce.npz")["clean"][0, :255]
    keep = np.isfinite(ours)
    assert keep.sum() >= 250
    assert np.allclose(ours[keep], nll[keep], atol=1e-5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics  # the run wrote its metrics


def test_a_gpu_index_past_the_last_gpu_and_bfloat16_without_support_are_one_line(monkeypatch):
    """What a machine with 2 GPUs (the second without bfloat16) answers; torch's own device
    queries are replaced so that the check runs on a CPU-only machine."""
    from harness.model.loading import check_device, check_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    check_device("cuda:1")
    with pytest.raises(UserError, match="has 2 CUDA GPU"):
        check_device("cuda:3")
    with pytest.raises(UserError, match="cuda:N"):
        check_device("cuda:x")
    with pytest.raises(UserError, match="does not support bfloat16"):
        check_dtype("cuda:1", "bfloat16")
    check_dtype("cpu", "bfloat16")


def test_cli_bad_budget_and_device_are_one_line(embedded_dir, tmp_path):
    from typer.testing import CliRunner

    from harness.cli.app import app

    base = ["ce", "--model", "random:1x64", "--tokens", "64", "--ctx", "32", "--sae", "zero@blocks.0.hook_resid_post",
            "--dataset", "builtin", "--out", str(tmp_path / "out")]
    for extra, message in ((["--logits-budget", "0"], "positive number of MiB"),
                           (["--logits-budget", "1"], "too small for one position"),
                           (["--device", "cuda:3"], "--device cuda:3")):
        result = CliRunner().invoke(app, base + extra)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not (tmp_path / "out").exists()
