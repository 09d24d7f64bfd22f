"""The offline text: packing into rows (hand values), and train/eval disjointness."""

import hashlib
from types import SimpleNamespace

import pytest
import torch

from harness import data


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


def test_train_and_eval_chunks_are_disjoint_and_hash_assigned():
    """Chunks go to eval iff the first 8 hex digits of their SHA-256, mod 100, are below 20;
    the split is the same on every call, and no eval chunk is in any training split."""
    train, evaluation = data.prose_split()
    assert set(train).isdisjoint(evaluation)
    for chunk in train + evaluation:
        in_eval = int(hashlib.sha256(chunk.encode()).hexdigest()[:8], 16) % 100 < 20
        assert in_eval == (chunk in evaluation)
    assert 0.1 < len(evaluation) / (len(train) + len(evaluation)) < 0.3
    assert data.prose_split() == (train, evaluation)
    assert data.documents("train-prose") == train
    assert set(data.documents("train")).isdisjoint(evaluation)
    assert data.documents("eval") == evaluation
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.documents("test")
