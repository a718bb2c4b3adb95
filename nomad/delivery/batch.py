"""Batching: decoded images wait here until a batch for anti_sus is full or its oldest image waited long enough."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from nomad.sources.base import ImageRef


@dataclass
class Downloaded:
    """A downloaded, decoded image waiting in a batch; the original bytes wait on disk."""

    ref: ImageRef
    wire: np.ndarray
    spool: Path
    width: int
    height: int
    format: str
    hashes: tuple[str, str, str] | None = None
    """The duplicate skip's (sha256, pHash64, pHash576), made by the download worker when the skip is on."""


@dataclass
class Batcher:
    """Collects decoded images; due when full or when the oldest waited ``timeout`` seconds."""

    size: int = 64
    timeout: float = 30.0
    clock: Callable[[], float] = time.monotonic
    items: list[Downloaded] = field(default_factory=list)
    _since: float | None = None

    def add(self, item: Downloaded) -> None:
        if not self.items:
            self._since = self.clock()
        self.items.append(item)

    def full(self) -> bool:
        return len(self.items) >= self.size

    def due_in(self) -> float | None:
        """Seconds until the batch timeout (<= 0: due now), None when empty."""
        if not self.items or self._since is None:
            return None
        return self._since + self.timeout - self.clock()

    def due(self) -> bool:
        left = self.due_in()
        return self.full() or (left is not None and left <= 0)

    def take(self) -> list[Downloaded]:
        items, self.items, self._since = self.items[: self.size], self.items[self.size :], None
        if self.items:
            self._since = self.clock()
        return items
