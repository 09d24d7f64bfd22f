"""The one setup path: model + replacements loaded, checked and calibrated, once.

Every command that runs a model (`run`, `ce`, `lm-eval`, `bench`, the lm-eval model
`sae-spliced`) starts with `prepare(...)`, so they all load the model the way the SAEs were
trained (their `model_from_pretrained_kwargs`), refuse the same bad input (SAE for another
model, unknown hook, wrong width) with the same message, and fit the mean / PCA baselines on
the same calibration batch. Without a `text` request that batch is the built-in train-prose
split; with one (`--dataset`, harness/text/sources.py) the evaluated tokens and the calibration
batch are cut from the same source, the calibration from documents after the evaluated ones.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from harness.text import builtin as data
from harness.model import distributed
from harness.text import sources
from harness.model.loading import LoadedModel, check_device, load_model
from harness.errors import UserError
from harness.splice.replacements import Replacement, same_model
from harness.splice.splicer import activation_widths, calibrate, check_hooks
from harness.splice.variants import CLEAN, Variant, build_variants, variants_of


@dataclass
class Session:
    lm: LoadedModel
    variants: list[Variant]  # clean first, then what the specs ask for
    replacements: list[Replacement]  # each distinct SAE / baseline once, checked and calibrated
    calib_tokens: torch.Tensor | None  # [calib_seqs, ctx] train-prose tokens; None without replacements
    calibration: str = ""  # how the calibration batch was made, for config.json
    tokens: torch.Tensor | None = None  # [eval_seqs, ctx] evaluated tokens when `text` asked for them
    data_info: dict | None = None  # provenance of tokens / calibration (sources.tokens_for_run)


def prepare(model: str | LoadedModel, saes: list[str] = (), *, joint: bool = False, device: str = "cpu",
            dtype: str = "float32", sae_dtype: str = "float32", device_map: str | None = None,
            calib_seqs: int = 16, ctx: int = 128, batch_size: int = 8,
            make_replacements: Callable[[LoadedModel], list[Replacement]] | None = None,
            text: sources.TextRequest | None = None, eval_seqs: int = 0, seed: int = 0,
            calib_tokens: torch.Tensor | None = None, allow_model_mismatch: bool = False,
            curves: bool = False) -> Session:
    """Load `model` and the `saes` specs, check they fit together, calibrate baselines.

    `make_replacements(lm)` adds replacements built in memory for the loaded model (the
    bench's random SAEs); each becomes a variant of its own and is checked like the rest.
    `text` names where tokens come from: `eval_seqs` evaluated rows of `ctx` tokens
    (Session.tokens) and the calibration batch, both from that source.

    Under torchrun (harness/model/distributed.py) this joins the process group first, and `cuda`
    means this process's GPU; every process then loads and calibrates the same way, on the
    same tokens, so the baselines are identical everywhere. `seed` seeds the noise baselines
    (`noise@S`, `noise-dir@S`). `calib_tokens` (rows of token ids) replaces the calibration
    batch where the caller has its own held-out text (the family run). `curves`: a whole set's
    layer curves as variants too (the CE suite's; tasks, `talk` and lm-eval run whole splices)."""
    device = distributed.setup(device, device_map)
    check_device(device)
    if text is not None:
        sources.check_local(text.dataset)  # a missing file fails before the model loads
    variants, repls = build_variants(list(saes), joint, device, sae_dtype, seed, curves) if saes else \
        ([Variant(CLEAN, {})], [])
    kwargs = next((r.model_kwargs for r in repls if r.model_kwargs), {})
    # a LoadedModel (the Python API's objects in memory) is used as it is
    lm = model if isinstance(model, LoadedModel) else load_model(model, device, dtype, kwargs, device_map=device_map)
    if make_replacements is not None:
        extra = make_replacements(lm)
        repls = repls + extra
        variants = variants + variants_of([[r] for r in extra])[1:]
    check_compatible(lm, repls, allow_model_mismatch)
    if text is not None and (eval_seqs or any(r.needs_calibration for r in repls)):
        src = sources.open_source(text.dataset, model, repls, text.config, text.split, text.column)
        tokens, calib, info = sources.tokens_for_run(src, lm.tokenizer, int(lm.model.cfg.d_vocab), eval_seqs,
                                                     ctx, calib_seqs)
        calibrate(lm, repls, calib, batch_size)
        return Session(lm, variants, repls, calib, info["calibration"], tokens if eval_seqs else None, info)
    calib, how = None, ""
    if calib_tokens is not None:
        calib, how = calib_tokens, f"{len(calib_tokens)} x {calib_tokens.shape[1]} tokens given by the caller"
    elif repls:
        try:
            calib = data.pack(lm.tokenizer, data.documents("train-prose"), calib_seqs, ctx)
        except ValueError as e:
            raise UserError(str(e)) from None
        how = f"{calib_seqs} x {ctx} tokens of the train-prose split"
    calibrate(lm, repls, calib, batch_size)
    return Session(lm, variants, repls, calib, how)


def check_compatible(lm: LoadedModel, repls: list[Replacement], allow_model_mismatch: bool = False) -> None:
    """Every SAE was trained on this model (by any name it goes by: `LoadedModel.names`), at an
    existing hook of the width it expects. With `allow_model_mismatch` a name that differs is one
    warning line; the hook and width checks still apply."""
    names = lm.names()
    for r in repls:
        if r.base.learned and not same_model(r.model_name, names):
            if not allow_model_mismatch:
                raise UserError(f"SAE {r.spec!r} was trained on {r.model_name!r}, not on {lm.spec!r}; if that is "
                                "this model under another name, pass --allow-model-mismatch")
            print(f"warning: SAE {r.spec!r} names {r.model_name!r}, not {lm.spec!r}; accepted "
                  "(--allow-model-mismatch), hooks and widths checked", file=sys.stderr)
    check_hooks(lm, sorted({h for r in repls for h in r.sites}))
    learned = [r.base for r in repls if r.base.learned]
    widths = activation_widths(lm, sorted({h for r in learned for h in r.sites}))
    for r in learned:
        for hook, width in r.widths().items():
            if widths.get(hook) != width:
                raise UserError(f"SAE {r.spec!r} has width {width} but {hook} has width {widths.get(hook)}")
