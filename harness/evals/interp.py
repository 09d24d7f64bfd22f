"""Explainability, the other axis of an SAE's quality: can we say when each latent fires?

A latent *fires* at a position when its value is above 0 (SAE codes; the neurons:K baseline's
kept coordinates; the pca:K baseline's component coefficients, whose positive side is its
"latent"). Three judge-free measures, deterministic and seeded (an LLM judge is harness/evals/judge.py):

1. Activation records (`collect`): one pass over held-out text, every latent at once, memory
   flat in tokens: per latent and per half of the sequences (even / odd rows: the fitting and
   the scoring split), its firing count, its K strongest positions, and uniform samples of its
   firing and of its non-firing positions (bottom-R sketches over seeded random keys: the R
   smallest keys are a uniform sample without replacement, merged batch by batch). The firing
   sample gives the activation quantiles.
2. Explanation score (`explain`): an explanation is a set of at most M token n-grams (n <= 2:
   the token at the position, or it and the one before). It is chosen greedily on the fitting
   split (add the n-gram that most raises F1, stop when none does) and scored on the scoring
   split: precision = P(fires | an n-gram matches) (sufficiency), recall = P(matches | fires)
   (necessity), F1. The samples are importance-weighted by the measured firing rate, so these
   are estimates for the whole text, not for a balanced sample. Activation-weighted: recall
   counts each firing position by its activation; precision counts each match by min(1,
   activation / the median firing activation).
3. Sparse probing (`sparse_probing`, SAEBench's definition): MMLU questions labelled by
   category (STEM / humanities / social sciences / other), latents mean-pooled over each
   question, for each category a balanced one-vs-rest task; the k latents with the largest
   |mean difference| on the training half feed a logistic regression (scikit-learn, standardised
   features), accuracy on the held-out half, averaged over the four tasks. The same on the raw
   residual (all coordinates: the dense ceiling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.model.loading import LoadedModel, hook_layer
from harness.errors import UserError
from harness.splice.replacements import Replacement
from harness.splice.splicer import Splicer, flat, run_below

TOP_K = 16  # strongest positions kept per latent
SAMPLE = 32  # uniform firing / non-firing positions kept per latent and split
MAX_TERMS = 5  # n-grams per explanation
PROBE_KS = (1, 2, 5, 20)


@dataclass
class Records:
    """Per latent (rows) of one replacement, from `collect`; flat positions = seq * ctx + pos."""
    n_positions: np.ndarray  # [2] positions per split
    fires: np.ndarray  # [2, d] firing counts per split
    top_value: np.ndarray  # [d, K] strongest activations (all splits), -inf where fewer
    top_index: np.ndarray  # [d, K]
    fire_index: list  # per split [d, R] uniform firing positions (-1 where fewer)
    fire_value: list  # per split [d, R]
    quiet_index: list  # per split [d, R] uniform non-firing positions

    def live(self) -> np.ndarray:
        """Latents that fire in both splits (an explanation can be fitted and scored)."""
        return np.flatnonzero((self.fires > 0).all(0))


class _Sketch:
    """R smallest random keys per latent among positions passing a mask, with their values."""

    def __init__(self, d: int, r: int):
        self.key = torch.full((d, r), float("inf"))
        self.index = torch.full((d, r), -1, dtype=torch.long)
        self.value = torch.zeros(d, r)

    def add(self, keys: torch.Tensor, ok: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
        # keys / ok / values [n, d], index [n]
        k = torch.cat([self.key, torch.where(ok, keys, torch.inf).T], 1)
        idx = torch.cat([self.index, index[None].expand(k.shape[0], -1)], 1)
        val = torch.cat([self.value, values.T], 1)
        best = k.topk(self.key.shape[1], dim=1, largest=False)
        self.key, self.index, self.value = best.values, idx.gather(1, best.indices), val.gather(1, best.indices)
        self.index[~torch.isfinite(self.key)] = -1


def reads_one(repl: Replacement) -> str:
    """The one hook whose activation a replacement's latents are computed from."""
    if len(repl.reads) != 1:
        raise UserError(f"{repl.spec} reads {len(repl.reads)} hooks (a cross-layer transcoder): explain its "
                        "latents layer by layer is not supported")
    return repl.reads[0]


