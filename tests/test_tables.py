"""Degradation tables on a hand-built fixture, checked against numbers computed here."""

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from harness.output import tables

# 2 subjects (both stem, unequal sizes so the two category weightings differ), 12 questions
CLEAN = {"abstract_algebra": [1, 1, 1, 0, 1, 0, 1, 1], "college_physics": [0, 1, 1, 0]}
SAE = {"abstract_algebra": [1, 0, 1, 0, 0, 0, 1, 1], "college_physics": [1, 1, 0, 0]}
LOGP_CLEAN = {"abstract_algebra": [-0.1, -0.2, -0.3, -1.5, -0.4, -2.0, -0.2, -0.1],
              "college_physics": [-1.2, -0.5, -0.6, -1.8]}
LOGP_SAE = {"abstract_algebra": [-0.3, -1.4, -0.5, -1.6, -1.1, -2.2, -0.2, -0.4],
            "college_physics": [-0.7, -0.6, -1.3, -1.9]}
SAE_NAME = "sae_l15-k32"  # underscore: must be escaped in LaTeX
B = 2000


def fixture_df(seed=0) -> pd.DataFrame:
    rows = []
    for variant, correct, logp in [("clean", CLEAN, LOGP_CLEAN), (SAE_NAME, SAE, LOGP_SAE)]:
        for subject in CLEAN:
            for i, (c, lp) in enumerate(zip(correct[subject], logp[subject])):
                rows.append({"variant": variant, "subject": subject, "category": "stem", "doc_id": i,
                             "correct": c, "logp_correct": lp, "pred": 0 if c else 1})
    # shuffled: the tables must pair rows by (subject, doc_id), not by position
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def arrays(d):  # questions in (subject, doc_id) order, the order output/tables.py resamples in
    return np.array([x for s in sorted(d) for x in d[s]], dtype=float)


def loop_bootstrap(cb, cv, n_boot, seed):
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(cb), size=len(cb))
        reps.append(cv[idx].mean() - cb[idx].mean())
    return np.percentile(reps, [2.5, 97.5])


def row(table, group, variant=SAE_NAME, weighting="question"):
    r = table[(table.group == group) & (table.variant == variant) & (table.weighting == weighting)]
    assert len(r) == 1
    return r.iloc[0]


