"""Generation with SAEs spliced in: the clean model and every variant continue one prompt.

Fast path (a TransformerBridge over a Hugging Face model, hooks with a module equivalent):
Hugging Face `generate` with a KV cache, one batch row per variant, and the splice as a
forward hook on the module whose output the TransformerLens hook names
(`models.to_hf_module_path`). With a KV cache a step sees only its new tokens, so the hook
masks by ABSOLUTE position (the `position_ids` the model receives), with the same rule as
the CE suite: position 0 and special input tokens keep their original activation.

The bridge replaces the modules inside its Hugging Face model with its own wrappers, and
those do not honour the KV cache on transformer-lens 3.9 (greedy SmolLM2 after "The
capital of France is": " Paris-----..." through the wrappers, " Paris." through the plain
modules). `plain_hf` therefore swaps the original modules back for the duration of a
call; the weights are the same tensors, nothing is copied.

Other models (HookedTransformer) and hooks without a module equivalent use a loop without a
cache that recomputes every step through `splice.Splicer` (slow, exact).

Sampling uses one Gumbel noise vector per step, shared by all rows and seeded by (seed,
step): argmax(logits / T + Gumbel) is an exact sample of softmax(logits / T) (restricted to
the top-p set when top_p < 1). A row's sample therefore does not depend on which other
variants share the batch, the same seed gives the same text on every run, and two variants
with the same distribution at a step pick the same token (common random numbers), so a
divergence reflects the splice, not the dice.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from harness.model.loading import LoadedModel, to_hf_module_path
from harness.splice.splicer import Splicer, splice_hooks
from harness.splice.variants import Variant, sites_of


@dataclass
class Sampling:
    """temperature 0 = greedy. Sampling: temperature > 0, nucleus top_p, seed."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class SharedGumbel:
    """Logits processor adding one seeded Gumbel noise vector per step, the same for every row."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1]  # absolute length: the same for every row of a batch
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(scores.shape[-1], generator=gen, dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1.0 - 1e-16)))
        return scores + gumbel.to(scores.device, scores.dtype)


def logits_processors(sampling: Sampling):
    """Processors that turn greedy decoding into seeded sampling (none for greedy)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    procs = LogitsProcessorList()
    if sampling.temperature > 0:
        procs.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(sampling.top_p))
        procs.append(SharedGumbel(sampling.seed))
    return procs


class StopTracker:
    """Stopping criterion: a row ends at EOS or once its new text contains a stop string.
    Records, per row, how many new tokens it kept (`ends`)."""

    def __init__(self, prompt_len: int, eos_id: int | None, tokenizer=None, until: list[str] = ()):
        self.prompt_len, self.eos_id, self.tokenizer, self.until = prompt_len, eos_id, tokenizer, list(until)
        self.ends: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        n_new = input_ids.shape[1] - self.prompt_len
        for row in range(input_ids.shape[0]):
            if row in self.ends:
                done[row] = True
                continue
            new = input_ids[row, self.prompt_len:].tolist()
            hit = self.eos_id is not None and new[-1] == self.eos_id
            if not hit and self.until:
                text = self.tokenizer.decode(new)
                hit = any(u in text for u in self.until)
            if hit:
                self.ends[row] = n_new
                done[row] = True
        return done


@contextmanager
def plain_hf(lm: LoadedModel):
    """The bridge's Hugging Face model with its original modules swapped back in (see module
    docstring); restored on exit. Same weights, no copy."""
    root = lm.model.original_model
    swapped = []

    def unwrap(module):
        for name, child in list(module._modules.items()):
            original = getattr(child, "_original_component", None) if child is not None else None
            if original is not None:
                swapped.append((module, name, child))
                module._modules[name] = child = original
            if child is not None:
                unwrap(child)
    try:
        unwrap(root)
        yield root
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


