"""Degradation tables from per-question MMLU results, and their export (CSV, Markdown, LaTeX, JSON).

Input: a long DataFrame, one row per (variant, question), with the columns in COLUMNS:
    variant       "clean" (the baseline) or an SAE / baseline name, e.g. "l15-w2304-k32"
    subject       lm-eval subject name, e.g. "moral_scenarios"
    category      stem | humanities | social_sciences | other
    doc_id        the question's index within its subject (lm-eval's doc_id)
    correct       1 if the predicted choice is the gold one, else 0
    logp_correct  log-probability of the gold choice's continuation
    pred          predicted choice index (argmax of the choices' log-likelihoods)
A run folder saves it as `mmlu_per_question.csv` (see save_per_question / load_run_results),
so tables can be rebuilt without rerunning the model.

Every statistic compares a variant with the baseline on the same questions (paired):
    delta       acc(variant) - acc(baseline)
    delta_lo/hi 95% percentile interval of delta from a paired bootstrap: resample question
                indices with replacement, the same indices for both variants. Recipe (exact, so
                it can be recomputed): rng = np.random.default_rng(seed), fresh for every table
                row; n_boot draws of rng.integers(0, n, size=n), one after the other.
                Subject-averaged rows stratify by subject: for each subject in sorted order, its
                n_boot draws of rng.integers(0, n_s, size=n_s); a replicate is the mean over
                subjects of the per-subject mean delta.
    b, c        discordant pairs: baseline right & variant wrong, baseline wrong & variant right
    p_mcnemar   exact McNemar: min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)), 1 when b + c = 0
    logp, delta_logp   mean log-probability of the gold choice, and its paired difference
Category rows come twice: weighting "question" pools all questions of the category (what
lm-eval's weight_by_size groups report) and "subject" averages the per-subject figures.
The row "all" covers every question. McNemar always uses the pooled pairs.
"""

from __future__ import annotations

import json
import os
from collections import Counter
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binom

PER_QUESTION_FILE = "mmlu_per_question.csv"
COLUMNS = ["variant", "subject", "category", "doc_id", "correct", "logp_correct", "pred"]
CATEGORY_ORDER = ["stem", "humanities", "social_sciences", "other"]
STATS = ["n", "n_subjects", "acc", "delta", "delta_lo", "delta_hi", "b", "c", "p_mcnemar", "logp", "delta_logp"]
WIDE_STATS = ("acc", "delta", "delta_lo", "delta_hi", "p_mcnemar", "logp", "delta_logp")
KEYS = ["subject", "doc_id"]


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


def _row_stats(base: pd.DataFrame, var: pd.DataFrame, n_boot: int, seed: int, by_subject: bool) -> dict:
    """Paired statistics of one variant against the baseline on one set of questions.
    base and var are aligned row by row (same subject, doc_id)."""
    cb, cv = base["correct"].to_numpy(float), var["correct"].to_numpy(float)
    lb, lv = base["logp_correct"].to_numpy(float), var["logp_correct"].to_numpy(float)
    diff = cv - cb
    rng = np.random.default_rng(seed)
    if by_subject:
        # every subject counts once, whatever its size; bootstrap within each subject
        groups = [np.flatnonzero(base["subject"].to_numpy() == s) for s in sorted(base["subject"].unique())]
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
    return {"n": len(cb), "n_subjects": base["subject"].nunique(), "acc": float(acc),
            "delta": float(delta), "delta_lo": lo, "delta_hi": hi, "b": b, "c": c,
            "p_mcnemar": mcnemar_p(b, c), "logp": float(logp), "delta_logp": float(delta_logp)}


# ---------------------------------------------------------------- input checks and pairing

def _check(df: pd.DataFrame, baseline: str) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"per-question results lack columns {missing} (need {COLUMNS})")
    if df.empty:
        raise ValueError("per-question results are empty")
    if df[["correct", "logp_correct", "doc_id"]].isna().any().any():
        raise ValueError("per-question results contain NaN in correct / logp_correct / doc_id")
    if not df["correct"].isin([0, 1]).all():
        raise ValueError("per-question column `correct` must be 0 or 1")
    if baseline not in set(df["variant"]):
        raise ValueError(f"baseline variant {baseline!r} not in results (variants: {sorted(set(df['variant']))})")
    dup = df.duplicated(["variant", *KEYS])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(f"duplicate result for variant {r['variant']!r}, {r['subject']} doc {r['doc_id']}")


def _variants(df: pd.DataFrame, baseline: str) -> list[str]:
    """Baseline first, then the others in order of first appearance."""
    return [baseline] + [v for v in dict.fromkeys(df["variant"]) if v != baseline]


def _paired(df: pd.DataFrame, baseline: str) -> dict[str, pd.DataFrame]:
    """variant -> its rows sorted by (subject, doc_id), all aligned to the baseline's questions."""
    _check(df, baseline)
    out = {}
    for v in _variants(df, baseline):
        out[v] = df[df["variant"] == v].sort_values(KEYS).reset_index(drop=True)
    keys = out[baseline][KEYS]
    for v, rows in out.items():
        if not rows[KEYS].equals(keys):
            raise ValueError(f"variant {v!r} was scored on other questions than baseline {baseline!r}; "
                             "paired statistics need the same questions")
    return out


def _category_names(categories) -> list[str]:
    known = [c for c in CATEGORY_ORDER if c in set(categories)]
    return known + sorted(set(categories) - set(CATEGORY_ORDER))


# ---------------------------------------------------------------- tables

