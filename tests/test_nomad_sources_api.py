"""SiteApi, the common request base of the listing sources: pacing, backoff, rate-limit headers, auth refresh.

Time is injected (tests.nomad_fakes.Clock): nothing here really sleeps.
"""
from __future__ import annotations

import random

import pytest

from nomad.net.errors import FetchError, HttpStatusError
from nomad.sources.api import RateWindow, SiteApi, request_json
from nomad.sources.base import SourceError
from tests.nomad_fakes import Clock, FakeHttp, Reply

URL = "https://feeds.example/feed"
DOWN = Reply(0, b"", error=FetchError("connection", "connection refused"))
TIMEOUT = Reply(0, b"", error=FetchError("timeout", "read timed out"))


def api(http: FakeHttp, clock: Clock, **kw: object) -> SiteApi:
    kw = {"min_interval": 60.0, "backoff": 1.0, "backoff_max": 8.0, "rng": random.Random(7), **kw}
    return SiteApi(http, "feeds", sleep=clock.sleep, clock=clock.now, **kw)  # type: ignore[arg-type]


def test_pacing_applies_between_answered_requests() -> None:
    clock = Clock()
    site = api(FakeHttp([Reply(200, b"a"), Reply(200, b"b")]), clock)
    site.get(URL)
    clock.t += 10
    site.get(URL)
    assert clock.slept == [pytest.approx(50.0)]  # 60 s after the first request, not 60 s after now


@pytest.mark.parametrize("failure", [DOWN, TIMEOUT])
def test_a_connection_error_is_retried_on_the_backoff_schedule_not_the_pacing_interval(failure: Reply) -> None:
    clock = Clock()
    site = api(FakeHttp([Reply(200, b"a"), failure, failure, Reply(200, b"b")]), clock)
    site.get(URL)
    clock.t += 600  # the next cycle, long after the interval: the site is down now
    assert site.get(URL).body == b"b"
    # Two backoff waits (full jitter, at most 1 s then 2 s), never a pacing wait of up to 60 s.
    assert len(clock.slept) == 2 and clock.slept[0] <= 1.0 and clock.slept[1] <= 2.0
    assert site.answers == 2 and site.requests == 4


def test_offline_from_the_start_never_waits_a_pacing_interval() -> None:
    clock = Clock()
    site = api(FakeHttp([DOWN] * 4), clock, max_retries=3)
    with pytest.raises(SourceError) as err:
        site.get(URL)
    assert err.value.reason == "feeds_fetch" and err.value.transient
    assert len(clock.slept) == 3 and sum(clock.slept) <= 1 + 2 + 4
    assert site.status.state == "error"


def test_a_429_waits_for_retry_after_and_then_pacing_counts_from_the_answer() -> None:
    clock = Clock()
    site = api(FakeHttp([Reply(429, b"", {"Retry-After": "42"}), Reply(200, b"ok")]), clock, min_interval=0)
    assert site.get(URL).body == b"ok"
    assert clock.slept[0] >= 42 and site.status.state == "ok"


def test_the_rate_window_is_read_from_every_answer_a_429_included() -> None:
    clock = Clock()
    window = RateWindow(reserve=1)
    http = FakeHttp([
        Reply(429, b"", {"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "50", "Retry-After": "5"}),
        Reply(200, b"ok", {"X-Ratelimit-Remaining": "1", "X-Ratelimit-Reset": "30"}),
        Reply(200, b"ok", {"X-Ratelimit-Remaining": "99", "X-Ratelimit-Reset": "600"}),
    ])
    site = api(http, clock, min_interval=0, window=window)
    site.get(URL)
    assert clock.slept[0] >= 50  # the window's reset, longer than Retry-After and the backoff
    assert window.throttled == 1 and window.remaining == 1
    site.get(URL)  # one left, the reserve: wait for the reset first
    assert clock.slept[-1] == pytest.approx(30.05)
    assert window.waits == 2 and window.requests == 3 and window.remaining == 99


def test_auth_headers_on_every_try_and_one_refresh_on_401() -> None:
    clock = Clock()
    tokens = iter(["t2", "t3"])
    current = ["t1"]

    def auth(refresh: bool) -> dict[str, str]:
        if refresh:
            current[0] = next(tokens)
        return {"Authorization": "bearer " + current[0]}

    http = FakeHttp([Reply(401, b""), Reply(200, b"ok"), Reply(401, b""), Reply(401, b"")])
    site = api(http, clock, min_interval=0, auth=auth, max_retries=0)
    assert site.get(URL).body == b"ok"  # the refresh does not use up the (zero) retries
    assert [kw["headers"]["Authorization"] for _, _, kw in http.calls] == ["bearer t1", "bearer t2"]
    with pytest.raises(SourceError) as err:
        site.get(URL)  # a fresh token that is refused again: blocked, no loop
    assert err.value.reason == "blocked" and len(http.calls) == 4


def test_check_error_gives_an_answer_its_own_reason_before_the_standard_mapping() -> None:
    def check(exc: HttpStatusError) -> None:
        if exc.status == 403 and b"pardner" in exc.body:
            raise SourceError("site_blocked", "block page")

    site = api(FakeHttp([Reply(403, b"whoa there, pardner!")]), Clock(), check_error=check)
    with pytest.raises(SourceError) as err:
        site.get(URL)
    assert err.value.reason == "site_blocked"


def test_request_json_maps_every_failure_to_one_source_error() -> None:
    def reason(reply: Reply, **kw: object) -> str:
        with pytest.raises(SourceError) as err:
            request_json(FakeHttp([reply]), "GET", URL, site="flickr", **kw)  # type: ignore[arg-type]
        return err.value.reason

    assert request_json(FakeHttp([Reply(200, {"a": 1})]), "GET", URL, site="flickr") == {"a": 1}  # type: ignore[arg-type]
    assert reason(Reply(500, b"")) == "flickr_http"
    assert reason(DOWN) == "flickr_fetch"
    assert reason(Reply(200, b"<html>")) == "flickr_bad_reply"
    assert reason(Reply(404, b""), status_error=lambda s: SourceError("removed")) == "removed"
    assert reason(DOWN, reason="reddit_auth") == "reddit_auth"
