"""Python client of the anti_sus filter server (wire protocol v1).

    from anti_sus.client import FilterClient
    with FilterClient("tcp://127.0.0.1:7777", timeout=30) as client:
        result = client.filter(batch)        # uint8[N, H, W, 3]
        keep = batch[result.good]

Reliability is the ZeroMQ guide's Lazy Pirate: a REQ socket, a poll timeout,
and on timeout the socket is closed and rebuilt and the request sent again, at
most ``retries`` times; then :class:`AntiSusUnavailable`. A server that answers
with an error raises :class:`AntiSusError` (with its ``code``) without retrying,
except ``busy`` (its queue is full): that request is sent again after a short,
growing pause for up to ``busy_wait`` seconds, then :class:`AntiSusBusy` (an
``AntiSusUnavailable``, so callers that wait for an unavailable server wait for
a busy one too).
"""
from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from .protocol import PROTOCOL_VERSION, encode, parse_reply


class AntiSusError(Exception):
    """The server answered with an error reply; ``code`` is one of the protocol's codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AntiSusUnavailable(Exception):
    """No answer from the server after every retry."""


class AntiSusBusy(AntiSusUnavailable):
    """The server kept answering ``busy`` (its queue is full) for longer than ``busy_wait``."""

    code = "busy"


@dataclass(frozen=True)
class ImageResult:
    """One image's scores: GMM log-likelihood, P(watermark) (None if not run) and the verdict."""

    index: int
    gmm: float
    watermark: float | None
    verdict: str


@dataclass(frozen=True)
class FilterResult:
    """A filter reply: ``good`` indexes in request order, per-image results, optional features of the good images."""

    good: list[int]
    results: list[ImageResult]
    features: np.ndarray | None
    elapsed_ms: float


class FilterClient:
    """A connection to one anti_sus server (or broker frontend)."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0, retries: int = 3,
                 curve_server_key: bytes | str | Path | None = None,
                 curve_client_keys: tuple[bytes, bytes] | str | Path | None = None,
                 context: zmq.Context | None = None, busy_wait: float | None = None) -> None:
        if retries < 0 or timeout <= 0 or (busy_wait is not None and busy_wait < 0):
            raise ValueError("timeout must be > 0, retries >= 0 and busy_wait >= 0")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.busy_wait = timeout if busy_wait is None else busy_wait
        self._curve = (curve_server_key, curve_client_keys)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    # -- public API ------------------------------------------------------------
    def filter(self, images: np.ndarray, *, gmm_threshold: float | None = None,
               watermark_threshold: float | None = None, return_features: bool = False) -> FilterResult:
        """Filter ``uint8[N, H, W, 3]`` RGB images; thresholds override the server's for this request."""
        arr = np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
            raise ValueError(f"images must be uint8[N>=1, H, W, 3], got {arr.dtype}{list(arr.shape)}")
        arr = np.ascontiguousarray(arr)
        options: dict[str, Any] = {"return_features": bool(return_features)}
        if gmm_threshold is not None:
            options["gmm_threshold"] = float(gmm_threshold)
        if watermark_threshold is not None:
            options["watermark_threshold"] = float(watermark_threshold)
        header = {"v": PROTOCOL_VERSION, "op": "filter", "shape": list(arr.shape), "dtype": "uint8", "options": options}
        reply, extra = self._request(header, [arr.data])
        results = [ImageResult(int(r["index"]), float(r["gmm"]), None if r.get("watermark") is None else float(r["watermark"]),
                               str(r["verdict"])) for r in reply["results"]]
        features = None
        if return_features:
            if not extra:
                raise AntiSusError("internal", "reply has no features frame")
            shape = reply.get("features_shape") or [len(reply["good"]), -1]
            features = np.frombuffer(extra[0], dtype="<f4").reshape(shape)
        return FilterResult([int(i) for i in reply["good"]], results, features, float(reply.get("elapsed_ms", 0.0)))

    def info(self) -> dict[str, Any]:
        """The server's models (with sha256), thresholds, limits and version."""
        return self._request({"v": PROTOCOL_VERSION, "op": "info"}, [])[0]

    def ping(self) -> float:
        """Round-trip time in milliseconds."""
        t0 = time.perf_counter()
        self._request({"v": PROTOCOL_VERSION, "op": "ping"}, [])
        return (time.perf_counter() - t0) * 1000.0

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self) -> "FilterClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- Lazy Pirate -------------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            server_key, client_keys = self._curve
            if server_key is not None:
                from .security import secure_client

                secure_client(sock, server_key, client_keys)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _request(self, header: dict[str, Any], payload: list[Any]) -> tuple[dict[str, Any], list[bytes]]:
        header = {**header, "id": uuid.uuid4().hex}
        frames = [encode(header), *payload]
        busy_until = time.monotonic() + self.busy_wait
        pause = 0.05
        attempt = 0
        while attempt <= self.retries:
            sock = self._socket()
            sock.send_multipart(frames, copy=False)
            if sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                parts = sock.recv_multipart()
                try:
                    reply = parse_reply(parts[0])
                except (ValueError, UnicodeDecodeError) as exc:
                    raise AntiSusError("internal", f"malformed reply: {exc}") from None
                if not reply.get("ok"):
                    err = reply.get("error") or {}
                    code, message = str(err.get("code", "internal")), str(err.get("message", ""))
                    if code != "busy":
                        raise AntiSusError(code, message)
                    # busy is transient and does not use up a retry; the pause grows (with jitter,
                    # so clients refused together do not come back together) until busy_wait is spent.
                    left = busy_until - time.monotonic()
                    if left <= 0:
                        raise AntiSusBusy(f"{self.endpoint} busy for {self.busy_wait:g}s: {message}")
                    time.sleep(min(left, pause * random.uniform(0.5, 1.0)))
                    pause = min(pause * 2, 2.0)
                    continue
                return reply, parts[1:]
            # No answer: the REQ socket is stuck in its send state, so rebuild it (Lazy Pirate).
            self.close()
            attempt += 1
        raise AntiSusUnavailable(f"no reply from {self.endpoint} after {self.retries + 1} attempt(s) of {self.timeout:g}s")
