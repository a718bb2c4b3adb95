"""The filter server: a ROUTER (or a broker worker) in front of the pipeline.

Two threads. The I/O thread owns every socket: it receives, validates
(``wire.parse_request``), answers ping/info/errors at once and queues filter
requests fairly per client. The compute thread takes batches of whole requests
(up to ``max_batch`` images), runs them through one ``pipeline.evaluate`` call
and hands the replies back over an inproc socket, so a slow batch never stops
the server from answering pings or refusing bad input.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from . import __version__
from .broker import BYE, READY
from .fairqueue import FairQueue
from .metrics import BATCH_IMAGES, ERRORS, IMAGES, QUEUE_DEPTH, REQUESTS, STAGE_SECONDS
from .pipeline import Stages, Task, Timings, evaluate
from .protocol import ProtocolError, error_reply, ok_reply
from .wire import Filter, Info, Limits, Ping, parse_request, split_envelope

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:7777"


@dataclass
class ServerConfig:
    """Everything the server needs besides the pipeline."""

    binds: list[str] = field(default_factory=lambda: [DEFAULT_BIND])
    connect: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 32
    max_queue: int = 256
    hwm: int = 16
    credits: int = 1
    heartbeat: float = 2.0
    curve_secret_key: Path | None = None
    curve_allow: Path | None = None
    linger_ms: int = 2000


@dataclass
class Job:
    envelope: list[bytes]
    request: Filter
    received: float
    frames: list[Any]  # keep the received frames alive: ``request.images`` views them

    @property
    def n_images(self) -> int:
        return len(self.request.images)


class FilterServer:
    """Bind (or connect as a broker worker), then ``serve_forever`` until ``stop``."""

    def __init__(self, pipeline: Stages, config: ServerConfig, ctx: zmq.Context | None = None) -> None:
        self.pipeline = pipeline
        self.config = config
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self.endpoints: list[str] = []
        self._stop = threading.Event()
        self._queue: FairQueue[Job] = FairQueue()
        self._outbox: queue.SimpleQueue[tuple[list[bytes], list[Any]]] = queue.SimpleQueue()
        self._auth = None
        self._sock: zmq.Socket | None = None
        self._wake_addr = f"inproc://anti-sus-wake-{id(self)}"
        self.processed = 0
        self._in_flight = 0
        self._received = 0

    # -- setup ---------------------------------------------------------------
    def bind(self) -> list[str]:
        """Create and bind/connect the socket; returns the endpoints actually bound."""
        cfg = self.config
        kind = zmq.DEALER if cfg.connect else zmq.ROUTER
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.MAXMSGSIZE, cfg.limits.max_message_bytes)
        sock.setsockopt(zmq.RCVHWM, cfg.hwm)
        sock.setsockopt(zmq.SNDHWM, cfg.hwm)
        sock.setsockopt(zmq.LINGER, cfg.linger_ms)
        try:
            if cfg.curve_secret_key is not None:
                from .security import secure_server

                self._auth = secure_server(self.ctx, [sock], cfg.curve_secret_key, cfg.curve_allow)
            if cfg.connect:
                sock.connect(cfg.connect)
                self.endpoints = [cfg.connect]
            else:
                for ep in cfg.binds:
                    sock.bind(ep)
                    self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except Exception:
            sock.close(0)
            self._stop_auth()
            raise
        self._sock = sock
        return self.endpoints

    def stop(self) -> None:
        """Ask the server to finish: the batch in flight is answered, queued requests get an error."""
        self._stop.set()
        self._queue.wake()

    # -- main loop -----------------------------------------------------------
    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        sock = self._sock
        assert sock is not None
        wake = self.ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        compute = threading.Thread(target=self._compute_loop, name="anti-sus-compute", daemon=True)
        compute.start()
        last_beat = 0.0
        log.info("anti_sus %s serving on %s (max_batch=%d, max_images=%d, max_pixels=%d)", __version__,
                 ", ".join(self.endpoints), self.config.max_batch, self.config.limits.max_images, self.config.limits.max_pixels)
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        reading = False
        try:
            while not self._stop.is_set():
                if self.config.connect and time.monotonic() - last_beat >= self.config.heartbeat:
                    self._beat()
                    last_beat = time.monotonic()
                want = self._queue.images < self.config.max_queue
                if want != reading:  # backpressure: stop reading while the queue is full
                    if want:
                        poller.register(sock, zmq.POLLIN)
                    else:
                        poller.unregister(sock)
                    reading = want
                events = dict(poller.poll(100))
                if wake in events:
                    self._flush_wake(wake)
                if sock in events:
                    for _ in range(64):  # bounded drain, then look at replies again
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        if self._queue.images >= self.config.max_queue:
                            break
        finally:
            self._shutdown(compute, wake)

    def _beat(self) -> None:
        """Worker mode: tell the broker how many more requests we can take (also our heartbeat)."""
        assert self._sock is not None
        free = max(0, self.config.credits - self._in_flight)
        try:
            self._sock.send_multipart([READY, str(free).encode(), str(self._received).encode()], zmq.NOBLOCK)
        except zmq.ZMQError:  # broker unreachable and HWM full: the next beat tries again
            pass

    def _flush_wake(self, wake: zmq.Socket) -> None:
        while True:
            try:
                wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        self._send_outbox()

    def _send_outbox(self) -> None:
        assert self._sock is not None
        while True:
            try:
                envelope, frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            self._send(envelope, frames)

    def _send(self, envelope: list[bytes], frames: list[Any]) -> None:
        assert self._sock is not None
        self._in_flight = max(0, self._in_flight - 1)
        try:
            self._sock.send_multipart(envelope + frames, copy=False)
        except zmq.ZMQError as exc:  # peer gone or HWM reached: nothing else to do with this reply
            log.warning("reply dropped: %s", exc)

    def _reply_error(self, envelope: list[bytes], exc: ProtocolError) -> None:
        ERRORS.labels(exc.code).inc()
        REQUESTS.labels("invalid", "error").inc()
        log.info("request refused: %s", exc, extra={"request_id": exc.request_id, "code": exc.code})
        self._send(envelope, [error_reply(exc.code, exc.message, exc.request_id)])

    def _handle(self, frames: list[Any]) -> None:
        received = time.perf_counter()
        self._in_flight += 1  # every message gets exactly one reply through _send
        self._received += 1
        envelope_frames, body = split_envelope(frames)
        envelope = [f.bytes for f in envelope_frames]
        try:
            req = parse_request(body, self.config.limits)
        except ProtocolError as exc:
            self._reply_error(envelope, exc)
            return
        except Exception as exc:  # a bug must not kill the server; the client still gets an answer
            log.exception("request validation failed")
            self._reply_error(envelope, ProtocolError("internal", f"internal error: {type(exc).__name__}"))
            return
        if isinstance(req, Ping):
            REQUESTS.labels("ping", "ok").inc()
            self._send(envelope, [ok_reply(req.id, pong=True, version=__version__)])
        elif isinstance(req, Info):
            REQUESTS.labels("info", "ok").inc()
            self._send(envelope, [ok_reply(req.id, **self.info())])
        else:
            self._queue.put(envelope[0] if envelope else b"", Job(envelope, req, received, frames))
            QUEUE_DEPTH.set(self._queue.images)

    def info(self) -> dict[str, Any]:
        """The ``info`` reply's fields: models, thresholds, limits, version."""
        data = dict(self.pipeline.info())
        data.setdefault("version", __version__)
        data["limits"] = {"max_images": self.config.limits.max_images, "max_pixels": self.config.limits.max_pixels,
                          "max_message_bytes": self.config.limits.max_message_bytes, "max_batch": self.config.max_batch}
        data["protocol"] = 1
        data["legacy_format"] = True
        data["curve"] = self.config.curve_secret_key is not None
        return data

    # -- compute thread --------------------------------------------------------
    def _compute_loop(self) -> None:
        push = self.ctx.socket(zmq.PUSH)
        push.connect(self._wake_addr)
        try:
            while True:
                jobs = self._queue.take(self.config.max_batch, timeout=0.1)
                QUEUE_DEPTH.set(self._queue.images)
                if not jobs:
                    if self._stop.is_set():
                        return
                    continue
                for envelope, frames in self._run_batch(jobs):
                    self._outbox.put((envelope, frames))
                push.send(b"")
        finally:
            push.close(0)

    def _run_batch(self, jobs: list[Job]) -> list[tuple[list[bytes], list[Any]]]:
        p = self.pipeline
        tasks = [Task(j.request.images,
                      p.gmm_threshold if j.request.gmm_threshold is None else j.request.gmm_threshold,
                      p.watermark_threshold if j.request.watermark_threshold is None else j.request.watermark_threshold)
                 for j in jobs]
        timings = Timings()
        n = sum(len(t.images) for t in tasks)
        try:
            outcomes = evaluate(p, tasks, timings=timings)
        except Exception as exc:  # the pipeline failed: every request of the batch gets an answer
            log.exception("pipeline failed on a batch of %d images", n)
            for _ in jobs:
                ERRORS.labels("internal").inc()
                REQUESTS.labels("filter", "error").inc()
            return [(j.envelope, [error_reply("internal", f"pipeline failed: {type(exc).__name__}: {exc}", j.request.id)]) for j in jobs]
        BATCH_IMAGES.observe(n)
        for stage, secs in timings.stages.items():
            STAGE_SECONDS.labels(stage).observe(secs)
        self.processed += n
        out = []
        for job, oc in zip(jobs, outcomes):
            good = oc.good
            for v in oc.verdicts:
                IMAGES.labels(v).inc()
            REQUESTS.labels("filter", "ok").inc()
            req = job.request
            elapsed = (time.perf_counter() - job.received) * 1000.0
            if req.legacy:
                log.info("legacy filter images=%d good=%d batch=%d %.1f ms", len(oc.verdicts), len(good), n, elapsed)
                out.append((job.envelope, [np.asarray(good, dtype="<i4").tobytes()]))
                continue
            fields: dict[str, Any] = {"good": good, "results": oc.results(), "elapsed_ms": round(elapsed, 3)}
            frames: list[Any] = []
            if req.return_features:
                feats = np.ascontiguousarray(oc.features[good], dtype="<f4")
                fields["features_shape"] = list(feats.shape)
                frames.append(feats.tobytes())
            out.append((job.envelope, [ok_reply(req.id, **fields), *frames]))
            log.info("filter id=%s images=%d good=%d batch=%d %.1f ms", req.id, len(oc.verdicts), len(good), n, elapsed,
                     extra={"request_id": req.id})
        return out

    # -- shutdown --------------------------------------------------------------
    def _shutdown(self, compute: threading.Thread, wake: zmq.Socket) -> None:
        for job in self._queue.drain():
            ERRORS.labels("internal").inc()
            self._send(job.envelope, [error_reply("internal", "server is shutting down", job.request.id)])
        compute.join(timeout=60)  # the batch in flight finishes and is answered
        self._send_outbox()
        for job in self._queue.drain():
            self._send(job.envelope, [error_reply("internal", "server is shutting down", job.request.id)])
        assert self._sock is not None
        if self.config.connect:
            try:
                self._sock.send(BYE, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        wake.close(0)
        self._sock.close(self.config.linger_ms)
        self._sock = None
        self._stop_auth()
        if self._own_ctx:
            self.ctx.term()
        log.info("anti_sus stopped after %d images", self.processed)

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
