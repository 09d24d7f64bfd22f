#!/usr/bin/env python
"""The family's text: software documentation prose from Debian's documentation packages.

    .venv/bin/python scripts/family_corpus.py      # build (or reuse) the cache and print its summary

The miniature family (scripts/train_family.py) needs at least 10M unique tokens of one
distribution, trained for at most 4 epochs (Muennighoff et al. 2023), with a held-out part of
the same mixture for evaluation. The built-in text (pydoc topics + stdlib source) has 1.4M
tokens, mostly code. Debian's documentation packages hold far more English technical prose,
close to the pydoc text the CE suite evaluates on:

    python3.11-doc     the Python manuals' reStructuredText sources (_sources/*.txt)
    perl-doc           the Perl manuals (POD)
    postgresql-doc-15  the PostgreSQL manual (HTML, tags stripped)
    git-doc            Git's manual pages (AsciiDoc)
    python-scipy-doc   SciPy's manual (HTML, tags stripped)

Each package is fetched with `apt-get download` (the .deb only, nothing installed) and read with
`dpkg-deb -x`. A document is one source file; identical documents (git-doc ships each page
twice) are kept once. Documents are cut into paragraph-aligned chunks of about 4,000
characters and each chunk goes to `eval` when a hash of its text falls in the lowest
EVAL_PER_MILLE, else to `train`, so the split is deterministic and both splits are the same
mixture. The .deb hashes and the text hashes are recorded in corpus.json.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.text.builtin import chunks as paragraph_chunks  # noqa: E402

PACKAGES = {
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources", "*.txt", "text"),
    "perl-doc": ("usr/share/perl", "*.pod", "text"),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html", "*.html", "html"),
    "git-doc": ("usr/share/doc/git-doc", "*.txt", "text"),
    "python-scipy-doc": ("usr/share/doc/python-scipy-doc/html", "*.html", "html"),
}
CHUNK_CHARS = 4000
EVAL_PER_MILLE = 12  # ~1.2% of the text: ~150k tokens held out
CACHE = Path.home() / ".cache" / "sae-harness" / "family-corpus"


def _strip_html(page: str) -> str:
    """The page's text: its <main> element where it has one (SciPy's pages repeat a navigation
    sidebar outside it), else its body; tags removed, entities decoded."""
    main = re.search(r"(?is)<main[^>]*>(.*)</main>", page)
    page = main.group(1) if main else page
    page = re.sub(r"(?is)<(script|style|head|nav)[^>]*>.*?</\1>", "", page)
    page = re.sub(r"(?s)<[^>]+>", "", page)
    page = html.unescape(page)
    page = re.sub(r"[ \t]+", " ", page)
    return re.sub(r"\n\s*\n+", "\n\n", page).strip()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch(package: str, work: Path) -> tuple[Path, Path]:
    """The package's .deb (downloaded, not installed) and the folder it was unpacked into."""
    subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{package}_*.deb"))
    root = work / package
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return deb, root


def build(cache: Path = CACHE) -> dict:
    """Fetch the packages, extract the documents, split, and write train.txt / eval.txt (chunks
    separated by a form feed) and corpus.json into `cache`. Reuses a complete cache."""
    if (cache / "corpus.json").exists():
        return json.loads((cache / "corpus.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "eval": []}
    sources, seen = {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        for package, (sub, pattern, kind) in PACKAGES.items():
            deb, root = _fetch(package, Path(tmp))
            files = sorted((root / sub).rglob(pattern))
            chars = kept = 0
            for f in files:
                text = f.read_text(encoding="utf-8", errors="replace")
                text = _strip_html(text) if kind == "html" else text.strip()
                digest = hashlib.sha256(text.encode()).digest()
                if len(text) < 200 or digest in seen:
                    continue
                seen.add(digest)
                kept += 1
                chars += len(text)
                for chunk in paragraph_chunks(text, CHUNK_CHARS, r"\n\s*\n"):
                    bucket = int(hashlib.sha256(chunk.encode()).hexdigest()[:8], 16) % 1000
                    splits["eval" if bucket < EVAL_PER_MILLE else "train"].append(chunk)
            sources[package] = {"deb": deb.name, "deb_sha256": _sha256(deb), "files": len(files),
                                "documents": kept, "chars": chars}
            print(f"{package}: {kept} documents, {chars / 1e6:.1f}M characters", file=sys.stderr)
    info = {"sources": sources, "chunk_chars": CHUNK_CHARS, "eval_per_mille": EVAL_PER_MILLE}
    for name, chunks in splits.items():
        body = "\f".join(chunks)
        (cache / f"{name}.txt").write_text(body)
        info[name] = {"chunks": len(chunks), "chars": len(body),
                      "sha256": hashlib.sha256(body.encode()).hexdigest()}
    (cache / "corpus.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def documents(split: str, cache: Path = CACHE) -> list[str]:
    build(cache)
    return (cache / f"{split}.txt").read_text().split("\f")


if __name__ == "__main__":
    print(json.dumps(build(), indent=1))
