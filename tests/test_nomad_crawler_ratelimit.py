"""reddit politeness measured against the emulator: its rate-limit headers, its 429s, its request log.

The JSON API needs OAuth since reddit blocked anonymous JSON; the key-less Atom feeds' pacing
and 429 handling are in test_nomad_crawler_keyless.py.
"""
from __future__ import annotations

import time

import pytest

from nomad.http import HttpClient, HttpConfig
from nomad.sources.base import SourceError
from nomad.sources.reddit import RedditClient, RedditConfig
from stack.emulator import Emulator

pytestmark = pytest.mark.timeout(120)


def client(emu: Emulator, **kw: object) -> RedditClient:
    """An OAuth client: anonymous JSON answers reddit's block page (as reddit does since 2026-05-29)."""
    http = HttpClient(HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, retries=0))
    env = emu.nomad_env()
    kw = {"client_id": env["REDDIT_CLIENT_ID"], "client_secret": env["REDDIT_CLIENT_SECRET"], **kw}
    cfg = RedditConfig(base_url=f"https://www.reddit.com:{emu.port}", oauth_url=f"https://oauth.reddit.com:{emu.port}",
                       user_agent="test:nomad-tests:0.1 (by /u/tester)", backoff=0.2, **kw)  # type: ignore[arg-type]
    return RedditClient(http, cfg)


def listing_requests(emu: Emulator) -> list:
    time.sleep(0.3)  # the emulator logs a request when its handler has finished
    return [r for r in emu.records() if r.path.startswith("/r/")]


def test_obeys_remaining_and_reset_without_a_single_429() -> None:
    window, limit = 2.0, 3
    with Emulator(rate_limit=limit, rate_window=window) as emu:
        reddit = client(emu)
        t0 = time.monotonic()
        for _ in range(7):
            posts, _ = reddit.listing("r/all/new", limit=5)
            assert posts
        elapsed = time.monotonic() - t0
        reqs = listing_requests(emu)
    assert [r.status for r in reqs] == [200] * 7  # never over the budget
    assert reddit.rate.waits >= 2 and reddit.rate.throttled == 0
    # At most `limit` requests in any window: 7 requests need at least two window resets.
    assert elapsed >= 2 * window - 0.5
    for r in reqs:
        assert r.headers.get("User-Agent") == "test:nomad-tests:0.1 (by /u/tester)"
        assert r.query.get("raw_json") == ["1"] and r.query.get("limit") == ["5"]


def test_429_and_503_are_backed_off_and_retried() -> None:
    with Emulator() as emu:
        emu.scenario.inject[("oauth.reddit.com", "/r/all/new")] = [429, 503]
        reddit = client(emu)
        t0 = time.monotonic()
        posts, _ = reddit.listing("r/all/new")
        assert posts and reddit.rate.throttled == 1
        assert time.monotonic() - t0 >= 1.0  # the 429's Retry-After: 1 was honoured
        assert [r.status for r in listing_requests(emu)] == [429, 503, 200]


def test_backfill_pages_through_the_listing_with_after() -> None:
    with Emulator() as emu:
        reddit = client(emu, limit=10)
        ids = [p.post_id for p in reddit.poll("r/all/new", backfill=True)]
        afters = [r.query.get("after", [None])[0] for r in listing_requests(emu)]
    assert len(ids) == len(set(ids)) == len(emu.scenario.posts)
    assert afters[0] is None and all(a and a.startswith("t3_") for a in afters[1:])
    assert len(afters) == -(-len(emu.scenario.posts) // 10)


def test_oauth_app_only_token_and_bearer() -> None:
    with Emulator() as emu:
        reddit = client(emu)
        posts, _ = reddit.listing("r/all/new")
        assert posts
        time.sleep(0.3)
        token_reqs = [r for r in emu.records() if r.path == "/api/v1/access_token"]
        api = [r for r in emu.records() if r.host == "oauth.reddit.com"]
    assert len(token_reqs) == 1 and token_reqs[0].method == "POST" and token_reqs[0].host == "www.reddit.com"
    assert api and api[0].status == 200 and api[0].headers["Authorization"].startswith("bearer ")


def test_anonymous_json_block_page_is_its_own_error() -> None:
    with Emulator() as emu:
        reddit = client(emu, client_id=None, client_secret=None)
        with pytest.raises(SourceError) as err:
            reddit.listing("r/all/new")
        reqs = listing_requests(emu)
    assert err.value.reason == "reddit_blocked" and [r.status for r in reqs] == [403]  # not retried
