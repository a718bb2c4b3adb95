"""Delivery: batches to anti_sus, then accepted images to gallery_bridge or ``--save-dir``.

Nothing is dropped. A batch that anti_sus cannot take right now is kept and
retried with backoff while the crawler waits (downloads pause, so memory stays
bounded); accepted images sit in the store's outbox, on disk, until the gallery
acknowledges them, and are redelivered after a restart. An image the gallery
keeps refusing backs off on its own and ends in the dead letters (``nomad
retry-dead`` puts it back) instead of blocking the rest.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Protocol

import numpy as np
import zmq
import zmq.utils.z85

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


CurveKeys = tuple[bytes, bytes, bytes]
"""(server public key, client public key, client secret key), Z85."""


def _server_public_key(path: str, flag: str) -> bytes:
    """The server's public key from a ZeroMQ certificate (``.key``) or a file holding a bare Z85 key.

    A secret key where the public one belongs is refused: the server's secret
    must never be copied to a client.
    """
    from anti_sus.security import CurveKeyError, load_keypair

    p = Path(path)
    secret_msg = (f"{flag} {p} holds a secret key; pass the server's public key "
                  "(the .key file, never the .key_secret: the secret stays on the server)")
    if p.name.endswith(".key_secret"):
        raise CurveKeyError(secret_msg)
    if not p.is_file():
        raise CurveKeyError(f"{flag} {p}: not found")
    try:
        public, secret = load_keypair(p)
    except CurveKeyError:
        try:
            raw = p.read_bytes().strip()
        except OSError as exc:
            raise CurveKeyError(f"{flag} {p}: {exc.strerror or exc}") from None
        if len(raw) == 40:
            try:
                zmq.utils.z85.decode(raw)
                return raw
            except (ValueError, KeyError):
                pass
        raise CurveKeyError(f"{flag} {p}: neither a ZeroMQ certificate (`anti-sus keygen`) nor a 40-character Z85 key") from None
    if secret is not None:
        raise CurveKeyError(secret_msg)
    return public


def curve_keys(server_key: str | None, client_key: str | None, *, service: str) -> CurveKeys | None:
    """CURVE client keys for ``--<service>-server-key`` / ``--<service>-client-key``, checked at start.

    The client side is anti_sus's own setup (:func:`anti_sus.security.secure_client`):
    a ``.key_secret`` certificate, or a throwaway pair when no client key is given
    (accepted only by servers that allow any client). Raises ``CurveKeyError``
    (a ValueError) with one clear sentence.
    """
    from anti_sus.security import CurveKeyError, secure_client

    if not server_key:
        if client_key:
            raise CurveKeyError(f"--{service}-client-key needs --{service}-server-key (the server's public key)")
        return None
    server_public = _server_public_key(server_key, f"--{service}-server-key")
    if client_key and not Path(client_key).is_file():
        raise CurveKeyError(f"--{service}-client-key {client_key}: not found")
    # secure_client only sets the three curve_* attributes: run it on a plain
    # namespace to get the very keys a socket would be given.
    keys = SimpleNamespace()
    try:
        secure_client(keys, server_public, client_key or None)  # type: ignore[arg-type]
    except CurveKeyError as exc:
        raise CurveKeyError(f"--{service}-client-key: {exc}") from None
    return keys.curve_serverkey, keys.curve_publickey, keys.curve_secretkey


class GalleryDeliverer:
    """gallery_bridge over the ingest protocol (idempotent by key, so redelivery is safe)."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0, retries: int = 2, curve: CurveKeys | None = None) -> None:
        from gallery_bridge.client import IngestClient

        self.client = IngestClient(endpoint, timeout=timeout, retries=retries, curve=curve)

    def deliver(self, item: OutboxItem) -> tuple[str, Any]:
        from gallery_bridge.client import GalleryUnavailable, IngestError

        try:
            reply = self.client.ingest(item.key, item.meta, item.read(), features=item.read_features())
        except GalleryUnavailable as exc:
            raise DeliveryUnavailable(str(exc)) from exc
        except IngestError as exc:
            if exc.retryable:
                raise DeliveryDeferred(f"ingest_{exc.code}: {exc}") from exc
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


DEFAULT_MAX_DELIVERY_ATTEMPTS = 10


def retry_delay(attempts: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds an item waits after its ``attempts``-th failed attempt: exponential, capped, jittered."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    return random.uniform(delay / 2, delay)


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
) -> tuple[int, int]:
    """Deliver the outbox; returns (delivered, left).

    Each item has its own attempt count and ``next_attempt_at``: an item the
    destination answers with a retryable error (:class:`DeliveryDeferred`) or
    whose file cannot be read backs off alone (exponential, capped at
    ``backoff_max``) while the others are delivered; after ``max_attempts`` it
    moves to the dead letters with its reason, and so does an item refused for
    good (:class:`DeliveryRefused`). When the destination itself does not
    answer (:class:`DeliveryUnavailable`) nothing is counted against the items.

    ``wait``: keep going until the outbox is empty (``nomad once``), sleeping
    until the next item is due or while the destination is down; otherwise one
    pass over the items that are due.
    """
    delivered = 0
    backoff = Backoff(sleep, cap=backoff_max)

    def failed(item: OutboxItem, reason: str) -> None:
        attempts = store.delivery_failed(item.key, reason, retry_at=clock() + retry_delay(item.attempts + 1, base=retry_base, cap=backoff_max))
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
            backoff.reset()
            if on_delivered:
                on_delivered(status)
            log.info("delivered %s: %s %s", item.key, status, gallery_id)
        if not wait:
            break
        try:
            if unavailable:
                backoff.wait()
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
