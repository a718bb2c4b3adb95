"""The outbox drain: accepted images go to their destination, each with its own retry schedule.

Each item has its own attempt count and ``next_attempt_at``: an item the
destination answers with a retryable error (:class:`DeliveryDeferred`) or whose
file cannot be read backs off alone while the others are delivered; after
``max_attempts`` it moves to the dead letters with its reason (``nomad
retry-dead`` puts it back), and so does an item refused for good
(:class:`DeliveryRefused`). When the destination itself does not answer
(:class:`DeliveryUnavailable`) nothing is counted against the items.

:class:`DeliveryWorker` runs the drain in a background thread while the crawler
downloads and filters the next batches, so the gallery's ingest overlaps with
them instead of waiting for the end of the cycle. It is the only caller of the
deliverer while it runs (the crawler drains in its own thread only before
starting it and after joining it), so no image is sent twice at once.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any, Callable, Protocol

from photocore.backoff import Backoff

from nomad.store import OutboxItem, Store

from .patience import Patience, Stopped

log = logging.getLogger("nomad.delivery")

DEFAULT_MAX_DELIVERY_ATTEMPTS = 10


class DeliveryUnavailable(Exception):
    """The destination cannot take images right now (no answer, disk full); retry later.

    This is about the destination, not one image: no attempt is counted
    against the item, so a long outage never dead-letters the outbox.
    """


class DeliveryDeferred(DeliveryUnavailable):
    """The destination answered, but could not take *this* image now (a retryable error).

    Counted against the item: it backs off on its own while the others are
    delivered, and after ``max_attempts`` it becomes a dead letter.
    """


class DeliveryRefused(Exception):
    """The destination refused this image for good (protocol error): it becomes a dead letter."""


class Deliverer(Protocol):
    def deliver(self, item: OutboxItem) -> tuple[str, Any]:
        """Deliver one image; (status, gallery id) once the destination made it durable."""
        ...

    def close(self) -> None: ...


def retry_delay(attempts: int, *, base: float = 1.0, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Seconds an item waits after its ``attempts``-th failed attempt: exponential, capped, jittered.

    The exponential part is :class:`photocore.backoff.Backoff`'s; the jitter keeps
    at least half of it (not full jitter), so an image the destination just
    refused is never retried at once while the rest of the outbox waits.
    """
    schedule = Backoff(min(base, cap), cap, jitter=False)
    schedule.attempt = max(0, attempts - 1)
    limit = schedule.next()
    return (rng or random).uniform(limit / 2, limit)


def drain_outbox(
    store: Store,
    deliverer: Deliverer,
    *,
    sleep: Callable[[float], bool],
    wait: bool,
    max_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS,
    retry_base: float = 1.0,
    backoff_max: float = 30.0,
    on_delivered: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    halt: Callable[[], bool] | None = None,
) -> tuple[int, int]:
    """Deliver the outbox; returns (delivered, left).

    ``sleep(seconds) -> True`` when a stop interrupted the wait; ``clock`` is
    wall-clock time (``next_attempt_at`` is stored and survives restarts).
    ``wait``: keep going until the outbox is empty (``nomad once``), sleeping
    until the next item is due or while the destination is down; otherwise one
    pass over the items that are due. ``halt() -> True`` ends the pass before the
    next item (a stop, or a :class:`DeliveryWorker` asked to finish): an item is
    never left half-delivered, the rest simply stays in the outbox.
    """
    delivered = 0
    patience = Patience(sleep, cap=backoff_max, rng=rng)

    def failed(item: OutboxItem, reason: str) -> None:
        delay = retry_delay(item.attempts + 1, base=retry_base, cap=backoff_max, rng=rng)
        attempts = store.delivery_failed(item.key, reason, retry_at=clock() + delay)
        if attempts >= max_attempts:
            store.dead_letter(item.key, reason)
            log.error("delivery of %s failed %d times (%s): moved to the dead letters (nomad retry-dead)", item.key, attempts, reason)
        else:
            log.warning("delivery of %s failed (attempt %d of %d): %s", item.key, attempts, max_attempts, reason)

    while True:
        unavailable = False
        for item in store.outbox_due(clock()):
            if halt is not None and halt():
                return delivered, store.outbox_size()
            try:
                status, gallery_id = deliverer.deliver(item)
            except DeliveryDeferred as exc:
                failed(item, str(exc))
                continue
            except DeliveryUnavailable as exc:
                log.warning("delivery of %s unavailable: %s", item.key, exc)
                unavailable = True
                break
            except DeliveryRefused as exc:
                log.error("delivery of %s refused: %s; moved to the dead letters", item.key, exc)
                store.delivery_failed(item.key, str(exc))
                store.dead_letter(item.key, str(exc))
                continue
            except OSError as exc:  # the outbox file itself is unreadable
                failed(item, f"outbox_io: {exc}")
                continue
            store.delivered(item.key, status, gallery_id)
            delivered += 1
            patience.reset()
            if on_delivered:
                on_delivered(status)
            log.info("delivered %s: %s %s", item.key, status, gallery_id)
        if not wait:
            break
        try:
            if unavailable:
                patience.wait()
                continue
            due = store.next_attempt_at()
            if due is None:
                break
            # Nothing due now: sleep until the next item's backoff is over.
            if sleep(min(backoff_max, max(0.0, due - clock()))):
                break
        except Stopped:
            break
    return delivered, store.outbox_size()


class DeliveryWorker:
    """Drains the outbox in a background thread, one pass each time new items arrive (:meth:`kick`).

    ``drain(halt)`` is one non-waiting pass of :func:`drain_outbox` with that
    ``halt``. Between passes the thread sleeps until kicked, or ``idle`` seconds
    (items in backoff become due by the clock, not by a kick). ``stop`` (the
    crawler's stop flag) and :meth:`finish` end it between two items. An
    exception in a pass ends the thread and is raised again by :meth:`finish`,
    as it would have been by the crawler's own drain.
    """

    def __init__(self, drain: Callable[[Callable[[], bool]], Any], stop: threading.Event, *, idle: float = 1.0,
                 name: str = "nomad-deliver") -> None:
        self._drain = drain
        self._stop = stop
        self._done = threading.Event()
        self._kick = threading.Event()
        self._idle = idle
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _halted(self) -> bool:
        return self._stop.is_set() or self._done.is_set()

    def _loop(self) -> None:
        self._kick.set()  # the first pass at once: what an earlier run left in the outbox
        while not self._halted():
            self._kick.wait(self._idle)
            if self._halted():
                break
            self._kick.clear()
            try:
                self._drain(self._halted)
            except Stopped:
                break
            except BaseException as exc:  # noqa: BLE001 - handed to the crawler's thread by finish()
                self._error = exc
                break

    def start(self) -> "DeliveryWorker":
        self._thread.start()
        return self

    def kick(self) -> None:
        """New items are in the outbox: start a pass now."""
        self._kick.set()

    def finish(self) -> None:
        """End after the item being delivered now, wait for the thread, raise what a pass raised."""
        self._done.set()
        self._kick.set()
        if self._thread.ident is not None:  # started
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
