"""Cross-entropy suite: CE / KL / loss recovered / reconstruction metrics over a token set.

Definitions (docs/design.md, used exactly):
- token set T: predicted positions (all but the last) whose *input* token is not special;
- CE_x = mean over T of -log p(next token) for variant x; dCE = CE_spliced - CE_clean, with a
  95% paired bootstrap interval over sequences (ratio of resampled sums);
- loss recovered (zero|mean) = (CE_base - CE_spliced) / (CE_base - CE_clean), ratio of means,
  where the baseline replaces the activation at exactly the variant's hooks and positions;
- KL = mean over T of KL(p_clean || p_spliced) in nats;
- explained variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over T (pooled over
  hooks for a joint splice); L0 = mean non-zero latents per token (summed over hooks for a
  joint splice); dead = fraction of latents never active on T.

Massive activations (harness/evals/outliers.py): positions of T whose clean activation norm at a hook
exceeds a factor (default 10) of the median over T. Every record reports, for the positions
massive at any of its hooks: their count, their share of the total variance, EV without them,
and dCE / KL on them versus elsewhere. `exclude_massive=True` treats them like position 0: not
spliced and not in T (the same positions for every variant: massive at any hook of the run).

Everything streams: per batch we keep one clean log-softmax, then fold each variant into
running sums, so memory does not grow with the number of tokens.

Several processes (torchrun, harness/model/distributed.py): each takes a contiguous run of whole
batches (the one-process batch boundaries, so every batch is computed as one process would).
Afterwards every process gathers all processes' sums; float64 running sums are added in rank
order, per-sequence and per-token arrays are concatenated in rank order (= the original
order). Every process then computes the records from the same gathered data, so the
bootstrap with the same seed gives the same intervals as one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.model import distributed
from harness.model import logits
from harness.evals import outliers
from harness.model.loading import LoadedModel
from harness.errors import UserError
from harness.splice.splicer import Splicer, calibrate
from harness.model.timing import sections
from harness.splice.variants import Variant, baseline_name, baseline_variants, label, sites_of


@dataclass
class CEResult:
    """What the CE suite measured: one record per variant (clean first, then the requested
    variants, then the zero / mean references), and the per-token arrays behind them."""
    records: list[dict]  # metrics.json rows
    per_token_dce: dict[str, np.ndarray]  # "clean": [n_seq, ctx-1] nll; variant: nll - clean nll
    seconds: float
    n_tokens: int  # |T|
    start_layer: int  # first block where a variant branches off the shared clean pass
    block_cost: dict  # blocks run per batch, shared pass vs one forward per variant
    massive: dict | None = None  # outliers.summary: factor, excluded, per hook median / threshold / positions
    # "NAME.ids" / "NAME.p": the 3 most likely next tokens and their probabilities at every
    # position [n_seq, ctx-1, 3], clean and every variant (for the damage report)
    per_token_top3: dict[str, np.ndarray] | None = None
    # the layer curves' points (Variant.curve set): records of their own, kept out of `records`
    # (and of the per-token arrays) so tables, figures and the damage report show whole splices
    curves: list[dict] = field(default_factory=list)

    def by_variant(self) -> dict[str, dict]:
        return {r["variant"]: r for r in self.records + self.curves}


MASSIVE_KEYS = ["n_massive", "massive_var_share", "explained_variance_robust", "dce_massive", "dce_rest",
                "kl_massive", "kl_rest"]


@dataclass
class HookStats:
    """Running sums for reconstruction metrics at one hook of one variant."""
    sq_err: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_sq: float = 0.0
    n: int = 0
    l0_sum: float = 0.0
    ever_active: torch.Tensor | None = None

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor | None) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.sq_err += float(((x - x_hat) ** 2).sum())
        s = x.sum(0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float((x ** 2).sum())
        self.n += x.shape[0]
        if latents is not None:
            active = latents != 0
            self.l0_sum += float(active.sum())
            any_active = active.any(0).cpu()
            self.ever_active = any_active if self.ever_active is None else self.ever_active | any_active

    def merge(self, other: "HookStats") -> None:
        """Fold in another process's sums for the same hook."""
        self.sq_err += other.sq_err
        self.sum_sq += other.sum_sq
        self.n += other.n
        self.l0_sum += other.l0_sum
        if other.sum_x is not None:
            self.sum_x = other.sum_x if self.sum_x is None else self.sum_x + other.sum_x
        if other.ever_active is not None:
            self.ever_active = other.ever_active if self.ever_active is None else self.ever_active | other.ever_active

    def total_variance(self) -> float:
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2 (float64 keeps the cancellation safe)
        return self.sum_sq - float((self.sum_x ** 2).sum()) / self.n


