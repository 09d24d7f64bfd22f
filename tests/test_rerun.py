"""Reruns are bit-identical on CPU: the same command twice (the second in a fresh interpreter
with another hash seed) writes byte-identical metrics, per-token arrays and tokens."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"


def test_ce_rerun_is_bit_identical(tiny_hf_dir, tmp_path):
    sae = tmp_path / "sae"
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(sae)
    args = ["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--sae", "pca:4", "--dataset", "builtin", "--tokens", "256",
            "--ctx", "32", "--batch-size", "4", "--dataset", "builtin"]
    first, second = tmp_path / "first", tmp_path / "second"
    result = CliRunner().invoke(app, [*args, "--out", str(first)])
    assert result.exit_code == 0, result.stderr
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONHASHSEED": "12345"}
    proc = subprocess.run([sys.executable, "-m", "harness", *args, "--out", str(second)], cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("metrics.json", "tokens.npy", "ce.csv", "compute_equivalents.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    a, b = np.load(first / "per_token_dce.npz"), np.load(second / "per_token_dce.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 3
    for key in a.files:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert np.isfinite(a["clean"]).sum() > 0  # a real comparison, not two empty arrays
