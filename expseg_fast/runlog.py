"""A run's log.jsonl: one JSON record per epoch, appended; read back tolerating what a crash leaves.

A write cut short (a kill or a full disk during the append) can leave a torn last line: reading drops
it with a warning naming the file. A damaged line before the last is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from expseg_fast.atomic import NoSpaceError, is_no_space, write_atomic

_write = os.write  # the fault-injection tests replace it


def read_log(path: Path, warn: bool = True) -> list[dict]:
    """The epoch records of log.jsonl (empty when missing)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                if warn:
                    print(f"warning: {path}: dropped a torn last line (an interrupted write): {line[:60]!r}",
                          file=sys.stderr)
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({error})") from error
    return records


def rewrite_log(path: Path, records: list[dict]) -> None:
    """Replaces log.jsonl atomically with these records."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    write_atomic(path, lambda tmp: Path(tmp).write_text(text), ".jsonl")


def append_record(path: Path, record: dict) -> None:
    """Appends one record as one line; on a full disk the file is cut back to its previous length
    (no torn line is left) and NoSpaceError names it."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
            os.fsync(fd)
        except OSError as error:
            if not is_no_space(error):
                raise
            os.ftruncate(fd, start)
            raise NoSpaceError(path) from error
    finally:
        os.close(fd)