@dataclass
class VariantSums:
    nll_seq: list = field(default_factory=list)  # per-sequence sum of -log p over T
    kl_sum: float = 0.0
    kl_seq: list = field(default_factory=list)  # per-sequence sum of KL over T
    hooks: dict = field(default_factory=dict)  # hook -> HookStats
    per_token: list = field(default_factory=list)  # [B, ctx-1] nll, NaN outside T
    massive: dict = field(default_factory=dict)  # hook -> HookStats over its massive positions only
    kl_massive: float = 0.0  # KL summed over positions massive at any of the variant's hooks
    top_ids: list = field(default_factory=list)  # [B, ctx-1, 3] the 3 most likely next tokens
    top_p: list = field(default_factory=list)  # [B, ctx-1, 3] their probabilities

    def merge(self, other: "VariantSums") -> None:
        """Append another process's rows (they come after ours) and add its sums."""
        for name in ("nll_seq", "kl_seq", "per_token", "top_ids", "top_p"):
            getattr(self, name).extend(getattr(other, name))
        self.kl_sum += other.kl_sum
        self.kl_massive += other.kl_massive
        for mine, theirs in ((self.hooks, other.hooks), (self.massive, other.massive)):
            for hook, stats in theirs.items():
                mine.setdefault(hook, HookStats()).merge(stats)


def token_set(tokens: torch.Tensor, splicer: Splicer) -> torch.Tensor:
    """[B, ctx-1] bool: predicted positions whose input token is not special."""
    return splicer.ordinary(tokens)[:, :-1]


