"""Interrupted runs resume: a run stopped after some batches (Ctrl-C, raised from a test hook)
keeps its partial folder, `--resume` computes only what was not saved, and the finished folder
is byte-identical to an uninterrupted run's. A resume with another configuration is refused."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.lmeval import backend
from harness.cli.app import app
from harness.errors import UserError
from harness.jobs.pipeline import RunConfig, run_job, run_lm_eval

HOOK = "blocks.1.hook_resid_post"
TASKS = ["mmlu_offline_anatomy", "mmlu_offline_virology"]


@pytest.fixture(scope="module")
def sae(tiny_hf_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae") / "tiny-sae"
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(folder)
    return folder


def _cfg(tiny_hf_dir, sae, out, tokens=512):
    return RunConfig(model=str(tiny_hf_dir), saes=[str(sae), "pca:4"], tokens=tokens, ctx=32, batch_size=2,
                     dataset="builtin", out=str(out))


def _recording(seen: list, stop_at=None):
    """A progress factory that records the CE suite's progress and can press Ctrl-C."""
    def make(label, total):
        def update(done):
            seen.append(done)
            if stop_at is not None and done >= stop_at:
                raise KeyboardInterrupt
        return update
    return make


def _same_files(a, b, names):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_ce_resume_is_identical_and_skips_saved_batches(tiny_hf_dir, sae, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_job(_cfg(tiny_hf_dir, sae, full))

    with pytest.raises(KeyboardInterrupt):  # 16 rows in batches of 2: stop after batch 6
        run_job(_cfg(tiny_hf_dir, sae, part), progress_factory=_recording([], stop_at=12))
    partial = tmp_path / ".part.partial"
    assert not part.exists() and (partial / ".resume" / "ce.pt").is_file()

    seen = []
    run_job(_cfg(tiny_hf_dir, sae, part), progress_factory=_recording(seen), resume=True)
    # the checkpoint after batch 4 (8 rows) was the last one: batches 5-8 are computed, no others
    assert seen == [8, 10, 12, 14, 16]
    _same_files(full, part, ["metrics.json", "tokens.npy", "ce.csv", "ce.md", "compute_equivalents.json"])
    a, b = np.load(full / "per_token_dce.npz"), np.load(part / "per_token_dce.npz")
    assert a.files == b.files and all(a[k].tobytes() == b[k].tobytes() for k in a.files)
    assert not partial.exists() and not (part / ".resume").exists()
    assert json.loads((part / "config.json").read_text())["resumed"] is True


def test_resume_with_another_configuration_is_refused(tiny_hf_dir, sae, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_job(_cfg(tiny_hf_dir, sae, out), progress_factory=_recording([], stop_at=10))
    with pytest.raises(UserError, match=r"cannot resume .*run: tokens differs \(saved run: 512; now: 256\)"):
        run_job(_cfg(tiny_hf_dir, sae, out, tokens=256), resume=True)
    assert (tmp_path / ".run.partial" / ".resume" / "ce.pt").is_file()  # still there to resume properly
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", str(sae), "--sae", "pca:8", "--dataset", "builtin",
                                      "--tokens", "512", "--ctx", "32", "--batch-size", "2", "--out", str(out),
                                      "--resume"])
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "saes differs" in lines[0], result.stderr


def test_task_resume_recomputes_nothing_saved(tiny_hf_dir, monkeypatch, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = lambda out: RunConfig(model=str(tiny_hf_dir), saes=[f"zero@{HOOK}"], batch_size=2, out=str(out))
    forward = backend.SpliceEngine._continuation_heads
    calls = []

    def counted(self, batch, pos):  # 6 questions, one forward per 2 questions: 3 chunks
        calls.append(len(calls))
        if stop[0] is not None and len(calls) > stop[0]:
            raise KeyboardInterrupt
        return forward(self, batch, pos)

    monkeypatch.setattr(backend.SpliceEngine, "_continuation_heads", counted)
    stop = [None]
    run_lm_eval(cfg(full), TASKS, limit=3)
    assert len(calls) == 3

    calls.clear()
    stop[0] = 2
    with pytest.raises(KeyboardInterrupt):
        run_lm_eval(cfg(part), TASKS, limit=3)
    calls.clear()
    stop[0] = None
    run_lm_eval(cfg(part), TASKS, limit=3, resume=True)
    assert len(calls) == 1  # the two saved chunks are read back, not recomputed
    _same_files(full, part, ["per_question.csv", "lm_eval_results.json", "mmlu_category.csv", "tasks.csv"])
    assert not (tmp_path / ".part.partial").exists()
