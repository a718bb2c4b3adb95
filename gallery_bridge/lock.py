"""One writer per gallery: an exclusive advisory lock held for the writer's lifetime.

The startup recovery pass deletes pending entries; if a second process ran it
while the first was in the middle of an ingest, it would delete an entry that
is about to be confirmed. So ``serve``, ``import`` and ``rebuild`` take this
lock first, and ``list`` reads without recovering.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class GalleryLocked(Exception):
    """Another gallery-bridge process writes to this gallery."""


class WriterLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``path``; released on close or process exit (even SIGKILL)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise GalleryLocked(f"{self.path.parent} is in use by another gallery-bridge process (pid {holder})") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = -1
