"""The filter server: a ROUTER (or a broker worker) in front of the pipeline.

Two threads. The I/O thread owns every socket: it receives, validates
(``wire.parse_request``), answers ping/info/errors at once and queues filter
requests fairly per client. The compute thread takes batches of whole requests
(up to ``max_batch`` images), runs them through one ``pipeline.evaluate`` call
and hands the replies back over an inproc socket, so a slow batch never stops
the server from answering pings or refusing bad input.

Memory is bounded by what is held, not by what is asked: the I/O thread keeps
reading, and a filter request that would take the work held (queued plus the
batch being computed) past ``max_queue`` images or ``max_queued_bytes`` payload
bytes is answered ``busy`` at once and its frames are released. (Pausing reads
instead would leave the requests in ZeroMQ's receive pipes, up to ``hwm``
messages per client, all of them in this process's memory.)

Hot reload (the ``reload`` op, SIGHUP): a third, short-lived thread loads the
model directory again through ``ServerConfig.loader`` while the other two go
on; the swap is one assignment of ``self.pipeline``, which the compute thread
reads once per batch (see :meth:`FilterServer.reload`).

If the compute thread ever dies, every request it held or that is queued gets
an ``internal`` reply, ``ping`` stops answering OK, and ``serve_forever``
returns with :attr:`FilterServer.failure` set so the process can exit non-zero
and be restarted by its supervisor.

Over 400 lines on purpose: the receive loop, the admission limits and the
compute thread share one queue, one lock and the reply socket's ownership rules;
the parsing and the pipeline already live elsewhere (photocore, anti_sus.wire,
anti_sus.pipeline), what is left is the one state machine.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from . import __version__
from .broker import BYE, READY

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
"""What a worker watches on its connection to the broker, to say why it is not taken."""
from .fairqueue import FairQueue
from .metrics import BATCH_IMAGES, ERRORS, IMAGES, QUEUE_BYTES, QUEUE_DEPTH, REQUESTS, STAGE_SECONDS
from .pipeline import Outcome, Stages, Task, Timings, evaluate
from photocore.envelope import split_envelope
from photocore.protocol import ProtocolError, error_reply, ok_reply

from .wire import Filter, Info, Limits, Ping, Reload, parse_request

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:7777"
DEFAULT_MAX_QUEUED_BYTES = 1 << 30
"""For servers built in code; ``anti-sus serve`` sizes its default to the machine (``cli.default_queued_bytes``)."""


@dataclass
class ServerConfig:
    """Everything the server needs besides the pipeline."""

    binds: list[str] = field(default_factory=lambda: [DEFAULT_BIND])
    connect: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_batch: int = 32
    max_queue: int = 256
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES
    hwm: int = 16
    credits: int = 1
    heartbeat: float = 2.0
    curve_secret_key: Path | None = None
    curve_allow: Path | None = None
    curve_server_key: Path | None = None
    """Worker mode (``connect``): the broker backend's public key; the worker is then a CURVE client."""
    curve_client_key: Path | None = None
    """Worker mode: this worker's ``.key_secret`` (listed in the broker's ``--backend-curve-allow``)."""
    linger_ms: int = 2000
    instance: str | None = None
    loader: Callable[[], Stages] | None = None
    """Builds a fresh pipeline from the model directory (``reload`` op, SIGHUP); None: reload is refused."""
    admin_keys: frozenset[str] | None = None
    """Z85 public keys that may call ``reload`` when CURVE is on (None or empty: none may; SIGHUP still works)."""
    """Token that ``info``/``ping`` report so a launcher can tell its own server from another (random when None)."""


