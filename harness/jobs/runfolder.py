"""One run = one folder: staging, provenance (versions, git hash, machine, file hashes) and
the files a run writes (metrics, per-token arrays, tables, the HTML report and its figures).

The folder is built under a temporary name beside the target and renamed at the end, so a
failed or interrupted run leaves no half-written results behind. Nothing here runs a model.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.files import replace_via, write_json
from harness.model import distributed
from harness.output import tables
from harness.model.loading import LoadedModel
from harness.errors import UserError
from harness.files import sha256
from harness.splice.variants import short_hook


RESUME_DIR = ".resume"  # inside a partial folder: what --resume needs; removed when the run completes


def check_out(out, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse (one line) to replace an existing run folder unless asked: --overwrite replaces it
    once the new run is complete, --resume continues an interrupted run. Checked before any
    model work."""
    out = Path(out)
    if out.exists() and not (overwrite or resume):
        raise UserError(f"{out} already exists: pass --overwrite to replace it (once the new run is complete), "
                        "or --resume to continue an interrupted run, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")


class staging:
    """Build a run folder under a temporary name (`.NAME.partial` beside it); rename it into
    place only on success, so the final folder only ever appears complete.

    `identity` is what a run's results depend on (model, SAE files, tokens, options). If the
    run is interrupted or crashes, the partial folder stays, with its checkpoints under
    `.resume/`; `resume=True` continues it when the identity is the same and refuses, naming
    what differs, when it is not. Bad input (UserError) removes the partial folder.

    Under torchrun only rank 0 builds the folder: on the other processes the context gives
    None (and `state` is None) and nothing is created, checked or renamed."""

    def __init__(self, out: Path, identity: dict | None = None, resume: bool = False):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        self.active = distributed.is_main()
        self.state = self.tmp / RESUME_DIR if self.active else None
        self.identity = json.loads(json.dumps(identity or {}, default=str))  # as it reads back from disk
        self.resume = resume
        self.resumed = False

    def __enter__(self) -> Path | None:
        if not self.active:
            return None
        saved = self.state / "identity.json"
        if self.resume and saved.is_file():
            _check_same(json.loads(saved.read_text()), self.identity, self.out)
            self.resumed = True
            return self.tmp
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.state.mkdir(parents=True)
        write_json(saved, self.identity)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if not self.active:
            return False
        if exc_type is not None:
            if issubclass(exc_type, UserError):
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False  # anything else (Ctrl-C, a crash) keeps the partial folder for --resume
        shutil.rmtree(self.state, ignore_errors=True)
        if self.out.exists():  # replace an older run only once the new one is complete
            old = self.out.with_name(f".{self.out.name}.old{os.getpid()}")
            self.out.replace(old)
            self.tmp.replace(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.replace(self.out)
        return False


def _check_same(saved: dict, now: dict, out: Path) -> None:
    """One line naming the first difference (in the identity's own order) and the others."""
    keys = list(now) + [k for k in saved if k not in now]
    diff = [k for k in keys if saved.get(k) != now.get(k)]
    if diff:
        first = diff[0]
        more = f"; also differs: {', '.join(diff[1:])}" if diff[1:] else ""
        raise UserError(f"cannot resume {out}: {first} differs (saved run: {_short(saved.get(first))}; "
                        f"now: {_short(now.get(first))}){more}; rerun without --resume to start over")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Checkpoint:
    """One file of resumable state in a partial run folder, replaced atomically: a reader sees
    the old state or the new one, never half of it."""
    path: Path

    def save(self, state) -> None:
        replace_via(self.path, lambda tmp: torch.save(state, tmp))

    def load(self):
        # written by this run's own code into its own folder: plain Python objects and tensors
        return torch.load(self.path, weights_only=False) if self.path.is_file() else None


# ---------------------------------------------------------------- provenance

def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("sae-harness", "torch", "transformers", "lm_eval", "sae-lens", "transformer-lens", "pandas"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    out["git"] = git_commit()
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The source tree's commit, asked once per process and quietly (an installed wheel has
    none); lm-eval's own question is answered from here too (lmeval/backend.py)."""
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> dict:
    """How this run was started, for the report's provenance: as typed for `python -m ...`
    (sys.argv would show the module's file), else the script and its arguments."""
    argv = sys.orig_argv if "-m" in getattr(sys, "orig_argv", [])[1:2] else sys.argv
    return {"line": shlex.join(argv), "cwd": os.getcwd()}


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


def write_ce(folder: Path, records: list[dict], per_token_dce: dict, tokens: torch.Tensor,
             per_token_top3: dict | None = None, tokenizer=None) -> None:
    write_json(folder / "metrics.json", records)
    np.save(folder / "tokens.npy", tokens.numpy())
    np.savez_compressed(folder / "per_token_dce.npz", **per_token_dce)
    if per_token_top3:
        np.savez_compressed(folder / "per_token_top3.npz", **per_token_top3)
    if tokenizer is not None:  # the token texts damage.json shows (written after config.json: see write_damage)
        from harness.evals import damage

        write_json(folder / "token_text.json", damage.token_text(tokenizer, tokens.numpy(), per_token_top3),
                         indent=None)
    ce_frame(records).to_csv(folder / "ce.csv", index=False)
    tables.write_tables(folder, which=("ce",))  # ce.md, ce.tex: the paper-sized CE table


def write_curves(folder: Path, curves: list[dict], records: list[dict]) -> None:
    """layer_curves.json (the points' records), layer_curves.md and .csv (the table)."""
    from harness.output import curves as curve_output

    write_json(folder / "layer_curves.json", curves)
    df = curve_output.curve_frame(curves, records)
    (folder / "layer_curves.md").write_text(curve_output.to_markdown(df))
    df.to_csv(folder / "layer_curves.csv", index=False)


def write_compute_equivalents(folder: Path, details: dict) -> None:
    """compute_equivalents.json (the report draws the loss-against-compute figure from it)."""
    write_json(folder / "compute_equivalents.json", details)


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

def write_report(folder: Path, final: Path) -> None:
    """report.html and its figures, from the files already in `folder` (a run being built under
    a temporary name; the page names `final`, where it will end up)."""
    from harness.output.report import write_report as render

    render([folder], folder, final_paths=[final])
