"""One run = one folder: staging, provenance (versions, git hash, machine, file hashes) and
the files a run writes (metrics, per-token arrays, tables, plot, HTML report).

The folder is built under a temporary name beside the target and renamed at the end, so a
failed or interrupted run leaves no half-written results behind. Nothing here runs a model.
"""

from __future__ import annotations

import html
import json
import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness import scaling, tables
from harness.models import LoadedModel
from harness.saes import sha256
from harness.variants import short_hook


class staging:
    """Build a run folder under a temporary name; rename it into place only on success."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.partial{os.getpid()}")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():  # replace an older run only once the new one is complete
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            self.out.replace(old)
            self.tmp.replace(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.replace(self.out)
        return False


def write_text(path: Path, text: str) -> None:
    path.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- provenance

def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sae-harness", "torch", "transformers", "lm_eval", "sae-lens", "transformer-lens", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        root = Path(__file__).resolve().parent.parent
        out["git"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def model_hash(lm: LoadedModel) -> dict:
    source = lm.load_info.get("source")
    if not source or not Path(source).is_dir():
        return {}
    return {p.name: sha256(p) for p in sorted(Path(source).glob("*.safetensors"))}


# ---------------------------------------------------------------- CE suite

def ce_frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    df["hooks"] = df["hooks"].map(lambda h: "+".join(short_hook(x) for x in h))
    df["saes"] = df["saes"].map(lambda s: "+".join(s))
    return df


def write_ce(folder: Path, records: list[dict], per_token_dce: dict, tokens: torch.Tensor) -> None:
    write_text(folder / "metrics.json", json.dumps(records, indent=2))
    np.save(folder / "tokens.npy", tokens.numpy())
    np.savez_compressed(folder / "per_token_dce.npz", **per_token_dce)
    ce_frame(records).to_csv(folder / "ce.csv", index=False)
    tables.write_tables(folder, which=("ce",))  # ce.md, ce.tex: the paper-sized CE table


def write_compute_equivalents(folder: Path, details: dict, law, points: list[tuple[str, float]],
                              E_band: tuple[float, float] | None) -> None:
    """compute_equivalents.json and the loss-against-compute plot."""
    write_text(folder / "compute_equivalents.json", json.dumps(details, indent=2))
    if hasattr(law, "frontier_compute"):  # a one-variable curve has no compute axis to plot
        scaling.plot_compute(law, points, folder / "compute.png", E_band=E_band)


# ---------------------------------------------------------------- lm-eval tasks

def write_tasks(folder: Path, per_question: pd.DataFrame, aggregate: dict, n_boot: int, seed: int) -> None:
    """lm_eval_results.json, and for multiple-choice tasks per_question.csv with the task table
    (tasks.*) and, with MMLU questions, its category and subject tables."""
    write_json(folder / "lm_eval_results.json", aggregate)
    if not len(per_question):
        return
    tables.save_per_question(per_question, folder)
    tables.write_tables(folder, n_boot=n_boot, seed=seed, which=("tasks", "mmlu_category", "mmlu_subject"))


# ---------------------------------------------------------------- report

def write_report(folder: Path, config: dict, records: list[dict] | None) -> None:
    """report.html: the run's tables and plot on one page, for a browser."""
    parts = [f"<h1>sae-harness run: {html.escape(str(config['run']['model']))}</h1>",
             f"<p>{html.escape(config['machine'])}; git {html.escape(str(config['versions'].get('git')))}</p>"]
    if records is not None:
        parts += ["<h2>Cross-entropy suite</h2>", ce_frame(records).to_html(index=False, float_format="%.4f"),
                  '<img src="compute.png" alt="loss against compute" width="720">']
    if (folder / "mmlu_category.csv").exists():
        parts += ["<h2>MMLU by category</h2>",
                  pd.read_csv(folder / "mmlu_category.csv").to_html(index=False, float_format="%.4f")]
    write_text(folder / "report.html", "<!doctype html><meta charset=utf-8><title>sae-harness</title>"
               "<style>body{font-family:sans-serif}table{border-collapse:collapse;font-size:12px}"
               "td,th{border:1px solid #ccc;padding:2px 6px}</style>" + "\n".join(parts))
