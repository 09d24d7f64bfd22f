"""The `--sae` spec grammar and the Variant type: what gets compared, and under which name.

One spec names one replacement (see harness/splice/replacements.py): an SAE folder, a demo SAE, a sae-lens
`release/sae_id`, or a baseline `identity | zero | mean | pca:K | neurons:K` with an optional
`@HOOK` (default: the first SAE's hook), or a wrapper around one of those: `noise@S`,
`noise-dir@S`, `S+error`. `A+B` splices A and B together and also evaluates each alone (`+error`
is not a joint: it belongs to the part before it); `--joint` adds one variant splicing every SAE
of the run at once (one per hook).

A *variant* is a set of replacements, at most one per hook: {} is the clean model, {h: sae}
one SAE, {h1: sae1, h2: sae2} a joint splice. Its name is the label every table shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UserError
from harness.splice.replacements import ERROR_SUFFIX, Replacement, load_replacement, resolve_hooks, wrap, wrapper_of


@dataclass
class Variant:
    name: str
    parts: dict[str, Replacement]  # hook -> replacement

    @property
    def hooks(self) -> list[str]:
        return sorted(self.parts)


CLEAN = "clean"


def short_hook(hook: str) -> str:
    """`blocks.15.hook_resid_post` -> `15.resid_post`, for variant labels."""
    return hook.replace("blocks.", "").replace("hook_", "")


def label(r: Replacement) -> str:
    """An SAE is named by itself; a baseline by kind and hook (`pca:32@15.resid_post`); a
    wrapper by what it wraps (`noise@l15-w2304-k32`, `l15-w2304-k32+error`)."""
    if r.kind == "error":
        return label(r.inner) + ERROR_SUFFIX
    if r.inner is not None:
        return f"{r.kind}@{label(r.inner)}"
    return r.name if r.kind == "sae" else f"{r.name}@{short_hook(r.hook)}"


def split_group(spec: str) -> list[str]:
    """`A+B` -> [A, B]; `A+error+B` -> [A+error, B] (`+error` belongs to the part before it)."""
    parts: list[str] = []
    for p in spec.split("+"):
        if p == ERROR_SUFFIX[1:] and parts:
            parts[-1] += ERROR_SUFFIX
        else:
            parts.append(p)
    if any(not p for p in parts):
        raise UserError(f"empty part in SAE spec {spec!r}")
    return parts


def build_variants(specs: list[str], joint: bool, device: str,
                   sae_dtype: str = "float32", seed: int = 0) -> tuple[list[Variant], list[Replacement]]:
    """Parse specs into [clean, each part alone, each `A+B` group, the --joint group], and the
    distinct replacements they use (each loaded once even if several specs name it; a wrapper's
    inner replacement is the same object as that spec alone). `seed` seeds the noise wrappers."""
    groups = [split_group(s) for s in specs]
    by_spec: dict[str, Replacement] = {}

    def load(part: str) -> Replacement:
        if part not in by_spec:
            wrapped = wrapper_of(part)
            if wrapped is None:
                by_spec[part] = load_replacement(part, device, sae_dtype)
            else:
                by_spec[part] = wrap(wrapped[0], load(wrapped[1]), seed)
        return by_spec[part]

    for part in [p for g in groups for p in g]:
        load(part)
    repls = list(by_spec.values())
    resolve_hooks(repls)
    if joint:
        groups.append([s for s in by_spec if by_spec[s].kind == "sae"])
    return variants_of([[by_spec[p] for p in g] for g in groups]), repls


def variants_of(groups: list[list[Replacement]]) -> list[Variant]:
    """The clean variant, then for each group its parts alone and (if several) joined."""
    variants, seen = [Variant(CLEAN, {})], {CLEAN}

    def add(parts: list[Replacement]):
        hooks = [r.hook for r in parts]
        if len(set(hooks)) != len(hooks):
            raise UserError(f"a joint splice needs one SAE per hook; {' + '.join(r.spec for r in parts)} share one")
        name = "+".join(label(r) for r in parts)
        if name not in seen:
            seen.add(name)
            variants.append(Variant(name, {r.hook: r for r in parts}))

    for group in groups:
        for part in group:  # each alone first, then the joint one
            add([part])
        if len(group) > 1:
            add(group)
    return variants


def baseline_name(kind: str, hooks: list[str]) -> str:
    return "+".join(f"{kind}@{short_hook(h)}" for h in hooks)


def baseline_variants(variants: list[Variant]) -> list[Variant]:
    """The zero and mean variants that loss recovered needs, at exactly each variant's hooks."""
    extra: dict[str, Variant] = {}
    for v in variants:
        for kind in ("zero", "mean"):
            name = baseline_name(kind, v.hooks)
            if v.parts and name not in extra:
                parts = {h: Replacement(name=kind, spec=f"{kind}@{h}", kind=kind, hook=h) for h in v.hooks}
                extra[name] = Variant(name, parts)
    return list(extra.values())
