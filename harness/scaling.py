"""Scaling laws: turn a loss increase (from splicing an SAE into a model) into compute.

A sparse autoencoder spliced into a model raises its cross-entropy.  "How bad is that?"
is easier to read as "the spliced model is as good as one trained with f times the
compute".  Three routes (docs/design.md, "Compute-equivalents"):

1. a full law L(N, D) = E + A/N^alpha + B/D^beta (fitted, or a literature preset) read
   along its compute-optimal frontier: `compute_fraction`, `compute_fraction_over_E`;
2. a family of models trained on the same tokens, L(N) = E + A/N^alpha: `n_eff_fraction`;
3. annealed runs of one size at several budgets, L(D) = E + B/D^beta: `d_eff_fraction`.

Every inversion returns a dict with an ``assumptions`` string, because each number is only
as good as the law it is read from.  Fitting follows Hoffmann et al. 2022 (Huber loss on
log loss, L-BFGS from a grid of starts, bootstrap over points for intervals), for the hundreds
of low-noise points of `sae-harness fit-law`; a handful of noisy runs (the family, reference
models) are fitted by least squares with profile-likelihood intervals in harness/lawfit.py.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

PF_DAY = 1e15 * 86400.0  # FLOP in one petaflop/s-day (Kaplan et al.'s compute unit)
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, on log loss
PARAMS = ("E", "A", "B", "alpha", "beta")


# --------------------------------------------------------------------------- laws

@dataclass
class Law:
    """L(N, D) = E + A/N^alpha + B/D^beta in nats/token, with C = 6 N D.

    ``interval`` holds bootstrap bounds keyed like the JSON ("E_low", "E_high", ...);
    ``samples`` holds the bootstrap parameter draws (columns E, A, B, alpha, beta) so that
    an inversion's interval can be propagated through the fit, not just reported beside it.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = ""
    interval: dict = field(default_factory=dict)
    samples: np.ndarray | None = field(default=None, repr=False)
    info: dict = field(default_factory=dict, repr=False)

    def loss(self, N, D):
        N, D = np.asarray(N, float), np.asarray(D, float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def gamma(self) -> float:
        """Exponent of the frontier: L*(C) - E is proportional to C^-gamma."""
        return self.alpha * self.beta / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def K(self) -> float:
        """L*(C) - E = K (C/6)^-gamma; K = A G^-alpha + B G^beta."""
        return self.A * self.G ** (-self.alpha) + self.B * self.G**self.beta

    def optimal_allocation(self, C):
        """(N_opt, D_opt) minimising the loss at C = 6 N D (closed form)."""
        c6 = np.asarray(C, float) / 6.0
        N = self.G * c6 ** (self.beta / (self.alpha + self.beta))
        return N, c6 / N

    def frontier_loss(self, C):
        """Loss of the compute-optimal model at training compute C (FLOP)."""
        return self.E + self.K * (np.asarray(C, float) / 6.0) ** (-self.gamma)

    def frontier_compute(self, L):
        """Inverse of `frontier_loss`: compute at which the frontier reaches loss L (> E)."""
        L = np.asarray(L, float)
        return 6.0 * ((L - self.E) / self.K) ** (-1.0 / self.gamma)

    def with_params(self, **kw) -> "Law":
        """A copy with some parameters changed and the fit's intervals/samples dropped."""
        return dataclasses.replace(self, interval={}, samples=None, info={}, **kw)

    def to_json(self) -> dict:
        out = {"name": self.name}
        for p in PARAMS:
            out[p] = float(getattr(self, p))
            out[p + "_low"] = self.interval.get(p + "_low")
            out[p + "_high"] = self.interval.get(p + "_high")
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Law":
        interval = {k: d[k] for p in PARAMS for k in (p + "_low", p + "_high")
                    if d.get(k) is not None}
        return cls(**{p: float(d[p]) for p in PARAMS}, name=d.get("name", ""), interval=interval)


@dataclass
class Curve:
    """One-variable law L(x) = E + A/x^alpha, x = N (a model family at fixed tokens) or
    x = D (one model's checkpoints at fixed size; there A and alpha play the roles of B
    and beta, and the JSON uses those names)."""

    E: float
    A: float
    alpha: float
    var: str = "N"
    name: str = ""
    interval: dict = field(default_factory=dict)
    samples: np.ndarray | None = field(default=None, repr=False)  # columns E, A, alpha
    info: dict = field(default_factory=dict, repr=False)

    def loss(self, x):
        return self.E + self.A / np.asarray(x, float) ** self.alpha

    def _names(self):
        return ("E", "A", "alpha") if self.var == "N" else ("E", "B", "beta")

    def to_json(self) -> dict:
        out = {"name": self.name, "var": self.var}
        for mine, shown in zip(("E", "A", "alpha"), self._names()):
            out[shown] = float(getattr(self, mine))
            out[shown + "_low"] = self.interval.get(mine + "_low")
            out[shown + "_high"] = self.interval.get(mine + "_high")
        return out

    @classmethod
    def from_json(cls, d: dict) -> "Curve":
        c = cls(E=0.0, A=0.0, alpha=0.0, var=d.get("var", "N"), name=d.get("name", ""))
        for mine, shown in zip(("E", "A", "alpha"), c._names()):
            setattr(c, mine, float(d[shown]))
            for end in ("_low", "_high"):
                if d.get(shown + end) is not None:
                    c.interval[mine + end] = d[shown + end]
        return c


@dataclass
class KaplanLaw:
    """Kaplan et al. 2020: L(C) = (C_c/C)^alpha_C along the compute-efficient frontier.

    No irreducible term, so every nat of loss counts as reducible; the inversion is
    f = (L_spliced/L_clean)^(-1/alpha_C).  C_c is in FLOP (3.1e8 PF-days)."""

    C_c: float = 3.1e8 * PF_DAY
    alpha_C: float = 0.050
    name: str = "kaplan"

    def frontier_loss(self, C):
        return (self.C_c / np.asarray(C, float)) ** self.alpha_C

    def frontier_compute(self, L):
        return self.C_c * np.asarray(L, float) ** (-1.0 / self.alpha_C)

    def to_json(self) -> dict:
        return {"name": self.name, "C_c_flop": self.C_c, "alpha_C": self.alpha_C}


PRESETS = {
    "hoffmann": Law(1.69, 406.4, 410.7, 0.34, 0.28, name="hoffmann"),
    "hoffmann-exact": Law(1.693374, 406.401, 410.723, 0.33917084, 0.2849083,
                          name="hoffmann-exact"),
    "epoch": Law(1.81686, 482.00572, 2085.43420, 0.34781, 0.36585, name="epoch"),
    "kaplan": KaplanLaw(),
}


# The runs each preset was fitted on (Hoffmann et al. 2022: 70M-16B parameters, 5B-500B tokens;
# Epoch's replication refits the same runs): a reading outside them is an extrapolation.
FITTED_RANGE = {name: {"N": (7e7, 1.6e10), "D": (5e9, 5e11)} for name in ("hoffmann", "hoffmann-exact", "epoch")}


def outside(x: float, lo: float, hi: float) -> bool:
    """Whether x lies outside [lo, hi] (0.1% slack: a fitted point itself sits at an end)."""
    return bool(x < lo * 0.999 or x > hi * 1.001)


def preset(name: str):
    """A literature law by name (see PRESETS); a fresh copy so callers can't mutate ours."""
    if name not in PRESETS:
        raise ValueError(f"unknown scaling-law preset {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


# --------------------------------------------------------------------------- fitting

def _huber_objective(theta, X, y, delta=HUBER_DELTA):
    """Sum of Huber(LSE(c_j - p_j X_j, e) - y) and its gradient.

    theta = (c_1..c_k, p_1..p_k, e) with X = log of the k variables and y = log loss; in
    Hoffmann's notation c = (a, b), p = (alpha, beta).  The gradient is analytic: d LSE/dz
    is the softmax of the terms, and Huber' is the residual clipped to [-delta, delta]."""
    k = X.shape[1]
    z = np.empty((X.shape[0], k + 1))
    np.subtract(theta[:k], X * theta[k:2 * k], out=z[:, :k])
    z[:, k] = theta[2 * k]
    m = z.max(axis=1)
    w = np.exp(z - m[:, None])
    s = w.sum(axis=1)
    r = m + np.log(s) - y
    c = np.clip(r, -delta, delta)
    # Huber in one expression: 0.5 r^2 inside [-delta, delta], delta (|r| - delta/2) outside.
    f = (0.5 * c * c + delta * (np.abs(r) - np.abs(c))).sum()
    gw = w * (c / s)[:, None]  # Huber'(r) * softmax weight, per point and term
    g = gw.sum(axis=0)
    return f, np.concatenate([g[:k], -np.einsum("ij,ij->j", gw[:, :k], X), g[k:]])


def _minimise(X, y, start):
    # Tight tolerances: the objective is ~1e-3 and flat along the A-alpha and B-beta
    # valleys, so scipy's default ftol stops early, which would leave bootstrap refits
    # (started at the optimum) where they began and make the intervals far too narrow.
    return minimize(_huber_objective, np.asarray(start, float), args=(X, y), jac=True,
                    method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-12})


def _starts(k: int, grid: str):
    """Hoffmann's grid of starts: exponents in {0, .5, .., 2}, e in {-1, -.5, .., 1},
    coefficients (log A, log B) in {0, 5, .., 25}.  grid="thin" (the default) keeps every
    other value on each axis of the two-variable grid (3^5 = 243 starts instead of 4500) so a
    fit takes about two seconds on two cores instead of ~35 s; on the Chinchilla points it
    lands on the same optimum as the full grid (A, B agree to ~1e-7 relative).  One-variable fits always use
    the full grid (6*5*5 = 150 starts)."""
    coefs, exps, es = np.arange(0, 30, 5.0), np.arange(0, 2.5, 0.5), np.arange(-1, 1.5, 0.5)
    if grid == "thin" and k > 1:
        coefs, exps, es = coefs[::2], exps[::2], es[::2]
    elif grid not in ("thin", "full"):
        raise ValueError(f"grid must be 'thin' or 'full', got {grid!r}")
    for combo in itertools.product(*([coefs] * k + [exps] * k + [es])):
        yield np.array(combo)


def _check_inputs(xs: dict, loss, n_params: int):
    """Validate and return (log x columns, log loss); one-line ValueErrors on bad input."""
    loss = np.asarray(loss, float).ravel()
    cols = []
    for name, x in xs.items():
        x = np.asarray(x, float).ravel()
        if x.shape != loss.shape:
            raise ValueError(f"{name} has {x.size} values but loss has {loss.size}")
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise ValueError(f"{name} must be finite and positive (got min {np.nanmin(x):g})")
        cols.append(np.log(x))
    if not np.all(np.isfinite(loss)) or np.any(loss <= 0):
        raise ValueError("loss must be finite and positive for every point")
    if loss.size < n_params + 1:
        raise ValueError(f"need at least {n_params + 1} points to fit {n_params} parameters, "
                         f"got {loss.size}")
    return np.stack(cols, axis=1), np.log(loss)


def _one_blas_thread():
    """L-BFGS-B calls BLAS on 5x5 problems; a multi-threaded BLAS on a busy machine makes
    each step ~50x slower (measured: 4 ms instead of 70 us), so pin it to one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fit(X, y, n_boot, seed, grid):
    """Best-of-grid fit, then bootstrap refits started from the best point.

    Starting each bootstrap fit at the full-data optimum (rather than re-running the grid)
    makes the bootstrap cheap; it assumes resampling moves the optimum within its basin.
    Returns (theta_best, objective, bootstrap thetas)."""
    with _one_blas_thread():
        best = min((_minimise(X, y, s) for s in _starts(X.shape[1], grid)),
                   key=lambda r: r.fun)
        rng = np.random.default_rng(seed)
        boots = []
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            boots.append(_minimise(X[i], y[i], best.x).x)
    return best.x, float(best.fun), np.array(boots).reshape(n_boot, best.x.size)


def _interval(names, samples):
    if len(samples) == 0:
        return {}
    lo, hi = np.percentile(samples, [2.5, 97.5], axis=0)
    return {**{n + "_low": float(v) for n, v in zip(names, lo)},
            **{n + "_high": float(v) for n, v in zip(names, hi)}}


def fit_law(N, D, loss, n_boot: int = 200, seed: int = 0, grid: str = "thin",
            name: str = "fit") -> Law:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta the way Hoffmann et al. 2022 did.

    Minimises sum_i Huber_1e-3(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) with
    L-BFGS from a grid of starts (see `_starts`), keeps the best, and bootstraps over points
    (percentile 2.5/97.5) for the intervals.  Working in log space with an LSE keeps A, B, E
    positive and the fit insensitive to the loss scale; the Huber loss limits the pull of
    outlying runs."""
    X, y = _check_inputs({"N": N, "D": D}, loss, 5)
    theta, fun, boots = _fit(X, y, n_boot, seed, grid)

    def params(t):  # theta = (a, b, alpha, beta, e) -> (E, A, B, alpha, beta)
        return np.array([np.exp(t[4]), np.exp(t[0]), np.exp(t[1]), t[2], t[3]])

    samples = np.array([params(t) for t in boots]).reshape(n_boot, 5)
    return Law(*map(float, params(theta)), name=name, interval=_interval(PARAMS, samples),
               samples=samples, info={"objective": fun, "n_points": len(y), "n_boot": n_boot})


# --------------------------------------------------------------------------- inversions

def _check_losses(L_clean, L_spliced, E):
    for label, L in (("clean", L_clean), ("spliced", L_spliced)):
        if not np.isfinite(L):
            raise ValueError(f"{label} loss is not finite ({L})")
        if L <= E:
            raise ValueError(f"{label} loss {L:.4f} is at or below the law's irreducible loss "
                             f"E={E:.4f}; the law cannot place it (E is corpus- and "
                             f"tokenizer-specific: try another E or a law fitted on your data)")


def compute_fraction(law, L_clean: float, L_spliced: float) -> dict:
    """Compute-equivalent fraction along the compute-optimal frontier.

    For a `Law`: f = ((L_spliced - E)/(L_clean - E))^(-1/gamma); for a `KaplanLaw`:
    f = (L_spliced/L_clean)^(-1/alpha_C).  f < 1 when splicing raises the loss; a zero
    increase gives exactly 1."""
    L_clean, L_spliced = float(L_clean), float(L_spliced)
    if isinstance(law, KaplanLaw):
        _check_losses(L_clean, L_spliced, 0.0)
        f = (L_spliced / L_clean) ** (-1.0 / law.alpha_C)
        assumptions = (
            f"Kaplan et al. 2020 compute-efficient frontier L(C) = (C_c/C)^{law.alpha_C}: no "
            "irreducible loss, so every nat counts as reducible and the fraction depends only on "
            "the ratio L_spliced/L_clean. Fitted on WebText2 with the GPT-2 tokenizer; absolute "
            "losses on other corpora or tokenizers do not sit on this curve, and with no E the "
            "fraction is usually far less severe than under a law with an irreducible term.")
        return {"method": "kaplan", "law": law.name, "fraction": f, "L_clean": L_clean,
                "L_spliced": L_spliced, "delta_loss": L_spliced - L_clean,
                "alpha_C": law.alpha_C, "assumptions": assumptions}
    _check_losses(L_clean, L_spliced, law.E)
    f = ((L_spliced - law.E) / (L_clean - law.E)) ** (-1.0 / law.gamma)
    assumptions = (
        f"Both models are read off the compute-optimal frontier of L(N,D) = E + A/N^alpha + "
        f"B/D^beta ({law.name or 'unnamed law'}: E={law.E:.4g}, alpha={law.alpha:.4g}, "
        f"beta={law.beta:.4g}), where L - E falls as C^-gamma with gamma={law.gamma:.4g}. "
        "Only the reducible parts (L - E) enter, so the answer is very sensitive to E, which is "
        "specific to the corpus and tokenizer the law was fitted on; the clean model is assumed "
        "to be compute-optimally trained, and the spliced model is treated as an ordinary "
        "compute-optimal model with a higher loss.")
    return {"method": "frontier", "law": law.name, "fraction": f, "L_clean": L_clean,
            "L_spliced": L_spliced, "delta_loss": L_spliced - L_clean, "E": law.E,
            "gamma": law.gamma,
            "C_clean_on_frontier": float(law.frontier_compute(L_clean)),
            "C_spliced_on_frontier": float(law.frontier_compute(L_spliced)),
            "assumptions": assumptions}


def compute_fraction_over_E(law: Law, L_clean: float, L_spliced: float, E_values=None) -> dict:
    """`compute_fraction` with E swapped for each value in E_values (alpha, beta, A, B kept).

    A preset's E belongs to its own corpus and tokenizer, so one number would be false
    precision; the table shows how the fraction moves with E.  Values of E at or above
    either loss cannot be used and get fraction None.  Default: 10 values from 0 to 0.9 *
    L_clean."""
    if not isinstance(law, Law):
        raise ValueError("compute_fraction_over_E needs a law with an irreducible term E")
    if E_values is None:
        E_values = np.linspace(0.0, 0.9 * float(L_clean), 10)
    rows = []
    for E in np.asarray(E_values, float):
        try:
            f = compute_fraction(law.with_params(E=float(E)), L_clean, L_spliced)["fraction"]
        except ValueError:
            f = None
        rows.append({"E": float(E), "fraction": f})
    assumptions = (
        "Same frontier reading as compute_fraction, repeated with the irreducible loss E "
        f"replaced by each listed value while keeping alpha={law.alpha:.4g}, beta={law.beta:.4g} "
        f"of {law.name or 'the law'}; E is specific to the corpus and tokenizer, so the spread "
        "of this table, not any single row, is the honest answer. Rows with E at or above the "
        "losses have no answer (None).")
    return {"method": "frontier_over_E", "law": law.name, "L_clean": float(L_clean),
            "L_spliced": float(L_spliced), "table": rows, "assumptions": assumptions}


def n_eff_fraction(family_law: Curve, L_clean: float, L_spliced: float, N: float) -> dict:
    """Effective size of the spliced model from a family fit L(N) = E + A/N^alpha.

    The clean model rarely sits exactly on the fitted curve, so the fraction is the ratio of
    the two inverted sizes, N_eff(L_spliced)/N_eff(L_clean) = ((L_s - E)/(L_c - E))^(-1/alpha):
    the clean model's own offset from the curve cancels and a zero increase gives exactly 1.
    N_eff = fraction * N.  At fixed tokens C = 6 N D, so C_eff/C is the same ratio."""
    L_clean, L_spliced = float(L_clean), float(L_spliced)
    if N <= 0:
        raise ValueError(f"N must be positive, got {N}")
    _check_losses(L_clean, L_spliced, family_law.E)
    f = ((L_spliced - family_law.E) / (L_clean - family_law.E)) ** (-1.0 / family_law.alpha)
    assumptions = (
        f"The spliced model is treated as a smaller member of the fitted family L(N) = E + "
        f"A/N^alpha (E={family_law.E:.4g}, alpha={family_law.alpha:.4g}), trained on the same "
        "tokens and evaluated on the same text. The fraction is N_eff(L_spliced)/N_eff(L_clean), "
        "both read off the curve, so the clean model's own distance from the curve cancels. "
        "C_eff/C equals N_eff/N because training compute 6ND scales with N at fixed D. Outside "
        "the range of fitted sizes this is an extrapolation.")
    return {"method": "family", "law": family_law.name, "fraction": f, "N": float(N),
            "N_eff": f * float(N), "C_fraction": f, "L_clean": L_clean,
            "L_spliced": L_spliced, "delta_loss": L_spliced - L_clean,
            "clean_offset_from_curve": L_clean - float(family_law.loss(N)),
            "assumptions": assumptions}


def d_eff_fraction(ckpt_law: Curve, L_clean: float, L_spliced: float,
                   D: float | None = None) -> dict:
    """Effective training tokens of the spliced model from a checkpoint curve L(D) = E + B/D^beta.

    Same ratio construction as `n_eff_fraction`: D_eff(L_s)/D_eff(L_c) =
    ((L_s - E)/(L_c - E))^(-1/beta).  At fixed N, C_eff/C is the same ratio."""
    L_clean, L_spliced = float(L_clean), float(L_spliced)
    _check_losses(L_clean, L_spliced, ckpt_law.E)
    f = ((L_spliced - ckpt_law.E) / (L_clean - ckpt_law.E)) ** (-1.0 / ckpt_law.alpha)
    assumptions = (
        f"The spliced model is treated as a model of the same size trained on fewer tokens, read "
        f"off L(D) = E + B/D^beta (E={ckpt_law.E:.4g}, beta={ckpt_law.alpha:.4g}). The "
        "fraction is D_eff(L_spliced)/D_eff(L_clean), so the final model's offset from the curve "
        "cancels. Only annealed runs (each cooled down at its own budget) are points of this "
        "curve: an intermediate checkpoint of a decaying schedule overstates the loss a finished "
        "run of that length reaches. C_eff/C equals D_eff/D at fixed model size.")
    out = {"method": "checkpoints", "law": ckpt_law.name, "fraction": f, "C_fraction": f,
           "L_clean": L_clean, "L_spliced": L_spliced, "delta_loss": L_spliced - L_clean,
           "assumptions": assumptions}
    if D is not None:
        out.update(D=float(D), D_eff=f * float(D))
    return out


def invert(law, L_clean, L_spliced, N):
    """The main fraction a law or curve gives for a loss increase (N_eff/N for a curve in N,
    D_eff/D for one in D, the frontier's C_eff/C for a full law)."""
    if isinstance(law, Curve):
        if law.var == "N":
            return n_eff_fraction(law, L_clean, L_spliced, N)["fraction"]
        return d_eff_fraction(law, L_clean, L_spliced)["fraction"]
    return compute_fraction(law, L_clean, L_spliced)["fraction"]


def fraction_interval(law, L_clean: float, dce_interval, N: float = 1.0) -> dict:
    """Interval of the fraction from both the fit's bootstrap draws and a dCE interval.

    dce_interval = (low, high) of the loss increase L_spliced - L_clean.  For each bootstrap
    law the fraction is computed at both ends; the lower bound is the 2.5th percentile of the
    fractions at the largest increase, the upper the 97.5th percentile at the smallest.  A law
    without samples (a preset) gives the dCE interval alone.  Draws whose E lies above a loss
    are skipped and counted.  N is only used by family curves (and cancels in the ratio)."""
    lo_d, hi_d = sorted(float(v) for v in dce_interval)
    if isinstance(law, KaplanLaw) or law.samples is None or len(law.samples) == 0:
        laws = [law]
    elif isinstance(law, Curve):
        laws = [dataclasses.replace(law, E=s[0], A=s[1], alpha=s[2], samples=None)
                for s in law.samples]
    else:
        laws = [law.with_params(**dict(zip(PARAMS, s))) for s in law.samples]
    worst, best, skipped = [], [], 0
    for one in laws:
        try:
            worst.append(invert(one, L_clean, L_clean + hi_d, N))
            best.append(invert(one, L_clean, L_clean + lo_d, N))
        except ValueError:
            skipped += 1
    if not worst:
        raise ValueError("no bootstrap law could place these losses (all had E above them)")
    assumptions = (
        "Lower bound: 2.5th percentile over the fit's bootstrap laws of the fraction at the "
        "largest loss increase; upper bound: 97.5th percentile at the smallest increase. This "
        "combines fit and measurement uncertainty conservatively; it does not include the "
        "uncertainty in which law (or which E) applies to this corpus and tokenizer.")
    return {"low": float(np.percentile(worst, 2.5)), "high": float(np.percentile(best, 97.5)),
            "dce_interval": (lo_d, hi_d), "n_laws": len(worst), "n_skipped": skipped,
            "assumptions": assumptions}


# --------------------------------------------------------------------------- glue for the CLI

def load_law(spec: str):
    """A preset name, or a JSON file written by `sae-harness fit-law` (full law or curve)."""
    import json
    from pathlib import Path

    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"law {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds no law (expected a JSON object with E, A, B, alpha, beta)")
    if "var" not in d:  # a one-term law written by hand: a family curve in N or a curve in D
        if {"E", "A", "alpha"} <= set(d) and not {"B", "beta"} & set(d):
            d = {**d, "var": "N"}
        elif {"E", "B", "beta"} <= set(d) and not {"A", "alpha"} & set(d):
            d = {**d, "var": "D"}
    try:
        if "var" in d:
            if d["var"] not in ("N", "D"):
                raise ValueError(f"var must be 'N' or 'D', not {d['var']!r}")
            return Curve.from_json(d)
        missing = [p for p in PARAMS if p not in d]
        if missing:
            raise ValueError(f"lacks law parameters {missing}")
        return one_term(Law.from_json(d))
    except (KeyError, TypeError, ValueError) as e:
        why = f"lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path} is not a usable law: {why}") from None


