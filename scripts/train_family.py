#!/usr/bin/env python
"""Train the miniature model family shipped in harness/family/: annealed runs on a grid of
(width, token budget), for scaling fits that mean what the law assumes.

    .venv/bin/python scripts/train_family.py            # the shipped run; resumable
    .venv/bin/python scripts/train_family.py --smoke    # tiny run into a scratch folder

Design (each choice is what makes a point a point on L(N, D)):
1. Text: scripts/family_corpus.py (Debian documentation prose, ~11.8M tokens; a held-out part
   of the same mixture is the evaluation text). Budgets up to 8.4M tokens stay within one epoch;
   the member's 16.8M reads 1.42 (`batch_order` draws a fresh permutation per epoch, at most 4).
2. Tokenizer: a 4,096-entry byte-level BPE trained on the training split only (a small
   vocabulary keeps the unembedding from dominating training cost on a CPU).
3. Models: Llama-shaped (RMSNorm, rotary, SwiGLU MLP of about 8d/3, tied embeddings), fixed
   depth DEPTH, widths from WIDTHS (non-embedding N from 28k to 7.1M, 254x).
4. Schedule: warm-up-stable-decay (Hägele et al. 2024). One trunk per (width, seed) at constant
   learning rate; at 80% of each token budget D a branch copies the trunk and cools the rate
   down to 0 over the remaining 20% (1 - sqrt shape, their best). Every saved model is
   therefore a finished, annealed run of exactly D tokens, and the runs of one width share
   their first 0.8 D tokens, like Chinchilla's approach-1 runs share nothing but cost 4x more.
   All runs see the same rows in the same order (one seeded permutation).
5. Seed noise: the four smallest widths are trained a second time with another seed (model
   initialisation; same data order), so the fit can be judged against the scatter it must
   respect; the SAE member's width three times, so L(D) at its N rests on means of three.
6. Optimiser: AdamW (0.9, 0.99) - beta2 0.99 at these small batches per Porian et al. 2024 -
   weight decay 0.1 on matrices, clipping 1.0; peak rate LR_AT_128 * sqrt(128 / width), taken
   from the previous family's recipe (no sweep: see the manifest's note).

Resumable: each annealed run is written to harness/family/runs/<name>/ (config.json,
model.safetensors, run.json with its losses and seconds) by a rename when complete; a rerun
skips finished runs and restarts a trunk from its last saved branch point (kept in the cache
folder). The manifest is rebuilt from the run.json files at the end of every invocation.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import family_corpus  # noqa: E402

VOCAB = 4096
CONTEXT = 256
DEPTH = 4
WIDTHS = [24, 32, 48, 64, 96, 128, 192, 384]
BUDGETS = [1_048_576, 2_097_152, 4_194_304, 8_388_608, 16_777_216]  # tokens: 256 to 4,096 steps of 4,096
SEEDED_WIDTHS = [24, 32, 48, 64]  # trained with a second seed too: the seed noise the fit must respect
# The SAE member's width, trained with two more seeds at all five budgets: L(D) at its N curves
# by about as much as one run's seed noise over 16x in D, so each budget is a mean of three.
MEMBER_SEEDS = [1, 2]
# {width: largest budget}: the fifth budget (16.8M tokens, 1.4 epochs) for the SAE member only,
# so L(D) at its N has five points spanning 16x.
MAX_BUDGET: dict[int, int] = {w: 8_388_608 for w in WIDTHS if w != 96}
# {width: smallest budget}: the widest member (it stretches L(N) at 8.4M tokens to ~250x in N)
# from 2.1M tokens: three budgets as for every width, none at a sixth of a token per parameter.
MIN_BUDGET: dict[int, int] = {384: 2_097_152}
SAE_WIDTH = 96  # the member that gets the SAEs: interior, ~19 tokens per parameter at 8M
SAE_BUDGET = 8_388_608
BATCH_ROWS = 16
WARMUP = 50
COOLDOWN = 0.2
LR_AT_128 = 2e-3
EVAL_TOKENS = 131_072
EOT = "<|endoftext|>"
CACHE = Path.home() / ".cache" / "sae-harness" / "family-train"

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def run_name(width: int, seed: int, tokens: int) -> str:
    return f"d{width}-s{seed}-D{tokens // 1024}k"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "harness" / "family")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, for reproducibility)")
    p.add_argument("--smoke", action="store_true", help="tiny run into a scratch folder (for testing the script)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="train these seeds only (two processes can share the work: each run is its own unit)")
    p.add_argument("--only", nargs="*", default=None, metavar="WIDTH:SEED",
                   help="train these (width, seed) pairs only, in this order")
    args = p.parse_args()
    args.widths, args.budgets, args.seeded, args.member_seeds = WIDTHS, BUDGETS, SEEDED_WIDTHS, MEMBER_SEEDS
    args.batch_rows, args.warmup, args.eval_tokens, args.cache = BATCH_ROWS, WARMUP, EVAL_TOKENS, CACHE
    if args.smoke:
        args.widths, args.budgets, args.seeded = [32, 48], [8 * 4 * CONTEXT, 16 * 4 * CONTEXT], [32]
        args.member_seeds = []
        args.batch_rows, args.warmup, args.eval_tokens = 4, 2, 4 * CONTEXT
        if args.out == REPO / "harness" / "family":
            args.out = Path(tempfile.gettempdir()) / "family_smoke"
        args.cache = args.out / ".cache"
    return args


# ---------------------------------------------------------------- tokenizer and data


def tokenizer_and_tokens(args):
    """The BPE (trained once, kept in the output folder) and the train / eval token streams
    (cached as uint16)."""
    from transformers import PreTrainedTokenizerFast

    tok_dir = args.out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(family_corpus.documents("train"), trainer=trainer)
        # One special token serves as BOS, EOS and pad, as in GPT-2 and Pythia.
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                      unk_token=None)
        stage = Path(tempfile.mkdtemp(dir=args.out, prefix=".tokenizer-"))
        tok.save_pretrained(stage)
        stage.rename(tok_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    streams = {}
    args.cache.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        path = args.cache / f"{split}_tokens.npy"
        if not path.exists():
            docs = family_corpus.documents(split)
            ids = tok(docs, add_special_tokens=False).input_ids
            stream = np.fromiter((t for doc in ids for t in (*doc, tok.eos_token_id)), dtype=np.uint16)
            np.save(path.with_suffix(".tmp.npy"), stream)
            path.with_suffix(".tmp.npy").rename(path)
        streams[split] = np.load(path)
    return tok, streams


def rows(stream: np.ndarray, limit: int | None = None) -> torch.Tensor:
    n = len(stream) // CONTEXT
    if limit is not None:
        n = min(n, limit // CONTEXT)
    return torch.from_numpy(stream[: n * CONTEXT].astype(np.int64)).view(n, CONTEXT)


def batch_order(n_rows: int, steps: int, batch_rows: int, max_epochs: int = 4) -> torch.Tensor:
    """Row indices of every step, shared by every run: one seeded permutation per epoch, so no
    row repeats within the first epoch and a longer budget only appends to a shorter one's order.
    At most max_epochs (Muennighoff et al. 2023: up to 4 epochs cost about as little as new data)."""
    epochs = -(-steps * batch_rows // n_rows)
    if epochs > max_epochs:
        raise SystemExit(f"the longest budget needs {steps * batch_rows} rows: more than {max_epochs} epochs of {n_rows}")
    perm = torch.cat([torch.randperm(n_rows, generator=torch.Generator().manual_seed(1234 + e)) for e in range(epochs)])
    return perm[: steps * batch_rows].view(steps, batch_rows)


# ---------------------------------------------------------------- models and schedule


def make_model(width: int, tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = 16 if width < 64 else 32
    ffn = -(-(8 * width // 3) // 16) * 16
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=ffn, num_hidden_layers=DEPTH,
                      num_attention_heads=width // head_dim, num_key_value_heads=width // head_dim,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.02)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    emb = model.get_input_embeddings().weight.numel()
    return {"N_total": total, "N_embedding": emb, "N_non_embedding": total - emb}


def make_optimizer(model, peak: float):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=peak, betas=(0.9, 0.99), eps=1e-8)


def trunk_lr(step: int, peak: float, warmup: int) -> float:
    return peak * min(1.0, (step + 1) / warmup)


def cooldown_lr(step: int, start: int, end: int, peak: float) -> float:
    """1 - sqrt decay from peak at `start` to 0 at `end` (Hägele et al. 2024)."""
    return peak * (1.0 - math.sqrt((step - start + 1) / (end - start)))


def train_steps(model, opt, data: torch.Tensor, order: torch.Tensor, start: int, stop: int, lr) -> float:
    """Steps [start, stop) with lr(step); returns the mean training loss."""
    model.train()
    total = 0.0
    for step in range(start, stop):
        for group in opt.param_groups:
            group["lr"] = lr(step)
        x = data[order[step]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += loss.item()
    return total / max(1, stop - start)


@torch.no_grad()
def eval_loss(model, eval_rows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token CE over every predicted position of the eval rows (float64 sum)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_rows), batch):
        x = eval_rows[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                         reduction="sum").double())
        count += x[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------- one width's runs


def save_run(model, dst: Path, record: dict, eval_rows: torch.Tensor, tok=None) -> dict:
    """Weights in bfloat16 (half the size; loaders cast back), the stored weights' loss, and
    run.json; built under a temporary name, renamed into place when complete."""
    from transformers import AutoModelForCausalLM

    stage = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}-"))
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(stage)
    if tok is not None:
        tok.save_pretrained(stage)
    back = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32)
    record["eval_loss_stored"] = eval_loss(back, eval_rows)
    (stage / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    for p in stage.rglob("*"):
        p.chmod(0o644)
    stage.chmod(0o755)
    stage.rename(dst)
    return record


def budgets_of(width: int, args) -> list[int]:
    """The token budgets trained for this width (every budget in a smoke run)."""
    if args.smoke:
        return args.budgets
    return [D for D in args.budgets if MIN_BUDGET.get(width, 0) <= D <= MAX_BUDGET.get(width, D)]


def planned(args) -> list[tuple[int, int]]:
    """Every (width, seed) trunk of the shipped recipe: each width with seed 0, the seeded widths
    with seed 1, the SAE member's width with its extra seeds."""
    return ([(w, 0) for w in args.widths] + [(w, 1) for w in args.seeded]
            + [(SAE_WIDTH, s) for s in args.member_seeds])