@torch.no_grad()
def collect(lm: LoadedModel, repl: Replacement, tokens: torch.Tensor, batch_size: int = 8, seed: int = 0,
            top_k: int = TOP_K, sample: int = SAMPLE) -> Records:
    """Activation records of every latent of `repl` on `tokens` [n_seq, ctx], where the splice
    would apply (no special tokens, no position 0). A transcoder's latents are computed from
    the activation it reads (the MLP's input)."""
    read = reads_one(repl)
    splicer = Splicer(lm, [read])
    point = lm.model.hook_dict[read]
    gen = torch.Generator().manual_seed(seed)
    ctx = tokens.shape[1]
    state = {}

    def grab(x, hook):
        state["x"] = flat(x).float()
        return x

    top_v = top_i = None
    fires = n_pos = None
    fire_s = quiet_s = None
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size].to(lm.device)
        mask = splicer.splice_mask(batch, None)
        with lm.model.hooks(fwd_hooks=[(point.name, grab)]):
            run_below(lm, batch, hook_layer(read) + 1)  # no need for the blocks above
        _, latents = repl(state["x"])
        if latents is None:
            raise UserError(f"{repl.spec} has no latents to explain")
        rows = torch.arange(i, i + len(batch))[:, None].expand(-1, ctx)
        flat_index = (rows * ctx + torch.arange(ctx)).to(lm.device)
        acts, index, seq = latents[mask].float().cpu(), flat_index[mask].cpu(), rows.to(lm.device)[mask].cpu()
        d = acts.shape[1]
        if top_v is None:
            top_v, top_i = torch.full((d, top_k), -torch.inf), torch.full((d, top_k), -1, dtype=torch.long)
            fires, n_pos = torch.zeros(2, d, dtype=torch.long), np.zeros(2, dtype=np.int64)
            fire_s, quiet_s = [_Sketch(d, sample) for _ in range(2)], [_Sketch(d, sample) for _ in range(2)]
        v = torch.cat([top_v, acts.T], 1)
        best = v.topk(top_k, dim=1)
        top_v = best.values
        top_i = torch.cat([top_i, index[None].expand(d, -1)], 1).gather(1, best.indices)
        keys = torch.rand(acts.shape, generator=gen)
        for s in range(2):
            part = seq % 2 == s
            on = acts[part] > 0
            fires[s] += on.sum(0)
            n_pos[s] += int(part.sum())
            fire_s[s].add(keys[part], on, index[part], acts[part])
            quiet_s[s].add(keys[part], ~on, index[part], acts[part])
    if top_v is None:
        raise UserError("no tokens to collect activation records from")
    top_i[~torch.isfinite(top_v)] = -1
    return Records(n_pos, fires.numpy(), top_v.numpy(), top_i.numpy(),
                   [f.index.numpy() for f in fire_s], [f.value.numpy() for f in fire_s],
                   [q.index.numpy() for q in quiet_s])


# ---------------------------------------------------------------- explanations

def _grams(tokens: np.ndarray, index: np.ndarray) -> list[set]:
    """The n-grams (n <= 2) ending at each flat position: {(t,), (t_prev, t)}."""
    flat_tokens = tokens.reshape(-1)
    ctx = tokens.shape[1]
    out = []
    for j in index:
        t = int(flat_tokens[j])
        grams = {(t,)}
        if j % ctx:
            grams.add((int(flat_tokens[j - 1]), t))
        out.append(grams)
    return out


