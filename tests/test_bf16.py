"""bfloat16 on CPU: a model run in bfloat16 (--dtype) and SAE weights in bfloat16 (--sae-dtype)
agree with float32 within bfloat16's precision, on the CE suite and on an lm-eval task; the
dtypes are recorded in config.json. bfloat16 keeps 8 bits of mantissa (relative rounding
0.4%), so losses are compared at 2% relative and the spliced damage at 0.05 nats."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_topk_sae
from harness.jobs.pipeline import RunConfig, run_job, run_lm_eval

HOOK = "blocks.1.hook_resid_post"
TASKS = ["mmlu_offline_anatomy", "mmlu_offline_virology"]


@pytest.fixture(scope="module")
def sae_dir(tiny_hf_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16_sae")
    make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)).save_model(folder)
    return folder


def _ce(tiny_hf_dir, sae_dir, out, dtype, sae_dtype):
    cfg = RunConfig(model=str(tiny_hf_dir), saes=[str(sae_dir)], tokens=512, ctx=32, batch_size=4, calib_seqs=4,
                    dtype=dtype, sae_dtype=sae_dtype, n_boot=20, dataset="builtin", out=str(out))
    run_job(cfg, stages=("ce",))
    config = json.loads((out / "config.json").read_text())
    return pd.read_csv(out / "ce.csv").set_index("variant"), config


@pytest.mark.parametrize("dtype,sae_dtype", [("bfloat16", "float32"), ("float32", "bfloat16"),
                                             ("bfloat16", "bfloat16")])
def test_ce_suite_in_bfloat16_agrees_with_float32(tiny_hf_dir, sae_dir, tmp_path, dtype, sae_dtype):
    ref, _ = _ce(tiny_hf_dir, sae_dir, tmp_path / "fp32", "float32", "float32")
    low, config = _ce(tiny_hf_dir, sae_dir, tmp_path / "low", dtype, sae_dtype)
    assert (config["run"]["dtype"], config["run"]["sae_dtype"], config["model"]["dtype"]) == (dtype, sae_dtype, dtype)
    assert list(low.index) == list(ref.index)
    for col in ("ce_clean", "ce_spliced"):
        assert np.allclose(low[col], ref[col], rtol=0.02), (col, low[col].tolist(), ref[col].tolist())
    assert np.allclose(low["dce"], ref["dce"], atol=0.05)
    if dtype == "float32":  # the model itself unchanged: the clean loss is bit for bit the same
        assert np.array_equal(low["ce_clean"], ref["ce_clean"])


def test_lm_eval_task_in_bfloat16_agrees_with_float32(tiny_hf_dir, sae_dir, tmp_path):
    def run(dtype, out):
        cfg = RunConfig(model=str(tiny_hf_dir), saes=[str(sae_dir)], batch_size=2, dtype=dtype, sae_dtype=dtype,
                        out=str(out))
        run_lm_eval(cfg, TASKS, limit=3)
        return pd.read_csv(out / "per_question.csv"), json.loads((out / "config.json").read_text())

    ref, _ = run("float32", tmp_path / "fp32")
    low, config = run("bfloat16", tmp_path / "bf16")
    assert config["dtype"] == config["sae_dtype"] == config["model"]["dtype"] == "bfloat16"
    assert len(low) == len(ref) == 12  # 2 variants x 2 tasks x 3 questions
    assert np.allclose(low["logp_correct"], ref["logp_correct"], rtol=0.02, atol=0.05)
