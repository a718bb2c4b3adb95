"""reddit post/listing parsing (fixtures in tests/fixtures plus our own edge cases) and the polite client."""
from __future__ import annotations

import copy
import json

import pytest

from nomad.sources.base import Candidate, site_of
from nomad.sources.reddit import (
    RedditClient,
    RedditConfig,
    parse_listing,
    parse_post,
    user_agent,
)
from tests.conftest import FIXTURES
from tests.nomad_fakes import Clock, FakeHttp, Reply


@pytest.fixture(scope="module")
def listing() -> dict:
    return json.loads((FIXTURES / "reddit_new_listing.json").read_text())


def post(listing: dict, pid: str) -> dict:
    for child in listing["data"]["children"]:
        if child["data"]["id"] == pid:
            return copy.deepcopy(child["data"])
    raise KeyError(pid)


def test_listing_posts_and_after(listing: dict) -> None:
    posts, after = parse_listing(listing)
    assert [p.post_id for p in posts] == [f"t3_1d4k2p{i}" for i in range(1, 7)]
    assert after == "t3_1d4k2p6"
    assert all(isinstance(p, Candidate) and p.source == "reddit" for p in posts)


def test_direct_i_redd_it_with_preview_size(listing: dict) -> None:
    c = parse_post(post(listing, "1d4k2p1"))
    assert c.permalink == "https://www.reddit.com/r/pics/comments/1d4k2p1/sunset_over_the_bay/"
    assert c.subreddit == "pics" and c.author == "someone" and c.title == "Sunset over the bay"
    assert len(c.links) == 1
    link = c.links[0]
    assert link.url == "https://i.redd.it/8x2kq0abcd1e1.jpeg"
    assert (link.width, link.height) == (3024, 4032)
    assert site_of(link.url) == "reddit"


def test_gallery_order_from_gallery_data_not_media_metadata(listing: dict) -> None:
    c = parse_post(post(listing, "1d4k2p2"))
    assert [ln.url for ln in c.links] == ["https://i.redd.it/k3j5zq1.jpg", "https://i.redd.it/w7p2rt2.png"]
    assert [(ln.width, ln.height) for ln in c.links] == [(4000, 3000), (1080, 1080)]
    assert c.links[1].meta["caption"] == "second"


def test_gallery_skips_non_valid_and_non_image(listing: dict) -> None:
    data = post(listing, "1d4k2p2")
    data["gallery_data"]["items"].append({"media_id": "anim1", "id": 3})
    data["gallery_data"]["items"].append({"media_id": "broken", "id": 4})
    data["gallery_data"]["items"].append({"media_id": "vid1", "id": 5})
    data["gallery_data"]["items"].append({"media_id": "missing", "id": 6})
    data["media_metadata"]["anim1"] = {"status": "valid", "e": "AnimatedImage", "m": "image/gif", "s": {"x": 2000, "y": 2000, "gif": "g"}}
    data["media_metadata"]["broken"] = {"status": "failed"}
    data["media_metadata"]["vid1"] = {"status": "valid", "e": "RedditVideo", "m": "video/mp4"}
    c = parse_post(data)
    kinds = [(ln.media, ln.animated) for ln in c.links]
    assert kinds == [("image", False), ("image", False), ("image", True), ("unavailable", False), ("video", False), ("unavailable", False)]


@pytest.mark.parametrize("field,value", [("gallery_data", None), ("media_metadata", None), ("gallery_data", "drop"), ("media_metadata", "drop")])
def test_gallery_null_or_missing_parts_tolerated(listing: dict, field: str, value: object) -> None:
    data = post(listing, "1d4k2p2")
    if value == "drop":
        del data[field]
    else:
        data[field] = value
    c = parse_post(data)
    # No crash; nothing downloadable (either no links, or links marked unavailable).
    assert all(ln.media != "image" for ln in c.links)


def test_crosspost_takes_parent_media(listing: dict) -> None:
    parent = post(listing, "1d4k2p1")
    child = {
        "id": "xp1", "name": "t3_xp1", "subreddit": "BeAmazed", "title": "xpost", "author": "reposter",
        "permalink": "/r/BeAmazed/comments/xp1/xpost/", "url": "/r/pics/comments/1d4k2p1/sunset_over_the_bay/",
        "domain": "self.BeAmazed", "over_18": False, "removed_by_category": None,
        "crosspost_parent_list": [{"id": "older"}, parent],
    }
    c = parse_post(child)
    assert c.post_id == "t3_xp1" and c.subreddit == "BeAmazed"
    assert [ln.url for ln in c.links] == ["https://i.redd.it/8x2kq0abcd1e1.jpeg"]
    assert c.links[0].width == 3024


def test_crosspost_of_nsfw_parent_is_nsfw(listing: dict) -> None:
    parent = post(listing, "1d4k2p1")
    parent["over_18"] = True
    c = parse_post({"id": "xp2", "name": "t3_xp2", "url": "x", "crosspost_parent_list": [parent]})
    assert c.over_18