def _split(rec: Records, latent: int, split: int, tokens: np.ndarray):
    """(n-gram sets, fires, activation, weight) of one split's sampled positions."""
    f_idx, f_val = rec.fire_index[split][latent], rec.fire_value[split][latent]
    q_idx = rec.quiet_index[split][latent]
    f_keep, q_keep = f_idx >= 0, q_idx >= 0
    f_idx, f_val, q_idx = f_idx[f_keep], f_val[f_keep], q_idx[q_keep]
    p = rec.fires[split, latent] / max(rec.n_positions[split], 1)
    w = np.concatenate([np.full(len(f_idx), p / max(len(f_idx), 1)),
                        np.full(len(q_idx), (1 - p) / max(len(q_idx), 1))])
    fires = np.concatenate([np.ones(len(f_idx), bool), np.zeros(len(q_idx), bool)])
    act = np.concatenate([f_val, np.zeros(len(q_idx))])
    return _grams(tokens, np.concatenate([f_idx, q_idx])), fires, act, w


def scores(matched: np.ndarray, fires: np.ndarray, act: np.ndarray, w: np.ndarray) -> dict:
    """Weighted precision / recall / F1 of a match vector, and the activation-weighted ones."""
    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    m_w = float(w[matched].sum())
    tp = float(w[matched & fires].sum())
    pos = float(w[fires].sum())
    precision = tp / m_w if m_w > 0 else 0.0
    recall = tp / pos if pos > 0 else 0.0
    med = float(np.median(act[fires])) if fires.any() else 1.0
    strength = np.minimum(1.0, act / med) if med > 0 else fires.astype(float)
    precision_w = float((w * strength)[matched].sum()) / m_w if m_w > 0 else 0.0
    a_pos = float((w * act)[fires].sum())
    recall_w = float((w * act)[matched & fires].sum()) / a_pos if a_pos > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1(precision, recall),
            "precision_w": precision_w, "recall_w": recall_w, "f1_w": f1(precision_w, recall_w)}


def fit_explanation(grams: list[set], fires: np.ndarray, act: np.ndarray, w: np.ndarray,
                    max_terms: int = MAX_TERMS) -> list[tuple]:
    """Greedy: add the n-gram (seen at a firing position) that most raises F1; stop when none does."""
    candidates = sorted({g for gs, f in zip(grams, fires) if f for g in gs})
    chosen: list[tuple] = []
    matched = np.zeros(len(grams), bool)
    best = 0.0
    has = {c: np.array([c in gs for gs in grams]) for c in candidates}
    while len(chosen) < max_terms:
        trial = [(scores(matched | has[c], fires, act, w)["f1"], c) for c in candidates if c not in chosen]
        if not trial:
            break
        f, c = max(trial, key=lambda t: (t[0], -len(t[1])))
        if f <= best + 1e-12:
            break
        chosen.append(c)
        matched |= has[c]
        best = f
    return chosen


def explain(rec: Records, latent: int, tokens: np.ndarray, max_terms: int = MAX_TERMS) -> dict:
    """Fit an explanation of one latent on split 0 and score it on split 1."""
    g0, f0, a0, w0 = _split(rec, latent, 0, tokens)
    terms = fit_explanation(g0, f0, a0, w0, max_terms)
    g1, f1, a1, w1 = _split(rec, latent, 1, tokens)
    matched = np.array([bool(gs & set(terms)) for gs in g1])
    out = scores(matched, f1, a1, w1)
    firing = rec.fire_value[1][latent][rec.fire_index[1][latent] >= 0]
    out.update({"latent": int(latent), "terms": [list(t) for t in terms],
                "firing_rate": float(rec.fires[:, latent].sum() / rec.n_positions.sum()),
                "quantiles": [float(q) for q in np.quantile(firing, [0.1, 0.5, 0.9])] if len(firing) else []})
    return out


def sample_latents(rec: Records, n: int, seed: int, spec: str) -> np.ndarray:
    live = rec.live()
    if len(live) < n:
        raise UserError(f"{spec}: {len(live)} live latents (firing in both halves of the text), {n} requested "
                        "(--latents)")
    return np.sort(np.random.default_rng(seed).choice(live, n, replace=False))


def summarise(values: list[float], seed: int, n_boot: int = 1000) -> dict:
    """Mean, median and a bootstrap interval (over latents) of the mean."""
    x = np.asarray(values, float)
    boot = x[np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))].mean(1)
    return {"mean": float(x.mean()), "median": float(np.median(x)), "low": float(np.percentile(boot, 2.5)),
            "high": float(np.percentile(boot, 97.5))}


