"""A scripted outbox destination for nomad's delivery tests (the real ones talk to gallery_bridge or write files)."""
from __future__ import annotations

from typing import Any, Iterable

from nomad.delivery import DeliveryDeferred, DeliveryRefused, DeliveryUnavailable
from nomad.store import OutboxItem


class ScriptedDeliverer:
    """A Deliverer that is down for the first ``unavailable`` calls (or always, ``down``), refuses the
    keys in ``refuse`` for good, defers (a retryable refusal) the keys in ``defer``, and takes the rest.

    ``got`` lists the keys it took, in order.
    """

    def __init__(self, *, unavailable: int = 0, down: bool = False, refuse: Iterable[str] = (), defer: Iterable[str] = ()) -> None:
        self.unavailable = unavailable
        self.down = down
        self.refuse, self.defer = set(refuse), set(defer)
        self.got: list[str] = []

    def deliver(self, it: OutboxItem) -> tuple[str, Any]:
        if self.down or self.unavailable:
            self.unavailable = max(0, self.unavailable - 1)
            raise DeliveryUnavailable("down")
        if it.key in self.refuse:
            raise DeliveryRefused("ingest_bad_meta")
        if it.key in self.defer:
            raise DeliveryDeferred("ingest_internal: busy")
        self.got.append(it.key)
        return "added", len(self.got)

    def close(self) -> None:
        pass
