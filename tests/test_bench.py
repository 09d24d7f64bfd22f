"""`sae-harness bench` on a tiny random model: its agreement checks must pass (CE vs sae-lens'
run_evals, MMLU vs lm-eval's HFLM), every row must be there, and ratios must be real numbers.
No timing is asserted: CI machines are shared and timings vary."""

import math

import pytest

from harness.jobs import bench
from harness.model.loading import load_model
from harness.errors import UserError


@pytest.fixture(scope="module")
def result(embedded_dir):  # embedded_dir: the random model borrows SmolLM2's tokenizer
    return bench.run_bench("random:2x64", device="cpu", dtype="float32", saes=2, tokens=256, ctx=32,
                           batch_size=4, mmlu_questions=4, seed=0, blocks_model="random:3x64:v512")


def test_agreement_checks_pass(result):
    failed = [c for c in result["checks"] if not c["ok"]]
    assert not failed, failed
    names = " ".join(c["name"] for c in result["checks"])
    for what in ("ce_clean", "ce_spliced", "ce_zero", "KL", "MMLU accuracy", "log-likelihoods"):
        assert what in names
    # sae-lens and the harness really evaluated the same thing, not just two NaNs
    for metrics in result["ce"]["sae_lens"]:
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["ce_spliced"] != metrics["ce_clean"]


def test_rows_and_ratios(result):
    rows = {r["key"]: r for r in result["rows"]}
    second = "[random:3x64:v512]"
    assert set(rows) == {"ce_1", "ce_k", "equiv", "curves", "mmlu", "ce_1" + second, "ce_k" + second,
                         "equiv" + second}
    assert [s["vocab"] for s in result["meta"]["shapes"]] == [49152, 512]
    for r in rows.values():
        for key in ("anchor_rate", "harness_rate", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["key"], key, r[key])
        assert r["agree"] in (True, None)
    assert math.isfinite(rows["equiv"]["cost"]) and rows["equiv"]["cost"] > 0
    # the profile: every part of the CE suite timed, for both shapes and both runs
    assert len(result["profiles"]) == 4
    for table in result["profiles"].values():
        parts = {r["section"] for r in table}
        assert {"forward: clean prefix and tails (SAEs included)", "head (unembedding)", "log-softmax, KL, top-3",
                "massive-activation detection", "records, bootstrap intervals, top-3 arrays"} <= parts
        assert all(r["seconds"] >= 0 and r["calls"] >= 1 for r in table)
        assert sum(r["share"] for r in table) == pytest.approx(1.0)
    assert rows["equiv"]["bound"] == pytest.approx(1.1 * (1 + 2 * (2 - 1) / 2))
    assert result["mmlu"]["questions"] == 4
    assert result["mmlu"]["accuracy_hflm"] == result["mmlu"]["accuracy_harness"]
    assert set(result["mmlu"]["accuracy_harness"]) == {"clean", "sae0", "sae1"}
    flat = result["memory_flat"]
    assert flat["tokens"] == [128, 256] and len(flat["peak_bytes"]) == 2


def test_flop_minimum_starts_the_tails_after_the_hooked_block(result):
    """The hook is blocks.1.hook_resid_post, the last block of random:2x64: each variant's tail
    is the final norm and head alone, so the minimum is one forward + K (head + SAE)."""
    fl = bench.flops_per_token(load_model("random:2x64"), 32, bench.SAE_EXPANSION * 64)
    want = (fl["model"] + 2 * (fl["head"] + fl["sae"])) / fl["model"]
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["equiv"]["flop_model_equiv"] == pytest.approx(want, rel=1e-12)
    assert "vs FLOP minimum" in bench.format_report(result)


def test_curve_flop_minimum_counts_each_point_from_its_lowest_layer(result):
    """random:2x64 has 2 blocks: the curve's points are layer 0 alone, layer 1 alone, layer 1
    from the top (1 transcoder) and both (2): tails of 2, 1, 1 and 2 blocks, each with the head."""
    lm = load_model("random:2x64")
    d_sae = bench.SAE_EXPANSION * 64
    fl = bench.flops_per_token(lm, 32, d_sae)
    tc = 2 * (2 * 64 * d_sae + 64 * 64)
    want = fl["model"] + sum(k * fl["block"] + fl["head"] + n * tc for k, n in ((2, 2), (2, 1), (1, 1), (1, 1)))
    rows = {r["key"]: r for r in result["rows"]}
    assert rows["curves"]["flop_model_equiv"] == pytest.approx(want / fl["model"], rel=1e-12)
    assert math.isfinite(rows["curves"]["cost"]) and rows["curves"]["cost"] > 1


def test_report_formats(result):
    text = bench.format_report(result)
    assert "random:2x64" in text and "float32" in text and "2 layers x width 64" in text
    for r in result["rows"]:
        assert r["comparison"] in text
    assert "checks pass" in text and "FAIL" not in text
    assert "| CE suite part |" in text and "writing the run folder" in text
    bench.print_report(result)  # rich rendering does not raise


def test_random_model_spec(embedded_dir):
    lm = load_model("random:2x64")
    assert (lm.kind, lm.n_layers, lm.d_model) == ("bridge", 2, 64)
    assert lm.load_info["random"]["heads"] == 1
    with pytest.raises(UserError, match=r"bad model spec 'random:2by64': write random:LAYERSxWIDTH"):
        load_model("random:2by64")
    with pytest.raises(UserError, match=r"--tokens 16 is less than one batch \(4 x 32 tokens\)"):
        bench.run_bench("random:2x64", tokens=16, ctx=32, batch_size=4)
