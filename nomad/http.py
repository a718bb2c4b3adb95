"""Polite, safe HTTP fetching for nomad (the only way nomad touches the network).

What it guarantees, per request:

- only ``http``/``https``; the host is resolved once, every address checked by the
  SSRF guard (:mod:`nomad.net.guard`), and the socket connects to that checked
  address while TLS still verifies the certificate against the host name (SNI,
  ``Host`` header and hostname check all use the name, not the address);
- redirects are followed one hop at a time, each hop re-checked (scheme, address,
  and an optional caller veto such as imgur's ``removed.png``); credentials
  (Authorization, Cookie, Proxy-Authorization) are dropped when a redirect changes
  the origin (scheme, host or port);
- connect/read timeouts and an overall deadline that covers the body too (a server
  trickling one byte a second cannot hold a worker forever);
- a streamed byte cap that never trusts ``Content-Length``;
- retries on 5xx/429/connection errors with exponential backoff, jitter and
  ``Retry-After`` (capped);
- at most ``per_host`` requests in flight per host name, safe to share between threads.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import json as _json
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

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

from .net.errors import BlockedAddress, FetchError, HttpStatusError, status_reason
from .net.guard import AddressPolicy, Pin, Resolver, Target, blocked_reason, parse_resolve
from .net.limits import HostLimiter
from .net.sniff import IMAGE_FORMATS, looks_like_html, sniff_format
from .net.watchdog import WATCHDOG

__all__ = [
    "HttpConfig",
    "HttpResponse",
    "Download",
    "HttpClient",
    "FetchError",
    "HttpStatusError",
    "BlockedAddress",
    "sniff_format",
    "parse_resolve",
    "blocked_reason",
    "reject_removed_placeholder",
    "status_reason",
    "Pin",
]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504, 520, 521, 522, 523, 524})
RETRY_REASONS = frozenset({"timeout", "connection", "http_429", "http_5xx"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024
SNIFF_BYTES = 32
"""Bytes gathered before the first-bytes check runs (a slow server may send one at a time)."""
ERROR_BODY_MAX = 64 * 1024
"""How much of an error response's body is kept (for messages, flickr/imgur error JSON)."""


@dataclass
class HttpConfig:
    """Knobs for :class:`HttpClient`; the CLI maps flags/env vars onto these."""

    user_agent: str = "python:nomad-photo-miner:0.1 (by /u/unknown)"
    connect_timeout: float = 5.0
    read_timeout: float = 20.0
    deadline: float = 60.0
    """Whole request, all redirect hops and the body included (per attempt)."""
    max_bytes: int = 50 * 1024 * 1024
    allow_private: bool = False
    resolve: list[str] = field(default_factory=list)
    ca_bundle: str | None = None
    max_redirects: int = 5
    per_host: int = 2
    retries: int = 3
    backoff: float = 1.0
    backoff_max: float = 60.0


