"""End-to-end on the embedded default (SmolLM2-135M) and a shipped demo SAE, against a plain
PyTorch computation: Hugging Face model, register_forward_hook, the TopK SAE written out."""

import json

import pytest
import torch
from safetensors.torch import load_file

from harness.splice.replacements import DEMO_DIR, demo_sae_names

pytestmark = pytest.mark.slow
DEMO = "l15-w2304-k32"


def plain_topk_sae(folder):
    """sae-lens' TopK SAE arithmetic, written out from cfg.json and the safetensors file."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {k: v.float() for k, v in load_file(folder / "sae_weights.safetensors").items()}
    assert cfg.get("normalize_activations", "none") == "none"
    dec_norm = w["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)

    def reconstruct(x):
        x_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True)
        pre = x_in @ w["W_enc"] + w["b_enc"]
        if rescale:
            pre = pre * dec_norm
        top = pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if rescale:
            acts = acts / dec_norm
        return acts @ w["W_dec"] + w["b_dec"]
    return reconstruct, int(cfg["metadata"]["hook_name"].split(".")[-1])


def test_demo_saes_ship_in_sae_lens_format():
    names = demo_sae_names()
    assert {"l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32"} <= set(names)
    total = sum(f.stat().st_size for f in DEMO_DIR.rglob("*") if f.is_file())
    assert total <= 16 * 2**20


def test_ce_clean_and_spliced_equal_plain_pytorch(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.evals import ce
    from harness.text import builtin as data
    from harness.model.loading import load_model
    from harness.splice.variants import build_variants

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    docs = data.documents("eval")[:6]
    ids = [tok.bos_token_id]
    for d in docs:
        ids += tok.encode(d, add_special_tokens=False)[:70] + [tok.eos_token_id]
    tokens = torch.tensor(ids[: 4 * 96]).view(4, 96)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    keep = ~torch.isin(tokens, special)
    assert (~keep).sum() >= 2  # BOS and at least one EOS inside: the special-position rule is exercised
    splice_at = keep.clone()
    splice_at[:, 0] = False  # position 0 (the attention sink) is never spliced

    # Plain PyTorch reference.
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    reconstruct, layer = plain_topk_sae(DEMO_DIR / DEMO)

    def nll(hooked: bool) -> float:
        def hook(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            x_new = torch.where(splice_at[..., None], reconstruct(x), x)
            return (x_new, *out[1:]) if isinstance(out, tuple) else x_new
        h = model.model.layers[layer].register_forward_hook(hook) if hooked else None
        try:
            with torch.no_grad():
                logits = model(input_ids=tokens).logits
        finally:
            if h:
                h.remove()
        lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
        return float(-lp[keep[:, :-1]].mean())

    want_clean, want_sae = nll(False), nll(True)

    lm = load_model("smollm2-135m")
    variants, _ = build_variants([DEMO], False, "cpu")
    calib = data.pack(lm.tokenizer, data.documents("train-prose"), 4, 96)
    out = ce.evaluate(lm, variants, tokens, 2, calib, n_boot=10)
    rec = {r["variant"]: r for r in out.records}
    assert rec["clean"]["ce_clean"] == pytest.approx(want_clean, abs=1e-4)
    assert rec[DEMO]["ce_spliced"] == pytest.approx(want_sae, abs=1e-4)
    assert rec[DEMO]["dce"] > 0.01  # the SAE does damage the model


def test_main_job_end_to_end(tmp_path):
    """`sae-harness run` (small): the run folder holds every promised file and field, and
    `sae-harness table` rebuilds the saved category table from the per-question results."""
    import numpy as np
    import pandas as pd
    from typer.testing import CliRunner

    from harness.cli.app import app

    out = tmp_path / "main"
    # (the main job's interp and family parts: tests/test_interp.py, tests/test_family.py)
    result = CliRunner().invoke(app, ["run", "--out", str(out), "--tokens", "512", "--limit", "1", "--no-interp",
                                      "--no-family", "--replacement-tokens", "128"])
    assert result.exit_code == 0, result.stderr
    # the replacement model: every block's MLP replaced by the demo transcoders, with its curves
    rep = json.loads((tmp_path / "replacement" / "metrics.json").read_text())
    assert rep[1]["variant"] == "skip-transcoders" and len(rep[1]["hooks"]) == 30 and rep[1]["dce"] > 0
    curves = json.loads((tmp_path / "replacement" / "layer_curves.json").read_text())
    assert len(curves) == 59 and (tmp_path / "replacement" / "layer_curves.md").is_file()
    for name in ("config.json", "metrics.json", "tokens.npy", "ce.md", "ce.csv", "compute.png", "report.html",
                 "per_question.csv", "mmlu_category.md", "mmlu_category.tex", "mmlu_subject.csv", "tasks.md",
                 "tasks.tex", "ce.tex", "generations.md", "generations.json", "damage.json", "damage.md",
                 "compute_equivalents.json"):
        assert (out / name).is_file(), name
    gens = json.loads((out / "generations.json").read_text())["prompts"]
    assert len(gens) == 8 and all(list(g["variants"])[0] == "clean" and len(g["variants"]) == 7 for g in gens)
    records = json.loads((out / "metrics.json").read_text())
    keys = ["variant", "saes", "hooks", "ce_clean", "ce_spliced", "ce_zero", "ce_mean", "dce", "dce_ci_low",
            "dce_ci_high", "loss_recovered_zero", "loss_recovered_mean", "kl", "explained_variance", "l0",
            "dead_frac", "n_tokens", "law", "compute_fraction", "compute_fraction_low", "compute_fraction_high"]
    names = [r["variant"] for r in records]
    assert {"clean", "l15-w2304-k32", "l15-w1152-k16", "l22-w1152-k32", "l15-w2304-k32+l22-w1152-k32",
            "pca:32@15.resid_post", "neurons:32@15.resid_post"} <= set(names)
    for r in records:
        assert set(keys) <= set(r)
    # C_eff/C of every record: the compute ratio at which the Hoffmann law's numerically
    # minimised frontier reaches the two losses (scipy root finding, tests/test_equivalents.py).
    from harness import scaling
    from test_equivalents import frontier_fraction

    law = scaling.preset("hoffmann")
    clean = records[0]["ce_clean"]
    for r in records:
        assert r["compute_fraction"] == pytest.approx(frontier_fraction(law, clean, r["ce_spliced"]), rel=1e-6)
        assert r["compute_fraction_low"] <= r["compute_fraction"] <= r["compute_fraction_high"]
    assert all(r["compute_fraction"] < 1 for r in records if r["saes"])
    # the fixed-tokens reading at SmolLM2's own 2T tokens (its model card), N counted on the model
    for r in records:
        assert r["train_tokens"] == 2e12 and 1.3e8 < r["model_params"] < 1.4e8
        if r["saes"] and r["dce"] > 0:
            assert r["compute_fraction"] < r["n_eff_frac_fixed_d"] < 1 and r["d_eff_frac_fixed_n"] < 1
    assert "N_eff/N at D [95% CI]" in (out / "ce.md").read_text()
    saved = json.loads((out / "compute_equivalents.json").read_text())["variants"]
    assert {v: d["compute_fraction"] for v, d in saved.items()} == {r["variant"]: r["compute_fraction"] for r in records}
    assert np.load(out / "tokens.npy").shape == (4, 128)
    config = json.loads((out / "config.json").read_text())
    assert config["versions"]["sae-lens"] and config["saes"][0]["files"]
    assert config["data"]["source"] == "builtin" and config["data"]["tokens_sha256"] == config["tokens_sha256"]
    per_q = pd.read_csv(out / "per_question.csv")  # MMLU 1 per subject, 1 of each other task
    assert per_q[per_q.variant == "clean"].groupby("task").size().to_dict() == {
        "mmlu": 57, "hellaswag_offline": 1, "arc_easy_offline": 1, "piqa_offline": 1, "winogrande_offline": 1}
    rebuilt = CliRunner().invoke(app, ["table", str(out), "--format", "md"])
    assert rebuilt.exit_code == 0 and rebuilt.stdout.strip() == (out / "mmlu_category.md").read_text().strip()