def train_width(width: int, seed: int, args, tok, data, eval_rows, order) -> None:
    """The trunk of (width, seed) and a cooldown branch at every budget not yet saved."""
    budgets = budgets_of(width, args)
    names = {D: run_name(width, seed, D) for D in budgets}
    todo = [D for D in budgets if not (args.out / "runs" / names[D]).exists()]
    if not todo:
        return
    tokens_per_step = args.batch_rows * CONTEXT
    peak = LR_AT_128 * math.sqrt(128 / width)
    model = make_model(width, tok, seed)
    counts = parameter_counts(model)
    opt = make_optimizer(model, peak)
    step = 0
    state_dir = args.cache / f"trunk-d{width}-s{seed}"
    # resume the trunk from the latest saved branch point below the first missing budget
    branch_steps = {D: int(round((1 - COOLDOWN) * D / tokens_per_step)) for D in budgets}
    saved = sorted((int(p.stem.split("-")[1]), p) for p in state_dir.glob("step-*.pt")) if state_dir.exists() else []
    saved = [(s, p) for s, p in saved if s <= branch_steps[todo[0]]]
    trunk_seconds = 0.0
    if saved:
        step, path = saved[-1]
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        trunk_seconds = state["seconds"]
        log(f"d{width} s{seed}: trunk resumed at step {step}")
    log(f"d{width} s{seed}: {counts['N_non_embedding']:,} non-embedding parameters, peak lr {peak:.2e}, "
        f"budgets {[D // 1024 for D in todo]}k tokens")
    for D in budgets:
        start, end = branch_steps[D], D // tokens_per_step
        if start > step:
            t = time.time()
            train_steps(model, opt, data, order, step, start, lambda s: trunk_lr(s, peak, args.warmup))
            trunk_seconds += time.time() - t
            step = start
            state_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "seconds": trunk_seconds},
                       state_dir / f"step-{step:06d}.tmp")
            (state_dir / f"step-{step:06d}.tmp").rename(state_dir / f"step-{step:06d}.pt")
        if D not in todo:
            continue
        t = time.time()
        branch = copy.deepcopy(model)
        branch_opt = make_optimizer(branch, peak)
        branch_opt.load_state_dict(opt.state_dict())
        train_loss = train_steps(branch, branch_opt, data, order, start, end, lambda s: cooldown_lr(s, start, end, peak))
        cool_seconds = time.time() - t
        loss = eval_loss(branch, eval_rows)
        record = {"name": names[D], "width": width, "layers": DEPTH, "seed": seed,
                  "heads": branch.config.num_attention_heads, "mlp": branch.config.intermediate_size, **counts,
                  "D": D, "steps": end, "cooldown_from_step": start, "peak_lr": peak,
                  "tokens_per_parameter": D / counts["N_non_embedding"],
                  "train_loss_cooldown": train_loss, "eval_loss_fp32": loss,
                  "seconds_trunk_to_branch": round(trunk_seconds, 1), "seconds_cooldown": round(cool_seconds, 1),
                  "flop_6ND": 6 * counts["N_non_embedding"] * D}
        keep_tok = tok if (width == SAE_WIDTH and seed == 0 and D == SAE_BUDGET) or args.smoke else None
        save_run(branch, args.out / "runs" / names[D], record, eval_rows, keep_tok)
        log(f"{names[D]}: eval loss {loss:.4f} ({D / counts['N_non_embedding']:.1f} tokens/parameter; "
            f"cooldown {cool_seconds:.0f} s, trunk so far {trunk_seconds:.0f} s)")
    shutil.rmtree(state_dir, ignore_errors=True)


