"""Load-balancing broker (the ZeroMQ guide's LRU pattern, with heartbeats) for scaling out anti_sus workers.

Clients talk to the frontend ROUTER exactly as to a server. Workers
(``anti-sus serve --connect BACKEND``) connect a DEALER to the backend ROUTER.

Worker -> broker messages (after the worker's routing id):

- ``READY <free> <received>``: "I can take ``free`` more requests and have
  received ``received`` in all". Sent at start and then every heartbeat
  interval, so a restarted broker learns its workers again and a silent worker
  can be told from a live one. The broker subtracts the requests it sent that
  the worker had not yet received, so a request crossing a heartbeat on the
  wire is not counted twice.
- ``BYE``: the worker is stopping; forget it.
- anything else is a reply ``[client id…, '', reply…]``: forwarded to the client,
  and it returns one unit of capacity.

Requests go to the least recently used worker with free capacity; while none
has any, the frontend is not read, so requests wait in ZeroMQ's queues. A
worker not heard from for ``worker_timeout`` seconds is dropped, and one whose
connection is gone is dropped at the first send (``ROUTER_MANDATORY``). A
worker that dies with a request in hand loses it: the client's Lazy Pirate
retry sends it again and it goes to another worker.

CURVE: the frontend and the backend are secured apart. ``curve_secret_key`` /
``curve_allow`` make the frontend a CURVE server for clients (nomad);
``backend_curve_secret_key`` / ``backend_curve_allow`` make the backend one for
workers, which then connect with the backend's public key and their own key
pair (``anti-sus serve --connect … --curve-server-key … --curve-client-key …``).
The backend always needs an allow-list: a worker receives every image and
writes every verdict, so "anyone who knows the public key" is not enough there.
The backend gets its own ZeroMQ context, because a ZAP handler (and its
allow-list) serves a whole context and the two sides allow different keys.

Rolling reload: a client's ``reload`` op (``anti-sus reload --server FRONTEND``)
is not forwarded; the broker reloads its workers one after another. It takes
one worker out of the rotation, waits until that worker has answered every
request it was given (drained), sends it ``reload`` (the worker loads its models
beside the old ones and swaps, see :mod:`anti_sus.server`), puts it back once it
reports, and goes on with the next. The others keep serving meanwhile, so with
two or more workers capacity never drops to zero. The first worker that fails
stops the round (the rest keep their models) and the client gets
``reload_failed`` naming it; otherwise one reply lists every worker's
generation and manifest hash. With CURVE on the frontend only ``admin_keys``
may ask (``--admin-allow``); others get ``forbidden``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from photocore.curve import CurveKeyError
from photocore.envelope import split_envelope
from photocore.protocol import MAX_HEADER_BYTES, error_reply, ok_reply

from .wire import Limits

log = logging.getLogger(__name__)

READY = b"READY"
BYE = b"BYE"
DEFAULT_WORKER_TIMEOUT = 10.0
RELOAD_TAG = b"\x01anti-sus-broker-reload"
"""Routing frame of the broker's own reload requests to a worker (ROUTER-made client ids start with a zero byte)."""
DEFAULT_RELOAD_TIMEOUT = 300.0


@dataclass
class _Rolling:
    """A rolling reload in progress: whom to answer, which workers are left, the one being reloaded."""

    client: list[Any]
    rid: str | None
    pending: list[bytes]
    current: bytes | None = None
    sent_at: float | None = None
    done: list[dict[str, Any]] = field(default_factory=list)


