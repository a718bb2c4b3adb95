"""Delivery: batches to anti_sus, then accepted images to gallery_bridge or ``--save-dir``.

Nothing is dropped. A batch that anti_sus cannot take right now is kept and
retried with backoff while the crawler waits (downloads pause, so memory stays
bounded); accepted images sit in the store's outbox, on disk, until the gallery
acknowledges them, and are redelivered after a restart.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterClient, FilterResult
from nomad.sources.base import ImageRef
from nomad.store import OutboxItem, Store, safe_name

log = logging.getLogger(__name__)


class Stopped(Exception):
    """A stop was requested while waiting for a service; the work stays in the store."""


@dataclass
class Downloaded:
    """A downloaded, decoded image waiting in a batch; the original bytes wait on disk."""

    ref: ImageRef
    wire: np.ndarray
    spool: Path
    width: int
    height: int
    format: str


def ingest_meta(ref: ImageRef, width: int, height: int, fmt: str, scores: dict[str, float | None]) -> dict[str, Any]:
    """The metadata sent with an accepted image (DESIGN §3 ingest) and written to sidecars.

    gallery_bridge reads ``source_url`` (the page to credit: flickr/imgur page,
    else the image), ``permalink``, ``title``, ``subreddit``, ``author``,
    ``licence``, ``source`` and numeric ``scores``; the other fields are kept
    for the sidecar and ignored by the gallery.
    """
    m = ref.meta
    numbers: dict[str, float | None] = {k: v for k, v in scores.items() if isinstance(v, (int, float)) or v is None}
    if isinstance(m.get("post_score"), int):
        numbers["reddit_score"] = m["post_score"]
    return {
        **m,
        "key": ref.key,
        "source": ref.site if ref.site != "direct" else str(m.get("source") or "web"),
        "source_url": m.get("page_url") or ref.url,
        "image_url": ref.url,
        "permalink": m.get("permalink"),
        "title": m.get("title"),
        "subreddit": m.get("subreddit"),
        "author": m.get("author"),
        "licence": m.get("license"),
        "width": width,
        "height": height,
        "format": fmt,
        "scores": numbers,
    }


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


class Backoff:
    """Exponential backoff with jitter, capped; ``wait`` returns after a stop request too."""

    def __init__(self, sleep: Callable[[float], bool], base: float = 0.5, cap: float = 30.0) -> None:
        self._sleep = sleep
        self.base, self.cap = base, cap
        self.attempt = 0

    def wait(self) -> None:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        if self._sleep(random.uniform(delay / 2, delay)):
            raise Stopped()

    def reset(self) -> None:
        self.attempt = 0


class FilterStage:
    """anti_sus with patience: unavailable means wait and retry, never drop the batch."""

    def __init__(
        self,
        client: FilterClient,
        *,
        sleep: Callable[[float], bool] | None = None,
        gmm_threshold: float | None = None,
        watermark_threshold: float | None = None,
        backoff_max: float = 30.0,
        on_unavailable: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.gmm_threshold = gmm_threshold
        self.watermark_threshold = watermark_threshold
        # The crawler installs its stop-aware wait here, so a SIGTERM ends the patience.
        self.sleep: Callable[[float], bool] = sleep or (lambda s: bool(time.sleep(s)))
        self._backoff_max = backoff_max
        self._on_unavailable = on_unavailable

    def filter(self, wires: np.ndarray) -> FilterResult:
        """Score a batch; retries on AntiSusUnavailable until it answers or a stop is requested."""
        backoff = Backoff(self.sleep, cap=self._backoff_max)
        while True:
            try:
                return self.client.filter(
                    wires,
                    gmm_threshold=self.gmm_threshold,
                    watermark_threshold=self.watermark_threshold,
                    return_features=True,
                )
            except AntiSusUnavailable as exc:
                if self._on_unavailable:
                    self._on_unavailable()
                log.warning("anti_sus unavailable (%s); keeping the batch of %d and retrying", exc, len(wires))
                backoff.wait()
            except AntiSusError as exc:
                if exc.code == "too_large" and len(wires) > 1:
                    # The server takes fewer images per request than --batch-size: halve it.
                    half = len(wires) // 2
                    return merge_results(self.filter(wires[:half]), self.filter(wires[half:]), half)
                if exc.code == "internal":
                    log.warning("anti_sus internal error (%s); retrying the batch", exc)
                    backoff.wait()
                    if backoff.attempt > 5:
                        raise
                    continue
                raise


def merge_results(a: FilterResult, b: FilterResult, offset: int) -> FilterResult:
    """One FilterResult for two halves of a batch (``b``'s indexes shifted by ``offset``)."""
    from anti_sus.client import ImageResult

    features = None
    if a.features is not None and b.features is not None:
        features = np.concatenate([a.features, b.features])  # both float32[n_good, D]
    return FilterResult(
        a.good + [i + offset for i in b.good],
        a.results + [ImageResult(r.index + offset, r.gmm, r.watermark, r.verdict) for r in b.results],
        features,
        a.elapsed_ms + b.elapsed_ms,
    )


class DeliveryUnavailable(Exception):
    """The destination cannot take images right now; retry later."""


class DeliveryRefused(Exception):
    """The destination refused this image for good (protocol error); kept in the outbox, reported."""


class Deliverer(Protocol):
    def deliver(self, item: OutboxItem) -> tuple[str, Any]:
        """Deliver one image; (status, gallery id) once the destination made it durable."""
        ...

    def close(self) -> None: ...


class GalleryDeliverer:
    """gallery_bridge over the ingest protocol (idempotent by key, so redelivery is safe)."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0, retries: int = 2) -> None:
        from gallery_bridge.client import IngestClient

        self.client = IngestClient(endpoint, timeout=timeout, retries=retries)

    def deliver(self, item: OutboxItem) -> tuple[str, Any]:
        from gallery_bridge.client import GalleryUnavailable, IngestError

        try:
            reply = self.client.ingest(item.key, item.meta, item.read(), features=item.read_features())
        except GalleryUnavailable as exc:
            raise DeliveryUnavailable(str(exc)) from exc
        except IngestError as exc:
            if exc.retryable:
                raise DeliveryUnavailable(f"gallery busy: {exc}") from exc
            raise DeliveryRefused(f"ingest_{exc.code}: {exc}") from exc
        return reply.status, reply.gallery_id

    def close(self) -> None:
        self.client.close()


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SaveDirDeliverer:
    """Standalone mode: ``DIR/<key>.<ext>`` plus a ``.json`` sidecar with the metadata and scores."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def deliver(self, item: OutboxItem) -> tuple[str, Any]:
        name = safe_name(item.key)
        image = self.dir / (name + item.path.suffix)
        try:
            # Image first, sidecar last: a sidecar always describes a complete image.
            _atomic_write(image, item.read())
            sidecar = {**item.meta, "key": item.key, "file": image.name}
            _atomic_write(self.dir / (name + ".json"), json.dumps(sidecar, indent=1, default=str).encode())
        except OSError as exc:
            raise DeliveryUnavailable(f"cannot write to {self.dir}: {exc}") from exc
        return "added", image.name

    def close(self) -> None:
        pass


def drain_outbox(
    store: Store,
    deliverer: Deliverer,
    *,
    sleep: Callable[[float], bool],
    wait: bool,
    max_refusals: int = 5,
    backoff_max: float = 30.0,
    on_delivered: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Deliver the outbox; returns (delivered, left).

    ``wait``: keep retrying while the destination is unavailable (``nomad once``
    waits until everything is delivered); otherwise give up until the next cycle.
    Items refused ``max_refusals`` times are left in the outbox and reported.
    """
    delivered = 0
    backoff = Backoff(sleep, cap=backoff_max)
    while True:
        items = [i for i in store.outbox() if i.attempts < max_refusals]
        if not items:
            break
        unavailable = False
        for item in items:
            try:
                status, gallery_id = deliverer.deliver(item)
            except DeliveryUnavailable as exc:
                log.warning("delivery of %s unavailable: %s", item.key, exc)
                unavailable = True
                break
            except DeliveryRefused as exc:
                log.error("delivery of %s refused: %s", item.key, exc)
                store.delivery_failed(item.key, str(exc))
                continue
            except OSError as exc:  # the outbox file itself is unreadable
                log.error("outbox file of %s unreadable: %s", item.key, exc)
                store.delivery_failed(item.key, f"outbox_io: {exc}")
                continue
            store.delivered(item.key, status, gallery_id)
            delivered += 1
            backoff.reset()
            if on_delivered:
                on_delivered(status)
            log.info("delivered %s: %s %s", item.key, status, gallery_id)
        if not unavailable:
            continue
        if not wait:
            break
        try:
            backoff.wait()
        except Stopped:
            break
    return delivered, store.outbox_size()
