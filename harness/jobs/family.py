"""The family run: compute-equivalents read off scaling curves measured here (results/family).

A preset law (Hoffmann, Epoch) was fitted on another corpus with another tokenizer, so where a
spliced model lands on it says little about this text. harness/family/ holds a miniature suite
trained by scripts/train_family.py on ~11.8M tokens of documentation prose: 8 widths at one
depth (N over 254x), each an annealed run (warm-up, constant rate, cooldown) at 3-5 token
budgets, a second seed for the four smallest and two more for the SAE member's width: every
saved model is a finished run of its (N, D). The SAE member (width 96 at 8.4M tokens, ~19
tokens per parameter) sits in the interior, with three larger widths above it. Every run is
evaluated on the run's tokens (the family's held-out text, never trained on), and the SAE
member carries the CE suite with its SAEs and baselines. Readings (a) and (b) use every seed:

(a) L(N) = E + A/N^alpha over the widths at the member's D      -> N_eff/N at fixed D
(b) L(D) = E + B/D^beta over the member's width's annealed runs -> D_eff/D at fixed N
(c) L(N, D) over every run                                       -> N_eff/N at its D, D_eff/D at
    its N, and the compute-optimal frontier's C_eff/C
(d) the hoffmann and epoch presets, read the same ways at the member's (total) N and D.

Fits: least squares with profile-likelihood intervals (harness/lawfit.py); a fit whose E (or
exponent) is not identified says so, and its interval is the range over the plausible E. N is
the non-embedding parameter count (at these sizes the 4,096 x width embedding is up to 71% of
all parameters and does not scale like the blocks); the presets count all parameters, as
Hoffmann et al. did. A reading whose effective N or D (or, on the frontier, whose optimal N or D)
lies outside the fitted runs' range is an extrapolation, flagged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness.evals import ce
from harness import lawfit
from harness import scaling
from harness.errors import UserError

FAMILY_DIR = Path(__file__).resolve().parents[1] / "family"
SAE_DIR = FAMILY_DIR / "saes"
HOOK = "blocks.2.hook_resid_post"  # the family SAEs' hook: block 2 of the member's 4
PRESETS = ("hoffmann", "epoch")
# scripts/train_demo_saes.py --family: a good SAE (4x wide, k 16) and a small sparse one (2x, k 4)
FAMILY_SAES = ("l2-w768-k32", "l2-w384-k16", "l2-w192-k4")


def manifest() -> dict:
    m = json.loads((FAMILY_DIR / "manifest.json").read_text())
    if not m.get("complete"):
        raise UserError("harness/family is incomplete (scripts/train_family.py has not finished): rerun it")
    return m


def default_saes() -> list[str]:
    """The family's SAEs (by folder) and the PCA / neuron baselines at their hook and L0."""
    return [str(SAE_DIR / name) for name in FAMILY_SAES] + [f"pca:16@{HOOK}", f"neurons:16@{HOOK}"]


def eval_rows() -> "np.ndarray":
    """The family's held-out tokens as rows of the training context (scripts/train_family.py)."""
    return np.load(FAMILY_DIR / "eval_tokens.npy").astype(np.int64)


@dataclass
class FamilyConfig:
    saes: list[str] = field(default_factory=default_saes)
    tokens: int = 8192  # of the 131,072 held-out tokens (every run is evaluated on them: kept small)
    ctx: int = 256  # the family's training context
    batch_size: int = 8
    calib_seqs: int = 16
    seed: int = 0
    n_boot: int = 1000
    out: str = "runs/family"
    overwrite: bool = False  # replace an existing --out (else refused)

    def __post_init__(self):
        if self.tokens < self.ctx or self.ctx < 2:
            raise UserError(f"--tokens ({self.tokens}) must hold at least one row of --ctx ({self.ctx}) >= 2 tokens")
        if self.ctx > 256:
            raise UserError(f"--ctx ({self.ctx}) is longer than the family's training context (256)")
        if self.tokens // self.ctx + self.calib_seqs > 131072 // self.ctx:
            raise UserError(f"--tokens {self.tokens} plus {self.calib_seqs} calibration rows exceed the family's "
                            "131,072 held-out tokens")


