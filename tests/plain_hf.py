"""Independent references for the splice path: a plain transformers model, forward hooks on its
decoder layers, and a TopK SAE written out from its weights. Nothing here imports harness code,
so a test comparing the harness with these helpers compares two separate computations."""

from __future__ import annotations

import torch


def topk_reconstruct(sae):
    """x -> (x_hat, latents) with a TopK SAE's arithmetic written out from its parameters
    (b_dec subtracted from the input, top-k of the pre-activations, ReLU, linear decoder)."""
    W_enc, b_enc = sae.W_enc.detach(), sae.b_enc.detach()
    W_dec, b_dec = sae.W_dec.detach(), sae.b_dec.detach()
    k = int(sae.cfg.k)
    assert not getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)

    def run(x):
        pre = (x - b_dec) @ W_enc + b_enc
        top = pre.topk(k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return latents @ W_dec + b_dec, latents
    return run


def splice_positions(tokens: torch.Tensor, special_ids, keep_first: bool = True) -> torch.Tensor:
    """Where a splice applies: non-special input tokens, and not position 0 (the attention sink)."""
    at = ~torch.isin(tokens, torch.tensor(sorted(special_ids), dtype=torch.long))
    if keep_first:
        at[:, 0] = False
    return at


@torch.no_grad()
def forward(hf, tokens: torch.Tensor, splices: dict | None = None, special_ids=(), record: dict | None = None,
            keep_first: bool = True, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a plain transformers causal LM with `splices` {decoder layer: reconstruct}
    replacing that layer's output at the splice positions. `record[layer]` gets (x, x_hat,
    latents) as the hook saw them (x is the layer's output before the replacement)."""
    at = splice_positions(tokens, special_ids, keep_first)
    handles = []
    for layer, reconstruct in (splices or {}).items():
        def hook(module, args, out, _rec=reconstruct, _layer=layer):
            x = out[0] if isinstance(out, tuple) else out
            x_hat, latents = _rec(x)
            if record is not None:
                record[_layer] = (x.clone(), x_hat, latents)
            new = torch.where(at[..., None], x_hat, x)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        handles.append(hf.model.layers[layer].register_forward_hook(hook))
    try:
        return hf(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, ctx-1] -log p(next token) in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0]
