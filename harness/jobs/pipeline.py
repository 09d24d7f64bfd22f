"""Orchestration: one job = prepare a session, run the stages, write one run folder.

    spec strings --prepare--> Session --ce.evaluate--> CEResult --compute_equivalents--> records
                                      --run_tasks----> TaskRun (per-question rows, aggregates)
    records / TaskRun --runfolder--> metrics.json, tables, report.html and its figures

The CLI calls `run_job` (commands `run` and `ce`) and `run_lm_eval` (command `lm-eval`).
Under torchrun every process runs the same job on its share of the work (evals/ce.py, lmeval/backend.py);
only rank 0 writes the run folder, its resume state and progress bars, and config.json
records `world_size`.
The CE suite reads `--dataset` (harness/text/sources.py; default: the built-in prose for the
embedded model, else the first SAE's own training data); the task stage runs any lm-eval
tasks, by default the main job's offline set with per-task limits (MAIN_TASKS).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.evals import ce
from harness.model import distributed
from harness.lmeval import mmlu
from harness.lmeval import samples
from harness import scaling
from harness.text import sources
from harness.evals.damage import write_damage
from harness.lmeval.backend import evaluate_tasks
from harness.model.loading import EMBEDDED_DEFAULT
from harness.errors import UserError
from harness.evals.references import add_reference_equivalents
from harness.jobs.runfolder import (Checkpoint, check_out, command_line, machine, model_hash, staging, versions, write_ce,
                                    write_compute_equivalents, write_curves, write_report, write_tasks)
from harness.files import write_json
from harness.splice.replacements import describe
from harness.splice.session import Session, prepare

DEFAULT_SAES = ["l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32",
                "l15-w2304-k32+l22-w1152-k32", "pca:32", "neurons:32"]
# The main job's CE-only variants: each demo SAE against a random error of its own size (the
# dCE / KL ratios of the CE table). Not run on tasks or generations, to keep 10 minutes.
DEFAULT_CE_SAES = ["noise@l15-w2304-k32", "noise@l15-w1152-k16", "noise@l22-w1152-k32"]
# The main job's tasks -> documents per task (MMLU: per subject), chosen by timing on 2 CPU
# cores so that `make run` stays under 10 minutes (README: CE suite ~2.4 min for 4,096 tokens
# and 13 variants, MMLU ~1.4 s and HellaSwag ~2.5 s per question for 7 variants); None = all.
MAIN_TASKS = {"mmlu_offline": 1, "hellaswag_offline": 20, "arc_easy_offline": 30, "piqa_offline": 30,
              "winogrande_offline": 40}


@dataclass
class RunConfig:
    model: str = EMBEDDED_DEFAULT
    saes: list[str] = field(default_factory=lambda: list(DEFAULT_SAES))
    ce_saes: list[str] = field(default_factory=list)  # further specs for the CE suite only (not tasks)
    joint: bool = False  # also splice all given SAEs together (one per hook)
    tokens: int = 8192
    ctx: int = 128
    batch_size: int = 8
    calib_seqs: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    sae_dtype: str = "float32"  # SAE weights' dtype, independent of the model's
    device_map: str | None = None  # e.g. "auto": shard the model over the visible devices
    logits_budget_mib: int | None = None  # memory for logits at a time (None: logits.default_budget)
    seed: int = 0
    n_boot: int = 1000
    law: str = "hoffmann"  # scaling law for compute-equivalents: preset name or LAW.json
    train_tokens: float | None = None  # the model's pre-training tokens D (None: harness/known_models.py)
    params: float | None = None  # its parameters N (None: counted on the loaded model)
    allow_model_mismatch: bool = False  # accept SAEs that name another model (one warning line)
    overwrite: bool = False  # replace an existing --out (else refused; --resume continues one)
    reference_models: list[str] = field(default_factory=list)  # a family on the same data
    reference_tokens: list[float] = field(default_factory=list)  # their D, then the main model's
    reference_checkpoints: list[str] = field(default_factory=list)  # the main model's checkpoints
    checkpoint_tokens: list[float] = field(default_factory=list)  # their D, then the final model's
    tasks: dict = field(default_factory=lambda: dict(MAIN_TASKS))  # lm-eval task -> limit (None = all)
    num_fewshot: int | None = None
    massive_factor: float = 10.0  # massive activation: clean norm above this x the median over T
    exclude_massive: bool = False  # treat them like position 0: not spliced, not in T
    dataset: str | None = None  # CE text: None = the default source (sources.default_spec)
    dataset_config: str | None = None
    dataset_split: str = "train"
    text_column: str | None = None  # None = text, else input_ids / tokens
    out: str = "runs/latest"

    def __post_init__(self):
        if self.ctx < 2:
            raise UserError("--ctx must be at least 2")
        if self.tokens < self.ctx:
            raise UserError(f"--tokens ({self.tokens}) must be at least --ctx ({self.ctx})")
        if self.batch_size < 1:
            raise UserError("--batch-size must be positive")
        if self.logits_budget_mib is not None and self.logits_budget_mib < 1:
            raise UserError(f"--logits-budget must be a positive number of MiB, got {self.logits_budget_mib}")
        for name, value in (("--train-tokens", self.train_tokens), ("--params", self.params)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a positive number, got {value}")
        if not self.massive_factor > 0:
            raise UserError(f"--massive-factor must be positive, got {self.massive_factor}")
        for task, limit in self.tasks.items():
            if limit is not None and limit <= 0:
                raise UserError(f"the limit for {task} must be positive")

    @property
    def logits_budget(self) -> int | None:
        return None if self.logits_budget_mib is None else self.logits_budget_mib * 2**20

    @property
    def n_seq(self) -> int:
        return self.tokens // self.ctx


def task_limits(tasks: list[str] | None = None, limit: float | None = None, mmlu_limit: int | None = None,
                full: bool = False) -> dict:
    """task -> documents to evaluate (lm-eval's limit; MMLU's is per subject) for `run`.

    No tasks: the main job's. `full`: every document. Else `mmlu_limit` for MMLU tasks, then
    `limit` for all, then the main job's limit where it has one (all documents otherwise)."""
    out = {}
    for task in tasks or list(MAIN_TASKS):
        if full:
            out[task] = None
        elif mmlu_limit is not None and task.startswith("mmlu"):
            out[task] = mmlu_limit
        elif limit is not None:
            out[task] = int(limit) if limit >= 1 and limit == int(limit) else limit
        else:
            out[task] = MAIN_TASKS.get(task)
    return out