@dataclass
class HttpResponse:
    """A complete response: status, case-insensitive headers, body, final URL and redirect history."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    history: list[str] = field(default_factory=list)

    def json(self) -> Any:
        """The body parsed as JSON; FetchError("bad_json") if it is not."""
        try:
            return _json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FetchError("bad_json", f"{self.url}: {exc}", url=self.url) from exc


@dataclass
class Download:
    """An image download whose first bytes were checked: format is "jpeg", "png" or "webp"."""

    data: bytes
    url: str
    format: str
    history: list[str] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)


def reject_removed_placeholder(url: str) -> None:
    """``redirect_check`` for imgur: a hop to ``…imgur.com/removed.png`` means the image is gone.

    Raises FetchError("removed") so the placeholder is never downloaded or stored.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if (host == "imgur.com" or host.endswith(".imgur.com")) and parts.path.rstrip("/").endswith("/removed.png"):
        raise FetchError("removed", f"redirected to imgur's removed placeholder {url}", url=url)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Deadline:
    """Remaining time of one attempt; every blocking step is bounded by it."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def bound(self, seconds: float, url: str) -> float:
        left = self.left()
        if left <= 0:
            raise FetchError("timeout", f"deadline exceeded fetching {url}", url=url, retryable=False)
        return max(0.001, min(seconds, left))


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
"""Headers dropped on a redirect that changes the origin."""


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the default port filled in: the unit credentials belong to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower().rstrip(".")
    try:
        port = parts.port or _default_port(scheme)
    except ValueError:
        port = -1  # a bad port fails in _split on the next hop; -1 never equals a real origin
    return scheme, host, port


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


class HttpClient:
    """Thread-safe HTTP client with the SSRF guard, caps, deadlines, retries and per-host limits.

    ``resolver`` and ``sleep`` are injectable for tests (DNS rebinding, fast backoff).
    """

    max_pools = 64

    def __init__(
        self,
        config: HttpConfig | None = None,
        *,
        resolver: Resolver | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.config = config or HttpConfig()
        self.policy = AddressPolicy(self.config.resolve, allow_private=self.config.allow_private, resolver=resolver)
        self._ssl = self._make_ssl_context(self.config.ca_bundle)
        self._pools: OrderedDict[tuple[str, str, str, int], urllib3.HTTPConnectionPool] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.limiter = HostLimiter(self.config.per_host, self._closed)
        self._sleep = sleep
        self._rng = random.Random()

    # -- setup ---------------------------------------------------------------------------

    @staticmethod
    def _make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
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
                    maxsize=self.config.per_host,
                    block=False,
                    retries=False,
                    ssl_context=self._ssl,
                    server_hostname=target.host,
                )
            else:
                pool = urllib3.HTTPConnectionPool(
                    target.address, target.port, maxsize=self.config.per_host, block=False, retries=False
                )
            pool.ConnectionCls = _TrackedHTTPSConnection if scheme == "https" else _TrackedHTTPConnection
            self._pools[key] = pool
            while len(self._pools) > self.max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def close(self) -> None:
        """Close pooled connections; sleeping retries wake up and fail with "closed"."""
        self._closed.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), OrderedDict()
        for p in pools:
            p.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, Any] | bytes | str | None = None,
        json: Any = None,
        auth: tuple[str, str] | None = None,
        max_bytes: int | None = None,
        allow_redirects: bool = True,
        retry: bool = True,
        redirect_check: Callable[[str], None] | None = None,
        first_bytes_check: Callable[[bytes, Mapping[str, str]], None] | None = None,
    ) -> HttpResponse:
        """Fetch ``url``; raises FetchError subclasses, HttpStatusError for >= 400 after retries.

        ``first_bytes_check(first_chunk, headers)`` may raise to abort a body early
        (``download_image`` uses it so an HTML page is not read to the end).
        """
        method = method.upper()
        if params:
            parts = urlsplit(url)
            query = urlencode([(k, v) for k, v in params.items() if v is not None], doseq=True)
            url = urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))
        hdrs: dict[str, str] = {"User-Agent": self.config.user_agent, "Accept-Encoding": "gzip, deflate"}
        body: bytes | None = None
        if json is not None:
            body = _json.dumps(json).encode()
            hdrs["Content-Type"] = "application/json"
        elif isinstance(data, Mapping):
            body = urlencode(list(data.items()), doseq=True).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif isinstance(data, str):
            body = data.encode()
        elif data is not None:
            body = bytes(data)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            hdrs["Authorization"] = f"Basic {token}"
        for k, v in (headers or {}).items():
            hdrs = {hk: hv for hk, hv in hdrs.items() if hk.lower() != k.lower()}
            hdrs[k] = v
        cap = self.config.max_bytes if max_bytes is None else max_bytes

        attempts = 1 + (max(0, self.config.retries) if retry else 0)
        for attempt in range(attempts):
            try:
                return self._follow(method, url, hdrs, body, cap, allow_redirects, redirect_check, first_bytes_check)
            except FetchError as exc:
                if (
                    attempt + 1 >= attempts
                    or exc.reason not in RETRY_REASONS
                    or exc.retryable is False
                    or self._closed.is_set()
                ):
                    raise
                retry_after = exc.retry_after if isinstance(exc, HttpStatusError) else None
                self._wait(self._backoff(attempt, retry_after), url)
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, url: str, **kw: Any) -> HttpResponse:
        """``request("GET", url, …)``."""
        return self.request("GET", url, **kw)

    def get_json(self, url: str, **kw: Any) -> tuple[Any, HttpResponse]:
        """GET and parse JSON; returns ``(data, response)`` so callers can read rate-limit headers."""
        headers = {"Accept": "application/json", **(kw.pop("headers", None) or {})}
        resp = self.request(kw.pop("method", "GET"), url, headers=headers, **kw)
        return resp.json(), resp

    def download_image(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
        redirect_check: Callable[[str], None] | None = None,
    ) -> Download:
        """Download an image, checking magic bytes on the first chunk (HTML -> "not_image")."""

        def check(first: bytes, _h: Mapping[str, str]) -> None:
            fmt = sniff_format(first)
            if fmt in IMAGE_FORMATS:
                return
            if fmt == "gif":
                raise FetchError("unsupported_format", f"{url} is a GIF", url=url)
            what = "an HTML page" if looks_like_html(first) else "not a JPEG/PNG/WebP image"
            raise FetchError("not_image", f"{url} is {what}", url=url)

        hdrs = {"Accept": "image/jpeg,image/png,image/webp;q=0.9,*/*;q=0.1", **(headers or {})}
        resp = self.request(
            "GET", url, headers=hdrs, max_bytes=max_bytes, redirect_check=redirect_check, first_bytes_check=check
        )
        fmt = sniff_format(resp.body)
        if fmt not in IMAGE_FORMATS:  # empty body: the first-chunk check never ran
            raise FetchError("not_image", f"{url}: empty or unrecognised body", url=resp.url)
        return Download(resp.body, resp.url, fmt, resp.history, resp.headers)

    # -- internals -------------------------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cfg = self.config
        base = min(cfg.backoff_max, cfg.backoff * (2**attempt))
        delay = base * (0.5 + 0.5 * self._rng.random())  # jitter: spread retries of many workers
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, cfg.backoff_max)

    def _wait(self, seconds: float, url: str) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        elif self._closed.wait(seconds):
            raise FetchError("closed", "client closed while waiting to retry", url=url)

    def _follow(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        cap: int,
        allow_redirects: bool,
        redirect_check: Callable[[str], None] | None,
        first_bytes_check: Callable[[bytes, Mapping[str, str]], None] | None,
    ) -> HttpResponse:
        """One attempt: the hop chain under one deadline."""
        deadline: _Deadline | None = None
        history: list[str] = []
        origin = _origin(url)
        while True:
            scheme, host, port, target_path = self._split(url)
            with self.limiter.slot(host):
                # The clock starts once a slot is ours: queueing behind the per-host
                # limit is the crawler's pacing, not the server's slowness.
                if deadline is None:
                    deadline = _Deadline(self.config.deadline)
                status, rh, data = self._hop(
                    method, scheme, host, port, target_path, url, headers, body, cap, deadline,
                    first_bytes_check, allow_redirects,
                )
            if allow_redirects and status in REDIRECT_STATUSES and "location" in rh:
                if len(history) >= self.config.max_redirects:
                    raise FetchError("too_many_redirects", f"more than {self.config.max_redirects} from {history[0]}", url=url)
                history.append(url)
                url = urljoin(url, rh["location"])
                if redirect_check is not None:
                    redirect_check(url)
                if status == 303 or (status in (301, 302) and method == "POST"):
                    method, body = ("GET" if method != "HEAD" else method), None
                    headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                if _origin(url) != origin:
                    # Never hand a token or Client-ID to an origin the caller did not name: another
                    # port or scheme on the same host can be another service (or plain text).
                    headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
                continue
            if status >= 400:
                raise HttpStatusError(
                    status, rh, url=url, retry_after=parse_retry_after(rh.get("retry-after")), body=data
                )
            return HttpResponse(status, rh, data, url, history)

    def _split(self, url: str) -> tuple[str, str, int, str]:
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
        return scheme, host, port or _default_port(scheme), path

    def _hop(
        self,
        method: str,
        scheme: str,
        host: str,
        port: int,
        path: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        cap: int,
        deadline: _Deadline,
        first_bytes_check: Callable[[bytes, Mapping[str, str]], None] | None,
        allow_redirects: bool,
    ) -> tuple[int, HTTPHeaderDict, bytes]:
        """One HTTP exchange with the checked address; returns status, headers, (capped) body."""
        target = self.policy.target(host, port, url=url)
        pool = self._pool(scheme, target)
        hdrs = dict(headers)
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        hdrs["Host"] = name if port == _default_port(scheme) else f"{name}:{port}"
        cfg = self.config
        timeout = urllib3.Timeout(
            connect=deadline.bound(cfg.connect_timeout, url), read=deadline.bound(cfg.read_timeout, url)
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
                method, path, body=body, headers=hdrs, retries=False, redirect=False,
                assert_same_host=False, timeout=timeout, preload_content=False, release_conn=False,
            )
            rh = HTTPHeaderDict(resp.headers)
            status = resp.status
            if allow_redirects and status in REDIRECT_STATUSES and "location" in rh:
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
            mapped = self._map_error(exc, url)
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

    @staticmethod
    def _map_error(exc: Exception, url: str) -> Exception:
        """urllib3/socket exceptions -> FetchError with a stats reason."""
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

    def _read_body(
        self,
        resp: urllib3.BaseHTTPResponse,
        limit: int,
        deadline: _Deadline,
        url: str,
        check: Callable[[bytes, Mapping[str, str]], None] | None,
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
            self._set_read_timeout(resp, deadline.bound(self.config.read_timeout, url))
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

    @staticmethod
    def _set_read_timeout(resp: urllib3.BaseHTTPResponse, seconds: float) -> None:
        conn = getattr(resp, "connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(seconds)
