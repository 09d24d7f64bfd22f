"""Where the damage lives: per-token dCE of a CE run, broken down.

Reads a run folder's per-token data (written by the CE suite):
- per_token_dce.npz: `clean` = -log p_clean(next) per predicted position [n_seq, ctx-1], NaN
  outside the token set T; every variant: its per-token dCE (= its -log p minus clean's);
- tokens.npy: the evaluated token ids [n_seq, ctx];
- per_token_top3.npz: `NAME.ids` / `NAME.p`, the 3 most likely next tokens and their
  probabilities at every position, for clean and every variant (optional: older runs lack it);
- token_text.json: the text of every token id above (else the run's tokenizer is loaded).

For every variant:
- concentration: share_worst_1pct = sum of the ceil(0.01 |T|) largest per-token dCE / sum of
  all per-token dCE over T (likewise share_worst_10pct); frac_worse / frac_better = fraction of
  T with dCE > 0 / < 0;
- mean dCE (and its share of the total) grouped by the clean model's p(next token), by
  position in the context, by how often the next token occurs in the evaluated tokens, and by
  the next token's kind (word start, punctuation, digit, whitespace, other);
- the 20 most damaged positions: context, true next token, clean and spliced top-3;
- massive activations (config.json's `massive`, found by the CE run at the variant's hooks):
  the predictions made at those positions are the first candidates for where damage lives, so
  their count, mean dCE against the rest of T, their share of the total and each one's rank
  among all tokens of T are reported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from harness.errors import UserError

CONFIDENCE_EDGES = [0.0, 0.01, 0.1, 0.5, 0.9, 1.0 + 1e-9]
CONFIDENCE_LABELS = ["p<0.01", "0.01-0.1", "0.1-0.5", "0.5-0.9", "p>=0.9"]
POSITION_EDGES = [0, 1, 4, 16, 64, 256, 1024, 1 << 30]
FREQUENCY_EDGES = [1, 2, 10, 100, 1000, 1 << 62]
KINDS = ["word start", "punctuation", "digit", "whitespace", "other"]
N_WORST = 20
CONTEXT_TOKENS = 16


def _range_labels(edges: list[int]) -> list[str]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        out.append(str(lo) if hi == lo + 1 else (f">={lo}" if hi >= 1 << 30 else f"{lo}-{hi - 1}"))
    return out


def token_kind(text: str, prev_text: str = "") -> str:
    """word start (a letter after whitespace, in the token or ending the one before),
    punctuation, digit, whitespace, or other (e.g. the middle of a word)."""
    body = text.strip()
    if not body:
        return "whitespace"
    if body[0].isdigit():
        return "digit"
    if all(not c.isalnum() for c in body):
        return "punctuation"
    if body[0].isalpha() and (text[0].isspace() or not prev_text or prev_text[-1].isspace()):
        return "word start"
    return "other"


def load_run(folder: str | Path) -> dict:
    """The per-token arrays of a run folder; UserError if it has none."""
    folder = Path(folder)
    npz, tok = folder / "per_token_dce.npz", folder / "tokens.npy"
    if not folder.is_dir():
        raise UserError(f"run folder {folder} not found")
    if not npz.exists() or not tok.exists():
        raise UserError(f"{folder} has no per-token data (per_token_dce.npz and tokens.npy come from a CE run)")
    try:
        per_token = dict(np.load(npz))
        tokens = np.load(tok)
        top3 = dict(np.load(folder / "per_token_top3.npz")) if (folder / "per_token_top3.npz").exists() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read per-token data in {folder}: {e}") from None
    if "clean" not in per_token or per_token["clean"].shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise UserError(f"{npz} does not match tokens.npy (expected a `clean` array of shape "
                        f"{(tokens.shape[0], tokens.shape[1] - 1)})")
    return {"per_token": per_token, "tokens": tokens, "top3": top3, "text": _token_text(folder, tokens, top3),
            **_massive_of_run(folder)}


def _massive_of_run(folder: Path) -> dict:
    """Massive positions per hook and the hooks of every variant, from config.json (empty when
    the run did not detect them, or is older than the detection)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {"massive": {}, "variant_hooks": {}}
    hooks = (config.get("massive") or {}).get("hooks") or {}
    return {"massive": {h: [tuple(p) for p in v["positions"]] for h, v in hooks.items()},
            "variant_hooks": config.get("variants") or {}}


def _massive_stats(dce_map: np.ndarray, in_t: np.ndarray, positions: list[tuple[int, int]], name: str,
                   run: dict) -> dict:
    """dCE of the predictions made at massive positions against the rest of T."""
    on = np.zeros_like(in_t)
    for row, pos in positions:
        if pos < on.shape[1]:  # the last position predicts nothing
            on[row, pos] = True
    in_m, rest = on & in_t, ~on & in_t
    d_all = dce_map[in_t].astype(np.float64)
    total = d_all.sum()
    d_m = dce_map[in_m].astype(np.float64)
    out = {"n": int(on.sum()), "n_in_t": int(in_m.sum()),
           "mean_dce": float(d_m.mean()) if d_m.size else float("nan"),
           "mean_dce_rest": float(dce_map[rest].astype(np.float64).mean()) if rest.any() else float("nan"),
           "share_of_dce": float(d_m.sum() / total) if total != 0 and d_m.size else float("nan"),
           "positions": []}
    for row, pos in sorted(positions):
        if pos >= on.shape[1] or not in_t[row, pos]:
            continue
        d = float(dce_map[row, pos])
        entry = _position(row, pos, d, name, run)
        entry["rank"] = int((d_all > d).sum()) + 1  # 1 = the most damaged token of T
        out["positions"].append(entry)
    return out


