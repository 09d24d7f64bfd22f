"""SAEs and the trivial baselines, behind one small interface.

A `Replacement` maps an activation x [..., d] to (x_hat, latents | None). It is an SAE
(sae-lens folder, demo SAE, or sae-lens registry release) or a baseline needing no training:

    identity@HOOK      x_hat = x                   (sanity check: dCE must be exactly 0)
    zero@HOOK          x_hat = 0
    mean@HOOK          x_hat = mean of x over a calibration batch
    pca:K@HOOK         projection on the top-K principal components of the calibration batch
    neurons:K@HOOK     keep the K largest-|x| coordinates per token ("just use the neurons",
                       at the same L0 as a K-sparse SAE)

`@HOOK` may be left out when another SAE of the run names a hook: the baseline then sits at
the first SAE's hook. Hooks may be TransformerLens names or Hugging Face module paths.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.models import UserError, to_tl_hook_name

DEMO_DIR = Path(__file__).parent / "demo_saes"
BASELINES = ("identity", "zero", "mean", "pca", "neurons")
_BASELINE_SPEC = re.compile(rf"^({'|'.join(BASELINES)})(?::(\d+))?(?:@(.+))?$")


@dataclass
class Replacement:
    name: str
    spec: str
    kind: str  # "sae" or one of BASELINES
    hook: str | None  # TransformerLens hook name (None until resolved for a baseline)
    k: int | None = None
    sae: Any = None
    model_name: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # path -> sha256
    mean: torch.Tensor | None = None
    components: torch.Tensor | None = None  # [K, d] for pca

    @property
    def d_in(self) -> int | None:
        return int(self.sae.cfg.d_in) if self.sae is not None else None

    @property
    def needs_calibration(self) -> bool:
        return self.kind in ("mean", "pca")

    def fit(self, acts: torch.Tensor) -> None:
        """Fit mean / PCA on calibration activations [n, d] (float64 for a stable covariance)."""
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
        if self.sae is not None:
            self.sae = self.sae.to(device)
        if self.mean is not None:
            self.mean = self.mean.to(device, dtype)
        if self.components is not None:
            self.components = self.components.to(device, dtype)
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        # sae-lens' own encode/decode: TopK SAEs may rescale by decoder norms, JumpReLU has
        # thresholds, etc.; re-deriving that arithmetic here would drift from sae-lens.
        sae_dtype = self.sae.W_dec.dtype
        latents = self.sae.encode(x.to(sae_dtype))
        return self.sae.decode(latents).to(x.dtype), latents


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def demo_sae_names() -> list[str]:
    if not DEMO_DIR.exists():
        return []
    return sorted(p.name for p in DEMO_DIR.iterdir() if (p / "cfg.json").exists())


def load_replacement(spec: str, device: str = "cpu") -> Replacement:
    """Parse one --sae spec (see module docstring) into a Replacement."""
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
        return _load_folder(spec, path, device)
    if spec.startswith(("/", ".", "~")) or spec.endswith("/"):
        raise UserError(f"SAE folder {spec} not found")
    if "/" in spec:
        return _load_release(spec, device)
    known = ", ".join(demo_sae_names()) or "none shipped"
    raise UserError(f"SAE {spec!r} not found: not a folder, baseline, demo SAE ({known}) or release/sae_id")


def _local_sae_path(spec: str) -> Path | None:
    name = spec.removeprefix("demo:")
    if (DEMO_DIR / name / "cfg.json").exists():
        return DEMO_DIR / name
    if spec.startswith("demo:"):
        raise UserError(f"no demo SAE {name!r}; shipped: {', '.join(demo_sae_names())}")
    path = Path(spec)
    return path if path.exists() else None


def _load_folder(spec: str, path: Path, device: str) -> Replacement:
    from sae_lens import SAE

    cfg_path, weights = path / "cfg.json", path / "sae_weights.safetensors"
    for f in (cfg_path, weights):
        if not f.exists():
            raise UserError(f"SAE folder {path} lacks {f.name} (sae-lens format: cfg.json + sae_weights.safetensors)")
    try:
        json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON: {e}") from None
    try:
        sae = SAE.load_from_disk(str(path), device=device, dtype="float32")
    except Exception as e:  # corrupt safetensors, shape mismatch, unknown architecture...
        raise UserError(f"cannot load SAE from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    files = {str(f): sha256(f) for f in (cfg_path, weights)}
    name = path.name if path.parent == DEMO_DIR else spec
    return _from_sae(name, spec, sae, files)


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
    return _from_sae(spec, spec, sae, {"release": spec})


def _from_sae(name: str, spec: str, sae: Any, files: dict) -> Replacement:
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
    if getattr(sae, "hook_z_reshaping_mode", False):
        # The splice hands every SAE the site's activation flattened to [..., heads * d_head]
        # (harness.splice.flat), which is what sae-lens' hook_z reshaping feeds the encoder;
        # left on, sae-lens would flatten it a second time.
        sae.turn_off_forward_pass_hook_z_reshaping()
    sae.eval()
    return Replacement(
        name=name, spec=spec, kind="sae", hook=to_tl_hook_name(hook), k=k, sae=sae,
        model_name=getattr(meta, "model_name", None),
        model_kwargs=dict(getattr(meta, "model_from_pretrained_kwargs", None) or {}), files=files,
    )


def resolve_hooks(replacements: list[Replacement]) -> None:
    """Give hook-less baselines the first SAE's hook; error if there is none to borrow."""
    default = next((r.hook for r in replacements if r.hook), None)
    for r in replacements:
        if r.hook is None:
            if default is None:
                raise UserError(f"baseline {r.spec!r} needs a hook: write {r.spec}@blocks.L.hook_resid_post")
            r.hook = default


def same_model(sae_model: str | None, model_spec: str) -> bool:
    """Loose name match: `tl:gpt2` ~ `gpt2`, a folder path ~ its last component."""
    if not sae_model:
        return True

    def norm(s: str) -> str:
        return Path(s.removeprefix("tl:").rstrip("/")).name.lower()

    return norm(sae_model) == norm(model_spec)


def describe(r: Replacement) -> dict:
    d = {"name": r.name, "spec": r.spec, "kind": r.kind, "hook": r.hook, "k": r.k, "files": r.files}
    if r.sae is not None:
        d.update(d_in=r.d_in, d_sae=int(r.sae.cfg.d_sae), architecture=r.sae.cfg.architecture(),
                 model_name=r.model_name, model_from_pretrained_kwargs=r.model_kwargs)
    return d
