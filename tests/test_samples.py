"""Per-question rows from lm-eval's logged samples, for any multiple-choice task.

lm-eval's own task configs (hellaswag, arc_easy, winogrande YAMLs shipped with lm-eval 0.4.13)
run on a few in-memory documents through lm-eval's evaluator with a fake LM whose
log-likelihoods are a fixed function of the request. Expected values are recomputed here from
the documents: acc = argmax of the log-likelihoods is gold, acc_norm = argmax of log-likelihood
divided by the choice's length in characters, log p(gold) = log-softmax over the choices.
"""

import math
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy.special import logsumexp

from harness.lmeval import samples


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def fake_ll(context: str, continuation: str) -> float:
    """A deterministic log-likelihood in [-12, 0), different for every request."""
    return -12.0 * (zlib.crc32(f"{context}\x00{continuation}".encode()) % 100_000 + 1) / 100_001


def make_lm():
    from lm_eval.api.model import LM

    class FakeLM(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(fake_ll(*r.args), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return FakeLM()


def in_memory_task(yaml_name: str, split: str, docs: list[dict], name: str):
    """lm-eval's own task from its YAML, with the dataset replaced by `docs`."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_eval_tasks_dir() / yaml_name, resolve_func=True)
    cfg.pop("dataset_path", None)
    cfg.pop("dataset_name", None)
    cfg.pop("tag", None)
    cfg.update(task=name, training_split=None, test_split=None, validation_split=split,
               custom_dataset=lambda **kw: datasets.DatasetDict({split: datasets.Dataset.from_list(docs)}))
    return ConfigurableTask(config=cfg)


def evaluate(task):
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    return lm_eval_evaluate(lm=make_lm(), task_dict={task.config.task: task}, log_samples=True, bootstrap_iters=0)


# non-ASCII endings: their length in characters (what acc_norm divides by) differs from their bytes
ENDINGS = ["went home.", "ate a very large sandwich slowly at noon.", "ran.", "sat down on the old wooden bench",
           "cried.", "played the piano for two long hours.", "left", "wrote a letter to the editor of the paper",
           "ça", "éèêë àâ", "déjà — ñ", "met Zoë and Chloé", "überémû", "fled"]


def hellaswag_docs(n=60):
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        endings = [f"{ENDINGS[j]} {i}" for j in rng.choice(len(ENDINGS), size=4, replace=False)]
        docs.append({"ind": i, "activity_label": f"Activity {i}", "ctx_a": f"A person number {i} stands.",
                     "ctx_b": "then they", "ctx": "", "endings": endings, "source_id": "x", "split": "val",
                     "split_type": "indomain", "label": str(int(rng.integers(0, 4)))})
    return docs


def test_hellaswag_acc_acc_norm_and_logp_match_hand_computation():
    docs = hellaswag_docs()
    out = evaluate(in_memory_task("hellaswag/hellaswag.yaml", "validation", docs, "hellaswag_offline"))
    logged = out["samples"]["hellaswag_offline"]
    df = samples.per_question(out["samples"], "clean")
    assert list(df.columns) == samples.COLUMNS and len(df) == len(docs)
    assert set(df.task) == {"hellaswag_offline"} and set(df.subject) == {""} and set(df.category) == {""}
    df = df.set_index("doc_id")
    n_differ = n_bytes_differ = 0
    for smp in logged:
        doc = docs[smp["doc_id"]]
        choices = [e.strip() for e in doc["endings"]]  # hellaswag's preprocess leaves these unchanged
        lls = np.array([fake_ll(ctx, cont) for ctx, cont in smp["arguments"]])
        assert [cont for _, cont in smp["arguments"]] == [" " + c for c in choices]
        gold = int(doc["label"])
        acc = int(np.argmax(lls) == gold)
        acc_norm = int(np.argmax(lls / np.array([len(c) for c in choices])) == gold)
        row = df.loc[smp["doc_id"]]
        assert (row.correct, row.correct_norm, row.pred) == (acc, acc_norm, int(np.argmax(lls)))
        assert row.logp_correct == pytest.approx(lls[gold] - logsumexp(lls), abs=1e-12)
        by_bytes = int(np.argmax(lls / np.array([len(c.encode()) for c in choices])) == gold)
        n_differ += acc != acc_norm
        n_bytes_differ += by_bytes != acc_norm
    assert n_differ > 0 and n_bytes_differ > 0  # the documents tell acc, acc_norm and a byte-length norm apart
    res = out["results"]["hellaswag_offline"]
    assert df.correct.mean() == pytest.approx(res["acc,none"])
    assert df.correct_norm.mean() == pytest.approx(res["acc_norm,none"])


def test_arc_target_template_gives_the_gold_index():
    docs = [{"id": str(i), "question": f"Question {i}?",
             "choices": {"text": [f"answer {i} {w}" for w in ("a", "bb", "ccc dd", "e")], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(12)]
    out = evaluate(in_memory_task("arc/arc_easy.yaml", "validation", docs, "arc_easy_offline"))
    df = samples.per_question(out["samples"], "sae").set_index("doc_id")
    for i, doc in enumerate(docs):
        smp = next(s for s in out["samples"]["arc_easy_offline"] if s["doc_id"] == i)
        lls = np.array([r[0] for r in smp["filtered_resps"]])
        gold = "ABCD".index(doc["answerKey"])
        assert df.loc[i, "logp_correct"] == pytest.approx(lls[gold] - logsumexp(lls), abs=1e-12)
    assert df.correct.mean() == pytest.approx(out["results"]["arc_easy_offline"]["acc,none"])
    assert df.correct_norm.mean() == pytest.approx(out["results"]["arc_easy_offline"]["acc_norm,none"])


def winogrande_docs(n=16):
    return [{"sentence": f"Sam gave Alex book {i} because _ had finished reading it.", "option1": "Sam",
             "option2": "Alex", "answer": "12"[i % 2]} for i in range(n)]


def test_winogrande_needs_its_task_for_the_gold_choice():
    """Winogrande's choices are contexts and its target the shared continuation: the gold index
    is not in the sample, so the rows come from lm-eval's task methods."""
    docs = winogrande_docs()
    task = in_memory_task("winogrande/default.yaml", "validation", docs, "winogrande_offline")
    out = evaluate(task)
    assert samples.needs_task_objects(out["samples"]) == ["winogrande_offline"]
    with pytest.raises(ValueError, match="winogrande_offline: its logged target .* is not a choice index"):
        samples.per_question(out["samples"], "clean")
    df = samples.per_question(out["samples"], "clean", {"winogrande_offline": task}).set_index("doc_id")
    assert df.correct_norm.isna().all()  # winogrande reports acc only
    for smp in out["samples"]["winogrande_offline"]:
        lls = np.array([fake_ll(ctx, cont) for ctx, cont in smp["arguments"]])
        gold = int(docs[smp["doc_id"]]["answer"]) - 1
        assert df.loc[smp["doc_id"], "correct"] == int(np.argmax(lls) == gold)
        assert df.loc[smp["doc_id"], "logp_correct"] == pytest.approx(lls[gold] - logsumexp(lls), abs=1e-12)
    assert df.correct.mean() == pytest.approx(out["results"]["winogrande_offline"]["acc,none"])


def logged(doc_id, lls, target, **metrics):
    """A sample dict shaped like lm-eval 0.4.13's logged samples (evaluator.py)."""
    return {"doc_id": doc_id, "doc": {}, "target": target, "arguments": [["q", f" {i}"] for i in range(len(lls))],
            "resps": [[[ll, False]] for ll in lls], "filtered_resps": [[ll, False] for ll in lls],
            "filter": "none", "metrics": list(metrics), **metrics}


def test_mmlu_subjects_pool_into_task_mmlu_and_other_outputs_are_skipped():
    smp = {"mmlu_offline_virology": [logged(0, [-1.0, -0.5, -2.0, -3.0], 1, acc=1.0)],
           "mmlu_anatomy": [logged(3, [-1.0, -0.5, -2.0, -3.0], 2, acc=0.0)],
           "some_generation_task": [{"doc_id": 0, "target": "x", "filtered_resps": ["an answer"], "filter": "none"}]}
    df = samples.per_question(smp, "v")
    assert list(df.task) == ["mmlu", "mmlu"] and list(df.subject) == ["virology", "anatomy"]
    assert list(df.category) == ["other", "stem"] and list(df.correct) == [1, 0]
    lse = math.log(sum(math.exp(x) for x in (-1.0, -0.5, -2.0, -3.0)))
    assert df.logp_correct.tolist() == pytest.approx([-0.5 - lse, -2.0 - lse])
    assert samples.mmlu_subject("mmlu_offline_stem") is None  # a group name, not a subject


def test_gold_that_disagrees_with_lm_evals_acc_is_an_error():
    smp = {"t": [logged(0, [-1.0, -0.5], 0, acc=1.0)]}
    with pytest.raises(ValueError, match="disagrees with lm-eval's acc"):
        samples.per_question(smp, "v")
