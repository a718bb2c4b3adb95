"""The common base of every site module: polite, paced requests to one site.

:class:`SiteApi` owns what every site needs done the same way, so no site
module writes its own retry loop:

* one request at a time per site and a minimum interval between requests the
  site answered (``min_interval``: reddit's Atom feeds allow about one a minute
  per IP, Wikimedia asks for serial requests);
* retries of 429, 5xx, timeouts and connection errors on one backoff schedule
  (``photocore.backoff``: exponential, full jitter, capped), never sooner than
  the server's ``Retry-After`` or, for sites that send ``X-Ratelimit-*``
  headers, the end of the rate-limit window;
* an OAuth token added to each try and refreshed once on a 401 (``auth``);
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
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nomad.http import HttpClient, HttpResponse
from nomad.net.errors import FetchError, HttpStatusError
from nomad.sources.base import SourceError
from photocore.backoff import Backoff

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


@dataclass
class RateWindow:
    """A site's request budget as its ``X-Ratelimit-*`` headers last stated it (reddit sends them).

    ``reserve``: when this many requests or fewer remain, the next request waits
    for the window's reset. ``waits``/``waited_s`` count every wait of the
    :class:`SiteApi` that holds it (pacing, backoff, rate limit), ``throttled``
    its 429 answers.
    """

    reserve: float = 1.0
    used: float | None = None
    remaining: float | None = None
    reset_at: float | None = None
    """Monotonic time the window ends."""
    waits: int = 0
    waited_s: float = 0.0
    throttled: int = 0
    requests: int = 0

    def read(self, headers: Mapping[str, str] | None, now: float) -> None:
        """Take ``X-Ratelimit-Remaining/-Reset/-Used`` from an answer (a 429 included)."""
        h = {k.lower(): v for k, v in (headers or {}).items()}

        def num(name: str) -> float | None:
            try:
                value = float(h[name])
            except (KeyError, ValueError, TypeError):
                return None
            return value if math.isfinite(value) else None

        remaining, reset, used = num("x-ratelimit-remaining"), num("x-ratelimit-reset"), num("x-ratelimit-used")
        if remaining is not None:
            self.remaining = remaining
        if reset is not None:
            self.reset_at = now + max(0.0, reset)
        if used is not None:
            self.used = used

    def reset_left(self, now: float) -> float:
        """Seconds until the window resets (0 when unknown or past)."""
        return max(0.0, (self.reset_at or now) - now)

    def due(self, now: float) -> float:
        """Seconds to wait before the next request: until the reset when (nearly) none remain."""
        if self.remaining is None or self.reset_at is None or self.remaining > self.reserve:
            return 0.0
        self.remaining = None  # a new window: trust the next answer's headers
        left = self.reset_at - now
        return left + 0.05 if left > 0 else 0.0

    def describe(self, now: float) -> str:
        if self.remaining is None:
            return "unknown"
        return f"remaining={self.remaining:g} reset={self.reset_left(now):.0f}s waits={self.waits} 429s={self.throttled}"


class SiteApi:
    """Paced, retried GETs to one site; every failure is a :class:`SourceError`.

    ``sleep(seconds)`` returns True when a stop was requested (the crawler passes
    its stop event's ``wait``), which ends the request with reason ``stopped``.
    ``clock`` is monotonic time for pacing; both are injectable for tests.

    Pacing (``min_interval``) counts from the last request the site *answered*:
    a request that never reached it (connection refused, DNS, timeout) costs the
    site nothing, so its retry waits only the backoff, not a whole interval.

    Hooks for sites with more to say than a status code:

    * ``window``: a :class:`RateWindow` read from every answer's ``X-Ratelimit-*``
      headers (a 429's too); a request waits for the reset when the budget is spent.
    * ``auth(refresh)``: headers added to every attempt (``Authorization``);
      after a 401 it is called once with ``refresh=True`` and the request retried.
    * ``check_error(exc)``: sees every HTTP error answer before the standard
      mapping and may raise its own :class:`SourceError` (a block page).
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
        window: RateWindow | None = None,
        auth: Callable[[bool], Mapping[str, str]] | None = None,
        check_error: Callable[[HttpStatusError], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.http = http
        self.name = name
        self.min_interval = max(0.0, min_interval)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.headers = dict(headers or {})
        self.window = window
        self._sleep = sleep or (lambda s: time.sleep(s))
        self._clock = clock
        self._on_status = on_status
        self._on_wait = on_wait
        self._auth = auth
        self._check_error = check_error
        self._rng = rng
        self._lock = threading.Lock()
        self._last_request: float | None = None
        """Start of the last request the site answered (pacing counts from it)."""
        self.status = SourceStatus()
        self.requests = 0
        self.answers = 0
        """Requests the site answered (any status); a fetch error is not one."""

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
        if self.window is not None:
            self.window.waits += 1
            self.window.waited_s += seconds
        if self._on_wait is not None:
            self._on_wait(why, seconds)
        if self._sleep(seconds):
            raise SourceError("stopped", f"stop requested while waiting for {self.name}", transient=True)

    def _pace(self) -> None:
        if self._last_request is not None and self.min_interval > 0:
            left = self._last_request + self.min_interval - self._clock()
            if left > 0:
                self.wait(left, "pacing")

    def _answered(self, started: float, headers: Mapping[str, str] | None) -> None:
        self._last_request = started
        self.answers += 1
        if self.window is not None:
            self.window.read(headers, self._clock())

    def new_backoff(self) -> Backoff | None:
        """The wait schedule of one request's retries (None when backoff is switched off)."""
        if not (self.backoff > 0):
            return None
        return Backoff(self.backoff, max(self.backoff, self.backoff_max), rng=self._rng)

    def backoff_for(self, attempt: int, retry_after: float | None = None) -> float:
        """The ``attempt``-th backoff wait (full jitter), never below the server's Retry-After."""
        schedule = self.new_backoff()
        if schedule is None:
            return float(retry_after or 0.0)
        schedule.attempt = attempt
        return max(schedule.next(), float(retry_after or 0.0))

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

        429: waits (Retry-After, the window's reset or backoff) and retries;
        after the last retry ``SourceError("rate_limited")``. 5xx, timeouts and
        connection errors: backoff and retry, then ``<site>_http`` /
        ``<site>_fetch``. 401 (after one ``auth`` refresh) and 403:
        ``SourceError("blocked")`` at once. Other 4xx: ``<site>_http``, permanent.
        """
        hdrs = {**self.headers, **(headers or {})}
        schedule = self.new_backoff()

        def delay(retry_after: float | None = None) -> float:
            return max(schedule.next() if schedule is not None else 0.0, float(retry_after or 0.0))

        refreshed = False
        attempt = 0
        with self._lock:
            while True:
                self._pace()
                if self.window is not None:
                    self.wait(self.window.due(self._clock()), "rate limit")
                sent = {**hdrs, **(self._auth(False) if self._auth is not None else {})}
                self.requests += 1
                if self.window is not None:
                    self.window.requests += 1
                last = attempt >= self.max_retries
                attempt += 1
                started = self._clock()
                try:
                    resp = self.http.request("GET", url, params=params, headers=sent, retry=False, max_bytes=max_bytes)
                except HttpStatusError as exc:
                    self._answered(started, exc.headers)
                    status = exc.status
                    if status == 401 and self._auth is not None and not refreshed:
                        refreshed = True  # expired or revoked early: one fresh token, then the same try again
                        attempt -= 1
                        self._auth(True)
                        continue
                    if self._check_error is not None:
                        self._check_error(exc)  # may raise its own SourceError
                    if status == 429:
                        if self.window is not None:
                            self.window.throttled += 1
                        self.mark("rate_limited", f"HTTP 429 from {self.name}")
                        if last:
                            raise SourceError("rate_limited", f"{self.name} answered HTTP 429", transient=True) from exc
                        reset = self.window.reset_left(self._clock()) if self.window is not None else 0.0
                        self.wait(max(delay(exc.retry_after), reset), "HTTP 429")
                        continue
                    if status >= 500 or status == 408:
                        self.mark("error", f"HTTP {status}")
                        if last:
                            raise SourceError(f"{self.name}_http", f"{self.name} answered HTTP {status}", transient=True) from exc
                        self.wait(delay(exc.retry_after), f"HTTP {status}")
                        continue
                    if status in (401, 403):
                        self.mark("blocked", f"HTTP {status}")
                        raise SourceError("blocked", f"{self.name} answered HTTP {status}", transient=True) from exc
                    self.mark("error", f"HTTP {status}")
                    raise SourceError(f"{self.name}_http", f"{self.name} answered HTTP {status}") from exc
                except FetchError as exc:
                    # Not answered: the pacing clock is not reset, the retry waits the backoff only.
                    self.mark("error", exc.reason)
                    if last or exc.reason in ("blocked_address", "bad_url", "bad_scheme", "too_large"):
                        raise SourceError(f"{self.name}_fetch", f"{self.name} unreachable: {exc.reason}", transient=True) from exc
                    self.wait(delay(), f"fetch error: {exc.reason}")
                    continue
                self._answered(started, resp.headers)
                if check is not None:
                    check(resp)  # may raise SourceError (and mark a status itself)
                self.mark("ok")
                return resp

    def get_json(self, url: str, **kw: Any) -> Any:
        """GET and parse JSON; an answer that is not JSON is ``SourceError("bad_answer")``."""
        headers = {"Accept": "application/json", **(kw.pop("headers", None) or {})}
        resp = self.get(url, headers=headers, **kw)
        try:
            return resp.json()
        except FetchError as exc:
            self.mark("error", "not JSON")
            raise SourceError("bad_answer", f"{self.name} answered something that is not JSON", transient=True) from exc


def request_json(
    http: HttpClient,
    method: str,
    url: str,
    *,
    site: str = "",
    what: str = "",
    reason: str | None = None,
    status_error: Callable[[int], SourceError] | None = None,
    **kw: Any,
) -> Any:
    """One JSON request outside a :class:`SiteApi` (a token request, a link expander's API call).

    Every failure is one :class:`SourceError`: ``<site>_http`` for an HTTP error
    status (or what ``status_error(status)`` returns), ``<site>_fetch`` when the
    site could not be reached, ``<site>_bad_reply`` for an answer that is not
    JSON; ``reason`` replaces all three. ``what`` names the request in messages.
    """
    what = what or f"{site} API"

    def fail(kind: str, message: str, transient: bool = True) -> SourceError:
        return SourceError(reason or f"{site}_{kind}", message, transient=transient)

    def bad_status(status: int) -> SourceError:
        return status_error(status) if status_error is not None else fail("http", f"{what} answered HTTP {status}")

    try:
        resp = http.request(method, url, **kw)
    except HttpStatusError as exc:
        raise bad_status(exc.status) from exc
    except FetchError as exc:
        raise fail("fetch", f"{what} unreachable: {exc}") from exc
    if resp.status != 200:
        raise bad_status(resp.status)
    try:
        return resp.json()
    except (ValueError, FetchError) as exc:
        raise fail("bad_reply", f"{what} answered something that is not JSON") from exc
