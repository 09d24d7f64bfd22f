"""The explainability table (interp.md) and the frontier figure's points, from an interp
run's details (interp.json); shared by `sae-harness interp` and report.html."""

from __future__ import annotations

import math

from harness.evals import interp


def points(details: dict) -> list[dict]:
    """What the frontier figure needs, per variant."""
    out = []
    for name, r in details["variants"].items():
        out.append({"label": name, "l0": _num(r.get("l0")), "f1": r["f1"]["mean"], "f1_lo": r["f1"]["low"],
                    "f1_hi": r["f1"]["high"], "probe": r["probing"]["5"],
                    "frac": _num(r.get("compute_fraction")), "dce": _num(r.get("dce"))})
    return out


def _num(x) -> float:
    return float(x) if isinstance(x, (int, float)) and x is not None else float("nan")


def _f(x, p=3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{p}g}"


def table(details: dict) -> str:
    judged = any("judge" in r for r in details["variants"].values())
    head = ["Variant", "L0", "dCE", "C_eff/C", "explanation F1 [95% CI]", "precision", "recall",
            "F1 (act.-weighted)", "probe acc. k=1", "k=5", "k=20"]
    if judged:
        head += ["judge bal. acc.", "judge AUROC"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for name, r in details["variants"].items():
        f1 = r["f1"]
        cells = [name, _f(r.get("l0"), 3), _f(r.get("dce")), _f(r.get("compute_fraction")),
                 f"{f1['mean']:.3f} [{f1['low']:.3f}, {f1['high']:.3f}]", f"{r['precision']['mean']:.3f}",
                 f"{r['recall']['mean']:.3f}", f"{r['f1_w']['mean']:.3f}",
                 f"{r['probing']['1']:.3f}", f"{r['probing']['5']:.3f}", f"{r['probing']['20']:.3f}"]
        if judged:
            j = r.get("judge")
            cells += [f"{j['balanced_accuracy']['mean']:.3f}" if j else "–", f"{_f(j['auroc']['mean'])}" if j else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    resid = ", ".join(f"{h}: {a:.3f}" for h, a in details["probe"]["residual_accuracy"].items())
    n = next(iter(details["variants"].values()))["n_latents"]
    lines += ["", f"Explanations: for {n} live latents per variant (seeded), the set of at most {interp.MAX_TERMS} token "
              "n-grams (n <= 2) that best predicts firing on one half of the held-out sequences, scored on the other "
              f"half ({details['tokens']:,} tokens in all): precision = P(fires | matches), recall = P(matches | "
              "fires), F1; mean over latents with a 95% bootstrap interval. Probe: mean held-out accuracy of "
              f"k-sparse logistic probes (latents chosen by mean difference) on {details['probe']['questions']} MMLU "
              f"questions, one-vs-rest per category, balanced (chance 0.5); the raw residual with every coordinate: "
              f"{resid}."]
    return "\n".join(lines)
