"""Least-squares scaling fits with profile-likelihood intervals, for a handful of noisy points.

Hoffmann et al. 2022 fit hundreds of low-noise runs with a Huber loss (delta 1e-3 on log loss).
On 6-40 points with 0.01-0.1 nats of scatter that delta turns the fit into an L1 fit that
interpolates a few points and ignores the rest, and a bootstrap over 5 points is not a
confidence interval. Here instead:

- Least squares on the loss in nats (the measured noise is additive in nats), weighted by
  1 / sigma^2 when each point's noise sd is known (`sigma`): the family's seed pairs show it
  roughly equal across sizes but 5-10x larger at the shortest budget than at the longest, so
  an unweighted fit would let the noisiest runs pull it.
- Variable projection: for given nonlinear parameters (E, alpha[, beta]) the coefficients
  A[, B] are linear in L - E and are solved exactly (non-negative), so the residual sum of
  squares SSE is known on a whole grid of (E, alpha[, beta]) at once; the optimum is the best
  cell refined by Nelder-Mead. No start point can trap it at a bound.
- Profile likelihood (Bates & Watts 1988, ch. 6): a parameter vector is plausible when
  SSE <= SSE_min (1 + F_0.95(1, n - p) / (n - p)). The interval of any reading (E itself,
  N_eff/N, D_eff/D, the frontier's C_eff/C) is its range over the plausible grid cells.
- E is "identified" only when its plausible range stays clear of both ends of its grid
  (0 and just below the lowest measured loss); an exponent likewise. A fit that is not
  identified still reports the range of each reading over the plausible E: that range, not the
  optimum, is the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.stats import f as f_dist

from harness import scaling

CONFIDENCE = 0.95
EXPONENTS_1D = np.linspace(0.01, 2.0, 400)
EXPONENTS_2D = np.linspace(0.02, 1.5, 38)
E_STEPS_1D = 300
E_STEPS_2D = 80


def _coefficients(cols: np.ndarray, y: np.ndarray):
    """Non-negative least squares of y (..., n) on 1 or 2 columns (..., n, k), vectorised over
    the leading axes: the unconstrained solution where it is non-negative, else the better of
    the one-column fits. Returns (coefficients (..., k), SSE (...))."""
    k = cols.shape[-1]
    if k == 1:
        x = cols[..., 0]
        a = np.clip((x * y).sum(-1) / (x * x).sum(-1), 0, None)
        return a[..., None], ((y - a[..., None] * x) ** 2).sum(-1)
    x1, x2 = cols[..., 0], cols[..., 1]
    s11, s22, s12 = (x1 * x1).sum(-1), (x2 * x2).sum(-1), (x1 * x2).sum(-1)
    t1, t2 = (x1 * y).sum(-1), (x2 * y).sum(-1)
    det = s11 * s22 - s12 * s12
    with np.errstate(divide="ignore", invalid="ignore"):
        a, b = (s22 * t1 - s12 * t2) / det, (s11 * t2 - s12 * t1) / det
    best_a, best_b = np.clip(t1 / s11, 0, None), np.clip(t2 / s22, 0, None)
    sse_full = ((y - a[..., None] * x1 - b[..., None] * x2) ** 2).sum(-1)
    sse_a = ((y - best_a[..., None] * x1) ** 2).sum(-1)
    sse_b = ((y - best_b[..., None] * x2) ** 2).sum(-1)
    ok = (a >= 0) & (b >= 0) & np.isfinite(sse_full)
    use_a = ~ok & (sse_a <= sse_b)
    A = np.where(ok, a, np.where(use_a, best_a, 0.0))
    B = np.where(ok, b, np.where(use_a, 0.0, best_b))
    return np.stack([A, B], -1), np.where(ok, sse_full, np.minimum(sse_a, sse_b))


@dataclass
class Fit:
    """A least-squares fit with its plausible set. `cells` holds every plausible parameter
    vector as columns E, A, B, alpha, beta (B = beta = 0 for a curve in N; for a curve in D,
    A/alpha hold its B/beta and `var` says so)."""

    law: object  # scaling.Law or scaling.Curve at the optimum
    sse: float
    threshold: float
    n_points: int
    n_params: int
    cells: np.ndarray
    grid: dict
    var: str = "ND"
    info: dict = field(default_factory=dict)

    @property
    def rmse(self) -> float:
        """Root mean square residual in nats (a weighted fit's SSE is in units of sigma)."""
        return float(self.info.get("rmse_nats", np.sqrt(self.sse / self.n_points)))

    def plausible(self, name: str) -> tuple[float, float]:
        col = {"E": 0, "A": 1, "B": 2, "alpha": 3, "beta": 4}[name]
        return float(self.cells[:, col].min()), float(self.cells[:, col].max())

    def identified(self) -> dict:
        """name -> True when its plausible range stays inside its grid (never at an end)."""
        out = {}
        for name, (lo, hi) in self.grid.items():
            p_lo, p_hi = self.plausible(name)
            step = (hi - lo) / 1000
            out[name] = bool(p_lo > lo + step and p_hi < hi - step)
        return out

    def to_json(self) -> dict:
        law = self.law.to_json()
        ident = self.identified()
        for name in self.grid:
            shown = name if self.var != "D" else {"E": "E", "alpha": "beta"}[name]
            lo, hi = self.plausible(name)
            law[f"{shown}_low"], law[f"{shown}_high"] = lo, hi
            law[f"{shown}_identified"] = ident[name]
        method = "least squares on the loss (nats)" + (", weighted by 1/sigma^2" if self.info.get("sigma") else "")
        return {**law, "method": f"{method}, variable projection, profile likelihood",
                "confidence": CONFIDENCE, "sse": self.sse, "rmse": self.rmse, "threshold_sse": self.threshold,
                "n_points": self.n_points, "n_params": self.n_params, "n_plausible_cells": int(len(self.cells)),
                "grid": {k: list(v) for k, v in self.grid.items()}, **self.info}


def _threshold(sse: float, n: int, p: int) -> float:
    dof = max(n - p, 1)
    return sse * (1.0 + f_dist.ppf(CONFIDENCE, 1, dof) / dof)


def _weights(sigma, n: int) -> tuple[np.ndarray, float]:
    """(w, scale): residuals are multiplied by w = (1 / sigma) / sqrt(scale), scale = mean(1 /
    sigma^2), so the weighted SSE keeps the size of an unweighted one (the optimisers'
    tolerances are absolute) and chi^2 = SSE * scale. Without sigma: ones and 1."""
    if sigma is None:
        return np.ones(n), 1.0
    sigma = np.asarray(sigma, float).ravel()
    if sigma.shape != (n,) or not (np.all(np.isfinite(sigma)) and np.all(sigma > 0)):
        raise ValueError("sigma must give a positive noise sd for every point")
    scale = float(np.mean(1.0 / sigma**2))
    return 1.0 / sigma / np.sqrt(scale), scale


def _check(x, loss, n_params: int, name: str):
    loss = np.asarray(loss, float).ravel()
    x = np.asarray(x, float).ravel()
    if x.shape != loss.shape:
        raise ValueError(f"{name} has {x.size} values but loss has {loss.size}")
    if not (np.all(np.isfinite(x)) and np.all(x > 0)):
        raise ValueError(f"{name} must be finite and positive")
    if not (np.all(np.isfinite(loss)) and np.all(loss > 0)):
        raise ValueError("loss must be finite and positive for every point")
    if loss.size < n_params + 1:
        raise ValueError(f"need at least {n_params + 1} points to fit {n_params} parameters, got {loss.size}")
    return x, loss


def fit_curve(x, loss, var: str = "N", name: str = "curve", exponents=EXPONENTS_1D, e_steps: int = E_STEPS_1D,
              sigma=None) -> Fit:
    """L(x) = E + A / x^alpha by least squares (weighted by 1/sigma^2 if given); x = N (a family
    at one D) or D (one size at several budgets, annealed runs only)."""
    x, loss = _check(x, loss, 3, var)
    w, scale = _weights(sigma, len(loss))
    e_grid = np.linspace(0.0, loss.min(), e_steps, endpoint=False)
    lx = np.log(x)
    cols = (np.exp(-exponents[:, None] * lx[None, :]) * w)[None, :, :, None]  # (1, a, n, 1)
    y = ((loss[None, :] - e_grid[:, None]) * w)[:, None, :]  # (e, 1, n)
    coef, sse = _coefficients(np.broadcast_to(cols, (len(e_grid), len(exponents), len(x), 1)),
                              np.broadcast_to(y, (len(e_grid), len(exponents), len(x))))

    def sse_at(theta):
        E, alpha = theta
        if not (0 <= E < loss.min() and exponents[0] <= alpha <= exponents[-1]):
            return np.inf
        return float(_coefficients((np.exp(-alpha * lx) * w)[:, None], (loss - E) * w)[1])

    i, j = np.unravel_index(np.argmin(sse), sse.shape)
    res = minimize(sse_at, [e_grid[i], exponents[j]], method="Nelder-Mead",
                   options={"xatol": 1e-7, "fatol": 1e-14, "maxiter": 4000})
    E, alpha = (res.x if res.fun <= sse[i, j] else (e_grid[i], exponents[j]))
    best = min(float(res.fun), float(sse[i, j]))
    A = float(_coefficients((np.exp(-alpha * lx) * w)[:, None], (loss - E) * w)[0][0])
    thr = _threshold(best, len(x), 3)
    ii, jj = np.nonzero(sse <= thr)
    cells = np.column_stack([e_grid[ii], coef[ii, jj, 0], np.zeros(len(ii)), exponents[jj], np.zeros(len(ii))])
    cells = np.vstack([cells, [E, A, 0.0, alpha, 0.0]])
    law = scaling.Curve(E=float(E), A=A, alpha=float(alpha), var=var, name=name)
    grid = {"E": (0.0, float(loss.min())), "alpha": (float(exponents[0]), float(exponents[-1]))}
    fit = Fit(law, best, thr, len(x), 3, cells, grid, var=var)
    fit.info["E_profile"] = [{"E": float(E), "sse": float(v)} for E, v in zip(e_grid, sse.min(axis=1))]
    if sigma is not None:
        fit.info["sigma"] = [float(v) for v in np.asarray(sigma, float).ravel()]
        fit.info["rmse_nats"] = float(np.sqrt(np.mean((loss - E - A * np.exp(-alpha * lx)) ** 2)))
        fit.info["chi2_per_dof"] = best * scale / max(len(x) - 3, 1)
    return fit


def fit_law(N, D, loss, name: str = "fit", exponents=EXPONENTS_2D, e_steps: int = E_STEPS_2D, sigma=None) -> Fit:
    """L(N, D) = E + A/N^alpha + B/D^beta by least squares (weighted by 1/sigma^2 if given).

    In three nonlinear parameters a fixed grid fine enough for the plausible region (a thin,
    curved tube) would be huge, so: (1) the profile over E: for each E of a grid on
    [0, min loss), the best (alpha, beta) (coarse grid, then Nelder-Mead); (2) the optimum,
    refined in all three; (3) around the plausible E (the profile below the threshold, with
    its neighbours), a finer E grid, each with an (alpha, beta) box that grows until no cell
    on its edge is plausible. Every cell below the threshold is kept."""
    N, loss = _check(N, loss, 5, "N")
    D, _ = _check(D, loss, 5, "D")
    w, scale = _weights(sigma, len(loss))
    lN, lD = np.log(N), np.log(D)
    lo_x, hi_x = float(exponents[0]), float(exponents[-1])

    def grid_sse(E, alphas, betas):
        xa = np.exp(-alphas[:, None] * lN[None, :]) * w
        xb = np.exp(-betas[:, None] * lD[None, :]) * w
        cols = np.stack(np.broadcast_arrays(xa[:, None, :], xb[None, :, :]), -1)
        return _coefficients(cols, np.broadcast_to((loss - E) * w, cols.shape[:-1]))

    def sse_at(theta, E=None):
        if E is not None:
            theta = (E, *theta)
        E_, alpha, beta = theta
        if not (0 <= E_ < loss.min() and lo_x <= alpha <= hi_x and lo_x <= beta <= hi_x):
            return np.inf
        c = np.column_stack([np.exp(-alpha * lN), np.exp(-beta * lD)]) * w[:, None]
        return float(_coefficients(c, (loss - E_) * w)[1])

    def profile_at(E, start=None):
        """min over (alpha, beta) of SSE at fixed E, and where."""
        if start is None:
            _, sse = grid_sse(E, exponents, exponents)
            i, j = np.unravel_index(np.argmin(sse), sse.shape)
            start = (exponents[i], exponents[j])
        res = minimize(sse_at, start, args=(E,), method="Nelder-Mead",
                       options={"xatol": 1e-6, "fatol": 1e-14, "maxiter": 2000})
        return float(res.fun), tuple(res.x)

    top = float(loss.min())
    e_grid = np.linspace(0.0, top, e_steps, endpoint=False)
    prof = [profile_at(E) for E in e_grid]
    k = int(np.argmin([p[0] for p in prof]))
    res = minimize(sse_at, [e_grid[k], *prof[k][1]], method="Nelder-Mead",
                   options={"xatol": 1e-8, "fatol": 1e-15, "maxiter": 8000})
    theta = res.x if res.fun <= prof[k][0] else np.array([e_grid[k], *prof[k][1]])
    best = min(float(res.fun), prof[k][0])
    thr = _threshold(best, len(loss), 5)
    plausible_k = [i for i, p in enumerate(prof) if p[0] <= thr] or [k]
    k_lo, k_hi = max(min(plausible_k) - 1, 0), min(max(plausible_k) + 1, e_steps - 1)
    hi_e = e_grid[k_hi] if k_hi < e_steps - 1 else top * (1 - 1e-6)
    fine = np.unique(np.concatenate([np.linspace(e_grid[k_lo], hi_e, 41), [theta[0]]]))
    cells = []
    for E in fine:
        near = min(range(len(prof)), key=lambda i: abs(e_grid[i] - E))
        p_sse, (a0, b0) = profile_at(E, prof[near][1])
        if p_sse > thr:
            continue
        half = 0.02
        while True:
            alphas = np.linspace(max(lo_x, a0 - half), min(hi_x, a0 + half), 25)
            betas = np.linspace(max(lo_x, b0 - half), min(hi_x, b0 + half), 25)
            coef, sse = grid_sse(E, alphas, betas)
            ok = sse <= thr
            edge = ok[0, :].any() or ok[-1, :].any() or ok[:, 0].any() or ok[:, -1].any()
            at_bounds = alphas[0] == lo_x and alphas[-1] == hi_x and betas[0] == lo_x and betas[-1] == hi_x
            if not edge or at_bounds or half > 2:
                break
            half *= 2
        ii, jj = np.nonzero(ok)
        cells.append(np.column_stack([np.full(len(ii), E), coef[ii, jj, 0], coef[ii, jj, 1], alphas[ii], betas[jj]]))
    c = np.column_stack([np.exp(-theta[1] * lN), np.exp(-theta[2] * lD)]) * w[:, None]
    (A, B), _ = _coefficients(c, (loss - theta[0]) * w)
    cells.append(np.array([[theta[0], A, B, theta[1], theta[2]]]))
    law = scaling.Law(E=float(theta[0]), A=float(A), B=float(B), alpha=float(theta[1]), beta=float(theta[2]),
                      name=name)
    grid = {"E": (0.0, top), "alpha": (lo_x, hi_x), "beta": (lo_x, hi_x)}
    # E's plausible range comes from the profile: the coarse grid reaches both ends
    fit = Fit(law, best, thr, len(loss), 5, np.vstack(cells), grid, var="ND")
    fit.info["E_profile"] = [{"E": float(E), "sse": p[0]} for E, p in zip(e_grid, prof)]
    if sigma is not None:
        fit.info["sigma"] = [float(v) for v in np.asarray(sigma, float).ravel()]
        resid = loss - theta[0] - A * np.exp(-theta[1] * lN) - B * np.exp(-theta[2] * lD)
        fit.info["rmse_nats"] = float(np.sqrt(np.mean(resid ** 2)))
        fit.info["chi2_per_dof"] = best * scale / max(len(loss) - 5, 1)
    return fit


# --------------------------------------------------------------------------- readings


def _ratio(floor, scale_exp, L_clean, L_spliced):
    """((L_s - floor)/(L_c - floor))^(-1/exponent), NaN where the law cannot place a loss."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (L_clean > floor) & (L_spliced > floor) & (scale_exp > 0)
        f = ((L_spliced - floor) / (L_clean - floor)) ** (-1.0 / scale_exp)
    return np.where(ok, f, np.nan)


def reading_values(kind: str, cells: np.ndarray, L_clean: float, L_spliced: float, N=None, D=None) -> np.ndarray:
    """A reading for every parameter vector (rows E, A, B, alpha, beta):
    n_eff: N_eff/N at fixed D (B = 0 for a curve in N: the floor is E);
    d_eff: D_eff/D at fixed N (for a curve in D, A/alpha hold B/beta and N is unused);
    frontier: the compute-optimal frontier's C_eff/C."""
    E, A, B, alpha, beta = cells.T
    if kind == "n_eff":
        floor = E + (B * float(D) ** -beta if D is not None else 0.0)
        return _ratio(floor, alpha, L_clean, L_spliced)
    if kind == "d_eff_curve":
        return _ratio(E, alpha, L_clean, L_spliced)
    if kind == "d_eff":
        return _ratio(E + A * float(N) ** -alpha, beta, L_clean, L_spliced)
    if kind == "frontier":
        return _ratio(E, alpha * beta / (alpha + beta), L_clean, L_spliced)
    raise ValueError(f"unknown reading {kind!r}")


def reading(fit: Fit, kind: str, L_clean: float, dce: float, dce_interval=None, N=None, D=None) -> dict:
    """One reading with its interval: the value at the optimum, and the range over the
    plausible parameter vectors evaluated at the ends of the dCE interval (the lower end at
    the largest loss increase). `identified` is False when E (or an exponent the reading uses)
    is not identified: the interval is then the range over the plausible E, and the value at
    the optimum is only one of many."""
    lo_d, hi_d = sorted(dce_interval) if dce_interval is not None else (dce, dce)
    at_opt = reading_values(kind, fit.cells[-1:], L_clean, L_clean + dce, N, D)[0]
    if not np.isfinite(at_opt):
        raise ValueError(f"the fitted law cannot place the clean loss {L_clean:.4f} (at or below its floor)")
    worst = reading_values(kind, fit.cells, L_clean, L_clean + hi_d, N, D)
    best = reading_values(kind, fit.cells, L_clean, L_clean + lo_d, N, D)
    finite = np.isfinite(worst) & np.isfinite(best)
    ident = fit.identified()
    return {"value": float(at_opt), "low": float(np.min(worst[finite])), "high": float(np.max(best[finite])),
            "identified": bool(all(ident.values())), "n_cells": int(finite.sum()),
            "n_cells_unplaced": int((~finite).sum())}
