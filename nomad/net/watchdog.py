"""One background thread that fires callbacks at deadlines.

Socket timeouts bound each *read*, not a whole request: a server can trickle
its status line and headers a byte at a time, each byte just inside the read
timeout. The client registers "cut this connection" at the request's deadline
here; one shared thread (not a timer thread per request) runs whatever is due.
"""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable


class Watchdog:
    """Runs ``fn()`` at monotonic time ``when`` unless cancelled first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, when: float, fn: Callable[[], None]) -> int:
        """Register ``fn`` for ``when`` (``time.monotonic()`` clock); returns a handle for cancel()."""
        with self._cond:
            handle = next(self._ids)
            heapq.heappush(self._heap, (when, handle, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nomad-http-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
            return handle

    def cancel(self, handle: int) -> None:
        with self._cond:
            # O(1): the entry stays in the heap and is skipped (and forgotten) when due.
            self._cancelled.add(handle)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, handle, fn = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                if handle in self._cancelled:
                    self._cancelled.discard(handle)
                    continue
            try:
                fn()
            except Exception:  # a failing callback must not stop the watchdog
                pass


WATCHDOG = Watchdog()
"""Shared by every HttpClient in the process."""