def evaluate(lm: LoadedModel, variants: list[Variant], tokens: torch.Tensor, batch_size: int = 8,
             calib_tokens: torch.Tensor | None = None, n_boot: int = 1000, seed: int = 0,
             progress=None, keep_first: bool = True, massive_factor: float | None = outliers.DEFAULT_FACTOR,
             exclude_massive: bool = False, checkpoint=None, checkpoint_every: int = 4,
             tail_tokens: int | None = None, logits_budget: int | None = None, profile=None,
             constant_tails: bool = True) -> CEResult:
    """Evaluate every variant on `tokens` [n_seq, ctx] in one pass.

    The zero / mean references are fitted on `calib_tokens` (through the model's activation
    cache, so a session's calibration batch is collected once). `massive_factor` None skips
    the detection of massive activations (no extra clean pass); `exclude_massive` leaves the
    detected positions unspliced and out of T. With a `checkpoint` (an object with save(state) /
    load(), see runfolder.Checkpoint) the running sums are saved every `checkpoint_every`
    batches and at the end, and a saved state is continued from: the sums are folded in the
    same order either way, so a resumed run ends bit-identical. Variants branching at the same
    layer share one forward per batch, as many as `tail_tokens` token positions allow (None:
    `splice.TAIL_TOKENS`; see `Splicer.tails_per_forward`). The tails stop at the head and the
    logits are made and read a chunk of positions at a time within `logits_budget` bytes
    (harness/model/logits.py), so memory does not grow with batch x context x vocabulary (None: the
    device's default, `logits.default_budget`). `profile` (timing.Sections) records the time
    and peak memory of each part of the suite (the bench prints them). With `constant_tails`, a
    zero / mean ablation of a `resid_post` spliced at every position (keep_first=False, no
    special tokens) runs its tail and head on one position (`Splicer.constant_tail`)."""
    section = sections(profile)
    names = [v.name for v in variants]
    all_variants = [v for v in variants if v.parts]
    all_variants += [e for e in baseline_variants(variants) if e.name not in names]
    refs = {v.name: (baseline_name("zero", v.hooks), baseline_name("mean", v.hooks)) for v in all_variants}
    hooks = sorted({h for v in all_variants for h in v.hooks})  # the sites replaced
    splicer = Splicer(lm, sites_of(all_variants), keep_first, tail_tokens)

    with section("calibration (mean / PCA)"):
        calibrate(lm, [r for v in all_variants for r in v.parts.values()], calib_tokens, batch_size)
    noisy = list({id(r): r for v in all_variants for r in v.parts.values() if r.kind in NOISE_KINDS}.values())
    lo, hi = distributed.share(len(tokens), batch_size)  # this process's sequences (all of them alone)
    with section("massive-activation detection"):
        massive, dropped = _find_massive(lm, hooks, tokens, splicer, massive_factor, exclude_massive, batch_size,
                                         (lo, hi))
    union = {v.name: _union(massive, v.hooks, tokens) for v in all_variants}

    sums = {v.name: VariantSums() for v in all_variants}
    clean = VariantSums()
    start = lo
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        if sorted(saved["sums"]) != sorted(sums) or saved["batch_size"] != batch_size:
            raise UserError("the CE checkpoint was written for other variants or another batch size")
        start, clean, sums = saved["next"], saved["clean"], saved["sums"]
    report = _progress_reporter(progress, lo, hi, len(tokens))
    split = splicer.splits_head  # tails stop at the head; logits.chunked_stats runs it in chunks
    head = splicer.head if split else (lambda z: z)
    vocab = int(lm.model.cfg.d_vocab)
    logits_budget = logits_budget or logits.default_budget(lm.device)
    logits.positions_per_chunk(vocab, logits_budget)  # a budget below one position: refused up front
    if saved is not None:
        report(min(start, hi))
    t0 = time.perf_counter()
    for i in range(start, hi, batch_size):
        batch = tokens[i:min(i + batch_size, hi)].to(lm.device)
        drop = dropped[i:i + len(batch)].to(lm.device)
        in_t = token_set(batch, splicer) & ~drop[:, :-1]
        # Reconstruction statistics over T, where the splice applies (never position 0).
        stat_mask = torch.zeros_like(batch, dtype=torch.bool)
        stat_mask[:, :-1] = in_t
        stat_mask &= splicer.splice_mask(batch, None)
        targets = batch[:, 1:]

        def on_act(v, hook, x, x_hat, latents):
            stats = sums[v.name].hooks.setdefault(hook, HookStats())
            stats.add(x[stat_mask], x_hat[stat_mask], None if latents is None else latents[stat_mask])
            on_massive = stat_mask & massive[hook]["mask"][i:i + batch_size].to(stat_mask.device)
            if on_massive.any():
                sums[v.name].massive.setdefault(hook, HookStats()).add(x[on_massive], x_hat[on_massive], None)

        for r in noisy:  # the noise of these rows depends on the rows, not on what ran before
            r.reseed(i)
        with section("forward: clean prefix and tails (SAEs included)"):
            outs = list(splicer.run_variants(batch, all_variants, on_act=on_act, exclude=drop, hidden=split,
                                             constant_tails=constant_tails))
        clean_stats, variant_stats = logits.chunked_stats(head, outs[0][1], [h for _, h in outs[1:]], targets,
                                                          logits_budget, vocab, profile)
        order = [v for v, _ in outs[1:]]  # run_variants' order: clean first, then by branch layer
        del outs
        with section("per-token records and running sums"):
            _fold(clean, clean_stats, in_t)
            for v, st in zip(order, variant_stats):
                on_massive = union[v.name][i:i + batch_size, :-1].to(in_t.device) & in_t
                _fold(sums[v.name], st, in_t, on_massive)
        done = (i - lo) // batch_size + 1
        if checkpoint is not None and (done % checkpoint_every == 0 or i + batch_size >= hi):
            with section("resume checkpoint"):
                checkpoint.save({"next": i + batch_size, "batch_size": batch_size, "clean": clean, "sums": sums})
        report(min(i + batch_size, hi))
    seconds = time.perf_counter() - t0
    with section("records, bootstrap intervals, top-3 arrays"):
        if distributed.world_size() > 1:
            clean, sums = _gather_sums(clean, sums)

        in_t_all = token_set(tokens, splicer) & ~dropped[:, :-1]
        counts = in_t_all.sum(1).numpy().astype(np.int64)
        if counts.sum() == 0:
            raise UserError("the token set is empty: every input token is special")
        nll_clean = np.concatenate(clean.nll_seq)
        ce = {"clean": nll_clean.sum() / counts.sum()}
        for name, s in sums.items():
            ce[name] = np.concatenate(s.nll_seq).sum() / counts.sum()
        for name, value in ce.items():
            if not np.isfinite(value):
                raise UserError(f"cross-entropy of {name} is not finite (NaN in model or SAE output)")

        rng = np.random.default_rng(seed)
        boot_idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
        per_token = {"clean": torch.cat(clean.per_token).numpy()}
        for name, s in sums.items():
            per_token[name] = torch.cat(s.per_token).numpy() - per_token["clean"]
        records = [_record("clean", None, ce, refs, counts, nll_clean, nll_clean, boot_idx, clean)]
        records[0].update({k: float("nan") for k in MASSIVE_KEYS})
        for v in all_variants:
            records.append(_record(v.name, v, ce, refs, counts, nll_clean,
                                   np.concatenate(sums[v.name].nll_seq), boot_idx, sums[v.name]))
            records[-1].update(_massive_fields(sums[v.name], per_token[v.name], in_t_all.numpy(),
                                               union[v.name][:, :-1].numpy(), massive_factor is not None))
        _add_noise_ratios(records, all_variants, counts, nll_clean, sums, boot_idx)
        top3 = {}
        for name, s in [("clean", clean), *sums.items()]:
            top3[f"{name}.ids"] = torch.cat(s.top_ids).numpy()
            top3[f"{name}.p"] = torch.cat(s.top_p).numpy()
        curve_of = {v.name: v.curve for v in all_variants}
        for rec in records:
            rec.update(top1_agreement(top3, rec["variant"], tokens[:, 1:].numpy(), in_t_all.numpy(), boot_idx))
            rec["curve"] = curve_of.get(rec["variant"])
        curves = [r for r in records if r["curve"]]
        records = [r for r in records if not r["curve"]]
        for r in curves:
            for arrays, keys in ((per_token, [r["variant"]]), (top3, [f"{r['variant']}.ids", f"{r['variant']}.p"])):
                for key in keys:
                    arrays.pop(key, None)
    return CEResult(records, per_token, seconds, int(counts.sum()), splicer.start_layer,
                    splicer.block_cost(all_variants),
                    None if massive_factor is None else outliers.summary(massive, massive_factor, exclude_massive),
                    top3, curves)


