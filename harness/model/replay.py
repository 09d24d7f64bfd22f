"""Run part of a Hugging Face model (inside a TransformerBridge) through its own forward.

Prefix sharing needs two partial passes: the layers below L once (clean), and the layers from L
on once per variant, starting from a residual that the caller may have changed. Re-creating
what the model's forward hands each layer is where exactness is lost: Gemma-2/3 give every
layer the mask of its own attention type (sliding or full) and Gemma-3 its own rotary
embedding; Gemma-2/3 soft-cap the logits, Cohere and Granite scale them. So neither pass
re-implements any of it. Both call the model's own forward, rerouted:

- `run_to(stop)`: a pre-hook on block `stop` takes its input and aborts the pass, so the
  blocks from `stop` on and the head never run;
- `run_from(start, resid)`: blocks below `start` are bypassed (their forward returns its
  input), a pre-hook on block `start` swaps in `resid`, and the forward then goes on as
  usual: each later layer gets the keyword arguments the model's forward builds for *it*,
  and the head applies whatever logit processing the model's code applies.

A bypassed pass still embeds the tokens and builds the masks and rotary tables: a gather and a
few small tensors, not a layer's worth of work.

Layer `n_layers` (one past the last block) is the final norm's input, the residual leaving the
last block: a tail starting there runs the final norm and the head only (`starts_at_head`).

The head can also run apart (`run_from(..., hidden=True)` stops at the head's input, the final
norm applied; `run_head` runs the model's forward on a one-token dummy input with every block
and the final norm bypassed and the head's input swapped for any [N, P, d] tensor). So the
logits of a batch can be made a chunk of positions at a time, with the model's own logit
processing (soft-capping, scaling) applied to each chunk: memory for logits is then set by
the chunk, not by batch x context x vocabulary.

What this cannot replay is state handed from one layer to a later one outside the residual
(layers sharing keys and values, a block run several times per forward). `check_supported`
refuses such models by name, and otherwise compares the replay with the model's own forward
once per model and layer, so a model of that kind that is not on the list is refused too,
instead of giving wrong numbers.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from harness.errors import UserError


class _Stop(Exception):
    pass


# model_type -> why TransformerBridge's forward itself is not the Hugging Face one (checked
# against transformers' own forward on a tiny random model, tests/test_architectures.py).
BRIDGE_MISMATCH = {
    "cohere": "TransformerBridge 3.9 rotates Cohere's queries and keys with Llama's rotate-half "
              "RoPE instead of Cohere's interleaved one, so its activations differ from Hugging Face's",
}

_checked: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def take_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x[b, positions[b, j]] -> [batch, P, d]."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _bypass(*args, **kwargs):
    return _hidden(args, kwargs)


def _entry(bridge, layer: int) -> torch.nn.Module:
    """The module whose input is the residual entering `layer`: block `layer`, or after the last
    block the final norm."""
    blocks = bridge.blocks
    return blocks[layer] if layer < len(blocks) else bridge.ln_final


def has_head_module(bridge) -> bool:
    """Whether the head is a module whose input can be captured and swapped (`hidden`, `run_head`)."""
    return isinstance(getattr(bridge, "unembed", None), torch.nn.Module) and \
        isinstance(getattr(bridge, "ln_final", None), torch.nn.Module)


@torch.no_grad()
def _run(bridge, tokens, attention_mask, start: int = 0, resid=None, stop: int | None = None,
         positions=None, hidden: bool = False):
    blocks = bridge.blocks
    handles, seen, calls = [], {}, {"start": 0, "head": False}

    def grab_head(module, args):
        seen["resid"] = args[0]
        raise _Stop

    def inject(module, args, kwargs):
        calls["start"] += 1
        return _with_hidden(args, kwargs, resid)

    def grab(module, args, kwargs):
        seen["resid"] = _hidden(args, kwargs)
        raise _Stop

    def gather(module, args):
        calls["head"] = True
        return (take_positions(args[0], positions),) + tuple(args[1:])

    skipped = list(blocks[:start]) if resid is not None else []
    try:
        for block in skipped:
            # object.__setattr__: a bridge component forwards attribute writes to the HF module.
            object.__setattr__(block, "forward", _bypass)
        if resid is not None:
            handles.append(_entry(bridge, start).register_forward_pre_hook(inject, with_kwargs=True))
        if stop is not None:
            handles.append(_entry(bridge, stop).register_forward_pre_hook(grab, with_kwargs=True))
        elif hidden:
            handles.append(bridge.unembed.register_forward_pre_hook(grab_head))
        elif positions is not None and isinstance(getattr(bridge, "unembed", None), torch.nn.Module):
            # The head acts per position: keep only the positions asked for before it (the
            # final norm runs on all of them, since e.g. GPT-2 reshapes its output).
            handles.append(bridge.unembed.register_forward_pre_hook(gather))
        out = bridge.original_model(input_ids=tokens, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        return seen["resid"]
    finally:
        for h in handles:
            h.remove()
        for block in skipped:
            block.__dict__.pop("forward", None)
    if hidden:
        raise UserError(f"{_model_type(bridge)}: its forward never reached its head module")
    if resid is not None and calls["start"] != 1:
        raise UserError(f"{_model_type(bridge)} runs block {start} {calls['start']} times per forward "
                        "(looped layers): the shared-prefix replay cannot start there")
    logits = out.logits
    if positions is not None and not calls["head"]:
        logits = take_positions(logits, positions)
    return logits


def run_to(bridge, tokens, attention_mask, stop: int, start: int = 0, resid=None) -> torch.Tensor:
    """The residual entering block `stop` (`n_layers`: leaving the last block), from the tokens
    (or from `resid` entering `start`)."""
    return _run(bridge, tokens, attention_mask, start, resid, stop=stop)


def run_from(bridge, tokens, attention_mask, start: int, resid, positions=None, hidden: bool = False) -> torch.Tensor:
    """Logits of the model's own forward with `resid` entering block `start` (blocks below skipped;
    `start` = n_layers: `resid` is the last block's output, only the final norm and head run).
    `hidden`: stop at the head and return its input [batch, pos, d] (the final norm applied)."""
    return _run(bridge, tokens, attention_mask, start, resid, positions=positions, hidden=hidden)


@torch.no_grad()
def run_head(bridge, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [N, P, vocab] of the model's own head (its logit processing included) applied to
    `hidden` [N, P, d], the final norm's output (see `run_from(..., hidden=True)`)."""
    def swap(module, args):
        return (hidden,) + tuple(args[1:])

    modules = list(bridge.blocks) + [bridge.ln_final]
    dummy = torch.zeros((1, 1), dtype=torch.long, device=hidden.device)
    handle = bridge.unembed.register_forward_pre_hook(swap)
    try:
        for m in modules:
            object.__setattr__(m, "forward", _bypass)
        return bridge.original_model(input_ids=dummy, use_cache=False).logits
    finally:
        handle.remove()
        for m in modules:
            m.__dict__.pop("forward", None)


