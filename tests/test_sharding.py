"""`--device-map auto` and `--sae-dtype`: the sharded load must give the plain load's numbers, the
SAE must sit on the device of its hooked block, and `--sae-dtype` must really change the SAE's
arithmetic (weights cast, activations cast in and out) while the model keeps its own dtype."""

import pytest
import torch

from conftest import make_topk_sae
from harness.evals import ce
from harness.model.loading import hook_device
from harness.splice.session import prepare

HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="module")
def sae_dir(tiny_hf_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae") / "tiny-topk"
    make_topk_sae(32, 96, 8, HOOK, tiny_hf_dir.name, seed=3).save_model(folder)
    return folder


def _ce(session, tokens):
    out = ce.evaluate(session.lm, session.variants, tokens, batch_size=3,
                      calib_tokens=session.calib_tokens, n_boot=20)
    return {r["variant"]: r for r in out.records}


def test_device_map_auto_on_cpu_equals_plain_load(tiny_hf_dir, sae_dir):
    tokens = torch.randint(3, 2000, (6, 16), generator=torch.Generator().manual_seed(0))
    plain = prepare(str(tiny_hf_dir), [str(sae_dir), "mean"], device="cpu", calib_seqs=2, ctx=16)
    sharded = prepare(str(tiny_hf_dir), [str(sae_dir), "mean"], device_map="auto", calib_seqs=2, ctx=16)
    # accelerate really placed the model (on CPU, everything on the one device there is).
    assert sharded.lm.load_info["device_map"] == "auto"
    assert sharded.lm.load_info["devices"] == ["cpu"]
    sae = next(r for r in sharded.replacements if r.kind == "sae")
    assert sae.sae.W_dec.device == hook_device(sharded.lm, HOOK) == torch.device("cpu")
    a, b = _ce(plain, tokens), _ce(sharded, tokens)
    assert a.keys() == b.keys() and len(a) >= 3  # clean, the SAE, mean (and the zero baseline)
    for name in a:
        assert b[name]["ce_spliced"] == pytest.approx(a[name]["ce_spliced"], abs=1e-6)
        assert b[name]["kl"] == pytest.approx(a[name]["kl"], abs=1e-6)
        assert b[name]["explained_variance"] == pytest.approx(a[name]["explained_variance"], abs=1e-6, nan_ok=True)


def test_sae_dtype_casts_weights_and_activations(tiny_hf_dir, sae_dir):
    s32 = prepare(str(tiny_hf_dir), [str(sae_dir)], calib_seqs=2, ctx=16)
    s16 = prepare(str(tiny_hf_dir), [str(sae_dir)], sae_dtype="bfloat16", calib_seqs=2, ctx=16)
    r32, r16 = s32.replacements[0], s16.replacements[0]
    assert s16.lm.dtype == torch.float32 and r16.sae.W_enc.dtype == torch.bfloat16
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    x_hat, _ = r16(x)
    assert x_hat.dtype == torch.float32
    # The same TopK formula in plain PyTorch, computed in bfloat16 from bfloat16 weights.
    w = {k: getattr(r32.sae, k).detach().to(torch.bfloat16) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    pre = torch.relu((x.to(torch.bfloat16) - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    idx = pre.topk(8, dim=-1).indices
    f = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    expected = (f @ w["W_dec"] + w["b_dec"]).float()
    assert (x_hat - expected).abs().max().item() <= 0.05  # bf16: 8 bits of mantissa
    full, _ = r32(x)
    assert (x_hat - full).abs().max().item() > 1e-4  # the cast really happened
    tokens = torch.randint(3, 2000, (4, 16), generator=torch.Generator().manual_seed(0))
    c32, c16 = _ce(s32, tokens), _ce(s16, tokens)
    assert c16["clean"]["ce_spliced"] == c32["clean"]["ce_spliced"]  # the model itself is untouched
    name = r32.name
    assert c16[name]["ce_spliced"] != c32[name]["ce_spliced"]
    assert c16[name]["ce_spliced"] == pytest.approx(c32[name]["ce_spliced"], abs=0.05)


def test_bad_sae_dtype_is_one_line(sae_dir):
    from harness.errors import UserError
    from harness.splice.replacements import load_replacement

    with pytest.raises(UserError, match="unknown dtype 'float8'"):
        load_replacement(str(sae_dir), sae_dtype="float8")


def test_hook_device_follows_the_block(tiny_hf_dir):
    """A sharded model's blocks sit on different devices; each hook reports its own block's."""
    from harness.model.loading import load_model

    lm = load_model(str(tiny_hf_dir))
    lm.model.blocks[3].to("meta")  # stands in for "a block on another device"
    assert hook_device(lm, "blocks.3.hook_mlp_out") == torch.device("meta")
    assert hook_device(lm, "blocks.1.hook_resid_post") == torch.device("cpu")
    assert hook_device(lm, "hook_embed") == lm.device


def test_device_map_refuses_hooked_transformer_models():
    from harness.model.loading import load_model
    from harness.errors import UserError

    with pytest.raises(UserError, match=r"--device-map needs a Hugging Face model .*tl:gpt2"):
        load_model("tl:gpt2", device_map="auto")
