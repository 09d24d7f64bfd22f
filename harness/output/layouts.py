"""Formatted tables for papers and READMEs: the "paper" and "long" layouts, and the CE table.

A Grid is a table of already-formatted cells that renders the same way to Markdown, LaTeX,
CSV and JSON, so README, paper and spreadsheet show the same numbers:
- paper: rows = variants, columns = MMLU categories (or tasks). The baseline's row gives its
  accuracy in %; every other row gives the change in percentage points with its 95% paired
  bootstrap interval, `-3.1 [-5.0, -1.2]`, marked * when the exact McNemar p < 0.05 and
  † when the interval excludes 0.
- long: one row per (variant, group): n, accuracy, the change with its interval, McNemar p
  and the change in the gold choice's log-probability.
- CE: one row per variant: L0, dCE [CI], KL, loss recovered (zero, mean), C_eff/C [CI], the
  scaling law named in the caption.
LaTeX output is a booktabs `table` float (needs \\usepackage{booktabs}) with a caption and a
label stub, sized to fit an A4 text block (16 cm); a joint splice's name breaks at its "+".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness.files import json_text
from harness.output import ce_columns

SIGNIFICANT = 0.05
CATEGORY_LABEL = {"stem": "STEM", "humanities": "Humanities", "social_sciences": "Social sci.",
                  "other": "Other", "all": "All"}
TASK_LABEL = {"mmlu": "MMLU", "hellaswag": "HellaSwag", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
              "piqa": "PIQA", "winogrande": "WinoGrande", "openbookqa": "OBQA", "sciq": "SciQ",
              "boolq": "BoolQ", "copa": "COPA", "commonsense_qa": "CSQA", "social_iqa": "SIQA"}


@dataclass
class Cell:
    """One formatted value: numbers as text with an ASCII minus ("" = no value)."""
    value: str = ""
    lo: str | None = None
    hi: str | None = None
    marks: str = ""  # "*" and/or "†"


@dataclass
class Grid:
    lead: list[str]                      # headers of the text columns (variant, group...)
    columns: list[tuple[str, str]]       # value columns: (plain header, LaTeX header)
    rows: list[tuple[list[str], list[Cell]]]
    caption: tuple[str, str]             # (plain/Markdown, LaTeX)
    label: str
    sub: list[list[str]] | None = None   # small header lines under each value column (plain)
    breaks: list[int] = field(default_factory=list)  # a rule before these rows (LaTeX)
    long: bool = False  # LaTeX: a longtable (rows run over pages) instead of a table float
    tex_columns: int = 0  # value columns per tabular (0: MAX_TEX_COLUMNS)


# ---------------------------------------------------------------- number formatting

def pp(x: float) -> str:
    """A share as signed percentage points, one decimal; a rounded zero is plain 0.0."""
    if x is None or not math.isfinite(x):
        return ""
    s = f"{100 * x:+.1f}"
    return "0.0" if s in ("+0.0", "-0.0") else s


def pct(x: float) -> str:
    return "" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def num(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return format(x, spec)


def marks(p: float, lo: float, hi: float) -> str:
    out = "*" if p < SIGNIFICANT else ""
    return out + ("†" if lo > 0 or hi < 0 else "")


# ---------------------------------------------------------------- MMLU / task layouts

def primary_metric(have) -> str:
    """The one metric a task is shown by everywhere (README, report, tasks.md): acc_norm where
    the task reports it (its length normalisation is what the task's authors score by), else acc."""
    return "acc_norm" if "acc_norm" in set(have) else "acc"


def task_label(task: str) -> str:
    """`hellaswag_offline` -> `HellaSwag`."""
    base = task.removesuffix("_offline")
    return TASK_LABEL.get(base, base)


def _label(key: str, level: str) -> str:
    if level == "task":
        return task_label(key)
    return CATEGORY_LABEL.get(key, key)


def _comparison(r, significance: bool = True) -> Cell:
    return Cell(pp(r["delta"]), pp(r["delta_lo"]), pp(r["delta_hi"]),
                marks(r["p_mcnemar"], r["delta_lo"], r["delta_hi"]) if significance else "")


def _paper_columns(table: pd.DataFrame, level: str, metric: str) -> tuple[pd.DataFrame, list]:
    """The rows the paper layout shows and its columns: [(key, header, sub, selector)]."""
    if level == "task":
        table = table[table["group"] == "all"]
        cols = []
        for task in dict.fromkeys(table["task"]):
            have = list(dict.fromkeys(table.loc[table["task"] == task, "metric"]))
            m = primary_metric(have) if metric == "auto" else metric
            if m not in have:
                raise ValueError(f"task {task!r} has no {m}; choose --metric acc")
            cols.append((task, _label(task, level), m, (table["task"] == task) & (table["metric"] == m)))
        return table, cols
    if "weighting" in table:
        table = table[table["weighting"] == "question"]
    return table, [(g, _label(g, level), "acc", table["group"] == g) for g in dict.fromkeys(table["group"])]


def paper_grid(table: pd.DataFrame, level: str, n_boot: int, metric: str = "auto") -> Grid:
    """Rows = variants, columns = categories / subjects / tasks (see the module doc)."""
    table, cols = _paper_columns(table, level, metric)
    variants = list(dict.fromkeys(table["variant"]))
    baseline = variants[0]
    sub = []
    for key, _, m, sel in cols:
        n = int(table.loc[sel & (table["variant"] == baseline), "n"].iloc[0])
        sub.append([m, f"n={n}"] if m else [f"n={n}"])
    rows = []
    for v in variants:
        cells = []
        for key, _, m, sel in cols:
            r = table[sel & (table["variant"] == v)]
            if r.empty:
                cells.append(Cell())
            else:
                r = r.iloc[0]
                cells.append(Cell(pct(r["acc"])) if v == baseline else _comparison(r))
        rows.append(([f"{baseline} (%)" if v == baseline else v], cells))
    what = {"category": "MMLU accuracy by category", "subject": "MMLU accuracy by subject",
            "task": "Accuracy on each task"}[level]
    pooled = " Categories pool their questions, as lm-eval's groups do." if level == "category" else ""
    metric_note = (" The metric (acc, or acc_norm: log-likelihood divided by the answer's length in "
                   "characters) is named under each task." if level == "task" else "")
    plain, tex = _significance_caption(baseline, n_boot)
    caption = (f"{what}. {plain}{pooled}{metric_note}",
               f"{_tex_text(what)}. {tex}{_tex_text(pooled)}{_tex_text(metric_note)}")
    label = {"category": "tab:mmlu-category", "subject": "tab:mmlu-subject", "task": "tab:tasks"}[level]
    return Grid(["Variant"], [(h, _tex_text(h)) for _, h, _, _ in cols], rows, caption, label, sub,
                breaks=[1] if len(rows) > 1 else [])


def subject_grid(table: pd.DataFrame, n_boot: int) -> Grid:
    """MMLU by subject for papers: rows = the 57 subjects (then all questions pooled), columns =
    variants; the baseline's column is its accuracy in %, the others the change in points with
    its interval (as in the paper layout, transposed: 57 columns fit no page, 57 rows do)."""
    if "weighting" in table:
        table = table[table["weighting"] == "question"]
    variants = list(dict.fromkeys(table["variant"]))
    baseline = variants[0]
    by = {(r["group"], r["variant"]): r for r in table.to_dict("records")}
    subjects = [g for g in dict.fromkeys(table["group"]) if g != "all"] + ["all"]
    rows = []
    for g in subjects:
        n = by[(g, baseline)]["n"]
        name = "all subjects" if g == "all" else g.replace("_", " ")
        cells = [Cell(pct(by[(g, v)]["acc"])) if v == baseline else
                 (_comparison(by[(g, v)]) if (g, v) in by else Cell()) for v in variants]
        rows.append(([name, str(int(n))], cells))
    plain, tex = _significance_caption(baseline, n_boot)
    plain = plain.replace("First row", "First column").replace("Other rows", "Other columns")
    tex = tex.replace("First row", "First column").replace("Other rows", "Other columns")
    caption = (f"MMLU accuracy by subject. {plain} Last row: all questions pooled.",
               f"MMLU accuracy by subject. {tex} Last row: all questions pooled.")
    return Grid(["Subject", "n"], [(f"{v} (%)" if v == baseline else v, _tex_name(v)) for v in variants], rows,
                caption, "tab:mmlu-subject", None, breaks=[len(rows) - 1], long=True)


def _significance_caption(baseline: str, n_boot: int, first_row: bool = True) -> tuple[str, str]:
    """How the cells read, in plain text and in LaTeX."""
    b = _tex_text(baseline)
    head = (f"First row: accuracy of {baseline} in %. Other rows: change against {baseline}",
            f"First row: accuracy of {b} in \\%. Other rows: change against {b}") if first_row else \
        (f"Change against {baseline}", f"Change against {b}")
    tail = (f" in percentage points, with its 95% paired bootstrap interval ({n_boot} resamples of the questions)",
            f" in percentage points, with its 95\\% paired bootstrap interval ({n_boot} resamples of the questions)")
    return (head[0] + tail[0] + "; * exact McNemar p < 0.05; † the interval excludes 0.",
            head[1] + tail[1] + r"; $^{*}$ exact McNemar $p<0.05$; $^{\dagger}$ the interval excludes 0.")


def long_grid(table: pd.DataFrame, level: str, n_boot: int) -> Grid:
    """One row per (variant, group [, metric]): n, accuracy, change [CI], McNemar p, change in log p."""
    keys = [k for k in ("variant", "task", "weighting", "group", "metric")
            if k in table and (k in ("variant", "group") or table[k].nunique() > 1)]
    baseline = table["variant"].iloc[0]
    columns = [("n", "$n$"), ("acc (%)", r"acc (\%)"), ("change (pp) [95% CI]", r"$\Delta$ (pp) [95\% CI]"),
               ("McNemar p", r"McNemar $p$"), ("change in log p", r"$\Delta\log p$")]
    rows, breaks, last = [], [], None
    for _, r in table.iterrows():
        if last is not None and r["variant"] != last:
            breaks.append(len(rows))
        last = r["variant"]
        lead = [_label(r[k], level) if k in ("task",) else str(r[k]) for k in keys]
        if r["variant"] == baseline:
            cells = [Cell(str(int(r["n"]))), Cell(pct(r["acc"])), Cell(), Cell(), Cell()]
        else:
            cells = [Cell(str(int(r["n"]))), Cell(pct(r["acc"])), _comparison(r),
                     Cell(num(r["p_mcnemar"], ".2g")), Cell(num(r["delta_logp"], "+.2f"))]
        rows.append((lead, cells))
    plain, tex = _significance_caption(baseline, n_boot, first_row=False)
    what = ("Per variant and group: accuracy, its change against the baseline, exact McNemar p and the "
            "change in the mean log-probability of the gold choice among the choices.")
    return Grid([k.capitalize() for k in keys], columns, rows, (f"{what} {plain}", f"{_tex_text(what)} {tex}"),
                f"tab:{level}-long", None, breaks)


# ---------------------------------------------------------------- CE suite

LAW_TEXT = {"hoffmann": "Hoffmann et al. (2022)", "hoffmann-exact": "Hoffmann et al. (2022, unrounded)",
            "epoch": "Besiroglu et al. (2024)", "kaplan": "Kaplan et al. (2020)"}


def law_text(spec: str) -> tuple[str, str]:
    """The law behind C_eff/C in words, with its parameters where it is a preset (plain, LaTeX)."""
    from harness import scaling

    if spec in scaling.PRESETS:
        law = scaling.PRESETS[spec]
        if isinstance(law, scaling.Law):
            p = f"E = {law.E:g}, A = {law.A:g}, B = {law.B:g}"
            return (f"the compute-optimal frontier of the {LAW_TEXT[spec]} law L(N, D) = E + A/N^alpha + B/D^beta "
                    f"({p}, alpha = {law.alpha:g}, beta = {law.beta:g})",
                    f"the compute-optimal frontier of the {LAW_TEXT[spec]} law $L(N, D) = E + A/N^\\alpha + B/D^\\beta$ "
                    f"(${p.replace(' = ', '=')}$, $\\alpha={law.alpha:g}$, $\\beta={law.beta:g}$)")
        return (f"the {LAW_TEXT[spec]} compute law L(C) = (C_c/C)^{law.alpha_C:g}",
                f"the {LAW_TEXT[spec]} compute law $L(C) = (C_c/C)^{{{law.alpha_C:g}}}$")
    return f"the law in {spec}", f"the law in {_tex_text(spec)}"


def _is_clean(r: dict) -> bool:
    return not r.get("hooks") and not r.get("saes")


def _frac(x) -> str:
    """A compute fraction: three significant digits, powers of ten below 0.001."""
    if x is None or not math.isfinite(x):
        return ""
    return format(x, "#.3g") if abs(x) >= 1e-3 else format(x, ".2e")


def ce_grid(records: list[dict], info: dict | None = None) -> Grid:
    """One row per spliced variant (the clean model is the reference, named in the caption)."""
    clean = next((r for r in records if _is_clean(r)), records[0])
    cols = ce_columns.columns(records, "grid")
    keys = {c.key for c in cols}
    extra = [(c.key, c.text, c.tex) for c in cols if c.key.startswith(("n_eff", "d_eff"))]
    ratios = [c.key for c in cols if c.key.endswith(("over_noise", "over_noise_dir"))]
    robust = "explained_variance_robust" in keys
    columns = [(c.text, c.tex) for c in cols]
    rows = [([r["variant"]], [Cell(*c.parts(r), marks=c.mark(r)) for c in cols]) for r in records if r is not clean]
    law = law_text(clean["law"]) if clean.get("law") else ("no scaling law", "no scaling law")
    n_tokens = clean.get("n_tokens")
    tokens = f" on {n_tokens:,} tokens" if isinstance(n_tokens, int) else ""
    sentences = [
        (f"Cross-entropy suite{tokens}; clean CE {clean['ce_clean']:.3f} nats/token.", None),
        ("L0: mean active latents per token (summed over a joint splice);", "$L_0$: mean active latents per "
         "token (summed over a joint splice);"),
        ("dCE: CE increase over clean (nats/token) with its 95% paired bootstrap interval over sequences;",
         r"$\Delta$CE: CE increase over clean (nats/token) with its 95\% paired bootstrap interval over sequences;"),
        ("KL: mean KL(clean || spliced) in nats;",
         r"KL: mean $\mathrm{KL}(p_{\mathrm{clean}}\,\|\,p_{\mathrm{spliced}})$ in nats;"),
        ("LR zero / mean: loss recovered against zero / mean ablation at the same hooks;",
         r"LR\textsubscript{zero} / LR\textsubscript{mean}: loss recovered against zero / mean ablation at the same hooks;"),
        (f"C_eff/C frontier: on {law[0]}, a compute-optimal model reaching the spliced loss needs this "
         "fraction of the compute of one reaching the clean loss (two hypothetical compute-optimal models, "
         "not this model's own compute); interval carried over from dCE's.",
         rf"$C_{{\mathrm{{eff}}}}/C$ frontier: on {law[1]}, a compute-optimal model reaching the spliced loss "
         r"needs this fraction of the compute of one reaching the clean loss (two hypothetical compute-optimal "
         r"models, not this model's own compute); interval carried over from $\Delta$CE's."),
    ]
    if any(k.endswith("fixed_d") for k, _, _ in extra):
        D = clean.get("train_tokens")
        where = f"D = {D:.3g} tokens, N = {clean.get('model_params'):.3g} parameters" if D else \
            "D unknown: pass --train-tokens"
        sentences.append((f"N_eff/N at D: the parameters a model trained on this model's own tokens ({where}) "
                          "would need to reach the spliced loss, as a fraction of N; D_eff/D at N: the tokens a "
                          "model of this size would need; both on the same law, anchored on the measured clean "
                          "loss.",
                          rf"$N_{{\mathrm{{eff}}}}/N$ at $D$: the parameters a model trained on this model's own "
                          rf"tokens ({_tex_text(where)}) would need to reach the spliced loss, as a fraction of $N$; "
                          r"$D_{\mathrm{eff}}/D$ at $N$: the tokens a model of this size would need; both on the "
                          r"same law, anchored on the measured clean loss."))
    if any(r.get(f"{c.key}_extrapolated") for r in records for c in cols):
        sentences.append(("‡: outside the runs the law or curve was fitted on (for the Hoffmann and Epoch laws, "
                          "Chinchilla's 70M-16B parameters on 5B-500B tokens): an extrapolation.",
                          r"$\ddagger$: outside the runs the law or curve was fitted on (for the Hoffmann and Epoch "
                          r"laws, Chinchilla's 70M--16B parameters on 5B--500B tokens): an extrapolation."))
    if any(k in ("n_eff_frac", "d_eff_frac") for k, _, _ in extra):
        sentences.append(("N_eff/N, D_eff/D: the same reading on the reference family / checkpoint curve "
                          "fitted on these tokens.", r"$N_{\mathrm{eff}}/N$, $D_{\mathrm{eff}}/D$: the same "
                          "reading on the reference family / checkpoint curve fitted on these tokens."))
    if ratios:
        sentences.append(("dCE ÷ noise, KL ÷ noise: the SAE's dCE and KL divided by those of noise@SAE (the "
                          "activation plus a random vector with the norm of the SAE's error, at the same "
                          "positions), with a 95% paired bootstrap interval over sequences; above 1, the SAE's "
                          "error does more damage than its size alone explains.",
                          r"$\Delta$CE $\div$ noise, KL $\div$ noise: the SAE's $\Delta$CE and KL divided by "
                          r"those of noise@SAE (the activation plus a random vector with the norm of the SAE's "
                          r"error, at the same positions), with a 95\% paired bootstrap interval over sequences; "
                          r"above 1, the SAE's error does more damage than its size alone explains."))
    sentences.append(("EV: explained variance of the activations over the token set.", None))
    if robust:
        sentences.append(("EV w/o massive: the same without the massive activations (positions whose clean "
                          "norm exceeds the run's factor, 10 by default, times the median), their count in brackets.",
                          None))
    plain = " ".join(p for p, _ in sentences)
    tex = " ".join(_tex_text(p) if t is None else t for p, t in sentences)
    # most CE cells carry an interval under the value: 4 such columns fill the A4 text block
    return Grid(["Variant"], columns, rows, (plain, tex), "tab:ce", None, [], tex_columns=4)


def ce_numbers(records: list[dict]) -> pd.DataFrame:
    """Every CE record field, one row per variant (the CE suite's wide and long layouts)."""
    df = pd.DataFrame(records)
    for col in ("saes", "hooks"):
        if col in df:
            df[col] = df[col].map(lambda x: "+".join(x) if isinstance(x, list) else x)
    return df


# ---------------------------------------------------------------- rendering

def _plain(c: Cell, empty: str) -> str:
    if not c.value:
        return empty
    return c.value + c.marks + (f" [{c.lo}, {c.hi}]" if c.lo else "")


def _headers(g: Grid) -> list[str]:
    heads = [h for h, _ in g.columns]
    if g.sub:
        heads = [f"{h} ({', '.join(s)})" for h, s in zip(heads, g.sub)]
    return g.lead + heads


def to_markdown(g: Grid) -> str:
    """A pipe table, then the caption as a paragraph."""
    header = _headers(g)
    body = [lead + [_plain(c, "–") for c in cells] for lead, cells in g.rows]
    esc = [[s.replace("|", r"\|") for s in row] for row in [header, *body]]
    rule = ["---"] * len(g.lead) + ["---:"] * len(g.columns)
    lines = ["| " + " | ".join(r) + " |" for r in [esc[0], rule, *esc[1:]]]
    return "\n".join(lines) + f"\n\n{g.caption[0]}\n"


def to_frame(g: Grid) -> pd.DataFrame:
    return pd.DataFrame([lead + [_plain(c, "") for c in cells] for lead, cells in g.rows], columns=_headers(g))


def to_csv(g: Grid) -> str:
    return to_frame(g).to_csv(index=False)


def to_json(g: Grid) -> str:
    return json_text({"caption": g.caption[0], "rows": to_frame(g).to_dict(orient="records")},
                      indent=1, ensure_ascii=False)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "†": r"\textdagger{}",
        "–": "--", "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}


def _tex_text(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _tex_number(s: str) -> str:
    """"-3.1" -> $-3.1$; "1.71e-06" -> $1.71{\\cdot}10^{-6}$ (true minus signs, no e-notation)."""
    if "e" in s:
        mant, exp = s.split("e")
        return f"${mant}{{\\cdot}}10^{{{int(exp)}}}$"
    return f"${s}$"


def _tex_cell(c: Cell) -> str:
    if not c.value:
        return "--"
    sup = "".join({"*": "*", "†": r"\dagger", "‡": r"\ddagger"}[m] for m in c.marks)
    main = _tex_number(c.value)
    if sup:  # a number in powers of ten already carries a superscript: brace it first
        main = (f"${{{main[1:-1]}}}^{{{sup}}}$" if r"\cdot" in main else main[:-1] + f"^{{{sup}}}$")
    if not c.lo:
        return main
    # the interval goes under the value, in small print: columns stay narrow enough for a page
    return (r"\begin{tabular}[t]{@{}r@{}}" + main + r"\\{\scriptsize[" + _tex_number(c.lo) + ", "
            + _tex_number(c.hi) + r"]}\end{tabular}")


def _tex_name(name: str) -> str:
    """A variant name; a joint splice (a+b) stacks its parts so the column stays narrow."""
    parts = name.split("+")
    if len(parts) == 1:
        return _tex_text(name)
    return r"\begin{tabular}[t]{@{}l@{}}" + r"+\\".join(_tex_text(p) for p in parts) + r"\end{tabular}"


MAX_TEX_COLUMNS = 6  # value columns per tabular; more are continued in a second tabular below


def _tex_tabular(g: Grid, cols: list[int]) -> list[str]:
    spec = "@{}" + "l" * len(g.lead) + "r" * len(cols) + "@{}"
    lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
             " & ".join([_tex_text(h) for h in g.lead] + [g.columns[j][1] for j in cols]) + r" \\"]
    for k in range(max((len(s) for s in g.sub), default=0) if g.sub else 0):  # one row per header line
        lines.append(" & ".join([""] * len(g.lead) + [r"{\scriptsize " + _tex_text(g.sub[j][k]) + "}"
                                                      if k < len(g.sub[j]) else "" for j in cols]) + r" \\")
    lines.append(r"\midrule")
    for i, (lead, cells) in enumerate(g.rows):
        if i in g.breaks:
            lines.append(r"\midrule" if g.breaks == [1] else r"\addlinespace")
        lines.append(" & ".join([_tex_name(x) if k == 0 else _tex_text(x) for k, x in enumerate(lead)]
                                + [_tex_cell(cells[j]) for j in cols]) + r" \\")
    return lines + [r"\bottomrule", r"\end{tabular}"]


SUBJECT_WIDTH = "3.3cm"  # the subject column of a longtable wraps at this width
MAX_LONG_COLUMNS = 5  # value columns per longtable; more continue in another longtable


def _tex_longtable(g: Grid, cols: list[int], first: bool) -> list[str]:
    spec = "@{}" + f"p{{{SUBJECT_WIDTH}}}" + "r" * (len(g.lead) - 1) + "r" * len(cols) + "@{}"
    head = " & ".join([_tex_text(h) for h in g.lead] + [g.columns[j][1] for j in cols]) + r" \\"
    lines = [r"\begin{longtable}{" + spec + "}"]
    if first:
        lines.append(r"\caption{" + g.caption[1] + r"}\label{" + g.label + r"}\\")
    else:
        lines.append(r"\caption[]{(continued) " + _tex_text(g.caption[0].split(".")[0]) + r".}\\")
    lines += [r"\toprule", head, r"\midrule", r"\endfirsthead", r"\toprule", head, r"\midrule", r"\endhead",
              r"\bottomrule", r"\endfoot"]
    for i, (lead, cells) in enumerate(g.rows):
        if i in g.breaks:
            lines.append(r"\midrule")
        lines.append(" & ".join([_tex_text(x) for x in lead] + [_tex_cell(cells[j]) for j in cols]) + r" \\")
    return lines + [r"\end{longtable}"]


def to_latex(g: Grid) -> str:
    """A booktabs table float with caption and label (needs \\usepackage{booktabs}); a long grid
    is a longtable instead (also needs \\usepackage{longtable})."""
    if g.long:
        lines = [f"% sae-harness table ({g.label}); needs \\usepackage{{booktabs}} and \\usepackage{{longtable}}",
                 r"{\small\setlength{\tabcolsep}{4pt}"]
        n = len(g.columns)
        for start in range(0, n, MAX_LONG_COLUMNS):
            lines += _tex_longtable(g, list(range(start, min(n, start + MAX_LONG_COLUMNS))), start == 0)
        return "\n".join(lines + ["}"]) + "\n"
    lines = [f"% sae-harness table ({g.label}); needs \\usepackage{{booktabs}} in the preamble",
             r"\begin{table}[tbp]", r"\centering", r"\small", r"\setlength{\tabcolsep}{4pt}",
             r"\caption{" + g.caption[1] + "}", r"\label{" + g.label + "}"]
    n, per = len(g.columns), g.tex_columns or MAX_TEX_COLUMNS
    for start in range(0, n, per):
        if start:
            lines.append(r"\par\medskip")
        lines += _tex_tabular(g, list(range(start, min(n, start + per))))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


RENDERERS = {"md": to_markdown, "latex": to_latex, "csv": to_csv, "json": to_json}


def render(g: Grid, fmt: str) -> str:
    return RENDERERS[fmt](g)
