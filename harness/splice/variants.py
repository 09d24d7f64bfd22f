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
from harness.model.loading import to_dtype
from harness.splice.replacements import ERROR_SUFFIX, Replacement, load_replacement, resolve_hooks, wrap, wrapper_of


@dataclass
class Variant:
    name: str
    parts: dict[str, Replacement]  # hook -> replacement
    # A point of a set's layer curve (`layer_curves`): {"set", "order": "alone" | "from_top",
    # "layers": how many members, "first": the lowest layer}; None for everything else.
    curve: dict | None = None

    @property
    def hooks(self) -> list[str]:
        """The hooks whose activations it replaces: an SAE's key in `parts`, a transcoder's
        (or CLT's) outputs."""
        return sorted({h for key, r in self.parts.items() for h in writes_of(key, r)})

    @property
    def sites(self) -> list[str]:
        """Every hook it reads or replaces (a transcoder also reads the MLP's input)."""
        out = set(self.hooks)
        for r in self.parts.values():
            if r.reads != r.writes:
                out |= set(r.reads)
        return sorted(out)


def writes_of(key: str, r: Replacement) -> list[str]:
    """What a part replaces: the hook it is keyed by, for an SAE or baseline (a test or caller
    may key one under another hook of the same width); a transcoder's own outputs."""
    return [key] if r.reads == r.writes else list(r.writes)


def sites_of(variants: list["Variant"]) -> list[str]:
    return sorted({h for v in variants for h in v.sites})


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
    return r.name if r.learned else f"{r.name}@{short_hook(r.hook)}"


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


def build_variants(specs: list[str], joint: bool, device: str, sae_dtype: str = "float32", seed: int = 0,
                   curves: bool = True) -> tuple[list[Variant], list[Replacement]]:
    """Parse specs into [clean, each part alone, each `A+B` group, the --joint group], and the
    distinct replacements they use (each loaded once even if several specs name it; a wrapper's
    inner replacement is the same object as that spec alone). `seed` seeds the noise wrappers.

    A spec naming a whole set (harness/splice/transcoders.py: a folder of per-layer SAEs or
    transcoders, a glob, a circuit-tracer config) is one variant splicing every member at once,
    named after the set; with `curves`, its layer curves follow (`layer_curves`)."""
    from harness.splice import sets as set_specs

    groups = [split_group(s) for s in specs]
    by_spec: dict[str, Replacement] = {}
    sets: dict[str, set_specs.ReplacementSet] = {}

    def load(part: str) -> Replacement:
        if part not in by_spec:
            wrapped = wrapper_of(part)
            if wrapped is None:
                by_spec[part] = load_replacement(part, device, sae_dtype)
            else:
                by_spec[part] = wrap(wrapped[0], load(wrapped[1]), seed)
        return by_spec[part]

    for part in [p for g in groups for p in g]:
        if part in sets or part in by_spec:
            continue
        if set_specs.is_set_spec(part):
            sets[part] = set_specs.load_set(part, lambda s: load_replacement(s, device, sae_dtype))
            for m in sets[part].members:
                m.sae_dtype = to_dtype(sae_dtype)
        else:
            load(part)
    repls = list(by_spec.values()) + [m for st in sets.values() for m in st.members]
    resolve_hooks(repls)
    if joint:
        groups.append([s for s in by_spec if by_spec[s].learned])
    variants = variants_of([[by_spec[p] for p in g if p not in sets] for g in groups if any(p not in sets for p in g)])
    for group in groups:
        for p in group:
            if p in sets:
                variants += set_variants(sets[p], curves, {v.name for v in variants})
    return variants, repls


def set_variants(st, curves: bool, taken: set[str]) -> list[Variant]:
    """The whole set as one variant, then (with `curves`) its layer curves."""
    full = Variant(st.name, {r.hook: r for r in st.members})
    if full.name in taken:
        return []
    return [full] + (layer_curves(st) if curves and len(st.members) > 1 else [])


def layer_curves(st) -> list[Variant]:
    """Each member alone, and the members from the top down: {L-1}, {L-2, L-1}, ... (the last
    point, every member, is the set's own variant).

    Why from the top: a variant's tail starts at its lowest member, and the clean prefix below
    it is shared with every other variant of the batch (harness/splice/splicer.py), so adding
    layers from the top costs one tail of n - k blocks per point, where adding them from the
    bottom would run the whole model for every point. The damage of the lower layers alone is
    the "alone" curve's."""
    from harness.model.loading import hook_layer

    out = []
    members = st.members
    n = len(members)
    for r in members:
        layer = hook_layer(r.writes[0])
        out.append(Variant(f"{st.name}:{layer}", {r.hook: r},
                           {"set": st.name, "order": "alone", "layers": 1, "first": layer}))
    for k in range(1, n):
        part = members[n - k:]
        first = hook_layer(part[0].writes[0])
        out.append(Variant(f"{st.name}:{first}-", {r.hook: r for r in part},
                           {"set": st.name, "order": "from_top", "layers": k, "first": first}))
    return out


def variants_of(groups: list[list[Replacement]]) -> list[Variant]:
    """The clean variant, then for each group its parts alone and (if several) joined."""
    variants, seen = [Variant(CLEAN, {})], {CLEAN}

    def add(parts: list[Replacement]):
        hooks = [h for r in parts for h in r.writes]
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
    """`zero@15.resid_post`, `zero@15.resid_post+zero@22.resid_post`; three or more consecutive
    blocks at one site are written as a range: `zero@{0..29}.mlp_out` (a whole set's baseline)."""
    import re

    sites: dict[str, list[int]] = {}
    other = []
    for h in hooks:
        m = re.match(r"^blocks\.(\d+)\.(.+)$", h)
        if m:
            sites.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            other.append(h)
    parts = []
    for site, layers in sites.items():
        layers = sorted(layers)
        if len(layers) >= 3 and layers == list(range(layers[0], layers[-1] + 1)):
            parts.append(f"{kind}@{{{layers[0]}..{layers[-1]}}}.{short_hook('blocks.0.' + site)[2:]}")
        else:
            parts += [f"{kind}@{short_hook(f'blocks.{L}.{site}')}" for L in layers]
    return "+".join(parts + [f"{kind}@{short_hook(h)}" for h in other])


def baseline_variants(variants: list[Variant]) -> list[Variant]:
    """The zero and mean variants that loss recovered needs, at exactly each variant's hooks."""
    extra: dict[str, Variant] = {}
    for v in variants:
        if v.curve is not None:  # a curve point reports dCE, KL, top-1 and C_eff/C, not loss recovered
            continue
        for kind in ("zero", "mean"):
            name = baseline_name(kind, v.hooks)
            if v.parts and name not in extra:
                parts = {h: Replacement(name=kind, spec=f"{kind}@{h}", kind=kind, hook=h) for h in v.hooks}
                extra[name] = Variant(name, parts)
    return list(extra.values())
