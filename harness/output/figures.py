"""The report's figures, drawn with matplotlib from saved numbers (never from a model).

Each figure function takes plain data and returns a matplotlib Figure; `save` writes it as
PNG and PDF (for papers) and returns the PNG bytes for embedding in report.html. The data
helpers (`pareto_front`, `concentration_curve`, `worst_share`) are separate so tests can
check them against independent computations. The Agg canvas is used directly (no pyplot
state), so figures can be drawn from any thread or test.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from harness import scaling
from harness.files import replace_via, write_atomic

# A muted palette that stays apart in print; wraps around past its length.
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd"]


def colours(labels: list[str]) -> dict[str, str]:
    """One colour per variant label, in order, so every figure uses the same colour for it."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig, folder: Path, name: str) -> bytes:
    """Write folder/name.png and folder/name.pdf (each via a temporary file and a rename, so
    a reader never sees half a figure); return the PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150)
    png = buf.getvalue()
    write_atomic(Path(folder) / f"{name}.png", png)
    # the same figure as PDF, with no creation date: the same bytes on every run
    replace_via(Path(folder) / f"{name}.pdf", lambda tmp: fig.savefig(tmp, format="pdf", metadata={"CreationDate": None}))
    return png


def _legend_right(fig, axes) -> None:
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="outside right center", fontsize=8,
                   frameon=False)


# ---------------------------------------------------------------- (a) loss against compute

def compute_figure(law, runs: list[dict], E_band=None, colour: dict | None = None):
    """Loss against training compute on the law's compute-optimal frontier (log axes).

    runs = [{"clean": (label, loss), "variants": [(label, loss), ...]}, ...]. Each run's clean
    model sits where the frontier reaches its loss; each variant at that compute times its
    compute-equivalent fraction. With E_band = (E_low, E_high) and a law with an irreducible
    term, the frontier is shaded over that range of E, and each variant gets a horizontal bar
    spanning its compute-equivalent over the band (E belongs to the law's corpus, not ours)."""
    from matplotlib.ticker import FuncFormatter

    colour = colour or {}
    has_E = isinstance(law, scaling.Law) and E_band is not None
    placed = []  # (label, loss, C, xerr, is_clean)
    for run in runs:
        clean_label, L_clean = run["clean"]
        C0 = float(law.frontier_compute(L_clean))
        placed.append((clean_label, L_clean, C0, None, True))
        for label, L in run["variants"]:
            C = C0 * scaling.compute_fraction(law, L_clean, L)["fraction"]
            xerr = None
            if has_E:
                table = scaling.compute_fraction_over_E(law, L_clean, L, np.linspace(*E_band, 9))["table"]
                fs = [r["fraction"] * C0 for r in table if r["fraction"] is not None]
                if fs:
                    xerr = [[max(C - min(fs), 0)], [max(max(fs) - C, 0)]]
            placed.append((label, L, C, xerr, False))
    xs = [p[2] for p in placed] + [p[2] - p[3][0][0] for p in placed if p[3]]
    C = np.geomspace(max(min(xs), 1.0) / 10, max(xs) * 10, 300)

    fig, (ax,) = _figure(11, 4.6)
    ax.plot(C, law.frontier_loss(C), color="k", lw=1, label=f"{law.name} frontier")
    if has_E:
        curves = [law.with_params(E=E).frontier_loss(C) for E in np.linspace(*E_band, 9)]
        ax.fill_between(C, np.min(curves, 0), np.max(curves, 0), color="0.88", lw=0,
                        label=f"frontier for E in [{E_band[0]:.2f}, {E_band[1]:.2f}]")
    greys = iter(["k", "0.45", "0.7", "0.25", "0.6"] * 4)  # one shade per run's clean model
    for label, L, x, xerr, is_clean in placed:
        ax.errorbar([x], [L], xerr=xerr, fmt="s" if is_clean else "o", ms=6 if is_clean else 5, capsize=3,
                    color=next(greys) if is_clean else colour.get(label), label=label, zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.set_xlabel("training compute (FLOP); spliced models at their compute-equivalent")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="major", color="0.92")
    _legend_right(fig, [ax])
    return fig


# ---------------------------------------------------------------- (b) sparsity / fidelity trade-off

def pareto_front(x, y, maximize_y: bool = False) -> list[int]:
    """Indices of the points no other point dominates (smaller or equal x and better or equal y,
    one of them strictly), sorted by x. Better y = smaller, or larger with maximize_y.
    Points with a non-finite coordinate are never on the front."""
    x = np.asarray(x, float)
    y = -np.asarray(y, float) if maximize_y else np.asarray(y, float)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    front, best = [], math.inf
    for i in sorted(ok, key=lambda i: (x[i], y[i])):  # sweep by x; keep each new best y
        if y[i] < best:
            front.append(int(i))
            best = y[i]
    return front


def tradeoff_figure(points: list[dict], law_name: str | None, colour: dict | None = None):
    """L0 against C_eff/C (log axis) and against dCE, one point per SAE or baseline, with the
    Pareto front drawn. points = [{"label", "l0", "dce", "dce_lo", "dce_hi", "frac",
    "frac_lo", "frac_hi"}, ...]; a panel is left out when no point has its y value."""
    from matplotlib.ticker import FuncFormatter

    colour = colour or {}
    panels = []
    if law_name and any(np.isfinite(p.get("frac", np.nan)) for p in points):
        panels.append(("frac", f"C_eff/C ({law_name}), log scale", True))
    panels.append(("dce", "dCE (nats/token)", False))
    fig, axes = _figure(11, 4.2, len(panels))
    for ax, (key, ylabel, maximize) in zip(axes, panels):
        l0 = [p["l0"] for p in points]
        ys = [p.get(key, np.nan) for p in points]
        for p in points:
            y = p.get(key, np.nan)
            if not (np.isfinite(p["l0"]) and np.isfinite(y)):
                continue
            lo, hi = p.get(f"{key}_lo", np.nan), p.get(f"{key}_hi", np.nan)
            yerr = [[max(y - lo, 0)], [max(hi - y, 0)]] if np.isfinite(lo) and np.isfinite(hi) else None
            ax.errorbar([p["l0"]], [y], yerr=yerr, fmt="o", capsize=3, color=colour.get(p["label"]),
                        label=p["label"], zorder=3)
        front = pareto_front(l0, ys, maximize_y=maximize)
        if len(front) > 1:
            fx, fy = [l0[i] for i in front], [ys[i] for i in front]
            ax.step(fx, fy, where="post", color="0.4", ls="--", lw=1, label="Pareto front", zorder=2)
        elif len(front) == 1:
            ax.plot([l0[front[0]]], [ys[front[0]]], "o", mfc="none", mec="0.4", ms=12, label="Pareto front")
        if maximize:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(ylabel)
        ax.set_title("better: up and left" if maximize else "better: down and left", fontsize=9, color="0.35")
        ax.grid(True, color="0.92")
    _legend_right(fig, axes)
    return fig


# ---------------------------------------------------------------- (c) degradation profile

def profile_figure(rows, colour: dict | None = None):
    """Per category / task: change in accuracy (percentage points, 95% paired bootstrap
    interval) and change in the gold answer's log-probability, one colour per variant.
    rows: DataFrame with columns group, variant, delta, delta_lo, delta_hi, delta_logp
    (baseline rows excluded by the caller)."""
    colour = colour or {}
    groups = list(dict.fromkeys(rows["group"]))
    variants = list(dict.fromkeys(rows["variant"]))
    width = 0.8 / max(len(variants), 1)
    fig, axes = _figure(11, 4.2, 2)
    for ax, (key, ylabel, scale) in zip(axes, (("delta", "change in accuracy (points) [95% CI]", 100.0),
                                                ("delta_logp", "change in log p(gold answer) (nats)", 1.0))):
        for j, v in enumerate(variants):
            sub = rows[rows["variant"] == v].set_index("group").reindex(groups)
            x = np.arange(len(groups)) - 0.4 + width * (j + 0.5)
            y = sub[key].to_numpy(float) * scale
            yerr = None
            if key == "delta":
                lo, hi = sub["delta_lo"].to_numpy(float) * scale, sub["delta_hi"].to_numpy(float) * scale
                yerr = np.vstack([np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)])
            ax.errorbar(x, y, yerr=yerr, fmt="o", ms=4, capsize=2, color=colour.get(v), label=v)
        ax.axhline(0, color="0.3", lw=0.8)
        for edge in np.arange(len(groups) - 1) + 0.5:
            ax.axvline(edge, color="0.88", lw=0.8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        crowded = len(groups) > 4  # two panels of 11 inches: more than 4 labels a panel collide flat
        # rotated labels stay on one line (a second line would run into the next label)
        ax.set_xticks(np.arange(len(groups)), [g if crowded else g.replace(" (", "\n(") for g in groups],
                      rotation=35 if crowded else 0, ha="right" if crowded else "center", fontsize=8,
                      rotation_mode="anchor")
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", color="0.92")
    _legend_right(fig, axes)
    return fig


# ---------------------------------------------------------------- (d) where the damage lives

def concentration_curve(values) -> tuple[np.ndarray, np.ndarray]:
    """(share of tokens, share of total dCE) when tokens are taken worst first.

    values: per-token dCE (NaN = outside the token set, dropped). Point k is the k worst
    tokens: x = k/n, y = (sum of the k largest values) / (sum of all values). Tokens the SAE
    helps (negative dCE) come last, so the curve can rise above 1 before ending at 1."""
    v = np.asarray(values, float).ravel()
    v = np.sort(v[np.isfinite(v)])[::-1]
    total = v.sum()
    x = np.arange(len(v) + 1) / len(v)
    y = np.concatenate([[0.0], np.cumsum(v)]) / total
    return x, y


def worst_share(values, fraction: float) -> float:
    """Share of the total dCE carried by the ceil(fraction * n) worst tokens."""
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    k = math.ceil(fraction * len(v))
    return float(np.sort(v)[::-1][:k].sum() / v.sum())


def damage_figure(per_token: dict[str, np.ndarray], colour: dict | None = None):
    """Left: distribution of per-token dCE (central 99% of all values shown, log density).
    Right: concentration curve (share of the total dCE against share of tokens, worst first,
    log x so the worst 1% is readable), beside the line every token carrying the same."""
    colour = colour or {}
    fig, (ax1, ax2) = _figure(11, 4.2, 2)
    finite = {k: np.asarray(v, float)[np.isfinite(v)] for k, v in per_token.items()}
    everything = np.concatenate(list(finite.values()))
    lo, hi = np.percentile(everything, [0.5, 99.5])
    bins = np.linspace(lo, hi, 80)
    for label, v in finite.items():
        ax1.hist(np.clip(v, lo, hi), bins=bins, density=True, histtype="step", lw=1.2,
                 color=colour.get(label), label=label)
        x, y = concentration_curve(v)
        ax2.plot(x[1:], y[1:], color=colour.get(label), lw=1.2, label=label)
    ax1.axvline(0, color="0.3", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_xlabel("per-token dCE (nats; central 99%, the rest piled at the edges)")
    ax1.set_ylabel("density")
    n = max(len(v) for v in finite.values())
    share = np.geomspace(1 / n, 1, 200)
    ax2.plot(share, share, color="0.5", ls=":", lw=1, label="every token equal")
    for f in (0.01, 0.1):
        ax2.axvline(f, color="0.8", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_xlabel("share of tokens, worst first (log scale)")
    ax2.set_ylabel("share of total dCE")
    for ax in (ax1, ax2):
        ax.grid(True, color="0.92")
    _legend_right(fig, [ax1, ax2])
    return fig


# ---------------------------------------------------------------- the family's curves

def family_figure(details: dict, colour: dict | None = None):
    """Left: every annealed run's loss against its tokens D, one colour per width (hollow: other
    seeds), with the full law L(N, D) drawn for each width. Middle: loss against
    non-embedding N at the SAE member's D with the fit L(N) (and the full law at that D), each
    spliced variant placed at its N_eff. Right: each fit's profile over E (least-squares
    residual at each E with the other parameters re-fitted, over its 95% threshold: an E is
    plausible below 1), so a flat profile shows itself. (From compute_equivalents.json of a family run.)"""
    fam = details["family"]
    points, member, fits = fam["points"], fam["member"], fam["fits"]
    full = scaling.Law.from_json(fits["full"])
    widths = sorted({p["width"] for p in points})
    wcol = dict(zip(widths, colours([f"w{w}" for w in widths]).values()))
    fig, axes = _figure(15, 4.6, ncols=3)
    ax = axes[0]
    ds = np.geomspace(min(p["D"] for p in points) / 1.5, max(p["D"] for p in points) * 1.5, 100)
    for w in widths:
        mine = [p for p in points if p["width"] == w]
        ax.plot(ds, full.loss(mine[0]["N"], ds), color=wcol[w], lw=1)
        for first, face in ((True, wcol[w]), (False, "white")):
            pts = [p for p in mine if (p["seed"] == 0) == first]
            if pts:
                ax.plot([p["D"] for p in pts], [p["loss"] for p in pts], "o", mfc=face, mec=wcol[w], ms=5,
                        label=f"width {w} (N {mine[0]['N']:,})" if first else None)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D (annealed runs)")
    ax.set_ylabel("loss on the run's held-out tokens (nats/token)")
    ax.set_title("Annealed runs and the full law L(N, D)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax = axes[1]
    at_d = [p for p in points if p["D"] == member["D"] and p["seed"] == 0]
    curve = scaling.Curve.from_json(fits["family"])
    variants = fam["variants"]
    vcol = colour or colours(list(variants))
    effs = [v["n_eff_frac_family"] * member["N"] for v in variants.values()]
    ns = np.geomspace(min([p["N"] for p in at_d] + effs) / 1.5, max(p["N"] for p in at_d) * 1.5, 200)
    ax.plot(ns, curve.loss(ns), color="k", lw=1, label="L(N) fit at this D")
    ax.plot(ns, full.loss(ns, member["D"]), color="0.5", lw=1, ls="--", label="full law at this D")
    ax.plot([p["N"] for p in at_d], [p["loss"] for p in at_d], "s", color="k", ms=5, label="runs", zorder=3)
    for (name, v), x in zip(variants.items(), effs):
        ax.plot([x], [v["ce_spliced"]], "o", ms=6, color=vcol.get(name), label=name.rsplit("/", 1)[-1], zorder=4)
    ax.set_xscale("log")
    ax.set_xlabel(f"non-embedding parameters N (D = {member['D']:,.0f} tokens)")
    ax.set_title("N_eff: each spliced model on L(N) at the member's D", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    ax = axes[2]
    labels = {"family": "(a) L(N) at the member's D", "budgets": "(b) L(D) at the member's N", "full": "(c) L(N, D)"}
    for (key, label), col in zip(labels.items(), ("C0", "C2", "k")):
        fit = fits.get(key, {})
        if fit.get("E_profile"):
            ax.plot([r["E"] for r in fit["E_profile"]], [r["sse"] / fit["threshold_sse"] for r in fit["E_profile"]],
                    color=col, lw=1, label=label + ("" if fit.get("E_identified") else ": E not identified"))
    ax.axhline(1.0, color="C3", lw=1, ls="--", label="95% threshold (plausible below)")
    ax.set_ylim(0, 4)
    ax.legend(fontsize=7, frameon=False)
    ax.set_xlabel("irreducible loss E (nats/token)")
    ax.set_ylabel("residual sum of squares / threshold, others re-fitted")
    ax.set_title("Profile over E of each fit", fontsize=10)
    for a in axes:
        a.grid(True, which="major", color="0.92")
    return fig


# ---------------------------------------------------------------- explainability frontier

def frontier_figure(points: list[dict], colour: dict | None = None):
    """Fidelity against explainability, one point per SAE or baseline: C_eff/C (log; dCE where
    a run has no C_eff/C) against mean explanation F1 (with its interval), and against sparse-
    probing accuracy at k = 5; marker area grows with L0; the dashed steps are the Pareto front
    (no other point is both more explainable and less damaging). points = [{"label", "l0", "f1",
    "f1_lo", "f1_hi", "probe", "frac", "dce"}, ...] (output/explainability.py, points)."""
    from matplotlib.ticker import FuncFormatter

    colour = colour or colours([p["label"] for p in points])
    use_frac = any(np.isfinite(p["frac"]) for p in points)
    ykey, ylabel = ("frac", "C_eff/C (log scale)") if use_frac else ("dce", "dCE (nats/token)")
    fig, axes = _figure(11, 4.4, ncols=2)
    l0s = [p["l0"] for p in points if np.isfinite(p["l0"])]
    top = max(l0s) if l0s else 1.0
    for ax, (xkey, xlabel) in zip(axes, (("f1", "explanation F1 (n-gram explanations, mean over latents)"),
                                         ("probe", "sparse-probing accuracy, k = 5 (MMLU categories)"))):
        xs, ys = [p[xkey] for p in points], [p[ykey] for p in points]
        for p in points:
            size = 30 + 220 * (p["l0"] / top if np.isfinite(p["l0"]) else 0.3)
            xerr = ([[max(p["f1"] - p["f1_lo"], 0)], [max(p["f1_hi"] - p["f1"], 0)]] if xkey == "f1" else None)
            ax.errorbar([p[xkey]], [p[ykey]], xerr=xerr, fmt="none", ecolor=colour.get(p["label"]), capsize=3)
            ax.scatter([p[xkey]], [p[ykey]], s=size, color=colour.get(p["label"]), label=p["label"], zorder=3,
                       alpha=0.85)
        # Pareto front: larger x and better y (larger C_eff/C, or smaller dCE)
        front = pareto_front([-x for x in xs], ys, maximize_y=use_frac)
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], ls="--", color="0.4", lw=1, label="Pareto front")
        if use_frac:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title("better: up and right" if use_frac else "better: down and right; marker area: L0",
                     fontsize=9, color="0.35")
        ax.grid(True, color="0.92")
    _legend_right(fig, axes)
    return fig
