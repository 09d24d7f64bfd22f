"""The CE table's columns, defined once: the terminal table (`ce`, `run`), the Markdown / LaTeX /
CSV table (ce.md, ce.tex) and report.html all read this list, so a column added here appears in
all three, with one formatter per kind of cell.

A column shows when its records carry its key (`present`); `group` splits report.html's two
tables (what a splice costs / how it reconstructs); `where` names the outputs that show it
(ce.md leaves out CE, which its caption gives for the clean model, and dead latents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def _finite(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and x is not None and math.isfinite(x) else None


def _frac(x: float) -> str:
    """A fraction that spans orders of magnitude: three significant digits, powers of ten below 0.001."""
    return format(x, "#.3g") if abs(x) >= 1e-3 else format(x, ".2e")


# one formatter per kind of cell: (plain text, HTML); None = the plain one
FORMATS = {
    "nats": (lambda x: f"{x:.3f}", None),
    "share": (lambda x: f"{x:.3f}", lambda x: f"{100 * x:.1f}%"),
    "fraction": (_frac, lambda x: f"{x:.3g}"),
    "ratio": (lambda x: f"{x:.2f}", None),
    "count": (lambda x: f"{x:.3g}", lambda x: f"{x:.1f}"),
    "percent": (lambda x: f"{100 * x:.1f}%", None),
}


@dataclass(frozen=True)
class Column:
    key: str  # the record's key; with `interval`, also key_low / key_high
    text: str  # header: terminal, Markdown, CSV
    tex: str  # header: LaTeX
    html: str  # header: report.html
    kind: str  # a key of FORMATS
    group: str = "cost"  # report.html: "cost" (headline) or "recon"
    interval: bool = False
    where: frozenset = field(default_factory=lambda: frozenset({"terminal", "grid", "html"}))
    flag: str = ""  # a record key that marks the value with ‡ when true (an extrapolation)
    bounds: str = "{key}_low {key}_high"  # the record's keys of the interval's ends

    @property
    def low_high(self) -> tuple[str, str]:
        lo, hi = self.bounds.format(key=self.key).split()
        return lo, hi

    def present(self, records: list[dict]) -> bool:
        probe = self.low_high[0] if self.interval else self.key
        return any(probe in r for r in records)

    def parts(self, rec: dict, html: bool = False) -> tuple[str, str | None, str | None]:
        """(value, low, high) as text; "" for no value, None for no interval."""
        plain, rich = FORMATS[self.kind]
        fmt = (rich or plain) if html else plain
        if self.key == "explained_variance_robust":  # with the count of massive positions left out
            ev, n = robust_ev(rec)
            return (f"{ev} ({n})" if ev else ""), None, None
        x = _finite(rec.get(self.key))
        if x is None:
            return "", None, None
        value = fmt(x)
        lo, hi = (_finite(rec.get(k)) for k in self.low_high) if self.interval else (None, None)
        if lo is None or hi is None:
            return value, None, None
        return value, fmt(lo), fmt(hi)

    def mark(self, rec: dict) -> str:
        """‡ where the reading lies outside the runs its law was fitted on (an extrapolation)."""
        return "‡" if self.flag and rec.get(self.flag) and _finite(rec.get(self.key)) is not None else ""

    def text_cell(self, rec: dict) -> str:
        value, lo, hi = self.parts(rec)
        if not value:
            return "-"
        value += self.mark(rec)
        return value if lo is None else f"{value} [{lo}, {hi}]"


def _fr(key: str, text: str, tex: str, html: str) -> Column:
    return Column(key, text, tex, html, "fraction", interval=True, flag=f"{key}_extrapolated")


_ALL = frozenset({"terminal", "grid", "html"})
_NO_GRID = frozenset({"terminal", "html"})

COLUMNS = [
    Column("ce_spliced", "CE", "CE", "CE<br><span class=n>nats/token</span>", "nats", where=_NO_GRID),
    Column("l0", "L0", "$L_0$", "L0", "count", group="recon"),
    Column("dce", "dCE [95% CI]", r"$\Delta$CE [95\% CI]", "dCE [95% CI]<br><span class=n>nats/token</span>",
           "nats", interval=True, bounds="dce_ci_low dce_ci_high"),
    Column("kl", "KL", "KL", "KL<br><span class=n>nats/token</span>", "nats"),
    Column("top1_agreement", "top-1 agree [95% CI]", r"top-1 agree [95\% CI]",
           "top-1 agreement<br><span class=n>with clean [CI]</span>", "share", interval=True),
    Column("top1_agreement_hard", "top-1 hard [95% CI]", r"top-1 hard [95\% CI]",
           "top-1 agreement<br><span class=n>hard subset [CI]</span>", "share", group="recon", interval=True,
           where=_NO_GRID),
    Column("loss_recovered_zero", "LR zero", r"LR\textsubscript{zero}", "loss recovered<br>vs zero", "share"),
    Column("loss_recovered_mean", "LR mean", r"LR\textsubscript{mean}", "loss recovered<br>vs mean", "share"),
    _fr("compute_fraction", "C_eff/C frontier [95% CI]", r"$C_{\mathrm{eff}}/C$ frontier [95\% CI]",
        "C_eff/C [95% CI]<br><span class=n>{law} frontier</span>"),
    _fr("n_eff_frac_fixed_d", "N_eff/N at D [95% CI]", r"$N_{\mathrm{eff}}/N$ at $D$ [95\% CI]",
        "N_eff/N at D<br><span class=n>same tokens [CI]</span>"),
    _fr("d_eff_frac_fixed_n", "D_eff/D at N [95% CI]", r"$D_{\mathrm{eff}}/D$ at $N$ [95\% CI]",
        "D_eff/D at N<br><span class=n>same size [CI]</span>"),
    _fr("n_eff_frac", "N_eff/N [95% CI]", r"$N_{\mathrm{eff}}/N$ [95\% CI]",
        "N_eff/N<br><span class=n>family fit [CI]</span>"),
    _fr("d_eff_frac", "D_eff/D [95% CI]", r"$D_{\mathrm{eff}}/D$ [95\% CI]",
        "D_eff/D<br><span class=n>checkpoints [CI]</span>"),
    Column("dce_over_noise", "dCE ÷ noise [95% CI]", r"$\Delta$CE $\div$ noise [95\% CI]",
           "dCE &divide; noise@<br><span class=n>[95% CI]</span>", "ratio", group="recon", interval=True),
    Column("kl_over_noise", "KL ÷ noise [95% CI]", r"KL $\div$ noise [95\% CI]",
           "KL &divide; noise@<br><span class=n>[95% CI]</span>", "ratio", group="recon", interval=True),
    Column("dce_over_noise_dir", "dCE ÷ noise-dir [95% CI]", r"$\Delta$CE $\div$ noise-dir [95\% CI]",
           "dCE &divide; noise-dir@<br><span class=n>[95% CI]</span>", "ratio", group="recon", interval=True,
           where=frozenset({"html"})),
    Column("kl_over_noise_dir", "KL ÷ noise-dir [95% CI]", r"KL $\div$ noise-dir [95\% CI]",
           "KL &divide; noise-dir@<br><span class=n>[95% CI]</span>", "ratio", group="recon", interval=True,
           where=frozenset({"html"})),
    Column("explained_variance", "EV", "EV", "explained<br>variance", "nats", group="recon"),
    Column("explained_variance_robust", "EV w/o massive (n)", r"EV w/o massive ($n$)",
           "EV without<br>massive (n)", "nats", group="recon"),
    Column("dead_frac", "dead", "dead", "dead<br>latents", "percent", group="recon", where=frozenset({"html"})),
]


def columns(records: list[dict], where: str, group: str | None = None) -> list[Column]:
    """The columns these records fill, for one output (and one report group)."""
    return [c for c in COLUMNS if where in c.where and (group is None or c.group == group)
            and (c.present(records) or c.key in ALWAYS)]


ALWAYS = {"ce_spliced", "l0", "dce", "kl", "loss_recovered_zero", "loss_recovered_mean", "explained_variance",
          "dead_frac"}


def robust_ev(rec: dict) -> tuple[str, str]:
    """EV without the massive positions and their count, as ("0.801", "2"), or ("", "")."""
    ev, n = _finite(rec.get("explained_variance_robust")), _finite(rec.get("n_massive"))
    return ("", "") if ev is None or n is None else (f"{ev:.3f}", f"{int(n)}")