# ---------------------------------------------------------------- manifest


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_manifest(args, tok, streams, eval_rows) -> None:
    import tokenizers
    import transformers

    runs = sorted((json.loads(p.read_text()) for p in (args.out / "runs").glob("*/run.json")),
                  key=lambda r: (r["seed"], r["width"], r["D"]))
    corpus = family_corpus.build()
    train_tokens = int(len(streams["train"]))
    manifest = {
        "script": "scripts/train_family.py",
        "git_commit": git_hash(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__},
        "threads": args.threads,
        "data": {"corpus": "scripts/family_corpus.py", "sources": corpus["sources"],
                 "train_sha256": corpus["train"]["sha256"], "eval_sha256": corpus["eval"]["sha256"],
                 "train_tokens": train_tokens, "eval_tokens_file": "eval_tokens.npy",
                 "eval_tokens": int(eval_rows.numel()), "context": CONTEXT,
                 "max_epochs": max(args.budgets) / train_tokens},
        "tokenizer": {"folder": "tokenizer", "kind": "byte-level BPE (tokenizers)", "vocab": len(tok), "special": EOT},
        "recipe": {"depth": DEPTH, "widths": args.widths, "budgets": args.budgets, "seeded_widths": args.seeded,
                   "member_seeds": args.member_seeds,
                   "max_budget": {str(w): D for w, D in MAX_BUDGET.items()},
                   "min_budget": {str(w): D for w, D in MIN_BUDGET.items()},
                   "batch_rows": args.batch_rows, "tokens_per_step": args.batch_rows * CONTEXT,
                   "warmup_steps": args.warmup, "cooldown_fraction": COOLDOWN,
                   "schedule": "warm-up, constant, 1-sqrt cooldown to 0 over the last 20% of each budget "
                               "(a branch off the constant-rate trunk): every run is annealed",
                   "lr_rule": "LR_AT_128 * sqrt(128 / width)", "lr_at_width_128": LR_AT_128,
                   "lr_note": "no learning-rate sweep (CPU budget); the rule is the previous family's",
                   "optimizer": "AdamW betas (0.9, 0.99), eps 1e-8, weight decay 0.1 on matrices",
                   "grad_clip": 1.0, "storage_dtype": "bfloat16", "N": "non-embedding parameters"},
        "sae_member": run_name(SAE_WIDTH, 0, SAE_BUDGET if not args.smoke else args.budgets[-1]),
        "runs": runs,
        "annealed": True,
        "complete": len(runs) == sum(len(budgets_of(w, args)) for w, _ in planned(args)),
        "train_seconds": round(sum(r["seconds_cooldown"] for r in runs)
                               + sum(max(r["seconds_trunk_to_branch"] for r in runs if (r["width"], r["seed"]) == key)
                                     for key in {(r["width"], r["seed"]) for r in runs}), 1),
    }
    (args.out / "manifest.json.tmp").write_text(json.dumps(manifest, indent=1) + "\n")
    (args.out / "manifest.json.tmp").rename(args.out / "manifest.json")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    tok, streams = tokenizer_and_tokens(args)
    data = rows(streams["train"])
    eval_rows = rows(streams["eval"], args.eval_tokens)
    if not (args.out / "eval_tokens.npy").exists():
        np.save(args.out / "eval_tokens.npy", eval_rows.numpy().astype(np.uint16))
    order = batch_order(len(data), max(args.budgets) // (args.batch_rows * CONTEXT), args.batch_rows)
    log(f"tokenizer {len(tok)} entries; train {data.numel():,} tokens, eval {eval_rows.numel():,}; "
        f"longest budget {max(args.budgets) / data.numel():.2f} epochs")
    plan = [(w, s) for w, s in planned(args) if s in args.seeds]
    if args.only is not None:
        plan = [tuple(int(v) for v in pair.split(":")) for pair in args.only]
    for width, seed in plan:
        train_width(width, seed, args, tok, data, eval_rows, order)
        write_manifest(args, tok, streams, eval_rows)
    log("done")


if __name__ == "__main__":
    main()