def test_imgur_and_flickr_links_handed_over(listing: dict) -> None:
    imgur = parse_post(post(listing, "1d4k2p3"))
    assert site_of(imgur.links[0].url) == "imgur" and imgur.links[0].width == 1280
    album = parse_post(post(listing, "1d4k2p5"))
    assert site_of(album.links[0].url) == "imgur"
    flickr = parse_post(post(listing, "1d4k2p4"))
    assert site_of(flickr.links[0].url) == "flickr"


def test_video_post(listing: dict) -> None:
    c = parse_post(post(listing, "1d4k2p6"))
    assert c.is_video and [ln.media for ln in c.links] == ["video"]


def test_removed_post_has_no_links(listing: dict) -> None:
    data = post(listing, "1d4k2p1")
    data["removed_by_category"] = "moderator"
    c = parse_post(data)
    assert c.removed and c.links == []


def test_other_direct_links_by_extension_and_html_escapes(listing: dict) -> None:
    data = post(listing, "1d4k2p1")
    data["url"] = data["url_overridden_by_dest"] = "https://example.org/photos/big.PNG?a=1&amp;b=2"
    c = parse_post(data)
    assert c.links[0].url == "https://example.org/photos/big.PNG?a=1&b=2"
    assert site_of(c.links[0].url) == "direct"
    data["url"] = data["url_overridden_by_dest"] = "https://example.org/article.html"
    assert parse_post(data).links == []
    data["url"] = data["url_overridden_by_dest"] = "https://example.org/funny.gif"
    assert parse_post(data).links[0].animated


def test_bad_listing_raises() -> None:
    from nomad.sources.base import SourceError

    with pytest.raises(SourceError):
        parse_listing({"kind": "Listing"})


def test_user_agent_form() -> None:
    assert user_agent("linux", "nomad", "1.2", "alice") == "linux:nomad:1.2 (by /u/alice)"


# --- the client, over a scripted fake HTTP (the emulator tests cover the real stack) -----------

def page(ids: list[str], after: str | None) -> dict:
    return {"kind": "Listing", "data": {"after": after, "children": [
        {"kind": "t3", "data": {"id": i, "name": f"t3_{i}", "url": f"https://i.redd.it/{i}.jpg"}} for i in ids]}}



def test_anonymous_listing_request_shape() -> None:
    http = FakeHttp([Reply(200, page(["a", "b"], None), {"X-Ratelimit-Remaining": "9", "X-Ratelimit-Reset": "60"})])
    clock = Clock()
    client = RedditClient(http, RedditConfig(base_url="https://www.reddit.com", user_agent="t:a:1 (by /u/x)"), sleep=clock.sleep, clock=clock.now)
    posts = list(client.poll("r/all/new"))
    assert [p.post_id for p in posts] == ["t3_a", "t3_b"]
    method, url, kw = http.calls[0]
    assert method == "GET" and url == "https://www.reddit.com/r/all/new.json"
    assert kw["params"]["limit"] == 100 and kw["params"]["raw_json"] == 1
    assert kw["headers"]["User-Agent"] == "t:a:1 (by /u/x)"
    assert client.rate.remaining == 9


def test_sleeps_until_reset_when_nearly_spent() -> None:
    http = FakeHttp([
        Reply(200, page(["a"], None), {"X-Ratelimit-Remaining": "1", "X-Ratelimit-Reset": "42"}),
        Reply(200, page(["b"], None), {"X-Ratelimit-Remaining": "99", "X-Ratelimit-Reset": "600"}),
    ])
    clock = Clock()
    client = RedditClient(http, RedditConfig(), sleep=clock.sleep, clock=clock.now)
    client.listing("r/all/new")
    assert clock.slept == []
    client.listing("r/all/new")
    assert len(clock.slept) == 1 and 42 <= clock.slept[0] < 43
    assert client.rate.waits == 1


def test_429_and_5xx_back_off_then_succeed() -> None:
    http = FakeHttp([
        Reply(429, {}, {"X-Ratelimit-Remaining": "0", "X-Ratelimit-Reset": "30", "Retry-After": "30"}),
        Reply(503, {}, {}),
        Reply(200, page(["a"], None), {}),
    ])
    clock = Clock()
    client = RedditClient(http, RedditConfig(backoff=1.0), sleep=clock.sleep, clock=clock.now)
    posts, _ = client.listing("r/all/new")
    assert [p.post_id for p in posts] == ["t3_a"]
    assert clock.slept[0] >= 30  # obeyed the reset/Retry-After, not just the backoff
    assert len(http.calls) == 3 and client.rate.throttled == 1


def test_retries_are_bounded() -> None:
    from nomad.sources.base import SourceError

    http = FakeHttp([Reply(500, {}, {})] * 10)
    clock = Clock()
    client = RedditClient(http, RedditConfig(max_retries=2), sleep=clock.sleep, clock=clock.now)
    with pytest.raises(SourceError) as err:
        client.listing("r/all/new")
    assert err.value.transient and len(http.calls) == 3


