"""Text sources for the CE suite: every file kind gives the tokens computed here by hand."""

import hashlib
import json
from types import SimpleNamespace

import datasets
import pandas as pd
import pytest
import torch

from harness.text import builtin as data
from harness.text import sources
from harness.errors import UserError

PARAGRAPHS = [f"Paragraph {i}: " + " ".join(f"word{j}" for j in range(i % 7, 30 + i % 11)) for i in range(40)]


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def by_hand(tok, docs, n_seq, ctx, calib_seqs):
    """Each doc tokenised + EOS, concatenated; the first n_seq*ctx ids are evaluated; calibration
    starts at the document after the last evaluated one (SmolLM2 adds no BOS)."""
    ids = [tok(d, add_special_tokens=False).input_ids + [tok.eos_token_id] for d in docs]
    flat, n_docs = [], 0
    while len(flat) < n_seq * ctx:
        flat += ids[n_docs]
        n_docs += 1
    rest = [x for d in ids[n_docs:] for x in d]
    return (torch.tensor(flat[: n_seq * ctx]).view(n_seq, ctx), torch.tensor(rest[: calib_seqs * ctx]).view(calib_seqs, ctx),
            n_docs)


def write_all_kinds(folder, docs) -> dict:
    txt = folder / "docs.txt"
    txt.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    (folder / "docs.json").write_text(json.dumps([{"text": d} for d in docs]))
    pd.DataFrame({"text": docs, "n": range(len(docs))}).to_parquet(folder / "docs.parquet")
    pd.DataFrame({"text": docs}).to_csv(folder / "docs.csv", index=False)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder / "disk"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["unused"] * 3}),
                          "validation": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(str(folder / "dict"))
    return {"txt": (str(txt), {}), "jsonl": (str(folder / "docs.jsonl"), {}), "json": (str(folder / "docs.json"), {}),
            "parquet": (str(folder / "docs.parquet"), {}), "csv": (str(folder / "docs.csv"), {}),
            "disk": (str(folder / "disk"), {}), "dict": (str(folder / "dict"), {"split": "validation", "column": "body"})}


def test_every_file_kind_gives_the_hand_packed_tokens(tmp_path, tok):
    want, want_calib, n_docs = by_hand(tok, PARAGRAPHS, 3, 32, 2)
    for kind, (spec, kw) in write_all_kinds(tmp_path, PARAGRAPHS).items():
        src = sources.load_text_source(spec, **kw)
        tokens, calib, info = sources.tokens_for_run(src, tok, len(tok), n_seq=3, ctx=32, calib_seqs=2)
        assert torch.equal(tokens, want), kind
        assert torch.equal(calib, want_calib), kind
        assert info["n_documents"] == n_docs and info["pretokenized"] is False, kind
        assert info["tokens_sha256"] == hashlib.sha256(want.numpy().tobytes()).hexdigest()
        assert info["source"] == spec
    assert info["split"] == "validation" and info["column"] == "body"


def test_calibration_shares_no_document_with_evaluation(tmp_path, tok):
    docs = [f"Document number {i} " + "alpha beta gamma " * 5 for i in range(30)]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    src = sources.load_text_source(str(tmp_path / "d.txt"))
    tokens, calib, info = sources.tokens_for_run(src, tok, len(tok), n_seq=2, ctx=40, calib_seqs=2)
    decoded_eval, decoded_calib = tok.decode(tokens.flatten()), tok.decode(calib.flatten())
    seen = {i for i in range(30) if f"Document number {i} " in decoded_eval}
    assert max(seen) + 1 == info["n_documents"]
    assert decoded_calib.startswith(f"Document number {info['n_documents']} ")  # the next whole document
    assert not {i for i in range(30) if f"Document number {i} " in decoded_calib} & seen


def test_pretokenized_rows_used_as_is(tmp_path, tok):
    rows = [[(7 * i + j) % 1000 for j in range(50)] for i in range(6)]
    datasets.Dataset.from_dict({"input_ids": rows, "meta": ["x"] * 6}).save_to_disk(str(tmp_path / "ids"))
    src = sources.load_text_source(str(tmp_path / "ids"))
    tokens, calib, info = sources.tokens_for_run(src, tok, 1000, n_seq=4, ctx=25, calib_seqs=2)
    flat = [x for r in rows for x in r]
    assert info["pretokenized"] and info["column"] == "input_ids" and info["n_documents"] == 2
    assert tokens.flatten().tolist() == flat[:100]  # no BOS, no EOS added
    assert calib.flatten().tolist() == flat[100:150]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"tokens": r}) + "\n" for r in rows))
    tokens2, _, info2 = sources.tokens_for_run(sources.load_text_source(str(tmp_path / "t.jsonl")), tok, 1000, 4, 25, 2)
    assert torch.equal(tokens, tokens2) and info2["column"] == "tokens"


