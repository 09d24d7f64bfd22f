#!/usr/bin/env python
"""Train the three demo TopK SAEs shipped in harness/demo_saes/ for the embedded default model,
or (`--family`) the three TopK SAEs of the family member d96 in harness/family/saes/.

    .venv/bin/python scripts/train_demo_saes.py            # the shipped run (took 48 min on 2 CPU cores shared with other jobs)
    .venv/bin/python scripts/train_demo_saes.py --family   # the family's SAEs (see harness/family/saes/README.md)
    .venv/bin/python scripts/train_demo_saes.py --smoke    # tiny run into a scratch folder

Everything runs offline on CPU with sae-lens' own code:

1. Text: `harness.text.builtin.documents("train")` (pydoc prose + stdlib source; the eval split is never
   read). sae-lens' `pretokenize_dataset` packs it into rows of CONTEXT tokens: BOS
   (<|im_start|>, SmolLM2's `bos_token_id`) at position 0 of every row and BOS between
   concatenated documents, the layout sae-lens' ActivationsStore builds itself from raw text
   when `prepend_bos=True`. (For a pre-tokenised dataset the store uses rows as they are, so
   the BOS has to be in the rows.) Rows are shuffled with the seed; the last EVAL_SEQS rows are
   held out and never trained on.
2. Activations: one pass of the model (sae-lens' `HookedProxyLM` over AutoModelForCausalLM and
   its multi-hook `ActivationsStore`, stopping after the deepest hook) captures layer 15 and
   layer 22 at once. They are written in the format of sae-lens' CacheActivationsRunner
   (a `datasets` folder: one Array2D column per hook + token_ids), one folder per hook, so the
   two layer-15 SAEs share one activation pass and the model runs once for all three SAEs.
3. Training: `LanguageModelSAETrainingRunner` with `use_cached_activations=True`, once per SAE,
   for EPOCHS passes over the cached activations. Special tokens (BOS/EOS/pad) are excluded
   from training (`exclude_special_tokens`), as the harness excludes them from its token set:
   SmolLM2's BOS position carries a ~25k-norm attention-sink activation.
4. Export: sae-lens format (cfg.json + sae_weights.safetensors + sparsity.safetensors), weights
   stored as float16 to keep the package small (cfg.json keeps dtype float32: sae-lens casts on
   load). metadata.model_name is the spec name `smollm2-135m`; metadata.hook_name stays the HF
   module path. training.json beside each SAE records the full recipe and measured numbers.
5. Evaluation on the held-out rows with a plain torch loop (HF model + forward hooks + the
   shipped SAEs loaded with `SAE.load_from_disk(..., dtype="float32")`), then README.md.

Outputs are built in a temporary folder next to the destination and moved into place at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import argparse
import hashlib
import json
import logging
import random
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from harness.text.builtin import documents  # noqa: E402
from harness.model.loading import EMBEDDED_DEFAULT, embedded_checkpoint  # noqa: E402

CONTEXT = 128
D_MODEL = 576


@dataclass(frozen=True)
class Spec:
    name: str
    layer: int
    width: int
    k: int

    @property
    def hook(self) -> str:
        return f"model.layers.{self.layer}"

    @property
    def tl_hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"


SPECS = [
    Spec("l15-w2304-k32", 15, 2304, 32),
    Spec("l15-w1152-k16", 15, 1152, 16),
    Spec("l22-w1152-k32", 22, 1152, 32),
]
MODEL_NAME = EMBEDDED_DEFAULT  # metadata.model_name of the exported SAEs

# --family: the SAE member of the miniature suite (harness/family: width 96, 4 blocks, 8.4M
# tokens, an interior member); a good SAE (4x wide, k 16) and a small sparse one (2x wide, k 4)
# at block 2, trained on the family's own training text.
FAMILY_MODEL = "harness/family/runs/d96-s0-D8192k"
FAMILY_SPECS = [Spec("l2-w768-k32", 2, 768, 32), Spec("l2-w384-k16", 2, 384, 16), Spec("l2-w192-k4", 2, 192, 4)]
FAMILY_TEXT = "scripts/family_corpus.py documents('train')"

T0 = time.time()


def text_source() -> str:
    return FAMILY_TEXT if MODEL_NAME == FAMILY_MODEL else "harness.text.builtin.documents('train')"


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "harness" / "demo_saes")
    p.add_argument("--train-seqs", type=int, default=2048, help="rows of 128 tokens whose activations are cached and trained on (a multiple of 8)")
    p.add_argument("--eval-seqs", type=int, default=64, help="held-out rows (the last rows after shuffling)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the cached activations")
    p.add_argument("--batch-tokens", type=int, default=1024, help="SAE training batch size in tokens")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed, for reproducibility)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the activation cache here (default: a temp dir, deleted)")
    p.add_argument("--smoke", action="store_true", help="tiny run into a scratch folder (for testing the script)")
    p.add_argument("--family", action="store_true", help=f"the SAEs of {FAMILY_MODEL} (harness/family/saes)")
    args = p.parse_args()
    if args.family:
        global D_MODEL, SPECS, MODEL_NAME
        D_MODEL, SPECS, MODEL_NAME = 96, FAMILY_SPECS, FAMILY_MODEL
        if args.out == REPO / "harness" / "demo_saes":
            args.out = REPO / "harness" / "family" / "saes"
    if args.smoke:
        args.train_seqs, args.eval_seqs, args.epochs = 32, 16, 2
        if args.out == REPO / "harness" / "demo_saes":
            args.out = Path(tempfile.gettempdir()) / "demo_saes_smoke"
    return args


# ---------------------------------------------------------------- data


def tokenised_rows(tokenizer, folder: Path, seed: int):
    from datasets import Dataset
    from sae_lens.config import PretokenizeRunnerConfig
    from sae_lens.pretokenize_runner import pretokenize_dataset

    if MODEL_NAME == FAMILY_MODEL:
        import family_corpus

        docs = family_corpus.documents("train")
    else:
        docs = documents("train")
    source = text_source()
    cfg = PretokenizeRunnerConfig(
        tokenizer_name=str(folder),
        dataset_path=source,
        context_size=CONTEXT,
        shuffle=True,
        seed=seed,
        num_proc=1,
        pretokenize_batch_size=None,  # one batch: documents are concatenated across the whole split
        begin_batch_token="bos",
        begin_sequence_token=None,
        sequence_separator_token="bos",
    )
    rows = pretokenize_dataset(Dataset.from_dict({"text": docs}), tokenizer, cfg)
    return rows, cfg, len(docs)


# ---------------------------------------------------------------- activation cache


def cache_activations(model, train_rows, hooks: list[str], cache_root: Path, batch: int) -> dict[str, Path]:
    """One forward pass per batch for all hooks; write sae-lens' cached-activations format."""
    from datasets import Array2D, Dataset, Features, Sequence, Value, concatenate_datasets
    from sae_lens.training.activations_store import ActivationsStore

    store = ActivationsStore.from_config_multi_hook(
        model,
        dataset=train_rows,
        hook_names=hooks,
        hook_d_ins={h: D_MODEL for h in hooks},
        streaming=False,
        context_size=CONTEXT,
        store_batch_size_prompts=batch,
        total_training_tokens=len(train_rows) * CONTEXT,
        prepend_bos=True,
        device="cpu",
        dtype="float32",
    )
    n = len(train_rows)
    shards: dict[str, list] = {h: [] for h in hooks}
    features = {
        h: Features(
            {h: Array2D(shape=(CONTEXT, D_MODEL), dtype="float32"), "token_ids": Sequence(Value("int32"), length=CONTEXT)}
        )
        for h in hooks
    }
    done, t = 0, time.time()
    while done < n:
        size = min(batch, n - done)
        tokens = store.get_batch_tokens(batch_size=size, raise_at_epoch_end=True)
        acts = store.get_multi_hook_activations(tokens)
        for h in hooks:
            shards[h].append(
                Dataset.from_dict(
                    {h: acts[h].float().numpy(), "token_ids": tokens.to(torch.int32).numpy()}, features=features[h]
                )
            )
        done += size
        rate = done * CONTEXT / (time.time() - t)
        log(f"cached {done}/{n} rows ({done * CONTEXT} tokens, {rate:.0f} tok/s)")
    paths = {}
    for h in hooks:
        path = cache_root / h
        concatenate_datasets(shards[h]).save_to_disk(str(path))
        paths[h] = path
    return paths


