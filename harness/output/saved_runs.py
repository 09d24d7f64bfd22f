"""Saved run folders as the report reads them: config, metrics, per-token arrays, compute-
equivalents, per-question task results, and generations / damage when a run has them.

Nothing here runs a model or writes a file; bad or unreadable input is a one-line UserError.
Several runs can share a page only when their clean model is the same (`check_same_model`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.output import layouts
from harness import scaling
from harness.output import tables
from harness.errors import UserError
from harness.lmeval.samples import MMLU


@dataclass
class Run:
    """Everything a run folder saved that the report uses; absent parts are None."""
    path: Path
    label: str
    config: dict
    metrics: list[dict] | None = None
    per_token: dict | None = None
    equivalents: dict | None = None
    per_question: pd.DataFrame | None = None
    generations: list[dict] | None = None
    damage: dict | None = None
    profile: pd.DataFrame | None = None  # profile_table(run), computed once on loading
    interp: dict | None = None  # interp.json (sae-harness interp): explainability beside fidelity
    curves: list[dict] | None = None  # layer_curves.json: a whole set's layer curves
    shown_path: str = ""  # the folder as the page names it (a run being written names its final place)

    @property
    def law(self) -> str | None:
        if self.equivalents:
            return self.equivalents.get("law")
        return (self.config.get("run") or {}).get("law")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {' '.join(str(e).split())}") from None


def load_run(path, label: str | None = None) -> Run:
    """Read one run folder. Only config.json is required; UserError names what is unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: not a sae-harness run folder")
    run = Run(path=path, label=label or path.resolve().name, config=_read_json(path / "config.json"))
    if (path / "metrics.json").is_file():
        run.metrics = _read_json(path / "metrics.json")
        if not isinstance(run.metrics, list) or not all(isinstance(r, dict) and "variant" in r for r in run.metrics):
            raise UserError(f"{path / 'metrics.json'} is not a list of per-variant records")
    if (path / "compute_equivalents.json").is_file():
        run.equivalents = _read_json(path / "compute_equivalents.json")
    if (path / "layer_curves.json").is_file():
        run.curves = _read_json(path / "layer_curves.json")
    if (path / "per_token_dce.npz").is_file():
        try:
            with np.load(path / "per_token_dce.npz") as z:
                run.per_token = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path / 'per_token_dce.npz'}: {e}") from None
    run.per_question = _per_question(path)
    if (path / "generations.json").is_file():
        run.generations = _generation_list(_read_json(path / "generations.json"))
    if (path / "damage.json").is_file():
        run.damage = _read_json(path / "damage.json")
    if (path / "interp.json").is_file():
        run.interp = _read_json(path / "interp.json")
    return run


def _per_question(path: Path) -> pd.DataFrame | None:
    """The run's per-question task results (tables' columns), or None when it has none."""
    if not any((path / n).is_file() for n in (tables.PER_QUESTION_FILE, tables.LEGACY_PER_QUESTION_FILE)):
        return None
    try:
        return tables.load_run_results([path])
    except ValueError as e:
        raise UserError(str(e)) from None


def _generation_list(data) -> list[dict]:
    """generations.json as a list of {"prompt", "variants": {name: {"text", ...}}}."""
    if isinstance(data, dict):
        data = data.get("prompts", data.get("generations", [data]))
    return [g for g in data if isinstance(g, dict) and isinstance(g.get("variants"), dict)]


def model_identity(config: dict) -> dict:
    """What makes two runs' clean models the same: the model spec, how it was loaded, its dtype,
    and (when both runs recorded them) its weight-file hashes."""
    m = config.get("model") or {}
    return {"spec": m.get("spec"), "loader": m.get("loader"), "dtype": m.get("dtype"),
            "hashes": m.get("hashes") or None}


