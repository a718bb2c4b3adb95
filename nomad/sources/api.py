"""The common base of every site module: polite, paced requests to one site.

:class:`SiteApi` owns what every site needs done the same way, so no site
module writes its own retry loop:

* one request at a time per site and a minimum interval between requests
  (``min_interval``: reddit's Atom feeds allow about one a minute per IP,
  Wikimedia asks for serial requests);
* retries of 429, 5xx and timeouts with exponential backoff and full jitter,
  never sooner than the server's ``Retry-After``;
* fetch errors mapped to :class:`~nomad.sources.base.SourceError` with short
  reason codes (``rate_limited``, ``blocked``, ``<site>_http``, ``<site>_fetch``);
* the site's last status (ok / blocked / rate_limited / error, with the time)
  for ``nomad sources``, handed to ``on_status`` so the store can keep it.

A site module subclasses nothing: it holds a ``SiteApi`` and may pass
``check`` to recognise answers that look fine but are not (a block page with
status 200, a JSON error object) by raising :class:`SourceError` itself.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nomad.http import HttpClient, HttpResponse
from nomad.net.errors import FetchError, HttpStatusError
from nomad.sources.base import SourceError

log = logging.getLogger(__name__)

STATES = ("ok", "blocked", "rate_limited", "error", "unknown")


@dataclass
class SourceStatus:
    """What a site last did: ``state`` in :data:`STATES`, a short detail, wall-clock time."""

    state: str = "unknown"
    detail: str = ""
    at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail, "at": self.at}


@dataclass
class SourceContext:
    """What every listing source is built with (``build(args, ctx)`` in each source module)."""

    http: HttpClient
    user_agent: str
    environ: Mapping[str, str]
    sleep: Callable[[float], Any]
    """Interruptible sleep: returns True when a stop was requested."""
    on_status: Callable[[str, SourceStatus], None] | None = None
    """Where a source's status goes (the crawler stores it for ``nomad sources``)."""


class SiteApi:
    """Paced, retried GETs to one site; every failure is a :class:`SourceError`.

    ``sleep(seconds)`` returns True when a stop was requested (the crawler passes
    its stop event's ``wait``), which ends the request with reason ``stopped``.
    ``clock`` is monotonic time for pacing; both are injectable for tests.
    """

    def __init__(
        self,
        http: HttpClient,
        name: str,
        *,
        min_interval: float = 0.0,
        max_retries: int = 3,
        backoff: float = 2.0,
        backoff_max: float = 300.0,
        headers: Mapping[str, str] | None = None,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_status: Callable[[str, SourceStatus], None] | None = None,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self.http = http
        self.name = name
        self.min_interval = max(0.0, min_interval)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.headers = dict(headers or {})
        self._sleep = sleep or (lambda s: time.sleep(s))
        self._clock = clock
        self._on_status = on_status
        self._on_wait = on_wait
        self._lock = threading.Lock()
        self._last_request: float | None = None
        self.status = SourceStatus()
        self.requests = 0

    # --- status and waiting ----------------------------------------------------------
    def mark(self, state: str, detail: str = "") -> None:
        """Record the site's status (and hand it to ``on_status``)."""
        self.status = SourceStatus(state, detail, time.time())
        if self._on_status is not None:
            self._on_status(self.name, self.status)

    def wait(self, seconds: float, why: str) -> None:
        """Sleep ``seconds`` (interruptible); raises SourceError("stopped") on a stop request."""
        if seconds <= 0:
            return
        log.info("%s: waiting %.1fs (%s)", self.name, seconds, why)
        if self._on_wait is not None:
            self._on_wait(why, seconds)
        if self._sleep(seconds):
            raise SourceError("stopped", f"stop requested while waiting for {self.name}", transient=True)

    def _pace(self) -> None:
        if self._last_request is not None and self.min_interval > 0:
            left = self._last_request + self.min_interval - self._clock()
            if left > 0:
                self.wait(left, "pacing")
        self._last_request = self._clock()

    def backoff_for(self, attempt: int, retry_after: float | None = None) -> float:
        """Exponential backoff with full jitter, never below the server's Retry-After."""
        cap = min(self.backoff_max, self.backoff * (2**attempt))
        return max(random.uniform(cap / 2, cap), float(retry_after or 0.0))

    # --- requests ----------------------------------------------------------------------
    def get(
        self,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
        check: Callable[[HttpResponse], None] | None = None,
    ) -> HttpResponse:
        """GET ``url`` politely; returns a 2xx response or raises SourceError.

        429: waits (Retry-After or backoff) and retries; after the last retry
        ``SourceError("rate_limited")``. 5xx, timeouts and connection errors:
        backoff and retry, then ``<site>_http`` / ``<site>_fetch``. 401/403:
        ``SourceError("blocked")`` at once. Other 4xx: ``<site>_http``, permanent.
        """
        hdrs = {**self.headers, **(headers or {})}
        with self._lock:
            for attempt in range(self.max_retries + 1):
                self._pace()
                self.requests += 1
                last = attempt >= self.max_retries
                try:
                    resp = self.http.request("GET", url, params=params, headers=hdrs, retry=False, max_bytes=max_bytes)
                except HttpStatusError as exc:
                    status = exc.status
                    if status == 429:
                        self.mark("rate_limited", f"HTTP 429 from {self.name}")
                        if last:
                            raise SourceError("rate_limited", f"{self.name} answered HTTP 429", transient=True) from exc
                        self.wait(self.backoff_for(attempt, exc.retry_after), "HTTP 429")
                        continue
                    if status >= 500 or status == 408:
                        self.mark("error", f"HTTP {status}")
                        if last:
                            raise SourceError(f"{self.name}_http", f"{self.name} answered HTTP {status}", transient=True) from exc
                        self.wait(self.backoff_for(attempt, exc.retry_after), f"HTTP {status}")
                        continue
                    if status in (401, 403):
                        self.mark("blocked", f"HTTP {status}")
                        raise SourceError("blocked", f"{self.name} answered HTTP {status}", transient=True) from exc
                    self.mark("error", f"HTTP {status}")
                    raise SourceError(f"{self.name}_http", f"{self.name} answered HTTP {status}") from exc
                except FetchError as exc:
                    self.mark("error", exc.reason)
                    if last or exc.reason in ("blocked_address", "bad_url", "bad_scheme", "too_large"):
                        raise SourceError(f"{self.name}_fetch", f"{self.name} unreachable: {exc.reason}", transient=True) from exc
                    self.wait(self.backoff_for(attempt), f"fetch error: {exc.reason}")
                    continue
                if check is not None:
                    check(resp)  # may raise SourceError (and mark a status itself)
                self.mark("ok")
                return resp
        raise SourceError(f"{self.name}_http", f"{self.name}: retries exhausted", transient=True)  # pragma: no cover

    def get_json(self, url: str, **kw: Any) -> Any:
        """GET and parse JSON; an answer that is not JSON is ``SourceError("bad_answer")``."""
        headers = {"Accept": "application/json", **(kw.pop("headers", None) or {})}
        resp = self.get(url, headers=headers, **kw)
        try:
            return resp.json()
        except FetchError as exc:
            self.mark("error", "not JSON")
            raise SourceError("bad_answer", f"{self.name} answered something that is not JSON", transient=True) from exc
