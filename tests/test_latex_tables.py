"""The default (paper) LaTeX tables compile with pdflatex and fit an A4 text block.

A4 paper (21 cm) with 2.5 cm margins leaves a 16 cm (455 pt) text block. Each table is
compiled in a minimal article with that text width: pdflatex measures the table's tabular
material in a box and writes its width to the log, and the same file is then set as a float,
which must compile without an overfull line. Needs pdflatex with booktabs (Debian package
texlive-latex-recommended; .ci/run installs it when missing).
"""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.output import tables

pytestmark = pytest.mark.skipif(shutil.which("pdflatex") is None,
                                reason="pdflatex not installed (apt-get install texlive-latex-recommended)")

MAIN = Path(__file__).resolve().parent.parent / "results" / "main"
TEXT_WIDTH_CM = 16.0
FLOAT_ONLY = re.compile(r"\\(begin|end)\{table\}|\\caption\{|\\label\{|\\centering")


def tabulars(tex: str) -> tuple[list[str], list[str]]:
    """The settings before the first tabular (font size, column gap) and each top-level tabular."""
    settings, blocks, current = [], [], None
    for line in tex.splitlines():
        if line.startswith(r"\begin{tabular}{"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line == r"\end{tabular}":
                blocks.append("\n".join(current))
                current = None
        elif not blocks and not FLOAT_ONLY.match(line) and not line.startswith("%"):
            settings.append(line)
    return settings, blocks


def compile_table(tex: str, folder: Path) -> tuple[float, float, str]:
    """pdflatex a document holding the table; return (widest tabular, text width) in pt and the log."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.tex").write_text(tex)
    settings, blocks = tabulars(tex)
    assert blocks, "no tabular in the table"
    measure = [r"\sbox{\tablebox}{" + "\n".join(settings + [b]) + "}\n\\typeout{TABLEWIDTH=\\the\\wd\\tablebox}"
               for b in blocks]
    doc = "\n".join([
        r"\documentclass[a4paper,10pt]{article}", r"\usepackage{booktabs}",
        rf"\setlength{{\textwidth}}{{{TEXT_WIDTH_CM}cm}}", r"\setlength{\oddsidemargin}{0pt}",
        r"\setlength{\hoffset}{-1in}\addtolength{\hoffset}{2.5cm}", r"\newsavebox{\tablebox}",
        r"\begin{document}", *measure, r"\typeout{TEXTWIDTH=\the\textwidth}",
        r"\input{table.tex}", r"\end{document}", ""])
    (folder / "doc.tex").write_text(doc)
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    log = (folder / "doc.log").read_text(errors="replace")
    assert run.returncode == 0 and (folder / "doc.pdf").is_file(), log[-2000:]
    widths = [float(w) for w in re.findall(r"TABLEWIDTH=([\d.]+)pt", log)]
    assert len(widths) == len(blocks)
    width = max(widths)
    text = float(re.search(r"TEXTWIDTH=([\d.]+)pt", log).group(1))
    return width, text, log


def assert_fits(tex: str, folder: Path) -> float:
    width, text, log = compile_table(tex, folder)
    assert text == pytest.approx(TEXT_WIDTH_CM / 2.54 * 72.27, abs=0.01)
    assert 0 < width <= text, f"table is {width:.1f} pt wide, the A4 text block {text:.1f} pt"
    assert "Overfull \\hbox" not in log
    return width


def main_job_tasks(tmp_path) -> Path:
    """Per-question results shaped like a main job with one more task: its seven variants on
    its MMLU questions and five more multiple-choice tasks (acc and acc_norm), 200 each."""
    mmlu = tables.load_run_results(MAIN)
    mmlu = mmlu[mmlu.task == "mmlu"]
    variants = list(dict.fromkeys(mmlu.variant))
    rng = np.random.default_rng(0)
    rows = []
    for task in ("hellaswag_offline", "arc_easy_offline", "arc_challenge_offline", "piqa_offline",
                 "winogrande_offline"):
        for v in variants:
            for i in range(200):
                rows.append({"variant": v, "task": task, "subject": "", "category": "", "doc_id": i,
                             "correct": int(rng.random() < 0.5), "logp_correct": -rng.random(), "pred": 0,
                             "correct_norm": np.nan if task == "winogrande_offline" else int(rng.random() < 0.5)})
    run = tmp_path / "tasks_run"
    tables.save_per_question(pd.concat([mmlu, pd.DataFrame(rows)], ignore_index=True), run)
    return run


def test_main_job_paper_tables_fit_an_a4_text_block(tmp_path):
    widths = {}
    for level in ("category", "ce"):
        widths[level] = assert_fits(tables.build_table(MAIN, level=level, fmt="latex", n_boot=200), tmp_path / level)
    run = main_job_tasks(tmp_path)
    tex = tables.build_table(run, level="task", fmt="latex", n_boot=200)
    assert tex.count(r"\begin{tabular}{") == 1  # six task columns: one tabular
    widths["task"] = assert_fits(tex, tmp_path / "task")
    print({k: f"{v:.0f} pt" for k, v in widths.items()})


def test_wide_tables_are_split_not_overfull(tmp_path):
    """More columns than fit (CE with both reference readings and the noise ratios: 12) continue in a second tabular."""
    import json

    records = json.loads((MAIN / "metrics.json").read_text())
    for r in records:
        for k in ("n_eff_frac", "d_eff_frac"):
            r[k], r[f"{k}_low"], r[f"{k}_high"] = 0.4, 0.35, 0.45
    run = tmp_path / "refs"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(records))
    tex = tables.build_table(run, level="ce", fmt="latex")
    assert tex.count(r"\begin{tabular}{") >= 2 and r"$N_{\mathrm{eff}}/N$" in tex
    assert_fits(tex, tmp_path / "ce_refs")


def test_the_old_wide_layout_does_not_fit(tmp_path):
    """The check can fail: the 46-column wide MMLU table (the layout before paper) is far too wide."""
    tex = tables.build_table(MAIN, level="category", fmt="latex", layout="wide", n_boot=50)
    width, text, _ = compile_table(tex, tmp_path / "wide")
    assert width > 2 * text


def as_tabulars(tex: str) -> str:
    """A longtable table as plain tabulars of the same columns and rows (for measuring)."""
    out = []
    lines = tex.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(r"\caption") or line in (r"\endfirsthead", r"\endhead", r"\endfoot", "}"):
            continue
        if line.startswith(r"\begin{longtable}"):  # its header is repeated for later pages: keep one
            nxt = lines.index(r"\endfirsthead", i)
            skip = set(range(nxt + 1, lines.index(r"\endhead", i) + 1))
        if "skip" in locals() and i in skip:
            continue
        out.append(line.replace("{\\small", "\\small").replace(r"\begin{longtable}", r"\begin{tabular}")
                   .replace(r"\end{longtable}", r"\end{tabular}"))
        if line == r"\end{longtable}":
            out.append(r"\par")
    return "\n".join(out)


def test_mmlu_subject_table_fits_as_a_longtable(tmp_path):
    """Subjects as rows (57 + all), variants as columns, over pages: every longtable fits the
    455 pt block, and the real file compiles with longtable without an overfull line."""
    tex = tables.build_table(MAIN, level="subject", fmt="latex", n_boot=50)
    assert r"\begin{longtable}" in tex and tex.count("abstract algebra") == 2  # 7 variants: two longtables
    width = assert_fits(as_tabulars(tex), tmp_path / "measure")
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "table.tex").write_text(tex)
    (folder / "doc.tex").write_text("\n".join([
        r"\documentclass[a4paper,10pt]{article}", r"\usepackage{booktabs}", r"\usepackage{longtable}",
        rf"\setlength{{\textwidth}}{{{TEXT_WIDTH_CM}cm}}", r"\begin{document}", r"\input{table.tex}",
        r"\end{document}", ""]))
    for _ in range(2):  # longtable settles its column widths on the second pass
        run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=folder,
                             capture_output=True, text=True, timeout=120)
    log = (folder / "doc.log").read_text(errors="replace")
    assert run.returncode == 0, log[-2000:]
    assert "Overfull \\hbox" not in log
    print(f"widest longtable {width:.0f} pt")
