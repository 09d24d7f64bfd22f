"""Massive activations: the few positions whose residual norm dwarfs every other one.

Sun, Chen, Kolter and Liu ("Massive Activations in Large Language Models", 2024) describe a
handful of activations per sequence, at the first token and a few delimiter-like tokens, that
are orders of magnitude larger than the rest (up to 100,000 times) and act as fixed biases
(attention sinks). A reconstruction metric pooled over all positions is dominated by them:
explained variance divides by the total variance around the mean, and one such position can
hold more of it than thousands of ordinary ones.

Detection here works on the norm of the whole activation vector at a hook, in the clean pass:
a position of the token set is *massive* when its norm exceeds `factor` times the median norm
over the token set (default 10). Why 10: on SmolLM2-135M at layer 15 the two massive positions
of the main job's tokens have norm ~11,600 against a median of 170 (68x), and the next largest
position is 1.6x the median, so any factor from ~3 to ~60 gives the same answer; 10 sits well
inside that gap, and Sun et al.'s activations are further apart still. (At the first few
layers, norms climb smoothly to ~12x without a gap; there the count depends on the factor.)

Plain functions over tensors; `evals/ce.py` folds the results into its records.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.model.loading import LoadedModel, hook_layer
from harness.splice.splicer import Splicer, flat, run_below

DEFAULT_FACTOR = 10.0


def median_norm(norms: torch.Tensor, in_set: torch.Tensor) -> float:
    """Median of `norms` over the positions where `in_set` is True (NaN when empty)."""
    values = norms[in_set].double().cpu().numpy()
    return float(np.median(values)) if values.size else float("nan")


def detect(norms: torch.Tensor, in_set: torch.Tensor, factor: float = DEFAULT_FACTOR) -> tuple[torch.Tensor, float]:
    """(mask, median): True at positions of `in_set` whose norm exceeds factor x the median over `in_set`."""
    if not factor > 0:
        raise ValueError(f"the massive-activation factor must be positive, got {factor}")
    median = median_norm(norms, in_set)
    if not np.isfinite(median):
        return torch.zeros_like(in_set), median
    return in_set & (norms.double() > factor * median), median


@torch.no_grad()
def hook_norms(lm: LoadedModel, hooks: list[str], tokens: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Clean activation norms [n_seq, ctx] at every hook, from forwards stopped above the last hook."""
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    last = max(hook_layer(h) for h in hooks) + 1
    canonical = {h: lm.model.hook_dict[h].name for h in hooks}  # aliases report their canonical name
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size].to(lm.device)

        def grab(x, hook):
            for h, name in canonical.items():
                if name == hook.name:
                    out[h].append(flat(x).float().norm(dim=-1).cpu())
            return x

        with lm.model.hooks(fwd_hooks=[(h, grab) for h in hooks]):
            run_below(lm, batch, last)
    return {h: torch.cat(v) for h, v in out.items()}


def find_massive(lm: LoadedModel, hooks: list[str], tokens: torch.Tensor, in_set: torch.Tensor,
                 factor: float = DEFAULT_FACTOR, batch_size: int = 8,
                 norms: dict[str, torch.Tensor] | None = None) -> dict[str, dict]:
    """Per hook: the massive mask [n_seq, ctx] over `in_set` and what it was decided on.
    `norms`: the clean norms when already measured (several processes gather theirs)."""
    found = {}
    if norms is None:
        norms = hook_norms(lm, hooks, tokens, batch_size)
    for hook, norm in norms.items():
        mask, median = detect(norm, in_set, factor)
        found[hook] = {"mask": mask, "median_norm": median, "threshold": factor * median,
                       "max_norm": float(norm[in_set].max()) if in_set.any() else float("nan")}
    return found


def summary(found: dict[str, dict], factor: float, excluded: bool) -> dict:
    """JSON-ready summary for config.json: per hook the median, threshold and (row, position) list."""
    hooks = {}
    for hook, f in found.items():
        positions = f["mask"].nonzero().tolist()
        hooks[hook] = {"count": len(positions), "median_norm": f["median_norm"], "threshold": f["threshold"],
                       "max_norm": f["max_norm"], "positions": positions}
    return {"factor": factor, "excluded": excluded, "hooks": hooks}


