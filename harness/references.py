"""Measured scaling references: other models (or checkpoints) evaluated on the run's own tokens.

A preset law belongs to another corpus and tokenizer; the honest alternative (docs/design.md,
"Compute-equivalents", the family fit) is to evaluate a family of models trained on the same data on exactly the
tokens the SAEs were scored on, fit L(N) = E + A/N^alpha (or L(D) for one model's
checkpoints), and read the spliced loss off that curve. Every reference must share the main
model's tokenizer: a loss per token is only comparable over the same tokens.
"""

from __future__ import annotations

import torch

from harness import ce, scaling
from harness.models import LoadedModel, UserError, load_model
from harness.variants import CLEAN, Variant


def parameter_count(lm: LoadedModel) -> int:
    """All parameters, embeddings included (Hoffmann et al.'s N), tied weights counted once."""
    module = lm.model.original_model if lm.kind == "bridge" else lm.model
    return sum(p.numel() for p in module.parameters())


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


def family_law(points: list[dict], main_N: int, main_loss: float, tokens: list[float] | None, seed: int):
    """Fit the family (fixed D: L(N); differing D: the full L(N, D)) including the main model."""
    N = [p["N"] for p in points] + [main_N]
    L = [p["loss"] for p in points] + [main_loss]
    try:
        if tokens and len(set(tokens)) > 1:
            return scaling.fit_law(N, tokens, L, seed=seed, name="family L(N, D)")
        return scaling.fit_family(N, L, seed=seed, name="family L(N)")
    except ValueError as e:
        raise UserError(f"cannot fit the reference family: {e}") from None


def checkpoint_law(points: list[dict], seed: int):
    try:
        return scaling.fit_checkpoints([p["D"] for p in points], [p["loss"] for p in points], seed=seed,
                                       name="checkpoints L(D)")
    except ValueError as e:
        raise UserError(f"cannot fit the checkpoint curve: {e}") from None


def extrapolated(effective: float, lo: float, hi: float) -> bool:
    """Whether an effective size / token count / compute lies outside the fitted points' range
    [lo, hi] (0.1% slack for rounding: the clean model itself sits at an end)."""
    return bool(effective < lo * 0.999 or effective > hi * 1.001)


def add_reference_equivalents(records: list[dict], lm: LoadedModel, tokens: torch.Tensor, cfg) -> dict:
    """n_eff_frac (family) and d_eff_frac (checkpoints) columns, each with an interval from the
    fit's bootstrap and the dCE interval. Returns what was measured, for config.json."""
    out: dict = {}
    clean = records[0]["ce_clean"]
    N_main = parameter_count(lm)
    fits = []
    if cfg.reference_models:
        points = measure(lm, cfg.reference_models, tokens, cfg.batch_size, cfg.device, cfg.dtype)
        d = list(cfg.reference_tokens) or None
        if d is not None and len(d) != len(points) + 1:
            raise UserError("--reference-tokens needs one count per reference model, then the main model's")
        law = family_law(points, N_main, clean, d, cfg.seed)
        if isinstance(law, scaling.Law):  # differing D: read N_eff at the main model's D
            law = scaling.Curve(E=law.E + law.B / d[-1] ** law.beta, A=law.A, alpha=law.alpha, var="N",
                                name=law.name)
        Ns = [p["N"] for p in points] + [N_main]
        fits.append(("n_eff_frac", law, (N_main, min(Ns), max(Ns))))
        out["family"] = {"points": points, "main": {"model": lm.spec, "N": N_main, "loss": clean},
                         "law": law.to_json()}
    if cfg.reference_checkpoints:
        if len(cfg.checkpoint_tokens) != len(cfg.reference_checkpoints) + 1:
            raise UserError("--checkpoint-tokens needs one count per checkpoint, then the final model's")
        points = measure(lm, cfg.reference_checkpoints, tokens, cfg.batch_size, cfg.device, cfg.dtype)
        points.append({"model": lm.spec, "N": N_main, "loss": clean})
        for p, D in zip(points, cfg.checkpoint_tokens):
            p["D"] = float(D)
        law = checkpoint_law(points, cfg.seed)
        Ds = [p["D"] for p in points]
        fits.append(("d_eff_frac", law, (Ds[-1], min(Ds), max(Ds))))
        out["checkpoints"] = {"points": points, "law": law.to_json()}
    for key, law, (unit, lo, hi) in fits:
        for rec in records:
            try:
                value = scaling.equivalents(law, clean, rec["ce_spliced"], N_main)[key]
                ci = scaling.fraction_interval(law, clean, (rec["dce_ci_low"], rec["dce_ci_high"]), N_main)
            except ValueError as e:  # a loss at or below the fitted E: the curve cannot place it
                raise UserError(f"{rec['variant']}: {e}") from None
            rec.update({key: value, f"{key}_low": ci["low"], f"{key}_high": ci["high"],
                        # allowed, but outside the fitted sizes / token counts
                        f"{key}_extrapolated": extrapolated(value * unit, lo, hi)})
    return out