def member_loss(folder: Path, tokens, batch_size: int, special: list[int]) -> float:
    """Mean next-token CE of one run over the token set T (input token not special), with
    Hugging Face transformers: the family runs are plain Llama checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            x = tokens[i:i + batch_size]
            logp = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0]
            keep = ~torch.isin(x[:, :-1], torch.tensor(special))
            total += nll[keep].sum()
            count += int(keep.sum())
    return float(total / count)


def measure_runs(m: dict, tokens, batch_size: int, special: list[int]) -> list[dict]:
    """Every annealed run's loss on `tokens`, with N (non-embedding, as trained), N_total and D."""
    points = []
    for run in m["runs"]:
        if run.get("annealed", m.get("annealed")) is not True:
            raise UserError(f"family run {run['name']} is not marked annealed in the manifest: "
                            "only finished runs are points of L(N, D)")
        points.append({"model": run["name"], "width": run["width"], "seed": run["seed"],
                       "N": run["N_non_embedding"], "N_total": run["N_total"], "D": float(run["D"]),
                       "loss": member_loss(FAMILY_DIR / "runs" / run["name"], tokens, batch_size, special)})
    return points


def _seed_diffs(points: list[dict], D=None) -> list[float]:
    """Loss differences between seed 0 and every other seed of the same (width, D)."""
    by = {(p["width"], p["D"], p["seed"]): p["loss"] for p in points}
    return [by[(w, d, 0)] - by[(w, d, s)] for (w, d, s) in by
            if s > 0 and (w, d, 0) in by and (D is None or d == D)]


def _run_sd(diffs: list[float]) -> float:
    """The sd of one run from differences of seed pairs: rms(diff) / sqrt 2."""
    return float(np.sqrt(np.mean(np.square(diffs)) / 2))


def seed_noise(points: list[dict]) -> dict:
    """The spread between two seeds of the same (width, D): sd of one run = rms(diff) / sqrt 2."""
    diffs = _seed_diffs(points)
    if not diffs:
        return {"pairs": 0, "sd": None}
    return {"pairs": len(diffs), "sd": _run_sd(diffs),
            "mean_diff": float(np.mean(diffs))}


NOISE_FLOOR = 0.01  # nats: no run is trusted beyond this, however close its seed pair came


def noise_by_budget(points: list[dict]) -> dict[float, float]:
    """Seed noise sd per token budget (max(rms(diff) / sqrt 2, NOISE_FLOOR)) where seed pairs exist."""
    out = {}
    for D in sorted({p["D"] for p in points}):
        diffs = _seed_diffs(points, D)
        if diffs:
            out[D] = max(NOISE_FLOOR, _run_sd(diffs))
    return out


def fit_all(points: list[dict], member: dict) -> dict:
    """(a) L(N) at the member's D, (b) L(D) at its width (each with every seed), (c) L(N, D) on all."""
    at_d = [p for p in points if p["D"] == member["D"]]
    at_n = [p for p in points if p["width"] == member["width"]]
    try:
        return {"family": lawfit.fit_curve([p["N"] for p in at_d], [p["loss"] for p in at_d], "N",
                                           name=f"L(N) at D={member['D']:.3g}"),
                "budgets": lawfit.fit_curve([p["D"] for p in at_n], [p["loss"] for p in at_n], "D",
                                            name=f"L(D) at N={member['N']:,}"),
                "full": lawfit.fit_law([p["N"] for p in points], [p["D"] for p in points],
                                       [p["loss"] for p in points], name="L(N, D), every run"),
                **weighted_fit(points)}
    except ValueError as e:
        raise UserError(f"cannot fit the family: {e}") from None


