"""sae-harness from Python, with a model and an SAE already in memory (as in a notebook).

    .venv/bin/python examples/notebook_api.py

The SAE here is a sae-lens TopK SAE built in memory for the embedded default (random weights
whose decoder reconstructs roughly: a stand-in for one you trained); everything runs offline on
a CPU in about a minute. tests/test_api.py runs this file.
"""

import lm_eval
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

import harness.lmeval.backend  # noqa: F401  (registers the lm-eval model "sae-spliced")
from harness import api

# 1. An SAE in memory: any sae-lens SAE object; its hook comes from cfg.metadata.hook_name.
torch.manual_seed(0)
cfg = TopKSAEConfig(d_in=576, d_sae=1152, k=32, dtype="float32", device="cpu",
                    metadata=SAEMetadata(hook_name="blocks.15.hook_resid_post",
                                         model_name="HuggingFaceTB/SmolLM2-135M-Instruct"))
sae = TopKSAE(cfg)
with torch.no_grad():
    w = torch.randn(1152, 576)
    sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
    sae.W_enc.copy_(sae.W_dec.T)

# 2. Prepare the model and the SAE once; every call below reuses the session.
session = api.session("smollm2-135m", [sae, "pca:32"])

# 3. The CE suite with compute-equivalents, as a DataFrame (one row per variant, clean first).
ce = api.ce(session, tokens=512, n_boot=200)
print(ce[["variant", "dce", "kl", "loss_recovered_zero", "compute_fraction", "n_eff_frac_fixed_d"]].to_string())

# 4. An lm-eval task for every variant in one pass.
per_question, aggregate = api.tasks(session, task_names=["arc_easy_offline"], limit=2)
print(per_question.groupby("variant").correct.mean())

# 5. lm-eval's own simple_evaluate: the string form (one variant per call) ...
out = lm_eval.simple_evaluate(model="sae-spliced", model_args="model=smollm2-135m,sae=pca:32@blocks.15.hook_resid_post",
                              tasks=["arc_easy_offline"], limit=2)
print("string form:", out["results"]["arc_easy_offline"]["acc,none"])
# ... and instances built from the objects in memory, one per variant, sharing one engine: the
# first call scores every variant's requests in the same pass, the others answer from it.
views = api.lm_eval_models(session)
for name, model in views.items():
    res = lm_eval.simple_evaluate(model=model, tasks=["arc_easy_offline"], limit=2, task_manager=api.task_manager())
    print(name, res["results"]["arc_easy_offline"]["acc,none"])

# 6. Talk to the spliced model.
for row in api.talk(session, prompts=["The capital of France is"], max_new_tokens=8):
    for name, v in row["variants"].items():
        print(f"{name:>32}: {v['text']!r}")
