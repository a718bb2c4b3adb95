"""Patience: waiting between retries to a service that is down, until it answers or a stop comes.

The wait schedule is :class:`photocore.backoff.Backoff` (exponential, full
jitter, capped); the sleep is the crawler's stop-aware wait, so a SIGTERM ends
the patience with :class:`Stopped` and the work stays in the store.
"""
from __future__ import annotations

import random
from typing import Callable

from photocore.backoff import Backoff

DEFAULT_BASE = 0.5
"""First wait (seconds, before jitter) after a service did not answer."""


class Stopped(Exception):
    """A stop was requested while waiting for a service; the work stays in the store."""


class Patience:
    """Retry waits of one sequence; ``wait`` raises :class:`Stopped` when the sleep was interrupted.

    ``sleep(seconds) -> True`` means a stop was requested during the wait.
    """

    def __init__(self, sleep: Callable[[float], bool], *, base: float = DEFAULT_BASE, cap: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self._sleep = sleep
        # A --backoff-max below the first wait makes every wait the cap (Backoff wants base <= cap).
        self.backoff = Backoff(min(base, cap), cap, rng=rng)

    @property
    def attempt(self) -> int:
        """Waits handed out since the last reset."""
        return self.backoff.attempt

    def wait(self) -> None:
        """Sleep the next backoff delay; raises Stopped when a stop interrupted it."""
        if self._sleep(self.backoff.next()):
            raise Stopped()

    def reset(self) -> None:
        """The service answered: the next wait starts short again."""
        self.backoff.reset()