def test_backfill_follows_after_until_end_and_dedupes() -> None:
    http = FakeHttp([
        Reply(200, page(["a", "b"], "t3_b"), {}),
        Reply(200, page(["b", "c"], "t3_c"), {}),
        Reply(200, page(["d"], None), {}),
    ])
    client = RedditClient(http, RedditConfig(limit=2), sleep=Clock().sleep)
    ids = [p.post_id for p in client.poll("r/all/new", backfill=True)]
    assert ids == ["t3_a", "t3_b", "t3_c", "t3_d"]
    assert [kw["params"].get("after") for _, _, kw in http.calls] == [None, "t3_b", "t3_c"]


def test_no_backfill_reads_one_page() -> None:
    http = FakeHttp([Reply(200, page(["a"], "t3_a"), {}), Reply(200, page(["z"], None), {})])
    client = RedditClient(http, RedditConfig(), sleep=Clock().sleep)
    assert [p.post_id for p in client.poll("r/all/new")] == ["t3_a"]
    assert len(http.calls) == 1


def test_backfill_stops_at_seen_page() -> None:
    http = FakeHttp([Reply(200, page(["a"], "t3_a"), {}), Reply(200, page(["b"], "t3_b"), {}), Reply(200, page(["c"], None), {})])
    client = RedditClient(http, RedditConfig(), sleep=Clock().sleep)
    list(client.poll("r/all/new", backfill=True, is_seen=lambda pid: pid == "t3_b"))
    assert len(http.calls) == 2


def test_oauth_token_bearer_refresh_before_expiry_and_on_401() -> None:
    token = lambda t, exp=3600: Reply(200, {"access_token": t, "token_type": "bearer", "expires_in": exp}, {})  # noqa: E731
    http = FakeHttp([
        token("tok1", 100),
        Reply(200, page(["a"], None), {}),
        token("tok2"),  # refreshed because tok1 is within the margin of expiry
        Reply(401, {}, {}),
        token("tok3"),  # refreshed on 401
        Reply(200, page(["b"], None), {}),
    ])
    clock = Clock()
    cfg = RedditConfig(base_url="https://www.reddit.com", oauth_url="https://oauth.reddit.com", client_id="id", client_secret="sec", token_margin=60)
    client = RedditClient(http, cfg, sleep=clock.sleep, clock=clock.now)
    client.listing("r/all/new")
    m, url, kw = http.calls[0]
    assert m == "POST" and url == "https://www.reddit.com/api/v1/access_token"
    assert kw["auth"] == ("id", "sec") and kw["data"]["grant_type"] == "client_credentials"
    m, url, kw = http.calls[1]
    assert url == "https://oauth.reddit.com/r/all/new" and kw["headers"]["Authorization"] == "bearer tok1"
    clock.t += 50  # 50 s left of 100, inside the 60 s margin
    posts, _ = client.listing("r/all/new")
    assert [p.post_id for p in posts] == ["t3_b"]
    assert http.calls[3][2]["headers"]["Authorization"] == "bearer tok2"
    assert http.calls[5][2]["headers"]["Authorization"] == "bearer tok3"


def test_top_pages_to_limit() -> None:
    http = FakeHttp([Reply(200, page(["a", "b"], "t3_b"), {}), Reply(200, page(["c", "d"], "t3_d"), {})])
    client = RedditClient(http, RedditConfig(), sleep=Clock().sleep)
    top = client.top("EarthPorn", t="year", limit=3)
    assert [p.post_id for p in top] == ["t3_a", "t3_b", "t3_c"]
    assert http.calls[0][1].endswith("/r/EarthPorn/top.json") and http.calls[0][2]["params"]["t"] == "year"


def test_gallery_file_url_keeps_the_preview_port(listing: dict) -> None:
    data = post(listing, "1d4k2p2")
    for entry in data["media_metadata"].values():
        entry["s"]["u"] = entry["s"]["u"].replace("preview.redd.it/", "preview.redd.it:8443/")
    assert parse_post(data).links[0].url == "https://i.redd.it:8443/k3j5zq1.jpg"


def test_deleted_gallery_is_no_media_and_imgur_gallery_is_not_a_reddit_gallery(listing: dict) -> None:
    from nomad.rules import NO_IMAGE, NO_MEDIA, Rules

    data = post(listing, "1d4k2p2")
    data["gallery_data"] = data["media_metadata"] = None
    c = parse_post(data)
    assert c.is_gallery and Rules().check_post(c) == NO_MEDIA
    imgur = post(listing, "1d4k2p5")
    imgur["url"] = imgur["url_overridden_by_dest"] = "https://imgur.com/gallery/title-Xy7Pq2Z"
    c = parse_post(imgur)
    assert not c.is_gallery and site_of(c.links[0].url) == "imgur"
    yt = post(listing, "1d4k2p4")
    yt["url"] = yt["url_overridden_by_dest"] = "https://www.youtube.com/watch?v=x"
    yt["post_hint"] = "rich:video"
    assert Rules().check_post(parse_post(yt)) == NO_IMAGE
