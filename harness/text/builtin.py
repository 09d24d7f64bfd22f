"""The offline text: English prose and Python source that ship with every CPython.

- prose: `pydoc_data.topics` (the help() topics, ~465 kB of documentation English);
- code: the standard library's top-level `*.py` modules, for more SAE-training tokens.

The prose is cut into paragraph-aligned chunks and each chunk goes to `train` or `eval` by a
hash of its text, so the split is deterministic and does not depend on the CPython patch
release's dict order. pydoc repeats text under several topics (the `in` operator appears in
"in" and in "comparisons", and so on), so a chunk-level split alone left a third of the eval
text verbatim in the training text; eval paragraphs whose lines all occur in the training text
(train prose and the stdlib source) are therefore dropped. Evaluation uses prose only; SAE
training and calibration (mean / PCA baselines) use the train split, so no evaluated paragraph
is seen while fitting (short shared phrases, such as a PEP title cited in two "See also" lists,
remain).
"""

from __future__ import annotations

import hashlib
import re
import sysconfig
from pathlib import Path

import torch

EVAL_PERCENT = 20
CHUNK_CHARS = 2000


def chunks(text: str, size: int = CHUNK_CHARS, separator: str = r"\n\n") -> list[str]:
    """Paragraph-aligned pieces of about `size` characters (paragraphs split on the regex
    `separator`, joined back with a blank line); a paragraph longer than `size` stays whole."""
    out, current = [], ""
    for para in re.split(separator, text):
        if current and len(current) + len(para) > size:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        out.append(current)
    return out


def _bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 100


def prose_split() -> tuple[list[str], list[str]]:
    """(train, eval) chunks of the pydoc topics."""
    from pydoc_data.topics import topics

    train, evaluation = [], []
    for key in sorted(topics):
        for chunk in chunks(topics[key]):
            (evaluation if _bucket(chunk) < EVAL_PERCENT else train).append(chunk)
    return train, _unseen(evaluation, train + stdlib_sources())


def _unseen(chunks: list[str], training: list[str]) -> list[str]:
    """Each chunk without the paragraphs whose lines (stripped) all occur in `training`."""
    seen = {line.strip() for text in training for line in text.splitlines()}
    out = []
    for chunk in chunks:
        kept = [p for p in chunk.split("\n\n") if not all(line.strip() in seen for line in p.splitlines())]
        if kept:
            out.append("\n\n".join(kept))
    return out


def stdlib_sources() -> list[str]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(lib.glob("*.py"))]


def documents(split: str) -> list[str]:
    train, evaluation = prose_split()
    if split == "eval":
        return evaluation
    if split == "train":
        return train + stdlib_sources()
    if split == "train-prose":
        return train
    raise ValueError(f"unknown split {split!r}")


def pack(tokenizer, docs: list[str], n_seq: int, ctx: int) -> torch.Tensor:
    """Tokenise docs, join them with EOS, cut into rows of `ctx` tokens: [n_seq, ctx] int64.

    A leading BOS is added to each row only where the tokenizer itself adds one (SmolLM2's
    does not). Raises if the docs hold fewer than n_seq * ctx tokens.
    """
    bos = tokenizer("a").input_ids[0] == tokenizer.bos_token_id if tokenizer.bos_token_id is not None else False
    body = ctx - 1 if bos else ctx
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    need = n_seq * body
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"corpus holds {len(stream)} tokens, {need} needed ({n_seq} x {body})")
    rows = torch.tensor(stream[:need], dtype=torch.long).view(n_seq, body)
    if bos:
        rows = torch.cat([torch.full((n_seq, 1), tokenizer.bos_token_id), rows], dim=1)
    return rows
