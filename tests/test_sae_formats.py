"""Every accepted SAE format: a small synthetic SAE saved in that format's own layout is loaded
through harness.splice.replacements (which uses sae-lens' loader / converter for it), and its reconstruction
must equal the format's own formula, written here in plain PyTorch, within 1e-5."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from harness.model.loading import to_tl_hook_name
from harness.errors import UserError
from harness.splice.replacements import load_replacement

D_IN, D_SAE, K = 16, 48, 5


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def x():
    return _rand(4, 7, D_IN, seed=0) * 2


def _topk(acts, k):
    idx = acts.topk(k, dim=-1).indices
    return torch.zeros_like(acts).scatter(-1, idx, acts.gather(-1, idx))


def _check(spec, x, expected, hook):
    r = load_replacement(str(spec))
    x_hat, _ = r(x)
    assert r.hook == hook
    assert (x_hat - expected).abs().max().item() < 1e-5
    assert (expected - x).abs().max().item() > 0.1  # the formula is not the identity
    return r


# ---- sae-lens folders: cfg.json + sae_weights.safetensors, four architectures ----------------

def _sae_lens_folder(path, arch, hook="blocks.1.hook_resid_post"):
    w = {"W_enc": _rand(D_IN, D_SAE, seed=1) / 4, "W_dec": _rand(D_SAE, D_IN, seed=2) / 4,
         "b_dec": _rand(D_IN, seed=3) / 4}
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none",
           "metadata": {"hook_name": hook, "model_name": "tiny", "sae_lens_version": "6.54.12"}}
    if arch == "gated":
        w.update(b_gate=_rand(D_SAE, seed=4) / 4, b_mag=_rand(D_SAE, seed=5) / 4, r_mag=_rand(D_SAE, seed=6) / 4)
    else:
        w["b_enc"] = _rand(D_SAE, seed=4) / 4
    if arch == "jumprelu":
        w["threshold"] = _rand(D_SAE, seed=7).abs() / 4
    if arch == "topk":
        cfg["k"] = K
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "sae_weights.safetensors"))
    return w


def _sae_lens_formula(arch, w, x):
    sae_in = x - w["b_dec"]
    if arch == "gated":
        pre = sae_in @ w["W_enc"]
        f = (pre + w["b_gate"] > 0).float() * torch.relu(pre * w["r_mag"].exp() + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        f = torch.relu(pre)
        if arch == "jumprelu":
            f = f * (pre > w["threshold"]).float()
        if arch == "topk":
            f = _topk(f, K)
    return f @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_sae_lens_folder(tmp_path, x, arch):
    w = _sae_lens_folder(tmp_path / arch, arch)
    r = _check(tmp_path / arch, x, _sae_lens_formula(arch, w, x), "blocks.1.hook_resid_post")
    assert r.sae.cfg.architecture() == arch


def test_sae_lens_folder_with_module_path_hook(tmp_path, x):
    w = _sae_lens_folder(tmp_path / "hf", "standard", hook="model.layers.2.mlp")
    _check(tmp_path / "hf", x, _sae_lens_formula("standard", w, x), "blocks.2.hook_mlp_out")


def test_registry_release_through_from_pretrained(tmp_path, x, monkeypatch):
    """`release/sae_id` runs sae-lens' real SAE.from_pretrained; only the hub download is
    pointed at local files (the registry maps gpt2-small-res-jb to jbloom/GPT2-Small-SAEs-Reformatted)."""
    from huggingface_hub.errors import EntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders

    w = _sae_lens_folder(tmp_path / "hub" / "blocks.0.hook_resid_pre", "standard", hook="blocks.0.hook_resid_pre")
    # That repository holds pre-6.0 configs: flat, with no metadata block.
    cfg_file = tmp_path / "hub" / "blocks.0.hook_resid_pre" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(cfg.pop("metadata"))
    del cfg["sae_lens_version"]
    cfg_file.write_text(json.dumps(cfg))
    asked = []

    def fake_download(repo_id, filename, **_):
        asked.append((repo_id, filename))
        f = tmp_path / "hub" / filename
        if not f.exists():
            raise EntryNotFoundError(filename)
        return str(f)

    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", fake_download)
    r = _check("gpt2-small-res-jb/blocks.0.hook_resid_pre", x, _sae_lens_formula("standard", w, x),
               "blocks.0.hook_resid_pre")
    assert ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.0.hook_resid_pre/cfg.json") in asked
    assert r.model_kwargs == {"center_writing_weights": True}  # the registry's config override


# ---- EleutherAI sparsify: <run>/<hookpoint>/cfg.json + sae.safetensors ------------------------

@pytest.mark.parametrize("folder,hook", [("layers.1.mlp", "blocks.1.hook_mlp_out"),
                                         ("layers.2", "blocks.2.hook_resid_post")])
def test_sparsify_folder(tmp_path, x, folder, hook):
    path = tmp_path / "run" / folder
    path.mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny"}))
    (path / "cfg.json").write_text(json.dumps({"d_in": D_IN, "num_latents": D_SAE, "k": K,
                                               "expansion_factor": 3, "normalize_decoder": True}))
    enc_w, enc_b = _rand(D_SAE, D_IN, seed=1) / 4, _rand(D_SAE, seed=2) / 4
    w_dec, b_dec = _rand(D_SAE, D_IN, seed=3) / 4, _rand(D_IN, seed=4) / 4
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
              str(path / "sae.safetensors"))
    # sparsify's Sae: top-k of relu(encoder(x - b_dec)), decoded with W_dec [latents, d_in] + b_dec.
    acts = _topk(torch.relu((x - b_dec) @ enc_w.T + enc_b), K)
    _check(path, x, acts @ w_dec + b_dec, hook)


# ---- dictionary_learning: <trainer>/config.json + ae.pt ---------------------------------------

def _dl_folder(path, dict_class, state, **trainer):
    path.mkdir(parents=True)
    cfg = {"trainer": {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3,
                       "lm_name": "org/tiny", **trainer}, "buffer": {"ctx_len": 128}}
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save(state, path / "ae.pt")


def test_dictionary_learning_autoencoder(tmp_path, x):
    s = {"encoder.weight": _rand(D_SAE, D_IN, seed=1) / 4, "encoder.bias": _rand(D_SAE, seed=2) / 4,
         "decoder.weight": _rand(D_IN, D_SAE, seed=3) / 4, "bias": _rand(D_IN, seed=4) / 4}
    _dl_folder(tmp_path / "trainer_0", "AutoEncoder", s, submodule_name="mlp_out_layer_1")
    # dictionary_learning AutoEncoder: f = relu(encoder(x - bias)); x_hat = decoder(f) + bias.
    f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    r = _check(tmp_path / "trainer_0", x, f @ s["decoder.weight"].T + s["bias"], "blocks.1.hook_mlp_out")
    assert r.model_name == "tiny"


def test_dictionary_learning_topk(tmp_path, x):
    s = {"encoder.weight": _rand(D_SAE, D_IN, seed=1) / 4, "encoder.bias": _rand(D_SAE, seed=2) / 4,
         "decoder.weight": _rand(D_IN, D_SAE, seed=3) / 4, "b_dec": _rand(D_IN, seed=4) / 4,
         "k": torch.tensor(K), "threshold": torch.tensor(-1.0)}
    _dl_folder(tmp_path / "trainer_1", "AutoEncoderTopK", s, k=K)  # no submodule_name: resid_post at `layer`
    # AutoEncoderTopK: top-k of relu(encoder(x - b_dec)); x_hat = decoder(f) + b_dec.
    f = _topk(torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]), K)
    _check(tmp_path / "trainer_1", x, f @ s["decoder.weight"].T + s["b_dec"], "blocks.3.hook_resid_post")


def test_dictionary_learning_gated(tmp_path, x):
    s = {"encoder.weight": _rand(D_SAE, D_IN, seed=1) / 4, "r_mag": _rand(D_SAE, seed=2) / 4,
         "gate_bias": _rand(D_SAE, seed=3) / 4, "mag_bias": _rand(D_SAE, seed=4) / 4,
         "decoder.weight": _rand(D_IN, D_SAE, seed=5) / 4, "decoder_bias": _rand(D_IN, seed=6) / 4}
    _dl_folder(tmp_path / "trainer_2", "GatedAutoEncoder", s, submodule_name="resid_post_layer_2")
    # GatedAutoEncoder: x_enc = encoder(x - decoder_bias); f = [x_enc + gate_bias > 0] *
    # relu(exp(r_mag) * x_enc + mag_bias); x_hat = decoder(f) + decoder_bias.
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    f = (x_enc + s["gate_bias"] > 0).float() * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    _check(tmp_path / "trainer_2", x, f @ s["decoder.weight"].T + s["decoder_bias"], "blocks.2.hook_resid_post")


# ---- Gemma Scope: <release>/layer_L/width_W/average_l0_N/params.npz (JumpReLU) ----------------

def test_gemma_scope_npz(tmp_path, x):
    path = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "average_l0_5"
    path.mkdir(parents=True)
    p = {"W_enc": _rand(D_IN, D_SAE, seed=1) / 4, "b_enc": _rand(D_SAE, seed=2) / 4,
         "W_dec": _rand(D_SAE, D_IN, seed=3) / 4, "b_dec": _rand(D_IN, seed=4) / 4,
         "threshold": _rand(D_SAE, seed=5).abs() / 4}
    np.savez(path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    # Gemma Scope's JumpReLU: pre = x W_enc + b_enc; f = pre * [pre > threshold]; x_hat = f W_dec + b_dec.
    pre = x @ p["W_enc"] + p["b_enc"]
    r = _check(path, x, (pre * (pre > p["threshold"]).float()) @ p["W_dec"] + p["b_dec"], "blocks.1.hook_mlp_out")
    assert r.model_name == "gemma-2-2b"


# ---- refusals and hook names ------------------------------------------------------------------

def test_unknown_folder_lists_formats_tried(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.bin").write_bytes(b"0")
    with pytest.raises(UserError, match=r"no known format; tried sae-lens \(cfg.json \+ sae_weights.safetensors\); "
                                        r"sparsify \(cfg.json \+ sae.safetensors\); dictionary_learning "
                                        r"\(config.json \+ ae.pt\); Gemma Scope \(params.npz\)"):
        load_replacement(str(tmp_path / "odd"))


def test_unknown_name_lists_what_was_tried():
    with pytest.raises(UserError, match=r"tried a local folder \(sae-lens, sparsify, dictionary_learning, "
                                        r"Gemma Scope\), a baseline, a demo SAE .* and a sae-lens release/sae_id"):
        load_replacement("no-such-sae")


def test_gemma_scope_outside_release_folder(tmp_path):
    (tmp_path / "layer_1").mkdir()
    np.savez(tmp_path / "layer_1" / "params.npz", W_enc=np.zeros((2, 3)))
    with pytest.raises(UserError, match="must lie under its release folder"):
        load_replacement(str(tmp_path / "layer_1"))


@pytest.mark.parametrize("name,tl", [
    ("layers.3", "blocks.3.hook_resid_post"), ("model.layers.3", "blocks.3.hook_resid_post"),
    ("layers.3.mlp", "blocks.3.hook_mlp_out"), ("model.layers.3.self_attn", "blocks.3.hook_attn_out"),
    ("resid_post_layer_5", "blocks.5.hook_resid_post"), ("mlp_out_layer_2", "blocks.2.hook_mlp_out"),
    ("attn_out_layer_0", "blocks.0.hook_attn_out"), ("blocks.4.hook_resid_pre", "blocks.4.hook_resid_pre"),
    ("embed_tokens", "embed_tokens"),
])
def test_hook_name_translation(name, tl):
    assert to_tl_hook_name(name) == tl
