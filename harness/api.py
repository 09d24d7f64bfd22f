"""The Python API, for notebooks: a model and SAEs already in memory, results as DataFrames.

    from harness import api
    records = api.ce(model, [sae_a, ("blocks.6.hook_resid_post", my_module), "pca:32"])
    per_question, aggregate = api.tasks(model, [sae_a], ["arc_easy_offline"], limit=20)
    api.talk(model, [sae_a], ["The capital of France is"])
    views = api.lm_eval_models(model, [sae_a])      # one lm-eval model per variant, one engine
    lm_eval.simple_evaluate(model=views["clean"], tasks=["arc_easy_offline"], task_manager=api.task_manager())

`model`: a spec string (as on the command line), a Hugging Face model (with its `tokenizer`), a
TransformerLens `TransformerBridge` or `HookedTransformer`, or a `LoadedModel`. `saes`: spec
strings, sae-lens SAE or transcoder objects (hook from `cfg.metadata.hook_name`), or
`(hook, module)` pairs whose module maps an activation to its reconstruction (or to a pair
(reconstruction, latents)). The same checks as the CLI apply (hooks exist, widths agree).
Each call prepares the model and SAEs once; pass the returned `Session` (`api.session`) to
several calls to skip that.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import torch

from harness.errors import UserError
from harness.model.loading import LoadedModel, load_model, wrap_hooked
from harness.splice.replacements import Replacement, from_sae, module_replacement
from harness.splice.session import Session, prepare


_HOOKLESS_BASELINE = re.compile(r"^(identity|zero|mean|pca:\d+|neurons:\d+)$")


def as_loaded(model: Any, tokenizer: Any = None, device: str | None = None) -> LoadedModel:
    """Any accepted model as a LoadedModel (no copy of its weights)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, str):
        return load_model(model, device or "cpu")
    kind = type(model).__name__
    if kind == "HookedTransformer":
        return wrap_hooked(getattr(model.cfg, "model_name", "hooked"), model)
    if kind == "TransformerBridge":
        name = getattr(model.cfg, "model_name", None) or "bridge"
        return LoadedModel(name, "bridge", model.eval(), model.tokenizer, model.cfg.n_layers, model.cfg.d_model,
                           {"spec": name, "loader": "in memory (TransformerBridge)"})
    if hasattr(model, "config") and hasattr(model, "forward"):  # a Hugging Face PreTrainedModel
        if tokenizer is None:
            raise UserError("a Hugging Face model needs its tokenizer: api.ce(model, saes, tokenizer=tok)")
        from transformer_lens.model_bridge import TransformerBridge

        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        dtype = next(model.parameters()).dtype
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer, dtype=dtype)
        return LoadedModel(name, "bridge", bridge.eval(), bridge.tokenizer, bridge.cfg.n_layers, bridge.cfg.d_model,
                           {"spec": name, "source": name, "loader": "in memory (Hugging Face model)"})
    raise UserError(f"cannot use a {kind} as the model: give a spec string, a Hugging Face model, a "
                    "TransformerBridge or a HookedTransformer")


def _split(saes) -> tuple[list[str], list]:
    specs, objects = [], []
    for s in saes:
        (specs if isinstance(s, str) else objects).append(s)
    return specs, objects


def _in_memory(objects: list) -> list[Replacement]:
    out = []
    for i, obj in enumerate(objects):
        if isinstance(obj, Replacement):
            out.append(obj)
        elif isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str):
            hook, module = obj
            out.append(module_replacement(getattr(module, "name", None) or f"{type(module).__name__}{i}", hook, module))
        elif hasattr(obj, "cfg") and hasattr(obj, "encode") and hasattr(obj, "decode"):
            name = getattr(obj, "name", None) or f"{type(obj).__name__}{i}"  # the variant adds @hook
            out.append(from_sae(name, name, obj, {}))
        else:
            raise UserError(f"cannot splice a {type(obj).__name__}: give a spec string, a sae-lens SAE, or a "
                            "(hook, module) pair")
    return out


def session(model: Any, saes=(), *, tokenizer: Any = None, joint: bool = False, ctx: int = 128,
            batch_size: int = 8, calib_seqs: int = 16, seed: int = 0, device: str | None = None,
            allow_model_mismatch: bool = False) -> Session:
    """The model and SAEs prepared once (loaded, checked, baselines calibrated on the built-in
    training text); every other function here takes one in place of `model`."""
    if isinstance(model, Session):
        return model
    lm = as_loaded(model, tokenizer, device)
    specs, objects = _split(saes)
    made = _in_memory(objects)
    if made:  # a baseline spec without a hook takes the first in-memory SAE's, as it would a spec SAE's
        specs = [f"{s}@{made[0].hook}" if _HOOKLESS_BASELINE.match(s) else s for s in specs]
    return prepare(lm, specs, joint=joint, ctx=ctx, batch_size=batch_size, calib_seqs=calib_seqs, seed=seed,
                   make_replacements=(lambda _lm: made) if made else None, allow_model_mismatch=allow_model_mismatch)