@dataclass
class TaskRun:
    per_question: pd.DataFrame  # rows (samples.COLUMNS) of every variant's multiple-choice tasks
    aggregate: dict[str, dict]  # variant -> lm-eval's "results" section
    engine_stats: dict
    seconds: float
    raw: dict = field(default_factory=dict, repr=False)  # variant -> lm-eval's whole output (samples too)


@dataclass
class JobResult:
    config: dict  # what config.json holds
    ce: ce.CEResult | None = None
    tasks: TaskRun | None = None


def session_for(cfg: RunConfig, eval_seqs: int = 0) -> Session:
    """The session; with eval_seqs > 0 it also holds that many evaluated rows of the CE text."""
    text = sources.TextRequest(cfg.dataset, cfg.dataset_config, cfg.dataset_split, cfg.text_column)
    return prepare(cfg.model, cfg.saes + [s for s in cfg.ce_saes if s not in cfg.saes], joint=cfg.joint, device=cfg.device, dtype=cfg.dtype,
                   sae_dtype=cfg.sae_dtype, device_map=cfg.device_map,
                   calib_seqs=cfg.calib_seqs, ctx=cfg.ctx, batch_size=cfg.batch_size, text=text,
                   eval_seqs=eval_seqs, seed=cfg.seed, allow_model_mismatch=cfg.allow_model_mismatch, curves=True)


def task_variants(session: Session, cfg: RunConfig) -> Session:
    """The session with only the variants tasks and generations run: those built from
    `cfg.saes` alone (the `ce_saes` ones are for the CE suite), and no layer-curve points."""
    from dataclasses import replace

    from harness.splice.variants import split_group

    keep = [v for v in session.variants if v.curve is None]
    if cfg.ce_saes:
        wanted = {p for spec in cfg.saes for p in split_group(spec)}
        keep = [v for v in keep if all(r.spec in wanted or r.name.startswith(f"{v.name}/") for r in v.parts.values())]
    return replace(session, variants=keep)


