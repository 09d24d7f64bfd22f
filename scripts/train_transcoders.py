#!/usr/bin/env python
"""Train the demo skip transcoders shipped in harness/demo_transcoders/: one per block of the
embedded default (SmolLM2-135M, 30 blocks), each reading the MLP's input and writing its output.

    .venv/bin/python scripts/train_transcoders.py            # the shipped run; resumable
    .venv/bin/python scripts/train_transcoders.py --smoke    # tiny run into a scratch folder

Why a small loop of our own: sae-lens 6.54 loads transcoders but its trainer fits SAEs only
(one hook in, the same hook out), and EleutherAI's sparsify, which trains skip transcoders for
many layers in one pass, is a further dependency with its own file format. A loop of ~100 lines
trains all 30 at once from ONE model forward per batch (the forward dominates on a CPU), and
writes sae-lens' own `JumpReLUSkipTranscoder` through its `save_model`, so the files are what
sae-lens loads.

Recipe:
1. Text: `harness.text.builtin.documents("train")` (the same training text as the demo SAEs),
   rows of CONTEXT tokens with BOS at position 0; the eval split is never read. Position 0 and
   special tokens are excluded (the harness never splices them; position 0 is the attention sink).
2. Sites: input `blocks.L.ln2.hook_normalized` (on a TransformerBridge: the residual divided by
   its RMS, before the norm's gain), output `blocks.L.hook_mlp_out`. Computed here with plain
   forward hooks on the Hugging Face modules (`post_attention_layernorm`'s input, `mlp`'s output).
3. Model: f(x) = JumpReLU(x W_enc + b_enc) W_dec + b_dec + x W_skip^T (sae-lens'
   JumpReLUSkipTranscoder). Trained as a BatchTopK transcoder (Bussmann et al. 2024: the
   K * batch largest pre-activations of a batch are kept), so no L1 coefficient needs tuning
   per layer, and shipped with one JumpReLU threshold per layer, the BatchTopK inference rule:
   the value of the (K * n)-th largest pre-activation over the calibration rows (L0 = K there).
4. W_skip is the least-squares map from input to output on LSQ_ROWS calibration rows (ridge
   1e-3), b_dec its intercept: the linear part of the MLP, fixed. The sparse part learns the
   rest. (A first run that trained W_skip too, with Adam from the same start, drifted: two of
   30 layers ended below zero explained variance after 200 steps.)
5. Loss: squared error over the output's variance (normalised MSE), Adam with the gradient
   norm clipped at 1 per layer (massive-activation tokens make rare huge batches), cosine
   decay to 10%.
6. Resumable: every layer still to train shares the batches; the state of all of them is saved
   every SAVE_EVERY steps in the cache folder; a finished layer is written to
   harness/demo_transcoders/blocks.L/ by a rename, and a rerun skips those that exist.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTEXT = 128
D_SAE = 512
K = 32
BATCH_ROWS = 16
LR = 1e-3
SAVE_EVERY = 100
LSQ_ROWS = 128  # calibration rows: the least-squares W_skip and the thresholds (about 16k tokens)
EVAL_ROWS = 64
CACHE = Path.home() / ".cache" / "sae-harness" / "transcoder-train"
MODEL_NAME = "smollm2-135m"
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:8.1f}s] {msg}", flush=True)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "harness" / "demo_transcoders")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per transcoder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    args.cache, args.layers = CACHE, None
    if args.smoke:
        args.tokens, args.layers = 4 * BATCH_ROWS * CONTEXT, [0, 1]
        if args.out == REPO / "harness" / "demo_transcoders":
            args.out = Path(tempfile.gettempdir()) / "transcoders_smoke"
        args.cache = args.out / ".cache"
    return args


class Trainee(torch.nn.Module):
    """One skip transcoder under training (sae-lens' parameter names and layouts)."""

    def __init__(self, d: int, d_sae: int):
        super().__init__()
        dec = torch.randn(d_sae, d)
        dec = 0.1 * dec / dec.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(dec)
        self.W_enc = torch.nn.Parameter(dec.T.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d))
        self.W_skip = torch.nn.Parameter(torch.zeros(d, d))  # [d_out, d_in], applied as x @ W_skip.T
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.relu(x @ self.W_enc + self.b_enc)
        if k is not None:  # BatchTopK: the k * n largest pre-activations of the batch
            flat = pre.flatten()
            keep = flat.topk(k * x.shape[0]).indices
            acts = torch.zeros_like(flat).scatter(0, keep, flat[keep]).view_as(pre)
            with torch.no_grad():  # running mean of the smallest kept activation: the threshold
                smallest = flat[keep].min()
                self.seen += 1
                self.threshold += (smallest - self.threshold) / self.seen.clamp(max=1000)
        else:
            acts = pre * (pre > self.threshold)
        return acts @ self.W_dec + self.b_dec + x @ self.W_skip.T, acts


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.model.loading import embedded_checkpoint

    path = embedded_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def token_rows(tok, split: str, n_rows: int) -> torch.Tensor:
    from harness.text.builtin import documents, pack

    body = pack(tok, documents(split), n_rows, CONTEXT - 1)
    return torch.cat([torch.full((n_rows, 1), tok.bos_token_id), body], dim=1)


