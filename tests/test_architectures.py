"""Every architecture x hook site: the harness equals the plain Hugging Face forward.

Tiny random models (4 layers, width 64, a 384-token BPE vocabulary trained here on CPython's
pydoc topics) are built with transformers, saved to a folder and set up by `prepare`, the
setup path of every command (model, SAE folders and baselines loaded, checked, calibrated). Sliding windows are 16 tokens and contexts 40, so sliding and
full-attention layers see different masks; logit soft-caps and scales are set low enough to
bite. The references are independent of the harness: a fresh `AutoModelForCausalLM` from the
same folder with a PyTorch forward hook on the spliced module, and lm-eval's own HFLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from lm_eval.api.instance import Instance

from conftest import make_topk_sae
from harness.evals import ce
from harness.lmeval.backend import variant_views
from harness.model.loading import load_model
from harness.errors import UserError
from harness.splice.session import Session, prepare
from harness.splice.splicer import Splicer, splice_hooks
from harness.splice.variants import Variant

WIDTH, WINDOW, CTX, HOOK = 64, 16, 40, "blocks.1.hook_resid_post"


def _config(arch: str, common: dict):
    """(model class, config) of `arch`, with the features that must be replayed switched on.
    Built on demand: each transformers model module imported costs seconds on a busy machine."""
    attn = dict(common, hidden_size=WIDTH, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    makers = {
        "gemma2": lambda: (T.Gemma2ForCausalLM, T.Gemma2Config(  # alternating sliding/full, both soft-caps
            **attn, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=3.0,
            attn_logit_softcapping=5.0, query_pre_attn_scalar=16)),
        "gemma3": lambda: (T.Gemma3ForCausalLM, T.Gemma3TextConfig(  # per-type masks and rotary tables
            **attn, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=3.0,
            query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"] * 2)),
        "gemma": lambda: (T.GemmaForCausalLM, T.GemmaConfig(**attn, head_dim=16)),
        "llama3": lambda: (T.LlamaForCausalLM, T.LlamaConfig(**attn, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
        "mistral": lambda: (T.MistralForCausalLM, T.MistralConfig(**attn, sliding_window=WINDOW)),
        "qwen2": lambda: (T.Qwen2ForCausalLM, T.Qwen2Config(  # sliding window from layer 2 on
            **attn, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
        "qwen3": lambda: (T.Qwen3ForCausalLM, T.Qwen3Config(**attn, head_dim=16)),
        "gpt2": lambda: (T.GPT2LMHeadModel, T.GPT2Config(
            vocab_size=common["vocab_size"], n_layer=4, n_embd=WIDTH, n_head=4, n_positions=256,
            bos_token_id=common["bos_token_id"], eos_token_id=common["eos_token_id"])),
        "gpt_neox": lambda: (T.GPTNeoXForCausalLM, T.GPTNeoXConfig(
            **common, hidden_size=WIDTH, intermediate_size=128, num_attention_heads=4,
            max_position_embeddings=256)),
        "phi3": lambda: (T.Phi3ForCausalLM, T.Phi3Config(**attn, sliding_window=WINDOW)),
        "olmo2": lambda: (T.Olmo2ForCausalLM, T.Olmo2Config(**attn)),
        "granite": lambda: (T.GraniteForCausalLM, T.GraniteConfig(  # logits divided by logits_scaling
            **attn, logits_scaling=0.5, embedding_multiplier=3.0, residual_multiplier=0.5,
            attention_multiplier=0.1)),
        "cohere": lambda: (T.CohereForCausalLM, T.CohereConfig(**attn, logit_scale=0.5)),
    }
    return makers[arch]()


ARCHS = ["gemma2", "gemma3", "gemma", "llama3", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi3",
         "olmo2", "granite"]  # cohere: refused, see test_cohere_is_refused_not_mis_scored


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer()


def make_tokenizer():
    """A 384-token byte-level BPE tokenizer trained on the first 40 pydoc topics (deterministic)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(topics.values())[:40], trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = T.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return tok


