"""Where the CE suite's tokens come from: the built-in prose or any dataset named by --dataset.

A source is one of
- a Hugging Face dataset id, streamed through `datasets` (nothing is downloaded in full);
- a local `.txt` file (one document per paragraph), `.jsonl`/`.json`, `.parquet` or `.csv` file
  (read with `datasets`' own builders, streamed), or a `datasets.save_to_disk` folder;
- pre-tokenised data: a column holding lists of token ids (`input_ids` or `tokens`), used as
  is (no tokenizer, no added BOS/EOS), after checking every id is inside the vocabulary.

Without --dataset the embedded default reads the built-in prose (harness/text/builtin.py), and any
other model the first SAE's own `dataset_path` from its sae-lens config, as sae-lens'
run_evals does; failing both, the user is asked for --dataset. `--dataset builtin` picks the
built-in prose for any model.

The evaluated tokens are the first n_seq rows packed from the source, in its order; the
calibration rows (mean / PCA baselines) are packed from the documents that follow, so they
never share a token with the evaluated ones.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.model.loading import EMBEDDED_DEFAULT
from harness.errors import UserError

TOKEN_COLUMNS = ("input_ids", "tokens")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
BUILTIN = "builtin"


@dataclass
class TextRequest:
    """What the user asked for: --dataset (None = the default), --dataset-config,
    --dataset-split, --text-column (None = text, else input_ids / tokens)."""
    dataset: str | None = None
    config: str | None = None
    split: str | None = "train"
    column: str | None = None


@dataclass
class TextSource:
    spec: str
    kind: str  # builtin | hf | txt | json | parquet | csv | disk
    config: str | None
    split: str | None
    column: str | None
    rows: Iterable  # documents (str) or token-id lists, in source order
    pretokenized: bool = False

    def describe(self) -> dict:
        return {"source": self.spec, "kind": self.kind, "config": self.config, "split": self.split,
                "column": self.column, "pretokenized": self.pretokenized}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_text_source(spec: str, config: str | None = None, split: str | None = "train",
                     column: str | None = None) -> TextSource:
    """Open a source lazily. `column` None = `text`, else the first of input_ids / tokens.

    Bad input (no such file, dataset, config, split or column) is a one-line UserError."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".txt":
        if column not in (None, "text"):
            raise UserError(f"{spec}: a .txt file has no column {column!r} (one document per paragraph)")
        if split not in (None, "train"):
            raise UserError(f"{spec}: a .txt file has no split {split!r} (only train)")
        return TextSource(str(path), "txt", None, "train", "text", _paragraphs(path))
    if path.is_file() and path.suffix in FILE_BUILDERS:
        return _from_datasets(str(path), FILE_BUILDERS[path.suffix], None, split, column,
                              builder=FILE_BUILDERS[path.suffix], data_files=str(path))
    if path.is_dir():
        return _from_disk(path, split, column)
    check_local(spec)
    return _from_datasets(spec, "hf", config, split, column, builder=spec)


def check_local(spec: str | None) -> None:
    """A --dataset that names a local file or folder must exist: checked before any model work
    (a hub id is checked when it is opened)."""
    if not spec or spec == BUILTIN:
        return
    path = Path(spec).expanduser()
    if not path.exists() and (path.suffix in (".txt", *FILE_BUILDERS) or spec.startswith((".", "/", "~"))):
        raise UserError(f"no such file or folder: {spec}")


def _paragraphs(path: Path) -> Iterator[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip())


def _from_datasets(spec, kind, config, split, column, builder, data_files=None) -> TextSource:
    import datasets

    split = split or "train"
    try:
        stream = datasets.load_dataset(builder, name=config, data_files=data_files, split=split, streaming=True)
        first = next(iter(stream), None)
    except Exception as e:  # not found, no such config/split, unreadable file: all one line
        raise UserError(f"cannot read dataset {spec!r} (config {config}, split {split}): {_one_line(e)}") from None
    if first is None:
        raise UserError(f"dataset {spec!r} (split {split}) is empty")
    column, pretok = _pick_column(spec, first, column)
    return TextSource(spec, kind, config, split, column, (row[column] for row in stream), pretok)


