"""Atomic file writes: a temporary file in the destination's folder, then a rename, so a crash never
leaves a truncated file (checkpoint, NIfTI, cache entry) where a complete one is expected."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls write(temporary_path), then renames the temporary file to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
