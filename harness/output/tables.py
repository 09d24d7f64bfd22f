"""Degradation tables from per-question results of multiple-choice tasks, and their export.

Input: a long DataFrame, one row per (variant, task, question), with the columns in COLUMNS
(harness.lmeval.samples builds it from lm-eval's logged samples):
    variant       "clean" (the baseline) or an SAE / baseline name, e.g. "l15-w2304-k32"
    task          "mmlu" for MMLU's 57 subject tasks, else the lm-eval task name
    subject       MMLU subject, e.g. "moral_scenarios" ("" for other tasks)
    category      MMLU category: stem | humanities | social_sciences | other ("" for other tasks)
    doc_id        the question's index within its lm-eval task (lm-eval's doc_id)
    correct       lm-eval's acc for the question: 1 if argmax of the choices' log-likelihoods is gold
    correct_norm  lm-eval's acc_norm (log-likelihood / the choice's length), NaN where the task has none
    logp_correct  log-probability of the gold choice among the choices (log-softmax of their log-likelihoods)
    pred          predicted choice index (argmax of the choices' log-likelihoods)
A run folder saves it as `per_question.csv` (older runs: `mmlu_per_question.csv`, MMLU only),
so tables can be rebuilt without rerunning the model.

Every statistic compares a variant with the baseline on the same questions (paired):
    delta       acc(variant) - acc(baseline)  (acc: the value of the row's metric, acc or acc_norm)
    delta_lo/hi 95% percentile interval of delta from a paired bootstrap: resample question
                indices with replacement, the same indices for both variants. Recipe (exact, so
                it can be recomputed): rng = np.random.default_rng(seed), fresh for every table
                row; n_boot draws of rng.integers(0, n, size=n), one after the other, questions in
                (task, subject, doc_id) order.
                Subject-averaged rows stratify by subject: for each subject in sorted order, its
                n_boot draws of rng.integers(0, n_s, size=n_s); a replicate is the mean over
                subjects of the per-subject mean delta.
    b, c        discordant pairs: baseline right & variant wrong, baseline wrong & variant right
    p_mcnemar   exact McNemar: min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)), 1 when b + c = 0
    logp, delta_logp   mean log-probability of the gold choice, and its paired difference
MMLU tables: category rows come twice: weighting "question" pools all questions of the
category (what lm-eval's weight_by_size groups report) and "subject" averages the per-subject
figures. The row "all" covers every question. McNemar always uses the pooled pairs.
The task table has one row per (task, group, metric): group "all" for every task plus MMLU's
categories (pooled), metric acc, and acc_norm where the task reports it.

Layouts (harness.output.layouts renders them): "paper" (rows = variants, columns = categories or
tasks, one formatted cell each), "wide" (rows = groups, a column group of every statistic per
variant), "long" (one row per (variant, group)).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom

from harness.files import json_text, write_atomic
from harness.lmeval.samples import COLUMNS, MMLU

PER_QUESTION_FILE = "per_question.csv"
LEGACY_PER_QUESTION_FILE = "mmlu_per_question.csv"  # runs before the task column: MMLU only
REQUIRED = ["variant", "subject", "doc_id", "correct", "logp_correct", "pred"]
CATEGORY_ORDER = ["stem", "humanities", "social_sciences", "other"]
STATS = ["n", "n_subjects", "acc", "delta", "delta_lo", "delta_hi", "b", "c", "p_mcnemar", "logp", "delta_logp"]
WIDE_STATS = ("acc", "delta", "delta_lo", "delta_hi", "p_mcnemar", "logp", "delta_logp")
KEYS = ["task", "subject", "doc_id"]
METRIC_COLUMN = {"acc": "correct", "acc_norm": "correct_norm"}


# ---------------------------------------------------------------- statistics

def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts b and c."""
    if b + c == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(b, c), b + c, 0.5)))


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of x over n_boot resamples. Drawn in row blocks to bound memory; a (k, n) draw
    yields the same numbers as k successive size-n draws, so this equals the plain loop."""
    n, out, done = len(x), np.empty(n_boot), 0
    block = max(1, 2_000_000 // max(n, 1))
    while done < n_boot:
        k = min(block, n_boot - done)
        out[done:done + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
        done += k
    return out


def _interval(reps: np.ndarray) -> tuple[float, float]:
    if len(reps) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return float(lo), float(hi)


def _arrays(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """A variant's aligned per-question columns as numpy arrays (pandas indexing per table
    row would dominate the run time)."""
    return {"correct": rows["correct"].to_numpy(float), "correct_norm": rows["correct_norm"].to_numpy(float),
            "logp": rows["logp_correct"].to_numpy(float), "subject": rows["subject"].to_numpy(str)}


def _row_stats(base: dict, var: dict, idx: np.ndarray, n_boot: int, seed: int, by_subject: bool,
               score: str = "correct") -> dict:
    """Paired statistics of one variant against the baseline on the questions `idx`.
    base and var are _arrays of rows aligned one to one (same task, subject, doc_id); `score`
    is the 0/1 column compared (correct for acc, correct_norm for acc_norm)."""
    cb, cv = base[score][idx], var[score][idx]
    lb, lv = base["logp"][idx], var["logp"][idx]
    subject = base["subject"][idx]
    diff = cv - cb
    rng = np.random.default_rng(seed)
    if by_subject:
        # every subject counts once, whatever its size; bootstrap within each subject
        groups = [np.flatnonzero(subject == s) for s in sorted(set(subject))]
        acc = np.mean([cv[g].mean() for g in groups])
        delta = np.mean([diff[g].mean() for g in groups])
        logp = np.mean([lv[g].mean() for g in groups])
        delta_logp = np.mean([(lv[g] - lb[g]).mean() for g in groups])
        reps = np.mean([_boot_means(diff[g], n_boot, rng) for g in groups], axis=0) if n_boot else np.array([])
    else:
        acc, delta, logp, delta_logp = cv.mean(), diff.mean(), lv.mean(), (lv - lb).mean()
        reps = _boot_means(diff, n_boot, rng) if n_boot else np.array([])
    lo, hi = _interval(reps)
    b, c = int(((cb == 1) & (cv == 0)).sum()), int(((cb == 0) & (cv == 1)).sum())
    return {"n": len(cb), "n_subjects": len(set(subject) - {""}), "acc": float(acc),
            "delta": float(delta), "delta_lo": lo, "delta_hi": hi, "b": b, "c": c,
            "p_mcnemar": mcnemar_p(b, c), "logp": float(logp), "delta_logp": float(delta_logp)}


# ---------------------------------------------------------------- input checks and pairing

def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Fill the columns older MMLU-only results lack (task "mmlu", no acc_norm) and check
    the rest: bad input is a one-line ValueError."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"per-question results lack columns {missing} (need {COLUMNS})")
    df = df.copy()
    if "task" not in df.columns:
        df["task"] = MMLU
    if "correct_norm" not in df.columns:
        df["correct_norm"] = np.nan
    if "category" not in df.columns:
        if (df["task"] == MMLU).any():
            raise ValueError(f"per-question results lack columns ['category'] (need {COLUMNS})")
        df["category"] = ""
    for col in ("task", "subject", "category"):
        df[col] = df[col].fillna("").astype(str)
    df["variant"] = df["variant"].astype(str)
    if df.empty:
        raise ValueError("per-question results are empty")
    if df[["correct", "logp_correct", "doc_id"]].isna().any().any():
        raise ValueError("per-question results contain NaN in correct / logp_correct / doc_id")
    if not df["correct"].isin([0, 1]).all():
        raise ValueError("per-question column `correct` must be 0 or 1")
    if not df["correct_norm"].dropna().isin([0, 1]).all():
        raise ValueError("per-question column `correct_norm` must be 0, 1 or empty")
    return df[COLUMNS]


def _check(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    df = normalise(df)
    if baseline not in set(df["variant"]):
        raise ValueError(f"baseline variant {baseline!r} not in results (variants: {sorted(set(df['variant']))})")
    dup = df.duplicated(["variant", *KEYS])
    if dup.any():
        r = df[dup].iloc[0]
        where = f"{r['subject']} doc {r['doc_id']}" if r["subject"] else f"{r['task']} doc {r['doc_id']}"
        raise ValueError(f"duplicate result for variant {r['variant']!r}, {where}")
    return df


def _variants(df: pd.DataFrame, baseline: str) -> list[str]:
    """Baseline first, then the others in order of first appearance."""
    return [baseline] + [v for v in dict.fromkeys(df["variant"]) if v != baseline]


def _paired(df: pd.DataFrame, baseline: str) -> dict[str, pd.DataFrame]:
    """variant -> its rows sorted by (task, subject, doc_id), all aligned to the baseline's
    questions. df is already checked and holds one task (or the variants share all tasks)."""
    out = {}
    for v in _variants(df, baseline):
        out[v] = df[df["variant"] == v].sort_values(KEYS).reset_index(drop=True)
    keys = out[baseline][KEYS]
    if keys.empty:
        raise ValueError(f"baseline variant {baseline!r} has no results for task {df['task'].iloc[0]!r}")
    for v, rows in out.items():
        if not rows[KEYS].equals(keys):
            raise ValueError(f"variant {v!r} was scored on other questions than baseline {baseline!r}; "
                             "paired statistics need the same questions")
    return out


def _mmlu(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    df = _check(df, baseline)
    mmlu = df[df["task"] == MMLU]
    if mmlu.empty:
        raise ValueError(f"no MMLU results (tasks: {sorted(set(df['task']))}); use the task table")
    if baseline not in set(mmlu["variant"]):
        raise ValueError(f"baseline variant {baseline!r} has no MMLU results")
    return mmlu


def _category_names(categories) -> list[str]:
    known = [c for c in CATEGORY_ORDER if c in set(categories)]
    return known + sorted(set(categories) - set(CATEGORY_ORDER))


# ---------------------------------------------------------------- tables

def _table(df, level, baseline, n_boot, seed) -> pd.DataFrame:
    paired = _paired(_mmlu(df, baseline), baseline)
    base = paired[baseline]
    subject, cats = base["subject"].to_numpy(str), base["category"].to_numpy(str)
    every = np.arange(len(base))
    if level == "subject":
        groups = [(s, "question", np.flatnonzero(subject == s)) for s in sorted(set(subject))]
        groups.append(("all", "question", every))
    else:
        groups = []
        for weighting in ("question", "subject"):
            for c in _category_names(cats):
                groups.append((c, weighting, np.flatnonzero(cats == c)))
            groups.append(("all", weighting, every))
    arrays = {v: _arrays(rows) for v, rows in paired.items()}
    rows = []
    for v in paired:
        for name, weighting, idx in groups:
            category = name if level == "category" or name == "all" else cats[idx[0]]
            stats = _row_stats(arrays[baseline], arrays[v], idx, n_boot if v != baseline else 0, seed,
                               weighting == "subject")
            if v == baseline:  # the baseline against itself: an exact zero, no interval needed
                stats["delta_lo"] = stats["delta_hi"] = 0.0
            rows.append({"level": level, "group": name, "category": category, "weighting": weighting,
                         "variant": v, **stats})
    return pd.DataFrame(rows, columns=["level", "group", "category", "weighting", "variant", *STATS])


def subject_table(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """MMLU: one row per (variant, subject), plus group "all" (every question pooled)."""
    return _table(df, "subject", baseline, n_boot, seed)


def category_table(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """MMLU: one row per (variant, weighting, category), plus group "all"; weighting is
    "question" (pooled questions) or "subject" (mean of per-subject figures)."""
    return _table(df, "category", baseline, n_boot, seed)


def task_metrics(rows: pd.DataFrame) -> list[str]:
    """acc, plus acc_norm when the task's results carry it (all of them, or none)."""
    has_norm = rows["correct_norm"].notna()
    if has_norm.any() and not has_norm.all():
        raise ValueError(f"task {rows['task'].iloc[0]!r}: acc_norm is missing for some questions only")
    return ["acc", "acc_norm"] if has_norm.all() else ["acc"]


