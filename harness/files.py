"""Writing files so that a reader never sees half of one: write beside the target under a
temporary name, then rename over it (atomic on one file system). Every file a run writes goes
through here."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


def replace_via(path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) with a temporary path in the target's folder, then move it onto `path`;
    on any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_atomic(path, data: str | bytes) -> Path:
    """Text (UTF-8, newlines as given) or bytes, flushed to disk before the rename."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())

    return replace_via(path, write)


def strict(obj):
    """`obj` with every NaN or infinity replaced by None (null): strict JSON readers
    (JSON.parse, jq, Go, Rust) reject NaN. Tuples become lists, numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj, indent: int | None = 2, **options) -> str:
    """Strict JSON text (no NaN / Infinity: null), anything else as its str(); `options` go to
    json.dumps (ensure_ascii, sort_keys)."""
    return json.dumps(strict(obj), indent=indent, default=str, allow_nan=False, **options) + "\n"


def write_json(path, obj, indent: int | None = 2) -> Path:
    """A JSON file, strict and atomic: every JSON a run writes goes through here."""
    return write_atomic(path, json_text(obj, indent))


def folder_hashes(path) -> dict[str, str]:
    """{file: sha256} of every file directly in a folder (provenance of a loaded SAE)."""
    from pathlib import Path

    return {str(f): sha256(f) for f in sorted(Path(path).iterdir()) if f.is_file()}


def sha256(path) -> str:
    """Hex SHA-256 of a file, read a megabyte at a time."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
