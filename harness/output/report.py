"""report.html: one self-contained page per run folder, or one page comparing several.

Built only from what a run saved (read by harness.output.saved_runs), so a report can be rebuilt,
or several runs compared, without a model. The page embeds its figures as base64 PNG and
loads nothing from the network: it opens from disk, mailed or archived. Every figure is also
written beside it as PNG and PDF for papers.
"""

from __future__ import annotations

import base64
import html
import math
import numbers
import os
from pathlib import Path

import numpy as np
import pandas as pd

from harness.output import figures
from harness.output.ce_columns import columns
from harness import scaling
from harness.errors import UserError
from harness.files import write_atomic
from harness.output.saved_runs import Run, e_band, is_ablation, law_of, load_runs

FIGURES = ("compute", "tradeoff", "profile", "damage", "frontier")


# ---------------------------------------------------------------- naming and numbers

def _fin(x) -> float:
    """x as a float; NaN for None, missing and non-finite values (JSON null, numpy scalars alike)."""
    return float(x) if isinstance(x, numbers.Real) and math.isfinite(x) else float("nan")


class Labels:
    """Variant names as shown: prefixed by the run when several runs share the page."""

    def __init__(self, runs: list[Run]):
        self.multi = len(runs) > 1

    def __call__(self, run: Run, variant: str) -> str:
        return f"{run.label}/{variant}" if self.multi else variant


def variant_order(runs: list[Run], label: Labels) -> list[str]:
    """Shown (non-clean, non-ablation) variants of every run, in run order: the colour key."""
    out = []
    for run in runs:
        names = [r["variant"] for r in run.metrics or []]
        if run.per_question is not None:
            names += list(dict.fromkeys(run.per_question["variant"]))
        for n in (run.per_token or {}):
            names.append(n)
        for n in dict.fromkeys(names):
            if n != "clean" and not is_ablation(n) and label(run, n) not in out:
                out.append(label(run, n))
    return out


# ---------------------------------------------------------------- formatting

def _f(x, p: int = 3, signed: bool = False) -> str:
    x = _fin(x)
    if math.isnan(x):
        return "&ndash;"
    if not signed:
        return f"{x:.{p}f}"
    text = f"{x:+.{p}f}"
    return text[1:] if float(text) == 0 else text  # a rounded zero carries no sign


def _robust_ev(rec: dict) -> str:
    """Explained variance without the massive activations, with their count: `0.808 (2)`."""
    ev, n = _fin(rec.get("explained_variance_robust")), _fin(rec.get("n_massive"))
    return "&ndash;" if math.isnan(ev) or math.isnan(n) else f"{ev:.3f} ({int(n)})"


def _g(x) -> str:
    """A fraction that spans orders of magnitude: 3 significant digits."""
    x = _fin(x)
    return "&ndash;" if math.isnan(x) else f"{x:.3g}"


def _pct(x, p: int = 1) -> str:
    x = _fin(x)
    return "&ndash;" if math.isnan(x) else f"{100 * x:.{p}f}%"


def _ci(x, lo, hi, fmt) -> str:
    """A value with its interval on the line below (keeps columns narrow)."""
    if math.isnan(_fin(x)):
        return "&ndash;"
    if math.isnan(_fin(lo)) or math.isnan(_fin(hi)):
        return fmt(x)
    return f"{fmt(x)}<br><span class=ci>[{fmt(lo)}, {fmt(hi)}]</span>"


def _column_cell(col, rec: dict) -> str:
    """One cell of a CE-table column (harness/output/ce_columns.py), its interval below it."""
    value, lo, hi = col.parts(rec, html=True)
    if not value:
        return "&ndash;"
    value = _esc(value + col.mark(rec))
    return value if lo is None else f"{value}<br><span class=ci>[{_esc(lo)}, {_esc(hi)}]</span>"


def _name(variant: str) -> str:
    """A variant name that may break after each + of a joint splice."""
    return "+<wbr>".join(_esc(p) for p in variant.split("+"))


