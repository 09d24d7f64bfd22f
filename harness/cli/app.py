"""The `sae-harness` command: thin commands over plain functions.

Tables go to stdout, progress and diagnostics to stderr. A user error (bad hook, missing
file, wrong width...) is one line on stderr and exit code 2, never a traceback. Heavy
imports happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from pathlib import Path
from typing import List, Optional

from harness.cli.options import (AllowModelMismatch, BatchSize, Overwrite, Dataset, DatasetConfig, DatasetSplit, DeviceMap, Device, Dtype,
                                 ExcludeMassive, LogitsBudget, MassiveFactor, Model, Params, Resume, SaeDtype,
                                 Seed, TextColumn, TrainTokens)

import typer

# Rich's help panels cut long option names below ~100 columns; there, click's plain help wraps
# the descriptions and keeps every name whole.
app = typer.Typer(add_completion=False, no_args_is_help=True,
                  rich_markup_mode="rich" if shutil.get_terminal_size().columns >= 100 else None,
                  help="Measure how much an SAE spliced into a language model damages it.")


def _one_line_errors(value_errors: bool):
    """Turn UserError (and, for the pure-library commands, ValueError) into one line + exit 2.
    Under torchrun every process meets the same bad input; rank 0 alone prints the line."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            from harness.model import distributed
            from harness.errors import UserError

            try:
                return fn(*args, **kwargs)
            except (UserError, ValueError) if value_errors else UserError as e:
                if distributed.is_main():
                    typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2)
            except KeyboardInterrupt:
                if "resume" in kwargs:
                    typer.echo("interrupted: the partial run folder is kept; add --resume to continue it", err=True)
                else:
                    typer.echo("interrupted", err=True)
                raise typer.Exit(130)
        return wrapper
    return decorate