def _table(df, level, baseline, n_boot, seed) -> pd.DataFrame:
    paired = _paired(df, baseline)
    base = paired[baseline]
    if level == "subject":
        groups = [(s, "question", base["subject"] == s) for s in sorted(base["subject"].unique())]
        groups.append(("all", "question", pd.Series(True, index=base.index)))
    else:
        groups = []
        for weighting in ("question", "subject"):
            for c in _category_names(base["category"]):
                groups.append((c, weighting, base["category"] == c))
            groups.append(("all", weighting, pd.Series(True, index=base.index)))
    rows = []
    for v, var in paired.items():
        for name, weighting, mask in groups:
            category = name if level == "category" or name == "all" else base.loc[mask, "category"].iloc[0]
            stats = _row_stats(base[mask], var[mask], n_boot if v != baseline else 0, seed, weighting == "subject")
            if v == baseline:  # the baseline against itself: an exact zero, no interval needed
                stats["delta_lo"] = stats["delta_hi"] = 0.0
            rows.append({"level": level, "group": name, "category": category, "weighting": weighting,
                         "variant": v, **stats})
    return pd.DataFrame(rows, columns=["level", "group", "category", "weighting", "variant", *STATS])


def subject_table(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (variant, subject), plus group "all" (every question pooled)."""
    return _table(df, "subject", baseline, n_boot, seed)


def category_table(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (variant, weighting, category), plus group "all"; weighting is
    "question" (pooled questions) or "subject" (mean of per-subject figures)."""
    return _table(df, "category", baseline, n_boot, seed)


def tidy(df: pd.DataFrame, baseline: str = "clean", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """The long CSV form: subject and category tables stacked (column `level` tells them apart)."""
    return pd.concat([subject_table(df, baseline, n_boot, seed), category_table(df, baseline, n_boot, seed)],
                     ignore_index=True)


COMPARISON_STATS = {"delta", "delta_lo", "delta_hi", "b", "c", "p_mcnemar", "delta_logp"}


def wide_table(table: pd.DataFrame, stats=WIDE_STATS, weighting: str | None = None) -> pd.DataFrame:
    """Side-by-side comparison: rows = groups (subjects or categories), a column group per
    variant (MultiIndex columns: variant, stat). `table` is a subject/category_table output.
    The baseline (its first variant) keeps only the non-comparison stats: its deltas are 0.
    weighting None keeps both category weightings as an outer row level (dropped if only one)."""
    if weighting is not None:
        table = table[table["weighting"] == weighting]
        if table.empty:
            raise ValueError(f"no rows with weighting {weighting!r}")
    variants = list(dict.fromkeys(table["variant"]))
    rows = list(dict.fromkeys(zip(table["weighting"], table["group"])))
    index = ["weighting", "group"] if table["weighting"].nunique() > 1 else ["group"]
    wide = table.pivot(index=index, columns="variant", values=list(stats))
    wide = wide.swaplevel(0, 1, axis=1)  # (variant, stat): one column group per variant
    cols = [(v, st) for i, v in enumerate(variants) for st in stats if i > 0 or st not in COMPARISON_STATS]
    wide = wide.reindex(columns=pd.MultiIndex.from_tuples(cols, names=["variant", "stat"]))
    order = rows if len(index) == 2 else [g for _, g in rows]
    return wide.reindex(order)


# ---------------------------------------------------------------- formatting and export

def write_atomic(path, text: str) -> Path:
    """Write text via a temp file in the same folder + os.replace: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
    return _emit(json.dumps(records, indent=1) + "\n", path)


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
    """Write <run_dir>/mmlu_per_question.csv (atomically) in the column order of COLUMNS."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"per-question results lack columns {missing} (need {COLUMNS})")
    return write_atomic(Path(run_dir) / PER_QUESTION_FILE, df[COLUMNS].to_csv(index=False))


def load_run_results(run_dirs) -> pd.DataFrame:
    """Concatenate the per-question CSVs of one or more run folders. A variant present in
    several runs (typically "clean") is kept once if its answers agree, else it is an error."""
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("no run folder given")
    frames = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise ValueError(f"run folder {d} does not exist")
        f = d / PER_QUESTION_FILE
        if not f.is_file():
            raise ValueError(f"{f} not found (the run has no per-question MMLU results)")
        try:
            t = pd.read_csv(f, dtype={"variant": str, "subject": str, "category": str})
        except Exception as err:
            raise ValueError(f"cannot read {f}: {' '.join(str(err).split())}") from None
        missing = [c for c in COLUMNS if c not in t.columns]
        if missing:
            raise ValueError(f"{f} lacks columns {missing} (need {COLUMNS})")
        frames.append(t[COLUMNS])
    df = pd.concat(frames, ignore_index=True)
    dup = df.duplicated(["variant", *KEYS], keep=False)
    if dup.any():
        clash = df[dup].groupby(["variant", *KEYS])[["correct", "pred"]].nunique().max(axis=1) > 1
        if clash.any():
            v = clash[clash].index[0][0]
            raise ValueError(f"variant {v!r} appears in several runs with different answers: rename one")
        df = df.drop_duplicates(["variant", *KEYS], keep="first").reset_index(drop=True)
    return df


FORMATS = {"md": to_markdown, "csv": to_csv, "latex": to_latex, "json": to_json}


def build_table(run_dirs, level: str = "category", fmt: str = "md", baseline: str = "clean",
                n_boot: int = 1000, seed: int = 0, wide: bool | None = None) -> str:
    """Rebuild a degradation table from saved runs, as text. By default md and latex give the
    side-by-side wide table (papers, terminals) and csv and json the long tidy one (analysis)."""
    if level not in ("category", "subject"):
        raise ValueError(f"level must be 'category' or 'subject', not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, not {fmt!r}")
    df = load_run_results(run_dirs)
    table = (category_table if level == "category" else subject_table)(df, baseline, n_boot, seed)
    if wide if wide is not None else fmt in ("md", "latex"):
        table = wide_table(table)
    return FORMATS[fmt](table)