def test_mcnemar_hand_and_scipy():
    assert tables.mcnemar_p(0, 0) == 1.0
    assert tables.mcnemar_p(3, 1) == pytest.approx(10 / 16)  # 2 * (C(4,0) + C(4,1)) / 2^4
    assert tables.mcnemar_p(2, 0) == pytest.approx(0.5)
    for b, c in [(3, 1), (0, 5), (7, 2), (20, 9), (13, 13), (40, 0)]:
        assert tables.mcnemar_p(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_subject_table_numbers():
    t = tables.subject_table(fixture_df(), n_boot=B, seed=3)
    aa = row(t, "abstract_algebra")
    assert (aa.n, aa.acc, aa.delta) == (8, 0.5, -0.25)
    assert (aa.b, aa.c) == (2, 0) and aa.p_mcnemar == pytest.approx(0.5)
    assert aa.logp == pytest.approx(np.mean(LOGP_SAE["abstract_algebra"]))
    assert aa.delta_logp == pytest.approx(np.mean(LOGP_SAE["abstract_algebra"]) - np.mean(LOGP_CLEAN["abstract_algebra"]))
    cp = row(t, "college_physics")
    assert (cp.acc, cp.delta, cp.b, cp.c, cp.p_mcnemar) == (0.5, 0.0, 1, 1, 1.0)
    assert row(t, "abstract_algebra", "clean").acc == 0.75
    al = row(t, "all")
    assert al.n == 12 and al.acc == pytest.approx(0.5) and al.delta == pytest.approx(-2 / 12)
    assert (al.b, al.c) == (3, 1) and al.p_mcnemar == pytest.approx(0.625)
    # paired bootstrap, recomputed with a plain loop, same seed and recipe
    for group, cb, cv in [("abstract_algebra", CLEAN["abstract_algebra"], SAE["abstract_algebra"]),
                          ("all", arrays(CLEAN), arrays(SAE))]:
        lo, hi = loop_bootstrap(np.array(cb, float), np.array(cv, float), B, 3)
        r = row(t, group)
        assert r.delta_lo == pytest.approx(lo, abs=1e-12) and r.delta_hi == pytest.approx(hi, abs=1e-12)
        assert r.delta_lo <= r.delta <= r.delta_hi
    base = row(t, "all", "clean")
    assert (base.delta, base.delta_lo, base.delta_hi, base.p_mcnemar) == (0, 0, 0, 1)


def test_category_weightings_and_stratified_bootstrap():
    t = tables.category_table(fixture_df(), n_boot=B, seed=5)
    q = row(t, "stem", weighting="question")
    s = row(t, "stem", weighting="subject")
    # pooled: 6/12 vs 8/12; subject-averaged: mean(4/8, 2/4) vs mean(6/8, 2/4)
    assert q.acc == pytest.approx(0.5) and q.delta == pytest.approx(-1 / 6)
    assert s.acc == pytest.approx(0.5) and s.delta == pytest.approx(-0.125)
    assert row(t, "stem", "clean", "subject").acc == pytest.approx(0.625)
    assert row(t, "stem", "clean", "question").acc == pytest.approx(8 / 12)
    assert (q.b, q.c, s.b, s.c) == (3, 1, 3, 1)  # McNemar uses the pooled pairs in both
    assert row(t, "all", weighting="subject").delta == pytest.approx(-0.125)

    lo, hi = loop_bootstrap(arrays(CLEAN), arrays(SAE), B, 5)
    assert (q.delta_lo, q.delta_hi) == pytest.approx((lo, hi), abs=1e-12)
    # stratified: per subject (sorted), n_boot draws within the subject; replicate = mean over subjects
    rng = np.random.default_rng(5)
    per_subject = []
    for subj in sorted(CLEAN):
        cb, cv = np.array(CLEAN[subj], float), np.array(SAE[subj], float)
        d = []
        for _ in range(B):
            idx = rng.integers(0, len(cb), size=len(cb))
            d.append(cv[idx].mean() - cb[idx].mean())
        per_subject.append(d)
    lo, hi = np.percentile(np.mean(per_subject, axis=0), [2.5, 97.5])
    assert (s.delta_lo, s.delta_hi) == pytest.approx((lo, hi), abs=1e-12)
    lp = np.mean([np.mean(LOGP_SAE[x]) for x in sorted(LOGP_SAE)])
    assert s.logp == pytest.approx(lp)


def test_same_seed_same_table_and_tidy():
    df = fixture_df()
    a = tables.tidy(df, n_boot=200, seed=1)
    b = tables.tidy(fixture_df(seed=9), n_boot=200, seed=1)
    pd.testing.assert_frame_equal(a, b)
    assert set(a.level) == {"subject", "category"}
    assert list(a.columns[:5]) == ["level", "group", "category", "weighting", "variant"]


def test_wide_table_shape():
    t = tables.subject_table(fixture_df(), n_boot=100)
    w = tables.wide_table(t)
    assert list(w.index) == ["abstract_algebra", "college_physics", "all"]
    assert w.columns.names == ["variant", "stat"]
    assert list(w.columns.get_level_values(0).unique()) == ["clean", SAE_NAME]
    assert ("clean", "acc") in w.columns and ("clean", "delta") not in w.columns  # baseline: no deltas
    assert w.loc["abstract_algebra", (SAE_NAME, "delta")] == -0.25
    wc = tables.wide_table(tables.category_table(fixture_df(), n_boot=100))
    assert wc.index.names == ["weighting", "group"]
    assert wc.loc[("subject", "stem"), (SAE_NAME, "delta")] == pytest.approx(-0.125)


def test_exports_latex_markdown_csv_json(tmp_path):
    t = tables.subject_table(fixture_df(), n_boot=100)
    w = tables.wide_table(t)
    tex = tables.to_latex(w, tmp_path / "t.tex")
    assert (tmp_path / "t.tex").read_text() == tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}", r"\end{tabular}"):
        assert tex.count(rule) == 1
    assert r"abstract\_algebra" in tex and not re.search(r"(?<!\\)_", tex)  # every _ escaped
    assert r"\multicolumn{7}{c}{sae\_l15-k32}" in tex and r"\multicolumn{2}{c}{clean}" in tex
    assert r"\cmidrule(lr)" in tex
    lines = tex.splitlines()
    body = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert len(body) == 3 and all(line.endswith(r"\\") and line.count("&") == 9 for line in body)
    assert tables.latex_escape("a_b&c%d$e#f{g}") == r"a\_b\&c\%d\$e\#f\{g\}"

    md = tables.to_markdown(w)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| group") and set(lines[1]) <= set("|-: ")
    assert len(lines) == 2 + 3 and len({line.count("|") for line in lines}) == 1
    assert "| abstract_algebra" in md and "0.5000" in md and "-0.2500" in md

    back = pd.read_csv(io.StringIO(tables.to_csv(t)))
    assert back.shape == t.shape and np.allclose(back.acc, t.acc)
    recs = json.loads(tables.to_json(t, tmp_path / "t.json"))
    assert len(recs) == len(t) and recs[0]["variant"] == "clean"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    path.write_text("old\n")

    def boom(src, dst):
        raise OSError("disk full")

    from harness import files

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["table.csv"]


