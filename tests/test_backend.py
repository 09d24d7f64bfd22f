"""The lm-eval backend against lm-eval's own HFLM and against the CE path."""

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

import plain_hf
from conftest import make_topk_sae
from harness.evals import ce
from harness.lmeval.backend import SpliceEngine, SplicedLM, variant_views
from harness.splice.replacements import from_sae
from harness.splice.variants import Variant

HOOK = "blocks.1.hook_resid_post"


def _requests(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


@pytest.fixture(scope="module")
def sae_variant(tiny_hf_dir):
    sae = from_sae("tiny-sae", "tiny-sae", make_topk_sae(32, 64, 4, HOOK, str(tiny_hf_dir)), {})
    return Variant("tiny-sae", {HOOK: sae})


def test_loglikelihood_equals_ce_path_per_token(tiny_hf, sae_variant):
    """Sum of the CE suite's per-token losses over the continuation = the backend's log-likelihood."""
    views = variant_views(tiny_hf, [Variant("clean", {}), sae_variant], batch_size=3)
    tok = views[0].tokenizer
    pairs = [("The quick brown fox", " jumps over"), ("Answer:", " B"), ("Answer:", " C"), ("x = 1 +", " 2")]
    got = {v.variant.name: [ll for ll, _ in v.loglikelihood(_requests("loglikelihood", pairs))] for v in views}
    for i, (ctx, cont) in enumerate(pairs):
        whole = tok.encode(ctx + cont, add_special_tokens=False)
        n_ctx = len(tok.encode(ctx, add_special_tokens=False))
        tokens = torch.tensor([whole])
        out = ce.evaluate(tiny_hf, [Variant("clean", {}), sae_variant], tokens, 1, tokens, 10)
        clean_nll = out.per_token_dce["clean"][0]
        sae_nll = clean_nll + out.per_token_dce["tiny-sae"][0]
        # position t predicts token t+1: the continuation is predicted from positions n_ctx-1 ..
        assert got["clean"][i] == pytest.approx(-clean_nll[n_ctx - 1:].sum(), abs=1e-4)
        assert got["tiny-sae"][i] == pytest.approx(-sae_nll[n_ctx - 1:].sum(), abs=1e-4)
    assert got["clean"] != got["tiny-sae"]


def test_shared_engine_equals_separate_engines(tiny_hf, sae_variant):
    pairs = [("Question: what is two plus two?\nAnswer:", c) for c in (" A", " B", " C", " D")]
    shared = variant_views(tiny_hf, [Variant("clean", {}), sae_variant], batch_size=2)
    alone = SplicedLM(engine=SpliceEngine(tiny_hf, [sae_variant], batch_size=1), variant="tiny-sae")
    a = shared[1].loglikelihood(_requests("loglikelihood", pairs))
    b = alone.loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-5)
    # The shared engine ran the batch once for both variants: the clean view is served from cache.
    batches = shared[0].engine.forward_stats["batches"]
    shared[0].loglikelihood(_requests("loglikelihood", pairs))
    assert shared[0].engine.forward_stats["batches"] == batches


