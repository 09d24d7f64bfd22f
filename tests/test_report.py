"""report.html and `sae-harness report`: figure data against plain numpy, the page's content
against the saved numbers, error paths, and the page as a real browser renders it.

Run folders: results/main (committed, real), copied to a temporary folder, and a synthetic
run of the same model (with an all-tasks per-question file, generations.json and damage.json,
which the main job does not write yet)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import browser  # tests/browser.py
from harness.output import figures
from harness.output import layouts
from harness.output import report
from harness.output import saved_runs
from harness.cli.app import app

MAIN = Path(__file__).resolve().parent.parent / "results" / "main"


def main_mmlu_questions() -> pd.DataFrame:
    """The main job's per-question MMLU rows, read with pandas alone (older runs: MMLU-only file)."""
    path = MAIN / "per_question.csv"
    if path.is_file():
        df = pd.read_csv(path)
        return df[df["task"] == "mmlu"]
    return pd.read_csv(MAIN / "mmlu_per_question.csv")


# ---------------------------------------------------------------- figure data, against plain numpy

def _dominated(x, y, i) -> bool:
    """Brute force: some other point is at least as good in both and better in one."""
    better_eq = (x <= x[i]) & (y <= y[i])
    strictly = (x < x[i]) | (y < y[i])
    return bool(np.any(better_eq & strictly))


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_is_exactly_the_undominated_points(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 8, 40).astype(float)  # small integers: many ties
    y = rng.integers(1, 8, 40).astype(float)
    y[3] = np.nan  # never on the front
    front = figures.pareto_front(x, y)
    ok = np.isfinite(y)
    want = {i for i in np.flatnonzero(ok) if not _dominated(x[ok], y[ok], list(np.flatnonzero(ok)).index(i))}
    # duplicates of a front point are equivalent; the sweep keeps one of each
    assert {(x[i], y[i]) for i in front} == {(x[i], y[i]) for i in want}
    assert list(x[front]) == sorted(x[front])
    # maximising y is minimising -y
    up = figures.pareto_front(x, -y, maximize_y=True)
    assert {(x[i], y[i]) for i in up} == {(x[i], y[i]) for i in want}


def test_pareto_front_of_the_main_job_by_hand():
    """L0 / dCE of the committed main job: the front is the k16 SAE (L0 16) and the w2304
    k32 SAE (L0 32, lowest dCE); everything else is dominated."""
    recs = [r for r in json.loads((MAIN / "metrics.json").read_text())
            if r["variant"] != "clean" and math.isfinite(r["l0"] if r["l0"] is not None else float("nan"))]
    names = [r["variant"] for r in recs]
    front = figures.pareto_front([r["l0"] for r in recs], [r["dce"] for r in recs])
    assert [names[i] for i in front] == ["l15-w1152-k16", "l15-w2304-k32"]
    up = figures.pareto_front([r["l0"] for r in recs], [r["compute_fraction"] for r in recs], maximize_y=True)
    assert [names[i] for i in up] == ["l15-w1152-k16", "l15-w2304-k32"]