HARD_P = 0.8  # Anthropic's hard subset: clean top-1 correct with probability below this


def top1_agreement(top3: dict, name: str, targets: np.ndarray, in_t: np.ndarray, boot_idx: np.ndarray) -> dict:
    """How often the spliced model's most likely next token is the clean model's, over T and on
    the hard subset (positions of T where the clean top-1 is the actual next token with
    probability below HARD_P, as Anthropic's "Circuit Tracing" (2025) scores replacement models),
    each with a paired bootstrap interval over sequences (ratio of resampled sums)."""
    clean, spliced = top3["clean.ids"][..., 0], top3[f"{name}.ids"][..., 0]
    agree = (clean == spliced) & in_t
    hard = in_t & (clean == targets) & (top3["clean.p"][..., 0] < HARD_P)
    out = {"n_hard": int(hard.sum())}
    for key, subset in (("top1_agreement", in_t), ("top1_agreement_hard", hard)):
        hits, n = (agree & subset).sum(1).astype(np.float64), subset.sum(1).astype(np.float64)
        if n.sum() == 0:
            out.update({key: float("nan"), f"{key}_low": float("nan"), f"{key}_high": float("nan")})
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            boot = hits[boot_idx].sum(1) / n[boot_idx].sum(1)
        out.update({key: float(hits.sum() / n.sum()), f"{key}_low": float(np.nanpercentile(boot, 2.5)),
                    f"{key}_high": float(np.nanpercentile(boot, 97.5))})
    return out


NOISE_KINDS = ("noise", "noise-dir")
# record key prefix of each noise twin's ratios: dce_over_noise, kl_over_noise_dir_low, ...
RATIO_KEYS = {"noise": "over_noise", "noise-dir": "over_noise_dir"}