class Sites:
    """Forward hooks capturing every wanted layer's MLP input (normalised, gain not applied)
    and MLP output, as [n, d] over the kept positions."""

    def __init__(self, model, layers: list[int]):
        self.acts: dict[int, dict[str, torch.Tensor]] = {}
        self.handles = []
        for L in layers:
            layer = model.model.layers[L]
            norm = layer.post_attention_layernorm
            eps = norm.variance_epsilon

            def pre(mod, args, _L=L, _eps=eps):
                h = args[0].float()
                self.acts.setdefault(_L, {})["x"] = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps)

            def post(mod, args, out, _L=L):
                self.acts.setdefault(_L, {})["y"] = out.float()

            self.handles += [norm.register_forward_pre_hook(pre), layer.mlp.register_forward_hook(post)]

    @torch.no_grad()
    def run(self, model, rows: torch.Tensor, keep: torch.Tensor, upto: int) -> dict[int, tuple]:
        self.acts = {}
        layers = model.model.layers
        saved = model.model.layers
        model.model.layers = layers[: upto + 1]  # nothing above the deepest wanted layer
        try:
            model.model(input_ids=rows)
        finally:
            model.model.layers = saved
        return {L: (a["x"][keep], a["y"][keep]) for L, a in self.acts.items()}


def kept_positions(rows: torch.Tensor, special: list[int]) -> torch.Tensor:
    keep = ~torch.isin(rows, torch.tensor(special))
    keep[:, 0] = False
    return keep


