"""The Python API (harness/api.py) on objects in memory, against the command line and plain
arithmetic; the example script runs as printed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness import api
from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"
ROOT = Path(__file__).resolve().parent.parent


def test_an_sae_in_memory_gives_the_numbers_the_cli_gives_for_its_folder(tiny_hf_dir, tmp_path):
    sae = make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir))
    sae.save_model(tmp_path / "sae")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["ce", "--model", str(tiny_hf_dir), "--sae", str(tmp_path / "sae"), "--tokens",
                                      "256", "--ctx", "32", "--dataset", "builtin", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    cli = json.loads((out / "metrics.json").read_text())[1]
    records = api.ce(str(tiny_hf_dir), [sae], tokens=256, ctx=32)
    mine = records.iloc[1]
    for key in ("ce_clean", "ce_spliced", "dce", "kl", "explained_variance", "l0"):
        assert mine[key] == pytest.approx(cli[key], abs=1e-9), key
    assert records.iloc[0]["variant"] == "clean" and 0 < mine["compute_fraction"] < 1


class Zeros(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_hook_module_pairs_splice_like_the_baselines_they_equal(tiny_hf_dir):
    """(hook, module) pairs: a module returning its input leaves the model exactly clean; one
    returning zeros equals the zero@ baseline at that hook."""
    sess = api.session(str(tiny_hf_dir), [(HOOK, torch.nn.Identity()), (HOOK, Zeros()), f"zero@{HOOK}"], ctx=32)
    records = api.ce(sess, tokens=256, ctx=32).set_index("variant")
    ident, zeros = "Identity0@1.resid_post", "Zeros1@1.resid_post"
    assert records.loc[ident, "dce"] == 0.0 and records.loc[ident, "kl"] == pytest.approx(0.0, abs=1e-12)
    assert records.loc[zeros, "ce_spliced"] == pytest.approx(records.loc["zero@1.resid_post", "ce_spliced"], abs=1e-9)


def test_a_model_object_is_accepted(tiny_hf_dir):
    """A Hugging Face model object with its tokenizer gives the same clean CE as its folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    by_object = api.ce(hf, [f"zero@{HOOK}"], tokenizer=tok, tokens=128, ctx=32)
    by_folder = api.ce(str(tiny_hf_dir), [f"zero@{HOOK}"], tokens=128, ctx=32)
    assert by_object.iloc[0]["ce_clean"] == pytest.approx(by_folder.iloc[0]["ce_clean"], abs=1e-5)
    with pytest.raises(Exception, match="needs its tokenizer"):
        api.ce(hf, [f"zero@{HOOK}"])


@pytest.mark.slow
def test_the_example_script_runs_as_printed():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook_api.py")], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "string form:" in proc.stdout and "compute_fraction" in proc.stdout and "Paris" in proc.stdout


@pytest.mark.slow
def test_the_readmes_simple_evaluate_lines_run_as_printed():
    """The README's lm-eval block, executed as it stands there (the string form, offline tasks,
    no task manager passed)."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "simple_evaluate" in b]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert 0.0 <= scope["out"]["results"]["arc_easy_offline"]["acc,none"] <= 1.0
