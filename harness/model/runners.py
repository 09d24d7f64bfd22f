"""One adapter per kind of loaded model, so the splicer never asks which kind it has.

Both run a model in pieces: the blocks below a layer (the shared clean prefix), the rest from a
residual entering a layer (a variant's tail), and the head on the final norm's output.
- HookedTransformer: its own `stop_at_layer` / `start_at_layer`, `ln_final` and `unembed`.
- TransformerBridge (any Hugging Face model): it cannot start at a layer (it delegates to the
  HF forward), so both halves run the model's own forward, rerouted (harness/model/replay.py).
"""

from __future__ import annotations

import torch

from harness.model import replay
from harness.model.replay import take_positions


class HookedRunner:
    """A HookedTransformer run in pieces with its own layer arguments."""

    splits_head = True  # tails can stop at the head's input and `head` finish them in chunks

    def __init__(self, model):
        self.model = model

    def run_to(self, tokens, attention_mask, stop: int, start: int = 0, resid=None) -> torch.Tensor:
        if resid is None:
            return self.model(tokens, stop_at_layer=stop, attention_mask=attention_mask)
        return self.model(resid, start_at_layer=start, stop_at_layer=stop, tokens=tokens,
                          attention_mask=attention_mask)

    def run_from(self, tokens, attention_mask, start: int, resid, positions=None, hidden: bool = False):
        if hidden:
            out = self.model(resid, start_at_layer=start, stop_at_layer=self.model.cfg.n_layers, tokens=tokens,
                             attention_mask=attention_mask)
            return self.model.ln_final(out) if hasattr(self.model, "ln_final") else out
        logits = self.model(resid, start_at_layer=start, tokens=tokens, attention_mask=attention_mask)
        return logits if positions is None else take_positions(logits, positions)

    def run_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(hidden)

    def starts_at_head(self) -> bool:
        return True

    def check_supported(self, layers: list[int]) -> None:
        """HookedTransformer starts at any layer by construction."""

    def parameters_module(self):
        return self.model

    def hf_model(self):
        """None: no Hugging Face model underneath (generation and tokenisation use TL's own)."""
        return None


class BridgeRunner:
    """A TransformerBridge run in pieces by rerouting the Hugging Face model's own forward."""

    def __init__(self, model):
        self.model = model

    @property
    def splits_head(self) -> bool:
        return replay.has_head_module(self.model)

    def run_to(self, tokens, attention_mask, stop: int, start: int = 0, resid=None) -> torch.Tensor:
        return replay.run_to(self.model, tokens, attention_mask, stop, start, resid)

    def run_from(self, tokens, attention_mask, start: int, resid, positions=None, hidden: bool = False):
        return replay.run_from(self.model, tokens, attention_mask, start, resid, positions, hidden)

    def run_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return replay.run_head(self.model, hidden)

    def starts_at_head(self) -> bool:
        return replay.starts_at_head(self.model)

    def check_supported(self, layers: list[int]) -> None:
        replay.check_supported(self.model, layers)

    def parameters_module(self):
        """The Hugging Face model (the bridge adds no parameters of its own)."""
        return self.model.original_model

    def hf_model(self):
        """The Hugging Face model underneath (its `generate`, its checkpoint's tokenizer)."""
        return self.model.original_model


def runner_for(kind: str, model):
    return HookedRunner(model) if kind == "hooked" else BridgeRunner(model)