def one_term(law):
    """A full law with B = 0 (or A = 0) has no compute-optimal frontier (loss does not fall
    with that variable): it is the curve in the other variable, and is read as one."""
    if isinstance(law, Law) and law.B == 0 and law.A > 0:
        return Curve(E=law.E, A=law.A, alpha=law.alpha, var="N", name=law.name)
    if isinstance(law, Law) and law.A == 0 and law.B > 0:
        return Curve(E=law.E, A=law.B, alpha=law.beta, var="D", name=law.name)
    return law


def equivalents(law, L_clean: float, L_spliced: float, N: float | None = None,
                D: float | None = None) -> dict:
    """Every compute-equivalent the given law and sizes allow, as one flat dict.

    compute_fraction: frontier reading (full laws and Kaplan); n_eff_frac: size at fixed
    tokens (a family curve, or a full law with --tokens); d_eff_frac: tokens at fixed size (a
    checkpoint curve, or a full law with --params)."""
    law = one_term(law)
    out: dict = {"law": getattr(law, "name", ""), "L_clean": float(L_clean), "L_spliced": float(L_spliced),
                 "assumptions": {}}
    if isinstance(law, Curve):
        if law.var == "N":
            r = n_eff_fraction(law, L_clean, L_spliced, N or 1.0)
            out["n_eff_frac"] = out["compute_fraction"] = r["fraction"]
            if N:
                out["n_eff"] = r["N_eff"]
        else:
            r = d_eff_fraction(law, L_clean, L_spliced, D)
            out["d_eff_frac"] = out["compute_fraction"] = r["fraction"]
        out["assumptions"][r["method"]] = r["assumptions"]
        return out
    r = compute_fraction(law, L_clean, L_spliced)
    out["compute_fraction"] = r["fraction"]
    out["assumptions"]["frontier"] = r["assumptions"]
    if isinstance(law, Law):
        over = compute_fraction_over_E(law, L_clean, L_spliced)
        out["compute_fraction_over_E"] = over["table"]
        out["assumptions"]["over_E"] = over["assumptions"]
        if D:  # fixed tokens: the D term joins the irreducible part of a curve in N
            curve = Curve(E=law.E + law.B / D ** law.beta, A=law.A, alpha=law.alpha, var="N", name=law.name)
            r = n_eff_fraction(curve, L_clean, L_spliced, N or 1.0)
            out["n_eff_frac"] = r["fraction"]
            out["assumptions"]["n_eff"] = f"At fixed D={D:.3g} tokens: " + r["assumptions"]
        if N:  # fixed size: the N term joins the irreducible part of a curve in D
            curve = Curve(E=law.E + law.A / N ** law.alpha, A=law.B, alpha=law.beta, var="D", name=law.name)
            r = d_eff_fraction(curve, L_clean, L_spliced, D)
            out["d_eff_frac"] = r["fraction"]
            out["assumptions"]["d_eff"] = f"At fixed N={N:.3g} parameters: " + r["assumptions"]
    return out


