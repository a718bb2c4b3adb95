"""Destinations of accepted images: gallery_bridge over ZeroMQ (with CURVE keys) or ``--save-dir`` files.

Also the metadata an accepted image carries (:func:`ingest_meta`): the same
dict is sent to the gallery and written as the ``--save-dir`` sidecar.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from photocore.atomic import atomic_write
from photocore.curve import ClientKeys, CurveKeyError, client_keys, server_public_key

from nomad.sources.base import ImageRef
from nomad.store import OutboxItem, safe_name

from .outbox import DeliveryDeferred, DeliveryRefused, DeliveryUnavailable

CurveKeys = ClientKeys
"""(server public key, client public key, client secret key), Z85."""


def ingest_meta(ref: ImageRef, width: int, height: int, fmt: str, scores: dict[str, float | None]) -> dict[str, Any]:
    """The metadata sent with an accepted image (docs/design.md §3 ingest) and written to sidecars.

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


def curve_keys(server_key: str | None, client_key: str | None, *, service: str) -> CurveKeys | None:
    """CURVE client keys for ``--<service>-server-key`` / ``--<service>-client-key``, checked at start.

    The keys are photocore's client setup (:func:`photocore.curve.client_keys`):
    a ``.key_secret`` certificate, or a throwaway pair when no client key is
    given (accepted only by servers that allow any client). Raises
    ``CurveKeyError`` (a ValueError) with one clear sentence.
    """
    if not server_key:
        if client_key:
            raise CurveKeyError(f"--{service}-client-key needs --{service}-server-key (the server's public key)")
        return None
    server_public = server_public_key(server_key, f"--{service}-server-key")
    if client_key and not Path(client_key).is_file():
        raise CurveKeyError(f"--{service}-client-key {client_key}: not found")
    try:
        return client_keys(server_public, client_key or None)
    except CurveKeyError as exc:
        raise CurveKeyError(f"--{service}-client-key: {exc}") from None


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
            atomic_write(image, item.read())
            sidecar = {**item.meta, "key": item.key, "file": image.name}
            atomic_write(self.dir / (name + ".json"), json.dumps(sidecar, indent=1, default=str).encode())
        except OSError as exc:
            raise DeliveryUnavailable(f"cannot write to {self.dir}: {exc}") from exc
        return "added", image.name

    def close(self) -> None:
        pass
