"""One retry-wait policy for every loop that retries: exponential backoff with full jitter, capped.

``Backoff`` hands out the waits of one retry sequence; ``retry_after_seconds``
reads a server's ``Retry-After`` header (delta-seconds or HTTP-date) so callers
can wait at least that long.
"""
from __future__ import annotations

import email.utils
import math
import random
import time
from datetime import timezone

__all__ = ["Backoff", "retry_after_seconds"]


class Backoff:
    """Waits of one retry sequence: ``base * 2**attempt`` capped at ``cap``, with full jitter.

    Full jitter (a uniform draw in ``[0, limit]``) spreads the retries of many
    workers that failed at the same moment, so they do not hammer a recovering
    server in lock-step. ``attempt`` counts the waits handed out since the last
    ``reset()``.
    """

    def __init__(self, base: float, cap: float, *, jitter: bool = True, rng: random.Random | None = None) -> None:
        if not (math.isfinite(base) and base > 0):
            raise ValueError(f"backoff base must be a positive finite number, got {base!r}")
        if not (math.isfinite(cap) and cap >= base):
            raise ValueError(f"backoff cap must be finite and >= base ({base}), got {cap!r}")
        self.base = float(base)
        self.cap = float(cap)
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self.attempt = 0

    def limit(self) -> float:
        """The longest wait the next ``next()`` may return."""
        # min() before the power would overflow: 2**1100 is not a float.
        exp = min(self.attempt, 1024)
        return min(self.cap, self.base * math.pow(2.0, exp)) if exp < 1024 else self.cap

    def next(self) -> float:
        """Seconds to wait before the next try; each call doubles the limit up to ``cap``."""
        limit = self.limit()
        self.attempt += 1
        if not self.jitter:
            return limit
        return self._rng.uniform(0.0, limit)

    def reset(self) -> None:
        """Start over after a success: the next wait is short again."""
        self.attempt = 0


def retry_after_seconds(value: str | None, *, now: float | None = None, cap: float = 3600.0) -> float | None:
    """Seconds from a ``Retry-After`` header value, clamped to ``[0, cap]``; None if absent or unreadable.

    Accepts delta-seconds (``"120"``) and an HTTP-date (``"Wed, 21 Oct 2015 07:28:00 GMT"``);
    a date in the past means 0. The cap keeps a hostile or broken server from
    parking a worker for days.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        if when.tzinfo is None:  # "-0000" dates come back naive; HTTP-dates are always UTC
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    else:
        if not math.isfinite(seconds):
            return None
    return min(max(0.0, seconds), cap)