def test_concentration_curve_against_numpy():
    per_token = np.load(MAIN / "per_token_dce.npz")["l15-w2304-k32"]
    v = per_token[np.isfinite(per_token)].astype(np.float64)
    x, y = figures.concentration_curve(per_token)
    assert len(x) == len(v) + 1 and x[0] == 0 and x[-1] == 1
    assert y[0] == 0 and y[-1] == pytest.approx(1.0)
    total = v.sum()
    for k in (1, 10, 80, 805, len(v) // 2, len(v)):
        top_k = -np.partition(-v, k - 1)[:k]  # the k largest, found another way
        assert y[k] == pytest.approx(top_k.sum() / total, rel=1e-9)
    for frac in (0.01, 0.1):
        k = math.ceil(frac * len(v))
        assert figures.worst_share(per_token, frac) == pytest.approx(np.sort(v)[-k:].sum() / total)
    # this SAE helps 40% of tokens, so its worst 10% carry more than the whole net damage
    assert figures.worst_share(per_token, 0.1) > 1


def test_profile_deltas_against_pandas(main_copy):
    """The profile's delta accuracy and delta log-prob per category equal a direct paired
    computation on the per-question CSV."""
    run = saved_runs.load_runs([main_copy])[0]
    pq = main_mmlu_questions()
    clean = pq[pq.variant == "clean"].set_index(["subject", "doc_id"])
    for v in ("l15-w1152-k16", "neurons:32@15.resid_post"):
        var = pq[pq.variant == v].set_index(["subject", "doc_id"]).loc[clean.index]
        d_acc = (var["correct"] - clean["correct"]).groupby(clean["category"]).mean()
        d_logp = (var["logp_correct"] - clean["logp_correct"]).groupby(clean["category"]).mean()
        rows = run.profile[run.profile.variant == v].set_index("group")
        for cat in d_acc.index:
            group = f"MMLU {layouts.CATEGORY_LABEL[cat]} (acc)"
            assert rows.loc[group, "delta"] == pytest.approx(d_acc[cat])
            assert rows.loc[group, "delta_logp"] == pytest.approx(d_logp[cat])
            assert rows.loc[group, "delta_lo"] <= rows.loc[group, "delta"] <= rows.loc[group, "delta_hi"]
        assert rows.loc["MMLU all (acc)", "delta"] == pytest.approx((var["correct"] - clean["correct"]).mean())


# ---------------------------------------------------------------- run folders

@pytest.fixture(scope="module")
def main_copy(tmp_path_factory):
    """results/main as committed, without its report (the report must come from its data)."""
    dst = tmp_path_factory.mktemp("runs") / "main"
    shutil.copytree(MAIN, dst, ignore=shutil.ignore_patterns("report.html", "*.png", "*.pdf"))
    return dst


def make_synthetic_run(folder: Path, model_spec: str = "smollm2-135m", seed: int = 1) -> Path:
    """A small run folder with every optional file: two SAEs, their ablations, per-token dCE,
    an all-tasks per-question file (MMLU subjects + one other task), generations and damage."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    main_cfg = json.loads((MAIN / "config.json").read_text())
    model = dict(main_cfg["model"], spec=model_spec)
    config = {"run": {"model": model_spec, "law": "epoch", "n_boot": 200, "seed": 0, "tokens": 512},
              "model": model, "versions": main_cfg["versions"], "machine": "test machine",
              "saes": [{"spec": "sae-a", "kind": "sae", "hook": "blocks.3.hook_resid_post", "files": {}}],
              "tokens_sha256": "synthetic", "command": {"line": "sae-harness ce --sae sae-a", "cwd": "/x"},
              "compute_equivalents": {"law": "epoch", "E_band": [1.5, 2.5]}}
    (folder / "config.json").write_text(json.dumps(config))
    clean = 3.2
    recs = [dict(variant="clean", hooks=[], ce_clean=clean, ce_spliced=clean, dce=0.0, dce_ci_low=0.0,
                 dce_ci_high=0.0, kl=0.0, l0=None, explained_variance=None, dead_frac=None, n_tokens=500,
                 loss_recovered_zero=None, loss_recovered_mean=None, compute_fraction=1.0,
                 compute_fraction_low=1.0, compute_fraction_high=1.0)]
    for name, dce, l0 in (("sae-a", 0.1, 20.0), ("sae-b", 0.3, 10.0)):
        recs.append(dict(variant=name, hooks=["blocks.3.hook_resid_post"], ce_clean=clean, ce_spliced=clean + dce,
                         dce=dce, dce_ci_low=dce - 0.02, dce_ci_high=dce + 0.02, kl=dce * 1.5, l0=l0,
                         explained_variance=0.9, dead_frac=0.01, n_tokens=500, loss_recovered_zero=0.97,
                         loss_recovered_mean=0.93, compute_fraction=0.5 - dce, compute_fraction_low=0.4 - dce,
                         compute_fraction_high=0.6 - dce))
    recs.append(dict(variant="zero@3.resid_post", hooks=["blocks.3.hook_resid_post"], ce_clean=clean,
                     ce_spliced=9.0, dce=5.8, dce_ci_low=5.6, dce_ci_high=6.0, kl=6.0, l0=None,
                     explained_variance=-0.5, dead_frac=None, n_tokens=500))
    (folder / "metrics.json").write_text(json.dumps(recs))
    (folder / "compute_equivalents.json").write_text(json.dumps({"law": "epoch", "variants": {}}))
    per_token = {"clean": rng.gamma(2.0, 1.5, (4, 127)).astype(np.float32)}
    per_token["sae-a"] = rng.normal(0.1, 0.5, (4, 127)).astype(np.float32)
    per_token["sae-b"] = rng.normal(0.3, 0.8, (4, 127)).astype(np.float32)
    per_token["zero@3.resid_post"] = rng.normal(5.8, 2.0, (4, 127)).astype(np.float32)
    for a in per_token.values():
        a[:, 0] = np.nan  # outside the token set
    np.savez_compressed(folder / "per_token_dce.npz", **per_token)
    rows = []  # per_question.csv as the task stage writes it (harness.lmeval.samples.COLUMNS)
    for variant in ("clean", "sae-a", "sae-b"):
        for task, subject, category, n in (("mmlu", "anatomy", "stem", 12), ("mmlu", "marketing", "other", 12),
                                           ("hellaswag_offline", "", "", 30)):
            for doc in range(n):
                rows.append({"variant": variant, "task": task, "subject": subject, "category": category,
                             "doc_id": doc, "correct": int(rng.random() < 0.5),
                             "correct_norm": int(rng.random() < 0.5) if task != "mmlu" else None,
                             "logp_correct": -rng.gamma(2, 0.7), "pred": int(rng.integers(0, 4))})
    pd.DataFrame(rows).to_csv(folder / "per_question.csv", index=False)
    gens = [{"prompt": "The capital of France is", "variants": {
        "clean": {"text": " Paris. It is", "first_divergence": None},
        "sae-a": {"text": " Paris. It was", "first_divergence": 3, "clean_logprob": -4.2, "kl": 0.31},
        "sae-b": {"text": " a city", "first_divergence": 0, "clean_logprob": -9.9, "kl": 1.2}}}]
    (folder / "generations.json").write_text(json.dumps(gens))
    (folder / "damage.json").write_text(json.dumps({"variants": {
        "sae-a": {"share_worst_1pct": 0.2, "share_worst_10pct": 0.9, "frac_worse": 0.55},
        "sae-b": {"share_worst_1pct": 0.1, "share_worst_10pct": 0.6, "frac_worse": 0.65}}}))
    return folder


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return make_synthetic_run(tmp_path_factory.mktemp("runs") / "synth")


@pytest.fixture(scope="module")
def main_page(main_copy):
    path = report.write_report([main_copy])
    return path, path.read_text()


@pytest.fixture(scope="module")
def comparison_page(main_copy, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "both"
    result = CliRunner().invoke(app, ["report", str(main_copy), str(synthetic), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "report.html", (out / "report.html").read_text()


def _table_rows(page: str, cls: str) -> list[list[str]]:
    """Cell texts (tags stripped) of the table with this class."""
    table = re.search(rf'<table class="{cls}">(.*?)</table>', page, re.S).group(1)
    body = table.split("<tbody>")[1]
    return [[" ".join(re.sub(r"<[^>]+>", " ", c.replace("<wbr>", "")).split())
             for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def _table_headers(page: str, cls: str) -> list[str]:
    head = re.search(rf'<table class="{cls}"><thead>(.*?)</thead>', page, re.S).group(1)
    return [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in re.findall(r"<th>(.*?)</th>", head, re.S)]


# ---------------------------------------------------------------- the single-run page

def test_headline_has_each_variant_once_with_its_numbers(main_page):
    _, page = main_page
    metrics = json.loads((MAIN / "metrics.json").read_text())
    rows = _table_rows(page, "headline")
    heads = _table_headers(page, "headline")
    col = {name: next(i for i, h in enumerate(heads) if h.startswith(name))
           for name in ("CE", "dCE", "C_eff/C", "loss recovered vs zero", "loss recovered vs mean")}
    shown = [r for r in metrics if not r["variant"].startswith(("zero@", "mean@"))]
    assert [row[0].split()[0] for row in rows] == [r["variant"] for r in shown]  # once each, in order
    for row, r in zip(rows, shown):
        assert row[col["CE"]] == f"{r['ce_spliced']:.3f}"
        assert row[col["dCE"]] == f"{r['dce']:.3f} [{r['dce_ci_low']:.3f}, {r['dce_ci_high']:.3f}]"
        mark = "‡" if r.get("compute_fraction_extrapolated") else ""  # outside the law's fitted runs
        assert row[col["C_eff/C"]] == (f"{r['compute_fraction']:.3g}{mark} [{r['compute_fraction_low']:.3g}, "
                                       f"{r['compute_fraction_high']:.3g}]")
        if r["variant"] != "clean":
            assert row[col["loss recovered vs zero"]] == f"{100 * r['loss_recovered_zero']:.1f}%"
            assert row[col["loss recovered vs mean"]] == f"{100 * r['loss_recovered_mean']:.1f}%"
    assert "hoffmann frontier" in page  # the law is named beside C_eff/C
    ablations = _table_rows(page, "small")[:6]
    assert [row[0] for row in ablations] == [r["variant"] for r in metrics
                                             if r["variant"].startswith(("zero@", "mean@"))]


def test_profile_table_one_row_per_variant(main_page):
    _, page = main_page
    rows = _table_rows(page, "profile")
    names = [row[0] for row in rows]
    assert names == list(dict.fromkeys(main_mmlu_questions()["variant"]))
    others = pd.read_csv(MAIN / "per_question.csv").task.nunique() - 1 if (MAIN / "per_question.csv").is_file() else 0
    assert len(rows[0]) == 1 + 5 + others  # stem, humanities, social sciences, other, MMLU pooled; other tasks


def test_page_is_self_contained_and_figures_saved(main_page, main_copy):
    path, page = main_page
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(report.FIGURES) and all(src.startswith("data:image/png;base64,") for src in images)
    for name, src in zip(report.FIGURES, images):
        png = (main_copy / f"{name}.png").read_bytes()
        assert base64.b64decode(src.split(",", 1)[1]) == png  # the embedded figure is the saved one
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert (main_copy / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page) and "url(" not in page
    assert ("Side-by-side generations" in page) == (main_copy / "generations.json").is_file()
    recorded = "command" in json.loads((main_copy / "config.json").read_text())
    assert ("not recorded" in page) != recorded  # a config older than command recording says so


def test_runner_records_the_command_line():
    from harness.jobs.runfolder import command_line

    import os
    import shlex
    import sys

    got = command_line()  # under pytest-xdist a worker's argv is ["-c"]
    assert set(got) == {"line", "cwd"} and got["cwd"] == os.getcwd()
    assert shlex.split(got["line"])[-1] == sys.argv[-1]


# ---------------------------------------------------------------- several runs, optional files, errors

def test_comparison_page_has_every_variant_of_every_run(comparison_page, synthetic):
    path, page = comparison_page
    rows = _table_rows(page, "headline")
    names = [row[0].split()[0] for row in rows]
    assert "main/l15-w2304-k32" in names and "synth/sae-b" in names and "synth/clean" in names
    assert len(names) == len(set(names))
    assert "different token sets" in page
    for name in report.FIGURES:
        assert (path.parent / f"{name}.png").is_file()
    # the synthetic run's tasks: MMLU's categories, MMLU pooled, and hellaswag in the profile
    header = re.search(r'<table class="profile"><thead>(.*?)</thead>', page, re.S).group(1)
    assert "HellaSwag<br><span class=n>acc_norm" in header and "MMLU STEM" in header and "MMLU all" in header
    # generations: the part after the clean text's prefix is marked
    assert "Paris. It <mark>was</mark>" in page and "<mark>a city</mark>" in page
    # the damage numbers come once each (no raw damage.json columns beside them)
    head = re.search(r"Where the damage lives, in numbers.*?<thead>(.*?)</thead>", page, re.S).group(1)
    cols = [" ".join(re.sub(r"<[^>]+>", " ", c).split()).lower() for c in re.findall(r"<th>(.*?)</th>", head)]
    assert len(cols) == len(set(cols)) and not any("total" in c or "_" in c for c in cols)


def test_optional_parts_absent(tmp_path, synthetic):
    """A run with only config.json and metrics.json still gets a page, with the figures it
    cannot draw explained."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.json"):
        shutil.copy(synthetic / name, bare / name)
    page = report.write_report([bare]).read_text()
    assert "(c) not drawn" in page and "(d) not drawn" in page and "(e) not drawn" in page
    assert page.count("<img ") == 2  # compute and trade-off


