"""Splices that branch above the first splice layer, against a plain transformers forward.

With SAEs at the outputs of blocks 1 and 3 of a tiny 4-layer Llama, the block-1 variants splice
the shared residual entering block 2 and replay blocks 2-3, while the block-3 variant (the "l22
SAE when l15 is also spliced" of the main job) splices `Splicer.advance`'s residual after the last
block and runs only the final norm and head, and the joint splice carries the block-1
replacement into block 3. Every number is recomputed with an ordinary LlamaForCausalLM loaded
from the same folder, forward hooks on its decoder layers, and the TopK SAE written out by hand
(tests/plain_hf.py): logits, CE, KL, explained variance (pooled over hooks for the joint
splice), L0 and the dead-latent fraction, with special tokens in the middle of the rows.
"""

import numpy as np
import pytest
import torch

import plain_hf
from conftest import make_topk_sae
from harness.evals import ce
from harness.splice.replacements import from_sae
from harness.splice.splicer import Splicer
from harness.splice.variants import Variant

LOW, HIGH = 1, 3
HOOKS = {LOW: f"blocks.{LOW}.hook_resid_post", HIGH: f"blocks.{HIGH}.hook_resid_post"}


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saes(tiny_hf_dir):
    """Two TopK SAEs (64 latents, k=4); the first 8 latents of each can never fire, so the
    dead fraction is not 0, and the rest of it depends on the tokens."""
    out = {}
    for layer, hook in HOOKS.items():
        raw = make_topk_sae(32, 64, 4, hook, str(tiny_hf_dir), seed=10 + layer)
        with torch.no_grad():
            raw.b_enc[:8] = -1e3
        out[layer] = raw
    return out


@pytest.fixture(scope="module")
def variants(saes):
    repl = {layer: from_sae(f"sae{layer}", f"sae{layer}", raw, {}) for layer, raw in saes.items()}
    return [Variant("clean", {}),
            Variant("low", {HOOKS[LOW]: repl[LOW]}),
            Variant("high", {HOOKS[HIGH]: repl[HIGH]}),
            Variant("joint", {HOOKS[LOW]: repl[LOW], HOOKS[HIGH]: repl[HIGH]})]