def fixed_size_curves(law: Law, N: float | None, D: float | None) -> dict:
    """The seed's second reading, as one-variable curves of a full law: at the model's own D,
    L(N) = (E + B/D^beta) + A/N^alpha ("n_eff": the parameters a model trained on the same D
    tokens would need to reach a loss); at its own N, L(D) = (E + A/N^alpha) + B/D^beta
    ("d_eff": the tokens a model of the same size would need)."""
    out = {}
    if D:
        out["n_eff"] = Curve(E=law.E + law.B / D ** law.beta, A=law.A, alpha=law.alpha, var="N", name=law.name)
    if N:
        out["d_eff"] = Curve(E=law.E + law.A / N ** law.alpha, A=law.B, alpha=law.beta, var="D", name=law.name)
    return out


def fixed_tokens_over_E(law: Law, L_clean: float, L_spliced: float, D: float, E_values) -> list[dict]:
    """N_eff/N at fixed D with E swapped for each value (A, B, alpha, beta kept), as
    `compute_fraction_over_E` does for the frontier: E belongs to the law's corpus and
    tokenizer, and the fixed-D reading moves with it too. None where a loss is below the floor."""
    rows = []
    for E in np.asarray(E_values, float):
        curve = fixed_size_curves(law.with_params(E=float(E)), None, D)["n_eff"]
        try:
            f = n_eff_fraction(curve, L_clean, L_spliced, 1.0)["fraction"]
        except ValueError:
            f = None
        rows.append({"E": float(E), "fraction": f})
    return rows


def read_points(path, lowest: int | None = None):
    """(N, D, loss) arrays from a CSV with columns N and D (or C), and loss.

    Also accepts the column names of Epoch's Chinchilla extraction ("Model Size",
    "Training FLOP"); D = C / (6 N) where only C is given. `lowest` keeps the K lowest-loss
    points (Hoffmann's and Epoch's fits drop the 5 highest-loss outliers)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise ValueError(f"{path} not found") from None
    except Exception as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    aliases = {"N": ["N", "params", "Model Size"], "D": ["D", "tokens"], "C": ["C", "FLOP", "Training FLOP"],
               "loss": ["loss", "L"]}
    cols = {k: next((c for c in names if c in df.columns), None) for k, names in aliases.items()}
    if cols["N"] is None or cols["loss"] is None or (cols["D"] is None and cols["C"] is None):
        raise ValueError(f"{path} needs columns N, loss and D or C (has {', '.join(map(str, df.columns))})")
    if lowest:
        df = df.nsmallest(lowest, cols["loss"])
    N = df[cols["N"]].to_numpy(float)
    D = df[cols["D"]].to_numpy(float) if cols["D"] else df[cols["C"]].to_numpy(float) / (6 * N)
    return N, D, df[cols["loss"]].to_numpy(float)
