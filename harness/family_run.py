"""The family run: compute-equivalents read off scaling curves measured here (results/family).

A preset law (Hoffmann, Epoch) was fitted on another corpus with another tokenizer, so where
the spliced model lands on it says little about this text. harness/family/ holds a miniature
suite trained by scripts/train_family.py on the built-in text's training split: 5 Llama-shaped
models trained on the same 4.2M tokens in the same order, and 6 log-spaced checkpoints of the
largest (manifest.json). Evaluated on exactly the run's tokens (the eval split, never trained
on), they give three readings of each SAE's damage, side by side with the presets':

(a) family  L(N) = E + A/N^alpha over the 5 members       -> N_eff/N (= C_eff/C at fixed D)
(b) checkpoints  L(D) = E + B/D^beta over the largest's run -> D_eff/D (= C_eff/C at fixed N)
(c) full  L(N, D) fitted on members + checkpoints (Hoffmann's procedure, `scaling.fit_law`)
    -> C_eff/C along its compute-optimal frontier
(d) the hoffmann and epoch presets' frontier C_eff/C.

N is the non-embedding parameter count (Kaplan et al.'s convention): at these sizes the 4,096 x
width embedding is up to 83% of all parameters and does not scale like the blocks. Each
fraction's interval combines the fit's bootstrap and the dCE interval
(`scaling.fraction_interval`). A reading whose effective size or token count falls outside the
fitted points' range is an extrapolation: allowed, and flagged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness import ce, scaling
from harness.references import extrapolated
from harness.models import LoadedModel, UserError, load_model

FAMILY_DIR = Path(__file__).parent / "family"
SAE_DIR = FAMILY_DIR / "saes"
HOOK = "blocks.2.hook_resid_post"  # the family SAEs' hook: the middle of the largest's 5 blocks
PRESETS = ("hoffmann", "epoch")


def manifest() -> dict:
    return json.loads((FAMILY_DIR / "manifest.json").read_text())


# scripts/train_demo_saes.py --family: a good SAE (4x wide, k 16) and a small sparse one (2x, k 4)
FAMILY_SAES = ("l2-w640-k16", "l2-w320-k4")


def default_saes() -> list[str]:
    """The family's SAEs (by folder) and the PCA / neuron baselines at their hook and L0."""
    return [str(SAE_DIR / name) for name in FAMILY_SAES] + [f"pca:16@{HOOK}", f"neurons:16@{HOOK}"]


@dataclass
class FamilyConfig:
    saes: list[str] = field(default_factory=default_saes)
    tokens: int = 8192  # the eval split holds ~13.8k tokens of the family's tokenizer
    ctx: int = 128
    batch_size: int = 8
    calib_seqs: int = 16
    seed: int = 0
    n_boot: int = 1000
    out: str = "results/family"

    def __post_init__(self):
        if self.tokens < self.ctx or self.ctx < 2:
            raise UserError(f"--tokens ({self.tokens}) must hold at least one row of --ctx ({self.ctx}) >= 2 tokens")


def measure_points(main: LoadedModel, tokens, batch_size: int) -> tuple[list[dict], list[dict]]:
    """Clean CE on `tokens` of every family member and every checkpoint of the largest, with
    N (non-embedding) and D (tokens seen); the largest's final model is both a member and the
    checkpoint curve's last point."""
    from harness.references import _same_tokenizer, clean_loss

    m = manifest()

    def one(folder: Path, label: str, sizes: dict) -> dict:
        lm = load_model(str(folder), "cpu", "float32")
        if not _same_tokenizer(lm.tokenizer, main.tokenizer):
            raise UserError(f"family model {label} uses another tokenizer than the evaluated model")
        # N as trained (the manifest, counted on the Hugging Face model): a loaded
        # HookedTransformer adds an unembedding bias of zeros that is not the model's
        return {"model": label, "N": sizes["N_non_embedding"], "N_total": sizes["N_total"],
                "loss": clean_loss(lm, tokens, batch_size)}

    members = []
    for mem in m["members"]:
        p = one(FAMILY_DIR / mem["folder"], mem["name"], mem)
        members.append(p | {"D": float(mem["tokens"])})
    largest = next(mem for mem in m["members"] if mem["name"] == m["largest"])
    checkpoints = [one(FAMILY_DIR / c["folder"], Path(c["folder"]).name, largest) | {"D": float(c["tokens"])}
                   for c in largest["checkpoints"]]
    checkpoints.append(next(p for p in members if p["model"] == m["largest"]))
    return members, checkpoints