def check_same_model(runs: list[Run]) -> None:
    first = model_identity(runs[0].config)
    for run in runs[1:]:
        other = model_identity(run.config)
        diff = [k for k in ("spec", "loader", "dtype") if first[k] != other[k]]
        if first["hashes"] and other["hashes"] and first["hashes"] != other["hashes"]:
            diff.append("weight hashes")
        if diff:
            a, b = runs[0], run
            raise UserError(f"runs differ in their clean model ({', '.join(diff)}): {a.path} has "
                            f"{first['spec']} ({first['dtype']}), {b.path} has {other['spec']} ({other['dtype']}); "
                            "compare runs of one model")


def load_runs(run_dirs) -> list[Run]:
    if not run_dirs:
        raise UserError("no run folder given")
    paths = [Path(p) for p in run_dirs]
    names = [p.resolve().name for p in paths]
    labels = [n if names.count(n) == 1 else f"{p.resolve().parent.name}/{n}" for p, n in zip(paths, names)]
    if len(set(labels)) < len(labels):
        raise UserError("the same run folder is given twice")
    runs = [load_run(p, lab) for p, lab in zip(paths, labels)]
    check_same_model(runs)
    for run in runs:
        run.profile = profile_table(run)
    return runs


# ---------------------------------------------------------------- what goes into tables and figures

def is_ablation(name: str) -> bool:
    """The zero/mean reference variants the CE suite adds for loss recovered."""
    return all(part.startswith(("zero@", "mean@")) for part in name.split("+"))


def profile_table(run: Run) -> pd.DataFrame | None:
    """Accuracy rows of tables' task table against the run's clean model (paired bootstrap,
    McNemar), one column group per MMLU category, then MMLU pooled, then every other task, each
    task by its primary metric (acc_norm where it has one, as in tasks.md); the group's label
    names the metric."""
    df = run.per_question
    if df is None or "clean" not in set(df["variant"]):
        return None
    n_boot = int((run.config.get("run") or {}).get("n_boot", 1000))
    seed = int((run.config.get("run") or {}).get("seed", 0))
    try:
        t = tables.task_table(df, "clean", n_boot, seed)
    except ValueError as e:
        raise UserError(f"{run.path}: {e}") from None
    primary = {task: layouts.primary_metric(t.loc[t["task"] == task, "metric"]) for task in dict.fromkeys(t["task"])}
    t = t[t["metric"] == t["task"].map(primary)].copy()
    is_mmlu = t["task"] == MMLU
    named = [f"{layouts.task_label(task)} ({m})" for task, m in zip(t["task"], t["metric"])]
    mmlu = [f"MMLU {'all' if g == 'all' else layouts.CATEGORY_LABEL.get(g, g)} ({m})"
            for g, m in zip(t["group"], t["metric"])]
    t["group"] = np.where(is_mmlu, mmlu, named)
    order = {g: i for i, g in enumerate(dict.fromkeys(
        [g for g in t["group"][is_mmlu] if not g.startswith("MMLU all")]
        + [g for g in t["group"][is_mmlu] if g.startswith("MMLU all")] + list(t["group"][~is_mmlu])))}
    t["order"] = t["group"].map(order)
    return t.sort_values(["order"], kind="stable").drop(columns="order").reset_index(drop=True)


def law_of(run: Run):
    """The law a run's compute-equivalents used: saved parameters, else the preset by name."""
    eq = run.equivalents or {}
    params = eq.get("law_params")
    if params:
        if "var" in params:
            return scaling.Curve.from_json(params)
        if "C_c_flop" in params:
            return scaling.KaplanLaw(C_c=params["C_c_flop"], alpha_C=params["alpha_C"],
                                     name=params.get("name", "kaplan"))
        return scaling.Law.from_json(params)
    try:
        return scaling.load_law(run.law) if run.law else None
    except ValueError:
        return None


def e_band(run: Run):
    band = (run.config.get("compute_equivalents") or {}).get("E_band")
    return tuple(band) if band else None
