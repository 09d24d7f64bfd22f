"""The shared-prefix splicer: tail(prefix(x)) is the full forward, hooks land where asked."""

import pytest
import torch

from conftest import make_topk_sae
from harness.model.loading import to_tl_hook_name
from harness.errors import UserError
from harness.splice.replacements import Replacement, from_sae
from harness.splice.splicer import Splicer, activation_widths, splice_hooks
from harness.splice.variants import Variant


def test_hook_name_translation():
    assert to_tl_hook_name("model.layers.15") == "blocks.15.hook_resid_post"
    assert to_tl_hook_name("model.layers.3.mlp") == "blocks.3.hook_mlp_out"
    assert to_tl_hook_name("model.layers.3.self_attn") == "blocks.3.hook_attn_out"
    assert to_tl_hook_name("transformer.h.7") == "blocks.7.hook_resid_post"
    assert to_tl_hook_name("gpt_neox.layers.2.attention") == "blocks.2.hook_attn_out"
    assert to_tl_hook_name("blocks.4.hook_resid_pre") == "blocks.4.hook_resid_pre"


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_bridge_tail_of_prefix_equals_full_forward(tiny_hf, layer):
    """A resid_post splice at block L branches at L+1 (after the last block: at the final norm)."""
    torch.manual_seed(1)
    tokens = torch.randint(3, 1000, (3, 12))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding on one row: the captured 4-D mask must carry it
    splicer = Splicer(tiny_hf, [f"blocks.{layer}.hook_resid_post"])
    assert splicer.start_layer == layer + 1
    full = tiny_hf.model.original_model(input_ids=tokens, attention_mask=mask).logits
    got = splicer.tail(splicer.prefix(tokens, mask))
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_hooked_tail_of_prefix_equals_full_forward(tiny_hooked):
    tokens = torch.randint(0, 97, (2, 10))
    splicer = Splicer(tiny_hooked, ["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(splicer.tail(splicer.prefix(tokens)), tiny_hooked.model(tokens), rtol=0, atol=1e-5)


def test_zero_splice_matches_plain_pytorch_hook(tiny_hf):
    """Zeroing blocks.1.hook_resid_post equals zeroing decoder layer 1's output in plain HF."""
    hf = tiny_hf.model.original_model
    tokens = torch.randint(3, 1000, (2, 9))
    zero = Replacement(name="zero", spec="zero", kind="zero", hook="blocks.1.hook_resid_post")
    splicer = Splicer(tiny_hf, [zero.hook])
    got = splicer.logits(tokens, variant=Variant("z", {zero.hook: zero}))

    def hook(module, args, out):
        x = (out[0] if isinstance(out, tuple) else out).clone()
        x[:, 1:] = 0  # position 0, the attention sink, keeps its activation
        return x
    h = hf.model.layers[1]._original_component.register_forward_hook(hook)
    try:
        want = hf(input_ids=tokens).logits
    finally:
        h.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_special_positions_keep_original_activation(tiny_hf):
    tok = tiny_hf.tokenizer
    tokens = torch.tensor([[tok.bos_token_id, 50, 60, tok.eos_token_id, 70]])
    seen = {}
    zero = Replacement(name="zero", spec="zero", kind="zero", hook="blocks.2.hook_resid_post")
    splicer = Splicer(tiny_hf, [zero.hook, "blocks.3.hook_resid_pre"])

    def grab(x, hook):
        seen["x"] = x.clone()
        return x
    from harness.splice.splicer import splice_hooks
    pre = splicer.prefix(tokens)
    mask = splicer.splice_mask(tokens, None)
    splicer.tail(pre, splice_hooks(Variant("z", {zero.hook: zero}), mask) + [("blocks.3.hook_resid_pre", grab)])
    x = seen["x"][0]
    assert mask.tolist() == [[False, True, True, False, True]]
    assert (x[[1, 2, 4]] == 0).all()
    assert (x[[0, 3]].abs().sum(-1) > 0).all()


def test_unknown_hook_lists_valid_ones(tiny_hf):
    with pytest.raises(UserError, match=r"valid hooks: .*blocks\.\{0\.\.3\}\.hook_resid_post"):
        Splicer(tiny_hf, ["blocks.1.hook_nonsense"])


def test_activation_widths(tiny_hf):
    w = activation_widths(tiny_hf, ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"])
    assert w == {"blocks.1.hook_resid_post": 32, "blocks.1.mlp.hook_post": 64}


# -- a resid_post splice starts after its block; tails sharing a layer run batched ---------------
def _sae_variant(hook, seed, name="sae"):
    return Variant(name, {hook: from_sae(name, name, make_topk_sae(32, 64, 4, hook, "tiny", seed=seed), {})})


def test_resid_post_splice_at_next_block_equals_replay_and_plain_hf(tiny_hf):
    """blocks.1.hook_resid_post spliced into the shared residual entering block 2 (block 1 not
    replayed) gives the logits of the replay path (tail from block 1, the splice as a hook on
    block 1's output) and of a plain transformers forward hook on decoder layer 1; `on_act` sees
    the same x, x_hat and latents on all three."""
    import plain_hf
    from transformers import AutoModelForCausalLM

    hook = "blocks.1.hook_resid_post"
    variant = _sae_variant(hook, seed=3)
    sae = variant.parts[hook].sae
    tokens = torch.randint(3, 1000, (3, 11), generator=torch.Generator().manual_seed(4))
    tokens[1, 4] = tiny_hf.tokenizer.eos_token_id  # a special position keeps its activation
    splicer = Splicer(tiny_hf, [hook])
    assert splicer.start_layer == 2 and splicer.variant_layer(variant) == 2
    mask = splicer.splice_mask(tokens, None)
    seen = {}

    def record(path):
        return lambda name, x, x_hat, latents: seen.setdefault(path, (x.clone(), x_hat, latents))

    direct = splicer.tail(splicer.prefix(tokens), splice_hooks(variant, mask, record("direct")))
    replay_from = Splicer(tiny_hf, ["blocks.1.hook_resid_pre"])  # branches at block 1
    pre = replay_from.prefix(tokens)
    assert pre.layer == 1
    replayed = replay_from.tail(pre, splice_hooks(variant, mask, record("replay")))
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf.load_info["source"], dtype=torch.float32).eval()
    ref = {}
    plain = plain_hf.forward(hf, tokens, {1: plain_hf.topk_reconstruct(sae)}, tiny_hf.special_ids(), ref)
    torch.testing.assert_close(direct, replayed, rtol=0, atol=1e-5)
    torch.testing.assert_close(direct, plain, rtol=0, atol=1e-5)
    assert (direct - hf(input_ids=tokens).logits).abs().max() > 1e-2  # the splice does bite
    for path in ("direct", "replay"):
        for got, want in zip(seen[path], ref[1]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the shared clean residual is not changed by a variant's splice
    torch.testing.assert_close(splicer.prefix(tokens).resid, replay_from.advance(pre, 2).resid, rtol=0, atol=1e-6)


def test_hooked_resid_post_splice_at_next_block_equals_run_with_hooks(tiny_hooked):
    """The same on a HookedTransformer, up to the last block (its tail: final norm and head)."""
    model = tiny_hooked.model
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    for layer in (0, 2):
        hook = f"blocks.{layer}.hook_resid_post"
        variant = _sae_variant(hook, seed=layer)
        splicer = Splicer(tiny_hooked, [hook])
        assert splicer.start_layer == layer + 1
        got = splicer.logits(tokens, variant=variant)
        repl = variant.parts[hook]

        def plain(x, hook):
            y = x.clone()
            y[:, 1:] = repl(x)[0][:, 1:]
            return y
        want = model.run_with_hooks(tokens, fwd_hooks=[(hook, plain)])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - model(tokens)).abs().max() > 1e-3


def test_batched_tails_equal_one_tail_per_variant(tiny_hf):
    """Variants sharing a branch layer run in one forward (the batch repeated, each slice with
    its own splices) and give the logits and activations of one forward per variant: SAEs and
    a zero baseline at block 1's output and a joint splice carrying an mlp_out SAE into block 3
    (all from block 2), the clean tail and an SAE at block 3's MLP (from block 3), with left
    padding, all positions or selected ones."""
    h1, h2 = "blocks.1.hook_resid_post", "blocks.3.hook_mlp_out"
    a, b, c = _sae_variant(h1, 1, "a"), _sae_variant(h1, 2, "b"), _sae_variant(h2, 3, "c")
    zero = Variant("zero", {h1: Replacement(name="zero", spec="zero", kind="zero", hook=h1)})
    joint = Variant("a+c", {**a.parts, **c.parts})
    variants = [a, c, b, zero, joint]
    tokens = torch.randint(3, 1000, (3, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(tokens)
    mask[2, :3] = 0
    positions = torch.tensor([[9, 8], [9, 5], [9, 7]])

    def run(tail_tokens):
        splicer = Splicer(tiny_hf, [h1, h2], tail_tokens=tail_tokens)
        sizes, inner = [], splicer._run_tail

        def counted(pre, hooks, pos, hidden=False):
            sizes.append(pre.resid.shape[0])
            return inner(pre, hooks, pos, hidden)
        splicer._run_tail = counted
        acts = {}
        out = {}
        for pos in (None, positions):
            on_act = (lambda v, name, x, x_hat, lat, _p=pos is None: acts.setdefault((v.name, name, _p), (x, x_hat)))
            for v, logits in splicer.run_variants(tokens, variants, mask, pos, on_act):
                out[(v.name if v else "clean", pos is None)] = logits
        return out, acts, sizes

    one, acts_one, sizes_one = run(1)  # a budget below one batch: one tail per forward
    many, acts_many, sizes_many = run(10 ** 6)
    assert sizes_one == [3] * 12
    # from block 3: clean and c in one forward; from block 2: a, b, zero, a+c in another
    assert sorted(sizes_many) == [6, 6, 12, 12]
    assert one.keys() == many.keys() and len(one) == 12
    for key in one:
        torch.testing.assert_close(many[key], one[key], rtol=0, atol=1e-5, msg=str(key))
    assert acts_one.keys() == acts_many.keys() and len(acts_one) == 12
    for key in acts_one:
        for got, want in zip(acts_many[key], acts_one[key]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=str(key))
    assert (many[("a", True)] - many[("b", True)]).abs().max() > 1e-2  # slices differ: each its own SAE
    assert (many[("a+c", True)] - many[("a", True)]).abs().max() > 1e-2


def test_tails_per_forward_budgets(tiny_hf):
    splicer = Splicer(tiny_hf, ["blocks.1.hook_resid_post"], tail_tokens=100, tail_logits_bytes=10 ** 12)
    tokens = torch.zeros(2, 10, dtype=torch.long)
    assert splicer.tails_per_forward(tokens, None) == 5  # 100 tokens / 20 per tail
    vocab = tiny_hf.model.cfg.d_vocab
    splicer.tail_logits_bytes = 3 * 20 * vocab * 4  # float32 logits of 3 tails
    assert splicer.tails_per_forward(tokens, None) == 3
    assert splicer.tails_per_forward(tokens, torch.zeros(2, 1, dtype=torch.long)) == 5  # 2 positions per row: 30 tails' logits
    splicer.tail_tokens = 1
    assert splicer.tails_per_forward(tokens, None) == 1