TASK_TABLE_COLUMNS = ["level", "task", "group", "category", "metric", "weighting", "variant", *STATS]


def task_table(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every multiple-choice task: one row per (variant, task, group, metric). Group "all"
    pools a task's questions; MMLU adds one (pooled) row per category. Tasks come in order
    of first appearance, MMLU first. A variant without results for a task has no rows for it."""
    df = _check(df, baseline)
    tasks = list(dict.fromkeys(df["task"]))
    tasks = [t for t in tasks if t == MMLU] + [t for t in tasks if t != MMLU]
    rows = []
    for task in tasks:
        paired = _paired(df[df["task"] == task], baseline)
        base = paired[baseline]
        cats = base["category"].to_numpy(str)
        groups = [("all", "", np.arange(len(base)))]
        if task == MMLU:
            groups += [(c, c, np.flatnonzero(cats == c)) for c in _category_names(cats)]
        arrays = {v: _arrays(rows) for v, rows in paired.items()}
        for metric in task_metrics(base):
            for v, var in paired.items():
                if var[METRIC_COLUMN[metric]].isna().any():
                    raise ValueError(f"variant {v!r} lacks {metric} on task {task!r} where {baseline!r} has it")
                for name, category, idx in groups:
                    stats = _row_stats(arrays[baseline], arrays[v], idx, n_boot if v != baseline else 0, seed,
                                       False, METRIC_COLUMN[metric])
                    if v == baseline:
                        stats["delta_lo"] = stats["delta_hi"] = 0.0
                    rows.append({"level": "task", "task": task, "group": name, "category": category,
                                 "metric": metric, "weighting": "question", "variant": v, **stats})
    return pd.DataFrame(rows, columns=TASK_TABLE_COLUMNS)


def tidy(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The long CSV form of MMLU: subject and category tables stacked (column `level` tells them apart)."""
    return pd.concat([subject_table(df, baseline, n_boot, seed), category_table(df, baseline, n_boot, seed)],
                     ignore_index=True)


COMPARISON_STATS = {"delta", "delta_lo", "delta_hi", "b", "c", "p_mcnemar", "delta_logp"}
ROW_KEYS = ("task", "weighting", "group", "metric")


def wide_table(table: pd.DataFrame, stats=WIDE_STATS, weighting: str | None = None) -> pd.DataFrame:
    """Side-by-side comparison: rows = groups (subjects, categories, or task/group/metric),
    a column group per variant (MultiIndex columns: variant, stat). `table` is a
    subject/category/task_table output. The baseline (its first variant) keeps only the
    non-comparison stats: its deltas are 0. Row keys that never vary are dropped, so
    weighting None keeps both category weightings as an outer row level only when both are there."""
    if weighting is not None:
        table = table[table["weighting"] == weighting]
        if table.empty:
            raise ValueError(f"no rows with weighting {weighting!r}")
    variants = list(dict.fromkeys(table["variant"]))
    index = [k for k in ROW_KEYS if k in table.columns and (k == "group" or table[k].nunique() > 1)]
    rows = list(dict.fromkeys(zip(*(table[k] for k in index))))
    wide = table.pivot(index=index, columns="variant", values=list(stats))
    wide = wide.swaplevel(0, 1, axis=1)  # (variant, stat): one column group per variant
    cols = [(v, st) for i, v in enumerate(variants) for st in stats if i > 0 or st not in COMPARISON_STATS]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(cols, names=["variant", "stat"]))
    order = rows if len(index) > 1 else [r[0] for r in rows]
    return wide.reindex(order)