def weighted_fit(points: list[dict]) -> dict:
    """A check of the full fit's noise model: L(N, D) weighted by each run's seed noise (the
    sd at its budget, or the nearest budget's). Its chi^2 per degree of freedom says whether the
    runs scatter around the law as much as seeds repeat (about 1) or more (the width-to-width
    scatter is then what the unweighted fit must respect). Not used for readings."""
    sd = noise_by_budget(points)
    if len(sd) < 2:
        return {}
    sigma = [sd[min(sd, key=lambda D: abs(np.log(D / p["D"])))] for p in points]
    fit = lawfit.fit_law([p["N"] for p in points], [p["D"] for p in points], [p["loss"] for p in points],
                         name="L(N, D) weighted by seed noise", sigma=sigma)
    fit.info["noise_by_budget"] = {str(int(D)): v for D, v in sd.items()}
    return {"full_weighted": fit}


def readings(records: list[dict], fits: dict, points: list[dict], member: dict) -> dict:
    """Per variant, every reading with its interval, identification and extrapolation flags."""
    clean = records[0]["ce_clean"]
    Ns, Ds = [p["N"] for p in points], [p["D"] for p in points]
    n_rng, d_rng = (min(Ns), max(Ns)), (min(Ds), max(Ds))
    full = fits["full"].law
    out = {}
    for rec in records[1:]:
        dce, ci = rec["dce"], (rec["dce_ci_low"], rec["dce_ci_high"])
        row = {"ce_spliced": rec["ce_spliced"], "dce": dce, "dce_ci_low": ci[0], "dce_ci_high": ci[1]}

        def put(key, fit, kind, unit, rng, **kw):
            try:
                r = lawfit.reading(fit, kind, clean, dce, ci, **kw)
            except ValueError as e:
                raise UserError(f"{rec['variant']}: {key}: {e}") from None
            row[key] = r["value"]
            row.update({f"{key}_low": r["low"], f"{key}_high": r["high"], f"{key}_identified": r["identified"],
                        f"{key}_extrapolated": scaling.outside(r["value"] * unit, *rng)})

        put("n_eff_frac_family", fits["family"], "n_eff", member["N"], n_rng)
        put("d_eff_frac_budgets", fits["budgets"], "d_eff_curve", member["D"], d_rng)
        put("n_eff_frac_full", fits["full"], "n_eff", member["N"], n_rng, D=member["D"])
        put("d_eff_frac_full", fits["full"], "d_eff", member["D"], d_rng, N=member["N"])
        put("c_eff_frac_full", fits["full"], "frontier", 1.0, (0, np.inf))
        # the frontier's optimal sizes at the clean and spliced losses must lie among the runs
        opt = [full.optimal_allocation(full.frontier_compute(L)) for L in (clean, rec["ce_spliced"])]
        row["c_eff_frac_full_extrapolated"] = any(scaling.outside(n, *n_rng) or scaling.outside(d, *d_rng) for n, d in opt)
        row["frontier_N_opt_clean"], row["frontier_D_opt_clean"] = map(float, opt[0])
        for name in PRESETS:
            law = scaling.preset(name)
            ends = {"": rec["ce_spliced"], "_low": clean + ci[1], "_high": clean + ci[0]}
            for key, src, size in ((f"c_eff_frac_{name}", "compute_fraction", {}),
                                   (f"n_eff_frac_{name}", "n_eff_frac", {"N": member["N_total"], "D": member["D"]})):
                for end, spliced in ends.items():
                    try:
                        row[key + end] = scaling.equivalents(law, clean, spliced, **size)[src]
                    except ValueError as e:  # e.g. the preset's floor at this tiny D lies above the loss
                        row[key + end], row[f"{key}_why"] = None, str(e).split(";")[0]
            row[f"{name}_extrapolated"] = True  # Chinchilla's runs: 70M-16B parameters, 5B-500B tokens
        out[rec["variant"]] = row
    return out