def noise_twin(v: Variant, kind: str) -> str:
    """The name of `kind`@ each part of v: `noise@A`, `noise@A+noise@B` for a joint A+B."""
    return "+".join(f"{kind}@{label(r)}" for r in v.parts.values())


def _add_noise_ratios(records, variants, counts, nll_clean, sums, boot_idx) -> None:
    """dCE(S) / dCE(noise@S) and KL(S) / KL(noise@S) for every S whose noise twin ran (and the
    same for noise-dir@S), each with a paired bootstrap interval: the same resampled sequences
    in numerator and denominator, each replicate a ratio of resampled sums."""
    by_name = {r["variant"]: r for r in records}
    names = {v.name for v in variants}
    for v in variants:
        if any(r.inner is not None for r in v.parts.values()):
            continue
        for kind, key in RATIO_KEYS.items():
            twin = noise_twin(v, kind)
            if twin not in names:
                continue
            rec = by_name[v.name]
            d_s = np.concatenate(sums[v.name].nll_seq) - nll_clean
            d_n = np.concatenate(sums[twin].nll_seq) - nll_clean
            k_s, k_n = np.concatenate(sums[v.name].kl_seq), np.concatenate(sums[twin].kl_seq)
            for metric, num, den in (("dce", d_s, d_n), ("kl", k_s, k_n)):
                with np.errstate(divide="ignore", invalid="ignore"):
                    boot = num[boot_idx].sum(1) / den[boot_idx].sum(1)
                    value = num.sum() / den.sum()
                rec[f"{metric}_{key}"] = float(value)
                rec[f"{metric}_{key}_low"] = float(np.nanpercentile(boot, 2.5))
                rec[f"{metric}_{key}_high"] = float(np.nanpercentile(boot, 97.5))
            rec[f"{key}_variant"] = twin


def _progress_reporter(progress, lo: int, hi: int, n: int):
    """progress(done) over all sequences for one process; with several, progress(done, total)
    over this process's share (the bar of rank 0 stands for every process)."""
    if progress is None:
        return lambda done: None
    if (lo, hi) == (0, n):
        return progress
    return lambda done: progress(done - lo, hi - lo)


def _gather_sums(clean: VariantSums, sums: dict[str, VariantSums]):
    """Every process's sums, combined in rank order, on every process (see module doc)."""
    parts = distributed.all_gather_objects((clean, sums))
    clean, sums = VariantSums(), {name: VariantSums() for name in sums}
    for part_clean, part_sums in parts:
        clean.merge(part_clean)
        for name, s in part_sums.items():
            sums[name].merge(s)
    return clean, sums


def _find_massive(lm, hooks, tokens, splicer, factor, exclude, batch_size, rows=None):
    """Massive positions per hook (clean pass, over T where the splice applies), and the
    positions to drop from T and from every splice: their union over hooks, if excluded.
    `rows` (lo, hi): the sequences this process's clean pass covers; the norms of all of
    them are gathered before the median is taken."""
    none = torch.zeros_like(tokens, dtype=torch.bool)
    if factor is None or not hooks:
        if exclude:
            raise UserError("excluding massive activations needs their detection (a factor and a hook)")
        return {h: {"mask": none} for h in hooks}, none
    in_set = torch.zeros_like(none)
    in_set[:, :-1] = token_set(tokens, splicer)
    in_set &= splicer.splice_mask(tokens, None)
    norms = None
    if rows is not None and rows != (0, len(tokens)):
        lo, hi = rows
        mine = outliers.hook_norms(lm, hooks, tokens[lo:hi], batch_size) if hi > lo else \
            {h: torch.zeros(0, tokens.shape[1]) for h in hooks}
        norms = {h: distributed.gather_rows(mine[h]) for h in hooks}
    try:
        found = outliers.find_massive(lm, hooks, tokens, in_set, factor, batch_size, norms=norms)
    except ValueError as e:
        raise UserError(str(e)) from None
    return found, (_union(found, hooks, tokens) if exclude else none)