def fit_all(members: list[dict], checkpoints: list[dict], seed: int) -> dict:
    """(a) L(N) on the members, (b) L(D) on the checkpoints, (c) L(N, D) on both."""
    try:
        law_n = scaling.fit_family([p["N"] for p in members], [p["loss"] for p in members], seed=seed,
                                   name="family L(N)")
        law_d = scaling.fit_checkpoints([p["D"] for p in checkpoints], [p["loss"] for p in checkpoints], seed=seed,
                                        name="checkpoints L(D)")
        both = members + checkpoints[:-1]  # the final largest is already a member
        law_nd = scaling.fit_law([p["N"] for p in both], [p["D"] for p in both], [p["loss"] for p in both],
                                 seed=seed, name="family + checkpoints L(N, D)")
    except ValueError as e:
        raise UserError(f"cannot fit the family: {e}") from None
    return {"family": law_n, "checkpoints": law_d, "full": law_nd}


def _reading(law, clean: float, rec: dict, lo: float, hi: float, unit: float) -> dict:
    """One fraction with its interval (`scaling.equivalents`' main reading: N_eff/N for a curve
    in N, D_eff/D in D, the frontier's C_eff/C for a full law); `lo`/`hi` the fitted range of
    the curve's variable and `unit` the clean model's value of it (the flag: the effective
    value lies outside)."""
    try:
        f = scaling.equivalents(law, clean, rec["ce_spliced"])["compute_fraction"]
        ci = scaling.fraction_interval(law, clean, (rec["dce_ci_low"], rec["dce_ci_high"]))
    except ValueError as e:
        raise UserError(f"{rec['variant']}: {e}") from None
    return {"frac": f, "low": ci["low"], "high": ci["high"], "extrapolated": extrapolated(f * unit, lo, hi)}


def readings(records: list[dict], laws: dict, members: list[dict], checkpoints: list[dict]) -> dict:
    """Per variant: n_eff_frac, d_eff_frac, full-law c_eff_frac and each preset's, with intervals."""
    clean = records[0]["ce_clean"]
    main = checkpoints[-1]
    Ns, Ds = [p["N"] for p in members], [p["D"] for p in checkpoints]
    law_c = laws["full"]
    C_clean = float(law_c.frontier_compute(clean))
    Cs = [6 * p["N"] * p["D"] for p in members + checkpoints[:-1]]
    out = {}
    for rec in records[1:]:
        row = {"ce_spliced": rec["ce_spliced"], "dce": rec["dce"], "dce_ci_low": rec["dce_ci_low"],
               "dce_ci_high": rec["dce_ci_high"]}
        for key, law, lo, hi, unit in (
                ("n_eff_frac", laws["family"], min(Ns), max(Ns), main["N"]),
                ("d_eff_frac", laws["checkpoints"], min(Ds), max(Ds), main["D"]),
                ("c_eff_frac_full", law_c, min(Cs), max(Cs), C_clean)):
            r = _reading(law, clean, rec, lo, hi, unit)
            row.update({key: r["frac"], f"{key}_low": r["low"], f"{key}_high": r["high"],
                        f"{key}_extrapolated": r["extrapolated"]})
        for name in PRESETS:
            r = _reading(scaling.preset(name), clean, rec, 0, np.inf, 1.0)
            row.update({f"c_eff_frac_{name}": r["frac"], f"c_eff_frac_{name}_low": r["low"],
                        f"c_eff_frac_{name}_high": r["high"]})
        out[rec["variant"]] = row
    return out


