"""Transcoders, CLTs and sets: every accepted format spliced on a tiny random model equals a plain
transformers forward with module hooks, where each MLP's output is replaced by the format's own
formula written out here from the saved tensors (no harness or sae-lens code on that side)."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from harness.errors import UserError
from harness.evals import ce
from harness.splice.session import prepare
from harness.splice.splicer import Splicer
from harness.splice.variants import build_variants

F = 48  # latents
LAYERS = [1, 2]


def _rand(*shape, seed, scale=0.3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _weights(d, seed, skip: bool, jump: bool):
    w = {"W_enc": _rand(d, F, seed=seed), "b_enc": _rand(F, seed=seed + 1, scale=0.05),
         "W_dec": _rand(F, d, seed=seed + 2), "b_dec": _rand(d, seed=seed + 3, scale=0.05)}
    if skip:
        w["W_skip"] = _rand(d, d, seed=seed + 4, scale=0.1)  # [d_out, d_in]
    if jump:
        w["threshold"] = _rand(F, seed=seed + 5, scale=0.1).abs()
    return w


def _formula(w):
    """sae-lens' transcoder arithmetic written out: JumpReLU = ReLU(h) * (h > t), skip x @ W_skip.T."""
    def run(x):
        pre = x @ w["W_enc"] + w["b_enc"]
        acts = torch.relu(pre)
        if "threshold" in w:
            acts = acts * (pre > w["threshold"])
        out = acts @ w["W_dec"] + w["b_dec"]
        return out + x @ w["W_skip"].T if "W_skip" in w else out
    return run


def _rms_normalized(h, eps):
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def plain_logits(hf, tokens, per_layer: dict, read="normalized"):
    """Logits with each layer's MLP output replaced (not at position 0) by per_layer[L](input),
    the input being the MLP input before the RMSNorm gain (`normalized`) or after it (`mlp_in`)."""
    seen, handles = {}, []
    for L, fn in per_layer.items():
        layer = hf.model.layers[L]
        norm = layer.post_attention_layernorm
        if read == "normalized":
            handles.append(norm.register_forward_pre_hook(
                lambda m, a, _L=L, _eps=norm.variance_epsilon: seen.__setitem__(_L, _rms_normalized(a[0], _eps))))
        else:
            handles.append(norm.register_forward_hook(lambda m, a, o, _L=L: seen.__setitem__(_L, o)))

        def write(m, a, out, _L=L, _fn=fn):
            new = out.clone()
            new[:, 1:] = _fn(seen[_L])[:, 1:]
            return new
        handles.append(layer.mlp.register_forward_hook(write))
    try:
        return hf(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def plain_hf(tiny_hf_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()


def _save_sae_lens(folder, arch, w, L, model_name, d):
    cfg = {"architecture": arch, "d_in": d, "d_sae": F, "d_out": d, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none",
           "metadata": {"hook_name": f"blocks.{L}.ln2.hook_normalized", "hook_name_out": f"blocks.{L}.hook_mlp_out",
                        "model_name": model_name, "sae_lens_version": "6.54.12"}}
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))


