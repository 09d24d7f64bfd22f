"""`sae-harness interp`: the explainability table and the fidelity / explainability frontier.

For every single SAE or baseline of a run (or given as specs): activation records on held-out
text (the run's CE source), judge-free n-gram explanations of a seeded sample of live latents
(precision, recall, F1, their activation-weighted versions, each summarised over latents with a
bootstrap interval), sparse probing on MMLU categories at k = 1, 2, 5, 20 (and the raw residual),
and, with a judge, delphi-style detection scores. Beside them the run's L0, dCE and C_eff/C, so
interp.md / interp.json hold the frontier and frontier.png draws it. Definitions: harness/evals/interp.py.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.files import write_json
from harness.evals import interp
from harness.output.explainability import points, table  # noqa: F401 (table: the CLI's)
from harness.errors import UserError


@dataclass
class InterpConfig:
    latents: int = 32  # live latents sampled per SAE / baseline
    tokens: int = 8192  # held-out tokens for the activation records
    ctx: int = 128
    batch_size: int = 8
    probe_questions: int = 100  # MMLU questions per category for sparse probing
    seed: int = 0
    judge: str | None = None  # OpenAI-compatible API base URL
    judge_model: str | None = None
    judge_key_env: str = "SAE_HARNESS_JUDGE_KEY"
    judge_latents: int = 8

    def __post_init__(self):
        for name in ("latents", "tokens", "ctx", "probe_questions", "judge_latents", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if (self.judge is None) != (self.judge_model is None):
            raise UserError("--judge and --judge-model go together")


def explained(variants: list) -> list:
    """The variants to explain: one part each, an SAE or a pca / neurons baseline."""
    out = []
    for v in variants:
        if len(v.parts) != 1:
            continue
        (r,) = v.parts.values()
        if r.kind in ("sae", "pca", "neurons"):
            out.append(v)
    return out


def run(model: str, saes: list[str], cfg: InterpConfig, out: Path, metrics: list[dict] | None = None,
        dataset: str | None = None, say=print) -> dict:
    """Compute everything and write out/interp.json, interp.md and frontier.png/pdf."""
    from harness.evals import judge as judge_mod
    from harness.text import sources
    from harness.output.figures import frontier_figure, save
    from harness.splice.session import prepare

    n_seq = cfg.tokens // cfg.ctx
    judge = None
    if cfg.judge:
        judge = judge_mod.Judge(cfg.judge, cfg.judge_model, out / "judge_cache", cfg.judge_key_env)
    session = prepare(model, saes, ctx=cfg.ctx, batch_size=cfg.batch_size, seed=cfg.seed,
                      text=sources.TextRequest(dataset), eval_seqs=n_seq)
    lm, tokens = session.lm, session.tokens
    chosen = explained(session.variants)
    if not chosen:
        raise UserError("nothing to explain: give an SAE or a pca:K / neurons:K baseline")
    tok_np = tokens.numpy()
    by_metrics = {m["variant"]: m for m in metrics or []}
    rows = {}
    for v in chosen:
        (repl,) = v.parts.values()
        say(f"interp: activation records of {v.name} ({len(tokens)} x {cfg.ctx} tokens)")
        rec = interp.collect(lm, repl, tokens, cfg.batch_size, cfg.seed)
        latents = interp.sample_latents(rec, cfg.latents, cfg.seed, v.name)
        per = [interp.explain(rec, int(j), tok_np) for j in latents]
        row = {"variant": v.name, "kind": repl.kind, "hook": repl.hook, "n_latents": len(per),
               "live_fraction": float(len(rec.live()) / rec.fires.shape[1])}
        for key in ("precision", "recall", "f1", "precision_w", "recall_w", "f1_w"):
            row[key] = interp.summarise([p[key] for p in per], cfg.seed)
        row["latents"] = per
        if judge is not None:
            say(f"interp: judging {min(cfg.judge_latents, len(latents))} latents of {v.name}")
            judged = [judge_mod.score_latent(judge, lm.tokenizer, tok_np, rec, int(j))
                      for j in latents[:cfg.judge_latents]]
            row["judge"] = {"model": cfg.judge_model, "latents": judged,
                            "balanced_accuracy": interp.summarise([j["balanced_accuracy"] for j in judged], cfg.seed),
                            "auroc": interp.summarise([j["auroc"] for j in judged if math.isfinite(j["auroc"])]
                                                      or [float("nan")], cfg.seed)}
        m = by_metrics.get(v.name, {})
        row.update({k: m.get(k) for k in ("l0", "dce", "dce_ci_low", "dce_ci_high", "compute_fraction",
                                          "compute_fraction_low", "compute_fraction_high")})
        rows[v.name] = row
    say(f"interp: sparse probing on {4 * cfg.probe_questions} MMLU questions")
    texts, labels, names = interp.probe_questions(cfg.probe_questions, cfg.seed)
    repls = [next(iter(v.parts.values())) for v in chosen]
    feats = interp.pooled(lm, repls, texts, cfg.ctx)
    for v, r in zip(chosen, repls):
        rows[v.name]["probing"] = interp.sparse_probing(feats[r.spec], labels, seed=cfg.seed)
    residual = {k.split("@", 1)[1]: interp.sparse_probing(x, labels, ks=(), seed=cfg.seed)["all"]
                for k, x in feats.items() if k.startswith("residual@")}
    details = {"model": model, "config": asdict(cfg), "tokens": int(tokens.numel()),
               "probe": {"task": "MMLU category, one-vs-rest, balanced", "categories": names,
                         "questions": int(len(texts)), "residual_accuracy": residual},
               "judge_requests": None if judge is None else judge.requests,
               "variants": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "interp.json", details)
    (out / "interp.md").write_text(table(details) + "\n")
    save(frontier_figure(points(details)), out, "frontier")
    return details


def run_folder(run_dir: Path, cfg: InterpConfig, say=print, out: Path | None = None) -> dict:
    """interp for a saved run: its model, SAEs, CE text and metrics; written to `out` (default
    the run folder)."""
    from harness.output.saved_runs import load_run

    r = load_run(run_dir)
    conf = r.config.get("run") or {}
    if "model" not in conf or not conf.get("saes"):
        raise UserError(f"{run_dir}/config.json names no model and SAEs")
    saes = [s for s in conf["saes"] if "+" not in s]
    return run(conf["model"], saes, cfg, Path(out or run_dir), r.metrics, conf.get("dataset"), say)


INTERP_FILES = ("interp.json", "interp.md", "frontier.png", "frontier.pdf")


def into_run_folder(folder: Path, compute):
    """Compute into a scratch folder beside `folder`, then move the results (INTERP_FILES) into
    it: bad input or a failure leaves nothing half-written. (A whole new run folder is staged by
    jobs/runfolder.staging; this adds files to an existing one.) The judge's cache is kept either way (it is what an
    interrupted judge run resumes from)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.interp") as tmp:
        tmp = Path(tmp)
        if (folder / "judge_cache").is_dir():
            shutil.copytree(folder / "judge_cache", tmp / "judge_cache")
        try:
            details = compute(tmp)
        finally:
            if (tmp / "judge_cache").is_dir():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copytree(tmp / "judge_cache", folder / "judge_cache", dirs_exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        for name in INTERP_FILES:
            os.replace(tmp / name, folder / name)
    return details
