"""Terminal progress: the tasks stage reports requests scored across all variants, and
lm-eval's own per-task progress bars stay silent."""

from __future__ import annotations

from conftest import make_topk_sae
from harness.lmeval import mmlu
from harness.lmeval.backend import evaluate_tasks
from harness.splice.replacements import from_sae
from harness.splice.variants import Variant

HOOK = "blocks.1.hook_resid_post"


def test_task_progress_counts_requests_times_variants(tiny_hf, tiny_hf_dir, capfd):
    sae = from_sae("tiny-sae", "tiny-sae", make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)), {})
    variants = [Variant("clean", {}), Variant("tiny-sae", {HOOK: sae})]
    calls = []
    tasks = ["mmlu_offline_anatomy"]
    out = evaluate_tasks(tiny_hf, variants, tasks, mmlu.task_manager(), batch_size=2, limit=3,
                         log_samples=True, progress=lambda done, total: calls.append((done, total)))
    # lm-eval's own count of the requests it sent, per variant
    n_requests = sum(len(s["filtered_resps"]) for t in tasks for s in out.by_variant["clean"]["samples"][t])
    assert n_requests == 3 * 4
    assert calls[-1] == (n_requests * 2, n_requests * 2)
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and len(set(dones)) >= 3  # moves batch by batch, never back
    err = capfd.readouterr().err
    assert "it/s]" not in err and "100%|" not in err, err[-500:]  # no tqdm bar from lm-eval
