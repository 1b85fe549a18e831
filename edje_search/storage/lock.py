"""One writer at a time: an inter-process lock on the index directory.

Every writer (add, remove, sync, optimize, repair, recovery of an interrupted commit) holds it
from before it reads the state it will change until after its last commit. Readers never take
it. The lock is ``filelock`` (fcntl on POSIX), so it is released by the kernel when the
holder dies, even by kill -9; the holder's pid is written beside it for the error message.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import IndexLocked

logger = logging.getLogger(__name__)

LOCK_FILE = "writer.lock"
HOLDER_FILE = "writer.pid"


class WriterLock:
    """Re-entrant within one process; ``wait`` seconds to wait for another holder (0: fail at once)."""

    def __init__(self, directory: str | Path, wait: float = 0.0):
        self.directory = Path(directory)
        self.wait = wait
        self._lock = FileLock(str(self.directory / LOCK_FILE), thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def holder(self) -> str:
        try:
            return (self.directory / HOLDER_FILE).read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def acquire(self) -> None:
        first = not self._lock.is_locked
        try:
            self._lock.acquire(timeout=max(self.wait, 0) if self.wait else 0, poll_interval=0.05)
        except Timeout:
            waited = f" after waiting {self.wait:g} s" if self.wait else ""
            raise IndexLocked(f"index {self.directory} is being written by pid {self.holder()}{waited}; "
                              f"try again when it finishes, or pass --wait SECONDS") from None
        if first:
            (self.directory / HOLDER_FILE).write_text(f"{os.getpid()}\n")

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
