"""Python client for gallery_bridge's ingest protocol (nomad uses this).

Built on photocore's Lazy Pirate client (:class:`photocore.client.ReqClient`):
on timeout the socket is rebuilt and the request resent, a bounded number of
times. Resending is safe because ingest is idempotent by key and sha256: a
redelivered image answers ``duplicate`` with the same gallery id. With
``curve`` keys (:func:`photocore.curve.client_keys`) it is a CURVE client of a
server started with ``--curve-secret-file`` (and ``--curve-allow``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import zmq

from photocore.client import ReqClient, ServerError, Unavailable
from photocore.curve import ClientKeys


class GalleryUnavailable(Unavailable):
    """No reply after every retry: the service is down or unreachable."""


class IngestError(ServerError):
    """The service answered with an error; ``code`` is the protocol error code."""

    @property
    def retryable(self) -> bool:
        """``internal`` means the gallery could not take it now; the other codes are about the request."""
        return self.code == "internal"


@dataclass(frozen=True)
class IngestReply:
    """``status`` is ``added``, ``duplicate`` or ``rejected``; ``reason``/``message`` say why."""

    status: str
    gallery_id: int | None
    reason: str | None = None
    message: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


class IngestClient(ReqClient):
    """``IngestClient("tcp://127.0.0.1:7778").ingest(key, meta, image_bytes, features)``."""

    server_error = IngestError
    unavailable = GalleryUnavailable

    def __init__(self, endpoint: str, *, timeout: float = 30.0, retries: int = 3,
                 curve: ClientKeys | None = None, context: zmq.Context | None = None) -> None:
        """``curve`` = (server public key, client public key, client secret key), Z85 bytes."""
        super().__init__(endpoint, timeout=timeout, retries=retries, curve=curve, context=context)

    def request(self, header: dict[str, Any], *frames: bytes) -> dict[str, Any]:
        """Send one request (resending on timeout); returns the ok reply or raises."""
        return self.call(header, frames)[0]

    def ingest(self, key: str, meta: dict[str, Any], image: bytes, features: np.ndarray | None = None) -> IngestReply:
        """Send one image (original encoded bytes) with its metadata and optional CLIP features."""
        header: dict[str, Any] = {"op": "ingest", "key": key, "meta": meta}
        frames = [bytes(image)]
        if features is not None:
            vec = np.ascontiguousarray(np.asarray(features, dtype="<f4").reshape(-1))
            header["features_dim"] = int(vec.shape[0])
            frames.append(vec.tobytes())
        reply = self.request(header, *frames)
        gid = reply.get("gallery_id")
        return IngestReply(
            status=str(reply.get("status")),
            gallery_id=int(gid) if isinstance(gid, int) else None,
            reason=reply.get("reason"),
            message=reply.get("message"),
            raw=reply,
        )

    def have(self, items: Sequence[tuple[str, ...]]) -> list[str]:
        """Does the gallery hold these images? (sha256 hex, 64-bit pHash hex) -> "exact" | "near" | "new".

        An item may carry the 576-bit phash hex as a third element
        (``gallery_bridge.dedup.have_hashes``): "near" is then ingest's own
        phash rule. Sent in requests of at most ``MAX_HAVE_ITEMS``. An old server raises
        :class:`IngestError` with code ``unknown_op``: callers treat that as
        "no answer" and carry on without the check.
        """
        from .dedup.have import ANSWERS, MAX_HAVE_ITEMS

        out: list[str] = []
        pairs = [[str(x) for x in item] for item in items]
        for start in range(0, len(pairs), MAX_HAVE_ITEMS):
            chunk = pairs[start:start + MAX_HAVE_ITEMS]
            answers = self.request({"op": "have", "items": chunk}).get("answers")
            if not (isinstance(answers, list) and len(answers) == len(chunk) and all(a in ANSWERS for a in answers)):
                raise IngestError("internal", f"have: expected {len(chunk)} answers of {'/'.join(ANSWERS)}, got {answers!r:.200}")
            out.extend(answers)
        return out

    def review(self, key: str, meta: dict[str, Any], image: bytes, scores: dict[str, Any], rejected_by: str,
               features: np.ndarray | None = None) -> dict[str, Any]:
        """Send one rejected image (a JPEG of at most 512 px a side) for the review queue; idempotent by key.

        Returns the reply: ``{"status": "added"|"duplicate", "review_id": int, ...}``.
        """
        header: dict[str, Any] = {"op": "review", "key": key, "meta": meta, "scores": scores, "rejected_by": rejected_by}
        frames = [bytes(image)]
        if features is not None:
            vec = np.ascontiguousarray(np.asarray(features, dtype="<f4").reshape(-1))
            header["features_dim"] = int(vec.shape[0])
            frames.append(vec.tobytes())
        return self.request(header, *frames)

    def label(self, item: str, label: str) -> dict[str, Any]:
        """Label ``g<entry id>`` or ``r<review id>`` good or bad (the last label wins).

        Returns the reply: ``{"status": "labelled", "item", "label", "gallery_id": int | None,
        "removed": bool, "ingest"?: added|duplicate|rejected, "reason"?}``.
        """
        return self.request({"op": "label", "item": item, "label": label})

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

    def info(self) -> dict[str, Any]:
        return self.request({"op": "info"})
