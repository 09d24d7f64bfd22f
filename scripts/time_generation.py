"""Tokens per second of `harness.splice.generate` on the embedded default (for the README).

Greedy, one prompt, N new tokens; the clean model alone and clean + the three demo SAEs in
one batch, with the KV cache (Hugging Face generate) and with the loop without a cache that
recomputes the full forward at every step (the fallback, and what lm-eval's generate_until
did before). Every configuration is checked to produce the same tokens with and without the
cache before its time is reported.

    python scripts/time_generation.py [N_NEW_TOKENS]
"""

from __future__ import annotations

import os
import sys
import time

import torch

from harness.lmeval.backend import hf_tokenizer
from harness.splice.generate import Sampling, StopTracker, generate_no_cache, generate
from harness.splice.session import prepare
from harness.splice.splicer import Splicer

PROMPT = "The capital of France is"


def main(n_new: int = 64) -> None:
    torch.set_grad_enabled(False)
    session = prepare("smollm2-135m", ["l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32"])
    lm, sae_variants = session.lm, session.variants
    tok = hf_tokenizer(lm)
    ids = tok(PROMPT).input_ids
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"prompt {len(ids)} tokens, {n_new} new tokens, greedy")
    for label, variants in (("clean alone", sae_variants[:1]), ("clean + 3 SAEs", sae_variants)):
        generate(lm, variants, ids, 4, tokenizer=tok)  # warm-up
        t0 = time.perf_counter()
        rows = generate(lm, variants, ids, n_new, tokenizer=tok)
        t_cache = time.perf_counter() - t0
        splicer = Splicer(lm, sorted({h for v in variants for h in v.hooks}))
        t0 = time.perf_counter()
        ref = generate_no_cache(lm, splicer, variants, torch.tensor([ids] * len(variants)), n_new, Sampling(),
                                 StopTracker(len(ids), tok.eos_token_id, tok))
        t_loop = time.perf_counter() - t0
        assert ref == rows, "KV-cache generation differs from the loop without a cache"
        n = sum(len(r) for r in rows)
        print(f"{label}: {n} tokens; KV cache {t_cache:.1f} s = {n / t_cache:.1f} tokens/s; "
              f"no cache {t_loop:.1f} s = {n / t_loop:.1f} tokens/s; speed-up {t_loop / t_cache:.1f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