def write_layer(args, L: int, t: Trainee, record: dict) -> None:
    from sae_lens import SAE  # noqa: F401  (registers the architectures)
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig

    d = t.b_dec.shape[0]
    cfg = JumpReLUSkipTranscoderConfig(
        d_in=d, d_sae=t.b_enc.shape[0], d_out=d, dtype="float32", device="cpu", apply_b_dec_to_input=False,
        metadata=SAEMetadata(**{"hook_name": f"blocks.{L}.ln2.hook_normalized", "hook_name_out": f"blocks.{L}.hook_mlp_out",
                  "model_name": MODEL_NAME, "context_size": CONTEXT, "prepend_bos": True,
                  "dataset_path": "harness.text.builtin.documents('train')",
                  "training_architecture": "batchtopk skip transcoder, shipped as jumprelu (one shared threshold)"}))
    tc = JumpReLUSkipTranscoder(cfg)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            getattr(tc, name).copy_(getattr(t, name))
        tc.threshold.fill_(float(t.threshold))
    tc = tc.to(torch.float16)  # half the size on disk; loaders cast back (cfg.json says float32)
    dst = args.out / f"blocks.{L}"
    stage = Path(tempfile.mkdtemp(dir=args.out, prefix=f".blocks.{L}-"))
    tc.save_model(stage)
    (stage / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    stage.chmod(0o755)
    stage.rename(dst)


@torch.no_grad()
def fidelity(t: Trainee, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Held-out numbers of the shipped (JumpReLU) form: fraction of the output's variance
    explained, L0, and the skip term's share alone."""
    t = t.float()
    y_hat, acts = t(x)
    var = (y - y.mean(0)).pow(2).sum()
    skip = x @ t.W_skip.T + t.b_dec
    return {"explained": float(1 - (y - y_hat).pow(2).sum() / var),
            "explained_skip_only": float(1 - (y - skip).pow(2).sum() / var),
            "l0": float((acts > 0).float().sum(-1).mean()),
            "dead_fraction": float(((acts > 0).sum(0) == 0).float().mean())}


def write_readme(args) -> None:
    """README.md of the shipped set: the recipe, each layer's held-out fidelity, the size on disk."""
    recs = sorted((json.loads(p.read_text()) for p in args.out.glob("blocks.*/training.json")), key=lambda r: r["layer"])
    if not recs:
        return
    size = sum(f.stat().st_size for f in args.out.glob("blocks.*/*") if f.is_file())
    r0 = recs[0]
    lines = [
        "# Demo skip transcoders for `smollm2-135m`\n",
        f"A skip transcoder at each of SmolLM2-135M's {len(recs)} blocks, trained offline on CPU by "
        "`scripts/train_transcoders.py` (its docstring has the recipe and why a loop of our own), shipped in "
        "sae-lens' transcoder format: `cfg.json` (`architecture` `jumprelu_skip_transcoder`, `metadata.hook_name` "
        "`blocks.L.ln2.hook_normalized`, `metadata.hook_name_out` `blocks.L.hook_mlp_out`, `metadata.model_name` "
        "`smollm2-135m`) and `sae_weights.safetensors` in float16, plus `training.json`. "
        f"Total size on disk: {size / 2**20:.1f} MiB. Splice them all at once with `--sae skip-transcoders`.\n",
        f"Recipe: {r0['d_sae']} latents per layer, BatchTopK (k = {r0['batch_top_k']} per token on average) during "
        f"training, shipped as JumpReLU with one threshold per layer; {r0['train_tokens']:,} training tokens per "
        f"layer ({r0['steps']} steps of {r0['batch_rows']} x {r0['context']}), Adam lr {r0['lr']} with cosine decay "
        f"to 10%, gradient norm clipped at 1, W_skip the least-squares map (fixed); all layers trained together from one forward per batch "
        f"in {r0['seconds_all_layers_together']:.0f} s on {r0['threads']} CPU threads.\n",
        "Held-out fidelity (the harness's eval split, positions that are not special and not position 0), of the "
        "shipped JumpReLU form: explained = 1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 of the MLP's output; "
        "skip only = the same with the sparse part left out (W_skip x + b_dec).\n",
        "| layer | explained | skip only | L0 | dead latents | threshold |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in recs:
        h = r["held_out"]
        lines.append(f"| {r['layer']} | {h['explained']:.3f} | {h['explained_skip_only']:.3f} | {h['l0']:.1f} | "
                     f"{100 * h['dead_fraction']:.1f}% | {r['threshold']:.3g} |")
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model()
    n_layers = model.config.num_hidden_layers
    todo = [L for L in (args.layers or range(n_layers)) if not (args.out / f"blocks.{L}").exists()]
    if not todo:
        write_readme(args)
        log("every layer is trained")
        return
    d = model.config.hidden_size
    special = sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})
    steps = max(1, args.tokens // (BATCH_ROWS * (CONTEXT - 1)))
    n_rows = steps * BATCH_ROWS + LSQ_ROWS
    rows = token_rows(tok, "train", n_rows)[torch.randperm(n_rows, generator=torch.Generator().manual_seed(0))]
    eval_rows = token_rows(tok, "eval", EVAL_ROWS if not args.smoke else 4)
    sites = Sites(model, todo)
    upto = max(todo)
    log(f"layers {todo}: {steps} steps of {BATCH_ROWS} x {CONTEXT} tokens, d_sae {D_SAE}, batch top-{K}")

    state_file = args.cache / f"state-{'-'.join(map(str, todo))}.pt"
    trainees = {L: Trainee(d, D_SAE) for L in todo}
    for t in trainees.values():
        t.W_skip.requires_grad_(False)  # the least-squares map, fixed (recipe, point 4)
    opts = {L: torch.optim.Adam([p for p in t.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.999))
            for L, t in trainees.items()}
    start, seconds = 0, 0.0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        for L in todo:
            trainees[L].load_state_dict(state["trainees"][L])
            opts[L].load_state_dict(state["opts"][L])
        start, seconds = state["step"], state["seconds"]
        log(f"resumed at step {start}")
    else:  # least-squares W_skip and b_dec from the first LSQ_ROWS rows
        lsq = rows[-LSQ_ROWS:]
        acts = sites.run(model, lsq, kept_positions(lsq, special), upto)
        for L, (x, y) in acts.items():
            x64, y64 = x.double(), y.double()
            mx, my = x64.mean(0), y64.mean(0)
            xc, yc = x64 - mx, y64 - my
            gram = xc.T @ xc
            ridge = 1e-3 * gram.diagonal().mean() * torch.eye(d, dtype=torch.float64)
            w = torch.linalg.solve(gram + ridge, xc.T @ yc)  # [d_in, d_out]
            with torch.no_grad():
                trainees[L].W_skip.copy_(w.T.float())
                trainees[L].b_dec.copy_((my - mx @ w).float())
        log("W_skip set to the least-squares map")
    var = {}
    t_start = time.time()
    for step in range(start, steps):
        lr = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        batch = rows[step * BATCH_ROWS:(step + 1) * BATCH_ROWS]
        acts = sites.run(model, batch, kept_positions(batch, special), upto)
        losses = []
        for L, (x, y) in acts.items():
            if L not in var:
                var[L] = float((y - y.mean(0)).pow(2).sum(-1).mean())
            y_hat, _ = trainees[L](x, K)
            loss = (y_hat - y).pow(2).sum(-1).mean() / var[L]
            opts[L].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in trainees[L].parameters() if p.requires_grad], 1.0)
            for g in opts[L].param_groups:
                g["lr"] = lr
            opts[L].step()
            with torch.no_grad():  # unit-norm decoder rows (the scale lives in the activations)
                W = trainees[L].W_dec
                W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))
            losses.append(float(loss.detach()))
        if (step + 1) % 20 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}: normalised MSE mean {sum(losses) / len(losses):.3f} "
                f"(layers {todo[0]}: {losses[0]:.3f}, {todo[-1]}: {losses[-1]:.3f})")
        if (step + 1) % SAVE_EVERY == 0 and step + 1 < steps:
            args.cache.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save({"step": step + 1, "seconds": seconds + time.time() - t_start,
                        "trainees": {L: t.state_dict() for L, t in trainees.items()},
                        "opts": {L: o.state_dict() for L, o in opts.items()}}, tmp)
            tmp.rename(state_file)
    seconds += time.time() - t_start
    lsq = rows[-LSQ_ROWS:]
    calib = sites.run(model, lsq, kept_positions(lsq, special), upto)
    for L, (x, _) in calib.items():  # the BatchTopK inference threshold: L0 = K on these rows
        with torch.no_grad():
            pre = torch.relu(x @ trainees[L].W_enc + trainees[L].b_enc).flatten()
            trainees[L].threshold.fill_(float(pre.topk(K * x.shape[0]).values[-1]))
    held = sites.run(model, eval_rows, kept_positions(eval_rows, special), upto)
    for L in todo:
        record = {"layer": L, "d_in": d, "d_sae": D_SAE, "batch_top_k": K, "threshold": float(trainees[L].threshold),
                  "train_tokens": int(steps * BATCH_ROWS * (CONTEXT - 1)), "steps": steps, "batch_rows": BATCH_ROWS,
                  "context": CONTEXT, "lr": LR, "schedule": "cosine to 10%", "optimizer": "Adam (0.9, 0.999)",
                  "skip": f"least squares (ridge 1e-3) on {LSQ_ROWS} calibration rows, fixed",
                  "threshold_rule": f"the (K * n)-th largest pre-activation over the {LSQ_ROWS} calibration rows",
                  "grad_clip": 1.0,
                  "seconds_all_layers_together": round(seconds, 1), "threads": args.threads,
                  "held_out": {"tokens": int(held[L][0].shape[0]), **fidelity(trainees[L], *held[L])},
                  "torch": torch.__version__}
        write_layer(args, L, trainees[L], record)
        log(f"blocks.{L}: held-out explained {record['held_out']['explained']:.3f} "
            f"(skip only {record['held_out']['explained_skip_only']:.3f}), L0 {record['held_out']['l0']:.1f}")
    state_file.unlink(missing_ok=True)
    write_readme(args)
    log("done")


if __name__ == "__main__":
    main()