def test_build_table_round_trip(tmp_path):
    df = fixture_df()
    # two runs sharing the same clean baseline, each with its own SAE
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    tables.save_per_question(df, run1)
    other = df.copy()
    other["variant"] = other["variant"].replace({SAE_NAME: "other_sae"})
    tables.save_per_question(other, run2)
    loaded = tables.load_run_results([run1, run2])
    assert len(loaded) == 36 and list(loaded.columns) == tables.COLUMNS

    csv = tables.build_table([run1], level="category", fmt="csv", n_boot=300, seed=2)
    expect = tables.category_table(df, n_boot=300, seed=2)
    got = pd.read_csv(io.StringIO(csv))
    assert list(got.columns) == list(expect.columns)
    assert np.allclose(got[["acc", "delta", "delta_lo", "delta_hi", "p_mcnemar"]],
                       expect[["acc", "delta", "delta_lo", "delta_hi", "p_mcnemar"]])
    js = json.loads(tables.build_table([run1, run2], level="subject", fmt="json", n_boot=50))
    assert {r["variant"] for r in js} == {"clean", SAE_NAME, "other_sae"}
    md = tables.build_table([run1, run2], level="subject", fmt="md", n_boot=50)
    assert md.startswith(f"| Subject | n | clean (%) | {SAE_NAME} | other_sae |")  # subjects as rows
    wide = tables.build_table([run1, run2], level="subject", fmt="md", n_boot=50, layout="wide")
    assert f"{SAE_NAME}/delta" in wide and "other_sae/acc" in wide
    tex = tables.build_table(str(run1), level="category", fmt="latex", n_boot=50)
    assert r"\toprule" in tex and r"social\_sciences" not in tex  # only stem in the fixture


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tables.load_run_results([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="mmlu_per_question.csv not found"):
        tables.build_table([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    fixture_df().drop(columns=["logp_correct"]).to_csv(bad / tables.PER_QUESTION_FILE, index=False)
    with pytest.raises(ValueError, match=r"lacks columns \['logp_correct'\]") as err:
        tables.load_run_results(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="baseline variant 'nope'"):
        tables.subject_table(fixture_df(), baseline="nope")
    with pytest.raises(ValueError, match="other questions"):
        tables.subject_table(fixture_df().iloc[1:])
    with pytest.raises(ValueError, match="level must be"):
        tables.build_table([tmp_path], level="token")
    # the same variant name with different answers in two runs is ambiguous
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    tables.save_per_question(fixture_df(), r1)
    flipped = fixture_df()
    flipped.loc[flipped.variant == "clean", "correct"] = 1 - flipped.loc[flipped.variant == "clean", "correct"]
    tables.save_per_question(flipped, r2)
    with pytest.raises(ValueError, match="different answers"):
        tables.load_run_results([r1, r2])


# ---------------------------------------------------------------- every task: task table and layouts

HS = {"clean": ([1] * 12, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),  # (acc, acc_norm) per question
      SAE_NAME: ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], [1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1])}
HS_LOGP = {"clean": np.linspace(-0.2, -1.3, 12), SAE_NAME: np.linspace(-0.9, -1.1, 12)}
WG = {"clean": [1, 0, 1, 1, 0, 1, 0, 1], SAE_NAME: [1, 1, 0, 1, 0, 0, 0, 1]}


def tasks_df() -> pd.DataFrame:
    """fixture_df's MMLU (no task column: an older run's layout) plus HellaSwag (acc and
    acc_norm) and Winogrande (acc only), shuffled."""
    rows = []
    for v in ("clean", SAE_NAME):
        for i, (a, an) in enumerate(zip(*HS[v])):
            rows.append({"variant": v, "task": "hellaswag_offline", "subject": "", "category": "", "doc_id": i,
                         "correct": a, "correct_norm": an, "logp_correct": HS_LOGP[v][i], "pred": 1 - a})
        for i, a in enumerate(WG[v]):
            rows.append({"variant": v, "task": "winogrande_offline", "subject": "", "category": "", "doc_id": i,
                         "correct": a, "correct_norm": np.nan, "logp_correct": -0.1 * i - a, "pred": 0})
    mmlu = fixture_df()
    mmlu["task"], mmlu["correct_norm"] = "mmlu", np.nan
    return pd.concat([pd.DataFrame(rows), mmlu]).sample(frac=1, random_state=1).reset_index(drop=True)


def task_row(t, task, metric="acc", variant=SAE_NAME, group="all"):
    r = t[(t.task == task) & (t.metric == metric) & (t.variant == variant) & (t.group == group)]
    assert len(r) == 1
    return r.iloc[0]


def test_task_table_numbers():
    t = tables.task_table(tasks_df(), n_boot=B, seed=4)
    assert list(dict.fromkeys(t.task)) == ["mmlu", "hellaswag_offline", "winogrande_offline"]
    assert set(t[t.task == "winogrande_offline"].metric) == {"acc"}
    assert set(t[t.task == "hellaswag_offline"].metric) == {"acc", "acc_norm"}
    assert set(t[t.task == "mmlu"].group) == {"all", "stem"}
    for metric, k in (("acc", 0), ("acc_norm", 1)):
        cb, cv = np.array(HS["clean"][k], float), np.array(HS[SAE_NAME][k], float)
        r = task_row(t, "hellaswag_offline", metric)
        assert r.n == 12 and r.acc == pytest.approx(cv.mean()) and r.delta == pytest.approx(cv.mean() - cb.mean())
        b, c = int(((cb == 1) & (cv == 0)).sum()), int(((cb == 0) & (cv == 1)).sum())
        assert (r.b, r.c) == (b, c)
        assert r.p_mcnemar == pytest.approx(binomtest(b, b + c, 0.5).pvalue if b + c else 1.0, rel=1e-9)
        assert (r.delta_lo, r.delta_hi) == pytest.approx(tuple(loop_bootstrap(cb, cv, B, 4)), abs=1e-12)
        assert r.delta_logp == pytest.approx(np.mean(HS_LOGP[SAE_NAME] - HS_LOGP["clean"]))
        assert task_row(t, "hellaswag_offline", metric, "clean").acc == pytest.approx(cb.mean())
    assert task_row(t, "hellaswag_offline", "acc").p_mcnemar == pytest.approx(2 * 0.5 ** 10)  # b=10, c=0
    wg = task_row(t, "winogrande_offline")
    assert (wg.acc, wg.delta, wg.b, wg.c) == (0.5, -0.125, 2, 1)
    # MMLU's rows are the category table's pooled ("question") rows
    cat = tables.category_table(tasks_df(), n_boot=B, seed=4)
    for group in ("all", "stem"):
        m, q = task_row(t, "mmlu", group=group), row(cat, group)
        for stat in ("n", "acc", "delta", "delta_lo", "delta_hi", "p_mcnemar", "delta_logp"):
            assert m[stat] == pytest.approx(q[stat], abs=1e-12)


def test_paper_layout_cells_markdown_csv_latex(tmp_path):
    run = tmp_path / "run"
    tables.save_per_question(tasks_df(), run)
    t = tables.task_table(tasks_df(), n_boot=300, seed=0)
    md = tables.build_table(run, level="task", fmt="md", n_boot=300)
    lines = md.splitlines()
    assert lines[0] == ("| Variant | MMLU (acc, n=12) | HellaSwag (acc_norm, n=12) | WinoGrande (acc, n=8) |")
    clean = lines[2].split(" | ")
    assert clean[0] == "| clean (%)" and clean[2] == f"{100 * np.mean(HS['clean'][1]):.1f}"
    hs = task_row(t, "hellaswag_offline", "acc_norm")
    cell = lines[3].split(" | ")[2]
    assert cell == f"{100 * hs.delta:+.1f} [{100 * hs.delta_lo:+.1f}, {100 * hs.delta_hi:+.1f}]".replace("+0.0", "0.0")
    # acc on HellaSwag: 10 of 12 lost, McNemar p = 2^-9 and an interval below 0 -> both marks
    acc = tables.build_table(run, level="task", fmt="md", n_boot=300, metric="acc").splitlines()[3].split(" | ")[2]
    h = task_row(t, "hellaswag_offline", "acc")
    assert h.delta_hi < 0 and h.p_mcnemar < 0.05
    assert acc == f"{100 * h.delta:+.1f}*† [{100 * h.delta_lo:+.1f}, {100 * h.delta_hi:+.1f}]"
    assert "* exact McNemar p < 0.05; † the interval excludes 0" in md

    csv = pd.read_csv(io.StringIO(tables.build_table(run, level="task", fmt="csv", n_boot=300, layout="paper")))
    assert list(csv.columns) == ["Variant", "MMLU (acc, n=12)", "HellaSwag (acc_norm, n=12)", "WinoGrande (acc, n=8)"]
    assert csv.iloc[1, 2] == cell  # the spreadsheet shows what the README shows

    tex = tables.build_table(run, level="task", fmt="latex", n_boot=300, metric="acc")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\caption{", r"\label{tab:tasks}"):
        assert rule in tex
    assert tex.count(r"\toprule") == 1 and tex.count(r"\bottomrule") == 1
    assert f"${100 * h.delta:+.1f}^{{*\\dagger}}$" in tex and r"$^{\dagger}$ the interval excludes 0" in tex
    body = tex.split("\n", 1)[1]  # after the leading % comment: every _, %, # escaped
    assert r"sae\_l15-k32" in tex and not re.search(r"(?<!\\)[_%#]", body)


def test_long_and_wide_layouts(tmp_path):
    run = tmp_path / "run"
    tables.save_per_question(tasks_df(), run)
    t = tables.task_table(tasks_df(), n_boot=50)
    w = tables.wide_table(t)
    assert w.index.names == ["task", "group", "metric"] and len(w) == 5  # mmlu all/stem, hs acc/acc_norm, wg acc
    assert w.loc[("winogrande_offline", "all", "acc"), (SAE_NAME, "delta")] == -0.125
    long_csv = pd.read_csv(io.StringIO(tables.build_table(run, level="task", fmt="csv", n_boot=50)))
    assert len(long_csv) == len(t) and list(long_csv.columns) == list(t.columns)
    long_md = tables.build_table(run, level="task", fmt="md", layout="long", n_boot=50).split("\n\n")[0].splitlines()
    assert len(long_md) == 2 + len(t)
    assert long_md[0].startswith("| Variant | Task | Group | Metric | n | acc (%) |")
    wide_md = tables.build_table(run, level="task", fmt="md", layout="wide", n_boot=50)
    assert f"{SAE_NAME}/p_mcnemar" in wide_md
    long_tex = tables.build_table(run, level="category", fmt="latex", layout="long", n_boot=50)
    assert r"\addlinespace" in long_tex and "McNemar $p$" in long_tex


def _dagger(r: dict, key: str) -> str:
    """The table's mark for a reading outside the runs its law was fitted on."""
    return "‡" if r.get(f"{key}_extrapolated") else ""


def test_ce_table_from_a_real_run():
    main = Path(__file__).resolve().parent.parent / "results" / "main"
    records = json.loads((main / "metrics.json").read_text())
    md = tables.build_table(main, level="ce", fmt="md")
    lines = md.split("\n\n")[0].splitlines()
    robust = "explained_variance_robust" in records[0]  # runs from before massive-activation detection lack it
    ratios = any("dce_over_noise" in x for x in records)  # runs with noise@ twins show the ratios
    fixed = any("n_eff_frac_fixed_d_low" in x for x in records)  # the fixed-tokens readings
    top1 = "top1_agreement" in records[1]  # runs from before top-1 agreement lack it
    assert lines[0] == ("| Variant | L0 | dCE [95% CI] | KL |" + (" top-1 agree [95% CI] |" if top1 else "")
                        + " LR zero | LR mean | C_eff/C frontier [95% CI] |"
                        + (" N_eff/N at D [95% CI] | D_eff/D at N [95% CI] |" if fixed else "")
                        + (" dCE ÷ noise [95% CI] | KL ÷ noise [95% CI] |" if ratios else "") + " EV |"
                        + (" EV w/o massive (n) |" if robust else ""))
    assert len(lines) == 2 + len(records) - 1  # the clean model is the reference, in the caption
    r = next(x for x in records if x["variant"] == "l15-w2304-k32")
    expect = [r["variant"], f"{r['l0']:g}", f"{r['dce']:.3f} [{r['dce_ci_low']:.3f}, {r['dce_ci_high']:.3f}]",
              f"{r['kl']:.3f}"]
    if top1:
        expect.append(f"{r['top1_agreement']:.3f} [{r['top1_agreement_low']:.3f}, {r['top1_agreement_high']:.3f}]")
    expect += [f"{r['loss_recovered_zero']:.3f}", f"{r['loss_recovered_mean']:.3f}",
              f"{r['compute_fraction']:.3f}{_dagger(r, 'compute_fraction')} [{r['compute_fraction_low']:.3f}, "
              f"{r['compute_fraction_high']:.3f}]"]
    if fixed:
        expect += [f"{r[k]:.3f}{_dagger(r, k)} [{r[k + '_low']:.3f}, {r[k + '_high']:.3f}]"
                   for k in ("n_eff_frac_fixed_d", "d_eff_frac_fixed_n")]
    if ratios:
        expect += [f"{r[k]:.2f} [{r[k + '_low']:.2f}, {r[k + '_high']:.2f}]" for k in ("dce_over_noise", "kl_over_noise")]
    expect.append(f"{r['explained_variance']:.3f}")
    if robust:
        expect.append(f"{r['explained_variance_robust']:.3f} ({r['n_massive']})")
    assert lines[2] == "| " + " | ".join(expect) + " |"
    z = next(x for x in records if x["variant"] == "zero@15.resid_post")
    zero_line = next(line for line in lines if line.startswith("| zero@15.resid_post |"))
    assert f"{z['compute_fraction']:.2e}" in zero_line and " – " in zero_line  # no L0 for an ablation
    caption = md.split("\n\n")[1]
    assert f"on {records[0]['n_tokens']:,} tokens" in caption and f"clean CE {records[0]['ce_clean']:.3f}" in caption
    assert "Hoffmann et al. (2022)" in caption and "E = 1.69" in caption and "alpha = 0.34" in caption
    tex = tables.build_table(main, level="ce", fmt="latex")
    assert r"\label{tab:ce}" in tex and r"$\alpha=0.34$" in tex and r"{\cdot}10^{-6}$" in tex
    numbers = pd.read_csv(io.StringIO(tables.build_table(main, level="ce", fmt="csv")))
    assert len(numbers) == len(records) and np.allclose(numbers.dce, [x["dce"] for x in records])


def test_write_tables_rebuilds_a_run_folder(tmp_path):
    """An older run (mmlu_per_question.csv, no task column) plus its CE files: every table file."""
    import shutil

    main = Path(__file__).resolve().parent.parent / "results" / "main"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.json", "compute_equivalents.json"):
        shutil.copy(main / name, run / name)
    per_q = pd.read_csv(main / "per_question.csv")  # written the older way: MMLU only, no task column
    per_q[per_q.task == "mmlu"].drop(columns="task").to_csv(run / "mmlu_per_question.csv", index=False)
    written = {p.name for p in tables.write_tables(run, n_boot=100)}
    assert written == {"ce.md", "ce.tex", *(f"{s}.{e}" for s in ("tasks", "mmlu_category", "mmlu_subject")
                                            for e in ("md", "tex", "csv", "json"))}
    assert (run / "mmlu_category.md").read_text() == tables.build_table(run, "category", "md", n_boot=100)
    assert "| Variant | STEM (acc, n=19) | Humanities (acc, n=13) | Social sci. (acc, n=12) | Other (acc, n=13) | All (acc, n=57) |" in \
        (run / "mmlu_category.md").read_text()
    assert set(tables.load_run_results(run).task) == {"mmlu"}
    with pytest.raises(ValueError, match="nothing to tabulate"):
        tables.write_tables(tmp_path)
    with pytest.raises(ValueError, match="several run folders"):
        tables.write_tables([run, run])


def test_task_table_bad_input(tmp_path):
    df = tasks_df()
    df.loc[(df.task == "hellaswag_offline") & (df.doc_id == 0), "correct_norm"] = np.nan
    with pytest.raises(ValueError, match="acc_norm is missing for some questions only"):
        tables.task_table(df)
    with pytest.raises(ValueError, match="layout must be one of paper, wide, long"):
        tables.build_table([tmp_path], level="task", layout="tall")
    with pytest.raises(ValueError, match="metrics.json not found"):
        tables.build_table([tmp_path], level="ce")
    with pytest.raises(ValueError, match="has no acc_norm; choose --metric acc"):
        run = tmp_path / "r"
        tables.save_per_question(tasks_df(), run)
        tables.build_table(run, level="task", metric="acc_norm")


def test_table_command(tmp_path):
    from typer.testing import CliRunner

    from harness.cli.app import app

    run = tmp_path / "run"
    tables.save_per_question(tasks_df(), run)
    res = CliRunner().invoke(app, ["table", str(run), "--level", "task", "--format", "csv", "--layout", "paper",
                                   "--n-boot", "50"])
    assert res.exit_code == 0 and res.stdout.startswith('Variant,"MMLU (acc, n=12)"')
    res = CliRunner().invoke(app, ["table", str(run), "--write", "--n-boot", "50"])
    assert res.exit_code == 0 and (run / "tasks.tex").is_file() and (run / "mmlu_category.md").is_file()
    res = CliRunner().invoke(app, ["table", str(run), "--layout", "tall"])
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == ["error: layout must be one of paper, wide, long, not 'tall'"]


def test_a_variant_without_a_task_gets_an_empty_cell(tmp_path):
    df = tasks_df()
    df = df[~((df.variant == SAE_NAME) & (df.task == "winogrande_offline"))]
    t = tables.task_table(df, n_boot=50)
    assert not ((t.task == "winogrande_offline") & (t.variant == SAE_NAME)).any()
    run = tmp_path / "run"
    tables.save_per_question(df, run)
    md = tables.build_table(run, level="task", fmt="md", n_boot=50).splitlines()
    assert md[3].startswith(f"| {SAE_NAME} |") and md[3].endswith("| – |")
    with pytest.raises(ValueError, match="baseline variant 'clean' has no results for task 'winogrande_offline'"):
        tables.task_table(tasks_df()[lambda d: ~((d.variant == "clean") & (d.task == "winogrande_offline"))])


def test_a_ce_column_defined_once_appears_in_all_three_outputs(monkeypatch, tmp_path, capsys):
    """Add one column to harness/output/ce_columns.py: the terminal table, ce.md / ce.tex and
    report.html all show it, with its value."""
    import shutil

    from harness.cli.app import print_ce_table
    from harness.output import ce_columns
    from harness.output.report import Labels, headline_section
    from harness.output.saved_runs import load_runs

    run = tmp_path / "main"
    shutil.copytree(Path(__file__).resolve().parent.parent / "results" / "main", run)
    records = json.loads((run / "metrics.json").read_text())
    for r in records:
        r["probe_column"] = 0.25
    (run / "metrics.json").write_text(json.dumps(records))
    new = ce_columns.Column("probe_column", "Probe column", "Probe column", "probe column html", "ratio")
    monkeypatch.setattr(ce_columns, "COLUMNS", [*ce_columns.COLUMNS, new])
    monkeypatch.setenv("COLUMNS", "500")  # wide enough for every column
    print_ce_table(records, "t")
    assert "Probe column" in capsys.readouterr().out
    md = tables.build_table(run, level="ce", fmt="md")
    assert md.splitlines()[0].endswith("| Probe column |") and md.splitlines()[2].endswith("| 0.25 |")
    assert "Probe column" in tables.build_table(run, level="ce", fmt="latex")
    runs = load_runs([run])
    page = headline_section(runs, Labels(runs))
    assert "probe column html" in page and "<td>0.25</td>" in page


@pytest.mark.parametrize("width", [100, 400])
def test_the_terminal_ce_table_fits_the_terminal(monkeypatch, capsys, width):
    """At 100 columns the CE table drops to its essential columns, says where the full one is and
    stays within the width; at 400 it shows every column. A legend follows either way."""
    from harness.cli.app import print_ce_table

    monkeypatch.setenv("COLUMNS", str(width))
    records = json.loads((Path(__file__).resolve().parent.parent / "results" / "main" / "metrics.json").read_text())
    print_ce_table(records, "t", Path("runs/x"))
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= width
    assert "C_eff/C frontier" in out and "LR zero" in out and "dCE: CE increase" in out
    assert ("Essential columns only" in out) == (width == 100) and ("EV w/o massive" in out) == (width == 400)