def _tokens(sess: Session, text, n_tokens: int, ctx: int) -> torch.Tensor:
    from harness.text import builtin

    docs = builtin.documents("eval") if text is None else [text] if isinstance(text, str) else list(text)
    try:
        return builtin.pack(sess.lm.tokenizer, docs, max(n_tokens // ctx, 1), ctx)
    except ValueError as e:
        raise UserError(str(e)) from None


def ce(model: Any, saes=(), *, text=None, tokens: int = 4096, ctx: int = 128, batch_size: int = 8,
       law: str = "hoffmann", train_tokens: float | None = None, params: float | None = None, n_boot: int = 1000,
       seed: int = 0, tokenizer: Any = None) -> pd.DataFrame:
    """The CE suite (one row per variant, clean first) with the compute-equivalents: the
    frontier reading and the fixed-tokens readings at the model's N and D (`params`,
    `train_tokens`, else counted / looked up, as on the command line). `text`: None (the
    built-in held-out prose), a string, or a list of documents."""
    from harness.evals import ce as ce_suite
    from harness.jobs.pipeline import RunConfig, compute_equivalents, load_law, model_size

    sess = session(model, saes, tokenizer=tokenizer, ctx=ctx, batch_size=batch_size, seed=seed)
    law_obj = load_law(law)
    rows = _tokens(sess, text, tokens, ctx)
    res = ce_suite.evaluate(sess.lm, sess.variants, rows, batch_size, sess.calib_tokens, n_boot, seed)
    size = model_size(sess.lm, RunConfig(model=sess.lm.spec, train_tokens=train_tokens, params=params))
    compute_equivalents(res.records, law_obj, law, size)
    return pd.DataFrame(res.records)


def tasks(model: Any, saes=(), task_names=("arc_easy_offline",), *, limit=None, batch_size: int = 8,
          num_fewshot: int | None = None, seed: int = 0, tokenizer: Any = None) -> tuple[pd.DataFrame, dict]:
    """lm-eval tasks for every variant in one pass: (one row per variant and question, lm-eval's
    results per variant)."""
    from harness.jobs.pipeline import RunConfig, checked_task_manager, run_tasks

    sess = session(model, saes, tokenizer=tokenizer, batch_size=batch_size, seed=seed)
    names = [task_names] if isinstance(task_names, str) else list(task_names)
    cfg = RunConfig(model=sess.lm.spec, batch_size=batch_size, num_fewshot=num_fewshot, seed=seed)
    run = run_tasks(sess, names, checked_task_manager(names), cfg, limit)
    return run.per_question, run.aggregate


def talk(model: Any, saes=(), prompts=("The capital of France is",), *, max_new_tokens: int = 20,
         tokenizer: Any = None) -> list[dict]:
    """Greedy continuations of every variant, per prompt: {"prompt", "variants": [...]}."""
    from harness.jobs.talk import talk_one

    sess = session(model, saes, tokenizer=tokenizer)
    tok = sess.lm.tokenizer
    out = []
    for prompt in [prompts] if isinstance(prompts, str) else prompts:
        ids = tok(prompt, add_special_tokens=False).input_ids
        out.append({"prompt": prompt, "variants": talk_one(sess.lm, sess.variants, ids, tok, max_new_tokens)})
    return out


def lm_eval_models(model: Any, saes=(), *, batch_size: int = 8, tokenizer: Any = None) -> dict:
    """{variant name: lm-eval model} sharing one engine: lm_eval.simple_evaluate on any of them
    scores the requests for every variant in the same pass, and the others answer from it."""
    from harness.lmeval.backend import variant_views

    sess = session(model, saes, tokenizer=tokenizer, batch_size=batch_size)
    views = variant_views(sess.lm, sess.variants, batch_size=batch_size)
    return {v.variant.name: v for v in views}


def task_manager(include_path=None):
    """lm-eval's TaskManager with the offline tasks (tasks/) as well as lm-eval's own."""
    from harness.lmeval.mmlu import task_manager as make

    return make(include_path)