def _tokens(tok, n=6, ctx=16, seed=0):
    """Random ordinary tokens, with BOS at the start of some rows and EOS/pad inside others."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 2000, (n, ctx), generator=g)
    tokens[::2, 0] = tok.bos_token_id
    tokens[1, 5] = tok.eos_token_id
    tokens[-1, 9] = tok.eos_token_id
    tokens[-2, 2] = tok.pad_token_id
    return tokens


SPLICES = {"clean": (), "low": (LOW,), "high": (HIGH,), "joint": (LOW, HIGH)}


def _reference(hf, saes, tokens, special):
    """Per variant: logits and what each hook saw, from the plain model."""
    out = {}
    for name, layers in SPLICES.items():
        record = {}
        splices = {layer: plain_hf.topk_reconstruct(saes[layer]) for layer in layers}
        logits = plain_hf.forward(hf, tokens, splices, special, record)
        out[name] = (logits, record)
    return out


def test_branch_points_equal_plain_hidden_states(tiny_hf, hf):
    """The residual entering each branch layer, after `advance`, is the plain model's hidden state
    there (hidden_states[L] is the input of decoder layer L; after the last block, the final
    norm's input), with left padding on one row."""
    tokens = torch.randint(3, 2000, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[2, :3] = 0
    splicer = Splicer(tiny_hf, [HOOKS[LOW], "blocks.2.hook_resid_post", HOOKS[HIGH]])
    points = splicer.branch_points(tokens, mask)
    assert sorted(points) == [LOW + 1, 3, HIGH + 1]  # resid_post at L: the residual entering L+1
    seen = []
    handle = hf.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        hidden = hf(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states
    handle.remove()
    hidden = list(hidden[:HIGH + 1]) + seen
    for layer, pre in points.items():
        assert pre.layer == layer
        torch.testing.assert_close(pre.resid[mask.bool()], hidden[layer][mask.bool()], rtol=0, atol=1e-5)


def test_hooked_branch_points_equal_resid_pre(tiny_hooked):
    """Same on a HookedTransformer: `advance` uses start_at_layer/stop_at_layer (block 2 is the
    last: its output is the residual before the final norm)."""
    model = tiny_hooked.model
    tokens = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(2))
    splicer = Splicer(tiny_hooked, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"])
    points = splicer.branch_points(tokens)
    _, cache = model.run_with_cache(tokens)
    assert sorted(points) == [1, 3]
    for layer in (0, 2):
        torch.testing.assert_close(points[layer + 1].resid, cache[f"blocks.{layer}.hook_resid_post"], rtol=0, atol=1e-5)


def test_every_variant_logits_equal_plain_hooks(tiny_hf, hf, saes, variants):
    tokens = _tokens(tiny_hf.tokenizer)
    special = tiny_hf.special_ids()
    ref = _reference(hf, saes, tokens, special)
    splicer = Splicer(tiny_hf, sorted(HOOKS.values()))
    assert splicer.layers == [LOW + 1, HIGH + 1]
    seen = {}
    for v, logits in splicer.run_variants(tokens, variants[1:]):
        seen[v.name if v else "clean"] = logits
    assert splicer.variant_layer(variants[2]) == HIGH + 1  # the block-3 variant branches after block 3
    for name, (want, _) in ref.items():
        torch.testing.assert_close(seen[name], want, rtol=0, atol=1e-5, msg=name)
    # the splices do change the output, so the comparison has teeth
    for name in ("low", "high", "joint"):
        assert (seen[name] - seen["clean"]).abs().max() > 1e-2, name
    assert (seen["joint"] - seen["low"]).abs().max() > 1e-2


def _hand_metrics(ref, tokens, special, layers):
    """CE, KL, pooled EV, summed L0 and dead fraction of one variant, by hand."""
    logits_clean, _ = ref["clean"]
    logits, record = ref[layers]
    keep = ~torch.isin(tokens[:, :-1], torch.tensor(special, dtype=torch.long))  # T: non-special input tokens
    at = plain_hf.splice_positions(tokens, special)[:, :-1] & keep  # statistics: where the splice applies, in T
    nll_clean, nll_var = plain_hf.nll(logits_clean, tokens), plain_hf.nll(logits, tokens)
    lp_c = torch.log_softmax(logits_clean[:, :-1].double(), -1)
    lp_v = torch.log_softmax(logits[:, :-1].double(), -1)
    kl = (lp_c.exp() * (lp_c - lp_v)).sum(-1)
    out = {"ce_clean": nll_clean[keep].mean().item(), "ce_spliced": nll_var[keep].mean().item(),
           "kl": kl[keep].mean().item()}
    if record:
        sq = var = l0 = 0.0
        dead = total = 0
        for x, x_hat, lat in record.values():
            x, x_hat, lat = x[:, :-1][at].double(), x_hat[:, :-1][at].double(), lat[:, :-1][at]
            sq += ((x - x_hat) ** 2).sum().item()
            var += ((x - x.mean(0)) ** 2).sum().item()
            l0 += (lat != 0).sum(-1).double().mean().item()
            dead += int(((lat != 0).sum(0) == 0).sum())
            total += lat.shape[-1]
        out.update(explained_variance=1 - sq / var, l0=l0, dead_frac=dead / total)
    return out


def test_ce_suite_metrics_equal_plain_hooks(tiny_hf, hf, saes, variants):
    """ce.evaluate on the four variants (two batches) against the hand computation."""
    tok = tiny_hf.tokenizer
    tokens = _tokens(tok)
    special = tiny_hf.special_ids()
    ref = _reference(hf, saes, tokens, special)
    out = ce.evaluate(tiny_hf, variants, tokens, batch_size=4, calib_tokens=tokens, n_boot=20)
    recs = out.by_variant()
    assert out.n_tokens == int((~torch.isin(tokens[:, :-1], torch.tensor(special))).sum())
    for name in ("low", "high", "joint"):
        want = _hand_metrics(ref, tokens, special, name)
        rec = recs[name]
        for key in ("ce_clean", "ce_spliced", "kl", "explained_variance"):
            assert rec[key] == pytest.approx(want[key], abs=2e-5), (name, key)
        assert rec["l0"] == pytest.approx(want["l0"], abs=1e-9), name
        assert rec["dead_frac"] == want["dead_frac"], name
        assert 8 / 64 <= rec["dead_frac"] < 1
    # the joint figures are not one SAE's figures: L0 adds up, EV is pooled over the two hooks
    assert recs["joint"]["l0"] == pytest.approx(8.0)
    ev_alone = [_hand_metrics(ref, tokens, special, n)["explained_variance"] for n in ("low", "high")]
    assert all(abs(recs["joint"]["explained_variance"] - e) > 1e-3 for e in ev_alone)


def test_pooled_ev_and_dead_fraction_by_hand():
    """The pooling rule itself on hand-made numbers: EV = 1 - (sum of squared errors over both
    hooks) / (sum of each hook's variance about its own mean); dead = never-active latents over
    all latents of both SAEs."""
    from harness.evals.ce import HookStats, _reconstruction

    a = HookStats()
    # hook a: x = [[0,0],[2,0]] -> variance about the mean (1,0): 1 + 1 = 2; error: 1
    a.add(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]]),
          torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    b = HookStats()
    # hook b: x = [[1],[1],[4]] (two batches) -> mean 2, variance 1 + 1 + 4 = 6; errors 0, 0, 4
    b.add(torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0, 3.0], [0.0, 0.0]]))
    b.add(torch.tensor([[4.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0, 1.0]]))
    ev, l0, dead = _reconstruction({"a": a, "b": b}, None)
    assert ev == pytest.approx(1 - (1 + 4) / (2 + 6), abs=1e-12)
    assert l0 == pytest.approx(1.0 + 2 / 3, abs=1e-12)  # a: 2 active / 2 tokens; b: 2 / 3
    assert dead == pytest.approx(2 / 5, abs=1e-12)  # a: latent 1 never fires; b: latent 0


