"""Transcoders, cross-layer transcoders and whole sets of them, in the formats people ship.

A transcoder reads one site (the MLP's input) and writes another (the MLP's output); the
splice replaces the written activation with the transcoder's output computed from the read
one, skip term included. Accepted here, each following the conventions of the library that
defines it:

- sae-lens transcoder folders (`cfg.json` + `sae_weights.safetensors`, architectures
  transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder): loaded by
  sae-lens itself (harness/splice/replacements.py); hooks from `metadata.hook_name` and
  `metadata.hook_name_out`; the skip is `x @ W_skip.T` (W_skip [d_out, d_in]).
- Gemma Scope 2 folders (`params.safetensors` + `config.json`): `w_enc` [d_in, F], `w_dec`
  [F, d_out], JumpReLU `ReLU(h) * (h > threshold)`, and for `affine_connection` folders the
  official skip `x @ affine_skip_connection` (A [d_in, d_out], stored for sae-lens as W_skip =
  A.T). Transcoders become sae-lens JumpReLU(Skip)Transcoders, SAEs JumpReLU SAEs; hooks from
  `hf_hook_point_in` / `hf_hook_point_out`. Which orientation of A explains more of the output
  is measured on the calibration batch (`check_skip_orientation`).
- circuit-tracer sets (a folder with `config.yaml`): `model_kind: transcoder_set` with
  `layer_{i}.safetensors` (W_enc [F, d] used as x @ W_enc.T, W_dec [F, d], JumpReLU threshold
  under `activation_function.threshold`, optional W_skip applied as x @ W_skip.T), or
  `cross_layer_transcoder` with `W_enc_{i}.safetensors` (W_enc_i [F, d], b_enc_i, b_dec_i,
  threshold_i) and `W_dec_{i}.safetensors` (W_dec_i [F, n_layers - i, d]: slot j writes layer
  i + j); hooks are `blocks.{i}.{feature_input_hook}` / `blocks.{i}.{feature_output_hook}`.
  circuit-tracer's JumpReLU has no ReLU (x * (x > threshold)); for thresholds >= 0 that is
  sae-lens' JumpReLU, and a per-layer set with a negative threshold is refused.
Whole sets (a folder of per-layer folders, a glob, a circuit-tracer transcoder_set) are
harness/splice/sets.py's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from harness.errors import UserError
from harness.files import folder_hashes
from harness.model.loading import to_tl_hook_name

# ---------------------------------------------------------------- circuit-tracer


def ct_config(path: Path) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path / 'config.yaml'} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / 'config.yaml'} is not a circuit-tracer config (a mapping)")
    missing = [k for k in ("model_kind", "feature_input_hook", "feature_output_hook") if k not in cfg]
    if missing:
        raise UserError(f"{path / 'config.yaml'} lacks {', '.join(missing)}")
    if cfg["model_kind"] not in ("transcoder_set", "cross_layer_transcoder"):
        raise UserError(f"{path / 'config.yaml'}: model_kind {cfg['model_kind']!r} is neither transcoder_set "
                        "nor cross_layer_transcoder")
    for ref in cfg.get("transcoders") or []:
        if str(ref).startswith("hf://"):
            raise UserError(f"{path / 'config.yaml'} refers to the hub ({ref}); download the files and point "
                            "--sae at a local folder holding config.yaml and the layer files")
    return cfg


def _ct_files(path: Path, cfg: dict, pattern: str) -> dict[int, Path]:
    """{layer: file}: the config's `transcoders` list (index = layer) or the folder's files."""
    listed = cfg.get("transcoders")
    if listed:
        files = {i: (path / ref if not Path(ref).is_absolute() else Path(ref)) for i, ref in enumerate(listed)}
    else:
        files = {int(re.search(r"(\d+)", p.stem).group(1)): p for p in path.glob(pattern)}
    for i, f in files.items():
        if not f.exists():
            raise UserError(f"{path}: the file of layer {i} is missing ({f.name})")
    if not files or sorted(files) != list(range(len(files))):
        raise UserError(f"{path}: layer files must cover layers 0..n-1 (found {sorted(files)})")
    return files


def _read(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except Exception as e:
        raise UserError(f"cannot read {f}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def read_ct_transcoder_set(path: Path) -> list[tuple[int, Path, object]]:
    """A circuit-tracer transcoder_set as sae-lens transcoders: [(layer, file, transcoder)]."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig,
                                          JumpReLUTranscoder, JumpReLUTranscoderConfig, SkipTranscoder,
                                          SkipTranscoderConfig, Transcoder, TranscoderConfig)

    cfg = ct_config(path)
    if cfg.get("activation") == "topk":
        raise UserError(f"{path}: TopK transcoders have no sae-lens class; only JumpReLU and ReLU sets load")
    members = []
    for layer, f in sorted(_ct_files(path, cfg, "layer_*.safetensors").items()):
        w = _read(f)
        for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
            if key not in w:
                raise UserError(f"{f} has no tensor {key}")
        F, d = w["W_enc"].shape
        d_out = w["b_dec"].shape[0]
        _shape(f, "W_dec", w["W_dec"], (F, d_out))
        threshold, skip = w.get("activation_function.threshold"), w.get("W_skip")
        if threshold is not None and bool((threshold < 0).any()):
            raise UserError(f"{f}: negative JumpReLU thresholds (circuit-tracer passes x * (x > t) without a "
                            "ReLU; sae-lens' JumpReLU would differ)")
        if skip is not None:
            _shape(f, "W_skip", skip, (d_out, d))
        classes = {(False, False): (Transcoder, TranscoderConfig), (False, True): (SkipTranscoder, SkipTranscoderConfig),
                   (True, False): (JumpReLUTranscoder, JumpReLUTranscoderConfig),
                   (True, True): (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig)}
        cls, cfg_cls = classes[(threshold is not None, skip is not None)]
        meta = SAEMetadata(hook_name=f"blocks.{layer}.{cfg['feature_input_hook']}",
                           hook_name_out=f"blocks.{layer}.{cfg['feature_output_hook']}",
                           model_name=cfg.get("model_name"))
        tc = cls(cfg_cls(d_in=d, d_sae=F, d_out=d_out, apply_b_dec_to_input=False, metadata=meta))
        state = {"W_enc": w["W_enc"].T, "W_dec": w["W_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"]}
        if threshold is not None:
            state["threshold"] = threshold
        if skip is not None:
            state["W_skip"] = skip
        tc.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
        members.append((layer, f, tc))
    return members