def _tokens(n=3, ctx=12, seed=1):
    return torch.randint(3, 1000, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_sae_lens_transcoder_set_equals_plain_hf(tiny_hf, tiny_hf_dir, plain_hf, tmp_path, arch):
    d = tiny_hf.d_model
    ws = {L: _weights(d, 10 * L, "skip" in arch, "jumprelu" in arch) for L in LAYERS}
    for L in LAYERS:
        _save_sae_lens(tmp_path / "set" / f"blocks.{L}", arch, ws[L], L, str(tiny_hf_dir), d)
    variants, repls = build_variants([str(tmp_path / "set")], False, "cpu")
    assert [r.kind for r in repls] == ["transcoder"] * 2
    full = next(v for v in variants if v.name == "set")
    assert full.hooks == ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    tokens = _tokens()
    got = Splicer(tiny_hf, full.sites).logits(tokens, variant=full)
    want = plain_logits(plain_hf, tokens, {L: _formula(ws[L]) for L in LAYERS})
    clean = plain_hf(input_ids=tokens).logits
    assert (want - clean).abs().max() > 1e-2  # the transcoders change the model
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the A+B form over explicit folders splices the same thing
    joint, _ = build_variants([f"{tmp_path}/set/blocks.1+{tmp_path}/set/blocks.2"], False, "cpu")
    got2 = Splicer(tiny_hf, joint[-1].sites).logits(tokens, variant=joint[-1])
    torch.testing.assert_close(got2, want, rtol=0, atol=1e-5)


def test_circuit_tracer_transcoder_set_equals_plain_hf(tiny_hf, tiny_hf_dir, plain_hf, tmp_path):
    """circuit-tracer's layout: W_enc [F, d] used as x @ W_enc.T, threshold under
    `activation_function.threshold`, W_skip applied as x @ W_skip.T; hooks relative to blocks."""
    d = tiny_hf.d_model
    folder = tmp_path / "ct"
    folder.mkdir()
    ws = {}
    for L in range(tiny_hf.n_layers):
        w = _weights(d, 7 * L + 1, skip=True, jump=True)
        ws[L] = w
        save_file({"W_enc": w["W_enc"].T.contiguous(), "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
                   "W_skip": w["W_skip"], "activation_function.threshold": w["threshold"]},
                  str(folder / f"layer_{L}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "model_name": str(tiny_hf_dir)}))
    variants, _ = build_variants([str(folder)], False, "cpu", curves=False)
    assert [v.name for v in variants] == ["clean", "ct"]
    tokens = _tokens()
    got = Splicer(tiny_hf, variants[1].sites).logits(tokens, variant=variants[1])
    want = plain_logits(plain_hf, tokens, {L: _formula(ws[L]) for L in ws}, read="mlp_in")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _save_clt(folder, d, n, skip=False, seed=0, jump=True):
    folder.mkdir()
    enc, dec = {}, {}
    for i in range(n):
        enc[i] = {f"W_enc_{i}": _rand(F, d, seed=seed + i), f"b_enc_{i}": _rand(F, seed=seed + 50 + i, scale=0.05),
                  f"b_dec_{i}": _rand(d, seed=seed + 100 + i, scale=0.05)}
        if jump:
            enc[i][f"threshold_{i}"] = _rand(F, seed=seed + 150 + i, scale=0.1).abs()
        dec[i] = {f"W_dec_{i}": _rand(F, n - i, d, seed=seed + 200 + i, scale=0.2)}
        save_file(enc[i], str(folder / f"W_enc_{i}.safetensors"))
        save_file(dec[i], str(folder / f"W_dec_{i}.safetensors"))
    A = _rand(n, d, d, seed=seed + 300, scale=0.1)
    if skip:
        save_file({"W_skip": A}, str(folder / "W_skip.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "hook_mlp_out"}))
    return enc, dec, (A if skip else None)


@pytest.mark.parametrize("skip", [False, True])
def test_clt_equals_plain_hf(tiny_hf, plain_hf, tmp_path, skip):
    """A CLT's layer-i features write layers i..n-1: out_l = sum_{i<=l} f_i W_dec_i[:, l-i] + b_dec_l
    (+ x_l @ A_l, untransposed, as circuit-tracer applies a CLT's skip)."""
    d, n = tiny_hf.d_model, tiny_hf.n_layers
    enc, dec, A = _save_clt(tmp_path / "clt", d, n, skip)
    feats = {}

    def out_at(L):
        def run(x):
            e = enc[L]
            pre = x @ e[f"W_enc_{L}"].T + e[f"b_enc_{L}"]
            feats[L] = pre * (pre > e[f"threshold_{L}"])
            y = e[f"b_dec_{L}"] + sum(feats[i] @ dec[i][f"W_dec_{i}"][:, L - i] for i in range(L + 1))
            return y + x @ A[L] if A is not None else y
        return run
    variants, repls = build_variants([str(tmp_path / "clt")], False, "cpu")
    assert repls[0].kind == "clt" and len(variants) == 2
    tokens = _tokens()
    got = Splicer(tiny_hf, variants[1].sites).logits(tokens, variant=variants[1])
    want = plain_logits(plain_hf, tokens, {L: out_at(L) for L in range(n)}, read="mlp_in")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_ce_records_top1_agreement_against_numpy(tiny_hf, tiny_hf_dir, tmp_path):
    d = tiny_hf.d_model
    ws = {L: _weights(d, 3 * L, True, False) for L in LAYERS}
    for L in LAYERS:
        _save_sae_lens(tmp_path / "set" / f"blocks.{L}", "skip_transcoder", ws[L], L, str(tiny_hf_dir), d)
    session = prepare(str(tiny_hf_dir), [str(tmp_path / "set")], calib_seqs=2, ctx=12, curves=True)
    names = [v.name for v in session.variants]
    assert names == ["clean", "set", "set:1", "set:2", "set:2-"]
    tokens = _tokens(4, 16, seed=5)
    result = ce.evaluate(session.lm, session.variants, tokens, batch_size=2, n_boot=50,
                         calib_tokens=session.calib_tokens)
    rec = result.by_variant()
    # the curve points equal the single members; the last "from the top" point is layer 2 alone
    assert rec["set:2-"]["dce"] == pytest.approx(rec["set:2"]["dce"], abs=1e-9)
    assert rec["set:1"]["curve"] == {"set": "set", "order": "alone", "layers": 1, "first": 1}
    assert rec["set"]["curve"] is None and "zero@1.mlp_out+zero@2.mlp_out" in rec
    # top-1 agreement recomputed from full logits of both models
    splicer = Splicer(session.lm, session.variants[1].sites)
    clean = session.lm.model(tokens)[:, :-1]
    spliced = splicer.logits(tokens, variant=session.variants[1])[:, :-1]
    p_clean = clean.softmax(-1)
    agree = (clean.argmax(-1) == spliced.argmax(-1)).numpy()
    correct = (clean.argmax(-1) == tokens[:, 1:]).numpy()
    hard = correct & (p_clean.max(-1).values < 0.8).numpy()
    assert rec["set"]["top1_agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    assert rec["set"]["n_hard"] == int(hard.sum())
    if hard.any():
        assert rec["set"]["top1_agreement_hard"] == pytest.approx(agree[hard].mean(), abs=1e-12)
    assert rec["clean"]["top1_agreement"] == 1.0
    assert np.isfinite(rec["set"]["explained_variance"])


# ---------------------------------------------------------------- Gemma Scope 2


def test_gemma_scope_2_transcoder_equals_plain_hf(tmp_path):
    """A Gemma Scope 2 affine transcoder (params.safetensors + config.json) on a tiny random Gemma-3:
    its input is `pre_feedforward_layernorm`'s output, its output replaces
    `post_feedforward_layernorm`'s, and the skip is the official x @ A. On the calibration batch
    the orientation check records the output explained both ways."""
    import test_architectures as archs

    tok = archs.make_tokenizer()
    model_dir = tmp_path / "gemma3"
    archs.build("gemma3", tok, model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    d = hf.config.hidden_size
    L = 1
    w = {"w_enc": _rand(d, F, seed=1), "b_enc": _rand(F, seed=2, scale=0.05), "w_dec": _rand(F, d, seed=3),
         "b_dec": _rand(d, seed=4, scale=0.05), "threshold": _rand(F, seed=5, scale=0.1).abs(),
         "affine_skip_connection": _rand(d, d, seed=6, scale=0.2)}
    folder = tmp_path / "gs2" / f"layer_{L}_width_48_l0_small_affine"
    folder.mkdir(parents=True)
    save_file(w, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": f"model.layers.{L}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{L}.post_feedforward_layernorm.output", "width": F,
        "model_name": str(model_dir), "architecture": "jump_relu", "l0": 8, "affine_connection": True,
        "type": "transcoder"}))
    session = prepare(str(model_dir), [str(folder)], calib_seqs=4, ctx=16)
    repl = session.replacements[0]
    assert repl.hook_in == f"blocks.{L}.ln2.hook_out" and repl.hook == f"blocks.{L}.ln2_post.hook_out"
    assert set(repl.skip_orientation) == {"x @ A", "x @ A.T"}
    tokens = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    got = Splicer(session.lm, session.variants[1].sites).logits(tokens, variant=session.variants[1])

    def run(x):
        pre = x @ w["w_enc"] + w["b_enc"]
        return (torch.relu(pre) * (pre > w["threshold"])) @ w["w_dec"] + w["b_dec"] + x @ w["affine_skip_connection"]
    layer, seen = hf.model.layers[L], {}
    h1 = layer.pre_feedforward_layernorm.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o))

    def write(m, a, out):
        new = out.clone()
        new[:, 1:] = run(seen["x"])[:, 1:]
        return new
    h2 = layer.post_feedforward_layernorm.register_forward_hook(write)
    try:
        with torch.no_grad():
            want = hf(input_ids=tokens).logits
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- bad input


def test_bad_transcoder_inputs_are_one_line(tiny_hf, tiny_hf_dir, tmp_path):
    d = tiny_hf.d_model
    w = _weights(d, 0, True, False)
    # output hook before input hook
    bad = tmp_path / "backwards"
    _save_sae_lens(bad, "skip_transcoder", w, 1, str(tiny_hf_dir), d)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["metadata"]["hook_name_out"] = "blocks.0.hook_mlp_out"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="reaches before"):
        build_variants([str(bad)], False, "cpu")
    # skip matrix of the wrong shape
    wrong = tmp_path / "wrong-skip"
    _save_sae_lens(wrong, "skip_transcoder", {**w, "W_skip": torch.zeros(d, d + 1)}, 1, str(tiny_hf_dir), d)
    with pytest.raises(UserError, match="cannot load"):
        build_variants([str(wrong)], False, "cpu")
    # a set whose members disagree on the model, on the width
    for L, name in ((1, "model-a"), (2, "model-b")):
        _save_sae_lens(tmp_path / "mixed" / f"blocks.{L}", "skip_transcoder", w, L, name, d)
    with pytest.raises(UserError, match="different models"):
        build_variants([str(tmp_path / "mixed")], False, "cpu")
    # a set naming a layer the model does not have
    _save_sae_lens(tmp_path / "deep" / "blocks.9", "skip_transcoder", w, 9, str(tiny_hf_dir), d)
    with pytest.raises(UserError, match="unknown hook"):
        prepare(str(tiny_hf_dir), [str(tmp_path / "deep")], calib_seqs=2, ctx=8)
    # CLT: a layer's decoder missing, a decoder of the wrong shape
    _save_clt(tmp_path / "clt", d, tiny_hf.n_layers)
    (tmp_path / "clt" / "W_dec_2.safetensors").unlink()
    with pytest.raises(UserError, match="decoder file of layer 2 is missing"):
        build_variants([str(tmp_path / "clt")], False, "cpu")
    _save_clt(tmp_path / "clt2", d, tiny_hf.n_layers)
    save_file({"W_dec_1": torch.zeros(F, 2, d)}, str(tmp_path / "clt2" / "W_dec_1.safetensors"))
    with pytest.raises(UserError, match="W_dec_1 has shape"):
        build_variants([str(tmp_path / "clt2")], False, "cpu")
    # a circuit-tracer config naming hub files
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out",
        "transcoders": ["hf://org/repo/layer_0.safetensors"]}))
    with pytest.raises(UserError, match="local folder"):
        build_variants([str(hub)], False, "cpu")


