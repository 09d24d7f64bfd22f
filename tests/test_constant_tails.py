"""Zero / mean ablations spliced at every position run their tail on one position
(Splicer.constant_tail); every metric equals the full computation."""

import pytest
import torch

from harness.evals import ce
from harness.splice.session import prepare
from harness.splice.splicer import Splicer


def _tokens(lm, n, ctx, seed):
    g = torch.Generator().manual_seed(seed)
    low = max(lm.special_ids()) + 1
    return torch.randint(low, int(lm.model.cfg.d_vocab), (n, ctx), generator=g)


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"])
def test_constant_tails_equal_full_tails(tiny_hf_dir, hook):
    session = prepare(str(tiny_hf_dir), [f"pca:4@{hook}"], ctx=16, calib_seqs=4)
    lm = session.lm
    tokens, calib = _tokens(lm, 8, 16, 0), _tokens(lm, 4, 16, 1)
    kw = dict(batch_size=4, calib_tokens=calib, n_boot=50, keep_first=False)
    fast = ce.evaluate(lm, session.variants, tokens, constant_tails=True, **kw)
    slow = ce.evaluate(lm, session.variants, tokens, constant_tails=False, **kw)
    names = [r["variant"] for r in fast.records]
    assert any(n.startswith("zero@") for n in names) and any(n.startswith("mean@") for n in names)
    for a, b in zip(fast.records, slow.records):
        for key in ("ce_spliced", "ce_zero", "ce_mean", "dce", "kl", "loss_recovered_zero",
                    "loss_recovered_mean", "explained_variance"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5, nan_ok=True), (a["variant"], key)
    for key in fast.per_token_top3:
        if key.endswith(".ids"):
            assert (fast.per_token_top3[key] == slow.per_token_top3[key]).mean() > 0.99, key


def test_constant_tail_is_one_position_and_checked(tiny_hf_dir):
    session = prepare(str(tiny_hf_dir), ["mean@blocks.0.hook_resid_post"], ctx=16, calib_seqs=4)
    lm = session.lm
    splicer = Splicer(lm, ["blocks.0.hook_resid_post"], keep_first=False)
    variant = session.variants[1]
    tokens = _tokens(lm, 2, 16, 0)
    outs = dict((v.name if v else "clean", o) for v, o in
                splicer.run_variants(tokens, [variant], hidden=True, constant_tails=True))
    assert outs[variant.name].shape[:2] == (1, 1) and splicer._constant_ok is True
    full = dict((v.name if v else "clean", o) for v, o in splicer.run_variants(tokens, [variant], hidden=True))
    assert torch.allclose(full[variant.name], outs[variant.name].expand_as(full[variant.name]), atol=1e-5)
    # position 0 kept (the default): not constant, the full tail runs
    kept = Splicer(lm, ["blocks.0.hook_resid_post"])
    outs = dict((v.name if v else "clean", o) for v, o in kept.run_variants(tokens, [variant], hidden=True,
                                                                             constant_tails=True))
    assert outs[variant.name].shape[:2] == (2, 16)
