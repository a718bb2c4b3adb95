"""The outbox drain: accepted images go to their destination, each with its own retry schedule.

Each item has its own attempt count and ``next_attempt_at``: an item the
destination answers with a retryable error (:class:`DeliveryDeferred`) or whose
file cannot be read backs off alone while the others are delivered; after
``max_attempts`` it moves to the dead letters with its reason (``nomad
retry-dead`` puts it back), and so does an item refused for good
(:class:`DeliveryRefused`). When the destination itself does not answer
(:class:`DeliveryUnavailable`) nothing is counted against the items.
"""
from __future__ import annotations

import logging
import random
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
) -> tuple[int, int]:
    """Deliver the outbox; returns (delivered, left).

    ``sleep(seconds) -> True`` when a stop interrupted the wait; ``clock`` is
    wall-clock time (``next_attempt_at`` is stored and survives restarts).
    ``wait``: keep going until the outbox is empty (``nomad once``), sleeping
    until the next item is due or while the destination is down; otherwise one
    pass over the items that are due.
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
