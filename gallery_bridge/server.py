"""The ZeroMQ service: a ROUTER socket answering ingest, have, review, label, ping and info (docs/design.md §3).

One request at a time on one thread: ingests must be serialised anyway (check
then write), and the gallery's bottleneck is the crawler, not this loop. The
reply to an ingest is sent only after the catalogue commit. A bad request
gets an error reply and never stops the loop.

With CURVE the socket is encrypted; given an allow-list directory, only the
clients whose public key is in it are served (``photocore.curve``, a ZAP
handler thread). :meth:`Server.close` stops and joins every thread the server
started, so nothing of it outlives its owner.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from photocore.closing import Closeable
from photocore.envelope import split_envelope
from photocore.protocol import MAX_HEADER_BYTES, ProtocolError, error_from, error_reply, ok_reply, parse_header, request_id
from photocore.redact import redact

from . import __version__
from .dedup.have import MAX_HAVE_ITEMS, parse_items
from .dedup.have import answer as have_answers
from .ingest import Ingester, crash_hook
from .labels import DEFAULT_KEEP_COPIES, Labeller
from .reviews import DEFAULT_KEEP, ReviewStore, check_review_image, check_stage
from .targets import TargetError
from .validate import Limits, check_features, check_image, check_key, check_meta

log = logging.getLogger(__name__)

try:  # metrics are optional at import time; prometheus_client is a runtime dependency
    from prometheus_client import Counter, Histogram

    INGESTS = Counter("gallery_bridge_ingests_total", "Ingest replies by status", ["status"])
    ERRORS = Counter("gallery_bridge_errors_total", "Error replies by code", ["code"])
    SECONDS = Histogram("gallery_bridge_ingest_seconds", "Time to answer one ingest")
    HAVE = Counter("gallery_bridge_have_total", "Items answered by the have op, by answer", ["answer"])
except ImportError:  # pragma: no cover
    INGESTS = ERRORS = SECONDS = HAVE = None

OVERSIZE_FACTOR = 2
"""Frames up to this many times ``max_image_bytes`` are received and answered
``too_large``; only bigger ones are dropped by libzmq (ZMQ_MAXMSGSIZE)."""


def max_message_bytes(limits: Limits) -> int:
    """The libzmq hard cap: room for an oversized image to be refused with a reply."""
    return OVERSIZE_FACTOR * limits.max_image_bytes + MAX_HEADER_BYTES + 4 * limits.max_features_dim + 1024


@dataclass
class ServerConfig:
    """Socket, limits, CURVE and the identity the server reports in ping/info."""

    bind: str = "tcp://127.0.0.1:7778"
    limits: Limits = field(default_factory=Limits)
    curve_secret: bytes | None = None
    """A bare Z85 secret key: encryption, any client that knows the server key."""
    curve_secret_key: Path | None = None
    """A ZeroMQ certificate file holding the secret key (``anti-sus keygen``)."""
    curve_allow: Path | None = None
    """Directory of allowed clients' public ``.key`` files (needs ``curve_secret_key``)."""
    instance: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Per-start token echoed in ping/info, so a launcher knows it talks to its own child."""
    review_keep: int = DEFAULT_KEEP
    """Review items kept, newest first (``--review-keep``); older ones and their files are deleted."""
    label_copies: int = DEFAULT_KEEP_COPIES
    """Copies of labelled images kept for ``labels export`` (``--label-copies``)."""

    def __post_init__(self) -> None:
        if self.limits is None:  # older callers passed limits=None for the defaults
            self.limits = Limits()


class Server(Closeable):
    """Owns the socket; :meth:`run` loops until :meth:`stop` (or SIGTERM/SIGINT).

    ``start()`` runs the loop on a background thread; ``close()`` stops it,
    joins it, stops the CURVE authenticator and frees the socket and context.
    """

    def __init__(self, ingester: Ingester, config: ServerConfig, context: zmq.Context | None = None) -> None:
        self.ingester = ingester
        self.config = config
        # Review items and labels share the catalogue and this one writer thread.
        self.reviews = ReviewStore(ingester.catalogue, keep=config.review_keep, crash=crash_hook())
        self.labeller = Labeller(ingester, self.reviews, limits=config.limits, keep_copies=config.label_copies)
        # An own context by default: a ZAP authenticator is per context, and two
        # servers in one process must not share (or inherit) each other's.
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._auth: Any = None
        self._closed = False
        self.sock = self._ctx.socket(zmq.ROUTER)
        try:
            self.sock.setsockopt(zmq.LINGER, 1000)
            # Refuse absurd messages in libzmq, before Python ever allocates them;
            # up to OVERSIZE_FACTOR x the image limit still gets a too_large reply.
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(config.limits))
            self.sock.setsockopt(zmq.RCVHWM, 16)
            self._secure(config)
            self.sock.bind(config.bind)
            self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._release()
            raise

    def _secure(self, config: ServerConfig) -> None:
        """CURVE through photocore.curve: a certificate (optionally with an allow-list) or a bare Z85 secret."""
        if config.curve_allow is not None and config.curve_secret_key is None:
            raise ValueError("curve_allow needs curve_secret_key (a certificate file), not a bare curve_secret")
        secret = config.curve_secret_key if config.curve_secret_key is not None else config.curve_secret
        if secret:
            from photocore.curve import secure_server

            self._auth = secure_server(self._ctx, [self.sock], secret, config.curve_allow)

    @property
    def curve(self) -> dict[str, bool]:
        """For ``info``: is the socket encrypted, and are clients checked against a list?"""
        return {"enabled": bool(self.config.curve_secret_key or self.config.curve_secret),
                "allow_list": self.config.curve_allow is not None}

    def stop(self, *_: Any) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def start(self) -> "Server":
        """Run the loop on a background thread (tests, embedding); pair with :meth:`close`."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self.run, name="gallery-bridge-server", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop, join its thread and the authenticator's, free socket and context.

        Raises ``RuntimeError`` when the loop thread is still busy after
        ``timeout`` seconds (an ingest that does not end), rather than leaving
        a thread behind silently.
        """
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"gallery_bridge server thread still running after {timeout:g}s")
            self._thread = None
        self._release()

    def _release(self) -> None:
        """Close the socket, stop (join) the ZAP thread, terminate our own context; once."""
        if self._closed:
            return
        self._closed = True
        if not self.sock.closed:
            self.sock.close(linger=0)
        if self._auth is not None:
            self._auth.stop()  # joins the ZAP thread
            self._auth = None
        if self._own_ctx:
            self._ctx.term()


    def run(self) -> None:
        log.info("gallery_bridge listening on %s (pid %d, instance %s)", self.endpoint, os.getpid(), self.config.instance)
        try:
            while not self._stop.is_set():
                if not self.sock.poll(200, zmq.POLLIN):
                    continue
                frames = self.sock.recv_multipart(copy=True)
                envelope, body = split_envelope(frames)
                reply = self.handle(body)
                self.sock.send_multipart([*envelope, reply])
        finally:
            log.info("gallery_bridge stopping")
            self.sock.close(linger=1000)  # lets the last reply go out
            # The loop owns the cleanup, so a caller that only stops and joins
            # leaves no authenticator thread or context behind either.
            self._release()

    def _identity(self) -> dict[str, Any]:
        return {"version": __version__, "pid": os.getpid(), "instance": self.config.instance}

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
                return ok_reply(rid, pong=True, **self._identity())
            if op == "info":
                return ok_reply(rid, **self._identity(), limits=vars(self.config.limits), curve=self.curve,
                                have={"max_items": MAX_HAVE_ITEMS, "threshold": self.ingester.dedup.config.have_threshold},
                                review={"items": self.reviews.count(), "keep": self.config.review_keep,
                                        "label_copies": self.config.label_copies},
                                **self.ingester.info())
            if op == "ingest":
                return self._ingest(header, body[1:], rid)
            if op == "review":
                return self._review(header, body[1:], rid)
            if op == "label":
                return self._label(header, body[1:], rid)
            if op == "have":
                return self._have(header, body[1:], rid)
            raise ProtocolError("unknown_op", f"unknown op {op!r}; ops are ingest, have, review, label, ping, info", rid)
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
            return error_reply("internal", redact(f"gallery unavailable, retry later: {exc}"), rid)
        except Exception as exc:  # a bug must not kill the service or leave the client hanging
            if ERRORS:
                ERRORS.labels("internal").inc()
            log.exception("internal error on id=%s", rid)
            return error_reply("internal", redact(f"{type(exc).__name__}: {exc}"), rid)

    def _have(self, header: dict[str, Any], frames: list[bytes], rid: str | None) -> bytes:
        """``have``: exact / near / new per (sha256, 64-bit pHash) item, from hashes only (gallery_bridge.dedup.have)."""
        if frames:
            raise ProtocolError("size_mismatch", f"have takes no binary frames, got {len(frames)}", rid)
        items = parse_items(header.get("items"))
        answers = have_answers(self.ingester.catalogue.db, self.ingester.dedup, items)
        if HAVE:
            for a in answers:
                HAVE.labels(a).inc()
        return ok_reply(rid, answers=answers)

    def _review(self, header: dict[str, Any], frames: list[bytes], rid: str | None) -> bytes:
        """``review``: store a rejected image apart from the gallery (gallery_bridge.reviews); idempotent by key."""
        try:
            key = check_key(header.get("key"))
            meta = check_meta(header.get("meta"))
            scores = check_meta({"scores": header.get("scores") or {}}).scores
            stage = check_stage(header.get("rejected_by"))
            if len(frames) not in (1, 2):
                raise ProtocolError("size_mismatch", f"review takes an image frame and optional features frame, got {len(frames)} frames")
            features = check_features(frames[1] if len(frames) == 2 else None, header.get("features_dim"), self.config.limits)
            known = self.reviews.by_key(key)
            if known is not None:  # a resend: answered before any decoding
                return ok_reply(rid, status="duplicate", review_id=known)
            image = check_review_image(frames[0], self.config.limits)
        except ProtocolError as exc:
            exc.request_id = rid
            raise
        added = self.reviews.add(key, meta, image.data, image.width, image.height, scores or meta.scores, stage, features)
        return ok_reply(rid, status=added.status, review_id=added.review_id)

    def _label(self, header: dict[str, Any], frames: list[bytes], rid: str | None) -> bytes:
        """``label``: good/bad on g<id> or r<id> (gallery_bridge.labels); the last label wins."""
        if frames:
            raise ProtocolError("size_mismatch", f"label takes no binary frames, got {len(frames)}", rid)
        try:
            done = self.labeller.label(header.get("item"), header.get("label"))
        except ProtocolError as exc:
            exc.request_id = rid
            raise
        return ok_reply(rid, **done.reply_fields())

    def _ingest(self, header: dict[str, Any], frames: list[bytes], rid: str | None) -> bytes:
        t0 = time.perf_counter()
        try:
            key = check_key(header.get("key"))
            meta = check_meta(header.get("meta"))
            if len(frames) not in (1, 2):
                raise ProtocolError("size_mismatch", f"ingest takes an image frame and optional features frame, got {len(frames)} frames")
            # Before anything reads the bytes (sha256, decode): an oversized frame is refused at once.
            if len(frames[0]) > self.config.limits.max_image_bytes:
                raise ProtocolError("too_large", f"image is {len(frames[0])} bytes, limit {self.config.limits.max_image_bytes}")
            features = check_features(frames[1] if len(frames) == 2 else None, header.get("features_dim"), self.config.limits)
            # A redelivery (same key or same bytes) is answered before any decoding.
            sha = hashlib.sha256(frames[0]).hexdigest()
            outcome = self.ingester.known(key, frames[0], sha)
            if outcome is None:
                image = check_image(frames[0], self.config.limits)
        except ProtocolError as exc:
            exc.request_id = rid
            raise
        if outcome is None:
            # known_sha: the lookup above is not repeated (nor the bytes hashed again).
            outcome = self.ingester.ingest(key, meta, image, features, min_side=self.config.limits.min_side, known_sha=sha)
        if INGESTS:
            INGESTS.labels(outcome.status).inc()
            SECONDS.observe(time.perf_counter() - t0)
        return ok_reply(rid, **outcome.reply_fields())
