#!/usr/bin/env python
"""Train the miniature model family shipped in harness/family/ (a Pythia-like suite, in small).

    .venv/bin/python scripts/train_family.py            # the shipped run (see harness/family/manifest.json)
    .venv/bin/python scripts/train_family.py --smoke    # tiny run into a scratch folder

What makes a family usable for a scaling fit (Pythia's design, copied at miniature scale):
every member sees the same tokens in the same order for the same number of steps, with one
tokenizer and one recipe; only the shape changes. The largest member also keeps intermediate
checkpoints at log-spaced token counts, for the checkpoint curve L(D).

1. Tokenizer: a byte-level BPE (the `tokenizers` library) with VOCAB entries, trained on
   `harness.data.documents("train")` (pydoc prose + stdlib source) only. A small vocabulary
   keeps the unembedding from dominating training cost on a CPU.
2. Data: the train documents tokenised, joined with <|endoftext|>, cut into rows of CONTEXT
   tokens; one seeded permutation of the rows per epoch, the same for every member.
3. Models: Llama-shaped (RMSNorm, rotary, SwiGLU MLP of width 8d/3, heads of 32, tied
   embeddings), initialised from `torch.manual_seed(seed)`. AdamW (0.9, 0.95), weight decay 0.1
   on matrices, gradient clipping 1.0, linear warm-up then cosine decay to 10% of the peak
   learning rate, which falls with width (LR_AT_128 * sqrt(128 / d)).
   Because of the cosine schedule an intermediate checkpoint is not a shorter run (its learning
   rate has not been annealed): the checkpoint curve is the one the same run passes through.
4. Evaluation: the loss on the eval split (never trained on) at every checkpoint step, for every
   member; recorded in the manifest as the loss curves, beside the training loss.
5. Export: Hugging Face folders (config.json, model.safetensors, tokenizer files) with the
   weights stored in bfloat16; the manifest records the loss of the stored weights too.

Outputs are built in a temporary folder next to the destination and moved into place at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.data import documents  # noqa: E402

VOCAB = 4096
CONTEXT = 256
HEAD_DIM = 32
LR_AT_128 = 2e-3
EOT = "<|endoftext|>"
# (width, layers): non-embedding parameters from 27k to 1.6M (59x).
SHAPES = [(32, 2), (64, 2), (96, 3), (128, 4), (160, 5)]

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def member_name(width: int, layers: int) -> str:
    return f"d{width}-l{layers}"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "harness" / "family")
    p.add_argument("--steps", type=int, default=1024, help="optimiser steps for every member")
    p.add_argument("--batch-rows", type=int, default=16, help=f"rows of {CONTEXT} tokens per step")
    p.add_argument("--checkpoints", type=int, default=6,
                   help="intermediate checkpoints of the largest member, at steps/2, steps/4, ... (log-spaced)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, for reproducibility)")
    p.add_argument("--smoke", action="store_true", help="tiny run into a scratch folder (for testing the script)")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch_rows, args.checkpoints, args.warmup = 16, 2, 2, 2
        if args.out == REPO / "harness" / "family":
            args.out = Path(tempfile.gettempdir()) / "family_smoke"
    return args


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(docs, trainer=trainer)
    # One special token serves as BOS, EOS and pad, as in GPT-2 and Pythia. No BOS is added
    # when encoding: rows are cut from one stream, as the harness packs its evaluation rows.
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   unk_token=None)


def token_rows(tokenizer, docs: list[str]) -> torch.Tensor:
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // CONTEXT
    return torch.tensor(stream[: n * CONTEXT]).view(n, CONTEXT)


def batch_order(n_rows: int, steps: int, batch_rows: int, seed: int) -> list[torch.Tensor]:
    """Row indices of every step: one seeded permutation per epoch, shared by all members."""
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_rows:
        order.extend(torch.randperm(n_rows, generator=g).tolist())
    return [torch.tensor(order[i * batch_rows:(i + 1) * batch_rows]) for i in range(steps)]


# ---------------------------------------------------------------- models


def make_model(width: int, layers: int, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    ffn = -(-(8 * width // 3) // 32) * 32
    heads = width // HEAD_DIM
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=CONTEXT, tie_word_embeddings=True, rope_theta=10000.0,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.02)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding counted once
    emb = model.get_input_embeddings().weight.numel()
    return {"N_total": total, "N_embedding": emb, "N_non_embedding": total - emb}


def lr_at(step: int, peak: float, steps: int, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def eval_loss(model, rows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token CE over every position of the eval rows (float64 sum)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        x = rows[i:i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll.double())
        count += x[:, 1:].numel()
    model.train()
    return total / count


def save_folder(model, tokenizer, dst: Path) -> None:
    """bfloat16 weights (half the size of float32; loaders cast back on load)."""
    model.to(torch.bfloat16).save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    model.to(torch.float32)


def stored_loss(folder: Path, rows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    return eval_loss(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), rows)


def train_member(width: int, layers: int, args, tokenizer, train_rows, eval_rows, order, stage: Path,
                 keep_checkpoints: bool) -> dict:
    name = member_name(width, layers)
    model = make_model(width, layers, tokenizer, args.seed)
    counts = parameter_counts(model)
    peak = LR_AT_128 * math.sqrt(128 / width)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95), eps=1e-8)
    eval_steps = sorted({args.steps >> i for i in range(args.checkpoints + 1)})
    log(f"{name}: {counts['N_non_embedding']:,} non-embedding parameters ({counts['N_total']:,} in all), "
        f"peak lr {peak:.2e}, {args.steps} steps of {args.batch_rows * CONTEXT} tokens")
    train_curve, eval_curve, checkpoints = [], [], []
    model.train()
    t = time.time()
    running = 0.0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak, args.steps, args.warmup)
        x = train_rows[order[step]]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        done = step + 1
        tokens = done * args.batch_rows * CONTEXT
        if done % 16 == 0 or done == args.steps:
            train_curve.append({"step": done, "tokens": tokens, "train_loss": running / (16 if done % 16 == 0 else done % 16)})
            running = 0.0
        if done in eval_steps:
            point = {"step": done, "tokens": tokens, "eval_loss": eval_loss(model, eval_rows)}
            eval_curve.append(point)
            log(f"{name}: step {done}/{args.steps}, {tokens:,} tokens, eval loss {point['eval_loss']:.4f}, "
                f"{tokens / (time.time() - t):.0f} tok/s")
            if keep_checkpoints and done < args.steps:
                folder = stage / "checkpoints" / f"{name}-step{done:05d}"
                save_folder(model, tokenizer, folder)
                checkpoints.append({"folder": str(folder.relative_to(stage)), "step": done, "tokens": tokens,
                                    "eval_loss_fp32": point["eval_loss"],
                                    "eval_loss_stored": stored_loss(folder, eval_rows)})
    wall = time.time() - t
    folder = stage / name
    save_folder(model, tokenizer, folder)
    return {
        "name": name, "folder": name, "width": width, "layers": layers, "heads": width // HEAD_DIM,
        "mlp": model.config.intermediate_size, **counts, "peak_lr": peak, "steps": args.steps,
        "tokens": args.steps * args.batch_rows * CONTEXT, "train_wall_s": round(wall, 1),
        "eval_loss_fp32": eval_curve[-1]["eval_loss"], "eval_loss_stored": stored_loss(folder, eval_rows),
        "train_curve": train_curve, "eval_curve": eval_curve, "checkpoints": checkpoints,
    }


def git_hash() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    import tokenizers
    import transformers

    docs = documents("train")
    tokenizer = train_tokenizer(docs)
    train_rows = token_rows(tokenizer, docs)
    eval_rows = token_rows(tokenizer, documents("eval"))
    if args.smoke:
        eval_rows = eval_rows[:4]
    order = batch_order(len(train_rows), args.steps, args.batch_rows, args.seed)
    log(f"tokenizer: {len(tokenizer)} entries; train {train_rows.numel():,} tokens in {len(train_rows)} rows, "
        f"eval {eval_rows.numel():,} tokens; {args.steps * args.batch_rows * CONTEXT / train_rows.numel():.2f} epochs")

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        members = []
        for width, layers in SHAPES:
            largest = (width, layers) == SHAPES[-1]
            members.append(train_member(width, layers, args, tokenizer, train_rows, eval_rows, order, stage, largest))
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        manifest = {
            "script": "scripts/train_family.py",
            "git_commit": git_hash(),
            "argv": sys.argv[1:],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__},
            "threads": args.threads,
            "seed": args.seed,
            "data": {"train": "harness.data.documents('train')", "eval": "harness.data.documents('eval')",
                     "train_tokens": train_rows.numel(), "eval_tokens": eval_rows.numel(), "context": CONTEXT,
                     "epochs": args.steps * args.batch_rows * CONTEXT / train_rows.numel()},
            "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab": len(tokenizer), "special": EOT},
            "recipe": {"steps": args.steps, "batch_rows": args.batch_rows, "tokens_per_step": args.batch_rows * CONTEXT,
                       "warmup_steps": args.warmup, "schedule": "linear warm-up, cosine decay to 10% of peak",
                       "lr_at_width_128": LR_AT_128, "lr_rule": "LR_AT_128 * sqrt(128 / width)",
                       "optimizer": "AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices",
                       "grad_clip": 1.0, "storage_dtype": "bfloat16", "head_dim": HEAD_DIM},
            "members": members,
            "largest": members[-1]["name"],
            "size_bytes": size,
            "wall_s": round(time.time() - T0, 1),
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for p in stage.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        stage.chmod(0o755)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        log(f"wrote {out} ({size / 1e6:.1f} MB)")
    finally:
        shutil.rmtree(stage, ignore_errors=True)


if __name__ == "__main__":
    main()
