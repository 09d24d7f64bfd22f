"""Data parallel: `torchrun --nproc_per_node 2 -m harness run ...` (two gloo processes on CPU)
writes the same run folder as one process: CE metrics, per-token arrays, lm-eval results and
per-question rows (within 1e-6), with config.json recording world_size 2. Bad input under a
launcher (more processes than GPUs, --device-map) is one line before any rendezvous."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.model import distributed
from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"
ROOT = Path(__file__).resolve().parent.parent


def _args(model, sae, out) -> list[str]:
    # 12 sequences in batches of 4: rank 0 takes 1 batch, rank 1 two; 5 documents per task: 3 and 2
    return ["run", "--model", str(model), "--sae", str(sae), "--sae", "mean", "--dataset", "builtin",
            "--tokens", "384", "--ctx", "32", "--batch-size", "4",
            "--tasks", "mmlu_offline_anatomy,arc_easy_offline", "--limit", "5", "--out", str(out)]


def _numbers_close(a, b, path="") -> None:
    """Same structure, same non-numbers, numbers within 1e-6 (NaN where NaN)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _numbers_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert np.isclose(a, b, rtol=0, atol=1e-6, equal_nan=True), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_two_processes_write_what_one_process_writes(tiny_hf_dir, tmp_path):
    sae = tmp_path / "sae"
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(sae)
    one, two = tmp_path / "one" / "run", tmp_path / "two" / "run"
    result = CliRunner().invoke(app, _args(tiny_hf_dir, sae, one))
    assert result.exit_code == 0, result.stderr[-2000:]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "harness", *_args(tiny_hf_dir, sae, two)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # two processes really ran, each on its share; only rank 0 wrote (one folder, nothing beside it)
    assert "rank 0 of 2 done" in proc.stderr and "rank 1 of 2 done" in proc.stderr
    assert proc.stderr.count("CE suite: sequences") == 1  # one progress bar: rank 0's
    assert sorted(p.name for p in two.parent.iterdir()) == ["run"]
    cfg_one, cfg_two = (json.loads((d / "config.json").read_text()) for d in (one, two))
    assert (cfg_one["world_size"], cfg_two["world_size"]) == (1, 2)
    assert cfg_two["massive"] == cfg_one["massive"]  # gathered clean norms, the same median
    assert cfg_two["tasks_engine"]["tokens"] > 0 and cfg_two["task_questions"] == cfg_one["task_questions"]

    # CE suite: metrics (bootstrap intervals included) and per-token arrays in the original order
    _numbers_close(json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text()))
    for name in ("per_token_dce.npz", "per_token_top3.npz"):
        a, b = np.load(one / name), np.load(two / name)
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    assert np.array_equal(np.load(one / "tokens.npy"), np.load(two / "tokens.npy"))

    # lm-eval: requests sharded by lm-eval, results gathered on rank 0 in document order
    _numbers_close(json.loads((one / "lm_eval_results.json").read_text()),
                   json.loads((two / "lm_eval_results.json").read_text()))
    a, b = pd.read_csv(one / "per_question.csv"), pd.read_csv(two / "per_question.csv")
    assert len(a) == 3 * 2 * 5  # 3 variants x 2 tasks x 5 documents
    pd.testing.assert_frame_equal(b.drop(columns="logp_correct"), a.drop(columns="logp_correct"))
    # float32 forwards of other batch compositions (each rank pads its own batches)
    np.testing.assert_allclose(b["logp_correct"], a["logp_correct"], rtol=1e-6, atol=1e-6)


def test_shares_cover_every_row_once_in_whole_batches(monkeypatch):
    for n, chunk, world in [(12, 4, 2), (10, 4, 3), (3, 4, 2), (100, 8, 4), (7, 1, 7)]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        rows, batches = [], []
        for r in range(world):
            monkeypatch.setenv("RANK", str(r))
            lo, hi = distributed.share(n, chunk)
            assert lo % chunk == 0 and (hi % chunk == 0 or hi == n)  # the one-process batch boundaries
            rows += list(range(lo, hi))
            batches.append(-(-(hi - lo) // chunk))
        assert rows == list(range(n))  # contiguous, in rank order: gathering restores the order
        assert max(batches) - min(batches) <= 1


@pytest.mark.parametrize("extra, message", [
    (["--device", "cuda"], r"error: --device cuda: 2 processes on this node but 1 CUDA GPU\(s\) visible; start at "
                           r"most 1 processes per node \(--nproc_per_node\) or use --device cpu"),
    (["--device-map", "auto"], r"error: --device-map shards one model over every GPU of a single process; under "
                               r"torchrun each process holds a whole model: use one or the other"),
])
def test_launcher_bad_input_is_one_line(tiny_hf_dir, tmp_path, monkeypatch, extra, message):
    """As torchrun sets the environment for 2 processes on a node with one GPU: refused before
    joining a process group, so it fails at once instead of waiting for the other process."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--dataset",
                                      "builtin", "--tokens", "64", "--ctx", "32", *extra, "--out", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert re.fullmatch(message, lines[0]), lines[0]
    assert not torch.distributed.is_initialized()
    assert not out.exists() and not (tmp_path / ".run.partial").exists()