class Broker:
    """Frontend ROUTER for clients, backend ROUTER for workers."""

    def __init__(self, frontends: list[str], backends: list[str], *, limits: Limits | None = None, hwm: int = 64,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT, curve_secret_key: Path | None = None,
                 curve_allow: Path | None = None, backend_curve_secret_key: Path | None = None,
                 backend_curve_allow: Path | None = None, ctx: zmq.Context | None = None,
                 admin_keys: frozenset[str] | None = None, reload_timeout: float = DEFAULT_RELOAD_TIMEOUT) -> None:
        if backend_curve_secret_key is not None and backend_curve_allow is None:
            raise CurveKeyError("CURVE on the broker's backend needs an allow-list of worker public keys "
                                "(--backend-curve-allow DIR): any key holder could otherwise pose as a worker")
        if backend_curve_allow is not None and backend_curve_secret_key is None:
            raise CurveKeyError("--backend-curve-allow needs --backend-curve-secret-key")
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self._stop = threading.Event()
        self._auth = None
        self._backend_auth = None
        # Its own context (so its own ZAP handler) when the backend has an allow-list of its own.
        self._backend_ctx = zmq.Context() if backend_curve_secret_key is not None else None
        self.worker_timeout = worker_timeout
        limits = limits or Limits()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = (self._backend_ctx or self.ctx).socket(zmq.ROUTER)
        # Sending to a worker that is gone must fail loudly so it is dropped, not silently fed.
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for s in (self.frontend, self.backend):
            s.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
            s.setsockopt(zmq.RCVHWM, hwm)
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.LINGER, 1000)
        if curve_secret_key is not None:
            from photocore.curve import secure_server

            self._auth = secure_server(self.ctx, [self.frontend], curve_secret_key, curve_allow)
        if self._backend_ctx is not None:
            from photocore.curve import secure_server

            self._backend_auth = secure_server(self._backend_ctx, [self.backend], backend_curve_secret_key,  # type: ignore[arg-type]
                                               backend_curve_allow)
        self.frontend_endpoints = [self._bind(self.frontend, ep) for ep in frontends]
        self.backend_endpoints = [self._bind(self.backend, ep) for ep in backends]
        # worker id -> free capacity, in least-recently-used order (first = longest without work)
        self.free: OrderedDict[bytes, int] = OrderedDict()
        self.seen: dict[bytes, float] = {}
        self.forwarded: dict[bytes, int] = {}  # per worker, for the whole run (logged at exit)
        self._sent: dict[bytes, int] = {}      # since the worker joined
        self._base: dict[bytes, int] = {}      # its 'received' count when it joined
        self._outstanding: dict[bytes, int] = {}  # requests given to it and not yet answered
        self._curve = curve_secret_key is not None
        self.admin_keys = admin_keys
        self.reload_timeout = reload_timeout
        self._rolling: _Rolling | None = None

    @staticmethod
    def _bind(sock: zmq.Socket, ep: str) -> str:
        sock.bind(ep)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    @property
    def capacity(self) -> int:
        """Requests the known workers can take right now (the one draining for a reload takes none)."""
        draining = self._rolling.current if self._rolling is not None else None
        return sum(n for w, n in self.free.items() if w != draining)

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        log.info("broker: clients on %s, workers on %s", ", ".join(self.frontend_endpoints), ", ".join(self.backend_endpoints))
        poller = zmq.Poller()
        poller.register(self.backend, zmq.POLLIN)
        reading = False
        try:
            while not self._stop.is_set():
                self._expire()
                self._step_reload()
                want = self.capacity > 0
                if want != reading:  # read clients only while some worker can take a request
                    if want:
                        poller.register(self.frontend, zmq.POLLIN)
                    else:
                        poller.unregister(self.frontend)
                    reading = want
                events = dict(poller.poll(100))
                if self.backend in events:
                    self._from_worker(self.backend.recv_multipart(copy=False))
                if self.frontend in events and self.capacity > 0:
                    self._from_client(self.frontend.recv_multipart(copy=False))
        finally:
            log.info("broker stopped; requests forwarded per worker: %s",
                     " ".join(f"{w.hex()}={n}" for w, n in self.forwarded.items()) or "none")
            self.frontend.close()
            self.backend.close()
            for auth in (self._auth, self._backend_auth):
                if auth is not None:
                    auth.stop()
            if self._backend_ctx is not None:
                self._backend_ctx.term()
            if self._own_ctx:
                self.ctx.term()

    def _drop(self, worker: bytes, why: str) -> None:
        if self.free.pop(worker, None) is not None:
            log.info("worker %s dropped: %s", worker.hex(), why)
        for d in (self.seen, self._sent, self._base, self._outstanding):
            d.pop(worker, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for worker in [w for w, t in self.seen.items() if now - t > self.worker_timeout]:
            self._drop(worker, f"silent for more than {self.worker_timeout:g} s")

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        worker = frames[0].bytes
        body = [f.bytes for f in frames[1:]] if len(frames) <= 4 else []
        if body == [BYE]:
            self._drop(worker, "said goodbye")
            return
        if len(body) == 3 and body[0] == READY and body[1].isdigit() and body[2].isdigit():
            free, received = int(body[1]), int(body[2])
            if worker not in self.free:
                log.info("worker %s joined with capacity %d", worker.hex(), free)
                self.free[worker] = 0
                self._sent[worker], self._base[worker], self._outstanding[worker] = 0, received, 0
            on_the_wire = max(0, self._sent[worker] - (received - self._base[worker]))
            self.free[worker] = max(0, free - on_the_wire)
            self.seen[worker] = time.monotonic()
            return
        if len(frames) < 3:
            log.warning("malformed message from worker %s dropped", worker.hex())
            return
        if frames[1].bytes == RELOAD_TAG:  # the worker's answer to our reload, not a client's reply
            self._reloaded(worker, frames[-1].bytes)
            return
        if worker in self.free:  # a reply returns the unit of capacity it used
            self.seen[worker] = time.monotonic()
            self.free[worker] += 1
            self._outstanding[worker] = max(0, self._outstanding.get(worker, 0) - 1)
        try:
            self.frontend.send_multipart(frames[1:], copy=False)
        except zmq.ZMQError as exc:
            log.warning("reply to a departed client dropped: %s", exc)

    def _to_worker(self, frames: list[zmq.Frame]) -> None:
        draining = self._rolling.current if self._rolling is not None else None
        for worker in [w for w, n in self.free.items() if n > 0 and w != draining]:  # least recently used first
            try:
                self.backend.send_multipart([worker, *frames], copy=False)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker is gone; try the next one
                self._drop(worker, f"unreachable ({exc})")
                continue
            self.free[worker] -= 1
            self._sent[worker] += 1
            self._outstanding[worker] = self._outstanding.get(worker, 0) + 1
            self.free.move_to_end(worker)
            self.forwarded[worker] = self.forwarded.get(worker, 0) + 1
            log.debug("request to worker %s", worker.hex())
            return
        log.warning("no worker left for a request; the client will retry")

    # -- rolling reload ----------------------------------------------------------
    def _from_client(self, frames: list[zmq.Frame]) -> None:
        """A client's message: a ``reload`` op starts a rolling reload here, anything else goes to a worker."""
        envelope, body = split_envelope(frames)
        header = None
        if len(body) == 1 and len(body[0]) <= MAX_HEADER_BYTES:
            try:
                header = json.loads(body[0].bytes)
            except ValueError:  # not JSON (e.g. a legacy frame): the worker answers it
                header = None
        if not (isinstance(header, dict) and header.get("op") == "reload"):
            self._to_worker(frames)
            return
        rid = header.get("id") if isinstance(header.get("id"), str) else None
        if self._curve:
            try:
                user = frames[-1].get("User-Id")
            except (zmq.ZMQError, AttributeError, TypeError):
                user = None
            if not (user and self.admin_keys and user in self.admin_keys):
                self._answer(envelope, error_reply("forbidden", "reload is an admin op: this client's CURVE key is "
                                                   "not in the broker's --admin-allow list", rid))
                return
        if self._rolling is not None:
            self._answer(envelope, error_reply("busy", "a rolling reload is already in progress; retry later", rid))
            return
        log.info("rolling reload of %d worker(s) asked", len(self.free))
        self._rolling = _Rolling(envelope, rid, list(self.free))

    def _answer(self, envelope: list[Any], reply: bytes) -> None:
        try:
            self.frontend.send_multipart([*envelope, reply])
        except zmq.ZMQError as exc:
            log.warning("reload reply to a departed client dropped: %s", exc)

    def _step_reload(self) -> None:
        """Advance the rolling reload: pick the next worker, send it ``reload`` once drained, finish at the end."""
        r = self._rolling
        if r is None:
            return
        if r.current is not None and r.current not in self.free:
            self._worker_done(r.current, {"error": "the worker left during its reload"})
            return
        if r.current is not None and r.sent_at is not None and time.monotonic() - r.sent_at > self.reload_timeout:
            self._worker_done(r.current, {"error": f"no answer to reload within {self.reload_timeout:g} s"})
            return
        if r.current is None:
            while r.pending and r.pending[0] not in self.free:
                r.pending.pop(0)  # gone since the round began
            if not r.pending:
                self._finish_reload()
                return
            r.current, r.sent_at = r.pending.pop(0), None
            log.info("rolling reload: draining worker %s", r.current.hex())
        if r.sent_at is None and self._outstanding.get(r.current, 0) == 0:
            header = json.dumps({"v": 1, "op": "reload", "id": f"broker-{r.current.hex()}"}).encode()
            try:
                self.backend.send_multipart([r.current, RELOAD_TAG, b"", header])
            except zmq.ZMQError as exc:
                self._drop(r.current, f"unreachable ({exc})")
                return
            self._base[r.current] = self._base.get(r.current, 0) + 1  # its 'received' counts this message too
            r.sent_at = time.monotonic()

    def _reloaded(self, worker: bytes, raw: bytes) -> None:
        r = self._rolling
        if r is None or worker != r.current:
            log.warning("late reload answer from worker %s ignored", worker.hex())
            return
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = {}
        if not isinstance(reply, dict):
            reply = {}
        if reply.get("ok"):
            self._worker_done(worker, {k: reply.get(k) for k in ("generation", "manifest_sha256", "models_dir")})
        else:
            err = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            self._worker_done(worker, {"error": str(err.get("message") or "malformed answer to reload")})

    def _worker_done(self, worker: bytes, result: dict[str, Any]) -> None:
        r = self._rolling
        assert r is not None
        r.done.append({"worker": worker.hex(), **result})
        r.current, r.sent_at = None, None
        if "error" in result:
            log.error("rolling reload stopped at worker %s: %s", worker.hex(), result["error"])
            self._finish_reload()
        else:
            log.info("rolling reload: worker %s at generation %s", worker.hex(), result.get("generation"))

    def _finish_reload(self) -> None:
        r = self._rolling
        assert r is not None
        self._rolling = None
        failed = [d for d in r.done if "error" in d]
        if failed:
            ok = len(r.done) - len(failed)
            msg = (f"worker {failed[0]['worker']}: {failed[0]['error']}; {ok} worker(s) reloaded before it, "
                   f"{len(r.pending)} not tried (they keep their models)")
            self._answer(r.client, error_reply("reload_failed", msg, r.rid))
        elif not r.done:
            self._answer(r.client, error_reply("reload_failed", "no worker to reload", r.rid))
        else:
            hashes = {d.get("manifest_sha256") for d in r.done}
            self._answer(r.client, ok_reply(r.rid, workers=r.done,
                                            manifest_sha256=hashes.pop() if len(hashes) == 1 else None))
        log.info("rolling reload finished: %d worker(s), %d failed", len(r.done), len(failed))