@pytest.fixture(scope="module")
def plain_model(tiny_hf_dir):
    """The same checkpoint as an ordinary transformers model (the independent reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def test_rolling_and_generation_match_plain_forward(tiny_hf, sae_variant, plain_model):
    """Against a plain transformers forward with the SAE written out in a decoder-layer hook."""
    lm = SplicedLM(engine=SpliceEngine(tiny_hf, [sae_variant], batch_size=2), variant="tiny-sae")
    special = tiny_hf.special_ids()
    splice = {1: plain_hf.topk_reconstruct(sae_variant.parts[HOOK].sae)}
    text = "def add(a, b):\n    return a + b\n"
    ids = lm.tok_encode(text)
    tokens = torch.tensor([[lm.prefix_token_id] + ids])
    want = -plain_hf.nll(plain_hf.forward(plain_model, tokens, splice, special), tokens).sum().item()
    (got,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(want, abs=1e-4)
    clean = -plain_hf.nll(plain_hf.forward(plain_model, tokens, {}, special), tokens).sum().item()
    assert abs(clean - want) > 1e-2  # the SAE changes the answer

    prompt = "Hello world"
    (gen,) = lm.generate_until(_requests("generate_until", [(prompt, {"until": ["\n\n"], "max_gen_toks": 5})]))
    toks = torch.tensor([lm.tok_encode(prompt)])
    new = []
    for _ in range(5):
        nxt = int(plain_hf.forward(plain_model, toks, splice, special)[0, -1].argmax())
        if nxt == lm.eot_token_id:
            break
        new.append(nxt)
        toks = torch.cat([toks, torch.tensor([[nxt]])], 1)
    assert gen == lm.tok_decode(new).split("\n\n")[0]


MAX_LEN = 16
LONG = ("The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
        "and the bird sings a song about rivers, mountains and the sea, all through the long afternoon.")


@pytest.fixture(scope="module")
def hflm(tiny_hf_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_hf_dir), max_length=MAX_LEN, batch_size=1, device="cpu")


def _hflm_with_splice(hflm, reconstruct, special):
    """Forward hooks on HFLM's own model: capture each call's input ids, splice layer 1's output
    where the input token is ordinary and not in position 0 of the (truncated) window."""
    seen = {}

    def grab_ids(module, args, kwargs):
        seen["ids"] = args[0] if args else kwargs["input_ids"]

    def splice(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        at = plain_hf.splice_positions(seen["ids"], special)
        new = torch.where(at[..., None], reconstruct(x)[0], x)
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return [hflm.model.register_forward_pre_hook(grab_ids, with_kwargs=True),
            hflm.model.model.layers[1].register_forward_hook(splice)]


def test_left_truncation_and_rolling_windows_equal_hflm(tiny_hf, sae_variant, hflm):
    """Requests longer than max_length are cut from the left as HFLM cuts them, and a rolling
    log-likelihood over several windows sums the same windows; with no SAE the numbers are
    HFLM's, with the SAE they are HFLM's with the splice hooked into its model."""
    views = variant_views(tiny_hf, [Variant("clean", {}), sae_variant], batch_size=3, max_length=MAX_LEN)
    tok = views[0].tokenizer
    assert len(tok.encode(LONG)) > 2 * MAX_LEN  # several windows, and contexts that must be cut
    pairs = [(LONG, " Then it rained."), (LONG[:60], " fox"), ("Short one", " here")]
    ll_req = _requests("loglikelihood", pairs)
    roll_req = _requests("loglikelihood_rolling", [(LONG,), (LONG[:50],)])
    ours = {v.variant.name: ([x for x, _ in v.loglikelihood(ll_req)], v.loglikelihood_rolling(roll_req))
            for v in views}
    ref_ll = [x for x, _ in hflm.loglikelihood(ll_req)]
    ref_roll = hflm.loglikelihood_rolling(roll_req)
    np.testing.assert_allclose(ours["clean"][0], ref_ll, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["clean"][1], ref_roll, rtol=0, atol=1e-4)
    handles = _hflm_with_splice(hflm, plain_hf.topk_reconstruct(sae_variant.parts[HOOK].sae), tiny_hf.special_ids())
    try:
        sae_ll = [x for x, _ in hflm.loglikelihood(ll_req)]
        sae_roll = hflm.loglikelihood_rolling(roll_req)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(ours["tiny-sae"][0], sae_ll, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["tiny-sae"][1], sae_roll, rtol=0, atol=1e-4)
    assert np.abs(np.array(sae_roll) - np.array(ref_roll)).min() > 1e-2
    # truncation matters: without it the long request's answer would differ
    full = variant_views(tiny_hf, [Variant("clean", {})], batch_size=1, max_length=256)[0]
    (untruncated, _), = full.loglikelihood(_requests("loglikelihood", pairs[:1]))
    assert abs(untruncated - ref_ll[0]) > 1e-3


@pytest.mark.slow
def test_clean_backend_equals_hflm_on_mmlu(embedded_dir):
    """No SAE: same log-likelihoods as lm-eval's HFLM (1e-4) and the same accuracies."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from harness.lmeval import mmlu
    from harness.lmeval.backend import evaluate_tasks
    from harness.model.loading import load_model

    tasks = ["mmlu_offline_anatomy", "mmlu_offline_college_physics", "mmlu_offline_marketing"]
    tm = mmlu.task_manager()
    lm = load_model("smollm2-135m")
    ours = evaluate_tasks(lm, [Variant("clean", {})], tasks, tm, batch_size=8, limit=10, log_samples=True).by_variant["clean"]
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=str(embedded_dir), batch_size=8, device="cpu"),
                                  tasks=tasks, task_manager=tm, limit=10, log_samples=True)
    n = 0
    for task in tasks:
        assert ours["results"][task]["acc,none"] == ref["results"][task]["acc,none"]
        for a, b in zip(ours["samples"][task], ref["samples"][task]):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["filtered_resps"], b["filtered_resps"]):  # (loglikelihood, is_greedy)
                assert float(ra[0]) == pytest.approx(float(rb[0]), abs=1e-4)
                assert bool(ra[1]) == bool(rb[1])
                n += 1
    assert n == 4 * 30


def test_registered_model_works_from_simple_evaluate(tiny_hf_dir, tmp_path):
    """`model="sae-spliced"` with a model_args string, as lm-eval users call it."""
    import lm_eval

    from harness.lmeval import mmlu

    from harness.lmeval.backend import evaluate_tasks
    from harness.model.loading import load_model
    from harness.splice.replacements import load_replacement

    task, tm = "mmlu_offline_anatomy", mmlu.task_manager()
    res = lm_eval.simple_evaluate(model="sae-spliced", model_args=f"model={tiny_hf_dir},sae=zero@{HOOK}+mean@blocks.2.hook_resid_post",
                                  tasks=[task], task_manager=tm, limit=3, log_samples=True)
    from harness.text import builtin as data
    from harness.splice.splicer import calibrate

    lm = load_model(str(tiny_hf_dir))
    zero, mean = load_replacement(f"zero@{HOOK}"), load_replacement("mean@blocks.2.hook_resid_post")
    calibrate(lm, [zero, mean], data.pack(lm.tokenizer, data.documents("train-prose"), 16, 128))
    ref = evaluate_tasks(lm, [Variant("zm", {HOOK: zero, mean.hook: mean})], [task], tm,
                         limit=3, log_samples=True).by_variant["zm"]
    got = [float(r[0]) for s in res["samples"][task] for r in s["filtered_resps"]]
    want = [float(r[0]) for s in ref["samples"][task] for r in s["filtered_resps"]]
    assert len(got) == 12 and got == pytest.approx(want, abs=1e-6)
