"""Load-balancing broker (the ZeroMQ guide's LRU pattern) for scaling out anti_sus workers.

Clients talk to the frontend ROUTER exactly as to a server. Workers
(``anti-sus serve --connect BACKEND``) connect a DEALER to the backend ROUTER
and announce capacity with ``READY`` frames; every reply also returns one unit.
Requests go only to workers with capacity, least recently used first; while no
worker is free the frontend is not read, so requests wait in ZeroMQ's queues.
A worker that dies with a request in hand loses it: the client's Lazy Pirate
retry sends it again and it goes to another worker.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path

import zmq

from .server import BYE, READY
from .wire import Limits

log = logging.getLogger(__name__)


class Broker:
    """Frontend ROUTER for clients, backend ROUTER for workers."""

    def __init__(self, frontends: list[str], backends: list[str], *, limits: Limits | None = None, hwm: int = 64,
                 curve_secret_key: Path | None = None, curve_allow: Path | None = None,
                 ctx: zmq.Context | None = None) -> None:
        self.ctx = ctx or zmq.Context()
        self._own_ctx = ctx is None
        self._stop = threading.Event()
        self._auth = None
        limits = limits or Limits()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.backend = self.ctx.socket(zmq.ROUTER)
        # Sending to a worker that is gone must fail loudly so its capacity is dropped, not silently lost.
        self.backend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        for s in (self.frontend, self.backend):
            s.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
            s.setsockopt(zmq.RCVHWM, hwm)
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.LINGER, 1000)
        if curve_secret_key is not None:
            from .security import secure_server

            self._auth = secure_server(self.ctx, [self.frontend], curve_secret_key, curve_allow)
        self.frontend_endpoints = [self._bind(self.frontend, ep) for ep in frontends]
        self.backend_endpoints = [self._bind(self.backend, ep) for ep in backends]
        self.idle: deque[bytes] = deque()
        self.forwarded: dict[bytes, int] = {}

    @staticmethod
    def _bind(sock: zmq.Socket, ep: str) -> str:
        sock.bind(ep)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        log.info("broker: clients on %s, workers on %s", ", ".join(self.frontend_endpoints), ", ".join(self.backend_endpoints))
        poller = zmq.Poller()
        poller.register(self.backend, zmq.POLLIN)
        reading = False
        try:
            while not self._stop.is_set():
                if bool(self.idle) != reading:  # read clients only while some worker is free
                    if self.idle:
                        poller.register(self.frontend, zmq.POLLIN)
                    else:
                        poller.unregister(self.frontend)
                    reading = bool(self.idle)
                events = dict(poller.poll(100))
                if self.backend in events:
                    self._from_worker(self.backend.recv_multipart(copy=False))
                if self.frontend in events and self.idle:
                    self._to_worker(self.frontend.recv_multipart(copy=False))
        finally:
            log.info("broker stopped; requests forwarded per worker: %s",
                     " ".join(f"{w.hex()}={n}" for w, n in self.forwarded.items()) or "none")
            self.frontend.close()
            self.backend.close()
            if self._auth is not None:
                self._auth.stop()
            if self._own_ctx:
                self.ctx.term()

    def _from_worker(self, frames: list[zmq.Frame]) -> None:
        worker = frames[0].bytes
        if len(frames) == 2 and frames[1].bytes == READY:
            self.idle.append(worker)
            log.debug("worker %s ready (%d credits free)", worker.hex(), len(self.idle))
            return
        if len(frames) == 2 and frames[1].bytes == BYE:
            self.idle = deque(w for w in self.idle if w != worker)
            log.info("worker %s left", worker.hex())
            return
        if len(frames) < 3:
            log.warning("malformed message from worker %s dropped", worker.hex())
            return
        self.idle.append(worker)  # a reply returns the unit of capacity it used
        try:
            self.frontend.send_multipart(frames[1:], copy=False)
        except zmq.ZMQError as exc:
            log.warning("reply to a departed client dropped: %s", exc)

    def _to_worker(self, frames: list[zmq.Frame]) -> None:
        while self.idle:
            worker = self.idle.popleft()
            try:
                self.backend.send_multipart([worker, *frames], copy=False)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker is gone; try the next one
                log.warning("worker %s unreachable (%s); dropped", worker.hex(), exc)
                self.idle = deque(w for w in self.idle if w != worker)
                continue
            self.forwarded[worker] = self.forwarded.get(worker, 0) + 1
            return
        log.warning("no worker left for a request; the client will retry")