def load_law(spec: str):
    try:
        return scaling.load_law(spec)
    except ValueError as e:
        raise UserError(str(e)) from None


def run_job(cfg: RunConfig, stages=("ce",), progress_factory=None, resume: bool = False) -> JobResult:
    """Prepare the model and SAEs once, run the stages ("ce", "tasks", "generations"), write one
    run folder.

    An interrupted run keeps its partial folder; `resume=True` continues it (same identity
    only: see `identity`) without recomputing the saved CE batches or task requests."""
    check_out(cfg.out, cfg.overwrite, resume)  # an existing folder is never replaced unasked
    law = load_law(cfg.law) if "ce" in stages else None  # a bad law file fails before any model work
    tm = checked_task_manager(list(cfg.tasks)) if "tasks" in stages else None  # unknown tasks: before the model
    session = session_for(cfg, cfg.n_seq if "ce" in stages else 0)
    lm, variants, tokens = session.lm, session.variants, session.tokens
    torch.manual_seed(cfg.seed)
    hashes = model_hash(lm)
    tokens_sha = hashlib.sha256(tokens.numpy().tobytes()).hexdigest() if tokens is not None else None
    config = {
        "run": asdict(cfg), "stages": list(stages), "model": lm.load_info | {"hashes": hashes},
        "saes": [describe(r) for r in session.replacements], "variants": {v.name: v.hooks for v in variants},
        "hooks": sorted({r.hook for r in session.replacements}), "versions": versions(), "machine": machine(),
        "calibration": session.calibration,
        "command": command_line(), "world_size": distributed.world_size(),
    }
    who = identity(session, {k: v for k, v in asdict(cfg).items() if k != "out"}, hashes,
                   stages=list(stages), tokens_sha256=tokens_sha, law_params=law.to_json() if law else None,
                   world_size=distributed.world_size())
    result = JobResult(config)
    folder = staging(Path(cfg.out), who, resume)
    with folder as tmp:  # None on every process but rank 0: they compute their share, write nothing
        if "ce" in stages:
            with stage(progress_factory, "CE suite: sequences", len(tokens)) as progress:
                res = ce.evaluate(lm, variants, tokens, cfg.batch_size, session.calib_tokens, cfg.n_boot, cfg.seed,
                                  progress, massive_factor=cfg.massive_factor, exclude_massive=cfg.exclude_massive,
                                  checkpoint=Checkpoint(folder.state / "ce.pt") if tmp else None,
                                  logits_budget=cfg.logits_budget)
            config.update(tokens_sha256=tokens_sha, massive=res.massive,
                          data=session.data_info, ce_seconds=res.seconds, shared_prefix_layer=res.start_layer,
                          ce_block_cost=res.block_cost)
            size = model_size(lm, cfg)
            details, band = compute_equivalents(res.records + res.curves, law, cfg.law, size)
            config["compute_equivalents"] = {"law": cfg.law, "E_band": band, "size": size}
            result.ce = res
            if tmp is not None:
                write_compute_equivalents(tmp, details)
                if cfg.reference_models or cfg.reference_checkpoints:
                    config["references"] = add_reference_equivalents(res.records, lm, tokens, cfg)
                write_ce(tmp, res.records, res.per_token_dce, tokens, res.per_token_top3, lm.tokenizer)
                if res.curves:
                    write_curves(tmp, res.curves, res.records)
        if "tasks" in stages:
            res = run_limited_tasks(task_variants(session, cfg), cfg.tasks, tm, cfg, progress_factory,
                                    request_store=str(folder.state / "requests.sqlite") if tmp else None)
            result.tasks = res
            if tmp is not None:
                config.update(tasks_seconds=res.seconds, tasks_engine=res.engine_stats,
                              task_questions=res.per_question[res.per_question["variant"] == variants[0].name]
                              .groupby("task").size().to_dict())
                write_tasks(tmp, res.per_question, res.aggregate, cfg.n_boot, cfg.seed)
        if tmp is None:  # generations (not split over processes) and the files: rank 0 alone
            return result
        if "generations" in stages:  # the built-in prompts, every variant side by side
            from harness.jobs.talk import BUILTIN_PROMPTS, write_generations

            t0 = time.perf_counter()
            with stage(progress_factory, "Generations: prompts", len(BUILTIN_PROMPTS)) as progress:
                write_generations(tmp, lm, task_variants(session, cfg).variants, progress=progress)
            config["generations_seconds"] = time.perf_counter() - t0
        config["resumed"] = folder.resumed
        write_json(tmp / "config.json", config)
        if "ce" in stages:  # where the damage lives; reads the massive positions from config.json
            write_damage(tmp)
        write_report(tmp, Path(cfg.out))
    return result


