"""One request/reply client for every ZeroMQ service: the ZeroMQ guide's Lazy Pirate.

A REQ socket, a poll with a timeout; on timeout the socket is closed and
rebuilt (a REQ socket that missed its reply is stuck in its send state) and the
request sent again, at most ``retries`` times, then :class:`Unavailable`. An
error reply raises :class:`ServerError` (with its protocol ``code``) without
retrying, except ``busy`` when the client was given a ``busy_wait``: then the
request is sent again after a growing, jittered pause (:class:`photocore.backoff.Backoff`)
until ``busy_wait`` seconds are spent, then :class:`Busy`.

With ``curve`` keys (:func:`photocore.curve.client_keys`) every socket is a
CURVE client, so any service client can talk to a CURVE server.

Service clients subclass :class:`ReqClient` and name their own exception
classes (``server_error``, ``unavailable``, ``busy``), which subclass the ones
here: code that talks to several services can catch :class:`Unavailable` once.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, ClassVar

import zmq

from .backoff import Backoff
from .closing import Closeable
from .curve import ClientKeys
from .protocol import PROTOCOL_VERSION, encode, parse_reply

__all__ = ["Busy", "ReqClient", "ServerError", "Unavailable"]


class ServerError(Exception):
    """The server answered with an error reply; ``code`` is one of the protocol's codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Unavailable(Exception):
    """No answer from the server after every retry."""


class Busy(Unavailable):
    """The server kept answering ``busy`` (its queue is full) for longer than ``busy_wait``."""

    code = "busy"


class ReqClient(Closeable):
    """A Lazy Pirate connection to one server endpoint (or a broker's frontend).

    ``timeout`` is seconds per try; ``retries`` more tries follow a timeout.
    ``busy_wait`` None means a ``busy`` reply is an error like any other.
    ``sleep`` is injectable so tests need not wait.
    """

    server_error: ClassVar[type[ServerError]] = ServerError
    unavailable: ClassVar[type[Unavailable]] = Unavailable
    busy: ClassVar[type[Unavailable]] = Busy
    BUSY_PAUSE: ClassVar[tuple[float, float]] = (0.05, 2.0)
    """First and longest pause between resends of a request answered ``busy``."""

    def __init__(self, endpoint: str, *, timeout: float = 30.0, retries: int = 3, curve: ClientKeys | None = None,
                 context: zmq.Context | None = None, busy_wait: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if retries < 0 or not timeout > 0 or (busy_wait is not None and busy_wait < 0):
            raise ValueError("timeout must be > 0, retries >= 0 and busy_wait >= 0")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.busy_wait = busy_wait
        self.curve = curve
        self._sleep = sleep
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    # -- socket lifecycle ---------------------------------------------------------
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Close the socket (a later request opens a new one)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


    # -- one request ----------------------------------------------------------------
    def call(self, header: dict[str, Any], frames: list[Any] | tuple[Any, ...] = ()) -> tuple[dict[str, Any], list[bytes]]:
        """Send ``header`` (``v`` and a fresh ``id`` added) and ``frames``; the ok reply and its extra frames."""
        header = {"v": PROTOCOL_VERSION, **header, "id": header.get("id") or uuid.uuid4().hex}
        msg = [encode(header), *frames]
        backoff = Backoff(*self.BUSY_PAUSE)
        busy_until = time.monotonic() + (self.busy_wait or 0.0)
        attempt = 0
        while attempt <= self.retries:
            sock = self._socket()
            sock.send_multipart(msg, copy=False)
            if not sock.poll(int(self.timeout * 1000), zmq.POLLIN):
                # No answer: the REQ socket is stuck in its send state, so rebuild it (Lazy Pirate).
                self.close()
                attempt += 1
                continue
            parts = sock.recv_multipart()
            try:
                reply = parse_reply(parts[0])
            except (ValueError, UnicodeDecodeError) as exc:
                raise self.server_error("internal", f"malformed reply: {exc}") from None
            if reply.get("ok"):
                return reply, parts[1:]
            err = reply.get("error") or {}
            code, message = str(err.get("code", "internal")), str(err.get("message", ""))
            if code != "busy" or self.busy_wait is None:
                raise self.server_error(code, message)
            # busy is transient and does not use up a retry; the jitter keeps clients
            # refused together from coming back together.
            left = busy_until - time.monotonic()
            if left <= 0:
                raise self.busy(f"{self.endpoint} busy for {self.busy_wait:g}s: {message}")
            self._sleep(min(left, backoff.next()))
        raise self.unavailable(f"no reply from {self.endpoint} after {self.retries + 1} attempt(s) of {self.timeout:g}s")