def _from_disk(path: Path, split, column) -> TextSource:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a datasets.save_to_disk folder: {_one_line(e)}") from None
    if isinstance(data, datasets.DatasetDict):
        split = split or "train"
        if split not in data:
            raise UserError(f"{path} has no split {split!r} (it has {', '.join(data)})")
        data = data[split]
    else:
        split = None  # a single saved Dataset has no split names
    if len(data) == 0:
        raise UserError(f"dataset {path} is empty")
    column, pretok = _pick_column(str(path), data[0], column)
    return TextSource(str(path), "disk", None, split, column, (row[column] for row in data), pretok)


def _pick_column(spec: str, first: dict, column: str | None) -> tuple[str, bool]:
    """The column to read and whether it holds token ids (decided by its values, not its name)."""
    if column is None:
        column = next((c for c in ("text", *TOKEN_COLUMNS) if c in first), None)
        if column is None:
            raise UserError(f"dataset {spec!r} has no text, input_ids or tokens column (it has "
                            f"{', '.join(first)}): name one with --text-column")
    elif column not in first:
        raise UserError(f"dataset {spec!r} has no column {column!r} (it has {', '.join(first)})")
    value = first[column]
    if isinstance(value, str):
        return column, False
    if hasattr(value, "__len__") and all(isinstance(x, int) for x in list(value)[:8]):
        return column, True
    raise UserError(f"dataset {spec!r}: column {column!r} holds neither text nor token ids")


# ---------------------------------------------------------------- default source

def default_spec(model_spec: str, repls=()) -> str:
    """What to read without --dataset: built-in prose for the embedded default, else the first
    SAE's own training dataset (sae-lens cfg `dataset_path`), else a one-line error."""
    if model_spec == EMBEDDED_DEFAULT:
        return BUILTIN
    for r in repls:
        sae = getattr(r, "sae", None)
        path = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "dataset_path", None)
        if path:
            return path
    raise UserError(f"no default text for model {model_spec!r} (its SAEs name no dataset_path): pass --dataset "
                    "(a Hugging Face dataset id, a .txt/.jsonl/.json/.parquet/.csv file or a save_to_disk folder)")


# ---------------------------------------------------------------- tokens

def _adds_bos(tokenizer) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[0] == tokenizer.bos_token_id