# ---------------------------------------------------------------- training


def train_one(spec: Spec, args, folder: Path, model, train_rows, cache_path: Path, raw_out: Path, special: list[int], unique: int):
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    # sae-lens counts training tokens after dropping special-token positions: `unique` is the
    # number of non-special positions in the cached rows, so this is `epochs` passes over them.
    tokens = unique * args.epochs
    steps = tokens // args.batch_tokens
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=D_MODEL,
            d_sae=spec.width,
            k=spec.k,
            normalize_activations="expected_average_only_in",
            dtype="float32",
            device="cpu",
        ),
        model_name=str(folder),
        model_class_name="AutoModelForCausalLM",
        hook_name=spec.hook,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT,
        use_cached_activations=True,
        cached_activations_path=str(cache_path),
        prepend_bos=True,
        sequence_separator_token="bos",
        exclude_special_tokens=special,
        training_tokens=tokens,
        train_batch_size_tokens=args.batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=max(32, 4 * args.batch_tokens // CONTEXT),
        lr=args.lr,
        lr_scheduler_name="constant",
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=max(1, steps // 5),
        dead_feature_window=50,
        feature_sampling_window=max(1, steps // 4),
        n_batches_for_norm_estimate=16,
        device="cpu",
        seed=args.seed,
        dtype="float32",
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=str(raw_out),
        verbose=False,
    )
    # sae-lens does not seed torch itself: the SAE init and the activation shuffles use the
    # global generator, so seed it here (per SAE, so each run is reproducible on its own).
    seed_everything(args.seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=train_rows, override_model=model)
    t = time.time()
    sae = runner.run()
    wall = time.time() - t
    info = {
        "training_tokens": tokens,
        "unique_tokens": unique,
        "epochs": args.epochs,
        "train_batch_size_tokens": args.batch_tokens,
        "steps": steps,
        "lr": args.lr,
        "lr_schedule": f"linear warm-up {cfg.lr_warm_up_steps} steps, constant, linear decay to 0 over the last {cfg.lr_decay_steps} steps",
        "training_wall_s": round(wall, 1),
        "sae_lens_final_window_l0": sae.cfg.metadata.l0,
        "sae_lens_num_dead_features": sae.cfg.metadata.num_dead_features,
        "runner_cfg": _sanitised_runner_cfg(cfg.to_dict(), folder),
    }
    return info


def _sanitised_runner_cfg(d: dict, folder: Path) -> dict:
    """The runner config without this machine's paths."""
    out = json.loads(json.dumps(d, default=str))
    out["model_name"] = MODEL_NAME
    out["cached_activations_path"] = "<temporary activation cache>"
    out["output_path"] = "<temporary>"
    out["dataset_path"] = f"{text_source()} via sae_lens pretokenize_dataset (see training.json)"
    return out


# ---------------------------------------------------------------- export


def export(spec: Spec, raw: Path, dst: Path, info: dict, data_info: dict) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    state = load_file(str(raw / "sae_weights.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(dst / "sae_weights.safetensors"))
    if (raw / "sparsity.safetensors").exists():
        shutil.copy2(raw / "sparsity.safetensors", dst / "sparsity.safetensors")
    cfg = json.loads((raw / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["hook_name"] == spec.hook, meta["hook_name"]
    meta["model_name"] = MODEL_NAME
    meta["dataset_path"] = data_info["source"]
    meta["tl_hook_name"] = spec.tl_hook
    meta["weights_stored_as"] = "float16"
    meta["training"] = {
        k: info[k]
        for k in ("training_tokens", "unique_tokens", "epochs", "train_batch_size_tokens", "steps", "lr", "lr_schedule")
    } | {"seed": data_info["seed"], "script": "scripts/train_demo_saes.py"}
    (dst / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(folder: Path, eval_rows: torch.Tensor, sae_dirs: dict[str, Path], special: list[int], bos_id: int, batch: int = 16) -> dict:
    """EV / L0 / dead fraction of each SAE on the held-out rows, over non-special positions."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    saes = {name: SAE.load_from_disk(str(path), dtype="float32") for name, path in sae_dirs.items()}
    layers = sorted({int(s.cfg.metadata.hook_name.rsplit(".", 1)[1]) for s in saes.values()})
    captured: dict[int, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def hook(layer):
        def fn(module, inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == layers[-1]:
                raise Stop

        return fn

    handles = [model.model.layers[L].register_forward_hook(hook(L)) for L in layers]
    acc = {
        name: dict(n=0, sse=0.0, sum=torch.zeros(D_MODEL, dtype=torch.float64), sumsq=0.0, l0=0.0, fired=torch.zeros(s.cfg.d_sae, dtype=torch.bool))
        for name, s in saes.items()
    }
    special_t = torch.tensor(special)
    bos_norms, other_norms = [], []
    try:
        for i in range(0, len(eval_rows), batch):
            tokens = eval_rows[i : i + batch]
            try:
                model(tokens)
            except Stop:
                pass
            keep = ~torch.isin(tokens, special_t)
            for name, sae in saes.items():
                layer = int(sae.cfg.metadata.hook_name.rsplit(".", 1)[1])
                x = captured[layer][keep]
                feats = sae.encode(x)
                x_hat = sae.decode(feats)
                a = acc[name]
                xd = x.double()
                a["n"] += x.shape[0]
                a["sse"] += (xd - x_hat.double()).pow(2).sum().item()
                a["sum"] += xd.sum(0)
                a["sumsq"] += xd.pow(2).sum().item()
                a["l0"] += (feats != 0).sum().item()
                a["fired"] |= (feats != 0).any(0)
            h = captured[layers[0]]
            bos_norms.append(h[tokens == bos_id].norm(dim=-1))
            other_norms.append(h[keep].norm(dim=-1))
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, a in acc.items():
        total_var = a["sumsq"] - (a["sum"].pow(2).sum().item() / a["n"])
        out[name] = {
            "explained_variance": 1 - a["sse"] / total_var,
            "l0": a["l0"] / a["n"],
            "dead_fraction": 1 - a["fired"].float().mean().item(),
            "mse_per_token": a["sse"] / a["n"],
            "eval_tokens": a["n"],
        }
    out["_norms"] = {
        "layer": layers[0],
        "bos_position_mean_norm": torch.cat(bos_norms).mean().item(),
        "other_positions_median_norm": torch.cat(other_norms).median().item(),
    }
    return out


# ---------------------------------------------------------------- README


def write_readme(path: Path, results: list[dict], run: dict) -> None:
    lines = [
        f"# Demo SAEs for `{MODEL_NAME}`" + (" (the embedded default, SmolLM2-135M-Instruct)" if MODEL_NAME == EMBEDDED_DEFAULT else ""),
        "",
        f"{len(results)} TopK SAEs on the residual stream of `{MODEL_NAME}`, trained",
        "offline on CPU by `scripts/train_demo_saes.py` with sae-lens' own training code",
        f"(sae-lens {run['sae_lens_version']}, torch {run['torch_version']}, transformers {run['transformers_version']}).",
        "They are small demo SAEs, trained on a small budget: use them to exercise the harness, not",
        "as good dictionaries.",
        "",
        "Each folder is in sae-lens' format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`)",
        "plus `training.json` (full runner config and measured numbers). Load with",
        "`sae_lens.SAE.load_from_disk(folder)`; the weights are stored as float16 to keep the package",
        "small and `cfg.json` says `dtype: float32`, so sae-lens casts them to float32 on load.",
        "`metadata.hook_name` is the Hugging Face module path (`model.layers.N` = the output of decoder",
        "layer N = TransformerLens `blocks.N.hook_resid_post`, also recorded as `metadata.tl_hook_name`);",
        f"`metadata.model_name` is the harness spec `{MODEL_NAME}`.",
        "",
        "| SAE | hook | width | k | training tokens | batch (tokens) | lr | steps | train wall time | explained variance | L0 | dead fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["eval"]
        lines.append(
            f"| `{r['name']}` | `{r['hook']}` ({r['tl_hook']}) | {r['width']} | {r['k']} "
            f"| {r['training_tokens']:,} ({r['unique_tokens']:,} unique x {r['epochs']} epochs) "
            f"| {r['batch']} | {r['lr']:g} | {r['steps']} | {r['wall_s']:.0f} s "
            f"| {e['explained_variance']:.3f} | {e['l0']:.1f} | {e['dead_fraction']:.3f} |"
        )
    ev_tokens = results[0]["eval"]["eval_tokens"]
    norms = run["norms"]
    lines += [
        "",
        "How the numbers were measured:",
        "",
        f"- Explained variance, L0 and dead fraction: on {run['eval_seqs']} held-out rows ({ev_tokens:,} non-special",
        "  tokens) of the TRAIN split that were never trained on (the last rows after the seeded shuffle),",
        "  with the shipped float16 weights loaded as float32, over positions whose token is not special",
        "  (BOS/EOS/pad), as in docs/design.md: EV = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2, L0 = mean",
        "  number of non-zero latents per token, dead = fraction of latents never active on those tokens.",
        "  A plain torch loop (HF model, forward hook on `model.model.layers[N]`, sae-lens' `encode`/`decode`).",
        f"- Training wall time: the sae-lens training run alone, on {run['threads']} CPU threads shared with other",
        f"  processes. The activation pass that all three SAEs share took {run['cache_wall_s']:.0f} s",
        f"  ({run['cache_tok_per_s']:.0f} tokens/s); the whole script took {run['total_wall_s'] / 60:.1f} min.",
        "- Float16 storage: explained variance of the float32 weights before rounding, for comparison: "
        + ", ".join(f"`{r['name']}` {r['eval_fp32']['explained_variance']:.4f}" for r in results)
        + ".",
        "",
        "Recipe (identical for every SAE here):",
        "",
        f"- Text: `{text_source()}` ({run['n_docs']} documents"
        + ("" if MODEL_NAME == FAMILY_MODEL else ": pydoc prose + stdlib source")
        + "; the eval split is never used), tokenised and packed by sae-lens' `pretokenize_dataset` into rows of",
        f"  {CONTEXT} tokens with BOS (id {run['bos_id']}) at position 0 and between documents, rows",
        f"  shuffled with seed {run['seed']}: {run['n_rows']} rows, of which {run['train_seqs']} are used for training and the last",
        f"  {run['eval_seqs']} held out.",
        "- Activations: one pass of sae-lens' `HookedProxyLM` (AutoModelForCausalLM from the local",
        f"  checkpoint) through its multi-hook `ActivationsStore` captures layers {sorted({r['hook'] for r in results})} together, written",
        "  in the format of sae-lens' CacheActivationsRunner; each SAE is then trained by",
        "  `LanguageModelSAETrainingRunner` with `use_cached_activations=True`, for several epochs over that",
        "  cache (the model forward dominates CPU time, so epochs buy more optimiser steps).",
        "- Special tokens (ids "
        + ", ".join(str(i) for i in run["special_ids"])
        + ") are excluded from training (`exclude_special_tokens`). The BOS position carries an",
        f"  attention-sink activation: mean norm {norms['bos_position_mean_norm']:.0f} at layer {norms['layer']} on the held-out rows,",
        f"  against a median of {norms['other_positions_median_norm']:.0f} elsewhere. The SAEs never saw such a vector; keep the",
        "  first position of a sequence unspliced.",
        "- TopK SAEs (`TopKTrainingSAEConfig`: `rescale_acts_by_decoder_norm=True`, aux-k loss for dead",
        "  latents, dead window 50 steps), `normalize_activations=\"expected_average_only_in\"` (the scaling",
        "  factor, estimated on 16 batches read from the cache before training, is folded into the saved",
        "  weights), Adam, gradient clipping at 1.0, "
        + results[0]["lr_schedule"]
        + ".",
        f"- Seed {run['seed']} (torch, numpy, random; sae-lens does not seed torch itself), {run['threads']} torch threads. Re-running",
        "  on the same machine and thread count gives the same weights (checked by running `--smoke` twice:",
        "  identical weight files).",
        "",
        "Re-run (the time is mostly the model's forward pass, so it grows with other load on the cores;",
        "the script writes into a temporary folder and moves it here when done):",
        "",
        "    .venv/bin/python scripts/train_demo_saes.py" + (" --family" if MODEL_NAME != EMBEDDED_DEFAULT else ""),
        "",
        "`--smoke` runs a tiny version into a scratch folder; `--help` lists the knobs.",
        "",
        "SHA-256 of the weight files: "
        + ", ".join(f"`{r['name']}` {r['sha256'][:16]}" for r in results)
        + ".",
        "",
    ]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    warnings.filterwarnings("ignore", message=".*training dataset contains fewer samples.*")
    logging.getLogger("sae_lens").setLevel(logging.WARNING)

    import datasets
    import sae_lens
    import transformers
    from sae_lens.load_model import load_model
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    folder = REPO / FAMILY_MODEL if args.family else embedded_checkpoint()
    log(f"model checkpoint: {folder}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    special = sorted({*tokenizer.all_special_ids, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None})

    rows, pcfg, n_docs = tokenised_rows(tokenizer, folder, args.seed)
    n_rows = len(rows)
    if args.train_seqs + args.eval_seqs > n_rows:
        raise SystemExit(f"only {n_rows} rows of {CONTEXT} tokens; asked for {args.train_seqs} + {args.eval_seqs}")
    train_rows = rows.select(range(args.train_seqs))
    eval_rows = rows[n_rows - args.eval_seqs :]["input_ids"]
    if args.train_seqs % 8:
        raise SystemExit("--train-seqs must be a multiple of 8 (sae-lens reads the cache 8 rows at a time)")
    train_ids = train_rows[:]["input_ids"]
    assert bool((train_ids[:, 0] == tokenizer.bos_token_id).all())
    unique = int((~torch.isin(train_ids, torch.tensor(special))).sum())
    log(f"tokenised {n_docs} train documents into {n_rows} rows of {CONTEXT}; training on the first {args.train_seqs}, holding out the last {args.eval_seqs}")

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    stage.chmod(0o755)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="demo-sae-work-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        # float32 weights (the family is stored in bfloat16): the harness runs the model in float32 too
        model = load_model("AutoModelForCausalLM", str(folder), device="cpu", hook_names=[s.hook for s in SPECS],
                           model_from_pretrained_kwargs={"dtype": torch.float32})
        model.eval()
        hooks = sorted({s.hook for s in SPECS}, key=lambda h: int(h.rsplit(".", 1)[1]))
        log(f"caching activations at {hooks} ({args.train_seqs * CONTEXT} tokens, one pass)")
        t = time.time()
        cache = cache_activations(model, train_rows, hooks, work / "activations", batch=16)
        cache_wall = time.time() - t

        data_info = {"source": text_source(), "seed": args.seed}
        results = []
        for spec in SPECS:
            log(f"training {spec.name}: {spec.hook}, width {spec.width}, k {spec.k}, {unique * args.epochs} tokens")
            info = train_one(spec, args, folder, model, train_rows, cache[spec.hook], work / "raw" / spec.name, special, unique)
            log(f"trained {spec.name} in {info['training_wall_s']:.0f} s (sae-lens last-window L0 {info['sae_lens_final_window_l0']:.1f}, dead {info['sae_lens_num_dead_features']})")
            export(spec, work / "raw" / spec.name, stage / spec.name, info, data_info)
            results.append({"spec": spec, "info": info})
        del model

        log(f"evaluating on {args.eval_seqs} held-out rows")
        # One forward pass for both the shipped (float16-stored) weights and the float32 originals.
        dirs = {r["spec"].name: stage / r["spec"].name for r in results}
        dirs |= {f"{r['spec'].name}@fp32": work / "raw" / r["spec"].name for r in results}
        shipped = evaluate(folder, eval_rows, dirs, special, tokenizer.bos_token_id)
        fp32 = {r["spec"].name: shipped.pop(f"{r['spec'].name}@fp32") for r in results}
        rows_out = []
        for r in results:
            spec, info = r["spec"], r["info"]
            e = shipped[spec.name]
            log(f"{spec.name}: EV {e['explained_variance']:.4f} (fp32 {fp32[spec.name]['explained_variance']:.4f}), L0 {e['l0']:.2f}, dead {e['dead_fraction']:.3f}")
            sha = hashlib.sha256((stage / spec.name / "sae_weights.safetensors").read_bytes()).hexdigest()
            side = {
                "name": spec.name,
                "hook_name": spec.hook,
                "tl_hook_name": spec.tl_hook,
                "width": spec.width,
                "k": spec.k,
                **{k: v for k, v in info.items() if k != "runner_cfg"},
                "activation_cache_wall_s": round(cache_wall, 1),
                "heldout_eval": {"rows": args.eval_seqs, **e},
                "heldout_eval_fp32_weights": fp32[spec.name],
                "pretokenize_cfg": {k: v for k, v in vars(pcfg).items() if k != "tokenizer_name"} | {"tokenizer_name": MODEL_NAME},
                "weights_sha256": sha,
                "runner_cfg": info["runner_cfg"],
            }
            (stage / spec.name / "training.json").write_text(json.dumps(side, indent=2, default=str) + "\n")
            rows_out.append(
                {
                    "name": spec.name, "hook": spec.hook, "tl_hook": spec.tl_hook, "width": spec.width, "k": spec.k,
                    "training_tokens": info["training_tokens"], "unique_tokens": info["unique_tokens"], "epochs": info["epochs"],
                    "batch": info["train_batch_size_tokens"], "lr": info["lr"], "steps": info["steps"],
                    "wall_s": info["training_wall_s"], "lr_schedule": info["lr_schedule"], "eval": e,
                    "eval_fp32": fp32[spec.name], "sha256": sha,
                }
            )
        run = {
            "sae_lens_version": sae_lens.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "threads": args.threads,
            "seed": args.seed,
            "eval_seqs": args.eval_seqs,
            "train_seqs": args.train_seqs,
            "n_rows": n_rows,
            "n_docs": n_docs,
            "bos_id": tokenizer.bos_token_id,
            "special_ids": special,
            "cache_wall_s": cache_wall,
            "cache_tok_per_s": args.train_seqs * CONTEXT / cache_wall,
            "norms": shipped["_norms"],
            "total_wall_s": time.time() - T0,
        }
        write_readme(stage / "README.md", rows_out, run)

        for p in stage.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        size = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
        log(f"total size {size / 1e6:.2f} MB")
        if size > 16e6:
            raise SystemExit(f"outputs are {size / 1e6:.1f} MB, over the 16 MB budget")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        log(f"wrote {out}")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
