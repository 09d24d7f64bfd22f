"""The offline text: packing into rows (hand values), and train/eval disjointness."""

import hashlib
from types import SimpleNamespace

import pytest
import torch

from harness.text import builtin as data


class CharTokenizer:
    """One token per character (id = code point); BOS=1, EOS=2; adds BOS like HF when asked."""
    bos_token_id, eos_token_id = 1, 2

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return SimpleNamespace(input_ids=([1] if add_special_tokens and self.adds_bos else []) + ids)


DOCS = ["abc", "defg", "hi"]  # stream: a b c EOS d e f g EOS h i EOS (12 tokens)


def _ids(text):
    return [ord(c) for c in text]


def test_pack_without_bos_cuts_the_eos_joined_stream():
    rows = data.pack(CharTokenizer(adds_bos=False), DOCS, n_seq=2, ctx=5)
    assert rows.dtype == torch.int64 and rows.shape == (2, 5)
    assert rows.tolist() == [_ids("abc") + [2] + _ids("d"), _ids("efg") + [2] + _ids("h")]


def test_pack_with_bos_starts_every_row_with_it():
    rows = data.pack(CharTokenizer(adds_bos=True), DOCS, n_seq=3, ctx=5)
    assert rows.shape == (3, 5)
    assert rows.tolist() == [[1] + _ids("abc") + [2], [1] + _ids("defg"), [1, 2] + _ids("hi") + [2]]
    assert (rows == 1).sum() == 3  # no BOS inside the documents (added only at row starts)


def test_pack_too_few_tokens_says_how_many():
    with pytest.raises(ValueError, match=r"^corpus holds 12 tokens, 15 needed \(3 x 5\)$"):
        data.pack(CharTokenizer(adds_bos=False), DOCS, n_seq=3, ctx=5)
    with pytest.raises(ValueError, match=r"^corpus holds 12 tokens, 16 needed \(4 x 4\)$"):
        data.pack(CharTokenizer(adds_bos=True), DOCS, n_seq=4, ctx=5)


def test_pack_with_the_embedded_tokenizer(embedded_dir):
    """SmolLM2's tokenizer adds no BOS: the rows are its tokens of each document, EOS-joined."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    docs = data.documents("eval")[:3]
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    rows = data.pack(tok, docs, n_seq=4, ctx=32)
    assert rows.tolist() == [stream[i * 32:(i + 1) * 32] for i in range(4)]
    assert tok.bos_token_id not in rows.tolist()[0]


def _bucket(chunk: str) -> int:
    return int(hashlib.sha256(chunk.encode()).hexdigest()[:8], 16) % 100


def test_train_and_eval_chunks_are_disjoint_and_hash_assigned():
    """A chunk goes to eval iff the first 8 hex digits of its SHA-256, mod 100, are below 20;
    eval chunks keep only some of their paragraphs; the split is the same on every call, and no
    eval chunk is in any training split."""
    from pydoc_data.topics import topics

    chunks = [c for key in sorted(topics) for c in data.chunks(topics[key])]
    assert "".join(chunks).replace("\n", "") == "".join(topics[k] for k in sorted(topics)).replace("\n", "")
    train, evaluation = data.prose_split()
    assert train == [c for c in chunks if _bucket(c) >= 20]
    eval_paragraphs = {p for c in chunks if _bucket(c) < 20 for p in c.split("\n\n")}
    assert all(set(c.split("\n\n")) <= eval_paragraphs for c in evaluation)
    assert set(train).isdisjoint(evaluation)
    assert 0.1 < sum(_bucket(c) < 20 for c in chunks) / len(chunks) < 0.3
    assert data.prose_split() == (train, evaluation)
    assert data.documents("train-prose") == train
    assert set(data.documents("train")).isdisjoint(evaluation)
    assert data.documents("eval") == evaluation
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.documents("test")


def test_no_eval_paragraph_occurs_in_the_training_text():
    """pydoc repeats paragraphs under several topics; none of the evaluated ones may appear
    verbatim in what SAEs are trained and baselines calibrated on (train prose + stdlib)."""
    _, evaluation = data.prose_split()
    training = "\n\n".join(data.documents("train"))
    paragraphs = [p.strip() for chunk in evaluation for p in chunk.split("\n\n") if len(p.strip()) > 40]
    assert len(paragraphs) > 200
    assert [p[:60] for p in paragraphs if p in training] == []


def test_evaluated_tokens_share_almost_no_16_grams_with_training_prose(embedded_dir):
    """Token-level check of the default run's 64 x 128 evaluated tokens: the share of them that
    lies inside a 16-token window also found in the training prose. A chunk-level split alone
    gave 40%; what remains (about 2.5%) are short shared phrases such as cited PEP titles."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    rows = data.pack(tok, data.documents("eval"), 64, 128).tolist()
    stream = []
    for doc in data.documents("train-prose"):
        stream += tok.encode(doc, add_special_tokens=False) + [tok.eos_token_id]
    n = 16
    windows = {tuple(stream[i:i + n]) for i in range(len(stream) - n + 1)}
    covered = np.zeros((64, 128), bool)
    for r, row in enumerate(rows):
        for i in range(128 - n + 1):
            if tuple(row[i:i + n]) in windows:
                covered[r, i:i + n] = True
    assert covered.mean() < 0.05
