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
from harness.splice import Variant, activation_widths, calibrate, short_hook

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
    law: str = "hoffmann"  # scaling law for compute-equivalents: preset name or LAW.json
    reference_models: list[str] = field(default_factory=list)  # a family on the same data
    reference_tokens: list[float] = field(default_factory=list)  # their D, then the main model's
    reference_checkpoints: list[str] = field(default_factory=list)  # the main model's checkpoints
    checkpoint_tokens: list[float] = field(default_factory=list)  # their D, then the final model's
    mmlu_limit: int | None = 5  # questions per subject; None = all 14,042
    num_fewshot: int | None = None
    out: str = "results/latest"

    def __post_init__(self):
        if self.ctx < 2:
            raise UserError("--ctx must be at least 2")
        if self.tokens < self.ctx:
            raise UserError(f"--tokens ({self.tokens}) must be at least --ctx ({self.ctx})")
        if self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        if self.mmlu_limit is not None and self.mmlu_limit < 1:
            raise UserError("--mmlu-limit must be positive")

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


def run_job(cfg: RunConfig, stages=("ce",), progress_factory=None) -> dict:
    """Load the model and SAEs once, run the stages ("ce", "mmlu"), write one run folder."""
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
    calibrate(lm, repls, calib, cfg.batch_size)
    config = {
        "run": asdict(cfg), "stages": list(stages), "model": lm.load_info | {"hashes": model_hash(lm)},
        "saes": [describe(r) for r in repls], "variants": {v.name: v.hooks for v in variants},
        "hooks": sorted({r.hook for r in repls}), "versions": versions(), "machine": machine(),
        "calibration": f"{cfg.calib_seqs} x {cfg.ctx} tokens of the train-prose split",
    }
    result: dict = {"config": config}
    with staging(out) as tmp:
        if "ce" in stages:
            from harness import ce

            progress = progress_factory("CE suite", len(tokens)) if progress_factory else None
            res = ce.evaluate(lm, variants, tokens, cfg.batch_size, calib, cfg.n_boot, cfg.seed, progress)
            config.update(tokens_sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(),
                          data="offline pydoc topics, eval split (harness/data.py)",
                          ce_seconds=res["seconds"], shared_prefix_layer=res["start_layer"],
                          ce_block_cost=res["block_cost"])
            config["compute_equivalents"] = add_compute_equivalents(res["records"], cfg.law, tmp)
            if cfg.reference_models or cfg.reference_checkpoints:
                from harness.references import add_reference_equivalents

                config["references"] = add_reference_equivalents(res["records"], lm, tokens, cfg)
            write_ce(tmp, res, tokens)
            result.update(res)
        if "mmlu" in stages:
            progress = progress_factory("MMLU (variants)", len(variants)) if progress_factory else None
            res = run_mmlu(lm, variants, cfg, progress)
            config.update(mmlu_seconds=res["seconds"], mmlu_engine=res["engine"],
                          mmlu_questions=int(res["per_question"]["doc_id"].count() // len(variants)))
            write_mmlu(tmp, res["per_question"], res["aggregate"], cfg)
            result.update(mmlu=res)
        write_text(tmp / "config.json", json.dumps(config, indent=2, default=str))
        write_report(tmp, config, result)
    return result


def write_report(folder: Path, config: dict, result: dict) -> None:
    """report.html: the run's tables and plot on one page, for a browser."""
    import html

    parts = [f"<h1>sae-harness run: {html.escape(str(config['run']['model']))}</h1>",
             f"<p>{html.escape(config['machine'])}; git {html.escape(str(config['versions'].get('git')))}</p>"]
    if "records" in result:
        parts += ["<h2>Cross-entropy suite</h2>", ce_frame(result["records"]).to_html(index=False, float_format="%.4f"),
                  '<img src="compute.png" alt="loss against compute" width="720">']
    if (folder / "mmlu_category.csv").exists():
        parts += ["<h2>MMLU by category</h2>", pd.read_csv(folder / "mmlu_category.csv").to_html(index=False, float_format="%.4f")]
    write_text(folder / "report.html", "<!doctype html><meta charset=utf-8><title>sae-harness</title>"
               "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
               "td,th{border:1px solid #ccc;padding:2px 6px}</style>" + "\n".join(parts))


def calibrate_for(lm: LoadedModel, repls: list[Replacement], calib_seqs: int = 16, ctx: int = 128,
                  batch_size: int = 8) -> None:
    """Fit mean/PCA baselines on the train-prose calibration batch (as the CE suite does)."""
    if any(r.needs_calibration for r in repls):
        calib = data.pack(lm.tokenizer, data.documents("train-prose"), calib_seqs, ctx)
        calibrate(lm, repls, calib, batch_size)
    else:
        calibrate(lm, repls, None)


def run_mmlu(lm: LoadedModel, variants: list[Variant], cfg: RunConfig, progress=None) -> dict:
    """Offline MMLU (all 57 subjects, `mmlu_limit` questions each unless None) for every variant."""
    from harness import mmlu

    return run_tasks(lm, variants, ["mmlu_offline"], mmlu.task_manager(), cfg, cfg.mmlu_limit, progress)


def run_tasks(lm: LoadedModel, variants: list[Variant], tasks: list[str], task_manager, cfg: RunConfig,
              limit=None, progress=None, **lm_eval_kwargs) -> dict:
    """lm-eval tasks for every variant in one pass -> per-question MMLU rows (if any) and aggregates."""
    import time

    from harness import mmlu
    from harness.backend import evaluate_tasks

    t0 = time.perf_counter()
    seeds = {k: cfg.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    results = evaluate_tasks(lm, variants, tasks, task_manager, batch_size=cfg.batch_size, progress=progress,
                             limit=limit, num_fewshot=cfg.num_fewshot, log_samples=True, **seeds, **lm_eval_kwargs)
    engine = results.pop("__engine__")
    frames = [mmlu.per_question_from_samples(r["samples"], name) for name, r in results.items()]
    return {"per_question": pd.concat(frames, ignore_index=True),
            "aggregate": {name: r["results"] for name, r in results.items()},
            "engine": engine, "seconds": time.perf_counter() - t0}


class staging:
    """Build a run folder under a temporary name; rename it into place only on success."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.with_name(f".{out.name}.partial{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():  # replace an older run only once the new one is complete
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            self.out.replace(old)
            self.tmp.replace(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.replace(self.out)
        return False


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


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
    if "compute_fraction" in df:
        law = df["law"].iloc[0]
        cols[f"C_eff/C ({law})"] = f"C_eff/C ({law})"
        view[f"C_eff/C ({law})"] = [f"{f:.3g} [{lo:.3g}, {hi:.3g}]" for f, lo, hi in
                                   zip(df.compute_fraction, df.compute_fraction_low, df.compute_fraction_high)]
    for key, label in (("n_eff_frac", "N_eff/N (family fit)"), ("d_eff_frac", "D_eff/D (checkpoints)")):
        if f"{key}_low" in df:
            cols[label] = label
            view[label] = [f"{f:.3g} [{lo:.3g}, {hi:.3g}]" for f, lo, hi in
                           zip(df[key], df[f"{key}_low"], df[f"{key}_high"])]
    view = view[list(cols)].rename(columns=cols)
    return view.to_markdown(index=False, floatfmt=".4f")


def add_compute_equivalents(records: list[dict], law_spec: str, folder: Path) -> dict:
    """Add compute_fraction (+ interval from the dCE CI) to every record; plot; return details.

    With a preset law the fraction also comes over a range of E (E belongs to the preset's
    corpus and tokenizer, not to this model's), saved in compute_equivalents.json."""
    from harness import scaling

    try:
        law = scaling.load_law(law_spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    details = {"law": law_spec, "variants": {}}
    clean = records[0]["ce_clean"]
    for rec in records:
        rec["law"] = law_spec
        try:
            eq = scaling.equivalents(law, clean, rec["ce_spliced"])
            ci = scaling.fraction_interval(law, clean, (rec["dce_ci_low"], rec["dce_ci_high"]))
        except ValueError as e:  # e.g. a loss below the law's E
            rec.update(compute_fraction=float("nan"), compute_fraction_low=float("nan"),
                       compute_fraction_high=float("nan"))
            details["variants"][rec["variant"]] = {"error": str(e)}
            continue
        rec.update(compute_fraction=eq["compute_fraction"], compute_fraction_low=ci["low"],
                   compute_fraction_high=ci["high"])
        if "n_eff_frac" in eq:
            rec["n_eff_frac"] = eq["n_eff_frac"]
        details["variants"][rec["variant"]] = {k: v for k, v in eq.items() if k != "assumptions"}
        details["assumptions"] = eq["assumptions"]
    write_text(folder / "compute_equivalents.json", json.dumps(details, indent=2))
    points = [("clean", clean)] + [(r["variant"], r["ce_spliced"]) for r in records[1:]
                                   if not (r["variant"].startswith(("zero@", "mean@")))
                                   and np.isfinite(r["compute_fraction"])]
    band = None
    if isinstance(law, scaling.Law):
        band = (0.5 * law.E, min(1.5 * law.E, 0.95 * clean))
    scaling.plot_compute(law, points, folder / "compute.png", E_band=band)
    return {"law": law_spec, "E_band": band}


def write_ce(folder: Path, result: dict, tokens: torch.Tensor) -> None:
    records = result["records"]
    write_text(folder / "metrics.json", json.dumps(records, indent=2))
    np.save(folder / "tokens.npy", tokens.numpy())
    np.savez_compressed(folder / "per_token_dce.npz", **result["per_token_dce"])
    df = ce_frame(records)
    df.to_csv(folder / "ce.csv", index=False)
    write_text(folder / "ce.md", ce_markdown(df) + "\n")


def write_mmlu(folder: Path, per_question: pd.DataFrame, aggregate: dict, cfg: RunConfig) -> None:
    from harness import tables

    tables.save_per_question(per_question, folder)
    write_text(folder / "lm_eval_results.json", json.dumps(aggregate, indent=2, default=str))
    for level in ("category", "subject"):
        for fmt, ext in (("md", "md"), ("csv", "csv"), ("latex", "tex"), ("json", "json")):
            text = tables.build_table([folder], level, fmt, n_boot=cfg.n_boot, seed=cfg.seed)
            write_text(folder / f"mmlu_{level}.{ext}", text)