@contextlib.contextmanager
def stage(progress_factory, label: str, total: int | None):
    """A stage's progress callback (None without a factory), closed when the stage ends;
    a display that can be closed is told whether the stage failed. Under torchrun only rank 0
    shows one (its bar counts its own share of the work)."""
    bar = progress_factory(label, total) if progress_factory and distributed.is_main() else None
    close = getattr(bar, "close", None)
    try:
        yield bar
    except BaseException:
        if close is not None:
            close(failed=True)
        raise
    if close is not None:
        close()


def identity(session: Session, options: dict, model_files: dict, **more) -> dict:
    """What a run's results depend on: a resume must match it key by key."""
    return {**options, "model_files": model_files,
            "sae_files": {r.spec: r.files for r in session.replacements if r.files},
            "variants": [v.name for v in session.variants], **more}


FRONTIER_READING = ("a compute-optimal model reaching the spliced loss needs this fraction of the compute of "
                    "one reaching the clean loss (the law's compute-optimal frontier; it does not describe the "
                    "compute of a model trained far past that optimum)")
FIXED_D_READING = ("the parameters a model trained on the same D tokens as this one would need to reach the "
                   "spliced loss, as a fraction of this model's N: the law's own L(N, D) at that D, anchored "
                   "on the measured clean loss (the ratio of the two inverted sizes)")
FIXED_N_READING = ("the training tokens a model of this size would need to reach the spliced loss, as a "
                   "fraction of its D (the law's L(N, D) at this N, anchored on the measured clean loss)")


def compute_equivalents(records: list[dict], law, law_spec: str, size: dict | None = None):
    """Add the compute-equivalents to every record: the frontier's compute_fraction and, where
    the model's N and D are known (`size`: {"N", "D", "D_source", ...}), the fixed-tokens
    readings n_eff_frac_fixed_d (N_eff/N at the model's D) and d_eff_frac_fixed_n (D_eff/D at its
    N), each with its interval carried over from dCE's.

    Returns (details for compute_equivalents.json, the band of E the report's compute figure
    shades). With a full law each reading also comes over a range of E (E belongs to the law's
    corpus and tokenizer, not to this model's)."""
    size = size or {}
    N, D = size.get("N"), size.get("D")
    details = {"law": law_spec, "law_params": law.to_json(), "variants": {}, "size": size,
               "readings": {"compute_fraction": FRONTIER_READING, "n_eff_frac_fixed_d": FIXED_D_READING,
                            "d_eff_frac_fixed_n": FIXED_N_READING}}
    curves = scaling.fixed_size_curves(law, N, D) if isinstance(law, scaling.Law) else {}
    clean = records[0]["ce_clean"]
    E_values = np.linspace(0.0, 0.9 * clean, 10)
    for rec in records:
        rec["law"] = law_spec
        rec.update(model_params=N, train_tokens=D)
        ci_d = (rec["dce_ci_low"], rec["dce_ci_high"])
        try:
            eq = scaling.equivalents(law, clean, rec["ce_spliced"])
            ci = scaling.fraction_interval(law, clean, ci_d)
        except ValueError as e:  # e.g. a loss below the law's E
            rec.update(compute_fraction=float("nan"), compute_fraction_low=float("nan"),
                       compute_fraction_high=float("nan"))
            details["variants"][rec["variant"]] = {"error": str(e)}
            continue
        rec.update(compute_fraction=eq["compute_fraction"], compute_fraction_low=ci["low"],
                   compute_fraction_high=ci["high"])
        if "n_eff_frac" in eq:
            rec["n_eff_frac"] = eq["n_eff_frac"]
        detail = {k: v for k, v in eq.items() if k != "assumptions"}
        for key, name in (("n_eff_frac_fixed_d", "n_eff"), ("d_eff_frac_fixed_n", "d_eff")):
            rec.update({key: None, f"{key}_low": None, f"{key}_high": None})
            if name not in curves:
                continue
            try:
                rec[key] = scaling.invert(curves[name], clean, rec["ce_spliced"], 1.0)
                iv = scaling.fraction_interval(curves[name], clean, ci_d)
                rec[f"{key}_low"], rec[f"{key}_high"] = iv["low"], iv["high"]
            except ValueError as e:  # the clean loss is below the law's floor at this N or D
                detail[f"{key}_error"] = str(e)
        rng = scaling.FITTED_RANGE.get(law_spec)
        if rng and isinstance(law, scaling.Law) and rec is not records[0]:  # the clean model is the anchor  # readings outside the runs the law was fitted on: flagged
            opt = [law.optimal_allocation(law.frontier_compute(L)) for L in (clean, rec["ce_spliced"])]
            rec["compute_fraction_extrapolated"] = any(scaling.outside(n, *rng["N"]) or scaling.outside(d, *rng["D"])
                                                       for n, d in opt)
            for key, size_now in (("n_eff_frac_fixed_d", N), ("d_eff_frac_fixed_n", D)):
                if rec.get(key) is not None and N and D:
                    eff = rec[key] * size_now
                    rec[f"{key}_extrapolated"] = (scaling.outside(N, *rng["N"]) or scaling.outside(D, *rng["D"])
                                                  or scaling.outside(eff, *rng["N" if key.startswith("n") else "D"]))
        if "n_eff" in curves:
            detail["n_eff_frac_fixed_d_over_E"] = scaling.fixed_tokens_over_E(law, clean, rec["ce_spliced"], D,
                                                                              E_values)
        details["variants"][rec["variant"]] = detail
        details["assumptions"] = eq["assumptions"]
    band = (0.5 * law.E, min(1.5 * law.E, 0.95 * clean)) if isinstance(law, scaling.Law) else None
    return details, band


