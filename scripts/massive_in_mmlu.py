"""Massive activations in the MMLU prompts of the main job (`sae-harness run`).

Collects the exact token sequences the main job's MMLU stage feeds the model (lm-eval's own
offline MMLU task through the project's backend, same limit), without scoring them, then
detects massive activations at the demo SAEs' hooks with harness.evals.outliers (clean norm above
FACTOR x the median over all spliced prompt positions).

    python scripts/massive_in_mmlu.py [LIMIT_PER_SUBJECT] [FACTOR]
"""

from __future__ import annotations

import json
import sys

from harness.evals import outliers
from harness.lmeval.backend import SpliceEngine, SplicedLM
from harness.model.loading import load_model
from harness.splice.splicer import Variant

HOOKS = ["blocks.15.hook_resid_post", "blocks.22.hook_resid_post"]


class PromptRecorder(SpliceEngine):
    """Records each forward input the backend would run; answers every request with a dummy."""

    def __init__(self, lm):
        super().__init__(lm, [Variant("clean", {})])
        self.inputs: dict[tuple, None] = {}

    def score(self, requests) -> None:
        for _, ctx, cont in requests:
            self.inputs[tuple((ctx + cont)[-(self.max_length + 1):][:-1])] = None
            self.cache[(tuple(ctx), tuple(cont))] = [(0.0, False)]


def main(limit: int = 5, factor: float = outliers.DEFAULT_FACTOR) -> dict:
    import lm_eval

    from harness.lmeval import mmlu

    lm = load_model("smollm2-135m")
    recorder = PromptRecorder(lm)
    lm_eval.simple_evaluate(model=SplicedLM(engine=recorder, variant="clean"), tasks=["mmlu_offline"],
                            task_manager=mmlu.task_manager(), limit=limit)
    sequences = [list(s) for s in recorder.inputs]
    found = outliers.massive_in_sequences(lm, HOOKS, sequences, factor)
    tok = recorder.tokenizer
    report = {"limit_per_subject": limit, "factor": factor, "sequences": len(sequences),
              "tokens": sum(map(len, sequences)), "hooks": {}}
    for hook, f in found.items():
        examples = [{"sequence": s, "position": p, "token": tok.decode([sequences[s][p]]),
                     "previous": tok.decode(sequences[s][max(p - 3, 0):p])} for s, p in f["positions"][:10]]
        report["hooks"][hook] = {k: f[k] for k in ("count", "n_positions", "median_norm", "max_norm")} | {"examples": examples}
    return report


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(int(args[0]) if args else 5, float(args[1]) if len(args) > 1 else outliers.DEFAULT_FACTOR),
                     indent=2))