# ---------------------------------------------------------------- the shipped set, end to end


@pytest.mark.slow
def test_shipped_transcoders_joint_ce_equals_plain_transformers(embedded_dir):
    """The demo skip transcoders at all 30 blocks, spliced at once with A+B+...: CE within 1e-3
    nats of a plain transformers forward where each MLP's output is replaced by the transcoder's
    output from its input (JumpReLU written out from the safetensors files), top-1 reported."""
    from safetensors.torch import load_file

    from harness.model.loading import load_model
    from harness.splice.sets import DEMO_SETS
    from harness.text import builtin as data

    folders = sorted((p for p in DEMO_SETS["skip-transcoders"].iterdir() if (p / "cfg.json").exists()),
                     key=lambda p: int(p.name.split(".")[1]))
    hf = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    assert len(folders) == hf.config.num_hidden_layers == 30
    total = sum(f.stat().st_size for p in folders for f in p.iterdir())
    assert total < 64 * 2**20
    fns = {}
    for p in folders:
        cfg = json.loads((p / "cfg.json").read_text())
        assert cfg["architecture"] in ("skip_transcoder", "jumprelu_skip_transcoder")
        w = {k: v.float() for k, v in load_file(p / "sae_weights.safetensors").items()}
        fns[int(p.name.split(".")[1])] = _formula(w)
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    ids = [tok.bos_token_id]
    for d in data.documents("eval")[:8]:
        ids += tok.encode(d, add_special_tokens=False)[:60] + [tok.eos_token_id]
    tokens = torch.tensor(ids[: 4 * 64]).view(4, 64)
    keep = ~torch.isin(tokens, torch.tensor(sorted(set(tok.all_special_ids))))
    # each MLP output replaced except at position 0 and special tokens (the harness's rule)
    seen, handles = {}, []
    for L, fn in fns.items():
        layer = hf.model.layers[L]
        norm = layer.post_attention_layernorm
        handles.append(norm.register_forward_pre_hook(
            lambda m, a, _L=L, _eps=norm.variance_epsilon: seen.__setitem__(_L, _rms_normalized(a[0], _eps))))

        def write(m, a, out, _L=L, _fn=fn):
            at = keep.clone()
            at[:, 0] = False
            return torch.where(at[..., None], _fn(seen[_L]), out)
        handles.append(layer.mlp.register_forward_hook(write))
    try:
        with torch.no_grad():
            want = hf(input_ids=tokens).logits
    finally:
        for h in handles:
            h.remove()
    lp = torch.log_softmax(want[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    want_ce = float(-lp[keep[:, :-1]].mean())

    spec = "+".join(str(p) for p in folders)
    variants, _ = build_variants([spec], False, "cpu")
    joint = variants[-1]
    assert len(joint.parts) == 30
    calib = data.pack(tok, data.documents("train-prose"), 2, 64)
    out = ce.evaluate(lm, [variants[0], joint], tokens, 2, calib, n_boot=10)
    rec = out.by_variant()[joint.name]
    assert rec["ce_spliced"] == pytest.approx(want_ce, abs=1e-3)
    assert 0 < rec["top1_agreement"] < 1 and rec["n_hard"] > 0


@pytest.mark.parametrize("point,hook", [("model.layers.1.output", "blocks.1.hook_resid_post"),
                                        ("model.layers.1.self_attn.o_proj.input", "blocks.1.attn.hook_z")])
def test_gemma_scope_2_sae_folder(tmp_path, point, hook):
    """A Gemma Scope 2 SAE (resid or attention hook_z site): JumpReLU, no b_dec subtracted."""
    from harness.splice.replacements import load_replacement

    d = 16
    w = {"w_enc": _rand(d, F, seed=1), "b_enc": _rand(F, seed=2, scale=0.05), "w_dec": _rand(F, d, seed=3),
         "b_dec": _rand(d, seed=4, scale=0.05), "threshold": _rand(F, seed=5, scale=0.1).abs()}
    save_file(w, str(tmp_path / "params.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hf_hook_point_in": point, "hf_hook_point_out": point,
                                                      "width": F, "architecture": "jump_relu", "type": "sae"}))
    r = load_replacement(str(tmp_path))
    assert (r.kind, r.hook, r.hook_in) == ("sae", hook, None)
    x = _rand(3, 5, d, seed=9, scale=1.0)
    pre = x @ w["w_enc"] + w["b_enc"]
    want = (torch.relu(pre) * (pre > w["threshold"])) @ w["w_dec"] + w["b_dec"]
    torch.testing.assert_close(r(x)[0], want, rtol=0, atol=1e-5)


def test_set_members_of_different_widths_are_refused(tiny_hf, tiny_hf_dir, tmp_path):
    d = tiny_hf.d_model
    _save_sae_lens(tmp_path / "set" / "blocks.1", "skip_transcoder", _weights(d, 0, True, False), 1, str(tiny_hf_dir), d)
    wide = dict(_weights(d, 0, True, False))
    wide.update(W_enc=torch.zeros(d, 2 * F), b_enc=torch.zeros(2 * F), W_dec=torch.zeros(2 * F, d))
    folder = tmp_path / "set" / "blocks.2"
    _save_sae_lens(folder, "skip_transcoder", wide, 2, str(tiny_hf_dir), d)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["d_sae"] = 2 * F
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="different widths"):
        build_variants([str(tmp_path / "set")], False, "cpu")


