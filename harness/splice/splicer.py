"""Put SAEs (or baselines) into the forward pass, many variants from one shared prefix.

A *variant* is a set of replacements, at most one per hook: {} is the clean model, {h: sae}
one SAE, {h1: sae1, h2: sae2} a joint splice. All variants of a batch share the layers below
the first splice point: `prefix` runs them once, `tail` replays the rest once per variant.
A splice of a block's output (`blocks.L.hook_resid_post`) is a splice of the residual entering
block L+1: it is applied to the shared residual there and its tail starts at L+1 (after the
last block: the final norm and head only), so block L is not replayed per variant. Variants
starting at the same layer run their tails as one forward over the batch repeated once per
variant, each slice with its own splices (`batched_tail`), as many as a token and logits
budget allow (`tails_per_forward`): one larger matmul per weight instead of k small ones.

How the tail is replayed depends on the model:
- TransformerBridge (any Hugging Face model): TransformerBridge cannot start at a layer (it
  delegates to the HF forward), so both halves run the model's own forward, rerouted
  (`harness.model.replay`): the prefix stops at the first tail block and keeps its input; a tail
  skips the blocks below its start, swaps in the variant's residual there, and lets the
  model's code do the rest: per-layer masks (Gemma's sliding/full layers), per-layer rotary
  tables, logit soft-capping or scaling. Models whose layers hand each other state outside
  the residual are refused (`replay.check_supported`).
- HookedTransformer: its own `stop_at_layer` / `start_at_layer`.

Splices are TransformerLens hook functions on the model's own hook points, so the one hook
vocabulary is TransformerLens'. Positions whose input token is special (BOS, EOS, pad) keep
their original activation, for SAEs and baselines alike. Head-split sites (`attn.hook_z`,
[batch, pos, heads, d_head]) are spliced flattened to [batch, pos, heads * d_head], the
layout SAEs trained there read (sae-lens' `hook_z` reshaping).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from harness.model.loading import LoadedModel, hook_device, hook_layer
from harness.errors import UserError
from harness.splice.replacements import Replacement
from harness.splice.variants import Variant

# Budget of one batched tail (several variants in one forward): token positions through the
# blocks, and bytes of logits (for the CE suite the logits dominate: vocab x tokens).
TAIL_TOKENS = 16384
TAIL_LOGITS_BYTES = 2**30

# Sites whose second axis is not the position: a per-position splice cannot apply there.
_NOT_PER_POSITION = ("hook_pattern", "hook_attn_scores")


@dataclass
class Prefix:
    """What the tail needs to continue a batch: the residual entering `layer`, and context."""
    layer: int
    resid: torch.Tensor
    tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def describe_valid_hooks(names: list[str]) -> str:
    """Compress `blocks.0.hook_x .. blocks.29.hook_x` into `blocks.{0..29}.hook_x`."""
    patterns: dict[str, list[int]] = {}
    for n in names:
        m = re.match(r"^blocks\.(\d+)\.(.+)$", n)
        if m:
            patterns.setdefault(m.group(2), []).append(int(m.group(1)))
    shown = [f"blocks.{{{min(v)}..{max(v)}}}.{k}" for k, v in sorted(patterns.items())
             if k.startswith("hook_")]
    return ", ".join(shown)


def entering_hook(lm: LoadedModel, layer: int):
    """The hook point whose activation IS the residual entering `layer` (block layer-1's
    `hook_resid_post`, under any of its names), or None for layer 0."""
    return lm.model.hook_dict.get(f"blocks.{layer - 1}.hook_resid_post") if layer > 0 else None


def branch_layer(lm: LoadedModel, hook: str) -> int:
    """The layer where a splice at `hook` branches off the clean pass.

    A splice of the residual leaving block L (`blocks.L.hook_resid_post`) is a splice of the
    residual entering block L+1: its tail starts there, the splice applied to the shared clean
    residual (`Splicer.tail`), so block L is not replayed per variant. After the last block that
    is the final norm's input: a HookedTransformer starts there, a bridge model when its final
    norm can be replayed (`replay.starts_at_head`), else the last block is replayed. Any other
    hook branches at its own block."""
    layer = hook_layer(hook)
    point = lm.model.hook_dict.get(hook)
    if point is not None and point is entering_hook(lm, layer + 1):
        if layer + 1 < lm.n_layers or lm.runner.starts_at_head():
            return layer + 1
    return min(layer, lm.n_layers - 1)


def branch_layers(lm: LoadedModel, hooks: list[str]) -> list[int]:
    """Layers where some variant branches off the clean pass (a bridge tail needs >= 1 block
    unless it starts at the final norm)."""
    return sorted({branch_layer(lm, h) for h in hooks}) or [lm.n_layers - 1]


def check_hooks(lm: LoadedModel, hooks: list[str]) -> None:
    """UserError if a hook is not one of the model's hook points (naming the valid ones), has no
    activation per position (attention patterns), or the model cannot be replayed exactly from
    its block (`replay.check_supported`)."""
    valid = set(lm.model.hook_dict)
    for hook in hooks:
        if hook not in valid:
            raise UserError(f"unknown hook {hook!r}; valid hooks: {describe_valid_hooks(sorted(valid))}")
        if hook.endswith(_NOT_PER_POSITION):
            raise UserError(f"{hook} is [batch, head, query, key]: splices need one activation per position")
    lm.runner.check_supported(branch_layers(lm, hooks))


class Splicer:
    """Runs one model with any number of variants, sharing the prefix below the first splice."""

    def __init__(self, lm: LoadedModel, hooks: list[str], keep_first: bool = True,
                 tail_tokens: int | None = None, tail_logits_bytes: int = TAIL_LOGITS_BYTES):
        self.lm = lm
        self.keep_first = keep_first
        self.tail_tokens = tail_tokens or TAIL_TOKENS  # budget of one batched tail (tails_per_forward)
        self.tail_logits_bytes = tail_logits_bytes
        check_hooks(lm, hooks)
        self.layers = branch_layers(lm, hooks)
        self.start_layer = self.layers[0]
        self.special_ids = torch.tensor(lm.special_ids(), dtype=torch.long)

    # -- masks -------------------------------------------------------------------------
    def ordinary(self, tokens: torch.Tensor) -> torch.Tensor:
        """True where the input token is not special (BOS, EOS, pad, ...)."""
        return ~torch.isin(tokens, self.special_ids.to(tokens.device))

    def splice_mask(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """True where the splice applies: attended, non-special input tokens, after position 0.

        Position 0 is left alone even when it holds an ordinary token: it is the attention
        sink (in SmolLM2 its residual norm is ~25k against ~170 elsewhere, whatever the token),
        which SAEs are trained without, exactly like BOS. lm-eval prompts for models whose
        tokenizer adds no BOS start with an ordinary token, so without this rule the splice
        would measure the sink, not the SAE. `keep_first=False` splices position 0 too (as
        sae-lens' run_evals does when the first token is not special)."""
        keep = self.ordinary(tokens)
        if self.keep_first:
            keep[:, 0] = False
        if attention_mask is not None:
            keep &= attention_mask.bool()
        return keep

    # -- prefix / tail -----------------------------------------------------------------
    def variant_layer(self, variant: Variant | None) -> int:
        """The layer a variant's tail starts at: the branch layer of its first hook."""
        if variant is None or not variant.parts:
            return self.layers[-1]
        return min(branch_layer(self.lm, h) for h in variant.sites)

    @torch.no_grad()
    def branch_points(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[int, Prefix]:
        """Clean residuals entering every branch layer, from one clean pass.

        A variant whose first hook is in block L only replays blocks L.. from here: with hooks
        at layers 15 and 22, the layer-22 variants skip blocks 15-21 too."""
        out = {self.layers[0]: self.prefix(tokens, attention_mask)}
        for prev, layer in zip(self.layers, self.layers[1:]):
            out[layer] = self.advance(out[prev], layer)
        return out

    @torch.no_grad()
    def advance(self, pre: Prefix, layer: int) -> Prefix:
        """Run the clean blocks [pre.layer, layer) and return the prefix at `layer`."""
        resid = self.lm.runner.run_to(pre.tokens, pre.attention_mask, layer, pre.layer, pre.resid)
        return Prefix(layer, resid, pre.tokens, pre.attention_mask)

    @torch.no_grad()
    def prefix(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Prefix:
        layer = self.start_layer
        resid = self.lm.runner.run_to(tokens, attention_mask, layer)
        return Prefix(layer, resid, tokens, attention_mask)

    @torch.no_grad()
    def tail(self, pre: Prefix, fwd_hooks: list[tuple[str, Callable]] = (),
             positions: torch.Tensor | None = None, hidden: bool = False) -> torch.Tensor:
        """Logits [batch, pos, vocab] of the rest of the model, with the given hooks active.

        A hook on the residual entering `pre.layer` (block pre.layer-1's `hook_resid_post`) is
        applied to a copy of `pre.resid` before the first block runs (`enter`).
        `positions` [batch, P] keeps only those positions' logits; on a bridge model the
        unembedding then runs on those positions alone (for multiple choice, one position in
        hundreds: the unembedding is a large share of a small model's FLOPs).
        A bridge tail is the model's own forward from `pre.layer` on (see `harness.model.replay`).
        `hidden`: return the head's input [batch, pos, d] instead (final norm applied; `head`
        turns any chunk of it into logits), so no [batch, pos, vocab] tensor is made here."""
        resid, rest = self.enter(pre, fwd_hooks)
        return self._run_tail(Prefix(pre.layer, resid, pre.tokens, pre.attention_mask), rest, positions, hidden)

    def enter(self, pre: Prefix, fwd_hooks) -> tuple[torch.Tensor, list[tuple[str, Callable]]]:
        """(the residual entering pre.layer with the hooks on it applied, the other hooks).

        The hooks get a copy, so the shared clean residual is never changed in place."""
        point = entering_hook(self.lm, pre.layer)
        resid, rest = pre.resid, []
        for name, fn in fwd_hooks:
            if point is not None and self.lm.model.hook_dict.get(name) is point:
                if resid is pre.resid:
                    resid = resid.clone()
                out = fn(resid, hook=point)
                resid = resid if out is None else out
            else:
                rest.append((name, fn))
        return resid, rest

    def _run_tail(self, pre: Prefix, fwd_hooks, positions, hidden: bool = False) -> torch.Tensor:
        with self.lm.model.hooks(fwd_hooks=list(fwd_hooks)):
            return self.lm.runner.run_from(pre.tokens, pre.attention_mask, pre.layer, pre.resid, positions, hidden)

    @property
    def splits_head(self) -> bool:
        """Whether tails can stop at the head (`hidden=True`) and `head` finish them in chunks."""
        return self.lm.runner.splits_head

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, P, vocab] of the model's head (its own logit processing included) on the head
        inputs `hidden` [N, P, d] of a `hidden=True` tail."""
        return self.lm.runner.run_head(hidden)

    @torch.no_grad()
    def batched_tail(self, pre: Prefix, hook_sets: list[list[tuple[str, Callable]]],
                     positions: torch.Tensor | None = None, hidden: bool = False) -> list[torch.Tensor]:
        """One tail per hook set, run as ONE forward over the batch repeated len(hook_sets) times
        (one larger matmul per weight instead of k small ones). Slice i of every activation
        goes through hook set i only; logits (or with `hidden` the head's inputs) come back
        split per set."""
        if len(hook_sets) == 1:
            return [self.tail(pre, hook_sets[0], positions, hidden)]
        k, rows = len(hook_sets), pre.resid.shape[0]
        starts, by_name = [], {}
        for i, hooks in enumerate(hook_sets):
            resid, rest = self.enter(pre, hooks)
            starts.append(resid)
            for name, fn in rest:
                by_name.setdefault(name, []).append((i, fn))

        def per_slice(fns):
            def hook(act, hook=None):
                parts = list(act.split(rows))
                changed = False
                for i, fn in fns:
                    out = fn(parts[i], hook=hook)
                    if out is not None:
                        parts[i], changed = out, True
                return torch.cat(parts) if changed else None  # read-only hooks leave the tensor as it is
            return hook

        def rep(x):
            return None if x is None else x.repeat(k, *([1] * (x.dim() - 1)))

        big = Prefix(pre.layer, torch.cat(starts), rep(pre.tokens), rep(pre.attention_mask))
        logits = self._run_tail(big, [(n, per_slice(f)) for n, f in by_name.items()], rep(positions), hidden)
        return list(logits.split(rows))

    @torch.no_grad()
    def logits(self, tokens, attention_mask=None, variant: Variant | None = None, on_act=None):
        """Convenience: prefix + tail for one variant."""
        pre = self.prefix(tokens, attention_mask)
        mask = self.splice_mask(tokens, attention_mask)
        return self.tail(pre, splice_hooks(variant, mask, on_act) if variant else [])

    def block_cost(self, variants: list[Variant]) -> dict:
        """Transformer blocks run per batch, shared pass vs one full forward per variant."""
        n = self.lm.n_layers
        shared = n + sum(n - self.variant_layer(v) for v in variants if v.parts)
        naive = n * (1 + sum(1 for v in variants if v.parts))
        return {"blocks_shared": shared, "blocks_naive": naive, "saving": naive / shared}

    def tails_per_forward(self, tokens: torch.Tensor, positions: torch.Tensor | None, hidden: bool = False) -> int:
        """How many variants' tails one forward runs: as many as fit the token budget
        (`tail_tokens` token positions through the blocks) and the logits budget
        (`tail_logits_bytes` of logits; with `hidden`, of head inputs), at least one."""
        n_tok = tokens.numel()
        width = self.lm.d_model if hidden else self.lm.model.cfg.d_vocab
        n_logits = (positions.numel() if positions is not None else n_tok) * width
        return max(1, min(self.tail_tokens // n_tok, self.tail_logits_bytes // (n_logits * self.lm.dtype.itemsize)))

    def run_variants(self, tokens, variants: list[Variant], attention_mask=None, positions=None, on_act=None,
                     exclude: torch.Tensor | None = None, hidden: bool = False, constant_tails: bool = False):
        """Yield (variant, logits) for every variant of one batch, clean (None) first, sharing the
        clean pass up to each variant's first hook. Variants branching at the same layer run
        their tails together, `tails_per_forward` at a time (`batched_tail`); the others come in
        the order of those groups. `on_act(variant, ...)` gets activations.
        `exclude` [batch, pos] marks further positions to leave unspliced (massive activations).
        `hidden`: yield the head's inputs instead of logits (see `tail`, `head`).
        `constant_tails`: a variant that sets the whole residual to one vector at every position
        (`constant_variant`) yields the tail of ONE position, [1, 1, width], standing for every
        position of the batch (`constant_tail`)."""
        points = self.branch_points(tokens, attention_mask)
        mask = self.splice_mask(tokens, attention_mask)
        if exclude is not None:
            mask &= ~exclude
        groups: dict[int, list] = {self.layers[-1]: [(None, [])]}  # the clean tail leads
        constant = []
        for v in variants:
            act = (lambda *a, _v=v: on_act(_v, *a)) if on_act else None
            if constant_tails and self.constant_variant(v, mask, attention_mask):
                constant.append((v, splice_hooks(v, mask, act)))
            else:
                groups.setdefault(self.variant_layer(v), []).append((v, splice_hooks(v, mask, act)))
        step = self.tails_per_forward(tokens, positions, hidden)
        for layer, members in groups.items():
            for i in range(0, len(members), step):
                chunk = members[i:i + step]
                outs = self.batched_tail(points[layer], [hooks for _, hooks in chunk], positions, hidden)
                for (v, _), logits in zip(chunk, outs):
                    yield v, logits
        for v, hooks in constant:
            yield v, self.constant_tail(points[self.variant_layer(v)], hooks, hidden)

    def constant_variant(self, v: Variant, mask: torch.Tensor, attention_mask) -> bool:
        """Whether v replaces the residual entering its tail by one vector at every position:
        a zero or mean ablation of a block's `hook_resid_post` spliced at every position (no
        kept first position, special token or padding). Every later block then sees the same
        input at every position: attention over identical values returns that value whatever
        its weights, and the rest is per position, so all positions' outputs are equal."""
        if len(v.parts) != 1 or attention_mask is not None or not bool(mask.all()):
            return False
        (hook, repl), = v.parts.items()
        if repl.kind not in ("zero", "mean") or self._constant_ok is False:
            return False
        point = self.lm.model.hook_dict.get(hook)
        return point is not None and point is entering_hook(self.lm, self.variant_layer(v))

    _constant_ok: bool | None = None  # checked on the first constant tail against a full one

    @torch.no_grad()
    def constant_tail(self, pre: Prefix, hooks, hidden: bool) -> torch.Tensor:
        """The tail of a `constant_variant` at one position, [1, 1, width]. The first time, it is
        checked against the full tail of the batch's first sequence (an architecture whose
        positions interact otherwise, e.g. attention sinks, would differ), and if they differ the
        full tail of the batch is returned and constant tails are off for this splicer."""
        resid, rest = self.enter(pre, hooks)  # the hooks see every position (statistics)
        tokens = None if pre.tokens is None else pre.tokens[:1, :1]
        one = self._run_tail(Prefix(pre.layer, resid[:1, :1], tokens, None), rest, None, hidden)
        if self._constant_ok is None:
            full = self._run_tail(Prefix(pre.layer, resid[:1], None if pre.tokens is None else pre.tokens[:1], None),
                                  rest, None, hidden)
            scale = float(full.abs().max()) or 1.0
            self._constant_ok = bool((full - one).abs().max() <= 1e-4 * scale)
            if not self._constant_ok:
                return self._run_tail(Prefix(pre.layer, resid, pre.tokens, None), rest, None, hidden)
        return one


def flat(x: torch.Tensor) -> torch.Tensor:
    """[batch, pos, d] unchanged; head-split [batch, pos, heads, d_head] -> [batch, pos, heads*d_head]."""
    return x.flatten(2) if x.dim() > 3 else x


def splice_hooks(variant: Variant, mask: torch.Tensor, on_act=None) -> list[tuple[str, Callable]]:
    """TransformerLens hook functions that replace each written hook's activation where mask is True.

    Replacements see the flattened activation (`flat`); `on_act(hook, x, x_hat, latents)` is
    called with it for statistics (explained variance, L0). A transcoder (or CLT) reads other
    hooks than it writes: a hook at each read site keeps the activation (unchanged) for the
    write sites later in the same forward pass, which replace their activation with the
    transcoder's output computed from it; `x` is then the activation being replaced (the
    MLP's output), so the statistics measure how much of it the transcoder explains."""
    hooks = []
    for key, repl in variant.parts.items():
        if repl.reads == repl.writes:  # an SAE or baseline, at the hook it is keyed by
            hooks.append((key, _replace_hook(repl, key, mask, on_act)))
            continue
        seen: dict[str, torch.Tensor] = {}  # this forward's inputs, by read hook
        for name in repl.reads:
            hooks.append((name, _keep_hook(repl, name, seen)))
        for name in repl.writes:
            hooks.append((name, _write_hook(repl, name, seen, mask, on_act)))
    return hooks


def _replace_hook(repl: Replacement, name: str, mask, on_act):
    def fn(act, hook=None):
        x = flat(act)
        if x.shape[-1] != (repl.d_in or x.shape[-1]):
            raise UserError(f"SAE {repl.spec!r} has width {repl.d_in} but {name} has {x.shape[-1]}")
        x_hat, latents = repl(x)
        if on_act is not None:
            on_act(name, x, x_hat, latents)
        return torch.where(mask[..., None], x_hat, x).reshape(act.shape)
    return fn


def _keep_hook(repl: Replacement, name: str, seen: dict):
    def fn(act, hook=None):
        seen[name] = flat(act)
        return None  # unchanged: the very same tensor (a bridge takes a new one for an edit)
    return fn


def _write_hook(repl: Replacement, name: str, seen: dict, mask, on_act):
    def fn(act, hook=None):
        y = flat(act)
        y_hat, latents = repl.output(name, seen)
        if on_act is not None:
            on_act(name, y, y_hat.to(y.dtype), latents)
        return torch.where(mask[..., None], y_hat.to(y.dtype), y).reshape(act.shape)
    return fn


@torch.no_grad()
def activation_widths(lm: LoadedModel, hooks: list[str]) -> dict[str, int]:
    """Width of each hook's (flattened) activation, from a two-token forward pass."""
    widths: dict[str, int] = {}

    def record(x, hook):
        widths[hook.name] = flat(x).shape[-1]
        return x

    tokens = torch.tensor([[lm.special_ids()[0] if lm.special_ids() else 0, 1]], device=lm.device)
    with lm.model.hooks(fwd_hooks=[(h, record) for h in hooks]):
        lm.model(tokens)
    # hook aliases (hook_resid_post -> hook_out) report the canonical name; map back.
    return {h: widths.get(h, widths.get(lm.model.hook_dict[h].name)) for h in hooks}


@torch.no_grad()
def run_below(lm: LoadedModel, tokens: torch.Tensor, layer: int, attention_mask=None) -> None:
    """A clean forward of the blocks below `layer` only (hooks there fire), never the head: for a
    hook in the last block that is the whole stack without the [batch, pos, vocab] logits."""
    lm.runner.run_to(tokens, attention_mask, min(layer, lm.n_layers))


@torch.no_grad()
def collect_activations(lm: LoadedModel, hooks: list[str], tokens: torch.Tensor,
                        batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Clean activations [n_positions, d] at each hook, where the splice would apply (calibration)."""
    splicer = Splicer(lm, hooks)
    out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    last = max(hook_layer(h) for h in hooks) + 1  # no need to run the blocks above
    for i in range(0, len(tokens), batch_size):
        batch = tokens[i:i + batch_size].to(lm.device)
        mask = splicer.splice_mask(batch, None)

        def grab(x, hook, _mask=mask):
            name = hook.name
            for h in hooks:
                if lm.model.hook_dict[h].name == name:
                    out[h].append(flat(x)[_mask].float().cpu())
            return x

        with lm.model.hooks(fwd_hooks=[(h, grab) for h in hooks]):
            run_below(lm, batch, last)
    return {h: torch.cat(v) for h, v in out.items()}


def calibrate(lm: LoadedModel, replacements: list[Replacement], calib_tokens: torch.Tensor | None,
              batch_size: int = 8) -> None:
    """Fit mean / PCA replacements on clean calibration activations (never the evaluated tokens),
    and move every replacement to the model's device. Already fitted ones are left alone."""
    to_fit = [r for r in replacements if r.needs_calibration and not r.fitted]
    if to_fit:
        if calib_tokens is None:
            raise UserError("mean/pca baselines need calibration tokens")
        key = hash(calib_tokens.numpy().tobytes())
        cache = lm.calibration_cache.setdefault(key, {})  # hook -> activations, reused across calls
        missing = sorted({r.hook for r in to_fit} - set(cache))
        if missing:
            cache.update(collect_activations(lm, missing, calib_tokens, batch_size))
        for r in to_fit:
            r.fit(cache[r.hook])
    for r in replacements:
        r.to(hook_device(lm, r.hook))
    _check_skip_orientation(lm, replacements, calib_tokens, batch_size)


def _check_skip_orientation(lm, replacements: list[Replacement], calib_tokens, batch_size: int) -> None:
    """Gemma Scope 2 transcoders: the output explained with the affine skip as the official code
    applies it (x @ A) and transposed, on the calibration batch (recorded in config.json); one
    warning line when the transpose explains more."""
    import sys

    from harness.splice.transcoders import skip_orientation

    todo = list({id(r.base): r.base for r in replacements if r.base.skip_orientation == {}}.values())
    if not todo or calib_tokens is None:
        return
    acts = collect_activations(lm, sorted({h for r in todo for h in (r.hook_in, r.hook)}), calib_tokens, batch_size)
    for r in todo:
        r.skip_orientation = skip_orientation(r, acts[r.hook_in].to(r.sae.W_skip.device),
                                              acts[r.hook].to(r.sae.W_skip.device))
        if r.skip_orientation["x @ A.T"] > r.skip_orientation["x @ A"]:
            print(f"warning: {r.spec}: its affine skip explains more of the output transposed "
                  f"({r.skip_orientation['x @ A.T']:.3f} vs {r.skip_orientation['x @ A']:.3f} as x @ A, the "
                  "official form used here)", file=sys.stderr)
