"""The ZeroMQ service: a ROUTER socket answering ingest, ping and info (DESIGN §3).

One request at a time on one thread: ingests must be serialised anyway (check
then write), and the gallery's bottleneck is the crawler, not this loop. The
reply to an ingest is sent only after the catalogue commit. A bad request
gets an error reply and never stops the loop.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from anti_sus.protocol import MAX_HEADER_BYTES, ProtocolError, error_from, error_reply, ok_reply, parse_header, request_id

from . import __version__
from .ingest import Ingester
from .targets import TargetError
from .validate import Limits, check_features, check_image, check_key, check_meta

log = logging.getLogger(__name__)

try:  # metrics are optional at import time; prometheus_client is a runtime dependency
    from prometheus_client import Counter, Histogram

    INGESTS = Counter("gallery_bridge_ingests_total", "Ingest replies by status", ["status"])
    ERRORS = Counter("gallery_bridge_errors_total", "Error replies by code", ["code"])
    SECONDS = Histogram("gallery_bridge_ingest_seconds", "Time to answer one ingest")
except ImportError:  # pragma: no cover
    INGESTS = ERRORS = SECONDS = None


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:7778"
    limits: Limits = None  # type: ignore[assignment]
    curve_secret: bytes | None = None

    def __post_init__(self) -> None:
        if self.limits is None:
            self.limits = Limits()


class Server:
    """Owns the socket; :meth:`run` loops until :meth:`stop` (or SIGTERM/SIGINT)."""

    def __init__(self, ingester: Ingester, config: ServerConfig, context: zmq.Context | None = None) -> None:
        self.ingester = ingester
        self.config = config
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self.sock = self._ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        lim = config.limits
        # Refuse oversized messages in libzmq, before Python ever allocates them.
        self.sock.setsockopt(zmq.MAXMSGSIZE, lim.max_image_bytes + MAX_HEADER_BYTES + 4 * lim.max_features_dim + 1024)
        self.sock.setsockopt(zmq.RCVHWM, 16)
        if config.curve_secret:
            self.sock.curve_server = True
            self.sock.curve_secretkey = config.curve_secret
        self.sock.bind(config.bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        log.info("gallery_bridge listening on %s", self.endpoint)
        try:
            while not self._stop.is_set():
                if not self.sock.poll(200, zmq.POLLIN):
                    continue
                frames = self.sock.recv_multipart(copy=True)
                envelope, body = _split_envelope(frames)
                reply = self.handle(body)
                self.sock.send_multipart([*envelope, reply])
        finally:
            log.info("gallery_bridge stopping")
            self.sock.close(linger=1000)

    def handle(self, body: list[bytes]) -> bytes:
        """One request's frames -> one reply frame. Never raises."""
        rid = None
        try:
            if not body:
                raise ProtocolError("bad_header", "empty message")
            header = parse_header(body[0])
            rid = request_id(header)
            op = header["op"]
            if op == "ping":
                return ok_reply(rid, pong=True, version=__version__)
            if op == "info":
                return ok_reply(rid, version=__version__, limits=vars(self.config.limits), **self.ingester.info())
            if op == "ingest":
                return self._ingest(header, body[1:], rid)
            raise ProtocolError("unknown_op", f"unknown op {op!r}; ops are ingest, ping, info", rid)
        except ProtocolError as exc:
            exc.request_id = exc.request_id or rid
            if ERRORS:
                ERRORS.labels(exc.code).inc()
            log.info("refused request id=%s: %s", rid, exc)
            return error_from(exc)
        except TargetError as exc:
            if ERRORS:
                ERRORS.labels("internal").inc()
            log.error("gallery unavailable for id=%s: %s", rid, exc)
            return error_reply("internal", f"gallery unavailable, retry later: {exc}", rid)
        except Exception as exc:  # a bug must not kill the service or leave the client hanging
            if ERRORS:
                ERRORS.labels("internal").inc()
            log.exception("internal error on id=%s", rid)
            return error_reply("internal", f"{type(exc).__name__}: {exc}", rid)

    def _ingest(self, header: dict[str, Any], frames: list[bytes], rid: str | None) -> bytes:
        t0 = time.perf_counter()
        try:
            key = check_key(header.get("key"))
            meta = check_meta(header.get("meta"))
            if len(frames) not in (1, 2):
                raise ProtocolError("size_mismatch", f"ingest takes an image frame and optional features frame, got {len(frames)} frames")
            features = check_features(frames[1] if len(frames) == 2 else None, header.get("features_dim"), self.config.limits)
            # A redelivery (same key or same bytes) is answered before any decoding.
            outcome = self.ingester.known(key, frames[0])
            if outcome is None:
                image = check_image(frames[0], self.config.limits)
        except ProtocolError as exc:
            exc.request_id = rid
            raise
        if outcome is None:
            outcome = self.ingester.ingest(key, meta, image, features, min_side=self.config.limits.min_side)
        if INGESTS:
            INGESTS.labels(outcome.status).inc()
            SECONDS.observe(time.perf_counter() - t0)
        return ok_reply(rid, **outcome.reply_fields())


def _split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER frames -> (routing envelope, request body); REQ adds an empty delimiter, DEALER may not."""
    if len(frames) >= 2 and frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]
