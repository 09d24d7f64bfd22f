"""Writing files so that a reader never sees half of one: write beside the target under a
temporary name, then rename over it (atomic on one file system). Every file a run writes goes
through here."""

from __future__ import annotations

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