def test_run_being_written_is_named_by_its_final_folder(tmp_path, synthetic):
    """The runner renders the page inside its temporary folder; the page names the final one."""
    final = tmp_path / "final-name"
    page = report.write_report([synthetic], tmp_path / "page", final_paths=[final]).read_text()
    assert "run final-name" in page and f"<code>{final}</code>" in page and str(synthetic) not in page


def test_different_clean_models_are_one_line_error(tmp_path, main_copy):
    other = make_synthetic_run(tmp_path / "other", model_spec="gpt2")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["report", str(main_copy), str(other), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "runs differ in their clean model (spec)" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{")), "cannot read"),
])
def test_bad_run_folder_is_one_line_error(tmp_path, make, message):
    folder = tmp_path / "run"
    make(folder)
    result = CliRunner().invoke(app, ["report", str(folder)])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (folder / "report.html").exists()


# ---------------------------------------------------------------- in a real browser

needs_chromium = pytest.mark.skipif(browser.find_chromium() is None,
                                    reason="no chromium on PATH (Debian: apt-get install chromium); "
                                           "the browser rendering check needs it")


def _pixel_std(png: bytes) -> float:
    from matplotlib.image import imread

    return float(imread(io.BytesIO(png), format="png")[..., :3].std())


@needs_chromium
@pytest.mark.parametrize("which", ["main_page", "comparison_page"])
def test_report_renders_in_chromium(which, request):
    path, _ = request.getfixturevalue(which)
    seen = browser.inspect_page(path, width=1400)
    assert len(seen["images"]) == len(report.FIGURES)
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 0, img["alt"]
    assert seen["console_errors"] == []
    assert all(url.startswith(("file:", "data:")) for url in seen["requests"])
    assert seen["scrollWidth"] <= seen["clientWidth"] and seen["overflowing"] == []  # no sideways scroll
    wide = [t for t in seen["tables"] if t["scrolls"] or t["width"] > t["container"] + 1]
    assert seen["tables"] and wide == []  # every table fits its box: no column hidden behind a scrollbar
    assert "Headline: how much each splice costs" in seen["headings"]
    assert _pixel_std(seen["screenshot"]) > 0.05  # not a blank page


