"""Next-token statistics of many variants, a chunk of positions at a time.

The logits of one batch are [batch, context, vocabulary]: for SmolLM2 at batch 8 x 128 tokens
200 MB per variant in float32, for a 262k vocabulary at 8 x 1024 tokens 8.6 GB. The CE suite
needs from them only a few numbers per position: -log p(next token), KL(clean || variant),
and the 3 most likely tokens. So the tails stop at the head's input (the final norm's
output, [batch, context, d]), and here the head runs on a chunk of positions, every variant's
numbers are taken from that chunk, and the chunk is dropped. Peak memory for the logits side
is then `positions_per_chunk` x vocabulary x a few float32 tensors, set by a byte budget.

Per position, with z the logits and lse = logsumexp(z):
    -log p(target) = lse - z[target]
    KL(clean || v) = sum_i p_c,i (log p_c,i - log p_v,i) = (lse_v - lse_c) - sum_i p_c,i (z_v,i - z_c,i)
    top-3: the 3 largest z, with probabilities exp(z - lse)
The KL form reads each chunk once per variant and is exactly 0 where a variant's logits equal
the clean ones. These are the same quantities the unchunked log-softmax gives, up to float32
rounding (tests compare them at 1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from harness.errors import UserError
from harness.model.timing import sections

# float32 tensors of one chunk alive at once: clean logits and probabilities, a variant's
# logits, their difference, and logsumexp's work space.
LIVE_TENSORS = 6
GPU_BUDGET = 2 * 2**30  # bytes for the logits side on a GPU: sized for a 24 GB card
# On a CPU smaller chunks stay in cache: measured on random:6x512 (49k vocabulary, 1 thread),
# the CE suite took 9.5-9.8 s at 64-256 MiB, 11.3 s at 2 GiB and 13.0 s at 16 MiB.
CPU_BUDGET = 256 * 2**20
DEFAULT_BUDGET = GPU_BUDGET


def default_budget(device) -> int:
    """The logits budget when none is given: GPU_BUDGET on CUDA, CPU_BUDGET elsewhere."""
    return GPU_BUDGET if str(device).startswith("cuda") else CPU_BUDGET


def positions_per_chunk(vocab: int, budget: int) -> int:
    """How many positions one chunk may hold under `budget` bytes (UserError below one)."""
    per_position = vocab * 4 * LIVE_TENSORS
    if budget < per_position:
        raise UserError(f"the logits budget ({budget:,} bytes) is too small for one position: a vocabulary of "
                        f"{vocab:,} needs {per_position:,} bytes per position (--logits-budget)")
    return budget // per_position


@dataclass
class Stats:
    """Per position [N, P]: -log p(target), the 3 most likely tokens and their probabilities,
    and (for a variant) KL(clean || variant)."""
    nll: torch.Tensor
    top_ids: torch.Tensor
    top_p: torch.Tensor
    kl: torch.Tensor | None = None


def _stats(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Stats]:
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(-1, targets[..., None])[..., 0]
    top = z.topk(3, dim=-1)
    return z, lse, Stats(nll, top.indices.to(torch.int32), (top.values - lse[..., None]).exp())


def _constant(head, h: torch.Tensor):
    """Logits of a one-position head input [1, 1, d]: (z [vocab], logsumexp, top-3 ids, top-3 p)."""
    z = head(h).float()[0, 0]
    lse = torch.logsumexp(z, -1)
    top = z.topk(3)
    return z, lse, top.indices.to(torch.int32), (top.values - lse).exp()


@torch.no_grad()
def chunked_stats(head: Callable[[torch.Tensor], torch.Tensor], clean: torch.Tensor, variants: list[torch.Tensor],
                  targets: torch.Tensor, budget: int = DEFAULT_BUDGET, vocab: int | None = None,
                  profile=None) -> tuple[Stats, list[Stats]]:
    """Stats of the clean model and every variant over all positions of `targets` [B, T].

    `clean`, `variants[i]`: head inputs [B, >= T, d] (positions past T are ignored); `head`
    maps [1, P, d] to logits [1, P, vocab]. Positions are taken in chunks of
    `positions_per_chunk(vocab, budget)` over the flattened [B * T]. A variant given as [1, 1, d]
    is the same at every position (`Splicer.constant_tail`): its head runs once, and per chunk
    only its dot product with the clean probabilities is left to compute. `profile`
    (timing.Sections) times the head apart from the arithmetic on its logits."""
    section = sections(profile)
    B, T = targets.shape
    flat_t = targets.reshape(1, B * T)
    hs = [h if h.shape[:2] == (1, 1) else h[:, :T].reshape(1, B * T, -1) for h in [clean, *variants]]
    consts = {j: _constant(head, h) for j, h in enumerate(hs) if j and h.shape[1] == 1 and B * T > 1}
    step = positions_per_chunk(vocab, budget) if vocab else B * T
    parts: list[list[Stats]] = [[] for _ in hs]
    for i in range(0, B * T, step):
        tgt = flat_t[:, i:i + step]
        with section("head (unembedding)"):
            z = head(hs[0][:, i:i + step]).float()
        with section("log-softmax, KL, top-3"):
            z_c, lse_c, s_c = _stats(z, tgt)
            parts[0].append(s_c)
            p_c = (z_c - lse_c[..., None]).exp()
            if consts:
                pz_c = (p_c * z_c).sum(-1)  # sum_i p_c,i z_c,i: shared by every constant variant
            for j, (z_1, lse_1, top_ids, top_p) in consts.items():
                n = tgt.shape[1]
                s_v = Stats(lse_1 - z_1[tgt], top_ids.expand(1, n, 3), top_p.expand(1, n, 3))
                s_v.kl = (lse_1 - lse_c) - (p_c @ z_1 - pz_c)
                parts[j].append(s_v)
        for j, h in enumerate(hs[1:], start=1):
            if j in consts:
                continue
            with section("head (unembedding)"):
                z = head(h[:, i:i + step]).float()
            with section("log-softmax, KL, top-3"):
                z_v, lse_v, s_v = _stats(z, tgt)
                diff = (z_v - z_c).view(-1, z_c.shape[-1], 1)
                cross = torch.bmm(p_c.view(-1, 1, z_c.shape[-1]), diff).view(lse_v.shape)
                s_v.kl = (lse_v - lse_c) - cross
                parts[j].append(s_v)
                del z, z_v, diff
        del z_c, p_c

    def joined(chunks: list[Stats]) -> Stats:
        cat = {name: torch.cat([getattr(c, name) for c in chunks], dim=1) for name in ("nll", "top_ids", "top_p")}
        out = Stats(cat["nll"].view(B, T), cat["top_ids"].view(B, T, 3), cat["top_p"].view(B, T, 3))
        if chunks[0].kl is not None:
            out.kl = torch.cat([c.kl for c in chunks], dim=1).view(B, T)
        return out

    return joined(parts[0]), [joined(p) for p in parts[1:]]