# ---------------------------------------------------------------- sparse probing

def probe_questions(per_category: int, seed: int) -> tuple[list[str], np.ndarray, list[str]]:
    """(question texts, category labels 0-3, category names): `per_category` MMLU test questions
    per category, drawn with the seed across its subjects."""
    from harness.lmeval import mmlu

    docs = mmlu._docs_by_subject()
    names = list(mmlu.CATEGORIES)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for c, cat in enumerate(names):
        pool = [d["question"] for s in mmlu.CATEGORIES[cat] for d in docs[s]]
        for j in rng.choice(len(pool), per_category, replace=False):
            texts.append(pool[j])
            labels.append(c)
    return texts, np.array(labels), names


@torch.no_grad()
def pooled(lm: LoadedModel, repls: list[Replacement], texts: list[str], ctx: int = 128,
           batch_size: int = 16) -> dict:
    """Per replacement (and "residual" per hook: the raw activation): [n_texts, width] mean over
    each text's positions where a splice would apply."""
    tok = lm.tokenizer
    hooks = sorted({reads_one(r) for r in repls})
    splicer = Splicer(lm, hooks)
    out: dict = {}
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=ctx,
                  padding_side="right")
        ids, att = enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)
        mask = splicer.splice_mask(ids, att)
        mask[mask.sum(1) == 0, 0] = att[mask.sum(1) == 0, 0].bool()  # a one-token text: keep its token
        got = {}

        def grab(x, hook):
            got[hook.name] = flat(x).float()
            return x

        names = {h: lm.model.hook_dict[h].name for h in hooks}
        with lm.model.hooks(fwd_hooks=[(names[h], grab) for h in hooks]):
            run_below(lm, ids, max(hook_layer(h) for h in hooks) + 1, attention_mask=att)
        w = mask.float()[..., None] / mask.sum(1).clamp(min=1)[:, None, None]
        for h in hooks:
            out.setdefault(f"residual@{h}", []).append((got[names[h]] * w).sum(1).cpu())
        for r in repls:
            _, lat = r(got[names[reads_one(r)]])
            out.setdefault(r.spec, []).append((lat.float() * w).sum(1).cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def select_by_mean_difference(X: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k features with the largest |mean over y=1 - mean over y=0| (SAEBench's selection)."""
    diff = np.abs(X[y == 1].mean(0) - X[y == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def probe_accuracy(X_train, y_train, X_test, y_test, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    model.fit(X_train, y_train)
    return float((model.predict(X_test) == y_test).mean())


def binary_tasks(labels: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per category: (train rows, train y, test rows, test y) of a balanced one-vs-rest task,
    split in halves stratified by class."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        pos = np.flatnonzero(labels == c)
        neg = rng.choice(np.flatnonzero(labels != c), len(pos), replace=False)
        rows, y = np.concatenate([pos, neg]), np.r_[np.ones(len(pos), int), np.zeros(len(neg), int)]
        train = np.zeros(len(rows), bool)
        for cls in (0, 1):
            members = np.flatnonzero(y == cls)
            train[rng.permutation(members)[:len(members) // 2]] = True
        out.append((rows[train], y[train], rows[~train], y[~train]))
    return out


def sparse_probing(features: np.ndarray, labels: np.ndarray, ks=PROBE_KS, seed: int = 0) -> dict:
    """Mean held-out accuracy over the one-vs-rest tasks, for each k (and "all" features)."""
    if len(np.unique(labels)) < 2:
        raise UserError("sparse probing needs at least two classes of labels")
    tasks = binary_tasks(labels, seed)
    out = {}
    for k in [*ks, "all"]:
        accs = []
        for tr, y_tr, te, y_te in tasks:
            cols = np.arange(features.shape[1]) if k == "all" else select_by_mean_difference(features[tr], y_tr, k)
            accs.append(probe_accuracy(features[tr][:, cols], y_tr, features[te][:, cols], y_te, seed))
        out[str(k)] = float(np.mean(accs))
    return out