def build(arch: str, tokenizer, folder) -> None:
    """Save a seeded random model of `arch`, weights ~N(0, 0.15) so logits reach the soft-caps."""
    common = {"vocab_size": len(tokenizer), "num_hidden_layers": 4, "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    cls, cfg = _config(arch, common)
    torch.manual_seed(0)
    model = cls(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_topk_sae(folder, hook: str, model_folder, seed: int):
    """A random TopK SAE (width 64 -> 128, k 8) for `model_folder`, saved in sae-lens format."""
    sae = make_topk_sae(WIDTH, 128, 8, hook, str(model_folder), seed=seed)
    sae.save_model(folder)
    return sae


@dataclass
class Arch:
    name: str
    folder: Path
    session: Session  # what `prepare` (every command's setup) made of the folder and SAE
    hf: torch.nn.Module  # an independent plain transformers model from the same folder
    sae: object  # the SAE's sae-lens object, as saved

    @property
    def lm(self):
        return self.session.lm

    @property
    def sae_variant(self):
        return self.session.variants[1]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tokenizer, tmp_path_factory) -> Arch:
    folder = tmp_path_factory.mktemp(request.param)
    build(request.param, tokenizer, folder)
    sae_dir = tmp_path_factory.mktemp(f"{request.param}-sae")
    sae = save_topk_sae(sae_dir, HOOK, folder, seed=1)
    session = prepare(str(folder), [str(sae_dir)], calib_seqs=4, ctx=CTX)
    hf = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    return Arch(request.param, folder, session, hf, sae)


def decoder_layers(hf) -> torch.nn.ModuleList:
    """The decoder layer list of a plain HF causal LM, whatever its attribute name."""
    return next(m for m in hf.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 4)


def _replace_output(fn):
    """Forward hook: positions 1.. of a module's (first) output go through fn; 0 keeps its value."""
    def hook(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        y[:, 1:] = fn(x[:, 1:])
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
    return hook


def _replace_input(fn):
    """Forward pre-hook doing the same to a module's first (hidden-state) input."""
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = x.clone()
        y[:, 1:] = fn(x[:, 1:])
        return ((y,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
    return hook


@torch.no_grad()
def plain_ce(hf, tokens, module=None, fn=None, pre=False) -> float:
    """Mean next-token CE over every predicted position of a plain HF forward, optionally with
    the activation at `module` (its output, or its input when pre) replaced by fn(x)."""
    handle = None
    if module is not None:
        handle = (module.register_forward_pre_hook(_replace_input(fn), with_kwargs=True) if pre
                  else module.register_forward_hook(_replace_output(fn)))
    try:
        logits = hf(input_ids=tokens).logits
    finally:
        if handle is not None:
            handle.remove()
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean())


def _tokens(n_seq: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(3, 384, (n_seq, CTX))  # ids 0-2 are special: every position is in T


def _ce(session: Session, tokens) -> dict[str, dict]:
    """The CE suite as the `ce` command runs it on a prepared session."""
    return ce.evaluate(session.lm, session.variants, tokens, 2, session.calib_tokens, n_boot=10).by_variant()


def reconstruct(sae):
    return lambda x: sae.decode(sae.encode(x))


def test_ce_clean_spliced_zero_equal_plain_hf(arch):
    tokens = _tokens(4)
    rec = _ce(arch.session, tokens)[arch.sae_variant.name]
    layer = decoder_layers(arch.hf)[1]
    assert rec["ce_clean"] == pytest.approx(plain_ce(arch.hf, tokens), abs=1e-5)
    assert rec["ce_spliced"] == pytest.approx(plain_ce(arch.hf, tokens, layer, reconstruct(arch.sae)), abs=1e-5)
    assert rec["ce_zero"] == pytest.approx(plain_ce(arch.hf, tokens, layer, torch.zeros_like), abs=1e-5)
    # The splices move CE by far more than the tolerance, so the equalities above are not vacuous.
    assert abs(rec["ce_zero"] - rec["ce_clean"]) > 5e-4 and abs(rec["dce"]) > 5e-4


def test_logit_processing_bites(arch):
    """Where the model processes its logits (soft-cap, scaling), lm_head(final hidden state) is
    far from them here, so the CE test above would catch a tail that skipped it."""
    with torch.no_grad():
        out = arch.hf(input_ids=_tokens(2), output_hidden_states=True)
    raw = arch.hf.get_output_embeddings()(out.hidden_states[-1])
    gap = float((raw - out.logits).abs().max())
    if arch.name in ("gemma2", "gemma3", "granite"):
        assert gap > 0.5
    else:
        assert gap < 1e-5


def test_last_block_splice_runs_only_the_head(arch):
    """A splice of the last block's output starts after it: the shared residual is spliced and
    only the final norm and the head run (soft-caps and scalings included), equal to a plain
    forward hook on the last decoder layer; with no splice, to the model's own forward."""
    last = "blocks.3.hook_resid_post"
    splicer = Splicer(arch.lm, [last])
    assert splicer.start_layer == 4 and splicer.block_cost([Variant("v", {})])["blocks_shared"] == 4
    tokens = _tokens(2, 7)
    pre = splicer.prefix(tokens)
    sae = arch.sae_variant.parts[HOOK]  # width 64 fits every block's output
    got = splicer.tail(pre, splice_hooks(Variant("s", {last: sae}), splicer.splice_mask(tokens, None)))
    handle = decoder_layers(arch.hf)[3].register_forward_hook(_replace_output(reconstruct(arch.sae)))
    try:
        with torch.no_grad():
            want = arch.hf(input_ids=tokens).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    with torch.no_grad():
        clean = arch.hf(input_ids=tokens).logits
    torch.testing.assert_close(splicer.tail(pre), clean, rtol=0, atol=1e-4)
    assert (got - clean).abs().max() > 1e-2


def _loglikelihood(lm_obj, pairs):
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    return [ll for ll, _ in lm_obj.loglikelihood(reqs)]


def test_backend_loglikelihoods_equal_hflm(arch):
    from lm_eval.models.huggingface import HFLM
    from pydoc_data.topics import topics

    text = topics["assert"]
    pairs = [(text[:200], text[200:230]), (text[300:420], " the"), (text[300:420], " assert"), ("x", " = 1")]
    ours = variant_views(arch.lm, arch.session.variants[:1], batch_size=2)[0]
    ref = HFLM(pretrained=str(arch.folder), batch_size=2, device="cpu")
    assert len(ours.tok_encode(pairs[0][0] + pairs[0][1])) > 2 * WINDOW  # crosses the sliding window
    np.testing.assert_allclose(_loglikelihood(ours, pairs), _loglikelihood(ref, pairs), rtol=0, atol=1e-4)


def test_greedy_generation_equals_hf_generate(arch):
    """The backend's greedy decoding (clean and SAE-spliced, batched, KV cache) equals transformers'
    `generate` (KV cache; the splice hook leaves absolute position 0 alone)."""
    prompt = "The value of x is"
    req = [Instance(request_type="generate_until", doc={}, idx=0,
                    arguments=(prompt, {"until": ["\x00\x00"], "max_gen_toks": 12}))]
    views = variant_views(arch.lm, arch.session.variants)
    got = {v.variant.name: v.generate_until(req)[0] for v in views}
    sae = reconstruct(arch.sae)

    def spliced(module, args, out):  # prefill: positions 1..; later steps: the new token
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        start = 1 if x.shape[1] > 1 else 0
        y[:, start:] = sae(x[:, start:])
        return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    ids = torch.tensor([views[0].tok_encode(prompt)])
    eos = arch.hf.config.eos_token_id
    want = {}
    for variant in arch.session.variants:
        handle = decoder_layers(arch.hf)[1].register_forward_hook(spliced) if variant.parts else None
        try:
            with torch.no_grad():
                out = arch.hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=eos)
        finally:
            if handle is not None:
                handle.remove()
        new = out[0, ids.shape[1]:].tolist()
        want[variant.name] = arch.lm.tokenizer.decode(new[:new.index(eos)] if eos in new else new)
    assert got == want and len(set(got.values())) == 2


def test_cohere_is_refused_not_mis_scored(tokenizer, tmp_path):
    """TransformerBridge's own Cohere forward differs from Hugging Face's (its RoPE): refused by name."""
    build("cohere", tokenizer, tmp_path)
    lm = load_model(str(tmp_path))
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = _tokens(1)
    with torch.no_grad():
        gap = (lm.model.original_model(input_ids=tokens).logits - hf(input_ids=tokens).logits).abs().max()
    assert gap > 1e-2  # the reason for the refusal; drop cohere from BRIDGE_MISMATCH once this fails
    with pytest.raises(UserError, match=r"^cohere is not supported: TransformerBridge 3\.9 rotates"):
        Splicer(lm, [HOOK])


# -- refusals ------------------------------------------------------------------------------
BLOCK_1_SITE = "blocks.1.hook_mlp_out"  # branches at block 1 (HOOK, block 1's output, at block 2)


@pytest.fixture(scope="module")
def llama_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3-sites")
    build("llama3", tokenizer, folder)
    return folder


def test_state_passed_between_layers_is_refused(llama_folder):
    """A model whose layer 2 reads what layer 0 left behind cannot be replayed from layer 1."""
    lm = load_model(str(llama_folder))
    layers = lm.model.original_model.model.layers
    stash = {}
    layers[0].register_forward_hook(lambda m, a, out: stash.update(x=out[0] if isinstance(out, tuple) else out))
    layers[2].register_forward_pre_hook(lambda m, a: (a[0] + stash.pop("x", 0),) + tuple(a[1:]) if a else None)
    with pytest.raises(UserError, match=r"replaying it from block 1 differs from its own forward"):
        Splicer(lm, [BLOCK_1_SITE])


def test_shared_key_values_are_refused(llama_folder):
    lm = load_model(str(llama_folder))
    lm.model.original_model.config.num_kv_shared_layers = 2
    with pytest.raises(UserError, match=r"reuse the keys and values of earlier layers \(num_kv_shared_layers\)"):
        Splicer(lm, [HOOK])


def test_looped_block_is_refused(llama_folder):
    """A forward that runs block 1 twice (looped depth) cannot be replayed from block 1."""
    lm = load_model(str(llama_folder))
    blocks = lm.model.blocks

    def run_block_1_again(module, args, kwargs, out):
        blocks[1](*args, **kwargs)  # output unused: only the second call matters
    blocks[2].register_forward_hook(run_block_1_again, with_kwargs=True)
    with pytest.raises(UserError, match=r"runs block 1 2 times per forward \(looped layers\)"):
        Splicer(lm, [BLOCK_1_SITE])


def test_attention_pattern_is_not_a_splice_site(llama_folder):
    with pytest.raises(UserError, match=r"^blocks\.1\.attn\.hook_pattern is \[batch, head, query, key\]"):
        prepare(str(llama_folder), ["zero@blocks.1.attn.hook_pattern"])


# -- hook sites on the tiny Llama-3 ---------------------------------------------------------
SITES = ["resid_pre", "resid_post", "attn_out", "mlp_out"]
Z = "blocks.1.attn.hook_z"  # [batch, pos, 4 heads, 16]


@pytest.fixture(scope="module")
def sites(llama_folder, tmp_path_factory):
    """One prepared session splicing a TopK SAE at each site of block 1, a sae-lens hook_z SAE
    (saved with `reshape_activations: hook_z`) and PCA / neuron baselines at hook_z; the CE
    suite's records on one token set; the plain HF model; the SAEs as saved."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    saes, specs = {}, []
    for i, kind in enumerate(SITES):
        folder = tmp_path_factory.mktemp(kind)
        saes[kind] = save_topk_sae(folder, f"blocks.1.hook_{kind}", llama_folder, seed=10 + i)
        specs.append(str(folder))
    torch.manual_seed(5)
    zsae = StandardSAE(StandardSAEConfig(d_in=WIDTH, d_sae=96, reshape_activations="hook_z",
                                         metadata=SAEMetadata(hook_name=Z, model_name=str(llama_folder))))
    with torch.no_grad():
        for p in zsae.parameters():
            p.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("z-sae")
    zsae.save_model(folder)
    saes["z"] = zsae
    specs += [str(folder), f"pca:8@{Z}", f"neurons:8@{Z}"]
    session = prepare(str(llama_folder), specs, calib_seqs=4, ctx=CTX)
    tokens = _tokens(4, 3)
    hf = T.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    return session, _ce(session, tokens), tokens, hf, saes


def _module(hf, site):
    """(module, pre) of the HF module whose output (or input) a TransformerLens site equals."""
    layer = hf.model.layers[1]
    return {"resid_pre": (layer, True), "resid_post": (layer, False), "attn_out": (layer.self_attn, False),
            "mlp_out": (layer.mlp, False), "attn.hook_z": (layer.self_attn.o_proj, True)}[site]


@pytest.mark.parametrize("site", SITES)
def test_residual_and_sublayer_sites_equal_hf_module_hooks(sites, site):
    session, recs, tokens, hf, saes = sites
    module, pre = _module(hf, site)
    sae_name = next(v.name for v in session.variants if v.hooks == [f"blocks.1.hook_{site}"])
    got_sae, got_zero = recs[sae_name]["ce_spliced"], recs[f"zero@1.{site}"]["ce_spliced"]
    assert got_sae == pytest.approx(plain_ce(hf, tokens, module, reconstruct(saes[site]), pre), abs=1e-5)
    assert got_zero == pytest.approx(plain_ce(hf, tokens, module, torch.zeros_like, pre), abs=1e-5)


def test_hook_z_baselines_on_the_flattened_activation(sites):
    """zero / mean / pca / neurons at attn.hook_z act on the 64-wide flattened activation: the
    same operation on o_proj's input in plain PyTorch, fitted on the session's calibration
    batch at the positions the splice acts on (ordinary tokens, not position 0)."""
    session, recs, tokens, hf, _ = sites
    calib = session.calib_tokens
    seen = []
    handle = hf.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        hf(input_ids=calib)
    handle.remove()
    where = calib >= 3  # ids 0-2 are the special tokens
    where[:, 0] = False
    acts = seen[0][where].double()
    mean = acts.mean(0)
    _, _, vh = np.linalg.svd((acts - mean).numpy(), full_matrices=False)
    comps = torch.from_numpy(vh[:8])

    def pca(x):
        return ((((x.double() - mean) @ comps.T) @ comps) + mean).float()

    def neurons(x):
        keep = x.abs() >= x.abs().topk(8, -1).values[..., -1:]
        return torch.where(keep, x, torch.zeros_like(x))

    o_proj, _ = _module(hf, "attn.hook_z")
    want = {"zero": torch.zeros_like, "mean": lambda x: mean.float().expand_as(x), "pca:8": pca, "neurons:8": neurons}
    for name, fn in want.items():
        got = recs[f"{name}@1.attn.z"]["ce_spliced"]
        assert got == pytest.approx(plain_ce(hf, tokens, o_proj, fn, pre=True), abs=1e-5), name
    assert 0 < recs["pca:8@1.attn.z"]["explained_variance"] < 1


def test_sae_lens_hook_z_sae_splices_like_plain_pytorch(sites):
    """The sae-lens hook_z SAE (loaded from its folder by `prepare`) splices as
    x_hat = relu((z - b_dec) W_enc + b_enc) W_dec + b_dec on z flattened over heads."""
    session, recs, tokens, hf, saes = sites
    sae = saes["z"]
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach().double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))

    def by_hand(x):
        return (torch.relu((x.double() - b_dec) @ W_enc + b_enc) @ W_dec + b_dec).float()

    z = torch.randn(2, 3, 4, 16)  # sae-lens' own hook_z path on [batch, pos, heads, d_head] agrees
    torch.testing.assert_close(sae.decode(sae.encode(z)), by_hand(z.flatten(2)).reshape(z.shape), rtol=0, atol=1e-5)
    name = next(v.name for v in session.variants if v.hooks == [Z] and v.parts[Z].kind == "sae")
    o_proj, _ = _module(hf, "attn.hook_z")
    assert recs[name]["ce_spliced"] == pytest.approx(plain_ce(hf, tokens, o_proj, by_hand, pre=True), abs=1e-5)
    assert recs[name]["l0"] > 0 and recs[name]["dce"] != 0
