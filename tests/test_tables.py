"""Degradation tables on a hand-built fixture, checked against numbers computed here."""

import io
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from harness import tables

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


def arrays(d):  # questions in (subject, doc_id) order, the order tables.py resamples in
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

    monkeypatch.setattr(tables.os, "replace", boom)
    with pytest.raises(OSError):
        tables.write_atomic(path, "new\n")
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
    assert f"{SAE_NAME}/delta" in md and "other_sae/acc" in md
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