def run(cfg: FamilyConfig, progress_factory=None, say=print) -> dict:
    """CE suite on the family's SAE member with its SAEs and baselines, every annealed run
    evaluated on the same tokens, the three fits, and the readings; written to cfg.out (built
    under a temporary name: the folder appears only when complete)."""
    import torch

    from harness.jobs.pipeline import stage
    from harness.files import write_json
    from harness.jobs.runfolder import check_out, command_line, machine, staging, versions
    from harness.splice.session import prepare

    check_out(cfg.out, cfg.overwrite)
    m = manifest()
    member = next(r for r in m["runs"] if r["name"] == m["sae_member"])
    rows = torch.from_numpy(eval_rows())
    n_seq = cfg.tokens // cfg.ctx
    held = rows[:, :cfg.ctx] if cfg.ctx < rows.shape[1] else rows
    tokens, calib = held[:n_seq], held[len(held) - cfg.calib_seqs:]
    session = prepare(str(FAMILY_DIR / "runs" / member["name"]), cfg.saes, ctx=cfg.ctx, batch_size=cfg.batch_size,
                      calib_seqs=cfg.calib_seqs, seed=cfg.seed, calib_tokens=calib)
    lm = session.lm
    say(f"family: CE suite on {member['name']} ({n_seq} x {cfg.ctx} held-out tokens, "
        f"{len(session.variants) - 1} variants)")
    with stage(progress_factory, "family CE suite: sequences", len(tokens)) as progress:
        res = ce.evaluate(lm, session.variants, tokens, cfg.batch_size, session.calib_tokens, n_boot=cfg.n_boot,
                          seed=cfg.seed, progress=progress)
    say(f"family: loss of {len(m['runs'])} annealed runs on the same tokens")
    special = sorted(set(lm.tokenizer.all_special_ids))
    points = measure_runs(m, tokens, cfg.batch_size, special)
    mp = next(p for p in points if p["model"] == member["name"])
    member_pt = {"name": member["name"], "width": member["width"], "N": mp["N"], "N_total": mp["N_total"],
                 "D": mp["D"], "loss": mp["loss"]}
    fits = fit_all(points, member_pt)
    variants = readings(res.records, fits, points, member_pt)
    details = {
        "family": {"points": points, "N": "non-embedding parameters", "member": member_pt,
                   "clean_ce_suite": res.records[0]["ce_clean"], "seed_noise": seed_noise(points),
                   "fits": {k: f.to_json() for k, f in fits.items()}, "variants": variants,
                   "method": lawfit.__doc__.strip().split("\n\n")[0]},
        "presets": {name: scaling.preset(name).to_json() | {"fitted_range": scaling.FITTED_RANGE[name]} for name in PRESETS},
    }
    with staging(Path(cfg.out)) as folder:
        np.save(folder / "tokens.npy", tokens.numpy())
        write_json(folder / "metrics.json", res.records)
        write_json(folder / "compute_equivalents.json", details)
        write_json(folder / "config.json", {"run": asdict(cfg), "model": member["name"], "versions": versions(),
                                            "command": command_line(), "machine": machine(),
                                            "threads": torch.get_num_threads(), "seconds_ce": res.seconds,
                                            "tokens": "harness/family/eval_tokens.npy, first rows",
                                            "manifest_git": m["git_commit"]})
        (folder / "equivalents.md").write_text(table(details) + "\n")
        from harness.output.figures import family_figure, save

        save(family_figure(details), folder, "family")
    return details


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


READINGS = (("n_eff_frac_family", "(a) N_eff/N, L(N) at fixed D"),
            ("d_eff_frac_budgets", "(b) D_eff/D, L(D) at fixed N"),
            ("n_eff_frac_full", "(c) N_eff/N, full law at fixed D"),
            ("d_eff_frac_full", "(c) D_eff/D, full law at fixed N"),
            ("c_eff_frac_full", "(c) C_eff/C, full law's frontier"),
            ("n_eff_frac_hoffmann", "(d) N_eff/N, hoffmann at fixed D"),
            ("c_eff_frac_hoffmann", "(d) C_eff/C, hoffmann frontier"))


