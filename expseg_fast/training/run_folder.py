"""A training run's output folder (--out): who may use it and what a new or resumed run may do there.

One trainer at a time holds the folder's lock (an advisory lock on OUT/.lock, released by the system
when the process ends, even when it is killed). A folder that already holds a run (a checkpoint) is
refused to a new run (continue it with resume, or choose another folder); resume needs a checkpoint. A
log without any checkpoint (a run killed in its first epoch) is replaced by a new run. Temporary files
that killed writes left behind are removed once the lock is held.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from expseg_fast.atomic import remove_temporaries
from expseg_fast.runlog import read_log

_HELD: set[int] = set()  # lock file descriptors held by this process


def _close_held_in_child() -> None:
    """A forked child (a data-loader or preprocessing worker) must not keep the lock alive after its
    parent is killed: it closes its copies of the lock's descriptors."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class RunError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class RunFolder:
    """OUT of one training run, locked for this process while it is open."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._lock_fd: int | None = None

    def open(self, resume: bool) -> None:
        """Creates and locks the folder and checks that a new run (or, with resume, a resumed one) may
        use it; removes leftover temporary files. RunError otherwise."""
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"{self.out}: exists and is not a folder; choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self._lock()
        last = self.out / "last.pt"
        if not resume and (last.exists() or (self.out / "best.pt").exists()):
            records = read_log(self.out / "log.jsonl", warn=False)
            raise RunError(f"{self.out}: already holds a run ({len(records)} epoch(s) logged); continue it "
                           f"with --resume, or choose another --out")
        if resume and not last.exists():
            raise RunError(f"{last}: not found, so there is nothing to resume; check --out, or start a new "
                           f"run without --resume")
        for path in remove_temporaries(self.out):
            print(f"removed {path} (left by an interrupted write)", flush=True)

    def _lock(self) -> None:
        path = self.out / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"{self.out}: in use by another trainer (process {holder}); wait for it to end, "
                           f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        _HELD.add(fd)

    def close(self) -> None:
        """Releases the lock."""
        if self._lock_fd is not None:
            _HELD.discard(self._lock_fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