def test_token_ids_outside_vocabulary(tmp_path, tok):
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 999, 5]]}).save_to_disk(str(tmp_path / "ids"))
    src = sources.load_text_source(str(tmp_path / "ids"))
    with pytest.raises(UserError, match=r"^dataset '.*ids': token id 999 in row 1 is outside the model's "
                                        r"vocabulary \(size 500\)$"):
        sources.tokens_for_run(src, tok, 500, n_seq=1, ctx=2, calib_seqs=1)


@pytest.mark.parametrize("make,kw,match", [
    (lambda p: p / "nope.txt", {}, r"^no such file or folder: .*nope\.txt$"),
    (lambda p: p / "nope.parquet", {}, r"^no such file or folder: "),
    (lambda p: _jsonl(p), {"column": "body"}, r"^dataset '.*d\.jsonl' has no column 'body' \(it has id, text\)$"),
    (lambda p: _jsonl(p, key="content"), {}, r"has no text, input_ids or tokens column \(it has id, content\): "
                                             r"name one with --text-column$"),
    (lambda p: _jsonl(p), {"split": "test"}, r"^cannot read dataset '.*d\.jsonl' \(config None, split test\): "),
    (lambda p: _disk_dict(p), {"split": "test"}, r"^.*dd has no split 'test' \(it has train\)$"),
    (lambda p: _empty_dir(p), {}, r"is not a datasets\.save_to_disk folder"),
    (lambda p: _txt(p), {"column": "body"}, r"a \.txt file has no column 'body'"),
])
def test_bad_sources_are_one_line(tmp_path, make, kw, match):
    with pytest.raises(UserError, match=match) as err:
        sources.load_text_source(str(make(tmp_path)), **kw)
    assert "\n" not in str(err.value)


def test_too_few_tokens(tmp_path, tok):
    src = sources.load_text_source(str(_txt(tmp_path)))
    with pytest.raises(UserError, match=r"^dataset '.*a\.txt' holds \d+ tokens, 4096 needed "
                                        r"\(16 evaluated \+ 16 calibration rows of 128\)$"):
        sources.tokens_for_run(src, tok, len(tok), n_seq=16, ctx=128, calib_seqs=16)


def _jsonl(p, key="text"):
    (p / "d.jsonl").write_text("".join(json.dumps({"id": i, key: f"doc {i}"}) + "\n" for i in range(3)))
    return p / "d.jsonl"


def _disk_dict(p):
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(p / "dd"))
    return p / "dd"


def _empty_dir(p):
    (p / "empty").mkdir()
    return p / "empty"


def _txt(p):
    (p / "a.txt").write_text("one short paragraph.\n\nanother one.\n")
    return p / "a.txt"


def test_default_source():
    assert sources.default_spec("smollm2-135m", []) == sources.BUILTIN
    sae = SimpleNamespace(sae=SimpleNamespace(cfg=SimpleNamespace(metadata=SimpleNamespace(dataset_path="org/corpus"))))
    baseline = SimpleNamespace(sae=None)
    assert sources.default_spec("some/model", [baseline, sae]) == "org/corpus"
    with pytest.raises(UserError, match=r"^no default text for model 'some/model' \(its SAEs name no dataset_path\): "
                                        r"pass --dataset"):
        sources.default_spec("some/model", [baseline])


def test_builtin_is_the_offline_prose(tok):
    src = sources.open_source(None, "smollm2-135m")
    tokens, calib, info = sources.tokens_for_run(src, tok, len(tok), n_seq=4, ctx=64, calib_seqs=2)
    assert torch.equal(tokens, data.pack(tok, data.documents("eval"), 4, 64))
    assert torch.equal(calib, data.pack(tok, data.documents("train-prose"), 2, 64))
    ids = [len(tok(d, add_special_tokens=False).input_ids) + 1 for d in data.documents("eval")]
    assert sum(ids[: info["n_documents"] - 1]) < 4 * 64 <= sum(ids[: info["n_documents"]])
    assert info["source"] == "builtin" and info["tokens_sha256"] == hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