def _cell(v: dict, key: str) -> str:
    if v.get(key) is None:
        return "cannot place"
    flags = ("‡" if v.get(f"{key}_extrapolated") or (key.endswith("hoffmann") and v.get("hoffmann_extrapolated"))
             else "") + ("?" if v.get(f"{key}_identified") is False else "")
    return f"{_fmt(v[key])}{flags} [{_fmt(v[key + '_low'])}, {_fmt(v[key + '_high'])}]"


def _law_line(label: str, fit: dict) -> str:
    def par(p):
        mark = "" if fit.get(f"{p}_identified", True) else " (not identified)"
        return f"{p} {fit[p]:.3g} [{fit[p + '_low']:.3g}, {fit[p + '_high']:.3g}]{mark}"

    names = ["E", "alpha"] if fit.get("var") == "N" else ["E", "beta"] if fit.get("var") == "D" else \
        ["E", "alpha", "beta"]
    return f"- {label}: " + ", ".join(par(p) for p in names) + f"; RMSE {fit['rmse']:.3f} nats over {fit['n_points']} runs"


def _weighted_line(fit: dict) -> str:
    per = ", ".join(f"{int(D) / 2**20:.0f}M {v:.3f}" for D, v in fit["noise_by_budget"].items())
    return (f"- check, (c) weighted by the seed noise per budget ({per} nats): E {fit['E']:.3g} "
            f"[{fit['E_low']:.3g}, {fit['E_high']:.3g}], chi^2 per degree of freedom {fit['chi2_per_dof']:.1f} "
            "(1 if the runs scattered around the law only as much as seeds repeat)")


def table(details: dict) -> str:
    """The readings per variant as Markdown, the fits with their plausible ranges, and the key."""
    fam = details["family"]
    lines = ["| Variant | dCE [95% CI] | " + " | ".join(label for _, label in READINGS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in READINGS) + " |"]
    for name, v in fam["variants"].items():
        cells = [name, f"{v['dce']:.3f} [{v['dce_ci_low']:.3f}, {v['dce_ci_high']:.3f}]"]
        lines.append("| " + " | ".join(cells + [_cell(v, key) for key, _ in READINGS]) + " |")
    fits, noise, mem = fam["fits"], fam["seed_noise"], fam["member"]
    lines += ["", f"Member `{mem['name']}`: N = {mem['N']:,} non-embedding parameters, D = {mem['D']:,.0f} tokens "
              f"({mem['D'] / mem['N']:.1f} tokens per parameter). Fits (least squares on the loss, 95% profile-"
              "likelihood ranges):",
              _law_line("(a) L(N) at the member's D", fits["family"]),
              _law_line("(b) L(D) at the member's N", fits["budgets"]),
              _law_line("(c) L(N, D)", fits["full"]),
              f"- seed noise: sd {noise['sd']:.3f} nats per run over {noise['pairs']} seed pairs" if noise["sd"]
              else "- seed noise: no seed pairs",
              *([_weighted_line(fits["full_weighted"])] if "full_weighted" in fits else []),
              "",
              "Intervals: the range over every parameter vector the data allow (profile likelihood, 95%), at the ends "
              "of the dCE interval. ? a parameter of that fit is not identified (its plausible range reaches a "
              "bound): the interval is the range over the plausible E, not a confidence interval around the value. "
              "‡ extrapolation: the effective N or D (on the frontier: the optimal N or D at the clean or spliced "
              "loss) lies outside the fitted runs; the presets' readings are all far outside Chinchilla's runs. "
              "N_eff/N at fixed D: the parameters a model trained on the member's tokens would need to reach the "
              "spliced loss; C_eff/C on the frontier compares two compute-optimal models."]
    return "\n".join(lines)
