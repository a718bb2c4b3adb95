"""Transport: one checked HTTP exchange, its body streamed under byte caps and a deadline.

Per exchange:

- only ``http``/``https``; the host is resolved once, every address checked by
  the SSRF guard (:mod:`nomad.net.guard`), and the socket connects to that
  checked address while TLS still verifies the certificate against the host
  name (SNI, ``Host`` header and hostname check all use the name);
- connect/read timeouts bounded by a :class:`Deadline` that covers the body too,
  and a watchdog that cuts the socket at the deadline (a status line trickled a
  byte at a time cannot hold a worker forever);
- a streamed byte cap that never trusts ``Content-Length``, and a first-bytes
  check that can abort a body early (an HTML page where an image was expected);
- urllib3/socket errors mapped to :class:`~nomad.net.errors.FetchError` reasons.

Redirects, retries and per-host limits are the caller's (:mod:`nomad.net.redirects`,
:mod:`nomad.http`).
"""
from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import urllib3
import urllib3.connection
from urllib3._collections import HTTPHeaderDict
from urllib3.exceptions import (
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from .errors import FetchError
from .guard import AddressPolicy, Target
from .redirects import default_port, is_redirect
from .request import Request
from .watchdog import WATCHDOG

CHUNK = 64 * 1024
SNIFF_BYTES = 32
"""Bytes gathered before the first-bytes check runs (a slow server may send one at a time)."""
ERROR_BODY_MAX = 64 * 1024
"""How much of an error response's body is kept (for messages, flickr/imgur error JSON)."""

FirstBytesCheck = Callable[[bytes, Mapping[str, str]], None]


class Deadline:
    """Remaining time of one attempt; every blocking step is bounded by it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def bound(self, seconds: float, url: str) -> float:
        """``seconds`` or what is left, whichever is shorter; FetchError("timeout") when nothing is left."""
        left = self.left()
        if left <= 0:
            raise FetchError("timeout", f"deadline exceeded fetching {url}", url=url, retryable=False)
        return max(0.001, min(seconds, left))


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, ASCII host, port, path with query) of a URL nomad may fetch; FetchError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise FetchError("bad_url", f"{url!r}: {exc}", url=url) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError("bad_scheme", f"{url!r}: only http and https are fetched", url=url)
    host = (parts.hostname or "").lower().rstrip(".")
    if not host or parts.username is not None or parts.password is not None:
        raise FetchError("bad_url", f"{url!r}: no host, or credentials in the URL", url=url)
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise FetchError("bad_url", f"{url!r}: bad host name", url=url) from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or default_port(scheme), path


_in_flight = threading.local()


class _Exchange:
    """The connection one request is using, so the watchdog can cut it at the deadline."""

    def __init__(self) -> None:
        self.conn: urllib3.connection.HTTPConnection | None = None
        self.lock = threading.Lock()
        self.done = False
        self.cut = False

    def cut_now(self) -> None:
        with self.lock:
            if self.done or self.conn is None:
                return
            sock = self.conn.sock
            self.cut = True
        if sock is not None:
            try:
                # Wakes the worker blocked in recv(); the connection is then discarded.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _track(conn: urllib3.connection.HTTPConnection) -> None:
    ex = getattr(_in_flight, "exchange", None)
    if ex is not None:
        ex.conn = conn


class _TrackedHTTPConnection(urllib3.connection.HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _track(self)
        super().request(*args, **kwargs)


class _TrackedHTTPSConnection(urllib3.connection.HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _track(self)
        super().request(*args, **kwargs)


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The system store plus certifi's (when installed) plus ``--ca-bundle``; ValueError if that cannot load."""
    ctx = ssl.create_default_context()
    try:
        import certifi

        ctx.load_verify_locations(cafile=certifi.where())
    except (ImportError, OSError):  # certifi is optional; the system store is loaded already
        pass
    if ca_bundle:
        try:
            ctx.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"--ca-bundle {ca_bundle}: cannot load certificates: {exc}") from exc
    return ctx


def map_error(exc: Exception, url: str) -> Exception:
    """urllib3/socket exceptions -> FetchError with a stats reason (others unchanged)."""
    if isinstance(exc, SSLError):
        return FetchError("tls", f"{url}: {exc}", url=url)
    if isinstance(exc, NewConnectionError):
        return FetchError("connection", f"{url}: {exc}", url=url)
    if isinstance(exc, (Urllib3Timeout, ReadTimeoutError, socket.timeout, TimeoutError)):
        return FetchError("timeout", f"{url}: {exc}", url=url)
    if isinstance(exc, (ProtocolError, HTTPError, OSError, http.client.HTTPException)):
        return FetchError("connection", f"{url}: {exc}", url=url)
    if isinstance(exc, (ValueError, UnicodeError)):
        # A URL that only fails deep in the HTTP stack (odd characters, bad port).
        return FetchError("bad_url", f"{url!r}: {exc}", url=url)
    return exc