@dataclass
class Job:
    envelope: list[bytes]
    request: Filter
    received: float
    frames: list[Any]  # keep the received frames alive: ``request.images`` views them

    @property
    def n_images(self) -> int:
        return len(self.request.images)

    @property
    def n_bytes(self) -> int:
        return int(self.request.images.nbytes)


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
        self._monitor: zmq.Socket | None = None  # worker mode: the connection's handshake events
        self._handshake_said = False  # a refusal was logged (once, until a handshake succeeds)
        self._wake_addr = f"inproc://anti-sus-wake-{id(self)}"
        self.processed = 0
        self._in_flight = 0
        self._received = 0
        self.pid = os.getpid()
        self.instance = config.instance or uuid.uuid4().hex
        # Payload bytes held (queued + the batch being computed); both threads update it.
        self._held_bytes = 0
        self._held_lock = threading.Lock()
        self._current: list[Job] = []  # the batch the compute thread holds (answered by the I/O thread if it dies)
        self.failure: str | None = None
        self.generation = 1
        """Counts model swaps (1: the models loaded at start); ``info`` reports it so a client can see a reload."""
        self._reload_lock = threading.Lock()  # one reload at a time
        self._reloading = False
        """Set when the compute thread died; ``anti-sus serve`` then exits non-zero."""

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
                from photocore.curve import secure_server

                self._auth = secure_server(self.ctx, [sock], cfg.curve_secret_key, cfg.curve_allow)
            if cfg.connect and cfg.curve_server_key is not None:
                from photocore.curve import secure_client

                secure_client(sock, cfg.curve_server_key, cfg.curve_client_key)
            if cfg.connect:
                # Watched before connecting, so the first handshake's outcome is seen too.
                self._monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
                sock.connect(cfg.connect)
                self.endpoints = [cfg.connect]
            else:
                for ep in cfg.binds:
                    sock.bind(ep)
                    self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except Exception:
            if self._monitor is not None:
                self._monitor.close(0)
                self._monitor = None
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
        # Always read: requests beyond the queue bounds are answered busy (see the module docstring).
        poller.register(sock, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not compute.is_alive():
                    self._compute_died()
                    break
                if self.config.connect and time.monotonic() - last_beat >= self.config.heartbeat:
                    self._beat()
                    last_beat = time.monotonic()
                events = dict(poller.poll(100))
                if wake in events:
                    self._flush_wake(wake)
                if self._monitor is not None and self._monitor in events:
                    self._handshake_event()
                if sock in events:
                    for _ in range(64):  # bounded drain, then look at replies again
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
        finally:
            if self._monitor is not None:
                sock.disable_monitor()
                self._monitor.close(0)
                self._monitor = None
            self._shutdown(compute, wake)

    def _handshake_event(self) -> None:
        """Worker mode: say (once, until a handshake succeeds) why the broker does not take this worker.

        A refused worker is otherwise silent: its connection retries forever and it never gets work.
        """
        from zmq.utils.monitor import recv_monitor_message

        assert self._monitor is not None
        try:
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
        except zmq.Again:
            return
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self._handshake_said:
                log.info("connected to the broker at %s", self.config.connect)
            self._handshake_said = False
            return
        if self._handshake_said:  # one line, not one per reconnect (and one failure can raise two events)
            return
        self._handshake_said = True
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = ("it refused this worker's CURVE key: add this worker's public .key to the broker's "
                   "--backend-curve-allow directory")
        elif self.config.curve_server_key is None:
            why = ("the handshake failed: the broker's backend may need CURVE (--curve-server-key and "
                   "--curve-client-key on this worker)")
        else:
            why = ("the CURVE handshake failed: is --curve-server-key the public key of the broker's "
                   "--backend-curve-secret-key, and is CURVE on for its backend?")
        log.warning("broker at %s does not take this worker: %s (retrying)", self.config.connect, why)

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
        if self.failure is not None:  # health checks must fail once nothing can be computed
            self._reply_error(envelope, ProtocolError("internal", f"{self.failure}; the server is exiting", req.id))
        elif isinstance(req, Ping):
            REQUESTS.labels("ping", "ok").inc()
            self._send(envelope, [ok_reply(req.id, pong=True, version=__version__, pid=self.pid, instance=self.instance)])
        elif isinstance(req, Info):
            REQUESTS.labels("info", "ok").inc()
            self._send(envelope, [ok_reply(req.id, **self.info())])
        elif isinstance(req, Reload):
            denied = self._reload_denied(frames)
            if denied:
                self._reply_error(envelope, ProtocolError("forbidden", denied, req.id))
            elif not self.reload(envelope, req.id):
                self._reply_error(envelope, ProtocolError("busy", "a reload is already in progress; retry later", req.id))
        elif req.prompt_thresholds and (bad := _unknown_checks(self.pipeline, req.prompt_thresholds)):
            self._reply_error(envelope, ProtocolError("bad_header", bad, req.id))
        else:
            self._enqueue(Job(envelope, req, received, frames))

    def _enqueue(self, job: Job) -> None:
        """Queue a filter request, or answer ``busy`` when it would pass either bound on held work."""
        cfg = self.config
        with self._held_lock:
            held = self._held_bytes
            # An empty server always takes one request, so no valid request can be refused forever.
            over_images = self._queue.images > 0 and self._queue.images + job.n_images > cfg.max_queue
            over_bytes = held > 0 and held + job.n_bytes > cfg.max_queued_bytes
            if not (over_images or over_bytes):
                self._held_bytes += job.n_bytes
        if over_images or over_bytes:
            what = (f"{self._queue.images} images queued, --max-queue {cfg.max_queue}" if over_images
                    else f"{held} bytes held, this request {job.n_bytes}, --max-queued-bytes {cfg.max_queued_bytes}")
            ERRORS.labels("busy").inc()
            REQUESTS.labels("filter", "busy").inc()
            log.info("request refused: busy (%s)", what, extra={"request_id": job.request.id, "code": "busy"})
            self._send(job.envelope, [error_reply("busy", f"server busy ({what}); retry later", job.request.id)])
            return  # the job's frames are released here, not held
        self._queue.put(job.envelope[0] if job.envelope else b"", job)
        QUEUE_DEPTH.set(self._queue.images)
        QUEUE_BYTES.set(self._held_bytes)

    def _release(self, n_bytes: int) -> None:
        with self._held_lock:
            self._held_bytes = max(0, self._held_bytes - n_bytes)
        QUEUE_BYTES.set(self._held_bytes)

    @property
    def held_bytes(self) -> int:
        """Payload bytes of the requests queued or being computed."""
        return self._held_bytes

    def info(self) -> dict[str, Any]:
        """The ``info`` reply's fields: models, thresholds, limits, version."""
        data = dict(self.pipeline.info())
        data.setdefault("version", __version__)
        data["limits"] = {"max_images": self.config.limits.max_images, "max_pixels": self.config.limits.max_pixels,
                          "max_message_bytes": self.config.limits.max_message_bytes, "max_batch": self.config.max_batch}
        data["limits"]["max_queue"] = self.config.max_queue
        data["limits"]["max_queued_bytes"] = self.config.max_queued_bytes
        data["protocol"] = 1
        data["legacy_format"] = True
        data["curve"] = self.config.curve_secret_key is not None
        data["pid"] = self.pid
        data["instance"] = self.instance
        data["generation"] = self.generation
        models = data.get("models")
        data["manifest_sha256"] = models.get("manifest_sha256") if isinstance(models, dict) else None
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
                self._current = jobs
                held = sum(j.n_bytes for j in jobs)
                replies = self._run_batch(jobs)
                for envelope, frames in replies:
                    self._outbox.put((envelope, frames))
                self._current = []
                del jobs, replies  # the request frames go now, before their bytes are counted free
                self._release(held)
                push.send(b"")
        except BaseException as exc:  # noqa: BLE001 - whatever killed it, the I/O thread must know
            self.failure = f"compute thread died: {type(exc).__name__}: {exc}"
            log.critical("%s", self.failure, exc_info=True)  # logged once here; the I/O thread acts on it
        finally:
            push.close(0)

    def _compute_died(self) -> None:
        """The compute thread is gone: answer what it held, then leave the loop (the caller exits non-zero)."""
        if self.failure is None:
            self.failure = "compute thread died"
        log.critical("%s: answering held requests with an error and stopping", self.failure)
        self._send_outbox()
        for job in self._current:
            ERRORS.labels("internal").inc()
            self._send(job.envelope, [error_reply("internal", f"{self.failure}; the server is exiting", job.request.id)])
        self._current = []
        self._stop.set()

    def _run_batch(self, jobs: list[Job]) -> list[tuple[list[bytes], list[Any]]]:
        p = self.pipeline
        tasks = [Task(j.request.images,
                      p.gmm_threshold if j.request.gmm_threshold is None else j.request.gmm_threshold,
                      p.watermark_threshold if j.request.watermark_threshold is None else j.request.watermark_threshold,
                      j.request.probe_threshold, j.request.prompt_thresholds)
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
            try:
                out.append((job.envelope, self._reply_frames(job, oc, n, p)))
            except Exception as exc:  # a reply that cannot be built must not kill this thread
                log.exception("reply for request %s could not be built", job.request.id)
                ERRORS.labels("internal").inc()
                REQUESTS.labels("filter", "error").inc()
                out.append((job.envelope, [error_reply("internal", f"reply failed: {type(exc).__name__}: {exc}", job.request.id)]))
        return out

    def _reply_frames(self, job: Job, oc: Outcome, n: int, p: Stages) -> list[Any]:
        """The reply frames of one answered request; an ``internal`` error when a model gave a non-finite score."""
        req = job.request
        if oc.problem:
            log.error("request %s: %s", req.id, oc.problem, extra={"request_id": req.id})
            ERRORS.labels("internal").inc()
            REQUESTS.labels("filter", "error").inc()
            return [error_reply("internal", oc.problem, req.id)]
        good = oc.good
        elapsed = (time.perf_counter() - job.received) * 1000.0
        if req.legacy:
            frames: list[Any] = [np.asarray(good, dtype="<i4").tobytes()]
            log.info("legacy filter images=%d good=%d batch=%d %.1f ms", len(oc.verdicts), len(good), n, elapsed)
        else:
            # The thresholds this request was judged by, so a client can tell how near a rejection was.
            thresholds = {"gmm": p.gmm_threshold if req.gmm_threshold is None else req.gmm_threshold,
                          "watermark": p.watermark_threshold if req.watermark_threshold is None else req.watermark_threshold}
            if getattr(p, "has_probe", False):
                thresholds["probe"] = p.probe_threshold if req.probe_threshold is None else req.probe_threshold
            checks = getattr(p, "prompt_checks", None)
            if checks is not None:  # None: that check was off for this request
                from .stages.prompts import merged_thresholds

                thresholds["prompts"] = merged_thresholds(checks.threshold_of(), req.prompt_thresholds)
            thresholds = {k: v for k, v in thresholds.items() if not (isinstance(v, float) and v != v)}  # NaN: stage not listed
            fields: dict[str, Any] = {"good": good, "results": oc.results(), "elapsed_ms": round(elapsed, 3),
                                      "thresholds": thresholds}
            extra: list[Any] = []
            if req.return_features:
                feats = np.ascontiguousarray(oc.features if req.all_features else oc.features[good], dtype="<f4")
                fields["features_shape"] = list(feats.shape)
                fields["features_of"] = "all" if req.all_features else "good"
                extra.append(feats.tobytes())
            frames = [ok_reply(req.id, **fields), *extra]
            log.info("filter id=%s images=%d good=%d batch=%d %.1f ms", req.id, len(oc.verdicts), len(good), n, elapsed,
                     extra={"request_id": req.id})
        # Counted only once the reply exists, so a failed reply is not also counted as ok.
        for v in oc.verdicts:
            IMAGES.labels(v).inc()
        REQUESTS.labels("filter", "ok").inc()
        return frames


    # -- reload ----------------------------------------------------------------
    def _reload_denied(self, frames: list[Any]) -> str:
        """Why this ``reload`` request may not run ("" when it may).

        With CURVE on, only the keys of the admin allow-list may reload (any client
        the server admits may filter, not every one should swap its models).
        """
        if self.config.loader is None:
            return "this server cannot reload its models (built without a model directory)"
        if self.config.curve_secret_key is None:
            return ""
        try:
            user = frames[-1].get("User-Id")  # the client's Z85 public key, set by the ZAP handler
        except (zmq.ZMQError, AttributeError, TypeError):
            user = None
        if user and self.config.admin_keys and user in self.config.admin_keys:
            return ""
        return ("reload is an admin op: this client's CURVE key is not in the server's --admin-allow list")

    def reload(self, envelope: list[bytes] | None = None, rid: str | None = None) -> bool:
        """Load the models again beside the current ones and swap between batches; False if one is running.

        Runs in its own thread, so the server keeps answering and computing on the old
        models meanwhile. ``envelope``: the client to answer (None: SIGHUP, which logs one line).
        """
        with self._reload_lock:
            if self._reloading:
                return False
            self._reloading = True
        threading.Thread(target=self._reload_worker, args=(envelope, rid), name="anti-sus-reload", daemon=True).start()
        return True

    def _reload_worker(self, envelope: list[bytes] | None, rid: str | None) -> None:
        frames: list[Any]
        try:
            assert self.config.loader is not None
            fresh = self.config.loader()  # verifies the directory like a start does; raises ModelDirError with the fix
        except Exception as exc:  # a bad directory must leave the old models serving, whatever it raised
            why = " ".join(str(exc).split()) or type(exc).__name__
            log.error("reload failed, still serving generation %d: %s", self.generation, why)
            ERRORS.labels("reload_failed").inc()
            frames = [error_reply("reload_failed", f"reload failed, the old models keep serving: {why}", rid)]
        else:
            # One assignment: the compute thread reads ``self.pipeline`` once per batch, so the batch in
            # flight finishes on the old models and the next one runs on the new ones.
            self.pipeline = fresh
            self.generation += 1
            try:  # the client must hear back even if describing the new models fails
                info = self.info()
                log.info("reloaded models from %s: generation %d, manifest %s",
                         (info.get("models") or {}).get("models_dir"), self.generation, str(info.get("manifest_sha256"))[:12])
                REQUESTS.labels("reload", "ok").inc()
                frames = [ok_reply(rid, generation=self.generation, manifest_sha256=info.get("manifest_sha256"),
                                   models_dir=(info.get("models") or {}).get("models_dir"), pid=self.pid, instance=self.instance)]
            except Exception as exc:  # noqa: BLE001 - reported to the client and the log
                log.exception("reloaded to generation %d, but its info failed", self.generation)
                frames = [error_reply("internal", f"reloaded, but info failed: {type(exc).__name__}: {exc}", rid)]
        finally:
            with self._reload_lock:
                self._reloading = False
        if envelope is None:
            return
        self._outbox.put((envelope, frames))
        push = self.ctx.socket(zmq.PUSH)  # wake the I/O thread, which owns the socket the reply goes out on
        try:
            push.connect(self._wake_addr)
            push.send(b"")
        finally:
            push.close(1000)

    # -- shutdown --------------------------------------------------------------
    def _shutdown(self, compute: threading.Thread, wake: zmq.Socket) -> None:
        why = "server is shutting down" if self.failure is None else f"{self.failure}; the server is exiting"
        for job in self._queue.drain():
            ERRORS.labels("internal").inc()
            self._send(job.envelope, [error_reply("internal", why, job.request.id)])
        compute.join(timeout=60)  # the batch in flight finishes and is answered
        self._send_outbox()
        for job in self._queue.drain():
            self._send(job.envelope, [error_reply("internal", why, job.request.id)])
        with self._held_lock:
            self._held_bytes = 0
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


def _unknown_checks(pipeline: Any, asked: dict[str, Any]) -> str:
    """Why a request's ``prompt_thresholds`` name checks this server lacks ("" when all are known)."""
    checks = getattr(pipeline, "prompt_checks", None)
    names = set(checks.names) if checks is not None else set()
    unknown = sorted(set(asked) - names)
    if not unknown:
        return ""
    return f"unknown prompt check(s) {', '.join(unknown)}; this server has: {', '.join(sorted(names)) or 'none'}"