def _union(massive: dict, hooks: list[str], tokens: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for h in hooks:
        out |= massive[h]["mask"]
    return out


def _massive_fields(sums: VariantSums, dce_tok: np.ndarray, in_t: np.ndarray, on_massive: np.ndarray,
                    detected: bool) -> dict:
    """Count, variance share, EV without them, dCE / KL on massive positions vs elsewhere."""
    n_m = int((on_massive & in_t).sum())
    n_rest = int(in_t.sum()) - n_m
    split = outliers.reconstruction_split(sums.hooks, sums.massive) if sums.hooks else {}
    dce_m, dce_rest = outliers.split_mean(dce_tok, in_t, on_massive)
    nan = float("nan")
    return {"n_massive": int(on_massive.sum()) if detected else nan,
            "massive_var_share": split.get("massive_var_share", nan) if detected else nan,
            "explained_variance_robust": split.get("explained_variance_robust", nan) if detected else nan,
            "dce_massive": dce_m, "dce_rest": dce_rest,
            "kl_massive": sums.kl_massive / n_m if n_m else nan,
            "kl_rest": (sums.kl_sum - sums.kl_massive) / n_rest if n_rest else nan}


def _fold(acc: VariantSums, st: logits.Stats, in_t, on_massive=None) -> None:
    """Fold one batch's per-position stats (logits.Stats) into the running sums over T."""
    nll = torch.where(in_t, st.nll, torch.zeros_like(st.nll))
    acc.nll_seq.append(nll.double().sum(1).cpu().numpy())
    acc.per_token.append(torch.where(in_t, st.nll, torch.full_like(st.nll, float("nan"))).cpu())
    acc.top_ids.append(st.top_ids.cpu())  # for the damage report's most damaged positions
    acc.top_p.append(st.top_p.float().cpu())
    if st.kl is not None:
        acc.kl_sum += float(st.kl[in_t].double().sum())
        acc.kl_seq.append(torch.where(in_t, st.kl, torch.zeros_like(st.kl)).double().sum(1).cpu().numpy())
        if on_massive is not None and on_massive.any():
            acc.kl_massive += float(st.kl[on_massive].double().sum())


def _record(name, variant, ce, refs, counts, nll_clean, nll_var, boot_idx, sums: VariantSums) -> dict:
    n = counts.sum()
    ce_clean, ce_var = ce["clean"], ce[name]
    zero_name, mean_name = refs.get(name, (None, None))
    ce_zero = ce.get(zero_name, float("nan"))
    ce_mean = ce.get(mean_name, float("nan"))
    # Paired bootstrap over sequences: the same resampled sequences for clean and spliced.
    diff = nll_var - nll_clean
    boot = diff[boot_idx].sum(1) / counts[boot_idx].sum(1)
    ev, l0, dead = _reconstruction(sums.hooks, variant)
    return {
        "variant": name,
        "saes": [r.spec for r in variant.parts.values()] if variant else [],
        "hooks": variant.hooks if variant else [],
        "ce_clean": float(ce_clean), "ce_spliced": float(ce_var),
        "ce_zero": float(ce_zero), "ce_mean": float(ce_mean),
        "dce": float(ce_var - ce_clean),
        "dce_ci_low": float(np.percentile(boot, 2.5)), "dce_ci_high": float(np.percentile(boot, 97.5)),
        "loss_recovered_zero": _ratio(ce_zero - ce_var, ce_zero - ce_clean),
        "loss_recovered_mean": _ratio(ce_mean - ce_var, ce_mean - ce_clean),
        "kl": float(sums.kl_sum / n) if variant else 0.0,
        "explained_variance": ev, "l0": l0, "dead_frac": dead,
        "n_tokens": int(n),
    }


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b != 0 else float("nan")


def _reconstruction(hooks: dict, variant: Variant | None) -> tuple[float, float, float]:
    if not hooks:
        return float("nan"), float("nan"), float("nan")
    sq = sum(s.sq_err for s in hooks.values())
    var = sum(s.total_variance() for s in hooks.values())
    ev = 1.0 - sq / var if var > 0 else float("nan")
    with_latents = [s for s in hooks.values() if s.ever_active is not None]
    if not with_latents:
        return float(ev), float("nan"), float("nan")
    l0 = sum(s.l0_sum / s.n for s in with_latents)
    dead = sum(int((~s.ever_active).sum()) for s in with_latents) / sum(s.ever_active.numel() for s in with_latents)
    return float(ev), float(l0), float(dead)