class Transport:
    """Connection pools to checked addresses and the exchange over them; safe to share between threads."""

    max_pools = 64

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        connect_timeout: float,
        read_timeout: float,
        per_host: int,
        ca_bundle: str | None = None,
    ) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.per_host = per_host
        self.ssl_context = make_ssl_context(ca_bundle)
        self._pools: OrderedDict[tuple[str, str, str, int], urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()

    def _pool(self, scheme: str, target: Target) -> urllib3.HTTPConnectionPool:
        """One connection pool per (scheme, host name, checked address, port)."""
        key = (scheme, target.host, target.address, target.port)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            if scheme == "https":
                # Connect to the checked address; SNI and the certificate check use the name.
                pool = urllib3.HTTPSConnectionPool(
                    target.address,
                    target.port,
                    maxsize=self.per_host,
                    block=False,
                    retries=False,
                    ssl_context=self.ssl_context,
                    server_hostname=target.host,
                )
            else:
                pool = urllib3.HTTPConnectionPool(
                    target.address, target.port, maxsize=self.per_host, block=False, retries=False
                )
            pool.ConnectionCls = _TrackedHTTPSConnection if scheme == "https" else _TrackedHTTPConnection
            self._pools[key] = pool
            while len(self._pools) > self.max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for p in pools:
            p.close()

    def exchange(
        self,
        req: Request,
        *,
        deadline: Deadline,
        cap: int,
        first_bytes_check: FirstBytesCheck | None = None,
        skip_redirect_body: bool = True,
    ) -> tuple[int, HTTPHeaderDict, bytes]:
        """One HTTP exchange with the checked address; returns status, headers, (capped) body.

        ``skip_redirect_body``: the body of a followable redirect is not read
        (the caller follows it). Error bodies are kept up to ``ERROR_BODY_MAX``
        and truncated; a success body over ``cap`` is FetchError("too_large").
        """
        url = req.url
        scheme, host, port, path = split_url(url)
        target = self.policy.target(host, port, url=url)
        pool = self._pool(scheme, target)
        hdrs = dict(req.headers)
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        hdrs["Host"] = name if port == default_port(scheme) else f"{name}:{port}"
        timeout = urllib3.Timeout(
            connect=deadline.bound(self.connect_timeout, url), read=deadline.bound(self.read_timeout, url)
        )
        resp = None
        clean = False
        exchange = _Exchange()
        _in_flight.exchange = exchange
        # Socket timeouts bound each read; the watchdog bounds the whole exchange
        # (a status line and headers trickled a byte at a time included).
        alarm = WATCHDOG.schedule(deadline.end, exchange.cut_now)
        try:
            resp = pool.urlopen(
                req.method, path, body=req.body, headers=hdrs, retries=False, redirect=False,
                assert_same_host=False, timeout=timeout, preload_content=False, release_conn=False,
            )
            rh = HTTPHeaderDict(resp.headers)
            status = resp.status
            if skip_redirect_body and is_redirect(status, rh):
                limit, check = 0, None  # the body of a redirect is never needed
            elif status >= 400:
                limit, check = min(cap, ERROR_BODY_MAX), None
            else:
                limit, check = cap, first_bytes_check
                length = rh.get("content-length", "")
                if length.isdigit() and int(length) > cap:
                    raise FetchError("too_large", f"{url}: Content-Length {length} > cap {cap}", url=url)
            data, clean = self._read_body(resp, limit, deadline, url, check, strict=status < 300)
            return status, rh, data
        except FetchError:
            raise
        except Exception as exc:
            if exchange.cut or deadline.left() <= 0:
                raise FetchError("timeout", f"deadline exceeded fetching {url}", url=url, retryable=False) from exc
            mapped = map_error(exc, url)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            with exchange.lock:
                exchange.done = True
            WATCHDOG.cancel(alarm)
            _in_flight.exchange = None
            if resp is not None:
                if not clean or exchange.cut:
                    # A body left mid-stream makes the connection unusable: never pool it.
                    resp.close()
                resp.release_conn()

    def _read_body(
        self,
        resp: urllib3.BaseHTTPResponse,
        limit: int,
        deadline: Deadline,
        url: str,
        check: FirstBytesCheck | None,
        *,
        strict: bool,
    ) -> tuple[bytes, bool]:
        """Stream the body up to ``limit`` bytes under the deadline.

        ``strict``: exceeding the limit is an error ("too_large"); otherwise (error
        pages, redirects) the body is just truncated. Returns (body, read to the end).
        """
        chunks: list[bytes] = []
        total = 0
        complete = False
        while True:
            _set_read_timeout(resp, deadline.bound(self.read_timeout, url))
            # read1: return after one socket read, so the deadline is checked between
            # small reads instead of blocking until a whole chunk has trickled in.
            chunk = resp.read1(CHUNK)
            if not chunk:
                complete = True
                if check is not None and chunks:
                    check(b"".join(chunks), resp.headers)
                break
            total += len(chunk)
            if check is not None and total >= SNIFF_BYTES:
                # Judge the body by its first bytes, before reading the rest of it.
                check(b"".join(chunks) + chunk, resp.headers)
                check = None
            if total > limit:
                if strict:
                    raise FetchError("too_large", f"{url}: body exceeds {limit} bytes", url=url)
                chunks.append(chunk[: max(0, limit - (total - len(chunk)))])
                break
            chunks.append(chunk)
            if deadline.left() <= 0:
                raise FetchError("timeout", f"deadline exceeded reading {url}", url=url, retryable=False)
        return b"".join(chunks), complete


def _set_read_timeout(resp: urllib3.BaseHTTPResponse, seconds: float) -> None:
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)