def run(cfg: FamilyConfig, progress_factory=None, say=print) -> dict:
    """CE suite on the family's largest model with its SAEs and baselines, the family and
    checkpoints evaluated on the same tokens, the three fits, and the readings; written to
    cfg.out (built under a temporary name: the folder appears only when complete)."""
    import torch

    from harness import sources
    from harness.runfolder import command_line, machine, staging, versions, write_json
    from harness.session import prepare

    m = manifest()
    n_seq = cfg.tokens // cfg.ctx
    session = prepare(str(FAMILY_DIR / m["largest"]), cfg.saes, ctx=cfg.ctx, batch_size=cfg.batch_size,
                      calib_seqs=cfg.calib_seqs, text=sources.TextRequest(sources.BUILTIN), eval_seqs=n_seq,
                      seed=cfg.seed)
    lm, tokens = session.lm, session.tokens
    say(f"family: CE suite on {m['largest']} ({n_seq} x {cfg.ctx} tokens, {len(session.variants) - 1} variants)")
    from harness.pipeline import stage

    with stage(progress_factory, "family CE suite: sequences", len(tokens)) as progress:
        res = ce.evaluate(lm, session.variants, tokens, cfg.batch_size, session.calib_tokens, n_boot=cfg.n_boot,
                          seed=cfg.seed, progress=progress)
    say(f"family: clean loss of {len(m['members'])} members and "
        f"{len(next(x for x in m['members'] if x['name'] == m['largest'])['checkpoints'])} checkpoints")
    members, checkpoints = measure_points(lm, tokens, cfg.batch_size)
    laws = fit_all(members, checkpoints, cfg.seed)
    variants = readings(res.records, laws, members, checkpoints)
    law_n = laws["family"].to_json()
    details = {
        "family": {"points": [{k: p[k] for k in ("model", "N", "N_total", "D", "loss")} for p in members],
                   "N": "non-embedding parameters", "law": law_n,
                   "checkpoints": {"points": [{k: p[k] for k in ("model", "N", "D", "loss")} for p in checkpoints],
                                   "law": laws["checkpoints"].to_json()},
                   "full": {"law": laws["full"].to_json()},
                   "clean": {"model": m["largest"], "loss": res.records[0]["ce_clean"]},
                   "variants": variants},
        "presets": {name: scaling.preset(name).to_json() for name in PRESETS},
    }
    with staging(Path(cfg.out)) as folder:
        np.save(folder / "tokens.npy", tokens.numpy())
        write_json(folder / "metrics.json", res.records)
        write_json(folder / "compute_equivalents.json", details)
        write_json(folder / "config.json", {"run": asdict(cfg), "model": m["largest"], "versions": versions(),
                                            "command": command_line(), "machine": machine(),
                                            "threads": torch.get_num_threads(), "seconds_ce": res.seconds,
                                            "data": session.data_info, "manifest_git": m["git_commit"]})
        (folder / "equivalents.md").write_text(table(details) + "\n")
        from harness.figures import family_figure, save

        save(family_figure(details), folder, "family")
    return details


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


def table(details: dict) -> str:
    """The (a)-(d) readings per variant as Markdown, with how far each preset parts from (a)."""
    fam = details["family"]
    lines = ["| Variant | dCE [95% CI] | (a) N_eff/N family | (b) D_eff/D checkpoints | (c) C_eff/C full fit "
             "| (d) C_eff/C hoffmann | (d) C_eff/C epoch | hoffmann ÷ (a) | epoch ÷ (a) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in fam["variants"].items():
        cells = [name, f"{v['dce']:.3f} [{v['dce_ci_low']:.3f}, {v['dce_ci_high']:.3f}]"]
        for key in ("n_eff_frac", "d_eff_frac", "c_eff_frac_full", "c_eff_frac_hoffmann", "c_eff_frac_epoch"):
            flag = "‡" if v.get(f"{key}_extrapolated") else ""
            cells.append(f"{_fmt(v[key])}{flag} [{_fmt(v[key + '_low'])}, {_fmt(v[key + '_high'])}]")
        for name_p in PRESETS:
            cells.append(f"{v[f'c_eff_frac_{name_p}'] / v['n_eff_frac']:.2g}x")
        lines.append("| " + " | ".join(cells) + " |")
    law = fam["law"]
    ck = fam["checkpoints"]["law"]
    full = fam["full"]["law"]
    lines += ["", f"Fits on {len(fam['points'])} family members and {len(fam['checkpoints']['points'])} checkpoints, "
              f"each evaluated on the run's tokens (N: non-embedding parameters). (a) L(N) = {law['E']:.3f} + "
              f"{law['A']:.3g}/N^{law['alpha']:.3f}; (b) L(D) = {ck['E']:.3f} + {ck['B']:.3g}/D^{ck['beta']:.3f}; "
              f"(c) L(N, D) = {full['E']:.3f} + {full['A']:.3g}/N^{full['alpha']:.3f} + {full['B']:.3g}/D^{full['beta']:.3f}. "
              "Intervals: the fit's bootstrap over points combined with the dCE interval. ‡ the effective size, "
              "token count or compute lies outside the fitted points' range (an extrapolation). "
              "preset ÷ (a): how many times the preset's reading exceeds the family's."]
    return "\n".join(lines)
