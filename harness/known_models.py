"""Training tokens D of models a user is likely to bring, each with where the figure comes from.

The fixed-tokens compute-equivalent (N_eff/N at the model's own D: the parameters a model
trained on as many tokens would need to reach the spliced loss) needs D. N is counted on the
loaded model; D is a published fact or nothing: where no figure is published the answer is
"unknown" and the user supplies it with --train-tokens (GPT-2's token count, for one, was never
published). Names match on the last path component of a hub id, TransformerLens name or local
folder, case-insensitively, after dropping suffixes that name a variant trained on the same
tokens (-instruct, -it, -deduped, ...): an instruction-tuned model's pre-training D is its
base's (the fine-tuning tokens are a rounding error next to it).
"""

from __future__ import annotations

from dataclasses import dataclass

SMOLLM2 = "SmolLM2 model cards (HuggingFaceTB/SmolLM2-*), 'Training' section"
PYTHIA = "Biderman et al. 2023, Pythia: every model sees 299,892,736,000 tokens (143,000 steps of 2M)"
GEMMA2 = "Gemma Team 2024, Gemma 2 technical report: 2B on 2T, 9B on 8T, 27B on 13T tokens"
GEMMA3 = ("Gemma Team 2025, Gemma 3 technical report (1B 2T, 4B 4T, 12B 12T, 27B 14T tokens); "
          "270M: Google's Gemma 3 270M model card (6T tokens)")
LLAMA3 = "Meta, Llama 3 / 3.1 model cards: pre-trained on ~15T tokens"
LLAMA32 = "Meta, Llama 3.2 model card: 1B and 3B pre-trained on up to 9T tokens"


@dataclass(frozen=True)
class Known:
    tokens: float | None  # None: not published
    source: str


KNOWN = {
    "smollm2-135m": Known(2e12, SMOLLM2), "smollm2-360m": Known(4e12, SMOLLM2),
    "smollm2-1.7b": Known(11e12, SMOLLM2),
    **{f"pythia-{s}": Known(299_892_736_000, PYTHIA)
       for s in ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")},
    "gemma-2-2b": Known(2e12, GEMMA2), "gemma-2-9b": Known(8e12, GEMMA2), "gemma-2-27b": Known(13e12, GEMMA2),
    "gemma-3-270m": Known(6e12, GEMMA3), "gemma-3-1b": Known(2e12, GEMMA3), "gemma-3-4b": Known(4e12, GEMMA3),
    "gemma-3-12b": Known(12e12, GEMMA3), "gemma-3-27b": Known(14e12, GEMMA3),
    "meta-llama-3-8b": Known(15e12, LLAMA3), "meta-llama-3-70b": Known(15e12, LLAMA3),
    "llama-3.1-8b": Known(15e12, LLAMA3), "llama-3.1-70b": Known(15e12, LLAMA3),
    "llama-3.1-405b": Known(15e12, LLAMA3), "llama-3.2-1b": Known(9e12, LLAMA32),
    "llama-3.2-3b": Known(9e12, LLAMA32),
    **{name: Known(None, "OpenAI did not publish GPT-2's training token count")
       for name in ("gpt2", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl")},
}
ALIASES = {"meta-llama-3.1-8b": "llama-3.1-8b", "meta-llama-3.1-70b": "llama-3.1-70b", "llama-3-8b": "meta-llama-3-8b",
           "llama-3-70b": "meta-llama-3-70b", "gpt2-small": "gpt2"}
VARIANT_SUFFIXES = ("-instruct", "-it", "-pt", "-deduped", "-hf", "-chat")


def lookup(name: str) -> Known | None:
    """The table's entry for a model name, hub id or folder (None when it has none)."""
    key = name.rstrip("/").rsplit("/", 1)[-1].lower()
    for _ in range(3):
        key = ALIASES.get(key, key)
        if key in KNOWN:
            return KNOWN[key]
        stripped = next((key[: -len(s)] for s in VARIANT_SUFFIXES if key.endswith(s)), None)
        if stripped is None:
            return None
        key = stripped
    return None


def training_tokens(names: list[str], given: float | None = None) -> dict:
    """D for the run: the user's figure, else the first of `names` the table knows, else
    unknown; always with where it came from."""
    if given is not None:
        return {"tokens": float(given), "source": "--train-tokens"}
    for name in names:
        known = lookup(name) if name else None
        if known is not None:
            return {"tokens": known.tokens, "source": known.source, "matched": name}
    return {"tokens": None, "source": "unknown: pass --train-tokens (the model's pre-training tokens) for the "
                                      "fixed-tokens reading"}
