"""Atomic file writes: a temporary file in the destination's folder, then a rename, so a crash never
leaves a truncated file (checkpoint, NIfTI, cache entry) where a complete one is expected. A full disk
is reported as such, naming the file, and leaves the previous file in place."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_PREFIX = ".tmp-"  # temporary files; one left behind by a killed write can be removed
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


class NoSpaceError(OSError):
    """The device ran out of space while writing a file; the message names the file."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on device while writing {path}")
        self.path = path

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # raised in a preparation worker, it crosses to the trainer intact
        return NoSpaceError, (self.path,)


def is_no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def write_atomic(path: str | Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls write(temporary_path), then renames the temporary file to path. NoSpaceError when the
    disk is full (the previous file at path is untouched). The file gets the permissions a plain
    open() would give it: a replaced file's own, a new file's 0o666 less the umask (not mkstemp's 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_no_space(error) and not isinstance(error, NoSpaceError):
            raise NoSpaceError(path) from error
        raise


def folder_mode() -> int:
    """The permission bits a plain mkdir gives a new folder (0o777 less the umask; mkdtemp's are 0o700)."""
    return 0o777 & ~_UMASK


def _mode_for(path: Path) -> int:
    """The permission bits an in-place write of path would leave."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_UMASK


def _write_file(path: str, data: bytes) -> None:
    """Plain file write (its own function: the fault-injection tests replace it)."""
    with open(path, "wb") as handle:
        handle.write(data)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """write_atomic of a bytes object (plain file writes: a full disk surfaces as ENOSPC)."""
    write_atomic(path, lambda tmp: _write_file(tmp, data), "".join(Path(path).suffixes))


def remove_temporaries(folder: Path) -> list[Path]:
    """Removes the temporary files that killed writes left in folder; returns them. Only safe while no
    other process writes there (the trainer holds its folder's lock)."""
    removed = [p for p in folder.glob(TEMP_PREFIX + "*") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