def _shape(f: Path, name: str, t: torch.Tensor, want: tuple) -> None:
    if tuple(t.shape) != tuple(want):
        raise UserError(f"{f}: {name} has shape {tuple(t.shape)}, expected {tuple(want)}")


class CrossLayerTranscoder(torch.nn.Module):
    """circuit-tracer's CLT: the encoder of layer i reads hooks_in[i]; the decoder slot j of
    layer i's features writes hooks_out[i + j]. Output at layer l = sum over i <= l of
    f_i @ W_dec[i][:, l - i] + b_dec[l] (+ x_l @ W_skip[l], untransposed, as circuit-tracer)."""

    def __init__(self, W_enc, b_enc, b_dec, W_dec: list, threshold=None, W_skip=None, hooks_in=(), hooks_out=()):
        super().__init__()
        self.W_enc, self.b_enc, self.b_dec = W_enc, b_enc, b_dec  # [L, F, d], [L, F], [L, d]
        self.W_dec = W_dec  # list of [F, L - i, d]
        self.threshold, self.W_skip = threshold, W_skip  # [L, F] | None, [L, d, d] | None
        self.hooks_in, self.hooks_out = list(hooks_in), list(hooks_out)
        self.d_in = int(W_enc.shape[-1])

    def widths(self) -> dict[str, int]:
        return {**{h: self.d_in for h in self.hooks_in}, **{h: int(self.b_dec.shape[-1]) for h in self.hooks_out}}

    def to(self, device=None, dtype=None):
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)
        self.W_enc, self.b_enc, self.b_dec = move(self.W_enc), move(self.b_enc), move(self.b_dec)
        self.threshold, self.W_skip = move(self.threshold), move(self.W_skip)
        self.W_dec = [move(w) for w in self.W_dec]
        return self

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc[i].T + self.b_enc[i]
        if self.threshold is None:
            return torch.relu(pre)
        return pre * (pre > self.threshold[i])

    @torch.no_grad()
    def output(self, hook: str, seen: dict) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.hooks_out.index(hook)
        dtype = self.W_enc.dtype
        out = self.b_dec[layer].expand(*seen[self.hooks_in[layer]].shape[:-1], -1).clone()
        for i in range(layer + 1):
            key = f"clt-acts:{i}"
            if key not in seen:
                seen[key] = self.encode(i, seen[self.hooks_in[i]].to(dtype))
            out = out + seen[key] @ self.W_dec[i][:, layer - i]
        if self.W_skip is not None:
            out = out + seen[self.hooks_in[layer]].to(dtype) @ self.W_skip[layer]
        return out, seen[f"clt-acts:{layer}"]