def model_size(lm, cfg: RunConfig) -> dict:
    """N (the loaded model's parameters, embeddings included as Hoffmann et al. count them, or
    --params) and D (--train-tokens, else harness/known_models.py, else unknown)."""
    from harness.known_models import training_tokens
    from harness.evals.references import parameter_count

    names = [lm.spec, str(lm.load_info.get("source") or "")]
    d = training_tokens(names, cfg.train_tokens)
    return {"N": float(cfg.params) if cfg.params else float(parameter_count(lm)),
            "N_source": "--params" if cfg.params else "counted on the loaded model (all parameters)",
            "D": d["tokens"], "D_source": d["source"]}


def run_tasks(session: Session, tasks: list[str], task_manager, cfg: RunConfig, limit=None, progress=None,
              request_store: str | None = None, **lm_eval_kwargs) -> TaskRun:
    """lm-eval tasks for every variant of the session in one pass. Under torchrun lm-eval
    shards the requests; rank 0 gets every result, the other processes get None."""
    t0 = time.perf_counter()
    seeds = {k: cfg.seed for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")}
    results = evaluate_tasks(session.lm, session.variants, tasks, task_manager, batch_size=cfg.batch_size,
                             progress=progress, limit=limit, num_fewshot=cfg.num_fewshot, log_samples=True,
                             request_store=request_store, logits_budget=cfg.logits_budget,
                             **{**seeds, **lm_eval_kwargs})
    if not distributed.is_main():
        return None
    # tasks whose logged target is text (Winogrande) need their lm-eval Task to find the gold choice
    first = next(iter(results.by_variant.values()))["samples"] if results.by_variant else {}
    task_objs = samples.task_objects(samples.needs_task_objects(first), task_manager)
    frames = [samples.per_question(r["samples"], name, task_objs) for name, r in results.by_variant.items()]
    return TaskRun(pd.concat(frames, ignore_index=True),
                   {name: r["results"] for name, r in results.by_variant.items()},
                   results.engine_stats, time.perf_counter() - t0, results.by_variant)


def checked_task_manager(tasks: list[str], include_path=None):
    """The task manager (tasks/ + lm-eval's own + include_path), after checking every name is
    known: an unknown one is a one-line error naming the nearest offline tasks.

    lm-eval's own ~14k task configs take ~15 s to index: they are indexed only when a task is
    not among tasks/ and the include path (those alone take ~2 s)."""
    try:
        tm = mmlu.task_manager(include_path=include_path, include_defaults=False)
        if not all(task in tm.all_tasks for task in tasks):
            tm = mmlu.task_manager(include_path=include_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    known = set(tm.all_tasks)
    for task in tasks:
        if task not in known and not Path(task).is_file():
            near = mmlu.nearest_task_names(task)
            hint = f"; nearest offline tasks: {', '.join(near)}" if near else \
                f"; offline tasks: {', '.join(mmlu.offline_task_names()[:12])}, ..."
            raise UserError(f"unknown task {task!r}{hint} (all tasks: `lm-eval ls tasks`)")
    return tm


def run_limited_tasks(session: Session, limits: dict, task_manager, cfg: RunConfig, progress_factory=None,
                      **lm_eval_kwargs) -> TaskRun:
    """run_tasks once per distinct limit (lm-eval takes one limit per call), merged."""
    by_limit: dict = {}
    for task, limit in limits.items():
        by_limit.setdefault(limit, []).append(task)
    runs = []
    for limit, tasks in by_limit.items():
        label = f"tasks {', '.join(tasks)}: requests x {len(session.variants)} variants"
        with stage(progress_factory, label, None) as progress:
            runs.append(run_tasks(session, tasks, task_manager, cfg, limit, progress, **lm_eval_kwargs))
    if len(runs) == 1 or runs[0] is None:
        return runs[0]
    aggregate = {v: {k: r for run in runs for k, r in run.aggregate[v].items()} for v in runs[0].aggregate}
    stats = dict(runs[0].engine_stats)  # blocks per batch: the same variants in every run
    for key in ("tokens", "batches"):
        stats[key] = sum(run.engine_stats.get(key, 0) for run in runs)
    raw = {v: {"results": aggregate[v]} for v in aggregate}  # merged results only: samples stay in per_question
    return TaskRun(pd.concat([run.per_question for run in runs], ignore_index=True), aggregate, stats,
                   sum(run.seconds for run in runs), raw)


def run_lm_eval(cfg: RunConfig, tasks: list[str], limit=None, include_path=None, extra: dict | None = None,
                progress_factory=None, resume: bool = False, options=None) -> TaskRun:
    """The `lm-eval` command: any tasks, clean + every variant, one run folder; with
    `options.output_path` also lm-eval's own results files per variant (harness.lmeval.options)."""
    extra = dict(extra or {})
    check_out(cfg.out, cfg.overwrite, resume)
    tm = checked_task_manager(tasks, include_path)  # unknown tasks fail before the model loads
    session = session_for(cfg)
    hashes = model_hash(session.lm)
    given = getattr(options, "given", None)
    who = dict(model=cfg.model, saes=cfg.saes, tasks=tasks, limit=limit, num_fewshot=cfg.num_fewshot,
               batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, sae_dtype=cfg.sae_dtype,
               seed=cfg.seed, include_path=include_path, extra=extra, dataset=cfg.dataset, lm_eval_options=given,
               world_size=distributed.world_size())
    folder = staging(Path(cfg.out), identity(session, who, hashes), resume)
    with folder as tmp:  # None on every process but rank 0
        with stage(progress_factory, f"tasks: requests x {len(session.variants)} variants", None) as progress:
            res = run_tasks(session, tasks, tm, cfg, limit, progress,
                            request_store=str(folder.state / "requests.sqlite") if tmp else None, **extra)
        if tmp is None:
            return None
        write_tasks(tmp, res.per_question, res.aggregate, cfg.n_boot, cfg.seed)
        write_json(tmp / "config.json", {
            "model": session.lm.load_info | {"hashes": hashes}, "tasks": ",".join(tasks), "limit": limit,
            "num_fewshot": cfg.num_fewshot, "variants": [v.name for v in session.variants],
            "dtype": cfg.dtype, "sae_dtype": cfg.sae_dtype, "engine": res.engine_stats, "extra": extra, "calibration": session.calibration,
            "lm_eval_options": getattr(options, "given", None), "versions": versions(), "machine": machine(),
            "command": command_line(), "resumed": folder.resumed, "world_size": distributed.world_size()})
        write_report(tmp, Path(cfg.out))
    if options is not None and options.output_path:
        from harness.lmeval.options import save_lm_eval_outputs

        save_lm_eval_outputs(options.output_path, cfg.model, res.raw, options.log_samples, options)
    return res