def test_special_tokens_excluded_from_kl_and_ev(tiny_hf, hf, saes, variants):
    """KL and explained variance are averaged over T only: rows full of EOS/BOS/pad inputs give
    the same numbers as the hand computation over non-special positions, and clearly different
    ones from the same computation over every position."""
    tok = tiny_hf.tokenizer
    tokens = _tokens(tok, n=4, ctx=20, seed=5)
    tokens[:, 6:9] = tok.eos_token_id
    tokens[1, 12:15] = tok.bos_token_id
    tokens[2, 10] = tok.pad_token_id
    special = tiny_hf.special_ids()
    ref = _reference(hf, saes, tokens, special)
    out = ce.evaluate(tiny_hf, [variants[0], variants[1]], tokens, batch_size=4, calib_tokens=tokens, n_boot=10)
    rec = out.by_variant()["low"]
    want = _hand_metrics(ref, tokens, special, "low")
    assert rec["kl"] == pytest.approx(want["kl"], abs=2e-5)
    assert rec["explained_variance"] == pytest.approx(want["explained_variance"], abs=2e-5)
    # What the numbers would be if special positions counted:
    everywhere = _hand_metrics(ref, tokens, [], "low")
    assert abs(everywhere["kl"] - want["kl"]) > 1e-3
    # EV over every splice-able position, special ones included (x_hat computed there too)
    _, record = ref["low"]
    x, x_hat, _ = record[LOW]
    x, x_hat = x[:, 1:-1].reshape(-1, 32).double(), x_hat[:, 1:-1].reshape(-1, 32).double()
    ev_all = 1 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()
    assert abs(ev_all - want["explained_variance"]) > 1e-3
    assert np.isfinite(rec["kl"]) and rec["n_tokens"] == int((~torch.isin(tokens[:, :-1], torch.tensor(special))).sum())
