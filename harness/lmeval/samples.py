"""lm-eval's logged samples of multiple-choice tasks -> one row per (variant, task, question).

With log_samples=True lm-eval keeps, for every document of a task: the document, its target,
the requests, `filtered_resps` (one (log-likelihood, is_greedy) pair per choice) and the
per-document values of the task's metrics (`acc`, and `acc_norm` where the task lists it).
Those metric values are lm-eval's own (ConfigurableTask.process_results: acc compares
argmax(ll) with the gold choice, acc_norm argmax(ll / len(choice)) where len counts the
choice string's characters), so they are copied, not recomputed. What lm-eval does not log
is the gold choice's probability: `logp_correct` is log-softmax over the choices'
log-likelihoods, taken at the gold choice. The raw log-likelihood of a choice also moves with
how likely the model is to write that kind of continuation at all; normalised over the choices
it measures how much the model prefers the right answer among the offered ones.

The gold index is the logged target when that is an index (MMLU, HellaSwag, ARC, PIQA...).
Tasks whose target is text (Winogrande puts the choices in the context and the shared
continuation in the target) need their lm-eval Task objects: `task_objects()` builds them
and the gold comes from the task's own doc_to_text/doc_to_target/doc_to_choice, as lm-eval's
process_results takes it.

MMLU's 57 subject tasks (mmlu_offline_<subject> or lm-eval's mmlu_<subject>) become task
"mmlu" with their subject and category, so they pool into one MMLU row.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
from scipy.special import logsumexp

COLUMNS = ["variant", "task", "subject", "category", "doc_id", "correct", "correct_norm", "logp_correct", "pred"]
MMLU = "mmlu"
MMLU_PREFIXES = ("mmlu_offline_", "mmlu_")


def mmlu_subject(task_name: str) -> str | None:
    """The MMLU subject an lm-eval task name stands for, or None for any other task."""
    from harness.lmeval.mmlu import subjects

    for prefix in MMLU_PREFIXES:
        if task_name.startswith(prefix) and task_name[len(prefix):] in subjects():
            return task_name[len(prefix):]
    return None


def _index(target):
    """The logged target as a gold index (or list of them), or None when it is text."""
    if isinstance(target, bool):
        return None
    if isinstance(target, (int, np.integer)):
        return int(target)
    if isinstance(target, str) and target.strip().isdigit():
        return int(target)
    if isinstance(target, (list, tuple)) and target and all(_index(t) is not None for t in target):
        return [_index(t) for t in target]
    return None


def needs_task_objects(samples: dict) -> list[str]:
    """Names of the tasks whose logged targets are not choice indices (see module doc)."""
    return [name for name, docs in samples.items() if docs and _index(docs[0]["target"]) is None]


def task_objects(names, task_manager) -> dict:
    """lm-eval Task objects by name (groups flattened), for the tasks needs_task_objects lists."""
    from lm_eval.tasks import get_task_dict

    out: dict = {}

    def walk(d):
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            else:
                out[key] = value

    if names:
        walk(get_task_dict(list(names), task_manager))
    return out


def _gold_from_task(task, doc):
    """The gold index as lm-eval's ConfigurableTask.process_results computes it."""
    choices = task.doc_to_choice(doc)
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -1
    return gold


def _rows(name: str, docs: list[dict], variant: str, task) -> list[dict]:
    subject = mmlu_subject(name)
    if subject is not None:
        from harness.lmeval.mmlu import subjects

        task_name, category = MMLU, subjects()[subject]
    else:
        task_name, subject, category = name, "", ""
    filters = list(dict.fromkeys(d.get("filter", "none") for d in docs))
    rows = []
    for smp in docs:
        if smp.get("filter", "none") != filters[0]:
            continue  # one filter's view of each document (multiple-choice tasks have one: "none")
        lls = [float(r[0]) for r in smp["filtered_resps"]]
        if "acc_mutual_info" in smp:  # lm-eval appended the unconditional log-likelihoods
            lls = lls[:len(lls) // 2]
        gold = _index(smp["target"]) if task is None else _gold_from_task(task, smp["doc"])
        if gold is None:
            raise ValueError(f"task {name}: its logged target {smp['target']!r} is not a choice index; "
                             "build the per-question rows with its lm-eval task (samples.task_objects)")
        golds = gold if isinstance(gold, list) else [gold]
        if not golds or not all(0 <= g < len(lls) for g in golds):
            raise ValueError(f"task {name}, doc {smp['doc_id']}: gold choice {gold!r} outside its {len(lls)} choices")
        pred = int(np.argmax(lls))  # first maximum, as lm-eval's np.argmax
        correct = int(pred in golds)
        if "acc" in smp and int(smp["acc"]) != correct:
            raise ValueError(f"task {name}, doc {smp['doc_id']}: the gold choice read from the sample ({gold}) "
                             f"disagrees with lm-eval's acc; is it a multiple-choice task?")
        rows.append({"variant": variant, "task": task_name, "subject": subject, "category": category,
                     "doc_id": int(smp["doc_id"]), "correct": correct,
                     "correct_norm": float(smp["acc_norm"]) if "acc_norm" in smp else float("nan"),
                     "logp_correct": float(logsumexp([lls[g] for g in golds]) - logsumexp(lls)), "pred": pred})
    return rows


def per_question(samples: dict, variant: str, tasks: dict | None = None) -> pd.DataFrame:
    """`results["samples"]` of one lm-eval run (log_samples=True) -> rows in COLUMNS.

    Only multiple-choice tasks are read (their samples carry one log-likelihood per choice);
    `tasks` maps task names to lm-eval Task objects for the tasks whose target is text."""
    tasks = tasks or {}
    rows = []
    for name, docs in samples.items():
        if not docs or not _is_multiple_choice(docs[0]):
            continue
        rows += _rows(name, docs, variant, tasks.get(name))
    df = pd.DataFrame(rows, columns=COLUMNS)
    return df.astype({"doc_id": int, "correct": int, "pred": int})


def _is_multiple_choice(sample: dict) -> bool:
    """One (log-likelihood, is_greedy) pair per request, more than one request, and an acc-like
    metric: what lm-eval's multiple_choice output type logs."""
    resps = sample.get("filtered_resps") or []
    pairs = all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps)
    return len(resps) > 1 and pairs
