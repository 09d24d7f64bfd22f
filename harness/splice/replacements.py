"""SAEs and the trivial baselines, behind one small interface.

A `Replacement` maps an activation x [..., d] to (x_hat, latents | None). It is an SAE
(sae-lens folder, demo SAE, or sae-lens registry release) or a baseline needing no training:

    identity@HOOK      x_hat = x                   (sanity check: dCE must be exactly 0)
    zero@HOOK          x_hat = 0
    mean@HOOK          x_hat = mean of x over a calibration batch
    pca:K@HOOK         projection on the top-K principal components of the calibration batch
    neurons:K@HOOK     keep the K largest-|x| coordinates per token ("just use the neurons",
                       at the same L0 as a K-sparse SAE)

and three wrappers around another replacement S (an SAE or a baseline), which ask whether S's
damage comes from the size of its error e = x - S(x) or from where it points:

    noise@S            x + ||e|| u, u uniform on the unit sphere per position (a random error of
                       S's size: Gurnee 2024, "SAE reconstruction errors are (empirically)
                       pathological")
    noise-dir@S        x - e', e' = S's error with its component along x kept and its part
                       orthogonal to x turned to a random direction orthogonal to x, its norm
                       kept: a rotation of e that fixes x, so ||e'|| = ||e|| and the shrinkage
                       along x (SAEs under-reconstruct norms) stays; only the direction in
                       which S's error leaves x's line is randomised
    S+error            x_hat + (x - x_hat): S with its exact error added back, which must leave
                       the model unchanged (a check of the splice machinery; where error-term
                       circuits start)

The noise is drawn on the CPU in float32 from a generator seeded by (seed, key, call)
(`noise_seed`): the CE suite sets the key to each batch's first row, so a run, a resumed run and
a run split over processes draw the same noise for the same rows.

`@HOOK` may be left out when another SAE of the run names a hook: the baseline then sits at
the first SAE's hook. Hooks may be TransformerLens names or Hugging Face module paths.

A local SAE folder is recognised by its files (FOLDER_FORMATS) and read by sae-lens' own loader
or converter for that format, so every architecture sae-lens knows (standard ReLU, TopK,
JumpReLU, gated) loads the way sae-lens defines it.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.model.loading import model_name_key, to_dtype, to_tl_hook_name
from harness.errors import UserError
from harness.files import folder_hashes

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_saes"
FAMILY_SAE_DIR = Path(__file__).resolve().parents[1] / "family" / "saes"  # harness/jobs/family.py
BASELINES = ("identity", "zero", "mean", "pca", "neurons")
_BASELINE_SPEC = re.compile(rf"^({'|'.join(BASELINES)})(?::(\d+))?(?:@(.+))?$")
_NOISE_SPEC = re.compile(r"^(noise|noise-dir)@(.+)$")
ERROR_SUFFIX = "+error"
LEARNED = ("sae", "transcoder", "clt")


def noise_seed(seed: int, key: int, call: int) -> int:
    """The generator seed of one noise draw: run seed, key (the CE batch's first row), call."""
    return ((seed * 1_000_003 + key) * 1_000_033 + call) % (2**63 - 1)


def wrapper_of(spec: str) -> tuple[str, str] | None:
    """(`noise` | `noise-dir` | `error`, the wrapped spec) for a wrapper spec, else None."""
    match = _NOISE_SPEC.match(spec)
    if match:
        return match.group(1), match.group(2)
    if spec.endswith(ERROR_SUFFIX) and len(spec) > len(ERROR_SUFFIX):
        return "error", spec[: -len(ERROR_SUFFIX)]
    return None


@dataclass
class Replacement:
    name: str
    spec: str
    kind: str  # "sae", "transcoder", "clt" or one of BASELINES
    hook: str | None  # TransformerLens hook name it writes (None until resolved for a baseline)
    k: int | None = None
    sae: Any = None
    model_name: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # path -> sha256
    sae_dtype: torch.dtype = torch.float32  # the SAE computes in this dtype, whatever the model's
    mean: torch.Tensor | None = None
    components: torch.Tensor | None = None  # [K, d] for pca
    inner: "Replacement | None" = None  # the replacement a wrapper (noise, noise-dir, error) wraps
    seed: int = 0  # noise wrappers: the run's seed
    noise_key: int = 0  # set per CE batch (`reseed`)
    noise_calls: int = 0
    # A transcoder reads `hook_in` (the MLP's input) and writes `hook` (the MLP's output); a CLT
    # (harness/splice/transcoders.py) reads several hooks and writes several.
    hook_in: str | None = None
    clt: Any = None  # harness.splice.transcoders.CrossLayerTranscoder for kind "clt"
    skip_orientation: dict | None = None  # Gemma Scope 2: output explained with A and with A.T

    @property
    def reads(self) -> list[str]:
        """The hooks whose activations it reads (an SAE: the hook it writes)."""
        if self.clt is not None:
            return list(self.clt.hooks_in)
        return [self.hook_in or self.hook]

    @property
    def writes(self) -> list[str]:
        """The hooks whose activations it replaces."""
        if self.clt is not None:
            return list(self.clt.hooks_out)
        return [self.hook]

    @property
    def sites(self) -> list[str]:
        return sorted(set(self.reads) | set(self.writes))

    @property
    def learned(self) -> bool:
        """An SAE, transcoder or CLT (trained for some model), as opposed to a baseline."""
        return self.kind in LEARNED

    def output(self, hook: str, seen: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A transcoder's (or CLT's) replacement for `hook` from the inputs it read this forward."""
        if self.clt is not None:
            return self.clt.output(hook, seen)
        return self(seen[self.hook_in])

    def widths(self) -> dict[str, int]:
        """The activation width it expects at each hook it reads or writes."""
        if self.clt is not None:
            return self.clt.widths()
        if self.kind == "transcoder":
            return {self.hook_in: self.d_in, self.hook: int(self.sae.cfg.d_out)}
        return {self.hook: self.d_in}

    @property
    def d_in(self) -> int | None:
        if self.inner is not None:
            return self.inner.d_in
        if self.clt is not None:
            return self.clt.d_in
        return int(self.sae.cfg.d_in) if self.sae is not None and self.kind in ("sae", "transcoder") else None

    @property
    def base(self) -> "Replacement":
        """The innermost replacement (the SAE or baseline a wrapper is built on)."""
        return self if self.inner is None else self.inner.base

    @property
    def needs_calibration(self) -> bool:
        return self.base.kind in ("mean", "pca")

    @property
    def fitted(self) -> bool:
        return self.base.mean is not None

    def reseed(self, key: int) -> None:
        """Noise from here on is drawn for `key` (the CE suite: the batch's first row)."""
        self.noise_key, self.noise_calls = key, 0

    def fit(self, acts: torch.Tensor) -> None:
        """Fit mean / PCA on calibration activations [n, d] (float64 for a stable covariance)."""
        if self.inner is not None:
            return self.inner.fit(acts)
        acts = acts.double()
        self.mean = acts.mean(0)
        if self.kind == "pca":
            centred = acts - self.mean
            # Right singular vectors = principal directions, largest variance first.
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            if self.k > vh.shape[0]:
                raise UserError(f"{self.spec}: K={self.k} exceeds the rank available ({vh.shape[0]})")
            self.components = vh[: self.k]

    def to(self, device, dtype=torch.float32) -> "Replacement":
        """Place on `device` (the one holding the hooked layer). SAE weights take `sae_dtype`;
        baseline statistics `dtype`, and are cast to the activation's dtype when applied."""
        if self.inner is not None:
            self.inner.to(device, dtype)
        if self.sae is not None:
            self.sae = self.sae.to(device=device, dtype=self.sae_dtype) if self.kind in ("sae", "transcoder") \
                else self.sae.to(device)
        if self.clt is not None:
            self.clt.to(device, self.sae_dtype)
        if self.mean is not None:
            self.mean = self.mean.to(device, dtype)
        if self.components is not None:
            self.components = self.components.to(device, dtype)
        return self

    def _unit_gaussian(self, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(noise_seed(self.seed, self.noise_key, self.noise_calls))
        self.noise_calls += 1
        return torch.randn(shape, generator=g, dtype=torch.float32)

    @torch.no_grad()
    def _wrapped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x_hat, latents = self.inner(x)
        if self.kind == "error":
            return x_hat + (x - x_hat), latents
        xf = x.float()
        err = xf - x_hat.float()
        g = self._unit_gaussian(x.shape).to(x.device)
        if self.kind == "noise":
            u = g / g.norm(dim=-1, keepdim=True)
            return (xf + err.norm(dim=-1, keepdim=True) * u).to(x.dtype), None
        # noise-dir: keep e's component along x; turn the rest to a random direction orthogonal to x
        unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        along = (err * unit).sum(-1, keepdim=True) * unit
        v = g - (g * unit).sum(-1, keepdim=True) * unit
        v = v / v.norm(dim=-1, keepdim=True)
        rotated = along + (err - along).norm(dim=-1, keepdim=True) * v
        return (xf - rotated).to(x.dtype), None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.inner is not None:
            return self._wrapped(x)
        if self.kind == "identity":
            return x, None
        if self.kind == "zero":
            return torch.zeros_like(x), None
        if self.kind == "mean":
            return self.mean.to(x.dtype).expand_as(x), None
        if self.kind == "pca":
            mean, comps = self.mean.to(x.dtype), self.components.to(x.dtype)
            latents = (x - mean) @ comps.T
            return latents @ comps + mean, latents
        if self.kind == "neurons":
            idx = x.abs().topk(self.k, dim=-1).indices
            latents = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
            return latents, latents
        if self.kind == "transcoder":  # sae-lens' own forward: the skip term is part of it
            sae_dtype = self.sae.W_dec.dtype
            out, latents = self.sae.forward_with_activations(x.to(sae_dtype))
            return out.to(x.dtype), latents
        if self.kind == "module":  # a user's module: activation -> reconstruction (or, latents)
            out = self.sae(x)
            return (out[0].to(x.dtype), out[1]) if isinstance(out, tuple) else (out.to(x.dtype), None)
        # sae-lens' own encode/decode: TopK SAEs may rescale by decoder norms, JumpReLU has
        # thresholds, etc.; re-deriving that arithmetic here would drift from sae-lens.
        sae_dtype = self.sae.W_dec.dtype
        latents = self.sae.encode(x.to(sae_dtype))
        return self.sae.decode(latents).to(x.dtype), latents


def demo_sae_names() -> list[str]:
    if not DEMO_DIR.exists():
        return []
    return sorted(p.name for p in DEMO_DIR.iterdir() if (p / "cfg.json").exists())


def load_replacement(spec: str, device: str = "cpu", sae_dtype: str = "float32") -> Replacement:
    """Parse one --sae spec (see module docstring) into a Replacement; an SAE's weights are
    cast to `sae_dtype` (`--sae-dtype`, independent of the model's `--dtype`)."""
    r = _parse_spec(spec, device)
    r.sae_dtype = to_dtype(sae_dtype)
    if r.sae is not None:
        r.sae = r.sae.to(dtype=r.sae_dtype)
    if r.clt is not None:
        r.clt.to(dtype=r.sae_dtype)
    return r


def wrap(kind: str, inner: Replacement, seed: int = 0) -> Replacement:
    """A noise / noise-dir / error wrapper around `inner` (see the module docstring)."""
    if inner.inner is not None and inner.kind != "error":
        raise UserError(f"{kind} wraps an SAE or a baseline, not another noise wrapper ({inner.spec})")
    spec = f"{inner.spec}{ERROR_SUFFIX}" if kind == "error" else f"{kind}@{inner.spec}"
    return Replacement(name=spec, spec=spec, kind=kind, hook=inner.hook, k=inner.k, model_name=inner.model_name,
                       model_kwargs=inner.model_kwargs, files=inner.files, sae_dtype=inner.sae_dtype,
                       inner=inner, seed=seed)


def _parse_spec(spec: str, device: str) -> Replacement:
    match = _BASELINE_SPEC.match(spec)
    if match:
        kind, k, hook = match.groups()
        if kind in ("pca", "neurons") and not k:
            raise UserError(f"baseline {spec!r} needs a size, e.g. {kind}:32")
        if kind not in ("pca", "neurons") and k:
            raise UserError(f"baseline {kind} takes no size (got {spec!r})")
        name = f"{kind}:{k}" if k else kind
        return Replacement(name=name, spec=spec, kind=kind, hook=to_tl_hook_name(hook) if hook else None,
                           k=int(k) if k else None)
    path = _local_sae_path(spec)
    if path is not None:
        from harness.splice import transcoders

        if path.is_dir() and (path / "config.yaml").exists():
            if transcoders.is_ct_clt(path):
                clt, model_name, files = transcoders.read_ct_clt(path)
                return Replacement(name=path.name, spec=spec, kind="clt", hook=clt.hooks_out[0], clt=clt,
                                   model_name=model_name, files=files)
            raise UserError(f"{spec} is a circuit-tracer transcoder set: pass it as a whole (--sae {spec})")
        if path.is_dir() and transcoders.is_gemma_scope_2(path):
            sae, files = transcoders.read_gemma_scope_2(path)
            r = from_sae(spec, spec, sae, files)
            r.skip_orientation = {} if r.kind == "transcoder" and hasattr(r.sae, "W_skip") else None
            return r
        return _load_folder(spec, path, device)
    if spec.startswith(("/", ".", "~")) or spec.endswith("/"):
        raise UserError(f"SAE folder {spec} not found")
    if "/" in spec:
        return _load_release(spec, device)
    known = ", ".join(demo_sae_names()) or "none shipped"
    raise UserError(f"SAE {spec!r} not found: tried a local folder ({', '.join(FOLDER_FORMATS)}), a baseline, "
                    f"a demo SAE ({known}) and a sae-lens release/sae_id")


def _local_sae_path(spec: str) -> Path | None:
    name = spec.removeprefix("demo:")
    if (DEMO_DIR / name / "cfg.json").exists():
        return DEMO_DIR / name
    if spec.startswith("demo:"):
        raise UserError(f"no demo SAE {name!r}; shipped: {', '.join(demo_sae_names())}")
    path = Path(spec)
    return path if path.exists() else None


# name -> the files that mark a folder of that format (checked in this order).
FOLDER_FORMATS = {
    "sae-lens": ("cfg.json", "sae_weights.safetensors"),
    "sparsify": ("cfg.json", "sae.safetensors"),
    "dictionary_learning": ("config.json", "ae.pt"),
    "Gemma Scope": ("params.npz",),
}


def folder_format(path: Path) -> str:
    for fmt, marks in FOLDER_FORMATS.items():
        if all((path / m).exists() for m in marks):
            return fmt
    tried = "; ".join(f"{fmt} ({' + '.join(m)})" for fmt, m in FOLDER_FORMATS.items())
    raise UserError(f"SAE folder {path} is in no known format; tried {tried}")


def _load_folder(spec: str, path: Path, device: str) -> Replacement:
    from sae_lens import SAE

    fmt = folder_format(path)
    cfg_file = path / FOLDER_FORMATS[fmt][0]
    if cfg_file.suffix == ".json":
        try:
            json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{cfg_file} is not valid JSON: {e}") from None
    converter = _CONVERTERS[fmt]
    try:
        sae = SAE.load_from_disk(str(path), device=device, dtype="float32", converter=converter)
    except UserError:
        raise
    except Exception as e:  # corrupt weights, shape mismatch, unknown architecture...
        raise UserError(f"cannot load {fmt} SAE from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    files = folder_hashes(path)
    # shipped SAEs (the demo ones, the family's) go by their folder's name
    name = path.name if path.resolve().parent in (DEMO_DIR.resolve(), FAMILY_SAE_DIR.resolve()) else spec
    return from_sae(name, spec, sae, files)


@contextmanager
def _hub_from_folder(root: Path):
    """Serve sae-lens' hub downloads from a local folder.

    sae-lens keeps its dictionary_learning and Gemma Scope converters inside Hugging Face
    loaders that fetch each file with `hf_hub_download`; pointing that one function at `root`
    lets a local checkpoint go through the very same converter instead of a copy of it.
    """
    from huggingface_hub.errors import EntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders as loaders

    def local(repo_id, filename, subfolder=None, **_):
        f = root / (subfolder or "") / filename
        if not f.exists():
            raise EntryNotFoundError(f"{f} not found")
        return str(f)

    original, loaders.hf_hub_download = loaders.hf_hub_download, local
    try:
        yield
    finally:
        loaders.hf_hub_download = original


def _hook_override(hook: str, path: Path) -> dict:
    """A converter's hook name, translated to TransformerLens and checked."""
    tl = to_tl_hook_name(hook)
    if ".hook_" not in tl and not tl.startswith("hook_"):
        raise UserError(f"SAE folder {path}: cannot translate its hook {hook!r} to a TransformerLens hook name")
    return {"hook_name": tl}


def _sparsify_converter(path, device, cfg_overrides=None):
    """sae-lens' sparsify loader, with three corrections checked against sparsify's own
    SparseCoder: the hook comes from the folder name (`layers.3`, `layers.3.mlp`), where sae-lens
    reads only the layer number and assumes the residual stream; sparsify's encoder always
    subtracts b_dec (sae-lens skips it when `normalize_decoder` is set); and sparsify stores
    `W_dec` as [latents, d_in], the layout sae-lens wants, which sae-lens transposes anyway."""
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader
    from safetensors import safe_open

    path = Path(path)
    raw_cfg = json.loads((path / "cfg.json").read_text())
    if raw_cfg.get("transcode"):
        raise UserError(f"sparsify folder {path} holds a transcoder; only SAEs can be spliced")
    overrides = {**(cfg_overrides or {}), **_hook_override(path.name, path), "apply_b_dec_to_input": True}
    cfg, state = sparsify_disk_loader(path, device, cfg_overrides=overrides)
    with safe_open(str(path / "sae.safetensors"), framework="pt") as f:
        if "W_dec" in f.keys():
            state["W_dec"] = state["W_dec"].T.contiguous()
    return cfg, state


def _dictionary_learning_converter(path, device, cfg_overrides=None):
    """sae-lens' dictionary_learning converter (ae.pt + config.json), hook from the trainer's
    `submodule_name` (`resid_post_layer_3`) when it names one; sae-lens assumes resid_post."""
    from sae_lens.loading.pretrained_sae_loaders import dictionary_learning_sae_huggingface_loader_1

    path = Path(path)
    trainer = json.loads((path / "config.json").read_text()).get("trainer", {})
    overrides = dict(cfg_overrides or {})
    if trainer.get("submodule_name"):
        overrides.update(_hook_override(trainer["submodule_name"], path))
    with _hub_from_folder(path.parent):
        cfg, state, _ = dictionary_learning_sae_huggingface_loader_1(
            repo_id="local", folder_name=path.name, device=device, cfg_overrides=overrides)
    return cfg, state


def _gemma_scope_converter(path, device, cfg_overrides=None):
    """sae-lens' Gemma Scope converter (params.npz, JumpReLU). It reads the model size and hook
    kind from the repository name (`gemma-scope-2b-pt-res`), so the folder must sit under a
    folder of that name, as a hub download does; d_in and d_sae come from the weights."""
    import numpy as np
    from sae_lens.loading.pretrained_sae_loaders import gemma_2_sae_huggingface_loader

    path = Path(path)
    repo = next((p for p in path.parents if p.name.startswith("gemma-scope-")), None)
    if repo is None:
        raise UserError(f"Gemma Scope folder {path} must lie under its release folder (e.g. gemma-scope-2b-pt-res/)")
    with np.load(path / "params.npz") as params:
        d_in, d_sae = params["W_enc"].shape
    overrides = {**(cfg_overrides or {}), "d_in": int(d_in), "d_sae": int(d_sae)}
    with _hub_from_folder(repo):
        cfg, state, _ = gemma_2_sae_huggingface_loader(
            repo_id=f"google/{repo.name}", folder_name=str(path.relative_to(repo)), device=device,
            cfg_overrides=overrides)
    return cfg, state


def _sae_lens_converter(path, device, cfg_overrides=None):
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    return sae_lens_disk_loader(path, device, cfg_overrides=cfg_overrides)


_CONVERTERS = {"sae-lens": _sae_lens_converter, "sparsify": _sparsify_converter,
               "dictionary_learning": _dictionary_learning_converter, "Gemma Scope": _gemma_scope_converter}


def _load_release(spec: str, device: str) -> Replacement:
    """`release/sae_id` from sae-lens' registry (downloads from the hub: online only)."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    release, _, sae_id = spec.partition("/")
    # Release names never contain '/', but sae ids often do: split at the first one.
    if release not in directory:
        raise UserError(f"SAE {spec!r}: not a local folder, and {release!r} is not a sae-lens release")
    if sae_id not in directory[release].saes_map:
        some = ", ".join(list(directory[release].saes_map)[:5])
        raise UserError(f"release {release!r} has no SAE {sae_id!r} (e.g. {some})")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=device)
    except Exception as e:
        raise UserError(f"cannot fetch SAE {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return from_sae(spec, spec, sae, {"release": spec})


def from_sae(name: str, spec: str, sae: Any, files: dict) -> Replacement:
    for pname, p in sae.named_parameters():
        if not torch.isfinite(p).all():
            raise UserError(f"SAE {spec!r} has NaN or infinite values in {pname}")
    meta = sae.cfg.metadata
    hook = getattr(meta, "hook_name", None)
    if not hook:
        raise UserError(f"SAE {spec!r} records no hook_name in cfg.json metadata")
    if getattr(meta, "hook_head_index", None) is not None:
        raise UserError(f"SAE {spec!r} reads a single attention head; only whole-hook SAEs are supported")
    k = getattr(sae.cfg, "k", None)
    hook_out = getattr(meta, "hook_name_out", None)
    if hasattr(sae.cfg, "d_out"):  # a sae-lens transcoder: reads hook_name, writes hook_name_out
        if not hook_out:
            raise UserError(f"transcoder {spec!r} records no hook_name_out in cfg.json metadata")
        hook_in, hook_out = to_tl_hook_name(hook), to_tl_hook_name(hook_out)
        check_transcoder_hooks(spec, hook_in, hook_out)
        sae.eval()
        return Replacement(name=name, spec=spec, kind="transcoder", hook=hook_out, hook_in=hook_in, k=k, sae=sae,
                           model_name=getattr(meta, "model_name", None),
                           model_kwargs=dict(getattr(meta, "model_from_pretrained_kwargs", None) or {}),
                           files=files)
    if getattr(sae, "hook_z_reshaping_mode", False):
        # The splice hands every SAE the site's activation flattened to [..., heads * d_head]
        # (harness.splice.splicer.flat), which is what sae-lens' hook_z reshaping feeds the encoder;
        # left on, sae-lens would flatten it a second time.
        sae.turn_off_forward_pass_hook_z_reshaping()
    sae.eval()
    return Replacement(
        name=name, spec=spec, kind="sae", hook=to_tl_hook_name(hook), k=k, sae=sae,
        model_name=getattr(meta, "model_name", None),
        model_kwargs=dict(getattr(meta, "model_from_pretrained_kwargs", None) or {}), files=files,
    )


# Order of the sites inside one block, as the forward pass reaches them.
_SITE_ORDER = ("hook_resid_pre", "ln1.", "attn.", "hook_attn_out", "hook_resid_mid", "ln2.", "hook_mlp_in",
               "mlp.hook_in", "mlp.hook_pre", "mlp.hook_post", "mlp.hook_out", "hook_mlp_out", "hook_resid_post")


def site_position(hook: str) -> tuple[int, int]:
    """(block, rank within the block) of a TransformerLens hook, for ordering reads and writes."""
    layer = int(re.match(r"^blocks\.(\d+)\.", hook).group(1)) if re.match(r"^blocks\.\d+\.", hook) else -1
    rest = hook.split(".", 2)[2] if layer >= 0 else hook
    rank = next((i for i, key in enumerate(_SITE_ORDER) if rest.startswith(key)), len(_SITE_ORDER))
    return layer, rank


def check_transcoder_hooks(spec: str, hook_in: str, hook_out: str) -> None:
    """A transcoder must write a site the forward pass reaches after the one it reads."""
    if site_position(hook_out) <= site_position(hook_in):
        raise UserError(f"transcoder {spec!r} writes {hook_out}, which the forward pass reaches before "
                        f"(or at) the hook it reads, {hook_in}")


def module_replacement(name: str, hook: str, module: Any) -> Replacement:
    """Any torch module that maps an activation [..., d] to its reconstruction (or to a pair
    (reconstruction, latents)), spliced at `hook` (a TransformerLens name or a module path)."""
    if not callable(module):
        raise UserError(f"{name}: the module is not callable")
    if isinstance(module, torch.nn.Module):
        module.eval()
    return Replacement(name=name, spec=name, kind="module", hook=to_tl_hook_name(hook), sae=module)


def resolve_hooks(replacements: list[Replacement]) -> None:
    """Give hook-less baselines the first SAE's hook; error if there is none to borrow."""
    default = next((r.hook for r in replacements if r.hook), None)
    for r in replacements:
        if r.hook is None and r.inner is not None:
            resolve_hooks([r.inner] + [x for x in replacements if x.hook])
            r.hook = r.inner.hook
        if r.hook is None:
            if default is None:
                raise UserError(f"baseline {r.spec!r} needs a hook: write {r.spec}@blocks.L.hook_resid_post")
            r.hook = default


def same_model(sae_model: str | None, model_names: set[str]) -> bool:
    """Whether an SAE's model_name is one of the names the loaded model goes by
    (`LoadedModel.names`: spec, hub id, folder); no name at all is no evidence against it."""
    return not sae_model or model_name_key(sae_model) in model_names


def describe(r: Replacement) -> dict:
    d = {"name": r.name, "spec": r.spec, "kind": r.kind, "hook": r.hook, "k": r.k, "files": r.files}
    if r.inner is not None:
        d.update(wraps=r.inner.spec, seed=r.seed)
    if r.hook_in is not None:
        d.update(hook_in=r.hook_in, d_out=int(r.sae.cfg.d_out))
    if r.skip_orientation:
        d["skip_orientation_explained"] = r.skip_orientation
    if r.clt is not None:
        d.update(hooks_in=r.clt.hooks_in, hooks_out=r.clt.hooks_out, d_in=r.clt.d_in,
                 d_sae=int(r.clt.W_enc.shape[1]), model_name=r.model_name)
    if r.sae is not None and r.kind in ("sae", "transcoder"):
        d.update(d_in=r.d_in, d_sae=int(r.sae.cfg.d_sae), architecture=r.sae.cfg.architecture(),
                 dtype=str(r.sae_dtype).removeprefix("torch."),
                 model_name=r.model_name, model_from_pretrained_kwargs=r.model_kwargs)
    return d
