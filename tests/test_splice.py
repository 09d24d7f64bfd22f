"""The shared-prefix splicer: tail(prefix(x)) is the full forward, hooks land where asked."""

import pytest
import torch

from harness.models import UserError, to_tl_hook_name
from harness.saes import Replacement
from harness.splice import Splicer, activation_widths
from harness.variants import Variant


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
    from harness.splice import splice_hooks
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
