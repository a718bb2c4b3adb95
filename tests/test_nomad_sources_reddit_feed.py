"""reddit without an account: the Atom feed parser (fixture + hostile XML) and the JSON -> feed fallback."""
from __future__ import annotations

import pytest

from nomad.sources.api import SiteApi, SourceStatus
from nomad.sources.base import SourceError
from nomad.sources.reddit import RedditClient, RedditConfig, RedditSource
from nomad.sources.reddit_feed import is_block_page, link_of, parse_feed
from tests.conftest import FIXTURES
from stack.emulator.feeds import BLOCK_PAGE, ENTITY_BOMB, EXTERNAL_ENTITY
from tests.nomad_fakes import Clock, Cursors, FakeHttp, Reply

ATOM = (FIXTURES / "reddit_new.atom").read_bytes()


def test_feed_entries_from_the_fixture() -> None:
    posts = parse_feed(ATOM)
    assert [p.post_id for p in posts] == ["t3_1l8abcd", "t3_1l8abce", "t3_1l8abcf", "t3_1l8abcg", "t3_1l8abch"]
    lake = posts[0]
    assert lake.source == "reddit" and lake.subreddit == "EarthPorn" and lake.author == "lakeside_lou"
    assert lake.permalink == "https://www.reddit.com/r/EarthPorn/comments/1l8abcd/dawn_over_the_lake_oc_4032x3024/"
    assert [ln.url for ln in lake.links] == ["https://i.redd.it/q9w8e7r6t5y4.jpeg"]  # the [link], not the 640 px thumbnail
    assert lake.links[0].width is None and not lake.over_18  # the feed says neither
    assert lake.created_utc == 1781092805.0
    assert lake.extra["thumbnail_url"].endswith("s=0a1b2c3d") and "&amp;" not in lake.extra["thumbnail_url"]


def test_escaped_html_inside_xml_is_unescaped_once_each() -> None:
    cat = parse_feed(ATOM)[1]
    assert cat.title == "My cat's view of the city"
    assert cat.links[0].url == "https://i.imgur.com/Ab1Cd2E.jpg?fb=1&x=2"  # &amp;amp; in the XML


def test_gallery_self_post_and_video() -> None:
    _, _, gallery, selfpost, video = parse_feed(ATOM)
    assert gallery.is_gallery and gallery.links == []  # the feed has no gallery items: rules say no_media
    assert selfpost.links == [] and not selfpost.is_gallery  # a link to its own comments: no_image
    assert video.is_video and video.links[0].media == "video"


def test_link_of_takes_the_link_anchor_only() -> None:
    html = '<a href="https://x/permalink">thumb</a> <a href="https://i.redd.it/a.jpg">[link]</a> <a href="https://x/c">[comments]</a>'
    assert link_of(html) == "https://i.redd.it/a.jpg"
    assert link_of("<p>no links</p>") == ""


