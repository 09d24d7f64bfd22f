"""Clean-forward equivalents of 4 SAE variants at blocks.3.hook_resid_post of random:6x512: one
torch thread, clean forward and the variants' pass timed batch by batch in alternation, fastest
of 3 runs per batch (as `sae-harness bench` does). Compares two checkouts in one time window:

    PYTHONPATH=<checkout> python scripts/equivalents.py [TAIL_TOKENS]

TAIL_TOKENS = 1 turns the batched tails off (one tail per forward); a checkout older than the
batched tails takes no argument."""

import sys
import time

import torch

from harness.jobs import bench
from harness.splice.replacements import from_sae
from harness.splice.session import prepare
from harness.splice.splicer import Splicer

MODEL, K, B, CTX, HOOK = "random:6x512", 4, 8, 128, "blocks.3.hook_resid_post"


def random_saes(lm):
    raw = bench.make_saes(lm.d_model, HOOK, MODEL, K, "cpu", "float32", 0)
    return [from_sae(f"sae{i}", f"r{i}", s, {}) for i, s in enumerate(raw)]


def main():
    torch.set_num_threads(1)
    session = prepare(MODEL, device="cpu", dtype="float32", calib_seqs=B, ctx=CTX, batch_size=B,
                      make_replacements=random_saes)
    lm, variants = session.lm, session.variants[1:]
    budget = {"tail_tokens": int(sys.argv[1])} if len(sys.argv) > 1 else {}
    splicer = Splicer(lm, [HOOK], **budget)
    tokens = bench.random_tokens(3 * B, CTX, int(lm.model.cfg.d_vocab), lm.special_ids(), 0)
    batches = [tokens[j * B:(j + 1) * B] for j in range(3)]

    def spliced(batch):
        for _ in splicer.run_variants(batch, variants):
            pass

    best = {"clean": [float("inf")] * 3, "variants": [float("inf")] * 3}
    with torch.no_grad():
        lm.model(batches[0])  # warm-up
        spliced(batches[0])
        for _ in range(3):
            for j, batch in enumerate(batches):
                for side, fn in (("clean", lm.model), ("variants", spliced)):
                    t0 = time.perf_counter()
                    fn(batch)
                    best[side][j] = min(best[side][j], time.perf_counter() - t0)
    clean, var = sum(best["clean"]), sum(best["variants"])
    print(f"equiv {var / clean:.3f} (clean {clean:.2f} s, variants {var:.2f} s); "
          f"tails start at layer {splicer.variant_layer(variants[0])}")


if __name__ == "__main__":
    main()
