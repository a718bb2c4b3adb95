"""A fair request queue: one FIFO per client, served round-robin, taken in image-bounded batches."""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, Hashable, Protocol, TypeVar


class HasImages(Protocol):
    n_images: int


J = TypeVar("J", bound=HasImages)


class FairQueue(Generic[J]):
    """Thread-safe; a client that sends many requests cannot starve the others."""

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[J]] = OrderedDict()
        self._cv = threading.Condition()
        self.images = 0

    def put(self, client: Hashable, job: J) -> None:
        with self._cv:
            self._queues.setdefault(client, deque()).append(job)
            self.images += job.n_images
            self._cv.notify()

    def take(self, max_images: int, timeout: float) -> list[J]:
        """Up to ``max_images`` images' worth of whole requests (at least one), one per client per turn."""
        with self._cv:
            if not self._queues:
                self._cv.wait(timeout)
            batch: list[J] = []
            total = 0
            while self._queues:
                client, jobs = next(iter(self._queues.items()))
                if batch and total + jobs[0].n_images > max_images:
                    break
                job = jobs.popleft()
                batch.append(job)
                total += job.n_images
                if jobs:
                    self._queues.move_to_end(client)  # next turn goes to the next client
                else:
                    del self._queues[client]
            self.images -= total
            return batch

    def drain(self) -> list[J]:
        """Everything still queued (used at shutdown to fail it with a reply)."""
        with self._cv:
            jobs = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self.images = 0
            return jobs

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()
