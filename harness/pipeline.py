"""Orchestration: one job = prepare a session, run the stages, write one run folder.

    spec strings --prepare--> Session --ce.evaluate--> CEResult --compute_equivalents--> records
                                      --run_tasks----> TaskRun (per-question rows, aggregates)
    records / TaskRun --runfolder--> metrics.json, tables, report.html and its figures

The CLI calls `run_job` (commands `run` and `ce`) and `run_lm_eval` (command `lm-eval`).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from harness import ce, data, mmlu, samples, scaling
from harness.backend import evaluate_tasks
from harness.models import EMBEDDED_DEFAULT, UserError
from harness.references import add_reference_equivalents
from harness.runfolder import (command_line, machine, model_hash, staging, versions, write_ce,
                               write_compute_equivalents, write_json, write_report, write_tasks)
from harness.saes import describe
from harness.session import Session, prepare

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
    massive_factor: float = 10.0  # massive activation: clean norm above this x the median over T
    exclude_massive: bool = False  # treat them like position 0: not spliced, not in T
    out: str = "results/latest"

    def __post_init__(self):
        if self.ctx < 2:
            raise UserError("--ctx must be at least 2")
        if self.tokens < self.ctx:
            raise UserError(f"--tokens ({self.tokens}) must be at least --ctx ({self.ctx})")
        if self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        if not self.massive_factor > 0:
            raise UserError(f"--massive-factor must be positive, got {self.massive_factor}")
        if self.mmlu_limit is not None and self.mmlu_limit < 1:
            raise UserError("--mmlu-limit must be positive")

    @property
    def n_seq(self) -> int:
        return self.tokens // self.ctx


@dataclass
class TaskRun:
    per_question: pd.DataFrame  # rows (samples.COLUMNS) of every variant's multiple-choice tasks
    aggregate: dict[str, dict]  # variant -> lm-eval's "results" section
    engine_stats: dict
    seconds: float


@dataclass
class JobResult:
    config: dict  # what config.json holds
    ce: ce.CEResult | None = None
    tasks: TaskRun | None = None


def session_for(cfg: RunConfig) -> Session:
    return prepare(cfg.model, cfg.saes, joint=cfg.joint, device=cfg.device, dtype=cfg.dtype,
                   calib_seqs=cfg.calib_seqs, ctx=cfg.ctx, batch_size=cfg.batch_size)


def load_law(spec: str):
    try:
        return scaling.load_law(spec)
    except ValueError as e:
        raise UserError(str(e)) from None


def run_job(cfg: RunConfig, stages=("ce",), progress_factory=None) -> JobResult:
    """Prepare the model and SAEs once, run the stages ("ce", "mmlu"), write one run folder."""
    law = load_law(cfg.law) if "ce" in stages else None  # a bad law file fails before any model work
    session = session_for(cfg)
    lm, variants = session.lm, session.variants
    torch.manual_seed(cfg.seed)
    try:
        tokens = data.pack(lm.tokenizer, data.documents("eval"), cfg.n_seq, cfg.ctx)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = {
        "run": asdict(cfg), "stages": list(stages), "model": lm.load_info | {"hashes": model_hash(lm)},
        "saes": [describe(r) for r in session.replacements], "variants": {v.name: v.hooks for v in variants},
        "hooks": sorted({r.hook for r in session.replacements}), "versions": versions(), "machine": machine(),
        "calibration": f"{cfg.calib_seqs} x {cfg.ctx} tokens of the train-prose split",
        "command": command_line(),
    }
    result = JobResult(config)
    with staging(Path(cfg.out)) as tmp:
        if "ce" in stages:
            with stage(progress_factory, "CE suite: sequences", len(tokens)) as progress:
                res = ce.evaluate(lm, variants, tokens, cfg.batch_size, session.calib_tokens, cfg.n_boot, cfg.seed,
                                  progress, massive_factor=cfg.massive_factor, exclude_massive=cfg.exclude_massive)
            config.update(tokens_sha256=hashlib.sha256(tokens.numpy().tobytes()).hexdigest(), massive=res.massive,
                          data="offline pydoc topics, eval split (harness/data.py)",
                          ce_seconds=res.seconds, shared_prefix_layer=res.start_layer,
                          ce_block_cost=res.block_cost)
            details, band = compute_equivalents(res.records, law, cfg.law)
            write_compute_equivalents(tmp, details)
            config["compute_equivalents"] = {"law": cfg.law, "E_band": band}
            if cfg.reference_models or cfg.reference_checkpoints:
                config["references"] = add_reference_equivalents(res.records, lm, tokens, cfg)
            write_ce(tmp, res.records, res.per_token_dce, tokens, res.per_token_top3, lm.tokenizer)
            result.ce = res
        if "mmlu" in stages:
            with stage(progress_factory, f"MMLU: requests x {len(variants)} variants", None) as progress:
                res = run_tasks(session, ["mmlu_offline"], mmlu.task_manager(), cfg, cfg.mmlu_limit, progress)
            config.update(mmlu_seconds=res.seconds, mmlu_engine=res.engine_stats,
                          mmlu_questions=int(res.per_question["doc_id"].count() // len(variants)))
            write_tasks(tmp, res.per_question, res.aggregate, cfg.n_boot, cfg.seed)
            result.tasks = res
        if "generations" in stages:  # the built-in prompts, every variant side by side
            from harness.talk import BUILTIN_PROMPTS, write_generations

            t0 = time.perf_counter()
            with stage(progress_factory, "Generations: prompts", len(BUILTIN_PROMPTS)) as progress:
                write_generations(tmp, lm, variants, progress=progress)
            config["generations_seconds"] = time.perf_counter() - t0
        write_json(tmp / "config.json", config)
        write_report(tmp, Path(cfg.out))
    return result


@contextlib.contextmanager
def stage(progress_factory, label: str, total: int | None):
    """A stage's progress callback (None without a factory), closed when the stage ends;
    a display that can be closed is told whether the stage failed."""
    bar = progress_factory(label, total) if progress_factory else None
    close = getattr(bar, "close", None)
    try:
        yield bar
    except BaseException:
        if close is not None:
            close(failed=True)
        raise
    if close is not None:
        close()


def compute_equivalents(records: list[dict], law, law_spec: str):
    """Add compute_fraction (+ interval from the dCE CI) to every record.

    Returns (details for compute_equivalents.json, the band of E the report's compute figure
    shades). With a preset law the fraction also comes over a range of E (E belongs to
    the preset's corpus and tokenizer, not to this model's)."""
    details = {"law": law_spec, "law_params": law.to_json(), "variants": {}}
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
    band = (0.5 * law.E, min(1.5 * law.E, 0.95 * clean)) if isinstance(law, scaling.Law) else None
    return details, band


def run_tasks(session: Session, tasks: list[str], task_manager, cfg: RunConfig, limit=None, progress=None,
              **lm_eval_kwargs) -> TaskRun:
    """lm-eval tasks for every variant of the session in one pass."""
    t0 = time.perf_counter()
    seeds = {k: cfg.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    results = evaluate_tasks(session.lm, session.variants, tasks, task_manager, batch_size=cfg.batch_size,
                             progress=progress, limit=limit, num_fewshot=cfg.num_fewshot, log_samples=True,
                             **seeds, **lm_eval_kwargs)
    # tasks whose logged target is text (Winogrande) need their lm-eval Task to find the gold choice
    first = next(iter(results.by_variant.values()))["samples"] if results.by_variant else {}
    task_objs = samples.task_objects(samples.needs_task_objects(first), task_manager)
    frames = [samples.per_question(r["samples"], name, task_objs) for name, r in results.by_variant.items()]
    return TaskRun(pd.concat(frames, ignore_index=True),
                   {name: r["results"] for name, r in results.by_variant.items()},
                   results.engine_stats, time.perf_counter() - t0)


def run_lm_eval(cfg: RunConfig, tasks: list[str], limit=None, include_path=None, extra: dict | None = None,
                progress_factory=None) -> TaskRun:
    """The `lm-eval` command: any tasks, clean + every variant, one run folder."""
    extra = dict(extra or {})
    session = session_for(cfg)
    try:
        tm = mmlu.task_manager(include_path=include_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    with stage(progress_factory, f"tasks: requests x {len(session.variants)} variants", None) as progress:
        res = run_tasks(session, tasks, tm, cfg, limit, progress, **extra)
    with staging(Path(cfg.out)) as tmp:
        write_tasks(tmp, res.per_question, res.aggregate, cfg.n_boot, cfg.seed)
        write_json(tmp / "config.json", {
            "model": session.lm.load_info, "tasks": ",".join(tasks), "limit": limit,
            "num_fewshot": cfg.num_fewshot, "variants": [v.name for v in session.variants],
            "engine": res.engine_stats, "extra": extra, "versions": versions(), "machine": machine(),
            "command": command_line()})
        write_report(tmp, Path(cfg.out))
    return res