def _token_text(folder: Path, tokens: np.ndarray, top3: dict) -> dict[int, str]:
    path = folder / "token_text.json"
    if path.exists():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    try:  # an older run: decode with the run's own tokenizer
        from transformers import AutoTokenizer

        from harness.model.loading import EMBEDDED_DEFAULT, embedded_checkpoint

        model = json.loads((folder / "config.json").read_text())["model"]
        source = model.get("source") or model["spec"]
        if model.get("spec") == EMBEDDED_DEFAULT and not Path(source).exists():
            source = embedded_checkpoint()  # made on another machine: the same checkpoint, cached here
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise UserError(f"{folder} has no token_text.json and its tokenizer cannot be loaded: {e}") from None
    return token_text(tokenizer, tokens, top3)


def token_text(tokenizer, tokens: np.ndarray, top3: dict | None = None) -> dict[int, str]:
    """Text of every token id in the evaluated tokens and the saved top-3 predictions."""
    ids = set(np.unique(tokens).tolist())
    for key, arr in (top3 or {}).items():
        if key.endswith(".ids"):
            ids |= set(np.unique(arr).tolist())
    return {int(i): tokenizer.decode([int(i)]) for i in sorted(ids)}


def _groups(dce: np.ndarray, keys: np.ndarray, labels: list[str]) -> list[dict]:
    total = dce.sum()
    out = []
    for i, label in enumerate(labels):
        sel = keys == i
        n = int(sel.sum())
        if n == 0:
            continue
        out.append({"group": label, "n": n, "mean_dce": float(dce[sel].mean()),
                    "share_of_dce": float(dce[sel].sum() / total) if total != 0 else float("nan"),
                    "frac_worse": float((dce[sel] > 0).mean())})
    return out


def analyse(run: dict, n_worst: int = N_WORST) -> dict:
    """{"variants": {NAME: statistics}} for every variant of the run (see module docstring)."""
    per_token, tokens, text = run["per_token"], run["tokens"], run["text"]
    nll_clean = per_token["clean"]
    in_t = np.isfinite(nll_clean)
    seq_idx, pos_idx = np.nonzero(in_t)  # T in row-major order
    targets = tokens[:, 1:][in_t]
    inputs = tokens[:, :-1][in_t]
    p_clean = np.exp(-nll_clean[in_t])
    ids, counts = np.unique(tokens, return_counts=True)
    freq = dict(zip(ids.tolist(), counts.tolist()))
    keys = {
        "by_confidence": (np.digitize(p_clean, CONFIDENCE_EDGES[1:-1]), CONFIDENCE_LABELS),
        "by_position": (np.digitize(pos_idx, POSITION_EDGES[1:-1]), _range_labels(POSITION_EDGES)),
        "by_frequency": (np.digitize([freq[t] for t in targets.tolist()], FREQUENCY_EDGES[1:-1]),
                         _range_labels(FREQUENCY_EDGES)),
        "by_kind": (np.array([KINDS.index(token_kind(text[t], text[p])) for t, p in zip(targets.tolist(), inputs.tolist())]),
                    KINDS),
    }
    out = {}
    for name, arr in per_token.items():
        if name == "clean":
            continue
        dce = arr[in_t].astype(np.float64)
        total = dce.sum()
        ranked = np.sort(dce)[::-1]
        stats = {"n_tokens": int(dce.size), "mean_dce": float(dce.mean()), "total_dce": float(total)}
        for pct in (1, 10):
            k = math.ceil(pct / 100 * dce.size)
            stats[f"share_worst_{pct}pct"] = float(ranked[:k].sum() / total) if total != 0 else float("nan")
        stats["frac_worse"] = float((dce > 0).mean())
        stats["frac_better"] = float((dce < 0).mean())
        for group, (key, labels) in keys.items():
            stats[group] = _groups(dce, key, labels)
        worst = np.argsort(-dce, kind="stable")[:n_worst]
        stats["worst"] = [_position(int(seq_idx[j]), int(pos_idx[j]), float(dce[j]), name, run) for j in worst]
        hooks = run.get("variant_hooks", {}).get(name, [])
        if any(h in run.get("massive", {}) for h in hooks):
            positions = sorted({p for h in hooks for p in run["massive"].get(h, [])})
            stats["massive"] = _massive_stats(arr, in_t, positions, name, run)
        out[name] = stats
    return {"variants": out}