# ---------------------------------------------------------------- formatting and export


def _flat(table: pd.DataFrame) -> pd.DataFrame:
    """Index levels become columns; MultiIndex columns become "variant/stat"."""
    t = table.copy()
    if isinstance(t.columns, pd.MultiIndex):
        t.columns = ["/".join(map(str, c)) for c in t.columns]
    if not isinstance(t.index, pd.RangeIndex) or t.index.name is not None:
        t = t.reset_index()
    return t


def _cell(value, column: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if float(value).is_integer() and column.split("/")[-1] in ("n", "n_subjects", "b", "c"):
            return str(int(value))  # counts turned float by a pivot
        return f"{value:.3g}" if column.split("/")[-1].startswith("p_") else f"{value:.4f}"
    return str(value)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _emit(text: str, path) -> str:
    if path is not None:
        write_atomic(path, text)
    return text


def to_csv(table: pd.DataFrame, path=None) -> str:
    return _emit(_flat(table).to_csv(index=False), path)


def to_json(table: pd.DataFrame, path=None) -> str:
    records = json.loads(_flat(table).to_json(orient="records", double_precision=15))  # NaN -> null
    return _emit(json_text(records, indent=1), path)


def to_markdown(table: pd.DataFrame, path=None) -> str:
    """GitHub-style pipe table (pandas' to_markdown), cells formatted as in every export."""
    t = _flat(table)
    # a literal "|" inside a cell would end it
    cells = pd.DataFrame([[_cell(v, c).replace("|", r"\|") for c, v in zip(t.columns, row)]
                          for row in t.itertuples(index=False)],
                         columns=[str(c).replace("|", r"\|") for c in t.columns])
    align = ["right" if _is_numeric(t[c]) else "left" for c in t.columns]
    text = cells.to_markdown(index=False, tablefmt="pipe", colalign=align, disable_numparse=True)
    return _emit(text + "\n", path)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_LABEL = {"acc": "acc", "delta": r"$\Delta$acc", "delta_lo": "lo", "delta_hi": "hi",
                "p_mcnemar": r"$p$", "logp": r"$\log p$", "delta_logp": r"$\Delta\log p$"}


def latex_escape(text) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, path=None) -> str:
    """A booktabs tabular, ready to \\input (needs \\usepackage{booktabs})."""
    t = table.copy()
    spans = None
    if isinstance(t.columns, pd.MultiIndex):  # (variant, stat): one \multicolumn per variant
        spans = Counter(t.columns.get_level_values(0))  # variant -> width, in column order
        stats = [c[1] for c in t.columns]
        t.columns = ["/".join(map(str, c)) for c in t.columns]
    if not isinstance(t.index, pd.RangeIndex) or t.index.name is not None:
        t = t.reset_index()
    n_lead = len(t.columns) - (len(stats) if spans is not None else 0)
    right = [_is_numeric(t[c]) for c in t.columns]
    lines = [r"\begin{tabular}{" + "".join("r" if r else "l" for r in right) + "}", r"\toprule"]
    if spans is not None:
        heads, rules, start = [], [], n_lead + 1
        for variant, width in spans.items():
            heads.append(r"\multicolumn{%d}{c}{%s}" % (width, latex_escape(variant)))
            rules.append(r"\cmidrule(lr){%d-%d}" % (start, start + width - 1))
            start += width
        lines += [" & " * n_lead + " & ".join(heads) + r" \\", " ".join(rules)]
        header = [latex_escape(c) for c in t.columns[:n_lead]] + [_LATEX_LABEL.get(s, latex_escape(s)) for s in stats]
    else:
        header = [_LATEX_LABEL.get(c, latex_escape(c)) for c in t.columns]
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    for row in t.itertuples(index=False):
        lines.append(" & ".join(latex_escape(_cell(v, c)) for c, v in zip(t.columns, row)) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return _emit("\n".join(lines) + "\n", path)


# ---------------------------------------------------------------- run folders

def save_per_question(df: pd.DataFrame, run_dir) -> Path:
    """Write <run_dir>/per_question.csv (atomically) in the column order of COLUMNS."""
    return write_atomic(Path(run_dir) / PER_QUESTION_FILE, normalise(df).to_csv(index=False))


def _read_per_question(d: Path) -> pd.DataFrame:
    f = next((d / n for n in (PER_QUESTION_FILE, LEGACY_PER_QUESTION_FILE) if (d / n).is_file()), None)
    if f is None:
        hint = "; it has CE results: use --level ce" if (d / "metrics.json").is_file() else ""
        raise ValueError(f"{PER_QUESTION_FILE} / {LEGACY_PER_QUESTION_FILE} not found in {d} "
                         f"(the run has no per-question task results{hint})")
    try:
        t = pd.read_csv(f, dtype={"variant": str, "task": str, "subject": str, "category": str})
    except Exception as err:
        raise ValueError(f"cannot read {f}: {' '.join(str(err).split())}") from None
    missing = [c for c in REQUIRED if c not in t.columns]
    if missing:
        raise ValueError(f"{f} lacks columns {missing} (need {COLUMNS})")
    return normalise(t)


def load_run_results(run_dirs) -> pd.DataFrame:
    """Concatenate the per-question CSVs of one or more run folders. A variant present in
    several runs (typically "clean") is kept once if its answers agree, else it is an error."""
    frames = [_read_per_question(d) for d in _run_folders(run_dirs)]
    df = pd.concat(frames, ignore_index=True)
    dup = df.duplicated(["variant", *KEYS], keep=False)
    if dup.any():
        clash = df[dup].groupby(["variant", *KEYS])[["correct", "pred"]].nunique().max(axis=1) > 1
        if clash.any():
            v = clash[clash].index[0][0]
            raise ValueError(f"variant {v!r} appears in several runs with different answers: rename one")
        df = df.drop_duplicates(["variant", *KEYS], keep="first").reset_index(drop=True)
    return df


def _run_folders(run_dirs) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("no run folder given")
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise ValueError(f"run folder {d} does not exist")
    return [Path(d) for d in run_dirs]


def load_ce_records(run_dirs) -> tuple[list[dict], dict]:
    """metrics.json records of one or more runs (a variant repeated with the same CE kept
    once) and what compute_equivalents.json / config.json say about the law and tokens."""
    records, info = [], {}
    for d in _run_folders(run_dirs):
        f = d / "metrics.json"
        if not f.is_file():
            raise ValueError(f"{f} not found (the run has no CE results)")
        try:
            recs = json.loads(f.read_text())
            extra = d / "compute_equivalents.json"
            info.setdefault("compute_equivalents", json.loads(extra.read_text()) if extra.is_file() else {})
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot read {f}: {err}") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) and "variant" in r for r in recs):
            raise ValueError(f"{f} is not a list of CE records with a `variant`")
        for r in recs:
            same = [o for o in records if o["variant"] == r["variant"]]
            if same and not np.isclose(same[0].get("ce_spliced", np.nan), r.get("ce_spliced", np.nan), equal_nan=True):
                raise ValueError(f"variant {r['variant']!r} appears in several runs with different CE: rename one")
            if not same:
                records.append(r)
    if len({r.get("ce_clean") for r in records}) > 1:
        raise ValueError("the runs' clean CE differ (other tokens or model): their CE tables cannot be merged")
    return records, info


# ---------------------------------------------------------------- building tables from run folders

FORMATS = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}
LEVELS = ("category", "subject", "task", "ce")
LAYOUTS = ("paper", "wide", "long")