@needs_chromium
def test_browser_check_catches_a_broken_page(tmp_path):
    """The checks above can fail: a missing image, a script error and a wide table are seen."""
    page = tmp_path / "broken.html"
    page.write_text("<!doctype html><body><img alt=gone src='missing.png'>"
                    "<script>console.error('boom'); undefinedFunction();</script>"
                    "<div style='width:3000px'>wide</div>"
                    "<div class=scroll style='overflow-x:auto;max-width:100%'><table><tr>"
                    + "<td style='white-space:nowrap'>a wide table cell</td>" * 80 + "</tr></table></div></body>")
    seen = browser.inspect_page(page, width=1400)
    assert seen["images"][0]["naturalWidth"] == 0
    assert any("boom" in e for e in seen["console_errors"])
    assert any("undefinedFunction is not defined" in e for e in seen["console_errors"])
    assert any("missing.png" in url for url in seen["requests"])
    assert seen["scrollWidth"] > seen["clientWidth"] and seen["overflowing"]
    assert seen["tables"][0]["scrolls"] and seen["tables"][0]["width"] > seen["tables"][0]["container"]


def test_report_flaws_stay_fixed(main_page, synthetic, tmp_path):
    """The evaluated text reads as fields, not a Python dict; a run without noise@ variants has
    no size-or-direction heading; the concentration curve's caption says why it passes 1."""
    _, page = main_page
    prov = re.search(r'<table class="prov">(.*?)</table>', page, re.S).group(1)
    text_row = re.search(r"<td>evaluated text</td><td>(.*?)</td>", prov, re.S).group(1)
    assert "{" not in text_row and "source: builtin" in text_row
    assert "the error's size or its direction?" in page  # the main job has noise@ twins
    assert "can pass 1" in page
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "metrics.json"):
        shutil.copy(synthetic / name, bare / name)
    other = report.write_report([bare]).read_text()
    assert "<h3>Reconstruction</h3>" in other and "size or its direction" not in other
