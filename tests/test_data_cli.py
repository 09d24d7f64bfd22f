"""`ce`/`run` with --dataset and `lm-eval` with lm-eval's own options, on a tiny random Llama
(SmolLM2's tokenizer): every number against a plain transformers forward or lm-eval's HFLM."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from harness.cli.app import app

HOOK = "blocks.1.hook_resid_post"
PARAS = [f"Paragraph {i} tells of " + " ".join(f"river{j % 13} stone{(i * j) % 7}" for j in range(12 + i % 9)) + "."
         for i in range(80)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(PARAS) + "\n", encoding="utf-8")
    return path


def _invoke(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, [l for l in result.stderr.splitlines() if l.strip()], result


def test_ce_on_a_txt_file_equals_plain_transformers(tiny_hf_dir, text_file, tmp_path):
    """`ce --dataset FILE.txt`: the evaluated tokens are the paragraphs tokenised + EOS, cut
    into rows of 31 behind a BOS (the model's TransformerBridge tokenizer adds one), and
    CE_clean is a plain transformers forward's mean next-token loss over the positions whose
    input token is not special."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ce"
    code, lines, _ = _invoke(["ce", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--dataset", str(text_file),
                              "--tokens", "256", "--ctx", "32", "--out", str(out)])
    assert code == 0, lines
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    ids = [x for p in PARAS for x in tok(p, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    tokens = torch.cat([torch.full((8, 1), tok.bos_token_id), torch.tensor(ids[:8 * 31]).view(8, 31)], dim=1)
    assert (torch.from_numpy(np.load(out / "tokens.npy")) == tokens).all()
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    keep = ~torch.isin(tokens[:, :-1], torch.tensor(sorted(set(tok.all_special_ids))))
    assert (~keep).sum() > 0  # EOS inputs inside: the special-position rule is exercised
    clean = json.loads((out / "metrics.json").read_text())[0]
    assert clean["ce_clean"] == pytest.approx(float(-lp[keep].mean()), abs=1e-5)
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["source"] == str(text_file) and data["kind"] == "txt" and data["split"] == "train"
    assert data["column"] == "text" and data["n_documents"] == sum(1 for _ in _docs_until(tok, 8 * 31))
    assert data["tokens_sha256"] == hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def _docs_until(tok, n):
    total = 0
    for p in PARAS:
        yield p
        total += len(tok(p, add_special_tokens=False).input_ids) + 1
        if total >= n:
            return


@pytest.mark.parametrize("extra,message", [
    ([], r"^error: no default text for model '.*' \(its SAEs name no dataset_path\): pass --dataset"),
    (["--dataset", "nope.txt"], r"^error: no such file or folder: nope\.txt$"),
    (["--dataset", "{text}", "--tokens", "100000"], r"^error: dataset '.*corpus\.txt' holds \d+ tokens, \d+ needed"),
    (["--dataset", "{text}", "--text-column", "body"], r"^error: .*corpus\.txt: a \.txt file has no column 'body'"),
])
def test_bad_dataset_is_one_line_and_writes_nothing(tiny_hf_dir, text_file, tmp_path, extra, message):
    import re

    out = tmp_path / "run"
    args = ["ce", "--model", str(tiny_hf_dir), "--sae", f"mean@{HOOK}", "--tokens", "64", "--ctx", "16",
            *[a.replace("{text}", str(text_file)) for a in extra], "--out", str(out)]
    code, lines, _ = _invoke(args)
    assert code == 2 and len(lines) == 1 and re.match(message, lines[0]), lines
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_mean_baseline_calibrates_on_the_same_source_after_the_evaluated_documents(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "ce"
    code, lines, _ = _invoke(["ce", "--model", str(tiny_hf_dir), "--sae", f"mean@{HOOK}", "--dataset", str(text_file),
                              "--tokens", "128", "--ctx", "16", "--out", str(out)])
    assert code == 0, lines
    config = json.loads((out / "config.json").read_text())
    assert config["calibration"] == "16 x 16 tokens from the documents after the evaluated ones"
    assert config["data"]["calibration_documents"] > 0


def test_run_for_any_model_writes_ce_and_task_tables(tiny_hf_dir, text_file, tmp_path):
    out = tmp_path / "run"
    code, lines, result = _invoke(["run", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--dataset",
                                   str(text_file), "--tasks", "hellaswag_offline,winogrande_offline", "--limit", "3",
                                   "--tokens", "64", "--ctx", "16", "--out", str(out)])
    assert code == 0, lines
    for name in ("metrics.json", "tokens.npy", "ce.md", "per_question.csv", "tasks.md", "lm_eval_results.json",
                 "report.html", "config.json"):
        assert (out / name).is_file(), name
    per_q = pd.read_csv(out / "per_question.csv")
    assert per_q.groupby(["variant", "task"]).size().to_dict() == {
        (v, t): 3 for v in ("clean", "zero@1.resid_post") for t in ("hellaswag_offline", "winogrande_offline")}
    agg = json.loads((out / "lm_eval_results.json").read_text())
    clean = per_q[(per_q.variant == "clean") & (per_q.task == "hellaswag_offline")]
    assert agg["clean"]["hellaswag_offline"]["acc,none"] == pytest.approx(clean.correct.mean())
    assert agg["clean"]["hellaswag_offline"]["acc_norm,none"] == pytest.approx(clean.correct_norm.mean())
    config = json.loads((out / "config.json").read_text())
    assert config["run"]["tasks"] == {"hellaswag_offline": 3, "winogrande_offline": 3}
    assert config["task_questions"] == {"hellaswag_offline": 3, "winogrande_offline": 3}


def test_run_needs_sae_for_another_model(tiny_hf_dir, tmp_path):
    code, lines, _ = _invoke(["run", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "r")])
    assert code == 2 and lines == [f"error: --sae is needed for '{tiny_hf_dir}' (the default SAEs belong to smollm2-135m)"]


def _as_logged(arguments) -> dict:
    """A sample's request arguments as lm-eval's EvaluationTracker writes them to samples_*.jsonl."""
    return {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)} for i, args in enumerate(arguments)}


def _hflm_reference(tiny_hf_dir, task, **kwargs):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from harness.lmeval import mmlu

    return lm_eval.simple_evaluate(model=HFLM(pretrained=str(tiny_hf_dir), batch_size=2, device="cpu"), tasks=[task],
                                   task_manager=mmlu.task_manager(include_defaults=False), log_samples=True,
                                   bootstrap_iters=0, **kwargs)


def test_lm_eval_options_are_lm_evals(tiny_hf_dir, tmp_path):
    """lm-eval's option names (underscored, as `lm-eval run` spells them) reach simple_evaluate:
    1-shot PIQA with seed 3 equals HFLM's with the same arguments, and --output_path holds
    lm-eval's results JSON and samples for each variant."""
    out, lm_out = tmp_path / "run", tmp_path / "lm-eval-out"
    code, lines, _ = _invoke(["lm-eval", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--tasks", "piqa_offline",
                              "--limit", "4", "--num_fewshot", "1", "--batch_size", "2", "--seed", "3",
                              "--output_path", str(lm_out), "--log_samples", "--out", str(out)])
    assert code == 0, lines
    ref = _hflm_reference(tiny_hf_dir, "piqa_offline", limit=4, num_fewshot=1, random_seed=3, numpy_random_seed=3,
                          torch_random_seed=3, fewshot_random_seed=3)
    files = {p.parent.parent.name: p for p in lm_out.glob("*/*/results_*.json")}
    assert set(files) == {"clean", "zero@1.resid_post"}  # lm-eval's sanitize_model_name keeps @
    ours = json.loads(files["clean"].read_text())
    assert ours["n-shot"]["piqa_offline"] == 1
    assert ours["results"]["piqa_offline"]["acc,none"] == ref["results"]["piqa_offline"]["acc,none"]
    samples = [json.loads(l) for l in next(files["clean"].parent.glob("samples_piqa_offline_*.jsonl")).read_text().splitlines()]
    for a, b in zip(samples, ref["samples"]["piqa_offline"], strict=True):
        assert a["arguments"] == _as_logged(b["arguments"])  # same 1-shot prompts
        assert [float(r[0]) for r in a["filtered_resps"]] == pytest.approx([float(r[0]) for r in b["filtered_resps"]],
                                                                          abs=1e-4)


def test_chat_template_and_system_instruction(tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    code, lines, _ = _invoke(["lm-eval", "--model", str(tiny_hf_dir), "--tasks", "arc_easy_offline", "--limit", "3",
                              "--apply_chat_template", "--system_instruction", "Answer briefly.",
                              "--output_path", str(tmp_path / "o"), "--log_samples", "--out", str(out)])
    assert code == 0, lines
    ref = _hflm_reference(tiny_hf_dir, "arc_easy_offline", limit=3, apply_chat_template=True,
                          fewshot_as_multiturn=True, system_instruction="Answer briefly.")
    path = next((tmp_path / "o" / "clean").glob("*/samples_arc_easy_offline_*.jsonl"))
    ours = [json.loads(l) for l in path.read_text().splitlines()]
    for a, b in zip(ours, ref["samples"]["arc_easy_offline"], strict=True):
        context = a["arguments"]["gen_args_0"]["arg_0"]
        assert "Answer briefly." in context and "<|im_start|>" in context
        assert a["arguments"] == _as_logged(b["arguments"])
        assert [float(r[0]) for r in a["filtered_resps"]] == pytest.approx([float(r[0]) for r in b["filtered_resps"]],
                                                                          abs=1e-4)


def test_use_cache_one_file_per_variant(tiny_hf_dir, tmp_path):
    cache = tmp_path / "cache" / "lm"
    args = ["lm-eval", "--model", str(tiny_hf_dir), "--sae", f"zero@{HOOK}", "--tasks", "copa_offline", "--limit", "3",
            "--use_cache", str(cache)]
    first = _invoke([*args, "--out", str(tmp_path / "a")])
    second = _invoke([*args, "--out", str(tmp_path / "b")])
    assert first[0] == second[0] == 0, first[1] + second[1]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["lm_clean_rank0.db", "lm_zero_1.resid_post_rank0.db"]
    a = json.loads((tmp_path / "a" / "lm_eval_results.json").read_text())
    b = json.loads((tmp_path / "b" / "lm_eval_results.json").read_text())
    assert a == b and a["clean"]["copa_offline"]["acc,none"] is not None


@pytest.mark.parametrize("args,message", [
    (["--tasks", "hellaswag_ofline"], "error: unknown task 'hellaswag_ofline'; nearest offline tasks: hellaswag_offline"),
    (["--tasks", "piqa_offline", "--model_args", "pretrained=x"],
     "error: --model_args is not supported by sae-harness lm-eval: the model is --model and the SAEs --sae"),
    (["--tasks", "piqa_offline", "--limit", "many"], "error: lm-eval option: argument --limit/-L: invalid float value: 'many'"),
    (["--tasks", "piqa_offline", "--log_samples"],
     "error: Specify --output_path if providing --log_samples or --predict_only"),
    (["--tasks", "piqa_offline", "--batch_size", "auto"], "error: --batch_size must be a positive integer here, got 'auto'"),
    (["--tasks", "piqa_offline", "--limit", "-1"], "error: --limit must be positive"),
    (["--tasks", ","], "error: --tasks names no task"),
    (["--tasks", "piqa_offline,,arc_easy_offline"], "error: --tasks has an empty task name"),
])
def test_lm_eval_bad_options(tiny_hf_dir, tmp_path, args, message):
    out = tmp_path / "run"
    code, lines, _ = _invoke(["lm-eval", "--model", str(tiny_hf_dir), *args, "--out", str(out)])
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--tasks", ","], "error: --tasks names no task"),
    (["--limit", "0"], "error: --limit must be positive"),
    (["--mmlu-limit", "-2"], "error: --mmlu-limit must be positive"),
])
def test_run_bad_task_options(tiny_hf_dir, tmp_path, args, message):
    out = tmp_path / "run"
    code, lines, _ = _invoke(["run", "--model", str(tiny_hf_dir), "--sae", "zero@blocks.1.hook_resid_post", *args,
                              "--out", str(out)])
    assert code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not out.exists()
