"""Per-host concurrency limit shared by all download threads."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from .errors import FetchError


class HostLimiter:
    """At most ``limit`` holders per host name; only hosts in flight are remembered.

    (A semaphore per host ever seen would grow for months on a crawler that meets
    new image hosts every day.)
    """

    def __init__(self, limit: int, closed: threading.Event | None = None) -> None:
        self.limit = max(1, limit)
        self._busy: dict[str, int] = {}
        self._cond = threading.Condition()
        self._closed = closed or threading.Event()

    @contextmanager
    def slot(self, host: str) -> Iterator[None]:
        """Hold one of ``host``'s slots for the duration of the block."""
        with self._cond:
            while self._busy.get(host, 0) >= self.limit:
                if self._closed.is_set():
                    raise FetchError("closed", f"client closed while waiting for a slot on {host}")
                self._cond.wait(0.5)
            self._busy[host] = self._busy.get(host, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                left = self._busy[host] - 1
                if left:
                    self._busy[host] = left
                else:
                    del self._busy[host]
                self._cond.notify_all()

    def in_flight(self, host: str | None = None) -> int:
        """Requests holding a slot (for one host, or all)."""
        with self._cond:
            return self._busy.get(host, 0) if host is not None else sum(self._busy.values())