def read_ct_clt(path: Path) -> tuple[CrossLayerTranscoder, str | None, dict]:
    """A circuit-tracer cross_layer_transcoder folder: (the CLT, its model_name, {file: sha256})."""
    cfg = ct_config(path)
    enc_files = _ct_files(path, {}, "W_enc_*.safetensors")
    n = len(enc_files)
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for i in range(n):
        e = _read(enc_files[i])
        dec_file = path / f"W_dec_{i}.safetensors"
        if not dec_file.exists():
            raise UserError(f"{path}: the decoder file of layer {i} is missing ({dec_file.name})")
        for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if key not in e:
                raise UserError(f"{enc_files[i]} has no tensor {key}")
        F, d = e[f"W_enc_{i}"].shape if i == 0 else W_enc[0].shape
        _shape(enc_files[i], f"W_enc_{i}", e[f"W_enc_{i}"], (F, d))
        _shape(enc_files[i], f"b_enc_{i}", e[f"b_enc_{i}"], (F,))
        d_out = e[f"b_dec_{i}"].shape[0]
        dec = _read(dec_file).get(f"W_dec_{i}")
        if dec is None:
            raise UserError(f"{dec_file} has no tensor W_dec_{i}")
        _shape(dec_file, f"W_dec_{i}", dec, (F, n - i, d_out))
        W_enc.append(e[f"W_enc_{i}"].float())
        b_enc.append(e[f"b_enc_{i}"].float())
        b_dec.append(e[f"b_dec_{i}"].float())
        W_dec.append(dec.float())
        if f"threshold_{i}" in e:
            thr.append(e[f"threshold_{i}"].float().reshape(-1))
    if thr and len(thr) != n:
        raise UserError(f"{path}: some layers have a JumpReLU threshold and some do not")
    skip = None
    if (path / "W_skip.safetensors").exists():
        skip = _read(path / "W_skip.safetensors").get("W_skip")
        if skip is None or tuple(skip.shape) != (n, d, d_out):
            raise UserError(f"{path / 'W_skip.safetensors'}: W_skip must have shape {(n, d, d_out)}")
        skip = skip.float()
    clt = CrossLayerTranscoder(torch.stack(W_enc), torch.stack(b_enc), torch.stack(b_dec), W_dec,
                               torch.stack(thr) if thr else None, skip,
                               [f"blocks.{i}.{cfg['feature_input_hook']}" for i in range(n)],
                               [f"blocks.{i}.{cfg['feature_output_hook']}" for i in range(n)])
    return clt, cfg.get("model_name"), folder_hashes(path)


def is_ct_clt(path: Path) -> bool:
    return (path / "config.yaml").exists() and ct_config(path)["model_kind"] == "cross_layer_transcoder"


# ---------------------------------------------------------------- Gemma Scope 2


def is_gemma_scope_2(path: Path) -> bool:
    return (path / "params.safetensors").exists() and (path / "config.json").exists()


def read_gemma_scope_2(path: Path) -> tuple[object, dict]:
    """A Gemma Scope 2 folder as a sae-lens JumpReLU(Skip)Transcoder or JumpReLU SAE, and
    {file: sha256}."""
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.transcoder import (JumpReLUSkipTranscoder, JumpReLUSkipTranscoderConfig,
                                          JumpReLUTranscoder, JumpReLUTranscoderConfig)

    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    w = _read(path / "params.safetensors")
    for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
        if key not in w:
            raise UserError(f"{path / 'params.safetensors'} has no tensor {key}")
    d_in, F = w["w_enc"].shape
    d_out = w["w_dec"].shape[-1]
    _shape(path, "w_dec", w["w_dec"], (F, d_out))
    hook_in = to_tl_hook_name(raw.get("hf_hook_point_in", ""))
    meta = {"hook_name": hook_in, "model_name": raw.get("model_name"), "hf_hook_name": raw.get("hf_hook_point_in")}
    state = {"W_enc": w["w_enc"], "W_dec": w["w_dec"], "b_enc": w["b_enc"], "b_dec": w["b_dec"],
             "threshold": w["threshold"]}
    transcoder = raw.get("type") == "transcoder" or raw.get("hf_hook_point_out", raw.get("hf_hook_point_in")) != \
        raw.get("hf_hook_point_in")
    if not transcoder:
        if d_in != d_out:
            raise UserError(f"{path}: an SAE must write the width it reads ({d_in} vs {d_out})")
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=F, apply_b_dec_to_input=False,
                                            metadata=SAEMetadata(**meta)))
    else:
        meta.update(hook_name_out=to_tl_hook_name(raw.get("hf_hook_point_out", "")),
                    hf_hook_name_out=raw.get("hf_hook_point_out"))
        affine = raw.get("affine_connection", "affine_skip_connection" in w)
        if affine:
            A = w.get("affine_skip_connection")
            if A is None:
                raise UserError(f"{path}: config.json says affine_connection but params.safetensors has no "
                                "affine_skip_connection")
            _shape(path, "affine_skip_connection", A, (d_in, d_out))
            state["W_skip"] = A.T  # sae-lens applies x @ W_skip.T: the official x @ A
            sae = JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
                d_in=d_in, d_sae=F, d_out=d_out, apply_b_dec_to_input=False, metadata=SAEMetadata(**meta)))
        else:
            sae = JumpReLUTranscoder(JumpReLUTranscoderConfig(
                d_in=d_in, d_sae=F, d_out=d_out, apply_b_dec_to_input=False, metadata=SAEMetadata(**meta)))
    sae.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
    return sae, folder_hashes(path)


@torch.no_grad()
def skip_orientation(repl, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Fraction of the output's variance explained with the skip as shipped (x @ A, the official
    form) and with A transposed, on calibration activations x [n, d_in], y [n, d_out]."""
    sae = repl.sae
    W = sae.W_skip.detach().clone()
    var = float((y - y.mean(0)).pow(2).sum())
    out = {}
    for name, skip in (("x @ A", W), ("x @ A.T", W.T)):
        sae.W_skip.copy_(skip)
        y_hat = sae(x.to(W.dtype)).to(y.dtype)
        out[name] = 1 - float((y - y_hat).pow(2).sum()) / var
    sae.W_skip.copy_(W)
    return out
