"""Talk to the degraded model: every variant continues the same prompt, side by side.

For each prompt the clean model and every variant (SAEs, joint splices, baselines) generate
(`harness.splice.generate`), and each variant is also scored on the CLEAN continuation: its mean
log-probability per token (how surprised the degraded model is by what the clean model says)
and the mean KL(p_clean || p_variant) along it. `first_divergence` is the index of the first
token where a variant's own continuation departs from the clean one.

Also the built-in prompt set the main job writes as generations.md / generations.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.files import write_json
from harness.splice.generate import Sampling, first_divergence, generate, score_continuation
from harness.model.loading import LoadedModel
from harness.errors import UserError
from harness.splice.variants import CLEAN, Variant

# (kind, prompt, chat): one of each kind of text, short enough for a 135M model.
BUILTIN_PROMPTS = [
    ("fact", "The capital of France is", False),
    ("arithmetic", "Question: What is 12 + 7?\nAnswer:", False),
    ("code", "def is_even(n):\n    \"\"\"Return True if n is even.\"\"\"\n", False),
    ("instruction", "Give me one tip for sleeping better.", True),
    ("list", "Name three fruits that are red.", True),
    ("translation", "Translate to French: The cat is sleeping on the sofa.", True),
    ("story", "Once upon a time, in a small village by the sea,", False),
    ("python docs", "In Python, the `with` statement is used to", False),
]


def with_clean(variants: list[Variant]) -> list[Variant]:
    """The clean model first (the reference every variant is compared with), once."""
    return [Variant(CLEAN, {})] + [v for v in variants if v.parts]


def encode(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt: as is, or (chat) a message list through the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat: this model's tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    if not prompt.strip():
        raise UserError("empty prompt")
    return tokenizer(prompt).input_ids


def talk_one(lm: LoadedModel, variants: list[Variant], prompt_ids: list[int], tokenizer, max_new_tokens: int,
             sampling: Sampling | None = None, keep_first: bool = True) -> dict:
    """{variant name: {text, token_ids, first_divergence, clean_logprob, kl}}, clean first."""
    variants = with_clean(variants)
    rows = generate(lm, variants, prompt_ids, max_new_tokens, sampling, tokenizer, keep_first=keep_first)
    clean = rows[0]
    scores = score_continuation(lm, variants, prompt_ids, clean, keep_first)
    out = {}
    for v, ids in zip(variants, rows):
        out[v.name] = {"text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
                       "first_divergence": None if not v.parts else first_divergence(clean, ids),
                       "clean_logprob": scores[v.name]["clean_logprob"], "kl": scores[v.name]["kl"]}
    return out


def read_prompts(path: str) -> list[str]:
    """One prompt per non-empty line; a literal backslash-n in a line stands for a newline."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e.__class__.__name__}: {e}") from None
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompt")
    return prompts


# -- rendering ------------------------------------------------------------------------

def split_at_divergence(tokenizer, ids: list[int], at: int | None) -> tuple[str, str, str]:
    """(text before the divergent token, the divergent token, the rest), decoded by prefixes
    so that multi-token characters are not cut."""
    def dec(x):
        return tokenizer.decode(x, skip_special_tokens=True)
    full = dec(ids)
    if at is None or at >= len(ids):
        return full, "", ""
    before, upto = dec(ids[:at]), dec(ids[:at + 1])
    return before, upto[len(before):], full[len(upto):]


def panels(result: dict, tokenizer):
    """rich Panels, one per variant, the first divergent token marked."""
    from rich.panel import Panel
    from rich.text import Text

    out = []
    for name, r in result.items():
        before, token, rest = split_at_divergence(tokenizer, r["token_ids"], r["first_divergence"])
        where = "same as clean" if r["first_divergence"] is None else f"departs at token {r['first_divergence']}"
        stats = f"logp/tok {r['clean_logprob']:.2f}" + ("" if name == "clean" else f", KL {r['kl']:.3f}\n{where}")
        text = Text(stats + "\n", style="dim")
        text.append(before)
        if r["first_divergence"] is not None:
            text.append(token or "<end>", style="bold white on red")
            text.append(rest, style="yellow")
        out.append(Panel(text, title=name, width=48))
    return out


def print_result(console, prompt: str, result: dict, tokenizer) -> None:
    from rich.columns import Columns
    from rich.rule import Rule

    console.print(Rule(repr(prompt) if len(prompt) < 80 else repr(prompt[:77] + "...")))
    console.print(Columns(panels(result, tokenizer)))