user_errors = _one_line_errors(value_errors=False)
# scaling and tables raise ValueError for bad input; nothing else runs inside those commands.
_value_errors_as_user_errors = _one_line_errors(value_errors=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("transformers", "transformer_lens", "sae_lens", "lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class StageBar:
    """One rich progress bar for one stage of a run, on stderr.

    Called as bar(done) or bar(done, total) as the work advances (the total may grow while a
    stage discovers its work, e.g. lm-eval's requests). close() leaves the finished bar on
    screen; close(failed=True) removes it, so a failed stage ends in its one-line error alone."""

    def __init__(self, label: str, total: int | None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.task = self.progress.add_task(label, total=total)
        self.progress.start()
        self.started = True

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.progress.update(self.task, total=total)
        self.progress.update(self.task, completed=done)

    def close(self, failed: bool = False) -> None:
        if self.started:
            self.progress.live.transient = failed
            self.progress.stop()
            self.started = False


def _progress_factory():
    return StageBar


def fit_to_terminal(build, pointer: str = "", legend: str = "") -> None:
    """Print a rich table that fits the terminal: build(full=True) first; where that is wider
    than the terminal, build(full=False) (the essential columns) and a one-line pointer to the
    full table. A short legend goes under it."""
    from rich.console import Console

    from rich.measure import Measurement

    console = Console()
    table = build(True)
    natural = Measurement.get(console, console.options.update_width(100_000), table).maximum
    if not console.is_terminal and "COLUMNS" not in os.environ:  # a log or a pipe: no width to fit
        console = Console(width=max(natural, 80))
    elif natural > console.width:
        table = build(False)
        if pointer:
            legend = f"{pointer} {legend}".strip()
    console.print(table)
    if legend:
        console.print(legend, style="dim", highlight=False)


CE_LEGEND = ("dCE: CE increase over clean (nats/token) [95% CI]; LR zero / mean: loss recovered against the zero / "
             "mean ablation; C_eff/C frontier: compute a compute-optimal model reaching the spliced loss needs, "
             "over one reaching the clean loss; N_eff/N at D: parameters a model trained on this model's own tokens "
             "would need, over its own (D_eff/D at N likewise for tokens); ‡ outside the fitted range.")
CE_ESSENTIAL = {"dce", "kl", "loss_recovered_zero", "compute_fraction", "n_eff_frac_fixed_d", "n_eff_frac"}


def print_ce_table(records: list[dict], title: str, folder: Path | None = None) -> None:
    """The CE table on the terminal: the columns of harness/output/ce_columns.py, the essential
    ones where the terminal is too narrow for all."""
    from rich.table import Table

    from harness.output.ce_columns import columns

    law = records[0].get("law")

    def build(full: bool):
        cols = [c for c in columns(records, "terminal") if full or c.key in CE_ESSENTIAL]
        table = Table(title=title + (f" (compute-equivalents: {law})" if law else ""))
        table.add_column("variant", justify="left", overflow="fold")
        for col in cols:
            table.add_column(col.text, justify="right")
        for r in records:
            table.add_row(r["variant"], *[col.text_cell(r) for col in cols])
        return table

    where = f"{folder / 'ce.md'}" if folder else "ce.md in the run folder"
    fit_to_terminal(build, f"Essential columns only (the terminal is narrow): the full table is {where}.",
                    CE_LEGEND)




def _dataset_options(dataset, dataset_config, dataset_split, text_column) -> dict:
    return {"dataset": dataset, "dataset_config": dataset_config, "dataset_split": dataset_split,
            "text_column": text_column}


def _run(cfg, stages, resume: bool = False) -> None:
    import time

    from harness.jobs.pipeline import run_job

    from harness.model import distributed

    t0 = time.perf_counter()
    result = run_job(cfg, stages, _progress_factory(), resume)
    if distributed.world_size() > 1:
        typer.echo(f"rank {distributed.rank()} of {distributed.world_size()} done", err=True)
    if not distributed.is_main():  # the tables and files are rank 0's
        return
    if result.ce is not None:
        excluded = " (massive positions excluded from T)" if cfg.exclude_massive else ""
        print_ce_table(result.ce.records,
                       f"{cfg.model}: cross-entropy on {result.ce.n_tokens} held-out tokens{excluded}", Path(cfg.out))
        if result.ce.curves:
            print_curves(result.ce.curves, result.ce.records, Path(cfg.out))
    if result.tasks is not None:
        if (result.tasks.per_question["task"] == "mmlu").any():
            print_mmlu_table(result.tasks.per_question, cfg)
        print_saved_table(Path(cfg.out) / "tasks.md")
    typer.echo(f"wrote {cfg.out} in {time.perf_counter() - t0:.0f} s", err=True)


def print_curves(curves: list[dict], records: list[dict], folder: Path) -> None:
    """One line per set: how its damage compounds (the curves themselves: layer_curves.md)."""
    from harness.output.curves import compounding, curve_frame

    for name, c in compounding(curve_frame(curves, records)).items():
        typer.echo(f"{name}: all layers together dCE {c['dce_all']:.3f}; the layers alone add up to "
                   f"{c['dce_sum_alone']:.3f} (together / sum {c['ratio']:.2f}); worst alone: layer "
                   f"{c['worst_layer']} ({c['worst_layer_dce']:.3f}). Curves: {folder / 'layer_curves.md'}")


def print_saved_table(path: Path) -> None:
    """A table the run folder holds in Markdown (the task table: accuracy, deltas, intervals)."""
    from rich.console import Console
    from rich.markdown import Markdown

    if path.is_file():
        Console().print(Markdown(path.read_text()))


def print_mmlu_table(per_question, cfg) -> None:
    from rich.table import Table

    from harness.output import tables

    cat = tables.category_table(per_question, n_boot=cfg.n_boot, seed=cfg.seed)
    cat = cat[cat["weighting"] == "question"]
    n = int(cat[(cat["group"] == "all")]["n"].iloc[0])

    def build(full: bool):
        table = Table(title=f"MMLU by category, {n} questions")
        table.add_column("variant", overflow="fold")
        groups = list(dict.fromkeys(cat["group"])) if full else ["all"]
        for g in groups:
            table.add_column(g, justify="right")
        for v in dict.fromkeys(cat["variant"]):
            rows = cat[cat["variant"] == v].set_index("group")
            cells = []
            for g in groups:
                r = rows.loc[g]
                if v == "clean":
                    cells.append(f"acc {r['acc']:.3f}\nlogp {r['logp']:.3f}")
                else:
                    cells.append(f"{r['acc']:.3f} {r['delta']:+.3f} [{r['delta_lo']:+.3f},{r['delta_hi']:+.3f}]\n"
                                 f"p={r['p_mcnemar']:.2g} dlogp {r['delta_logp']:+.3f}")
            table.add_row(v, *cells)
        return table

    fit_to_terminal(build, f"All questions only (the terminal is narrow): by category in "
                           f"{Path(cfg.out) / 'mmlu_category.md'}.",
                    "Cells: accuracy, its change vs clean [95% paired bootstrap CI], McNemar p, and dlogp, the "
                    "change in log-prob of the right answer among the 4 choices.")




@app.command()
@user_errors
def ce(
    model: Model = "smollm2-135m",
    sae: List[str] = typer.Option(..., help="SAE folder, demo name, release/sae_id, or baseline "
                                  "(identity|zero|mean|pca:K|neurons:K)[@HOOK]; A+B splices A and B jointly; noise@S, "
                                  "noise-dir@S, S+error: S with its error replaced by random noise of its size, "
                                  "rotated away from its direction, or added back"),
    joint: bool = typer.Option(False, help="also splice all given SAEs together (one per hook)"),
    tokens: int = typer.Option(8192, help="tokens to evaluate"),
    ctx: int = typer.Option(128, help="sequence length"),
    dataset: Dataset = None,
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "train",
    text_column: TextColumn = None,
    batch_size: BatchSize = 8,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    sae_dtype: SaeDtype = "float32",
    logits_budget: LogitsBudget = None,
    device_map: DeviceMap = None,
    seed: Seed = 0,
    law: str = typer.Option("hoffmann", help="scaling law for compute-equivalents: preset or LAW.json"),
    train_tokens: TrainTokens = None,
    params: Params = None,
    allow_model_mismatch: AllowModelMismatch = False,
    reference_models: str = typer.Option("", help="comma-separated models of the same family (same "
                                         "tokenizer, same data): evaluated on the run's tokens, fitted, "
                                         "and used for N_eff/N"),
    reference_tokens: str = typer.Option("", help="comma-separated training tokens of each reference "
                                         "model, then the main model's (omit when all equal)"),
    reference_checkpoints: str = typer.Option("", help="comma-separated checkpoints of the main model"),
    checkpoint_tokens: str = typer.Option("", help="tokens seen by each checkpoint, then the final model's"),
    massive_factor: MassiveFactor = 10.0,
    exclude_massive: ExcludeMassive = False,
    out: str = typer.Option("runs/ce", help="run folder to write"),
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Cross-entropy, KL, loss recovered and reconstruction metrics for each SAE (and joint splices)."""
    _quiet_libraries()
    from harness.jobs.pipeline import RunConfig

    _run(RunConfig(model=model, saes=list(sae), joint=joint, tokens=tokens, ctx=ctx, overwrite=overwrite,
                   batch_size=batch_size, device=device, dtype=dtype, sae_dtype=sae_dtype, logits_budget_mib=logits_budget,
                   device_map=device_map, seed=seed, law=law, out=out,
                   train_tokens=_positive(train_tokens, "--train-tokens"), params=_positive(params, "--params"),
                   allow_model_mismatch=allow_model_mismatch, reference_models=_csv(reference_models), reference_tokens=_csv(reference_tokens, float),
                   reference_checkpoints=_csv(reference_checkpoints),
                   checkpoint_tokens=_csv(checkpoint_tokens, float), massive_factor=massive_factor,
                   exclude_massive=exclude_massive,
                   **_dataset_options(dataset, dataset_config, dataset_split, text_column)), ("ce",), resume)


def _positive(text: str | None, option: str) -> float | None:
    """A positive number given as text (1e12, 2000000000000), or None; one error line otherwise."""

    from harness.errors import UserError

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{option} must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} must be a positive number, got {text!r}")
    return value


def _csv(text: str, kind=str) -> list:
    from harness.errors import UserError

    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected a comma-separated list of numbers, got {text!r}") from None


REPLACEMENT_TOKENS = 1024


@app.command()
@user_errors
def run(
    model: Model = "smollm2-135m",
    sae: Optional[List[str]] = typer.Option(None, help="SAE or baseline spec, as for `ce` (repeat); default: the "
                                            "embedded model's demo SAEs and baselines"),
    ce_sae: Optional[List[str]] = typer.Option(None, help="spec for the CE suite only, not the tasks (repeat); "
                                               "default with no --sae: noise@ each demo SAE"),
    dataset: Dataset = None,
    dataset_config: DatasetConfig = None,
    dataset_split: DatasetSplit = "train",
    text_column: TextColumn = None,
    tasks: Optional[str] = typer.Option(None, help="comma-separated lm-eval tasks or groups; default: the main "
                                        "job's mmlu_offline, hellaswag_offline, arc_easy_offline, piqa_offline, "
                                        "winogrande_offline"),
    limit: Optional[float] = typer.Option(None, help="documents per task (MMLU: per subject) for every task; "
                                          "default: the main job's per-task limits, all documents for other tasks"),
    mmlu_limit: Optional[int] = typer.Option(None, help="MMLU questions per subject (overrides --limit for MMLU)"),
    full: bool = typer.Option(False, "--full", help="every document of every task (no limits)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", "--num_fewshot"),
    tokens: int = typer.Option(4096, help="tokens for the CE suite (32 rows of 128: the main job fits 10 minutes on 2 CPU cores)"),
    ctx: int = typer.Option(128, help="sequence length for the CE suite"),
    device: Device = "cpu",
    dtype: Dtype = "float32",
    sae_dtype: SaeDtype = "float32",
    logits_budget: LogitsBudget = None,
    device_map: DeviceMap = None,
    batch_size: BatchSize = 8,
    train_tokens: TrainTokens = None,
    params: Params = None,
    allow_model_mismatch: AllowModelMismatch = False,
    massive_factor: MassiveFactor = 10.0,
    exclude_massive: ExcludeMassive = False,
    out: str = typer.Option("runs/main", help="run folder to write (`make run` regenerates the committed "
                                              "results/main with --out results/main --overwrite)"),
    resume: Resume = False,
    overwrite: Overwrite = False,
    generations: bool = typer.Option(True, "--generations/--no-generations",
                                     help="every variant continues the built-in prompts (generations.md; about "
                                          "40 s of the main job on 2 CPU cores)"),
    family: bool = typer.Option(True, "--family/--no-family", help="main job only: also the family run "
                                "(`sae-harness family`, into a folder `family` beside --out)"),
    interp: bool = typer.Option(True, "--interp/--no-interp", help="main job only: also `sae-harness interp` on "
                                "the run (explainability table and frontier, judge-free)"),
    replacement: bool = typer.Option(True, "--replacement/--no-replacement",
                                     help="main job only: also the CE suite of the demo skip transcoders at all 30 "
                                          "blocks with its layer curves (into a folder `replacement` beside --out)"),
    replacement_tokens: int = typer.Option(REPLACEMENT_TOKENS, help="tokens for the replacement model's CE suite "
                                           "(61 variants: sized so `make run` stays under 10 minutes on 2 CPU cores)"),
):
    """CE suite + lm-eval tasks (tables per task, MMLU by category) for any model, one run folder.
    With no options: the main job (embedded default, its demo SAEs and two baselines)."""
    _quiet_libraries()
    from harness.model.loading import EMBEDDED_DEFAULT
    from harness.errors import UserError
    from harness.jobs.pipeline import DEFAULT_CE_SAES, DEFAULT_SAES, RunConfig, task_limits

    from harness.lmeval.options import check_limit, check_task_list

    if not sae and model != EMBEDDED_DEFAULT:
        raise UserError(f"--sae is needed for {model!r} (the default SAEs belong to {EMBEDDED_DEFAULT})")
    names = check_task_list(tasks, "--tasks") if tasks is not None else None
    for value, option in ((limit, "--limit"), (mmlu_limit, "--mmlu-limit")):
        if value is not None:
            check_limit(value, option)
    ce_saes = list(ce_sae) if ce_sae is not None else ([] if sae else list(DEFAULT_CE_SAES))
    main_job = not sae and model == EMBEDDED_DEFAULT
    from harness.jobs.runfolder import check_out

    if main_job and family:  # the family folder beside --out: refused now, not after the main job
        check_out(Path(out).parent / "family", overwrite)
    if main_job and replacement:
        check_out(Path(out).parent / "replacement", overwrite)
    _run(RunConfig(model=model, saes=list(sae) if sae else list(DEFAULT_SAES), ce_saes=ce_saes, out=out,
                   overwrite=overwrite,
                   tokens=tokens, ctx=ctx,
                   device=device, dtype=dtype, sae_dtype=sae_dtype, device_map=device_map, batch_size=batch_size,
                   logits_budget_mib=logits_budget,
                   num_fewshot=num_fewshot, tasks=task_limits(names, limit, mmlu_limit, full),
                   massive_factor=massive_factor, exclude_massive=exclude_massive,
                   train_tokens=_positive(train_tokens, "--train-tokens"), params=_positive(params, "--params"),
                   allow_model_mismatch=allow_model_mismatch,
                   **_dataset_options(dataset, dataset_config, dataset_split, text_column)),
         ("ce", "tasks") + (("generations",) if generations else ()), resume)
    if main_job and interp:
        from harness.jobs.interp import InterpConfig

        _interp_into_run(Path(out), InterpConfig(), lambda m: typer.echo(m, err=True))
        print_saved_table(Path(out) / "interp.md")
    if main_job and replacement:  # the replacement model: every block's MLP replaced, and its layer curves
        typer.echo("replacement model: the demo skip transcoders at every block, and the layer curves", err=True)
        _run(RunConfig(model=model, saes=["skip-transcoders"], ce_saes=[], out=str(Path(out).parent / "replacement"),
                       overwrite=overwrite, tokens=replacement_tokens, ctx=ctx, device=device, dtype=dtype,
                       sae_dtype=sae_dtype, batch_size=batch_size, massive_factor=massive_factor,
                       train_tokens=_positive(train_tokens, "--train-tokens"), params=_positive(params, "--params")),
             ("ce",), False)
    if main_job and family:
        _family(str(Path(out).parent / "family"), overwrite=overwrite)


def _family(out: str, **kw) -> None:
    import time

    from harness.jobs.family import FamilyConfig, run as run_family

    t0 = time.perf_counter()
    details = run_family(FamilyConfig(out=out, **kw), _progress_factory(), say=lambda m: typer.echo(m, err=True))
    print_family_table(details)
    typer.echo(f"wrote {out} in {time.perf_counter() - t0:.0f} s", err=True)


def print_family_table(details: dict) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    from harness.jobs.family import table

    Console().print(Markdown("Compute-equivalents from the family's own curves, beside the presets\n\n"
                             + table(details)))


@app.command()
@user_errors
def interp(
    run_or_specs: List[str] = typer.Argument(..., help="a run folder (its model, SAEs, text and metrics), "
                                             "or SAE / baseline specs with --model"),
    model: Optional[str] = typer.Option(None, help="model spec, when SAE specs are given"),
    latents: int = typer.Option(32, help="live latents sampled per SAE / baseline"),
    tokens: int = typer.Option(8192, help="held-out tokens for the activation records"),
    probe_questions: int = typer.Option(100, help="MMLU questions per category for sparse probing"),
    judge: Optional[str] = typer.Option(None, help="an OpenAI-compatible API base URL (e.g. http://host:8000/v1) "
                                        "for delphi-style explanation + detection scoring"),
    judge_model: Optional[str] = typer.Option(None, help="the judge's model name"),
    judge_key_env: str = typer.Option("SAE_HARNESS_JUDGE_KEY", help="environment variable holding the API key"),
    judge_latents: int = typer.Option(8, help="latents per SAE sent to the judge"),
    out: Optional[str] = typer.Option(None, help="folder for specs (default results/interp); a run folder is "
                                      "written into"),
):
    """Explainability beside fidelity: n-gram explanations of sampled latents (precision, recall,
    F1), sparse probing on MMLU categories, optionally an LLM judge; interp.md / interp.json and
    the frontier figure (frontier.png), added to the run's report.html."""
    _quiet_libraries()
    from harness.jobs import interp as interp_job
    from harness.errors import UserError

    cfg = interp_job.InterpConfig(latents=latents, tokens=tokens, probe_questions=probe_questions, judge=judge,
                                judge_model=judge_model, judge_key_env=judge_key_env, judge_latents=judge_latents)
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    first = Path(run_or_specs[0])
    if len(run_or_specs) == 1 and first.is_dir() and (first / "config.json").is_file():
        if model is not None:
            raise UserError("--model is read from the run folder; give SAE specs to choose one")
        folder = first
        _interp_into_run(folder, cfg, say)
    else:
        if model is None:
            raise UserError(f"{run_or_specs[0]!r} is not a run folder: give one, or SAE specs with --model")
        folder = Path(out or "runs/interp")
        interp_job.into_run_folder(folder, lambda tmp: interp_job.run(model, list(run_or_specs), cfg, tmp, say=say))
    print_saved_table(folder / "interp.md")




def _interp_into_run(folder: Path, cfg, say):
    """interp for a saved run, written beside its files, and its report.html redrawn with it."""
    from harness.jobs import interp as interp_job
    from harness.output.report import write_report

    details = interp_job.into_run_folder(folder, lambda tmp: interp_job.run_folder(folder, cfg, say, out=tmp))
    if (folder / "report.html").is_file():
        write_report([folder])
    return details


@app.command()
@user_errors
def family(
    sae: Optional[List[str]] = typer.Option(None, help="SAE or baseline spec for the family's SAE member "
                                            "(repeat); default: the family's SAEs, pca:16 and neurons:16"),
    tokens: int = typer.Option(8192, help="tokens of the family's held-out text to evaluate"),
    ctx: int = typer.Option(256, help="sequence length (at most the family's training context, 256)"),
    batch_size: BatchSize = 8,
    out: str = typer.Option("runs/family", help="run folder to write"),
    overwrite: Overwrite = False,
):
    """The family run: the CE suite on the SAE member of harness/family with its SAEs, every
    annealed run evaluated on the same held-out tokens, and compute-equivalents from the
    least-squares L(N), L(D) and L(N, D) (profile-likelihood ranges) beside the presets."""
    _quiet_libraries()
    kw = {"saes": list(sae)} if sae else {}
    _family(out, tokens=tokens, ctx=ctx, batch_size=batch_size, overwrite=overwrite, **kw)


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def lm_eval_command(
    ctx: typer.Context,
    model: Model = "smollm2-135m",
    sae: List[str] = typer.Option([], help="SAE or baseline spec (repeat; A+B = joint); none = clean only"),
    dtype: Dtype = "float32",
    sae_dtype: SaeDtype = "float32",
    allow_model_mismatch: AllowModelMismatch = False,
    logits_budget: LogitsBudget = None,
    device_map: DeviceMap = None,
    dataset: Optional[str] = typer.Option(None, help="text for the mean/PCA baselines' calibration (as for `ce`)"),
    out: str = typer.Option("runs/lm-eval", help="run folder to write (tables, per-question results)"),
    resume: Resume = False,
    overwrite: Overwrite = False,
):
    """Any lm-eval task on the clean model and every SAE variant in one pass.

    Every option of `lm-eval run` works, read by lm-eval's own parser: --tasks (default
    mmlu_offline), --limit, --samples, --num_fewshot, --batch_size, --device, --seed,
    --include_path, --output_path (lm-eval's results JSON per variant), --log_samples,
    --apply_chat_template, --fewshot_as_multiturn, --system_instruction, --gen_kwargs,
    --use_cache, --cache_requests, --metadata ..."""
    _quiet_libraries()
    from harness.lmeval.options import parse
    from harness.jobs.pipeline import RunConfig, run_lm_eval

    opts = parse(ctx.args)
    cfg = RunConfig(model=model, saes=list(sae), allow_model_mismatch=allow_model_mismatch, overwrite=overwrite,
                    batch_size=opts.batch_size, device=opts.device, dtype=dtype,
                    sae_dtype=sae_dtype, device_map=device_map, out=out, num_fewshot=opts.num_fewshot,
                    logits_budget_mib=logits_budget,
                    dataset=dataset)
    res = run_lm_eval(cfg, opts.tasks, opts.limit, opts.include_path, opts.evaluate_kwargs, StageBar,
                      resume=resume, options=opts)
    if res is None:  # under torchrun, a process other than rank 0: rank 0 prints and writes
        return
    _print_task_results(res.aggregate)
    typer.echo(f"wrote {out}" + (f" and lm-eval's results under {opts.output_path}" if opts.output_path else ""),
               err=True)


MMLU_CATEGORY_SUFFIXES = ("_stem", "_humanities", "_social_sciences", "_other")


def _print_task_results(aggregate: dict) -> None:
    """One row per task or group (MMLU's categories kept); a group's member tasks (MMLU's 57
    subjects) are left out. Every row is in the run folder's tables."""
    from rich.table import Table

    variants = list(aggregate)
    first = aggregate[variants[0]]

    def build(full: bool):
        shown = variants if full else variants[:2]
        table = Table(title="lm-eval results (primary metric per task/group; members of a group: see the run's "
                            "tables)")
        table.add_column("task", overflow="fold")
        for v in shown:
            table.add_column(v, justify="right", overflow="fold")
        for task, metrics in first.items():
            key = next((k for k in metrics if k.endswith(",none") and "stderr" not in k), None)
            in_group = any(task.startswith(g + "_") for g in first if g != task)
            if key is None or (in_group and not task.endswith(MMLU_CATEGORY_SUFFIXES)):
                continue
            cells = []
            for v in shown:
                value = aggregate[v].get(task, {}).get(key)
                cells.append("-" if not isinstance(value, (int, float)) else f"{value:.4f}")
            table.add_row(f"{task} ({key.split(',')[0]})", *cells)
        return table

    fit_to_terminal(build, "Two variants only (the terminal is narrow): every variant is in the run's tables.")


@app.command()
@user_errors
def talk(
    model: Model = "smollm2-135m",
    sae: List[str] = typer.Option([], help="SAE or baseline spec, as for `ce` (repeat; A+B = joint)"),
    joint: bool = typer.Option(False, help="also splice all given SAEs together (one per hook)"),
    prompt: List[str] = typer.Option([], help="prompt text (repeat); with no prompt: interactive"),
    prompts: Optional[str] = typer.Option(None, help="file with one prompt per line (\\n = newline)"),
    chat: bool = typer.Option(False, "--chat", help="apply the tokenizer's chat template (history when interactive)"),
    max_new_tokens: int = typer.Option(40),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass (with --temperature > 0)"),
    seed: int = typer.Option(0, help="sampling seed: the same seed gives the same text"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per prompt"),
    device: Device = "cpu",
    dtype: Dtype = "float32",
):
    """The clean model and every variant continue the same prompts, side by side; the first
    token where a variant departs from the clean continuation is marked."""
    _quiet_libraries()
    from rich.console import Console

    from harness.splice.generate import Sampling
    from harness.jobs.talk import check_options, run_talk

    todo = check_options(list(prompt), prompts, max_new_tokens, temperature, top_p)
    console = Console()

    def ask():
        try:
            return console.input("[bold]prompt>[/bold] ")
        except (EOFError, KeyboardInterrupt):
            return None
    run_talk(model, list(sae), todo, chat, max_new_tokens, Sampling(temperature, top_p, seed), as_json, joint,
             device, dtype, ask=ask, echo=typer.echo, console=console)


@app.command()
@user_errors
def damage(run_dir: str = typer.Argument(..., help="a run folder written by `ce` or `run`")):
    """Where the damage lives: rebuild damage.json / damage.md from a run's per-token data."""
    from harness.evals.damage import write_damage

    report = write_damage(run_dir)
    for name, s in report["variants"].items():
        typer.echo(f"{name}: worst 1% of tokens carry {s['share_worst_1pct']:.1%} of dCE, worst 10% "
                   f"{s['share_worst_10pct']:.1%}; {s['frac_worse']:.1%} of tokens worse, {s['frac_better']:.1%} better")
    typer.echo(f"wrote {run_dir}/damage.json and damage.md", err=True)


@app.command()
@_value_errors_as_user_errors
def table(
    run_dirs: List[str] = typer.Argument(..., help="run folders (per_question.csv, metrics.json)"),
    level: str = typer.Option("category", help="category or subject (MMLU), task (every multiple-choice "
                              "task), or ce (CE suite)"),
    format: str = typer.Option("md", "--format", help="md, csv, latex or json"),
    layout: Optional[str] = typer.Option(None, help="paper (rows = variants, one formatted cell per group), "
                                         "wide (every statistic per variant) or long (a row per variant and "
                                         "group); default paper for md/latex (subjects: wide), long for csv/json"),
    metric: str = typer.Option("auto", help="paper task table: acc, acc_norm, or auto (acc_norm where the task "
                               "has it)"),
    baseline: str = typer.Option("clean"),
    n_boot: int = typer.Option(1000),
    seed: Seed = 0,
    out: Optional[str] = typer.Option(None, help="write here instead of stdout (with --write: a folder)"),
    write: bool = typer.Option(False, "--write", help="rewrite every table file of the run folder (or of --out)"),
):
    """Rebuild tables from saved results (no model run)."""
    from harness.output import tables

    if write:
        for path in tables.write_tables(run_dirs, out, n_boot, seed, baseline):
            typer.echo(f"wrote {path}", err=True)
        return
    text = tables.build_table(run_dirs, level, format, baseline, n_boot, seed, layout=layout, metric=metric)
    if out:
        from harness.files import write_atomic

        write_atomic(out, text)
        typer.echo(f"wrote {out}", err=True)
    else:
        typer.echo(text)


@app.command()
@user_errors
def report(
    run_dirs: List[str] = typer.Argument(..., help="run folders (one or several runs of the same model)"),
    out: Optional[str] = typer.Option(None, help="folder for report.html and the figures (default: the run "
                                      "folder for one run, `comparison` beside the first run for several)"),
):
    """Rebuild report.html from saved results, or compare several runs on one page (no model run)."""
    _quiet_libraries()
    from harness.output.report import write_report

    path = write_report(run_dirs, out)
    typer.echo(f"wrote {path}", err=True)


@app.command()
@user_errors
def bench(
    model: str = typer.Option("random:6x512", help="random:LAYERSxWIDTH (no download) or a model spec"),
    device: Device = "cpu",
    dtype: Dtype = "float32",
    saes: int = typer.Option(4, help="number of random TopK SAEs at one hook"),
    tokens: int = typer.Option(4096),
    ctx: int = typer.Option(128),
    batch_size: BatchSize = 8,
    mmlu_questions: int = typer.Option(40, help="offline MMLU questions for the lm-eval comparison (0 skips)"),
    blocks_model: str = typer.Option("random:12x512:v4096", help="a second shape for the CE rows, where the "
                                     "blocks rather than the unembedding dominate ('' skips)"),
    seed: Seed = 0,
):
    """Speed, memory and agreement side by side with sae-lens run_evals and lm-eval's HFLM."""
    _quiet_libraries()
    from harness.jobs.bench import print_report, run_bench

    result = run_bench(model=model, device=device, dtype=dtype, saes=saes, tokens=tokens, ctx=ctx,
                       batch_size=batch_size, mmlu_questions=mmlu_questions, seed=seed,
                       blocks_model=blocks_model or None,
                       log=lambda msg: typer.echo(msg, err=True))
    from rich.console import Console

    print_report(result, console=Console(width=200))


@app.command("fit-law")
@_value_errors_as_user_errors
def fit_law(
    points: str = typer.Argument(..., help="CSV with columns N, D (or C) and loss"),
    out: Optional[str] = typer.Option(None, help="write the law as JSON here"),
    lowest: Optional[int] = typer.Option(None, help="keep the K lowest-loss points"),
    n_boot: int = typer.Option(200, help="bootstrap resamples for the intervals"),
    seed: Seed = 0,
):
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al.'s procedure) with bootstrap intervals."""
    import json

    from rich.console import Console
    from rich.table import Table

    from harness import scaling
    from harness.files import write_atomic

    N, D, loss = scaling.read_points(points, lowest)
    law = scaling.fit_law(N, D, loss, n_boot=n_boot, seed=seed, name=points)
    d = law.to_json()
    table = Table(title=f"L(N, D) = E + A/N^alpha + B/D^beta fitted on {len(loss)} points (95% bootstrap)")
    for col in ("param", "value", "low", "high"):
        table.add_column(col, justify="left" if col == "param" else "right")
    for p in scaling.PARAMS:
        table.add_row(p, f"{d[p]:.6g}", f"{d[p + '_low']:.6g}", f"{d[p + '_high']:.6g}")
    Console().print(table)
    if out:
        write_atomic(out, json.dumps(d, indent=2) + "\n")
        typer.echo(f"wrote {out}", err=True)


@app.command()
@_value_errors_as_user_errors
def equiv(
    clean: float = typer.Option(..., help="clean model's loss (nats/token)"),
    spliced: Optional[float] = typer.Option(None, help="spliced model's loss (nats/token); or give --dce"),
    dce: Optional[float] = typer.Option(None, help="the loss increase (nats/token), instead of --spliced"),
    law: str = typer.Option("hoffmann", help="hoffmann, hoffmann-exact, epoch, kaplan, or a LAW.json"),
    params: Optional[float] = typer.Option(None, help="model parameters N"),
    tokens: Optional[float] = typer.Option(None, help="training tokens D"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Compute-equivalents of a loss increase: fraction of training compute (and N_eff/N, D_eff/D)."""
    import json

    from harness import scaling
    from harness.errors import UserError

    if (spliced is None) == (dce is None):
        raise UserError("give the spliced loss (--spliced) or the loss increase (--dce), one of the two")
    spliced = clean + dce if spliced is None else spliced
    result = scaling.equivalents(scaling.load_law(law), clean, spliced, params, tokens)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    typer.echo(f"law {result['law']}: clean {clean:.4f} -> spliced {spliced:.4f} nats/token")
    for key, label in (("compute_fraction", "C_eff/C on the frontier"), ("n_eff_frac", "N_eff/N at fixed D"),
                       ("d_eff_frac", "D_eff/D at fixed N")):
        if key in result:
            typer.echo(f"  {label:<26} {result[key]:.4g}")
    for row in result.get("compute_fraction_over_E", []):
        f = "-" if row["fraction"] is None else f"{row['fraction']:.4g}"
        typer.echo(f"  if E were {row['E']:.3f}: compute fraction {f}")
    for name, text in result["assumptions"].items():
        typer.echo(f"[{name}] {text}", err=True)


def main() -> None:  # pragma: no cover - console entry
    app(prog_name="sae-harness")