def test_lm_eval_backend_log_likelihood_with_a_transcoder_set_equals_the_ce_path(tiny_hf, tiny_hf_dir, tmp_path):
    """The lm-eval backend splices a set the way the CE suite does: a continuation's
    log-likelihood is the sum of the CE path's per-token losses over it."""
    from lm_eval.api.instance import Instance

    from harness.lmeval.backend import variant_views

    d = tiny_hf.d_model
    for L in LAYERS:
        _save_sae_lens(tmp_path / "set" / f"blocks.{L}", "skip_transcoder", _weights(d, 5 * L, True, False), L,
                       str(tiny_hf_dir), d)
    variants, _ = build_variants([str(tmp_path / "set")], False, "cpu", curves=False)
    views = variant_views(tiny_hf, variants, batch_size=2)
    tok = views[0].tokenizer
    ctx, cont = "The quick brown fox", " jumps over the dog"
    ll = views[1].loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=0)])[0][0]
    whole = tok.encode(ctx + cont, add_special_tokens=False)
    n_ctx = len(tok.encode(ctx, add_special_tokens=False))
    tokens = torch.tensor([whole])
    out = ce.evaluate(tiny_hf, variants, tokens, 1, tokens, 10)
    nll = out.per_token_dce["clean"][0] + out.per_token_dce["set"][0]
    assert ll == pytest.approx(-float(nll[n_ctx - 1:].sum()), abs=1e-4)
    assert abs(ll - views[0].loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont),
                                                      idx=0)])[0][0]) > 1e-3