def _position(seq: int, pos: int, dce: float, name: str, run: dict) -> dict:
    tokens, text, top3 = run["tokens"], run["text"], run["top3"]
    nll_clean = float(run["per_token"]["clean"][seq, pos])
    start = max(0, pos + 1 - CONTEXT_TOKENS)
    row = {"seq": seq, "pos": pos, "dce": dce,
           "context": "".join(text[int(t)] for t in tokens[seq, start:pos + 1]),
           "next_token": text[int(tokens[seq, pos + 1])],
           "p_clean": math.exp(-nll_clean), "p_spliced": math.exp(-(nll_clean + dce))}
    for label, key in (("clean_top3", "clean"), ("spliced_top3", name)):
        if f"{key}.ids" in top3:
            row[label] = [[text.get(int(i), f"<{int(i)}>"), float(p)]
                          for i, p in zip(top3[f"{key}.ids"][seq, pos], top3[f"{key}.p"][seq, pos])]
    return row


def markdown(report: dict) -> str:
    """damage.md: concentration for all variants, the groupings side by side, the worst positions."""
    variants = report["variants"]
    names = list(variants)
    lines = ["# Where the damage lives", "",
             "Per-token dCE = -log p_spliced(next) + log p_clean(next) over the token set T of the CE run. "
             "`worst 1% carry` = the summed dCE of the ceil(1% |T|) most damaged tokens over the summed dCE of "
             "all of T (above 100% when the other tokens are, on balance, made better).", "",
             "| variant | mean dCE | worst 1% carry | worst 10% carry | tokens made worse | made better |",
             "|---|---:|---:|---:|---:|---:|"]
    for n, s in variants.items():
        lines.append(f"| {n} | {s['mean_dce']:.4f} | {s['share_worst_1pct']:.1%} | {s['share_worst_10pct']:.1%} "
                     f"| {s['frac_worse']:.1%} | {s['frac_better']:.1%} |")
    titles = {"by_confidence": "clean model's p(next token)", "by_position": "position in the context",
              "by_frequency": "occurrences of the next token in the evaluated tokens",
              "by_kind": "kind of next token"}
    for group, title in titles.items():
        labels = list(dict.fromkeys(g["group"] for s in variants.values() for g in s[group]))
        counts = {g["group"]: g["n"] for g in next(iter(variants.values()))[group]} if variants else {}
        lines += ["", f"## Mean dCE by {title}", "", "| group | n | " + " | ".join(names) + " |",
                  "|---|---:|" + "---:|" * len(names)]
        for label in labels:
            cells = []
            for s in variants.values():
                g = next((g for g in s[group] if g["group"] == label), None)
                cells.append("-" if g is None else f"{g['mean_dce']:.3f} ({g['share_of_dce']:.0%})")
            lines.append(f"| {label} | {counts.get(label, 0)} | " + " | ".join(cells) + " |")
    lines += ["", "(cells: mean dCE of the group, and in brackets its share of the variant's total dCE)"]
    massive = {n: s["massive"] for n, s in variants.items() if "massive" in s}
    if massive:
        lines += ["", "## Massive activations", "",
                  "Predictions made at positions whose clean residual norm at one of the variant's hooks is "
                  "massive (config.json `massive`): their mean dCE against the rest of T, their share of the "
                  "total, and each one's rank among all tokens of T (1 = most damaged).", "",
                  "| variant | massive positions (in T) | mean dCE on them | mean dCE elsewhere | share of dCE "
                  "| ranks |", "|---|---:|---:|---:|---:|---|"]
        for n, m in massive.items():
            ranks = ", ".join(str(p["rank"]) for p in m["positions"][:10]) or "-"
            share = "-" if math.isnan(m["share_of_dce"]) else f"{m['share_of_dce']:.1%}"
            mean = "-" if math.isnan(m["mean_dce"]) else f"{m['mean_dce']:.3f}"
            lines.append(f"| {n} | {m['n']} ({m['n_in_t']}) | {mean} | {m['mean_dce_rest']:.3f} | {share} | {ranks} |")
    for n, s in variants.items():
        lines += ["", f"## {n}: the {len(s['worst'])} most damaged positions", "",
                  "| dCE | context | next | clean top-3 | spliced top-3 |", "|---:|---|---|---|---|"]
        for w in s["worst"]:
            top = {k: ", ".join(f"{_cell(t)} {p:.3g}" for t, p in w.get(k, [])) or "-" for k in ("clean_top3", "spliced_top3")}
            lines.append(f"| {w['dce']:.2f} | {_cell(w['context'])} | {_cell(w['next_token'])} "
                         f"(p {w['p_clean']:.3g} -> {w['p_spliced']:.3g}) | {top['clean_top3']} | {top['spliced_top3']} |")
    return "\n".join(lines) + "\n"


def _cell(s: str) -> str:
    return "`" + s.replace("|", "\\|").replace("\n", "⏎").replace("`", "'") + "`"


def write_damage(folder: str | Path) -> dict:
    """Compute and write damage.json and damage.md in a run folder (atomically each)."""
    from harness.files import write_atomic, write_json

    folder = Path(folder)
    report = analyse(load_run(folder))
    write_json(folder / "damage.json", report)
    write_atomic(folder / "damage.md", markdown(report))
    return report
