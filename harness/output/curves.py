"""Layer curves of a whole set (harness/splice/variants.py `layer_curves`): what a replacement
model costs as its layers are added from the top down, and what each layer costs alone, as a
table (layer_curves.md / .csv), a figure and a report section.

Each point is a CE record of the suite (dCE with its interval, KL, top-1 agreement, the
compute-equivalents); the whole set is the last point of the "from the top" curve. How the
damage compounds is read off one number per set: the whole set's dCE against the sum of its
members' dCEs alone (above 1: the layers' errors compound; below 1: they overlap).
"""

from __future__ import annotations

import math

import pandas as pd

# record keys every curve point carries (beside its set, order, layers and lowest layer)
KEYS = ["dce", "dce_ci_low", "dce_ci_high", "kl", "top1_agreement", "top1_agreement_hard", "compute_fraction",
        "n_eff_frac_fixed_d", "explained_variance", "l0"]


def full_set_record(records: list[dict], set_name: str) -> dict | None:
    return next((r for r in records if r["variant"] == set_name and not r.get("curve")), None)


def curve_frame(curves: list[dict], table_records: list[dict]) -> pd.DataFrame:
    """One row per (set, order, point); the whole set closes its "from the top" curve."""
    rows = []
    for r in curves:
        rows.append({"set": r["curve"]["set"], "order": r["curve"]["order"], "variant": r["variant"],
                     **{k: r["curve"][k] for k in ("layers", "first")}, **{k: r.get(k) for k in KEYS}})
    for name in dict.fromkeys(r["curve"]["set"] for r in curves):
        full = full_set_record(table_records, name)
        members = [r for r in curves if r["curve"]["set"] == name and r["curve"]["order"] == "alone"]
        if full is not None:
            rows.append({"set": name, "order": "from_top", "variant": full["variant"], "layers": len(members),
                         "first": min(r["curve"]["first"] for r in members), **{k: full.get(k) for k in KEYS}})
    df = pd.DataFrame(rows)
    return df.sort_values(["set", "order", "layers", "first"], kind="stable").reset_index(drop=True)


def compounding(df: pd.DataFrame) -> dict[str, dict]:
    """Per set: the whole set's dCE, the sum of its layers' dCEs alone, and their ratio."""
    out = {}
    for name, g in df.groupby("set", sort=False):
        alone = g[g["order"] == "alone"]
        top = g[g["order"] == "from_top"]
        if not len(alone) or not len(top):
            continue
        whole = float(top.sort_values("layers")["dce"].iloc[-1])
        total = float(alone["dce"].sum())
        out[name] = {"dce_all": whole, "dce_sum_alone": total, "ratio": whole / total if total else float("nan"),
                     "worst_layer": int(alone.loc[alone["dce"].idxmax(), "first"]),
                     "worst_layer_dce": float(alone["dce"].max())}
    return out


def _f(x, spec=".3f") -> str:
    return "" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


SHOWN = ["layers replaced", "lowest layer", "dCE [95% CI]", "KL", "top-1 agree", "top-1 agree (hard)",
         "C_eff/C frontier", "N_eff/N at D", "EV (outputs)", "L0 (sum)"]


def _row(r) -> list[str]:
    return [str(int(r["layers"])), str(int(r["first"])),
            f"{_f(r['dce'])} [{_f(r['dce_ci_low'])}, {_f(r['dce_ci_high'])}]", _f(r["kl"]),
            _f(r["top1_agreement"]), _f(r["top1_agreement_hard"]), _f(r["compute_fraction"], ".3g"),
            _f(r["n_eff_frac_fixed_d"], ".3g"), _f(r["explained_variance"]), _f(r["l0"], ".1f")]


def to_markdown(df: pd.DataFrame) -> str:
    lines = ["# Layer curves\n",
             "Each point is the CE suite's record of that splice: dCE (nats/token, 95% paired bootstrap "
             "interval), KL(clean || spliced), top-1 agreement with the clean model over T and on the hard subset "
             "(clean top-1 correct with p < 0.8), the compute-equivalents (frontier; fixed tokens), the fraction of "
             "the replaced outputs' variance explained and the summed L0. Layers are added from the top down: every "
             "point then shares the clean pass below its lowest layer (one tail per point, not a whole forward).\n"]
    comp = compounding(df)
    for name, g in df.groupby("set", sort=False):
        lines.append(f"## {name}\n")
        c = comp.get(name)
        if c:
            lines.append(f"All {int((g['order'] == 'alone').sum())} layers together: dCE {c['dce_all']:.3f} nats; "
                         f"the layers alone add up to {c['dce_sum_alone']:.3f} (together / sum = {c['ratio']:.2f}). "
                         f"Worst layer alone: {c['worst_layer']} ({c['worst_layer_dce']:.3f}).\n")
        for order, title in (("from_top", "Layers added from the top down (the last k layers replaced)"),
                             ("alone", "Each layer alone")):
            part = g[g["order"] == order]
            if not len(part):
                continue
            lines += [f"{title}:\n", "| " + " | ".join(SHOWN) + " |", "|" + " ---: |" * len(SHOWN)]
            lines += ["| " + " | ".join(_row(r)) + " |" for _, r in part.iterrows()]
            lines.append("")
    return "\n".join(lines) + "\n"


def figure(df: pd.DataFrame):
    """C_eff/C, dCE and KL against the number of layers replaced (from the top), and each layer
    alone against its index; one line per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(10, 8.5), sharex="col")
    metrics = [("compute_fraction", "C_eff/C (frontier)", True), ("dce", "dCE (nats/token)", False),
               ("kl", "KL (nats/token)", False)]
    for name, g in df.groupby("set", sort=False):
        for col, order, xkey, xlabel in ((0, "from_top", "layers", "layers replaced, added from the top"),
                                         (1, "alone", "first", "layer replaced alone")):
            part = g[g["order"] == order].sort_values(xkey)
            for row, (key, ylabel, log) in enumerate(metrics):
                ax = axes[row, col]
                y = pd.to_numeric(part[key], errors="coerce")
                ax.plot(part[xkey], y, marker="o", ms=3, label=name)
                if key == "dce":
                    ax.fill_between(part[xkey], part["dce_ci_low"].astype(float), part["dce_ci_high"].astype(float),
                                    alpha=0.2)
                if log and (y > 0).any():
                    ax.set_yscale("log")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if row == 2:
                    ax.set_xlabel(xlabel)
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def html_section(df: pd.DataFrame, esc) -> str:
    """The report's summary lines (the figure is drawn by report.py)."""
    parts = []
    for name, c in compounding(df).items():
        g = df[(df["set"] == name) & (df["order"] == "from_top")].sort_values("layers")
        full = g.iloc[-1]
        parts.append(f"<p><b>{esc(name)}</b>: all {int(full['layers'])} layers replaced at once cost "
                     f"dCE {c['dce_all']:.3f} nats/token (KL {_f(full['kl'])}, top-1 agreement "
                     f"{100 * float(full['top1_agreement']):.1f}%, {100 * float(full['top1_agreement_hard']):.1f}% on "
                     f"the hard subset); the layers alone add up to {c['dce_sum_alone']:.3f} "
                     f"(together / sum {c['ratio']:.2f}); the worst layer alone is {c['worst_layer']} "
                     f"({c['worst_layer_dce']:.3f}). Table: layer_curves.md.</p>")
    return "".join(parts)