def _table(headers: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table inside a box that scrolls sideways when the table is wider than the page.
    Cells are HTML already; the first column is the row label (left-aligned)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _esc(x) -> str:
    return html.escape(str(x))


# ---------------------------------------------------------------- sections

def headline_section(runs: list[Run], label: Labels) -> str:
    """Two tables: what each splice costs (dCE [CI], C_eff/C [CI] with its law, loss recovered
    against zero and mean side by side, KL), then how it reconstructs (EV, L0, dead latents) and
    whether its damage exceeds a random error of the same size (the noise@ ratios). Ablation
    references go to a third."""
    runs = [r for r in runs if r.metrics]
    if not runs:
        return "<p class=note>No CE suite in these runs (no metrics.json).</p>"
    laws = list(dict.fromkeys(r.law for r in runs if r.law))
    recs = [rec for r in runs for rec in r.metrics]
    cost, recon_cols = columns(recs, "html", "cost"), columns(recs, "html", "recon")
    ratios = [c for c in recon_cols if c.kind == "ratio"]
    law = ", ".join(laws) if laws else "no law"
    headers = ["variant<br><span class=n>hooks</span>"] + [c.html.replace("{law}", _esc(law)) for c in cost]
    recon_headers = ["variant"] + [c.html for c in recon_cols]
    rows, recon, ablations, seen = [], [], [], set()
    for run in runs:
        for rec in run.metrics:
            key = (run.config.get("tokens_sha256") or run.label, rec["variant"], rec.get("ce_spliced"))
            if key in seen:  # the same variant on the same tokens in two runs: one row
                continue
            seen.add(key)
            name = _name(label(run, rec["variant"]))
            dce = _ci(rec.get("dce"), rec.get("dce_ci_low"), rec.get("dce_ci_high"), _f)
            if is_ablation(rec["variant"]):
                ablations.append([name, _f(rec.get("ce_spliced")), dce, _f(rec.get("kl")),
                                  _f(rec.get("explained_variance")), _robust_ev(rec)])
                continue
            hooks = "+".join(h.replace("blocks.", "").replace("hook_", "") for h in rec.get("hooks", []))
            if hooks and hooks not in rec["variant"]:
                name += f"<br><span class=n>{_esc(hooks)}</span>"
            rows.append([name] + [_column_cell(c, rec) for c in cost])
            if rec["variant"] != "clean":
                recon.append([name] + [_column_cell(c, rec) for c in recon_cols])
    tokens = "; ".join(f"{_esc(r.label) + ': ' if label.multi else ''}{r.metrics[0].get('n_tokens', '?')} tokens"
                       for r in runs)
    out = ["<h2>Headline: how much each splice costs</h2>",
           f"<p class=note>Cross-entropy on held-out tokens ({tokens}). dCE = CE(spliced) &minus; CE(clean), "
           "95% paired bootstrap over sequences. C_eff/C frontier: a compute-optimal model reaching the "
           "spliced loss needs this fraction of the compute of one reaching the clean loss (two hypothetical "
           "compute-optimal models on the law's frontier, not this model's own compute). N_eff/N at D: the "
           "parameters a model trained on this model's own number of tokens D would need to reach the spliced "
           "loss, as a fraction of its N (D_eff/D at N likewise for tokens); for a model trained far past the "
           "compute-optimal point this is the reading that describes it. Intervals carry the dCE interval. "
           "Loss recovered is shown against both the zero and the "
           "mean ablation: a linear score that flatters every SAE, read it beside C_eff/C.</p>",
           _table(headers, rows, "headline"),
           "<h3>Reconstruction, and is the damage the error's size or its direction?</h3>" if ratios else
           "<h3>Reconstruction</h3>",
           "<p class=note>EV without massive leaves out the massive activations (positions whose clean norm "
           "exceeds the run's factor, 10 by default, times the median; their count in brackets): where it parts "
           "from the explained variance, a few positions carry the EV."
           + (" dCE &divide; noise@ and KL &divide; noise@: the SAE's damage divided by that of noise@SAE, the "
              "activation plus a random vector with the norm of the SAE's error at each spliced position (95% "
              "paired bootstrap over sequences). Above 1, the SAE's error hurts more than an error of its size "
              "pointing anywhere: its direction matters (Gurnee 2024). noise-dir@ keeps the error's component "
              "along the activation and turns only the rest to a random direction." if ratios else "")
           + "</p>", _table(recon_headers, recon, "recon")]
    if ablations:
        out += ["<h3>Reference ablations (the denominators of loss recovered)</h3>",
                _table(["ablation", "CE<br><span class=n>nats/token</span>",
                        "dCE [95% CI]<br><span class=n>nats/token</span>", "KL<br><span class=n>nats/token</span>",
                        "explained<br>variance", "EV without<br>massive (n)"], ablations, "small")]
    return "\n".join(out)


def equivalents_section(runs: list[Run], label: Labels) -> str:
    """C_eff/C over a range of E, because a preset's E belongs to its own corpus and tokenizer."""
    parts = []
    for run in runs:
        variants = (run.equivalents or {}).get("variants") or {}
        shown = {v: d for v, d in variants.items() if v != "clean" and not is_ablation(v)
                 and d.get("compute_fraction_over_E")}
        if not shown:
            continue
        Es = [row["E"] for row in next(iter(shown.values()))["compute_fraction_over_E"]]
        rows = [[_esc(label(run, v))] + [_g(row["fraction"]) if row["fraction"] is not None else "&ndash;"
                                         for row in d["compute_fraction_over_E"]] for v, d in shown.items()]
        title = f" ({_esc(run.label)})" if label.multi else ""
        parts.append(f"<h3>C_eff/C if the law's irreducible loss E were &hellip;{title}</h3>"
                     + _table(["variant"] + [f"E = {E:.2f}" for E in Es], rows, "small"))
    assumptions = next((r.equivalents["assumptions"] for r in runs if (r.equivalents or {}).get("assumptions")), None)
    if assumptions:
        text = " ".join(assumptions.values()) if isinstance(assumptions, dict) else str(assumptions)
        parts.append(f"<p class=note>{_esc(text)}</p>")
    return "\n".join(parts)


def profile_section(profiles: list[tuple[Run, pd.DataFrame]], label: Labels) -> str:
    """Rows = variants, columns = categories / tasks; a cell is the change in accuracy in
    points with its interval, McNemar p, and the change in the gold answer's log-prob."""
    if not profiles:
        return "<p class=note>No per-question task results in these runs.</p>"
    groups = list(dict.fromkeys(g for _, t in profiles for g in t["group"]))
    ns = {}
    for _, t in profiles:
        for g, n in zip(t["group"], t["n"]):
            ns.setdefault(g, set()).add(int(n))
    def head(g):  # "MMLU STEM (acc)" -> MMLU STEM<br>acc, n=19
        name, _, metric = g.rpartition(" (")
        return f"{_esc(name)}<br><span class=n>{_esc(metric.rstrip(')'))}, n={'/'.join(map(str, sorted(ns[g])))}</span>"

    headers = ["variant"] + [head(g) for g in groups]
    rows = []
    for run, t in profiles:
        for v in dict.fromkeys(t["variant"]):
            sub = t[t["variant"] == v].set_index("group")
            cells = []
            for g in groups:
                if g not in sub.index:
                    cells.append("&ndash;")
                    continue
                r = sub.loc[g]
                if v == "clean":
                    cells.append(f"{_pct(r['acc'])}<br><span class=ci>log p {_f(r['logp'], 2)}</span>")
                else:
                    cells.append(f"{_f(100 * r['delta'], 1, True)}<br><span class=ci>[{_f(100 * r['delta_lo'], 1, True)}, "
                                 f"{_f(100 * r['delta_hi'], 1, True)}]<br>p={r['p_mcnemar']:.2g}<br>"
                                 f"&Delta;log p {_f(r['delta_logp'], 2, True)}</span>")
            rows.append((v == "clean", _name(label(run, v)), cells))
    cleans = [cells for is_clean, _, cells in rows if is_clean]
    if len(cleans) > 1 and all(c == cleans[0] for c in cleans):  # every run's clean model scored alike: once
        first = next(i for i, r in enumerate(rows) if r[0])
        rows = [(True, "clean", cleans[0]) if i == first else r for i, r in enumerate(rows) if i == first or not r[0]]
    rows = [[name] + cells for _, name, cells in rows]
    return ("<h2>Degradation profile by category / task</h2>"
            "<p class=note>Each task by one metric, named under it (acc_norm where the task has it, as in "
            "tasks.md). Clean row: accuracy and mean log-probability of the gold answer. Other rows: change "
            "in accuracy against the same run's clean model on the same questions, in percentage points "
            "[95% paired bootstrap], exact McNemar p, and the change in the gold answer's log-probability "
            "(nats; it moves even where accuracy sits at chance).</p>" + _table(headers, rows, "profile"))


def damage_section(runs: list[Run], label: Labels) -> str:
    """Concentration numbers from the per-token arrays (damage.md / damage.json hold the rest)."""
    rows = []
    for run in runs:
        for v, arr in (run.per_token or {}).items():
            if v == "clean" or is_ablation(v):
                continue
            a = np.asarray(arr, float)
            rows.append((label(run, v), a[np.isfinite(a)]))
    if not rows:
        return ""
    nats = "<br><span class=n>nats</span>"
    headers = ["variant", "tokens", f"mean dCE{nats}", f"median dCE{nats}", "made<br>worse", "made<br>better",
               "share of dCE<br>on worst 1%", "share of dCE<br>on worst 10%"]
    body = [[_esc(name), str(len(a)), _f(a.mean()), _f(np.median(a)), _pct((a > 0).mean()), _pct((a < 0).mean()),
             _pct(figures.worst_share(a, 0.01)), _pct(figures.worst_share(a, 0.10))] for name, a in rows]
    more = (" More breakdowns (by confidence, position, token kind; the most damaged positions) are in "
            "damage.md / damage.json." if any(r.damage for r in runs) else "")
    return ("<h3>Where the damage lives, in numbers</h3><p class=note>Per-token dCE over the token set: shares "
            "of tokens made worse or better, and the share of the total dCE carried by the worst 1% and 10% of "
            f"tokens (&gt;100% when the SAE also helps some tokens).{more}</p>" + _table(headers, body, "small"))


def _divergence(clean: str, text: str) -> str:
    """The text with the part after its common prefix with the clean text marked."""
    n = os.path.commonprefix([clean, text]).__len__()
    if n == len(text) and len(text) == len(clean):
        return _esc(text)
    return _esc(text[:n]) + "<mark>" + _esc(text[n:]) + "</mark>"


GEN_CLIP_CHARS, GEN_CLIP_LINES = 240, 4  # longer texts show clipped, the full text one click away


def _generation_cell(text_html: str, raw: str) -> str:
    if not raw.strip():  # e.g. a baseline that only emits newlines: say so instead of a blank cell
        return f"<span class=n>(whitespace only: {raw.count(chr(10))} newlines, {len(raw)} characters)</span>"
    if len(raw) <= GEN_CLIP_CHARS and raw.count("\n") < GEN_CLIP_LINES:
        return f"<div class=gen>{text_html}</div>"
    return (f"<div class='gen clip'>{text_html}</div><details><summary>full text ({len(raw)} characters, "
            f"{raw.count(chr(10)) + 1} lines)</summary><div class=gen>{text_html}</div></details>")


def generations_section(runs: list[Run], label: Labels) -> str:
    """One table per prompt, one row per variant: its text (the part after it departs from the
    clean text marked) and how it sees the clean continuation."""
    parts = []
    for run in runs:
        for g in run.generations or []:
            variants = g["variants"]
            clean = (variants.get("clean") or {}).get("text", "")
            rows = []
            for v, d in variants.items():
                d = d or {}
                raw = d.get("text", "")
                text = _esc(raw) if v == "clean" else _divergence(clean, raw)
                logp = _f(d.get("clean_logprob"), 2) if v != "clean" else "&ndash;"
                kl = _f(d.get("kl"), 3) if v != "clean" else "&ndash;"
                rows.append([_name(v), _generation_cell(text, raw), logp, kl])
            prompt = _esc(g.get("prompt", ""))
            parts.append(f"<h4>{_esc(run.label) + ': ' if label.multi else ''}<code>{prompt}</code></h4>"
                         + _table(["variant", "continuation", "log p(clean text)<br><span class=n>per token</span>",
                                   "KL along<br>clean text"], rows, "gens"))
    if not parts:
        return ""
    return ("<h2>Side-by-side generations</h2><p class=note>Greedy continuations of the same prompt; the part "
            "of each variant's text after it departs from the clean model's is highlighted. Long texts are "
            "clipped; open \u201cfull text\u201d under them. log p(clean text): the variant's mean log-probability "
            "per token of the clean continuation; KL: its mean KL(clean || variant) along it.</p>" + "\n".join(parts))


def provenance_section(runs: list[Run]) -> str:
    parts = ["<h2>Provenance</h2>"]
    for run in runs:
        c = run.config
        m = c.get("model") or {}
        v = c.get("versions") or {}
        command = c.get("command") or "not recorded (this run predates command recording)"
        if isinstance(command, dict):
            command = f"{command.get('line', '')}  (in {command.get('cwd', '?')})"
        hashes = "<br>".join(f"{_esc(k)} <code>{_esc(h)}</code>"
                             for k, h in (m.get("hashes") or {}).items()) or "&ndash;"
        rows = [["run folder", f"<code>{_esc(run.shown_path or run.path)}</code>"],
                ["command line", f"<code>{_esc(command)}</code>"],
                ["model", _esc(", ".join(f"{k}={m[k]}" for k in ("spec", "loader", "source", "gguf", "dtype", "device")
                                         if m.get(k)))],
                ["model weights (sha256)", hashes],
                ["machine", _esc(c.get("machine", "&ndash;"))],
                ["versions", _esc(", ".join(f"{k} {x}" for k, x in v.items() if x and k not in ("git", "platform")))
                 + f"<br>{_esc(v.get('platform', ''))}"],
                ["git commit", f"<code>{_esc(v.get('git') or '-')}</code>"]]
        settings = c.get("run") or {k: c[k] for k in ("tasks", "limit", "num_fewshot") if k in c}
        if settings:
            rows.append(["settings", _esc(", ".join(f"{k}={x}" for k, x in settings.items()
                                                   if x not in (None, [], "") and k != "out"))])
        for sae in c.get("saes") or []:
            files = "<br>".join(f"{_esc(Path(p).name)} <code>{_esc(h)}</code>"
                                for p, h in (sae.get("files") or {}).items())
            desc = ", ".join(f"{k} {sae[k]}" for k in ("kind", "hook", "d_sae", "k", "architecture")
                             if sae.get(k) is not None)
            what = "SAE" if sae.get("kind") == "sae" else "baseline"
            rows.append([f"{what} <code>{_esc(sae.get('spec'))}</code>",
                         _esc(desc) + (f"<br>{files}" if files else "")])
        for key, name in (("data", "evaluated text"), ("tokens_sha256", "evaluated tokens (sha256)"),
                          ("calibration", "mean/PCA calibration"), ("ce_seconds", "CE suite (s)"),
                          ("mmlu_questions", "MMLU questions per variant"), ("mmlu_seconds", "MMLU / tasks stage (s)")):
            if key in c:
                val = f"{c[key]:.0f}" if isinstance(c[key], float) else c[key]
                if isinstance(val, dict):  # the text's provenance: one "key: value" per field given
                    val = "; ".join(f"{k}: {v}" for k, v in val.items() if v not in (None, "", [], {}))
                rows.append([name, f"<code>{_esc(val)}</code>" if "sha" in key else _esc(val)])
        title = f"<h3>{_esc(run.label)}</h3>" if len(runs) > 1 else ""
        parts.append(title + _table(["", ""], rows, "prov"))
    return "\n".join(parts)


# ---------------------------------------------------------------- figures

def build_figures(runs: list[Run], label: Labels, out: Path) -> dict[str, tuple[bytes, str] | str]:
    """name -> (PNG bytes, caption), or a one-line reason the figure is absent."""
    colour = figures.colours(variant_order(runs, label))
    done: dict = {}
    ce_runs = [r for r in runs if r.metrics]

    # (a) loss against compute, one panel per law
    laws = {}
    for run in ce_runs:
        law = law_of(run)
        if law is not None and not isinstance(law, scaling.Curve):
            laws.setdefault(law.name, (law, e_band(run), []))[2].append(run)
    if laws:
        name, (law, band, group) = next(iter(laws.items()))
        data = []
        for run in group:
            recs = [r for r in run.metrics if r["variant"] != "clean" and not is_ablation(r["variant"])
                    and math.isfinite(_fin(r.get("compute_fraction")))]
            data.append({"clean": (label(run, "clean"), run.metrics[0]["ce_clean"]),
                         "variants": [(label(run, r["variant"]), r["ce_spliced"]) for r in recs]})
        fig = figures.compute_figure(law, data, band, colour)
        other = f" Runs read with another law ({', '.join(list(laws)[1:])}) are not drawn." if len(laws) > 1 else ""
        band_txt = (f" Grey band: the frontier for E between {band[0]:.2f} and {band[1]:.2f}; bars: each variant's "
                    "compute-equivalent over that band." if band and isinstance(law, scaling.Law) else "")
        done["compute"] = (figures.save(fig, out, "compute"),
                           f"(a) Loss against training compute on the {name} law's compute-optimal frontier. "
                           "Squares: clean model where the frontier reaches its loss; circles: each spliced model "
                           f"at its compute-equivalent.{band_txt}{other}")
    else:
        done["compute"] = ("(a) not drawn: no CE suite, or its law (a family or checkpoint curve) has no "
                           "compute frontier.")

    # (b) trade-off
    points = []
    for run in ce_runs:
        for r in run.metrics:
            if r["variant"] == "clean" or is_ablation(r["variant"]) or not math.isfinite(_fin(r.get("l0"))):
                continue
            points.append({"label": label(run, r["variant"]), "l0": _fin(r["l0"]), "dce": _fin(r["dce"]),
                           "dce_lo": _fin(r.get("dce_ci_low")), "dce_hi": _fin(r.get("dce_ci_high")),
                           "frac": _fin(r.get("compute_fraction")), "frac_lo": _fin(r.get("compute_fraction_low")),
                           "frac_hi": _fin(r.get("compute_fraction_high"))})
    if points:
        law_names = ", ".join(dict.fromkeys(r.law for r in ce_runs if r.law)) or None
        done["tradeoff"] = (figures.save(figures.tradeoff_figure(points, law_names, colour), out, "tradeoff"),
                            "(b) Sparsity against fidelity, one point per SAE or baseline: L0 against C_eff/C "
                            "(log scale) and against dCE, with 95% intervals; the dashed steps are the Pareto front "
                            "(no other point is both sparser and less damaging).")
    else:
        done["tradeoff"] = "(b) not drawn: no variant with an L0 in these runs."

    # (c) degradation profile
    rows = []
    for run in runs:
        t = run.profile
        if t is not None:
            t = t[t["variant"] != "clean"].copy()
            t["variant"] = [label(run, v) for v in t["variant"]]
            rows.append(t)
    if rows:
        fig = figures.profile_figure(pd.concat(rows, ignore_index=True), colour)
        done["profile"] = (figures.save(fig, out, "profile"),
                           "(c) Degradation profile: change in accuracy against the clean model per category / task "
                           "(percentage points, 95% paired bootstrap interval) and change in the gold answer's "
                           "log-probability.")
    else:
        done["profile"] = "(c) not drawn: no per-question task results in these runs."

    # (d) where the damage lives
    per_token = {label(run, v): a for run in runs for v, a in (run.per_token or {}).items()
                 if v != "clean" and not is_ablation(v)}
    if per_token:
        done["damage"] = (figures.save(figures.damage_figure(per_token, colour), out, "damage"),
                          "(d) Where the damage lives: distribution of per-token dCE (log density), and the share "
                          "of the total dCE carried by the worst tokens (concentration curve; the dotted line is "
                          "damage spread evenly; thin verticals at 1% and 10%). The share can pass 1: tokens the "
                          "splice improves (negative dCE) pay back part of the total, so the worst tokens alone "
                          "carry more than all of it.")
    else:
        done["damage"] = "(d) not drawn: no per-token data (per_token_dce.npz) in these runs."

    # (f) layer curves of whole sets (before (e) in the code; drawn after the headline table)
    curve_runs = [r for r in runs if r.curves]
    if curve_runs:
        from harness.output import curves

        frames = []
        for run in curve_runs:
            df = curves.curve_frame(run.curves, run.metrics or [])
            df["set"] = [label(run, s) for s in df["set"]]
            frames.append(df)
        done["curves"] = (figures.save(curves.figure(pd.concat(frames, ignore_index=True)), out, "curves"),
                          "(f) What a replacement model costs as layers are added: C_eff/C (frontier, log scale), "
                          "dCE (95% interval shaded) and KL against the number of layers replaced, added from the "
                          "top down (left; the last point is the whole set), and each layer replaced alone (right).")
    else:
        done["curves"] = ""

    # (e) the explainability frontier
    interp_runs = [r for r in runs if r.interp]
    if interp_runs:
        from harness.output.explainability import points as frontier_points

        pts = []
        for run in interp_runs:
            for p in frontier_points(run.interp):
                pts.append(p | {"label": label(run, p["label"])})
        done["frontier"] = (figures.save(figures.frontier_figure(pts, colour), out, "frontier"),
                            "(e) Fidelity against explainability, one point per SAE or baseline: C_eff/C against "
                            "the mean F1 of n-gram explanations of sampled latents (95% interval over latents), and "
                            "against sparse-probing accuracy at k = 5; marker area grows with L0; dashed: the "
                            "Pareto front (no other point is both more explainable and less damaging).")
    else:
        done["frontier"] = "(e) not drawn: no interp.json in these runs (sae-harness interp RUN)."
    return done


def interp_section(runs: list[Run], label: Labels) -> str:
    """The explainability table of every run that has one (interp.json)."""
    parts = []
    for run in runs:
        if not run.interp:
            continue
        head = ["variant", "L0", "dCE", "C_eff/C", "explanation F1<br><span class=n>mean [95% CI]</span>",
                "precision", "recall", "F1<br><span class=n>act.-weighted</span>",
                "probe acc.<br><span class=n>k=1</span>", "probe acc.<br><span class=n>k=5</span>",
                "probe acc.<br><span class=n>k=20</span>"]
        rows = []
        for name, r in run.interp["variants"].items():
            f1 = r["f1"]
            rows.append([_name(label(run, name)), _g(r.get("l0")), _f(r.get("dce")), _g(r.get("compute_fraction")),
                         _ci(f1["mean"], f1["low"], f1["high"], _f), _f(r["precision"]["mean"]),
                         _f(r["recall"]["mean"]), _f(r["f1_w"]["mean"]), _f(r["probing"]["1"]),
                         _f(r["probing"]["5"]), _f(r["probing"]["20"])])
        resid = ", ".join(f"{_esc(h)} {a:.3f}" for h, a in run.interp["probe"]["residual_accuracy"].items())
        parts.append(_table(head, rows, "small") + f"<p class=note>Explanations: at most 5 token n-grams (n &le; 2) "
                     "per latent, fitted on one half of the held-out sequences and scored on the other; precision = "
                     "P(fires | matches), recall = P(matches | fires). Probes: k-sparse logistic regression on "
                     "latents chosen by mean difference, MMLU category one-vs-rest, balanced (chance 0.5); the raw "
                     f"residual with every coordinate: {resid}.</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------- the page

CSS = """
:root{--fg:#1d2330;--muted:#5b6472;--line:#d9dde3;--band:#f5f6f8}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
     max-width:1320px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid var(--line);padding-bottom:3px}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:13px;margin:14px 0 4px;font-weight:600}
.sub,.note,.n,.ci{color:var(--muted)}.note{font-size:13px;max-width:1100px}.n{font-weight:400;font-size:11px}
.scroll{overflow-x:auto;width:fit-content;max-width:100%;border:1px solid var(--line);border-radius:4px;
        margin:6px 0 10px}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:right;vertical-align:top;white-space:nowrap}
th{background:var(--band);font-weight:600;line-height:1.25}
td:first-child,th:first-child{text-align:left;position:sticky;left:0;background:#fff}
th:first-child{background:var(--band)}
tbody tr:hover td{background:#fafbfc}
table.prov td{white-space:normal;text-align:left}table.prov td:first-child{width:210px;color:var(--muted)}
table.prov thead{display:none}
table.headline td,table.small td,table.recon td,table.profile td{white-space:normal}
table.gens td:nth-child(2),table.gens th:nth-child(2){white-space:normal;text-align:left;width:900px;max-width:900px}
.gen{white-space:pre-wrap;font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px;overflow-wrap:anywhere}
.gen.clip{max-height:5.2em;overflow:hidden}
details summary{cursor:pointer;color:var(--muted);font-size:12px}
mark{background:#ffe2a8}
figure{margin:10px 0 22px}
figure img{width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:4px}
figcaption{font-size:13px;color:var(--muted);margin-top:4px;max-width:1100px}
code{font-size:12px;word-break:break-all}
.warn{background:#fff6e0;border:1px solid #f0d48a;padding:6px 10px;border-radius:4px}
"""


def curves_section(runs: list[Run], label: Labels, figs: dict) -> str:
    """A whole set's layer curves: the compounding in words, then the figure."""
    from harness.output import curves

    runs = [r for r in runs if r.curves]
    if not runs:
        return ""
    text = "".join(curves.html_section(curves.curve_frame(r.curves, r.metrics or []), _esc) for r in runs)
    png, caption = figs["curves"]
    return (f"<h2>Replacement models: layers added one by one</h2>{text}"
            f'<figure><img alt="layer curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{_esc(caption)} Also saved as curves.png and curves.pdf.</figcaption></figure>")


def render(runs: list[Run], out: Path) -> str:
    """The page as HTML text (figures written to `out` on the way)."""
    label = Labels(runs)
    figs = build_figures(runs, label, out)
    model = (runs[0].config.get("model") or {}).get("spec") or (runs[0].config.get("run") or {}).get("model", "?")
    title = f"sae-harness: {model}" + (f", {len(runs)} runs compared" if len(runs) > 1 else f", run {runs[0].label}")
    warn = ""
    shas = {r.config.get("tokens_sha256") for r in runs if r.metrics}
    if len(shas) > 1:
        warn = ("<p class=warn>These runs evaluated different token sets: each run's dCE and C_eff/C are against its "
                "own clean model; compare absolute CE within a run only.</p>")

    def figure(name):
        f = figs[name]
        if isinstance(f, str):
            return f"<p class=note>{_esc(f)}</p>"
        png, caption = f
        return (f'<figure><img alt="{_esc(caption[:60])}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                f"<figcaption>{_esc(caption)} Also saved as {name}.png and {name}.pdf.</figcaption></figure>")

    profiles = [(r, r.profile) for r in runs if r.profile is not None]
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class=sub>{' &middot; '.join(_esc(r.label) + ': ' + _esc(r.shown_path or r.path) for r in runs)}</p>", warn,
            headline_section(runs, label), curves_section(runs, label, figs), figure("compute"),
            equivalents_section(runs, label),
            "<h2>Sparsity against fidelity</h2>", figure("tradeoff"),
            profile_section(profiles, label), figure("profile"),
            "<h2>Where the damage lives</h2>", figure("damage"), damage_section(runs, label),
            "<h2>Explainability against fidelity</h2>", figure("frontier"), interp_section(runs, label),
            generations_section(runs, label), provenance_section(runs)]
    return ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(b for b in body if b) + "\n</body></html>\n")


def write_report(run_dirs, out=None, final_paths: list | None = None) -> Path:
    """Write out/report.html (and the figures as PNG + PDF) for one or several run folders.

    out defaults to the run folder for one run, and to `comparison` beside the first run for
    several. final_paths: where folders being built under a temporary name will end up (the
    page names those). Everything is read and checked before anything is written."""
    runs = load_runs(run_dirs)
    for run, final in zip(runs, final_paths or []):
        run.label, run.shown_path = Path(final).name, str(final)
    if out is None:
        out = runs[0].path if len(runs) == 1 else runs[0].path.resolve().parent / "comparison"
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out}: {e.strerror}") from None
    page = render(runs, out)
    path = write_atomic(out / "report.html", page)
    os.chmod(path, 0o644)  # a page to share, not a secret (the temporary file was 0600)
    return path