def _model_type(bridge) -> str:
    cfg = getattr(bridge.original_model, "config", None)
    return getattr(cfg, "model_type", None) or type(bridge.original_model).__name__


def _configs(bridge):
    cfg = getattr(bridge.original_model, "config", None)
    return [c for c in (cfg, getattr(cfg, "text_config", None)) if c is not None]


@torch.no_grad()
def check_supported(bridge, layers: list[int], n_probe: int = 24) -> None:
    """Refuse (UserError) a model whose shared-prefix replay would not equal its own forward.

    Known features are named; anything else is caught by comparing, once per model and layer,
    the replay from `layer` with the model's own forward on a short probe sequence."""
    kind = _model_type(bridge)
    if kind in BRIDGE_MISMATCH:
        raise UserError(f"{kind} is not supported: {BRIDGE_MISMATCH[kind]}")
    for cfg in _configs(bridge):
        shared = getattr(cfg, "num_kv_shared_layers", 0) or 0
        if shared:
            raise UserError(f"{kind} is not supported: its last {shared} layers reuse the keys and values of "
                            "earlier layers (num_kv_shared_layers), which a replay from a cached residual lacks")
    done = _checked.setdefault(bridge, set())
    todo = [layer for layer in layers if layer not in done]
    if not todo:
        return
    device = next(bridge.parameters()).device
    vocab = int(getattr(bridge.cfg, "d_vocab", 0) or 256)
    tokens = (torch.arange(n_probe, device=device) * 7 + 3)[None] % vocab
    full = bridge.original_model(input_ids=tokens, use_cache=False).logits.float()
    tol = (1e-4 if full.dtype == torch.float32 and next(bridge.parameters()).dtype == torch.float32 else 2e-2)
    for layer in todo:
        resid = run_to(bridge, tokens, None, layer)
        got = run_from(bridge, tokens, None, layer, resid).float()
        err = float((got - full).abs().max())
        if not err <= tol * (1 + float(full.abs().max())):
            raise UserError(f"{kind} is not supported: replaying it from block {layer} differs from its own "
                            f"forward by {err:.3g} (it passes state between layers outside the residual stream)")
        done.add(layer)


_head_ok: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()


def starts_at_head(bridge) -> bool:
    """Whether a tail can start after the last block (final norm and head only). It can when the
    model has a final norm (`ln_final`) that its forward calls once on the last block's output,
    checked like any branch layer; otherwise a splice of the last block's output replays that block."""
    if bridge not in _head_ok:
        ok = isinstance(getattr(bridge, "ln_final", None), torch.nn.Module)
        if ok:
            try:
                check_supported(bridge, [len(bridge.blocks)])
            except UserError:
                ok = False
        _head_ok[bridge] = ok
    return _head_ok[bridge]
