"""One run = one folder: config + provenance, evaluated tokens, metrics, tables.

The folder is built under a temporary name beside the target and renamed at the end, so a
failed or interrupted run leaves no half-written results behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness import data
from harness.models import EMBEDDED_DEFAULT, LoadedModel, UserError, load_model
from harness.saes import Replacement, describe, load_replacement, resolve_hooks, same_model
from harness.splice import Variant, activation_widths, short_hook

DEFAULT_SAES = ["l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32",
                "l15-w2304-k32+l22-w1152-k32", "pca:32", "neurons:32"]


@dataclass
class RunConfig:
    model: str = EMBEDDED_DEFAULT
    saes: list[str] = field(default_factory=lambda: list(DEFAULT_SAES))
    joint: bool = False  # also splice all given SAEs together (one per hook)
    tokens: int = 8192
    ctx: int = 128
    batch_size: int = 8
    calib_seqs: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    n_boot: int = 1000
    out: str = "results/latest"

    def __post_init__(self):
        if self.ctx < 2:
            raise UserError("--ctx must be at least 2")
        if self.tokens < self.ctx:
            raise UserError(f"--tokens ({self.tokens}) must be at least --ctx ({self.ctx})")
        if self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        if not self.saes:
            raise UserError("give at least one --sae")

    @property
    def n_seq(self) -> int:
        return self.tokens // self.ctx


def build_variants(specs: list[str], joint: bool, device: str) -> tuple[list[Variant], list[Replacement]]:
    """Parse specs. `A+B` is a joint splice of A and B, which are also evaluated alone."""
    groups = [[p for p in s.split("+")] for s in specs]
    by_spec: dict[str, Replacement] = {}
    for part in [p for g in groups for p in g]:
        if part not in by_spec:
            by_spec[part] = load_replacement(part, device)
    repls = list(by_spec.values())
    resolve_hooks(repls)
    if joint:
        groups.append([s for s in by_spec if by_spec[s].kind == "sae"])
    variants, seen = [Variant("clean", {})], {"clean"}

    def add(parts: list[Replacement]):
        hooks = [r.hook for r in parts]
        if len(set(hooks)) != len(hooks):
            raise UserError(f"a joint splice needs one SAE per hook; {' + '.join(r.spec for r in parts)} share one")
        name = "+".join(_label(r) for r in parts)
        if name not in seen:
            seen.add(name)
            variants.append(Variant(name, {r.hook: r for r in parts}))

    for g in groups:
        for part in g:  # each alone first, then the joint one
            add([by_spec[part]])
        if len(g) > 1:
            add([by_spec[p] for p in g])
    return variants, repls


def _label(r: Replacement) -> str:
    return r.name if r.kind == "sae" else f"{r.name}@{short_hook(r.hook)}"


def check_compatible(lm: LoadedModel, repls: list[Replacement]) -> None:
    for r in repls:
        if r.kind == "sae" and not same_model(r.model_name, lm.spec):
            raise UserError(f"SAE {r.spec!r} was trained on {r.model_name!r}, not on {lm.spec!r}")
    from harness.splice import Splicer

    Splicer(lm, sorted({r.hook for r in repls}))  # unknown hooks -> UserError listing valid ones
    widths = activation_widths(lm, sorted({r.hook for r in repls if r.kind == "sae"}))
    for r in repls:
        if r.kind == "sae" and widths.get(r.hook) != r.d_in:
            raise UserError(f"SAE {r.spec!r} has width {r.d_in} but {r.hook} has width {widths.get(r.hook)}")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sae-harness", "torch", "transformers", "lm_eval", "sae-lens", "transformer-lens", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def model_hash(lm: LoadedModel) -> dict:
    source = lm.load_info.get("source")
    if not source or not Path(source).is_dir():
        return {}
    from harness.saes import sha256

    return {p.name: sha256(p) for p in sorted(Path(source).glob("*.safetensors"))}


def run_ce(cfg: RunConfig, progress_factory=None) -> dict:
    """Load, evaluate every variant on the held-out offline text, write the run folder."""
    from harness import ce

    out = Path(cfg.out)
    variants, repls = build_variants(cfg.saes, cfg.joint, cfg.device)
    kwargs = next((r.model_kwargs for r in repls if r.model_kwargs), {})
    lm = load_model(cfg.model, cfg.device, cfg.dtype, kwargs)
    check_compatible(lm, repls)
    torch.manual_seed(cfg.seed)
    try:
        tokens = data.pack(lm.tokenizer, data.documents("eval"), cfg.n_seq, cfg.ctx)
        calib = data.pack(lm.tokenizer, data.documents("train-prose"), cfg.calib_seqs, cfg.ctx)
    except ValueError as e:
        raise UserError(str(e)) from None
    progress = progress_factory(len(tokens)) if progress_factory else None
    result = ce.evaluate(lm, variants, tokens, cfg.batch_size, calib, cfg.n_boot, cfg.seed, progress)
    config = {
        "run": asdict(cfg), "model": lm.load_info | {"hashes": model_hash(lm)},
        "saes": [describe(r) for r in repls], "variants": {v.name: v.hooks for v in variants},
        "hooks": sorted({r.hook for r in repls}), "tokens_sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
        "data": "offline pydoc topics, eval split (harness/data.py)", "versions": versions(),
        "machine": machine(), "wall_seconds_eval": result["seconds"], "shared_prefix_layer": result["start_layer"],
    }
    write_run(out, config, result, tokens)
    return {"config": config, **result}


def ce_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    df["hooks"] = df["hooks"].map(lambda h: "+".join(short_hook(x) for x in h))
    df["saes"] = df["saes"].map(lambda s: "+".join(s))
    return df


def ce_markdown(df: pd.DataFrame) -> str:
    cols = {"variant": "variant", "hooks": "hooks", "ce_spliced": "CE", "dce": "dCE",
            "dce_ci": "dCE 95% CI", "loss_recovered_zero": "LR(zero)", "loss_recovered_mean": "LR(mean)",
            "kl": "KL", "explained_variance": "EV", "l0": "L0", "dead_frac": "dead"}
    view = df.copy()
    view["dce_ci"] = [f"[{lo:.4f}, {hi:.4f}]" for lo, hi in zip(df.dce_ci_low, df.dce_ci_high)]
    view = view[list(cols)].rename(columns=cols)
    return view.to_markdown(index=False, floatfmt=".4f")


def write_run(out: Path, config: dict, result: dict, tokens: torch.Tensor) -> None:
    tmp = out.with_name(f".{out.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = result["records"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (tmp / "metrics.json").write_text(json.dumps(records, indent=2))
    np.save(tmp / "tokens.npy", tokens.numpy())
    np.savez_compressed(tmp / "per_token_dce.npz", **{k.replace("/", "_"): v for k, v in result["per_token_dce"].items()})
    df = ce_frame(records)
    df.to_csv(tmp / "ce.csv", index=False)
    (tmp / "ce.md").write_text(ce_markdown(df) + "\n")
    # Replace an older run of the same name only once the new one is complete.
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        out.replace(old)
        tmp.replace(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.replace(out)