@pytest.mark.parametrize("body,reason", [
    (ENTITY_BOMB, "hostile_feed"),
    (EXTERNAL_ENTITY, "hostile_feed"),
    (ATOM[: len(ATOM) // 2], "bad_feed"),
    (b"<html><body>not a feed</body></html>", "bad_feed"),
])
def test_hostile_and_broken_feeds_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(SourceError) as err:
        parse_feed(body)
    assert err.value.reason == reason and err.value.transient


def test_block_page_recognised() -> None:
    assert is_block_page(403, {"Content-Type": "text/html"}, BLOCK_PAGE)
    assert is_block_page(403, {"server": "snooserv"}, b"")
    assert not is_block_page(403, {}, b'{"message": "Forbidden", "error": 403}')
    assert not is_block_page(200, {}, BLOCK_PAGE)


# --- the source: JSON, block page, feed fallback, pacing ------------------------------------------------



def source(http: FakeHttp, clock: Clock, *, oauth: bool = False, interval: float = 60.0,
           statuses: list[tuple[str, SourceStatus]] | None = None, listings: list[str] | None = None) -> RedditSource:
    cfg = RedditConfig(base_url="https://www.reddit.com", client_id="id" if oauth else None,
                       client_secret="sec" if oauth else None, max_retries=1)
    client = RedditClient(http, cfg, sleep=clock.sleep, clock=clock.now)  # type: ignore[arg-type]
    on_status = (lambda n, st: statuses.append((n, st))) if statuses is not None else None
    feeds = SiteApi(http, "reddit", min_interval=interval, max_retries=2, backoff=1.0, sleep=clock.sleep,  # type: ignore[arg-type]
                    clock=clock.now, on_status=on_status)
    return RedditSource(client, feeds, listings=listings or ["r/all/new"], json_recheck=3600, on_status=on_status,
                        clock=clock.now)


BLOCK = Reply(403, BLOCK_PAGE, {"Server": "snooserv", "Content-Type": "text/html"})


def test_block_page_falls_back_to_the_feed_and_is_remembered(caplog: pytest.LogCaptureFixture) -> None:
    http = FakeHttp([BLOCK, Reply(200, ATOM), Reply(200, ATOM)])
    clock, cursors, statuses = Clock(), Cursors(), []
    src = source(http, clock, statuses=statuses)
    first = [p.post_id for p in src.poll(cursors, lambda _: False)]
    assert [u for _, u, _ in http.calls] == ["https://www.reddit.com/r/all/new.json", "https://www.reddit.com/r/all/new/.rss"]
    assert first == ["t3_1l8abch", "t3_1l8abcg", "t3_1l8abcf", "t3_1l8abce", "t3_1l8abcd"]  # oldest first
    assert cursors["feed:r/all/new"] == "t3_1l8abcd"  # the newest handled
    assert float(cursors["json_blocked_until"]) == pytest.approx(clock.t + 3600, abs=1)
    assert ("blocked" in [st.state for _, st in statuses]) and statuses[-1][1].state == "ok"
    warnings = [r.getMessage() for r in caplog.records if "block page" in r.getMessage()]
    assert len(warnings) == 1 and "REDDIT_CLIENT_ID" in warnings[0]
    # The next cycle asks only the feed, after the pacing interval.
    list(src.poll(cursors, lambda _: False))
    assert http.calls[-1][1].endswith("/.rss") and len(http.calls) == 3 and 60.0 in clock.slept
    assert len([r for r in caplog.records if "block page" in r.getMessage()]) == 1  # said once


def test_a_restart_within_the_recheck_window_does_not_ask_the_json() -> None:
    clock, cursors = Clock(), Cursors(json_blocked_until=repr(1000.0 + 100))
    http = FakeHttp([Reply(200, ATOM)])
    assert len(list(source(http, clock).poll(cursors, lambda _: False))) == 5
    assert [u for _, u, _ in http.calls] == ["https://www.reddit.com/r/all/new/.rss"]
    # After the window the JSON is tried again (reddit may have reopened it).
    clock.t += 200
    http = FakeHttp([Reply(200, {"kind": "Listing", "data": {"after": None, "children": []}})])
    assert list(source(http, clock).poll(cursors, lambda _: False)) == []
    assert http.calls[0][1].endswith("/r/all/new.json")


def test_oauth_never_reads_the_feed() -> None:
    listing = {"kind": "Listing", "data": {"after": None, "children": [
        {"kind": "t3", "data": {"id": "a", "name": "t3_a", "url": "https://i.redd.it/a.jpg"}}]}}
    http = FakeHttp([Reply(200, {"access_token": "tok", "expires_in": 3600}), Reply(200, listing)])
    posts = list(source(http, Clock(), oauth=True).poll(Cursors(), lambda _: False))
    assert [p.post_id for p in posts] == ["t3_a"]
    assert all(".rss" not in u for _, u, _ in http.calls)


def test_feed_429_waits_for_retry_after_then_reads() -> None:
    http = FakeHttp([BLOCK, Reply(429, b"slow down", {"Retry-After": "42"}), Reply(200, ATOM)])
    clock, statuses = Clock(), []
    posts = list(source(http, clock, interval=0, statuses=statuses).poll(Cursors(), lambda _: False))
    assert len(posts) == 5 and max(clock.slept) >= 42
    assert "rate_limited" in [st.state for _, st in statuses]


def test_a_forbidden_json_that_is_not_the_block_page_is_an_error_not_a_fallback() -> None:
    http = FakeHttp([Reply(403, {"message": "Forbidden", "error": 403})])
    with pytest.raises(SourceError) as err:
        list(source(http, Clock()).poll(Cursors(), lambda _: False))
    assert err.value.reason == "reddit_http" and len(http.calls) == 1


def test_one_failing_listing_does_not_stop_the_others() -> None:
    http = FakeHttp([BLOCK, Reply(200, ENTITY_BOMB), Reply(200, ATOM)])
    src = source(http, Clock(), interval=0, listings=["r/bomb/new", "r/all/new"])
    assert len(list(src.poll(Cursors(), lambda _: False))) == 5
    http = FakeHttp([BLOCK, Reply(200, ENTITY_BOMB)])
    with pytest.raises(SourceError) as err:  # every listing failed: the source failed
        list(source(http, Clock(), interval=0).poll(Cursors(), lambda _: False))
    assert err.value.reason == "hostile_feed"


def test_feed_pacing_survives_a_restart() -> None:
    clock, cursors = Clock(), Cursors(json_blocked_until=repr(1000.0 + 3600))
    list(source(FakeHttp([Reply(200, ATOM)]), clock).poll(cursors, lambda _: False))
    assert clock.slept == [] and float(cursors["feed_last_at"]) == 1000.0
    clock.t += 20  # a new process 20 s later: it waits the remaining 40 s before asking the feed
    list(source(FakeHttp([Reply(200, ATOM)]), clock).poll(cursors, lambda _: False))
    assert clock.slept == [pytest.approx(40.0)]
    clock.t += 300  # long after: no wait
    list(source(FakeHttp([Reply(200, ATOM)]), clock).poll(cursors, lambda _: False))
    assert len(clock.slept) == 1


def test_an_unreachable_feed_does_not_hold_back_the_next_try() -> None:
    """Offline, no request reached reddit: the next process asks at once, not a pacing interval later."""
    from nomad.net.errors import FetchError

    down = Reply(0, b"", error=FetchError("connection", "connection refused"))
    clock, cursors = Clock(), Cursors(json_blocked_until=repr(1000.0 + 3600))
    with pytest.raises(SourceError) as err:
        list(source(FakeHttp([down, down, down]), clock).poll(cursors, lambda _: False))
    assert err.value.reason == "reddit_fetch" and "feed_last_at" not in cursors
    assert all(s <= 2.0 for s in clock.slept)  # backoff (1 s, 2 s), never the 60 s interval
    slept = len(clock.slept)
    list(source(FakeHttp([Reply(200, ATOM)]), clock).poll(cursors, lambda _: False))
    assert len(clock.slept) == slept and float(cursors["feed_last_at"]) == clock.t
