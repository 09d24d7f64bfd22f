"""scripts/device_check.sh --cpu-smoke: the prepared GPU check runs end to end on tiny shapes on
the CPU and writes its JSON and Markdown summary with every step's numbers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_cpu_smoke(embedded_dir, tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", str(ROOT / "scripts/device_check.sh"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={"PY": sys.executable, "PATH": "/usr/bin:/bin",
                                                                           "OMP_NUM_THREADS": "1", "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert all(c["ok"] for c in report["bench"]["checks"]), report["bench"]["checks"]
    assert all(math.isfinite(r["ratio"]) and r["ratio"] > 0 for r in report["bench"]["rows"])
    assert report["ce_262k"]["records"]["clean"]["ce_clean"] > 0
    assert report["bf16_vs_fp32"]["max_abs_dce_difference"] < 0.05
    assert [len(m["variants"]) for m in report["mmlu"]] == [5, 5]  # clean + 4 SAEs on both models
    assert all(0 <= a <= 1 for m in report["mmlu"] for a in m["accuracy"].values())
    assert "# Device check (cpu-smoke)" in (out / "device_check.md").read_text()
