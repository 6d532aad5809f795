"""Files written so that a reader never sees half of one: a temporary sibling, renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file in the same directory, then os.replace: concurrent readers
    (test workers, ranks of one job, a report being rebuilt) see the old file or the whole new one, and a failed
    write leaves the old file and no temporary behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do (a crash would leave an empty file)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8 kept as is), written as write_text_atomic does."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