def markdown(records: list[dict], tokenizer) -> str:
    """generations.md: one table per prompt, the first divergent token in bold brackets."""
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "⏎ ")
    lines = ["# Generations", "",
             "Each variant continues the same prompt (greedy). `departs at` is the first token where it leaves the "
             "clean continuation (marked **[so]**); `logp/tok` is the mean log-probability the variant gives the "
             "CLEAN continuation, `KL` the mean KL(clean || variant) along it (nats).", ""]
    for rec in records:
        lines += [f"## {rec.get('kind', 'prompt')}: `{cell(rec['prompt'])}`" + (" (chat template)" if rec.get("chat") else ""),
                  "", "| variant | departs at | logp/tok | KL | continuation |", "|---|---:|---:|---:|---|"]
        for name, r in rec["variants"].items():
            before, token, rest = split_at_divergence(tokenizer, r["token_ids"], r["first_divergence"])
            text = cell(before) + (f"**[{cell(token) or '<end>'}]**" + cell(rest) if r["first_divergence"] is not None else "")
            at = "-" if r["first_divergence"] is None else str(r["first_divergence"])
            lines.append(f"| {name} | {at} | {r['clean_logprob']:.3f} | {r['kl']:.4f} | {text} |")
        lines.append("")
    return "\n".join(lines)


def write_generations(folder: Path, lm: LoadedModel, variants: list[Variant], tokenizer=None,
                      prompts=BUILTIN_PROMPTS, max_new_tokens: int = 32, keep_first: bool = True,
                      progress=None) -> list[dict]:
    """The main job's generations.json / generations.md for the built-in prompts (greedy)."""
    from harness.lmeval.backend import hf_tokenizer

    tokenizer = tokenizer or hf_tokenizer(lm)
    records = []
    for kind, prompt, chat in prompts:
        chat = chat and bool(getattr(tokenizer, "chat_template", None))
        ids = encode(tokenizer, prompt, chat)
        result = talk_one(lm, variants, ids, tokenizer, max_new_tokens, keep_first=keep_first)
        records.append({"kind": kind, "prompt": prompt, "chat": chat, "variants": result})
        if progress is not None:
            progress(len(records))
    write_json(folder / "generations.json", {"max_new_tokens": max_new_tokens, "sampling": "greedy",
                                             "prompts": records})
    (folder / "generations.md").write_text(markdown(records, tokenizer))
    return records


# -- the `talk` command ---------------------------------------------------------------

def check_options(prompts: list[str], prompt_file: str | None, max_new_tokens: int, temperature: float,
                  top_p: float) -> list[str]:
    """Validate before loading anything; returns the prompts to run (none = interactive)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive (got {max_new_tokens})")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if prompts and prompt_file:
        raise UserError("give --prompt or --prompts, not both")
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt")
    return read_prompts(prompt_file) if prompt_file else list(prompts)


def run_talk(model: str, saes: list[str], prompts: list[str], chat: bool, max_new_tokens: int,
             sampling: Sampling, as_json: bool, joint: bool = False, device: str = "cpu",
             dtype: str = "float32", ask=None, echo=print, console=None) -> list[dict]:
    """Load the model and variants, then answer every prompt (or, with none, prompts read
    from `ask()` until it returns None). Returns the per-prompt records."""
    import time

    from harness.lmeval.backend import hf_tokenizer
    from harness.splice.session import prepare

    session = prepare(model, saes, joint=joint, device=device, dtype=dtype)
    lm, variants = session.lm, session.variants
    tokenizer = hf_tokenizer(lm)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--chat: the tokenizer of {model} has no chat template")
    history: list[dict] = []
    records = []
    queue = iter(prompts) if prompts else iter(ask, None)
    for prompt in queue:
        if not prompt.strip():
            continue  # interactive: an empty line asks again
        messages = history + [{"role": "user", "content": prompt}]
        ids = encode(tokenizer, messages if chat else prompt, chat)
        t0 = time.perf_counter()
        result = talk_one(lm, variants, ids, tokenizer, max_new_tokens, sampling)
        seconds = time.perf_counter() - t0
        record = {"prompt": prompt, "variants": result}
        records.append(record)
        if as_json:
            echo(json.dumps(record))
        else:
            print_result(console, prompt, result, tokenizer)
            n = sum(len(r["token_ids"]) for r in result.values())
            console.print(f"[dim]{n} tokens from {len(result)} variants in {seconds:.1f} s "
                          f"({n / seconds:.1f} tokens/s, scoring included)[/dim]")
        if chat and not prompts:  # the conversation goes on with the clean model's answer
            history = messages + [{"role": "assistant", "content": result["clean"]["text"]}]
    return records
