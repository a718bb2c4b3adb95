"""Polite, safe HTTP fetching for nomad (the only way nomad touches the network): the client facade.

:class:`HttpClient` puts the parts together and owns the retry policy:

- :mod:`nomad.net.request` encodes the request (params, form/JSON body, auth);
- :mod:`nomad.net.redirects` follows redirects one hop at a time, each hop
  re-checked, credentials dropped when the origin changes;
- :mod:`nomad.net.transport` makes each checked exchange (SSRF guard, pinned
  address with TLS verified against the name, timeouts and an overall deadline
  that covers the body, a streamed byte cap that never trusts ``Content-Length``);
- :mod:`nomad.net.limits` keeps at most ``per_host`` requests in flight per host name;
- :class:`RetryPolicy` retries 5xx/429/timeouts/connection errors on the
  :class:`photocore.backoff.Backoff` schedule (exponential, full jitter, capped),
  never sooner than ``Retry-After`` (capped too).

Safe to share between threads. The names other modules import (``HttpClient``,
``HttpResponse``, ``Download``, ``FetchError``, …) stay importable from here.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from photocore.backoff import Backoff, retry_after_seconds
from photocore.closing import Closeable
from photocore.sniff import IMAGE_FORMATS, looks_like_html, sniff_format

from . import DEFAULT_USER_AGENT
from .net.errors import BlockedAddress, FetchError, HttpStatusError, status_reason
from .net.guard import AddressPolicy, Pin, Resolver, blocked_reason, parse_resolve
from .net.limits import HostLimiter
from .net.redirects import follow, reject_removed_placeholder
from .net.redirects import origin as _origin  # noqa: F401 - kept importable for callers of the old private name
from .net.request import Request, encode_request
from .net.response import Download, HttpResponse
from .net.transport import Deadline, FirstBytesCheck, Transport, split_url

__all__ = [
    "HttpConfig",
    "HttpResponse",
    "Download",
    "HttpClient",
    "RetryPolicy",
    "FetchError",
    "HttpStatusError",
    "BlockedAddress",
    "sniff_format",
    "parse_resolve",
    "parse_retry_after",
    "blocked_reason",
    "reject_removed_placeholder",
    "status_reason",
    "Pin",
]

RETRY_REASONS = frozenset({"timeout", "connection", "http_429", "http_5xx"})


@dataclass
class HttpConfig:
    """Knobs for :class:`HttpClient`; the CLI maps flags/env vars onto these."""

    user_agent: str = DEFAULT_USER_AGENT
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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date), or None (:func:`photocore.backoff.retry_after_seconds`)."""
    return retry_after_seconds(value, now=now)


class RetryPolicy:
    """Which failures are tried again, how often, and how long to wait before the next try.

    Retried: reasons in ``RETRY_REASONS`` (timeouts, connection errors, 429 and
    5xx) unless the error says it must not be (a server that used the whole
    deadline already). Waits follow :class:`photocore.backoff.Backoff` from
    ``base`` up to ``cap``; a ``Retry-After`` lengthens a wait, and ``cap``
    bounds it too.
    """

    def __init__(self, retries: int, base: float, cap: float, *, rng: random.Random | None = None) -> None:
        self.retries = max(0, retries)
        self.cap = max(cap, 1e-3)
        # Backoff wants 0 < base <= cap: a zero --http-backoff means "as short as possible".
        self.base = min(max(base, 1e-3), self.cap)
        self._rng = rng or random.Random()

    def attempts(self, retry: bool) -> int:
        """Tries of one request: 1, plus the retries when the caller allows them."""
        return 1 + (self.retries if retry else 0)

    def retryable(self, exc: FetchError) -> bool:
        return exc.reason in RETRY_REASONS and exc.retryable is not False

    def schedule(self) -> Backoff:
        """A fresh wait schedule for one request."""
        return Backoff(self.base, self.cap, rng=self._rng)

    def delay(self, schedule: Backoff, exc: FetchError) -> float:
        """Seconds before the next try: the schedule's next wait, at least the server's Retry-After, at most ``cap``."""
        delay = schedule.next()
        retry_after = exc.retry_after if isinstance(exc, HttpStatusError) else None
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.cap)


