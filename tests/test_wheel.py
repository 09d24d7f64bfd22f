"""A wheel that works: `pip wheel .` holds every task YAML, demo SAE and family file, and an
install of it (not editable) runs the offline MMLU task from its own copy of tasks/."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the repository's files (tracked and new, not ignored), so that no
    stale build/ folder can supply what the package data patterns miss."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("sae_harness-*.whl")
    return path


def _tracked(folder: str) -> list[str]:
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", folder],
                           capture_output=True, text=True).stdout
    return [f for f in files.split() if "__pycache__" not in f]


def test_wheel_holds_tasks_demo_saes_and_family(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [f"harness/tasks/{f.removeprefix('tasks/')}" for f in _tracked("tasks")]
    wanted += [f for f in _tracked("harness/demo_saes") + _tracked("harness/demo_transcoders") + _tracked("harness/family")
               if not f.endswith(".py")]
    wanted += [f for f in _tracked("harness") if f.endswith(".py")]
    assert len(wanted) > 150
    missing = [f for f in wanted if f not in names]
    assert not missing, f"not in the wheel: {missing[:10]} ({len(missing)} in all)"


@pytest.mark.slow
def test_installed_wheel_runs_offline_mmlu(wheel, tmp_path, tiny_hf_dir):
    """The wheel unpacked alone on the path (no source tree, no editable finder first): the
    package resolves its tasks through importlib.resources and `lm-eval` runs two MMLU subjects."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import harness.lmeval.mmlu as m; print(m.__file__); "
                            "print(m.TASKS_DIR)"], capture_output=True, text=True, env=env, cwd=tmp_path)
    module_file, tasks_dir = where.stdout.split()
    assert module_file.startswith(str(site)) and tasks_dir.startswith(str(site)), where.stdout + where.stderr
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-m", "harness", "lm-eval", "--model", str(tiny_hf_dir), "--sae",
                          "zero@blocks.1.hook_resid_post", "--tasks", "mmlu_offline_anatomy,mmlu_offline_virology",
                          "--limit", "2", "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert set(results["clean"]) >= {"mmlu_offline_anatomy", "mmlu_offline_virology"}
