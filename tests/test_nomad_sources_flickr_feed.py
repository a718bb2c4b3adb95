"""flickr without a key: the public feed's lenient JSON, the _m -> _b rewrite, the source's requests and rules."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from nomad.sources import flickr
from nomad.sources.api import SiteApi
from nomad.sources.base import SourceError
from nomad.sources.flickr_feed import FlickrFeedSource, feed_endpoint, large_url, parse_feed, parse_feed_text
from tests.conftest import FIXTURES
from tests.nomad_fakes import Cursors, FakeHttp, Reply

FEED = (FIXTURES / "flickr_public_feed.js").read_text()


def test_the_fixture_is_not_json_but_is_read() -> None:
    with pytest.raises(ValueError):
        json.loads(FEED)  # flickr's \' escapes
    obj = parse_feed_text(FEED)
    assert obj["items"][0]["title"] == "Dave's lake at dawn"
    assert obj["items"][1]["title"] == "C:\\photos\\ isn't a title"  # an escaped backslash before ' stays one


def test_wrapped_form_is_read_too() -> None:
    assert parse_feed_text(f"jsonFlickrFeed({FEED});")["items"][0]["link"] == parse_feed_text(FEED)["items"][0]["link"]


@pytest.mark.parametrize("text", [FEED[: len(FEED) // 2], "jsonFlickrFeed(", "<html>busy</html>", '{"items": 3}'])
def test_truncated_or_wrong_answers_are_errors(text: str) -> None:
    with pytest.raises(SourceError) as err:
        parse_feed(text)
    assert err.value.reason == "bad_feed"


def test_items_become_flickr_posts_with_the_1024px_file() -> None:
    posts = parse_feed(FEED)
    assert [p.post_id for p in posts] == ["flickr_53800000001", "flickr_53800000003"]  # the item without a photo is skipped
    dave = posts[0]
    assert dave.source == "flickr" and dave.author == "dave_photos" and dave.title == "Dave's lake at dawn"
    link = dave.links[0]
    assert link.url == "https://live.staticflickr.com/65535/53800000001_b1c2d3e4f5_b.jpg"
    assert (link.width, link.height) == (1024, 683)  # estimated from the 240x160 thumbnail
    assert link.meta["page_url"] == "https://www.flickr.com/photos/dave_photos/53800000001/"
    assert dave.extra["artist"] == "dave_photos" and dave.extra["description_url"] == link.meta["page_url"]
    assert (posts[1].links[0].width, posts[1].links[0].height) == (683, 1024)


@pytest.mark.parametrize("m,b", [
    ("https://live.staticflickr.com/65535/1_abc_m.jpg", "https://live.staticflickr.com/65535/1_abc_b.jpg"),
    ("https://live.staticflickr.com:8443/65535/1_abc.jpg", "https://live.staticflickr.com:8443/65535/1_abc_b.jpg"),
    ("https://farm1.staticflickr.com/2/1_abc_m.png?x=1", "https://farm1.staticflickr.com/2/1_abc_b.png"),
    ("https://live.staticflickr.com/65535/not-a-photo.jpg", ""),
    ("javascript:alert(1)", ""),
])
def test_large_url(m: str, b: str) -> None:
    assert large_url(m) == b


def test_feed_endpoint() -> None:
    assert feed_endpoint("https://api.flickr.com:8443") == "https://api.flickr.com:8443/services/feeds/photos_public.gne"
    assert feed_endpoint("https://mirror.example/feed.gne") == "https://mirror.example/feed.gne"



def test_poll_asks_json_with_tags_and_moves_the_cursor_after_each_post() -> None:
    http = FakeHttp([Reply(200, FEED.encode())])
    src = FlickrFeedSource(SiteApi(http, "flickr", sleep=lambda s: False), tags=["lake", " dawn "])  # type: ignore[arg-type]
    cursors = Cursors()
    it = src.poll(cursors, lambda _: False)
    first = next(it)
    assert first.post_id == "flickr_53800000003" and "newest" not in cursors  # oldest first; cursor after the yield
    next(it)
    assert cursors["newest"] == "flickr_53800000003"
    assert list(it) == [] and cursors["newest"] == "flickr_53800000001"
    _, url, kw = http.calls[0]
    assert url == "https://api.flickr.com/services/feeds/photos_public.gne"
    assert kw["params"] == {"format": "json", "nojsoncallback": 1, "tags": "lake,dawn", "tagmode": "any"}


def test_the_source_has_its_own_size_rules_and_needs_no_key() -> None:
    args = SimpleNamespace(flickr_min_long_side=1024, flickr_min_short_side=576)
    assert flickr.size_rules(args) == (1024, 576)
    assert flickr.available(args, {}) is True
    assert "FLICKR_API_KEY" in flickr.credentials({"FLICKR_API_KEY": "k"}) and "none" in flickr.credentials({})
