"""Generation for `talk` and lm-eval's generate_until, against plain Hugging Face / PyTorch."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_topk_sae
from harness.cli.app import app
from harness.splice.generate import (Sampling, SharedGumbel, first_divergence, generate, logits_processors,
                              score_continuation, generate_no_cache, StopTracker)
from harness.model.loading import to_hf_module_path
from harness.splice.replacements import Replacement, from_sae
from harness.splice.splicer import Splicer
from harness.splice.variants import Variant
from harness.jobs.talk import talk_one

SAE_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def hf_plain(tiny_hf_dir):
    """The same checkpoint as tiny_hf, loaded as a plain Hugging Face model (the reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval(), AutoTokenizer.from_pretrained(tiny_hf_dir)


@pytest.fixture(scope="module")
def variants(tiny_hf_dir):
    sae = from_sae("tiny-sae", "tiny-sae", make_topk_sae(32, 64, 4, SAE_HOOK, str(tiny_hf_dir)), {})
    neurons = Replacement(name="neurons:4", spec="neurons:4", kind="neurons", hook="blocks.2.hook_attn_out", k=4)
    zero_mlp = Replacement(name="zero", spec="zero", kind="zero", hook="blocks.3.hook_mlp_out")
    return [Variant("clean", {}), Variant("tiny-sae", {SAE_HOOK: sae}),
            Variant("neurons", {neurons.hook: neurons}), Variant("zero-mlp", {zero_mlp.hook: zero_mlp}),
            Variant("joint", {SAE_HOOK: sae, neurons.hook: neurons})]


def test_hook_names_to_hf_modules(hf_plain):
    hf, _ = hf_plain
    assert to_hf_module_path("blocks.1.hook_resid_post", hf) == "model.layers.1"
    assert to_hf_module_path("model.layers.1", hf) == "model.layers.1"
    assert to_hf_module_path("blocks.2.hook_attn_out", hf) == "model.layers.2.self_attn"
    assert to_hf_module_path("blocks.3.hook_mlp_out", hf) == "model.layers.3.mlp"
    assert to_hf_module_path("blocks.2.hook_resid_pre", hf) == "model.layers.1"
    assert to_hf_module_path("blocks.0.hook_resid_pre", hf) is None
    assert to_hf_module_path("blocks.1.mlp.hook_post", hf) is None


def test_greedy_clean_equals_hf_generate(tiny_hf, hf_plain):
    hf, tok = hf_plain
    ids = tok("The capital of France is").input_ids
    want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                       pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    (got,) = generate(tiny_hf, [Variant("clean", {})], ids, 12, tokenizer=tok)
    assert got == want and len(got) == 12
    result = talk_one(tiny_hf, [], ids, tok, 12)
    assert result["clean"]["text"] == tok.decode(want) and result["clean"]["first_divergence"] is None


def _reference_greedy(lm, variant, ids, n):
    """No KV cache: the full forward with the splice, recomputed at every step (Splicer)."""
    splicer = Splicer(lm, variant.hooks)
    tokens = torch.tensor([ids])
    for _ in range(n):
        nxt = splicer.logits(tokens, variant=variant if variant.parts else None)[0, -1].argmax()
        tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
    return tokens[0, len(ids):].tolist()


def test_spliced_greedy_with_cache_equals_no_cache_loop(tiny_hf, hf_plain, variants):
    _, tok = hf_plain
    # An ordinary first token (position 0 stays unspliced) and a special token inside the prompt.
    ids = tok("def add(a, b):").input_ids + [tok.eos_token_id] + tok(" return").input_ids
    got = generate(tiny_hf, variants, ids, 10, tokenizer=tok)
    want = [_reference_greedy(tiny_hf, v, ids, 10) for v in variants]
    assert got == want
    assert any(g != got[0] for g in got[1:])  # the splices change something
    # the fallback loop without a cache (used for HookedTransformer) gives the same
    splicer = Splicer(tiny_hf, sorted({h for v in variants for h in v.hooks}))
    fallback = generate_no_cache(tiny_hf, splicer, variants, torch.tensor([ids] * len(variants)), 10, Sampling(),
                                  StopTracker(len(ids), tok.eos_token_id, tok))
    assert fallback == want


def test_sampling_is_seeded_and_independent_of_the_batch(tiny_hf, hf_plain, variants):
    _, tok = hf_plain
    ids = tok("Once upon a time").input_ids
    s = Sampling(temperature=0.9, top_p=0.95, seed=3)
    a = generate(tiny_hf, variants, ids, 8, s, tok)
    b = generate(tiny_hf, variants, ids, 8, s, tok)
    alone = generate(tiny_hf, variants[:1], ids, 8, s, tok)
    other = generate(tiny_hf, variants[:1], ids, 8, Sampling(0.9, 0.95, seed=4), tok)
    greedy = generate(tiny_hf, variants[:1], ids, 8, Sampling(), tok)
    assert a == b and alone[0] == a[0]
    assert other[0] != a[0] and greedy[0] != a[0]


def test_shared_gumbel_samples_the_softmax():
    """argmax(logits / T + Gumbel) over many seeds has the frequencies of softmax(logits / T),
    and top-p never picks a token outside the nucleus."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    ids = torch.zeros((1, 4), dtype=torch.long)
    n = 4000
    counts = np.zeros(5)
    for seed in range(n):
        counts[int(logits_processors(Sampling(0.7, 1.0, seed))(ids, logits.clone()).argmax())] += 1
    np.testing.assert_allclose(counts / n, torch.softmax(logits[0] / 0.7, -1).numpy(), atol=0.03)
    picked = {int(logits_processors(Sampling(1.0, 0.6, seed))(ids, logits.clone()).argmax()) for seed in range(300)}
    assert picked == {0, 1}  # softmax: 0.53, 0.19, ... -> the nucleus of mass 0.6 is {0, 1}
    assert torch.equal(SharedGumbel(1)(ids, logits), SharedGumbel(1)(ids, logits))


def test_scores_of_the_clean_continuation_match_a_plain_hook(tiny_hf, hf_plain, variants):
    """clean_logprob and KL against a plain Hugging Face forward with a PyTorch forward hook."""
    hf, tok = hf_plain
    prompt = tok("The quick brown fox").input_ids
    cont = tok(" jumps over the lazy dog").input_ids
    got = score_continuation(tiny_hf, variants[:2], prompt, cont)
    sae = variants[1].parts[SAE_HOOK]
    seq = torch.tensor([prompt + cont[:-1]])

    def splice(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        x_hat, _ = sae(x)
        x_hat[:, 0] = x[:, 0]  # position 0 keeps its activation
        return x_hat
    with torch.no_grad():
        clean = torch.log_softmax(hf(seq).logits[0].double(), -1)
        h = hf.model.layers[1].register_forward_hook(splice)
        try:
            spliced = torch.log_softmax(hf(seq).logits[0].double(), -1)
        finally:
            h.remove()
    at = torch.arange(len(prompt) - 1, seq.shape[1])
    target = torch.tensor(cont)
    for name, lp in (("clean", clean), ("tiny-sae", spliced)):
        assert got[name]["clean_logprob"] == pytest.approx(float(lp[at, target].mean()), abs=1e-5)
    kl = (clean[at].exp() * (clean[at] - spliced[at])).sum(-1).mean()
    assert got["tiny-sae"]["kl"] == pytest.approx(float(kl), abs=1e-6) and got["tiny-sae"]["kl"] > 0
    assert got["clean"]["kl"] == 0


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2


def test_generate_until_stops_at_stop_strings_and_shares_the_batch(tiny_hf, hf_plain, variants):
    from harness.lmeval.backend import variant_views

    _, tok = hf_plain
    views = variant_views(tiny_hf, variants[:2])
    prompt = "def add(a, b):"
    from lm_eval.api.instance import Instance

    reqs = [Instance(request_type="generate_until", doc={}, arguments=(prompt, {"until": ["\n"], "max_gen_toks": 8}), idx=0)]
    texts = [v.generate_until(reqs)[0] for v in views]
    assert len(views[0].engine.generations) == 1  # the second view was served from the batch
    for v, text in zip(variants[:2], texts):
        full = tok.decode(_reference_greedy(tiny_hf, v, tok(prompt).input_ids, 8))
        assert text == full.split("\n")[0]


def _talk(args):
    result = CliRunner().invoke(app, ["talk", *args])
    return result.exit_code, result.stdout, [l for l in result.stderr.splitlines() if l.strip()]


def test_talk_json(tiny_hf_dir, tmp_path):
    code, out, err = _talk(["--model", str(tiny_hf_dir), "--sae", f"zero@{SAE_HOOK}", "--prompt", "Hello",
                            "--prompt", "x = 1 +", "--max-new-tokens", "4", "--json"])
    assert code == 0, err
    objs = [json.loads(line) for line in out.splitlines()]
    assert [o["prompt"] for o in objs] == ["Hello", "x = 1 +"]
    for o in objs:
        assert list(o["variants"]) == ["clean", "zero@1.resid_post"]
        for r in o["variants"].values():
            assert set(r) == {"text", "token_ids", "first_divergence", "clean_logprob", "kl"}
            assert len(r["token_ids"]) == 4
        assert o["variants"]["clean"]["first_divergence"] is None and o["variants"]["clean"]["kl"] == 0


def test_talk_panels_mark_the_divergence(tiny_hf_dir):
    code, out, err = _talk(["--model", str(tiny_hf_dir), "--sae", f"zero@{SAE_HOOK}", "--prompt", "Hello",
                            "--max-new-tokens", "4"])
    assert code == 0, err
    panels = out.split("╭")
    assert "clean" in panels[1] and "same as clean" not in panels[1] and "departs" not in panels[1]
    assert "zero@1.resid_post" in panels[2] and re.search(r"departs at token \d+", panels[2])


@pytest.mark.parametrize("args, message", [
    (["--prompt", "  "], "error: empty prompt"),
    (["--prompts", "/nonexistent/prompts.txt"], "error: cannot read prompt file /nonexistent/prompts.txt"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "error: --max-new-tokens must be positive"),
])
def test_talk_bad_input(tiny_hf_dir, args, message):
    code, out, err = _talk(["--model", str(tiny_hf_dir), *args])
    assert code == 2 and len(err) == 1 and err[0].startswith(message) and out == ""


def test_talk_chat_without_template(tiny_hf_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(tiny_hf_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, out, err = _talk(["--model", str(folder), "--prompt", "hi", "--chat"])
    assert code == 2 and err == [f"error: --chat: the tokenizer of {folder} has no chat template"]


def test_main_job_generations_stage(tiny_hf_dir, tmp_path, hf_plain):
    """The pipeline's generations stage writes the built-in prompts for every variant; the clean
    texts are plain Hugging Face greedy continuations of the same token ids."""
    from harness.jobs.pipeline import RunConfig, run_job
    from harness.jobs.talk import BUILTIN_PROMPTS, encode

    hf, tok = hf_plain
    out = tmp_path / "run"
    run_job(RunConfig(model=str(tiny_hf_dir), dataset="builtin", saes=[f"zero@{SAE_HOOK}"], tokens=32, ctx=16, calib_seqs=2,
                      out=str(out)), ("generations",))
    gens = json.loads((out / "generations.json").read_text())["prompts"]
    assert [g["prompt"] for g in gens] == [p for _, p, _ in BUILTIN_PROMPTS]
    md = (out / "generations.md").read_text()
    for g, (_, prompt, chat) in zip(gens, BUILTIN_PROMPTS):
        assert list(g["variants"]) == ["clean", "zero@1.resid_post"] and g["chat"] == chat
        assert f"`{prompt.splitlines()[0]}" in md
    ids = encode(tok, gens[0]["prompt"], gens[0]["chat"])
    want = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gens[0]["variants"]["clean"]["token_ids"] == want[0, len(ids):].tolist()