def default_layout(level: str, fmt: str) -> str:
    """paper for Markdown and LaTeX (subjects: transposed, one row per subject), long (tidy,
    all numbers) for CSV and JSON."""
    if fmt in ("csv", "json"):
        return "long"
    return "paper"


def build_table(run_dirs, level: str = "category", fmt: str = "md", baseline: str = "clean",
                n_boot: int = 1000, seed: int = 0, wide: bool | None = None, layout: str | None = None,
                metric: str = "auto") -> str:
    """Rebuild a table from saved runs, as text. level: MMLU category or subject, task (every
    multiple-choice task) or ce (CE suite); layout: see default_layout (wide=True/False is
    the older spelling of layout "wide"/"long"); metric: the paper task table's score, acc,
    acc_norm, or auto (acc_norm where the task has it)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {fmt!r}")
    if layout is None:
        layout = default_layout(level, fmt) if wide is None else ("wide" if wide else "long")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if metric not in ("auto", "acc", "acc_norm"):
        raise ValueError(f"metric must be auto, acc or acc_norm, not {metric!r}")
    source = load_ce_records(run_dirs) if level == "ce" else load_run_results(run_dirs)
    return render_table(compute_table(source, level, baseline, n_boot, seed), level, fmt, layout, n_boot, metric)


def compute_table(source, level: str, baseline: str = "clean", n_boot: int = 1000, seed: int = 0):
    """The long table of a level from loaded results (per-question rows; for ce the
    (records, info) pair of load_ce_records, returned as is)."""
    if level == "ce":
        return source
    make = {"category": category_table, "subject": subject_table, "task": task_table}[level]
    return make(source, baseline, n_boot, seed)


def render_table(table, level: str, fmt: str, layout: str, n_boot: int, metric: str = "auto") -> str:
    """A computed table as text in one format and layout (see build_table)."""
    from harness.output import layouts

    if level == "ce":
        records, info = table
        if layout == "paper":
            return layouts.render(layouts.ce_grid(records, info), fmt)
        return FORMATS[fmt](layouts.ce_numbers(records))
    if layout == "wide":
        return FORMATS[fmt](wide_table(table))
    if layout == "long" and fmt in ("csv", "json"):
        return FORMATS[fmt](table)
    if layout == "paper" and level == "subject":
        return layouts.render(layouts.subject_grid(table, n_boot), fmt)
    grid = (layouts.long_grid(table, level, n_boot) if layout == "long"
            else layouts.paper_grid(table, level, n_boot, metric))
    return layouts.render(grid, fmt)


# file stem -> (level, formats written); the layout is each format's default
RUN_TABLES = {"ce": ("ce", ("md", "latex")), "tasks": ("task", ("md", "latex", "csv", "json")),
              "mmlu_category": ("category", ("md", "latex", "csv", "json")),
              "mmlu_subject": ("subject", ("md", "latex", "csv", "json"))}
EXTENSION = {"md": "md", "latex": "tex", "csv": "csv", "json": "json"}


def write_tables(run_dirs, out_dir=None, n_boot: int = 1000, seed: int = 0, baseline: str = "clean",
                 which=tuple(RUN_TABLES)) -> list[Path]:
    """(Re)write the table files of a run from its saved results: ce.{md,tex} when it has
    metrics.json; tasks.*, mmlu_category.* and mmlu_subject.* when it has per-question results
    (the MMLU ones only with MMLU questions). Several runs are merged (out_dir needed then).
    Every table is built before anything is written, so bad input leaves no half-written set."""
    folders = _run_folders(run_dirs)
    if out_dir is None and len(folders) > 1:
        raise ValueError("several run folders: say where the merged tables go (--out FOLDER)")
    has_ce = all((d / "metrics.json").is_file() for d in folders)
    has_q = all(any((d / n).is_file() for n in (PER_QUESTION_FILE, LEGACY_PER_QUESTION_FILE)) for d in folders)
    if not (has_ce or has_q):
        raise ValueError(f"no metrics.json or {PER_QUESTION_FILE} in {', '.join(map(str, folders))}: nothing to tabulate")
    texts = {}
    per_question = load_run_results(folders) if has_q else None
    has_mmlu = has_q and (per_question["task"] == MMLU).any()
    for stem in which:
        level, formats = RUN_TABLES[stem]
        if (level == "ce" and not has_ce) or (level != "ce" and not has_q) or \
                (level in ("category", "subject") and not has_mmlu):
            continue
        table = compute_table(load_ce_records(folders) if level == "ce" else per_question, level, baseline,
                              n_boot, seed)
        for fmt in formats:
            texts[f"{stem}.{EXTENSION[fmt]}"] = render_table(table, level, fmt, default_layout(level, fmt), n_boot)
    out_dir = Path(out_dir) if out_dir is not None else folders[0]
    return [write_atomic(out_dir / name, text) for name, text in texts.items()]