def _id_lists(source: TextSource, tokenizer, vocab_size: int) -> Iterator[list[int]]:
    """Each document as token ids: text tokenised without special tokens and followed by EOS
    (as harness.text.builtin.pack does); pre-tokenised rows as they are, after the vocabulary check."""
    eos = tokenizer.eos_token_id
    for i, row in enumerate(source.rows):
        if not source.pretokenized:
            yield tokenizer(row, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
            continue
        ids = [int(x) for x in row]
        bad = next((x for x in ids if not 0 <= x < vocab_size), None)
        if bad is not None:
            raise UserError(f"dataset {source.spec!r}: token id {bad} in row {i} is outside the model's "
                            f"vocabulary (size {vocab_size})")
        yield ids


def tokens_for_run(source: TextSource, tokenizer, vocab_size: int, n_seq: int, ctx: int,
                   calib_seqs: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(evaluated [n_seq, ctx], calibration [calib_seqs, ctx], provenance) from one source.

    Rows are cut from the concatenated documents; text rows start with BOS where the tokenizer
    adds one. Calibration rows come from the documents after the last evaluated one, so no
    document feeds both. Provenance: source, split, column, documents, sha256 of the ids."""
    if source.kind == BUILTIN:
        return _check_vocab(*_builtin_tokens(tokenizer, n_seq, ctx, calib_seqs), vocab_size)
    bos = not source.pretokenized and _adds_bos(tokenizer)
    body = ctx - 1 if bos else ctx
    docs = _id_lists(source, tokenizer, vocab_size)
    evaluated, n_docs = _take(docs, n_seq * body)
    calibration, n_calib_docs = _take(docs, calib_seqs * body)
    have, need = len(evaluated) + len(calibration), (n_seq + calib_seqs) * body
    if have < need:
        raise UserError(f"dataset {source.spec!r} holds {have} tokens, {need} needed "
                        f"({n_seq} evaluated + {calib_seqs} calibration rows of {body})")
    tokens, calib = _rows(evaluated, n_seq, body, tokenizer if bos else None), \
        _rows(calibration, calib_seqs, body, tokenizer if bos else None)
    info = source.describe() | {
        "n_documents": n_docs, "calibration_documents": n_calib_docs,
        "calibration": f"{calib_seqs} x {ctx} tokens from the documents after the evaluated ones",
        "tokens_sha256": sha256_tokens(tokens)}
    return _check_vocab(tokens, calib, info, vocab_size)


def _check_vocab(tokens, calib, info, vocab_size: int):
    """Refuse text whose ids the model cannot embed (a random model with a vocabulary smaller
    than its tokenizer's)."""
    top = max([int(t.max()) for t in (tokens, calib) if t is not None and t.numel()] or [0])
    if top >= vocab_size:
        raise UserError(f"the tokenizer gives id {top}, outside the model's vocabulary of {vocab_size}: "
                        "this model takes random token ids only (e.g. sae-harness bench)")
    return tokens, calib, info


def _take(docs: Iterator[list[int]], need: int) -> tuple[list[int], int]:
    """Whole documents from the iterator until `need` ids are there (the last one cut)."""
    out, n = [], 0
    if need <= 0:
        return out, n
    for ids in docs:
        out.extend(ids)
        n += 1
        if len(out) >= need:
            break
    return out[:need], n


def _rows(ids: list[int], n: int, body: int, bos_tokenizer) -> torch.Tensor:
    rows = torch.tensor(ids, dtype=torch.long).view(n, body)
    if bos_tokenizer is not None:
        rows = torch.cat([torch.full((n, 1), bos_tokenizer.bos_token_id), rows], dim=1)
    return rows


def _builtin_tokens(tokenizer, n_seq: int, ctx: int, calib_seqs: int):
    from harness.text import builtin as data

    try:
        evaluation = data.documents("eval")
        tokens = data.pack(tokenizer, evaluation, n_seq, ctx)
        calib = data.pack(tokenizer, data.documents("train-prose"), calib_seqs, ctx)
    except ValueError as e:
        raise UserError(str(e)) from None
    used = _documents_used(tokenizer, evaluation, n_seq * (ctx - 1 if _adds_bos(tokenizer) else ctx))
    return tokens, calib, {"source": BUILTIN, "kind": BUILTIN, "config": None, "split": "eval", "column": None,
                           "pretokenized": False, "n_documents": used,
                           "description": "offline pydoc topics, eval split (harness/text/builtin.py)",
                           "calibration": f"{calib_seqs} x {ctx} tokens of the train-prose split",
                           "tokens_sha256": sha256_tokens(tokens)}


def _documents_used(tokenizer, docs: list[str], n_tokens: int) -> int:
    """How many of the docs data.pack drew on for n_tokens ids (each doc + its EOS)."""
    total = 0
    for i, doc in enumerate(docs, 1):
        total += len(tokenizer(doc, add_special_tokens=False).input_ids) + 1
        if total >= n_tokens:
            return i
    return len(docs)


def sha256_tokens(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()


def open_source(dataset: str | None, model_spec: str, repls=(), config: str | None = None,
                split: str | None = "train", column: str | None = None) -> TextSource:
    """--dataset (or the default for this model and these SAEs) as an open TextSource."""
    spec = dataset or default_spec(model_spec, repls)
    if spec == BUILTIN:
        return TextSource(BUILTIN, BUILTIN, None, "eval", None, ())
    return load_text_source(spec, config, split, column)
