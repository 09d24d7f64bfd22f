"""Shared fixtures: tiny random models and SAEs (fast), and the embedded default (slow)."""

from __future__ import annotations

import pytest
import torch


def make_topk_sae(d_in: int, d_sae: int, k: int, hook: str, model_name: str, seed: int = 0):
    """A random sae-lens TopK SAE whose decoder reconstructs roughly (W_enc = W_dec^T)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu",
                        metadata=SAEMetadata(hook_name=hook, model_name=model_name, context_size=16,
                                             prepend_bos=False))
    sae = TopKSAE(cfg)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in)
        w /= w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.05)
    return sae


@pytest.fixture(scope="session")
def tiny_hooked():
    """A 3-layer random HookedTransformer with no tokenizer (so no special tokens)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from harness.model.loading import wrap_hooked

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_ctx=64, d_head=8, n_heads=4, d_mlp=64,
                                  d_vocab=97, act_fn="gelu", seed=0, normalization_type="LN")
    model = HookedTransformer(cfg)
    return wrap_hooked("tiny-hooked", model)


@pytest.fixture(scope="session")
def embedded_dir():
    from harness.model.loading import embedded_checkpoint

    return embedded_checkpoint()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, embedded_dir):
    """A random 4-layer Llama saved as a local HF folder, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf(tiny_hf_dir):
    from harness.model.loading import load_model

    return load_model(str(tiny_hf_dir))
