"""Python client for gallery_bridge's ingest protocol (nomad uses this).

Lazy Pirate (zguide ch. 4): a REQ socket, a poll with a timeout, and on timeout
the socket is closed and rebuilt and the request resent, a bounded number of
times. Resending is safe because ingest is idempotent by key and sha256: a
redelivered image answers ``duplicate`` with the same gallery id.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from anti_sus.protocol import encode, parse_reply


class GalleryUnavailable(Exception):
    """No reply after every retry: the service is down or unreachable."""


class IngestError(Exception):
    """The service answered with an error; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

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


class IngestClient:
    """``IngestClient("tcp://127.0.0.1:7778").ingest(key, meta, image_bytes, features)``."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0, retries: int = 3,
                 curve: tuple[bytes, bytes, bytes] | None = None, context: zmq.Context | None = None) -> None:
        """``curve`` = (server public key, client public key, client secret key), Z85 bytes."""
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.curve = curve
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    # ---- socket lifecycle --------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve:
                server_key, public, secret = self.curve
                sock.curve_serverkey = server_key
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> "IngestClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ----------------------------------------------------------------
    def request(self, header: dict[str, Any], *frames: bytes) -> dict[str, Any]:
        """Send one request (resending on timeout); returns the ok reply or raises."""
        header = {"v": 1, "id": header.get("id") or uuid.uuid4().hex, **header}
        msg = [encode(header), *frames]
        for attempt in range(self.retries + 1):
            sock = self._socket()
            sock.send_multipart(msg, copy=False)
            if sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                reply = parse_reply(sock.recv())
                if not reply.get("ok"):
                    err = reply.get("error") or {}
                    raise IngestError(str(err.get("code", "internal")), str(err.get("message", "")))
                return reply
            # Lazy Pirate: a REQ socket that missed its reply is stuck; rebuild it.
            self._drop_socket()
        raise GalleryUnavailable(f"no reply from {self.endpoint} after {self.retries + 1} tries of {self.timeout:g}s")

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

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

    def info(self) -> dict[str, Any]:
        return self.request({"op": "info"})