def massive_in_sequences(lm: LoadedModel, hooks: list[str], sequences: list[list[int]],
                         factor: float = DEFAULT_FACTOR, keep_first: bool = True) -> dict[str, dict]:
    """Massive positions in sequences of any length (task prompts), one clean forward each.

    The set is every position the splice would touch (not special, not position 0), pooled
    over all sequences for the median, as T is for the CE suite. Positions are (sequence, index)."""
    splicer = Splicer(lm, hooks, keep_first)
    norms: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    sets = []
    for seq in sequences:
        tokens = torch.tensor([list(seq)], dtype=torch.long)
        for hook, n in hook_norms(lm, hooks, tokens, 1).items():
            norms[hook].append(n[0])
        sets.append(splicer.splice_mask(tokens, None)[0].cpu())
    in_set = torch.cat(sets)
    starts = np.cumsum([0] + [len(s) for s in sequences])
    out = {}
    for hook in hooks:
        all_norms = torch.cat(norms[hook])
        mask, median = detect(all_norms, in_set, factor)
        hits = mask.nonzero()[:, 0].numpy()
        seq_of = np.searchsorted(starts, hits, side="right") - 1
        out[hook] = {"count": int(mask.sum()), "n_positions": int(in_set.sum()), "median_norm": median,
                     "max_norm": float(all_norms[in_set].max()) if in_set.any() else float("nan"),
                     "positions": [[int(s), int(i - starts[s])] for s, i in zip(seq_of, hits)]}
    return out


# -- metrics from running sums -------------------------------------------------------------
# `all_stats` and `massive_stats` map hook -> an object with sq_err, sum_x, sum_sq and n
# (ce.HookStats): sums over every position of the token set, and over its massive ones.

def _variance_about(sum_sq: float, sum_x: torch.Tensor, n: int, mean: torch.Tensor) -> float:
    """sum ||x - mean||^2 over a set of n vectors, from their sum and sum of squares."""
    return sum_sq - 2.0 * float(sum_x @ mean) + n * float(mean @ mean)


def reconstruction_split(all_stats: dict, massive_stats: dict) -> dict:
    """Share of the total variance held by the massive positions, and EV without them.

    The share is measured around the mean of the whole set (the denominator of the plain EV);
    the robust EV is the plain definition applied to the other positions alone."""
    var_all = var_massive = var_rest = sq_rest = 0.0
    for hook, s in all_stats.items():
        if s.n == 0:
            continue
        mean = s.sum_x / s.n
        var_all += _variance_about(s.sum_sq, s.sum_x, s.n, mean)
        m = massive_stats.get(hook)
        if m is None or m.n == 0:
            var_rest += _variance_about(s.sum_sq, s.sum_x, s.n, mean)
            sq_rest += s.sq_err
            continue
        var_massive += _variance_about(m.sum_sq, m.sum_x, m.n, mean)
        n_rest = s.n - m.n
        if n_rest > 0:
            sum_x_rest = s.sum_x - m.sum_x
            var_rest += _variance_about(s.sum_sq - m.sum_sq, sum_x_rest, n_rest, sum_x_rest / n_rest)
        sq_rest += s.sq_err - m.sq_err
    nan = float("nan")
    return {"massive_var_share": var_massive / var_all if var_all > 0 else nan,
            "explained_variance_robust": 1.0 - sq_rest / var_rest if var_rest > 0 else nan}


def split_mean(values: np.ndarray, in_set: np.ndarray, massive: np.ndarray) -> tuple[float, float]:
    """Mean of `values` over the massive positions of the set, and over the others (NaN when empty)."""
    on, off = in_set & massive, in_set & ~massive
    return (float(values[on].mean()) if on.any() else float("nan"),
            float(values[off].mean()) if off.any() else float("nan"))