class HttpClient(Closeable):
    """Thread-safe HTTP client with the SSRF guard, caps, deadlines, retries and per-host limits.

    ``resolver``, ``sleep`` and ``rng`` are injectable (DNS rebinding tests, fast
    or recorded backoff, reproducible jitter).
    """

    def __init__(
        self,
        config: HttpConfig | None = None,
        *,
        resolver: Resolver | None = None,
        sleep: Callable[[float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = cfg = config or HttpConfig()
        self.policy = AddressPolicy(cfg.resolve, allow_private=cfg.allow_private, resolver=resolver)
        self.transport = Transport(self.policy, connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout,
                                   per_host=cfg.per_host, ca_bundle=cfg.ca_bundle)
        self.retry = RetryPolicy(cfg.retries, cfg.backoff, cfg.backoff_max, rng=rng)
        self._closed = threading.Event()
        self.limiter = HostLimiter(cfg.per_host, self._closed)
        self._sleep = sleep

    @property
    def _ssl(self) -> Any:
        """The TLS context (bluesky's firehose opens its own verified socket with it)."""
        return self.transport.ssl_context

    def close(self) -> None:
        """Close pooled connections; sleeping retries wake up and fail with "closed"."""
        self._closed.set()
        self.transport.close()


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
        first_bytes_check: FirstBytesCheck | None = None,
    ) -> HttpResponse:
        """Fetch ``url``; raises FetchError subclasses, HttpStatusError for >= 400 after retries.

        ``first_bytes_check(first_chunk, headers)`` may raise to abort a body early
        (``download_image`` uses it so an HTML page is not read to the end).
        """
        req = encode_request(method, url, user_agent=self.config.user_agent, params=params, headers=headers,
                             data=data, json=json, auth=auth)
        cap = self.config.max_bytes if max_bytes is None else max_bytes
        attempts = self.retry.attempts(retry)
        schedule = self.retry.schedule()
        for attempt in range(attempts):
            try:
                return self._attempt(req, cap, allow_redirects, redirect_check, first_bytes_check)
            except FetchError as exc:
                if attempt + 1 >= attempts or not self.retry.retryable(exc) or self._closed.is_set():
                    raise
                self._wait(self.retry.delay(schedule, exc), req.url)
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

    def _wait(self, seconds: float, url: str) -> None:
        if self._sleep is not None:
            self._sleep(seconds)
        elif self._closed.wait(seconds):
            raise FetchError("closed", "client closed while waiting to retry", url=url)

    def _attempt(
        self,
        req: Request,
        cap: int,
        allow_redirects: bool,
        redirect_check: Callable[[str], None] | None,
        first_bytes_check: FirstBytesCheck | None,
    ) -> HttpResponse:
        """One attempt: the hop chain under one deadline, each hop holding a per-host slot."""
        deadline: Deadline | None = None

        def send(hop: Request) -> tuple[int, Mapping[str, str], bytes]:
            nonlocal deadline
            host = split_url(hop.url)[1]
            with self.limiter.slot(host):
                # The clock starts once a slot is ours: queueing behind the per-host
                # limit is the crawler's pacing, not the server's slowness.
                if deadline is None:
                    deadline = Deadline(self.config.deadline)
                return self.transport.exchange(hop, deadline=deadline, cap=cap, first_bytes_check=first_bytes_check,
                                               skip_redirect_body=allow_redirects)

        resp = follow(req, send, max_redirects=self.config.max_redirects, allow_redirects=allow_redirects,
                      redirect_check=redirect_check)
        if resp.status >= 400:
            raise HttpStatusError(resp.status, resp.headers, url=resp.url,
                                  retry_after=parse_retry_after(resp.headers.get("retry-after")), body=resp.body)
        return resp