class RowSplices:
    """Forward hooks that splice variant i's replacements into batch row i of a HF model.

    A pre-hook on the whole model records, for the tokens of the current step, where the
    splice applies (non-special input token, absolute position > 0 unless keep_first is off);
    the module hooks then replace those positions of their rows."""

    def __init__(self, hf, variants: list[Variant], splicer: Splicer, paths: dict[str, str]):
        self.hf, self.variants, self.splicer, self.paths = hf, variants, splicer, paths
        self.mask: torch.Tensor | None = None
        self.handles = []

    def __enter__(self):
        self.handles.append(self.hf.register_forward_pre_hook(self._step, with_kwargs=True))
        for hook, path in self.paths.items():
            rows = [(i, v.parts[hook]) for i, v in enumerate(self.variants) if hook in v.parts]
            module = self.hf.get_submodule(path)
            self.handles.append(module.register_forward_hook(self._splice(rows, hook)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False

    def _step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("position_ids")
        if pos is None:  # called without positions: count from what the cache already holds
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None else 0
            pos = torch.arange(start, start + ids.shape[1], device=ids.device).expand_as(ids)
        keep = self.splicer.ordinary(ids)
        if self.splicer.keep_first:
            keep &= pos > 0
        self.mask = keep

    def _splice(self, rows, hook):
        def fn(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            y = x.clone()
            for row, repl in rows:
                if repl.d_in is not None and x.shape[-1] != repl.d_in:
                    from harness.errors import UserError
                    raise UserError(f"SAE {repl.spec!r} has width {repl.d_in} but {hook} has {x.shape[-1]}")
                x_hat, _ = repl(x[row:row + 1])
                y[row:row + 1] = torch.where(self.mask[row:row + 1, :, None], x_hat, x[row:row + 1])
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return fn


def _module_paths(hf, variants: list[Variant]) -> dict[str, str] | None:
    if any(r.reads != r.writes for v in variants for r in v.parts.values()):
        return None  # a transcoder reads one site and writes another: the hooked path handles it
    hooks = sorted({h for v in variants for h in v.hooks})
    paths = {h: to_hf_module_path(h, hf) for h in hooks}
    return None if any(p is None for p in paths.values()) else paths


@torch.no_grad()
def generate(lm: LoadedModel, variants: list[Variant], prompt_ids: list[int], max_new_tokens: int,
             sampling: Sampling | None = None, tokenizer=None, until: list[str] = (),
             keep_first: bool = True) -> list[list[int]]:
    """New token ids for every variant (in order), continuing the same prompt.

    A row stops at EOS (kept as its last token) or when its text contains a stop string."""
    sampling = sampling or Sampling()
    tokenizer = tokenizer or lm.tokenizer
    splicer = Splicer(lm, sites_of(variants), keep_first)
    eos = tokenizer.eos_token_id
    tracker = StopTracker(len(prompt_ids), eos, tokenizer, until)
    prompt = torch.tensor([prompt_ids] * len(variants), device=lm.device)
    if lm.runner.hf_model() is not None:
        with plain_hf(lm) as hf:
            paths = _module_paths(hf, variants)
            if paths is not None:
                from transformers import GenerationConfig, StoppingCriteriaList

                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
                config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                          pad_token_id=pad, use_cache=True)
                with RowSplices(hf, variants, splicer, paths):
                    out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                      generation_config=config, logits_processor=logits_processors(sampling),
                                      stopping_criteria=StoppingCriteriaList([tracker]))
                return _trim(out, len(prompt_ids), tracker)
    return generate_no_cache(lm, splicer, variants, prompt, max_new_tokens, sampling, tracker)


def generate_no_cache(lm, splicer, variants, prompt, max_new_tokens, sampling, tracker):
    """Reference-style loop: the full forward with the splice at every step (no KV cache)."""
    procs = logits_processors(sampling)
    tokens = prompt
    pad = tracker.eos_id if tracker.eos_id is not None else 0
    for _ in range(max_new_tokens):
        last = []
        for row, v in enumerate(variants):
            seq = tokens[row:row + 1]
            mask = splicer.splice_mask(seq, None)
            pre = splicer.prefix(seq)
            at = torch.tensor([[seq.shape[1] - 1]], device=seq.device)
            last.append(splicer.tail(pre, splice_hooks(v, mask) if v.parts else [], positions=at)[:, -1])
        scores = procs(tokens, torch.cat(last).float())
        nxt = scores.argmax(-1)
        finished = torch.tensor([r in tracker.ends for r in range(len(variants))], device=nxt.device)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if tracker(tokens).all():
            break
    return _trim(tokens, prompt.shape[1], tracker)


def _trim(out: torch.Tensor, prompt_len: int, tracker: StopTracker) -> list[list[int]]:
    rows = []
    for row in range(out.shape[0]):
        new = out[row, prompt_len:].tolist()
        rows.append(new[:tracker.ends.get(row, len(new))])
    return rows


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two continuations differ (one ending early counts);
    None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.no_grad()
def score_continuation(lm: LoadedModel, variants: list[Variant], prompt_ids: list[int], cont_ids: list[int],
                       keep_first: bool = True) -> dict[str, dict]:
    """How each variant sees the CLEAN continuation, by teacher forcing (one pass per variant
    from the shared prefix): mean log-probability per token of `cont_ids`, and mean
    KL(p_clean || p_variant) over its positions. {variant name: {"clean_logprob", "kl"}}."""
    if not cont_ids:
        return {v.name: {"clean_logprob": float("nan"), "kl": float("nan")} for v in variants}
    splicer = Splicer(lm, sites_of(variants), keep_first)
    seq = list(prompt_ids) + list(cont_ids[:-1])
    tokens = torch.tensor([seq], device=lm.device)
    first = len(prompt_ids) - 1
    pos = torch.arange(first, first + len(cont_ids), device=lm.device)[None]
    target = torch.tensor(cont_ids, device=lm.device)
    out, clean = {}, None
    for v, logits in splicer.run_variants(tokens, [v for v in variants if v.parts], positions=pos):
        logp = torch.log_softmax(logits[0].double(), dim=-1)
        if v is None:
            clean = logp
        lp = float(logp.gather(-1, target[:, None]).mean())
        kl = float((clean.exp() * (clean - logp)).sum(-1).mean())
        out[v.name if v is not None else None] = {"clean_logprob": lp, "kl": kl}
    return {v.name: out[v.name if v.parts else None] for v in variants}
