"""Measured scaling references: other models (or checkpoints) evaluated on the run's own tokens.

A preset law belongs to another corpus and tokenizer; the honest alternative (docs/design.md,
"Compute-equivalents", the family fit) is to evaluate a family of models trained on the same data on exactly the
tokens the SAEs were scored on, fit L(N) = E + A/N^alpha (or L(D) for one model's
checkpoints), and read the spliced loss off that curve. Every reference must share the main
model's tokenizer: a loss per token is only comparable over the same tokens.
"""

from __future__ import annotations

import torch

from harness.evals import ce
from harness import lawfit, scaling
from harness.model.loading import LoadedModel, load_model
from harness.errors import UserError
from harness.splice.variants import CLEAN, Variant


def parameter_count(lm: LoadedModel) -> int:
    """All parameters, embeddings included (Hoffmann et al.'s N), tied weights counted once."""
    return sum(p.numel() for p in lm.runner.parameters_module().parameters())


def clean_loss(lm: LoadedModel, tokens: torch.Tensor, batch_size: int) -> float:
    return ce.evaluate(lm, [Variant(CLEAN, {})], tokens, batch_size, None, n_boot=1).records[0]["ce_clean"]


def _same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


def measure(main: LoadedModel, specs: list[str], tokens: torch.Tensor, batch_size: int, device: str,
            dtype: str) -> list[dict]:
    """Clean CE of each reference model on exactly `tokens`, with its parameter count."""
    points = []
    for spec in specs:
        ref = load_model(spec, device, dtype)
        if not _same_tokenizer(ref.tokenizer, main.tokenizer):
            raise UserError(f"reference model {spec!r} uses another tokenizer: its loss on these tokens "
                            "is not comparable")
        points.append({"model": spec, "N": parameter_count(ref), "loss": clean_loss(ref, tokens, batch_size)})
        del ref
    return points


def family_law(points: list[dict], main_N: int, main_loss: float, tokens: list[float] | None):
    """Fit the family including the main model, by least squares with profile-likelihood ranges
    (harness/lawfit.py): L(N) when every model saw the same D, else the full L(N, D)."""
    N = [p["N"] for p in points] + [main_N]
    L = [p["loss"] for p in points] + [main_loss]
    try:
        if tokens and len(set(tokens)) > 1:
            return lawfit.fit_law(N, tokens, L, name="family L(N, D)")
        return lawfit.fit_curve(N, L, "N", name="family L(N)")
    except ValueError as e:
        raise UserError(f"cannot fit the reference family: {e}") from None


def checkpoint_law(points: list[dict]):
    """L(D) at the main model's N. Only annealed runs (warm-up, constant rate, cooldown, one per
    budget) are points of this curve: intermediate checkpoints of one decaying schedule overstate
    what a finished run of that length reaches. The user vouches for that (README)."""
    try:
        return lawfit.fit_curve([p["D"] for p in points], [p["loss"] for p in points], "D", name="checkpoints L(D)")
    except ValueError as e:
        raise UserError(f"cannot fit the checkpoint curve: {e}") from None


def add_reference_equivalents(records: list[dict], lm: LoadedModel, tokens: torch.Tensor, cfg) -> dict:
    """n_eff_frac (family) and d_eff_frac (checkpoints) columns, each with its profile-likelihood
    range at the ends of the dCE interval and whether the fit identified its parameters.
    Returns what was measured, for config.json."""
    out: dict = {}
    clean = records[0]["ce_clean"]
    N_main = parameter_count(lm)
    fits = []
    if cfg.reference_models:
        points = measure(lm, cfg.reference_models, tokens, cfg.batch_size, cfg.device, cfg.dtype)
        d = list(cfg.reference_tokens) or None
        if d is not None and len(d) != len(points) + 1:
            raise UserError("--reference-tokens needs one count per reference model, then the main model's")
        fit = family_law(points, N_main, clean, d)
        Ns = [p["N"] for p in points] + [N_main]
        # differing D: N_eff read at the main model's D
        fits.append(("n_eff_frac", fit, "n_eff", (N_main, min(Ns), max(Ns)),
                     {"D": d[-1]} if fit.var == "ND" else {}))
        out["family"] = {"points": points, "main": {"model": lm.spec, "N": N_main, "loss": clean},
                         "law": fit.to_json()}
    if cfg.reference_checkpoints:
        if len(cfg.checkpoint_tokens) != len(cfg.reference_checkpoints) + 1:
            raise UserError("--checkpoint-tokens needs one count per checkpoint, then the final model's")
        points = measure(lm, cfg.reference_checkpoints, tokens, cfg.batch_size, cfg.device, cfg.dtype)
        points.append({"model": lm.spec, "N": N_main, "loss": clean})
        for p, D in zip(points, cfg.checkpoint_tokens):
            p["D"] = float(D)
        fit = checkpoint_law(points)
        Ds = [p["D"] for p in points]
        fits.append(("d_eff_frac", fit, "d_eff_curve", (Ds[-1], min(Ds), max(Ds)), {}))
        out["checkpoints"] = {"points": points, "law": fit.to_json(),
                              "annealed": "as given by the user: only annealed runs belong on L(D)"}
    for key, fit, kind, (unit, lo, hi), kw in fits:
        for rec in records:
            try:
                dce = rec["ce_spliced"] - clean
                r = lawfit.reading(fit, kind, clean, dce, (rec["dce_ci_low"], rec["dce_ci_high"]), **kw)
            except ValueError as e:  # a loss at or below the fitted floor: the curve cannot place it
                raise UserError(f"{rec['variant']}: {e}") from None
            rec.update({key: r["value"], f"{key}_low": r["low"], f"{key}_high": r["high"],
                        f"{key}_identified": r["identified"],
                        # allowed, but outside the fitted sizes / token counts
                        f"{key}_extrapolated": scaling.outside(r["value"] * unit, lo, hi)})
    return out
