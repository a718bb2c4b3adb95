"""Bluesky's Jetstream source: event parsing (fixtures) and the websocket reader against the emulator."""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from nomad.http import HttpClient, HttpConfig
from nomad.sources import bluesky
from nomad.sources.api import SourceStatus
from nomad.sources.base import SourceError, site_of
from nomad.sources.bluesky import (
    OPTOUT_KEY,
    REWIND_US,
    JetstreamSource,
    OptOuts,
    expected_size,
    parse_frame,
    post_candidate,
    profile_update,
    subscribe_url,
)
from nomad.store import Store
from tests.conftest import FIXTURES
from stack.emulator import Emulator
from stack.emulator.jetstream import APPVIEW_HOST, CDN_HOST, JETSTREAM_HOST, image_entry, post_event

POST = "app.bsky.feed.post"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# --- parsing --------------------------------------------------------------------------------


def test_image_post_becomes_full_size_cdn_links() -> None:
    event = fixture("jetstream_post_images.json")
    cand, why = post_candidate(event)
    assert why == "" and cand is not None
    did = "did:plc:eygmaihciaxprqvxpfvl6flk"
    assert cand.source == "bluesky"
    assert cand.post_id == f"at://{did}/{POST}/3l3qo2vuowo2b"
    assert cand.author == did and cand.title == "Foggy morning by the lake"
    assert cand.url == cand.permalink == f"https://bsky.app/profile/{did}/post/3l3qo2vuowo2b"
    assert cand.extra["description_url"] == cand.url and cand.extra["langs"] == ["en"]
    assert cand.created_utc == pytest.approx(1725911162.102)
    first, second = cand.links
    assert first.url == f"https://cdn.bsky.app/img/feed_fullsize/plain/{did}/bafkreibjfgx2gprinfvicegelk5kosd6y2frmqpqzwqkg7usac74l3t2v4@jpeg"
    # 4000x3000 uploaded: the full-size CDN image is scaled to 2000 on its long side.
    assert (first.width, first.height) == (2000, 1500)
    assert first.meta["alt"] == "Morning fog over a lake"
    assert (second.width, second.height) == (1366, 1024) and "alt" not in second.meta
    assert cand.meta()["source"] == "bluesky"
    assert site_of(first.url) == "direct"  # the crawler downloads it as it is


def test_record_with_media_images_are_taken() -> None:
    cand, _ = post_candidate(fixture("jetstream_post_record_with_media.json"), "https://cdn.bsky.app:8443/")
    assert cand is not None and len(cand.links) == 1
    assert cand.links[0].url.startswith("https://cdn.bsky.app:8443/img/feed_fullsize/plain/did:plc:z72i7hdynmk6r22z27h6tvur/")
    assert (cand.links[0].width, cand.links[0].height) == (2000, 1333)


@pytest.mark.parametrize("label", ["porn", "sexual", "nudity", "graphic-media"])
def test_adult_self_labels_are_skipped(label: str) -> None:
    event = fixture("jetstream_post_adult.json")
    event["commit"]["record"]["labels"]["values"] = [{"val": "other"}, {"val": label}]
    assert post_candidate(event) == (None, "adult_label")


def test_harmless_self_label_is_kept() -> None:
    event = fixture("jetstream_post_adult.json")
    event["commit"]["record"]["labels"]["values"] = [{"val": "something-else"}]
    cand, _ = post_candidate(event)
    assert cand is not None


def test_text_only_other_ops_and_collections_are_skipped() -> None:
    event = fixture("jetstream_post_images.json")
    text_only = copy.deepcopy(event)
    del text_only["commit"]["record"]["embed"]
    assert post_candidate(text_only) == (None, "text_only")
    link_card = copy.deepcopy(event)
    link_card["commit"]["record"]["embed"] = {"$type": "app.bsky.embed.external", "external": {"uri": "https://x.example/a.jpg"}}
    assert post_candidate(link_card) == (None, "not_images")
    video = copy.deepcopy(event)
    video["commit"]["record"]["embed"] = {"$type": "app.bsky.embed.video", "video": {"$type": "blob", "ref": {"$link": "bafkrei" + "a" * 50}}}
    assert post_candidate(video) == (None, "not_images")
    for op in ("update", "delete"):
        other = copy.deepcopy(event)
        other["commit"]["operation"] = op
        assert post_candidate(other) == (None, "not_post")
    like = copy.deepcopy(event)
    like["commit"]["collection"] = "app.bsky.feed.like"
    assert post_candidate(like) == (None, "not_post")
    for item in fixture("jetstream_identity_account.json"):
        assert post_candidate(item) == (None, "not_post")


def test_untrusted_ids_never_reach_a_url() -> None:
    """DIDs, rkeys and CIDs come from strangers: anything that could bend the CDN path is refused."""
    event = fixture("jetstream_post_images.json")
    bad_did = copy.deepcopy(event)
    bad_did["did"] = "did:plc:abc/../../admin"
    assert post_candidate(bad_did) == (None, "bad_post")
    bad_rkey = copy.deepcopy(event)
    bad_rkey["commit"]["rkey"] = "a/b"
    assert post_candidate(bad_rkey) == (None, "bad_post")
    bad_cid = copy.deepcopy(event)
    for img in bad_cid["commit"]["record"]["embed"]["images"]:
        img["image"]["ref"]["$link"] = "../../etc/passwd"
    assert post_candidate(bad_cid) == (None, "no_image")


def test_expected_size_from_aspect_ratio() -> None:
    assert expected_size({"width": 1600, "height": 1200}) == (1600, 1200)
    assert expected_size({"width": 1200, "height": 6000}) == (400, 2000)
    assert expected_size({"width": 4, "height": 3}) == (None, None)  # a bare ratio: decided after download
    assert expected_size({"width": "1600", "height": 1200}) == (None, None)
    assert expected_size({"width": 0, "height": 1200}) == (None, None)
    assert expected_size(None) == (None, None)


def test_profile_opt_out_and_back() -> None:
    event = fixture("jetstream_profile_optout.json")
    did = event["did"]
    assert profile_update(event) == (did, True)
    cleared = copy.deepcopy(event)
    del cleared["commit"]["record"]["labels"]
    assert profile_update(cleared) == (did, False)
    deleted = copy.deepcopy(event)
    deleted["commit"] = {"rev": "x", "operation": "delete", "collection": "app.bsky.actor.profile", "rkey": "self"}
    assert profile_update(deleted) == (did, False)
    assert profile_update(fixture("jetstream_post_images.json")) is None
    # The label on a post itself is honoured too.
    post = fixture("jetstream_post_images.json")
    post["commit"]["record"]["labels"] = {"$type": "com.atproto.label.defs#selfLabels", "values": [{"val": "!no-unauthenticated"}]}
    assert post_candidate(post) == (None, "opted_out")


def test_opt_outs_are_bounded_and_round_trip() -> None:
    o = OptOuts(limit=3)
    for n in range(5):
        o.set(f"did:plc:{n}", True)
    assert len(o) == 3 and "did:plc:0" not in o and "did:plc:4" in o
    o.set("did:plc:2", True)  # refreshed: now the newest
    o.set("did:plc:5", True)
    assert "did:plc:3" not in o and "did:plc:2" in o
    o.set("did:plc:5", False)
    again = OptOuts(limit=3)
    again.load(o.dump())
    assert list(again._dids) == ["did:plc:4", "did:plc:2"]
    again.load("not json")
    assert len(again) == 0


@pytest.mark.parametrize("frame", ["{broken", "[1, 2]", '"text"', '{"did": "did:plc:x", "kind": "commit"}',
                                   '{"time_us": "12", "did": "did:plc:x", "kind": "commit"}', b"\xff\xfe"])
def test_malformed_frames_are_refused(frame: str | bytes) -> None:
    with pytest.raises(ValueError):
        parse_frame(frame)


def test_subscribe_url_asks_for_posts_and_profiles_from_the_cursor() -> None:
    url = subscribe_url("wss://jetstream2.us-east.bsky.network/subscribe", 1725911162329308)
    assert url == ("wss://jetstream2.us-east.bsky.network/subscribe?wantedCollections=app.bsky.feed.post"
                   "&wantedCollections=app.bsky.actor.profile&maxMessageSizeBytes=1048576&cursor=1725911162329308")
    assert "cursor" not in subscribe_url("wss://j.example/subscribe", None)


def test_bad_urls_are_config_errors() -> None:
    with pytest.raises(ValueError, match="--bluesky-jetstream-url"):
        JetstreamSource(HttpClient(), url="https://jetstream.example/subscribe")
    with pytest.raises(ValueError, match="--bluesky-cdn-url"):
        bluesky.check_http_url("ftp://cdn.example")


# --- against the emulator -------------------------------------------------------------------


class MemCursors:
    """The Cursors protocol in memory."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def set(self, name: str, value: str) -> None:
        self.values[name] = value


@pytest.fixture()
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        e.scenario.jetstream.linger = 5.0
        yield e


def http_for(emu: Emulator, **kw: Any) -> HttpClient:
    return HttpClient(HttpConfig(resolve=emu.resolve_entries(), ca_bundle=emu.ca_bundle, connect_timeout=3, read_timeout=5, **kw))


def source_for(emu: Emulator, http: HttpClient | None = None, **kw: Any) -> JetstreamSource:
    opts: dict[str, Any] = {"cycle_seconds": 10.0, "idle_seconds": 0.5, "sleep": lambda s: False}
    opts.update(kw)
    opts.setdefault("appview_url", f"https://{APPVIEW_HOST}:{emu.port}")
    return JetstreamSource(
        http or http_for(emu),
        url=f"wss://{JETSTREAM_HOST}:{emu.port}/subscribe",
        cdn_url=f"https://{CDN_HOST}:{emu.port}",
        **opts,
    )


def accepted_ids(emu: Emulator) -> list[str]:
    feed = emu.scenario.jetstream
    return [pid for pid, want in feed.expected.items() if want in ("accept_candidate", "skip_small")]


def drain(src: JetstreamSource, cursors: Any, seen: set[str]) -> list[str]:
    """Poll once like the crawler: each post recorded (seen) before the next is pulled."""
    out = []
    for cand in src.poll(cursors, seen.__contains__):
        out.append(cand.post_id)
        seen.add(cand.post_id)
    return out


def test_stream_yields_the_right_posts(emu: Emulator) -> None:
    statuses: list[tuple[str, SourceStatus]] = []
    src = source_for(emu, on_status=lambda n, s: statuses.append((n, s)))
    cursors = MemCursors()
    got = drain(src, cursors, set())
    assert got == accepted_ids(emu)
    c = src.counts
    assert (c["malformed"], c["adult_label"], c["text_only"], c["profiles"]) == (2, 1, 1, 1)
    # carol's opt-out came on the stream, erin's only from the AppView; frank's account is gone
    assert (c["opted_out"], c["author_unknown"]) == (2, 1)
    # one AppView lookup per author of an image post (dave posts twice; carol is known from the stream)
    assert c["appview_lookups"] == 5 == emu.count(host=APPVIEW_HOST)
    # identity, account and delete events are read and passed over; the like was never asked for
    assert c["not_post"] == 3 and c["events"] == len(emu.scenario.jetstream.frames) - 1
    (query,) = emu.scenario.jetstream.connections
    assert query["wantedCollections"] == ["app.bsky.feed.post", "app.bsky.actor.profile"] and "cursor" not in query
    assert cursors.get("time_us") == str(emu.scenario.jetstream.frames[-1][0])
    assert json.loads(cursors.values[OPTOUT_KEY]) == ["did:plc:carol3jf8w2p6s4h7ynq2ghi", "did:plc:erin5tq3w7r2k6m4n8p2jkl"]
    assert statuses and statuses[-1][0] == "bluesky" and statuses[-1][1].state == "ok"


def test_resume_after_restart_reads_nothing_twice(emu: Emulator, tmp_path: Path) -> None:
    feed = emu.scenario.jetstream
    with Store(tmp_path) as store:
        first = list(source_for(emu).poll(store.cursors_of("bluesky"), store.seen_post))
        for cand in first:
            store.record_post(cand, "expanded")
        assert [c.post_id for c in first] == accepted_ids(emu)
        stored = int(store.cursor("bluesky", "time_us") or 0)
        assert stored == feed.frames[-1][0]
    # a restart: new store handle, new source; only a new post comes, the rewound ones are dropped
    feed.add_event(post_event("did:plc:alice2kx7u4z5xq4a7zqk3abc", "3l3qo2vuowo3a", text="new",
                              embed={"$type": "app.bsky.embed.images", "images": [image_entry("bafkreig" + "a" * 48, (1600, 1200))]}))
    # and carol, opted out earlier, posts again: her opt-out survived in the store
    feed.add_event(post_event("did:plc:carol3jf8w2p6s4h7ynq2ghi", "3l3qo2vuowo3b",
                              embed={"$type": "app.bsky.embed.images", "images": [image_entry("bafkreig" + "b" * 48, (1600, 1200))]}))
    with Store(tmp_path) as store:
        src = source_for(emu)
        second = [c.post_id for c in src.poll(store.cursors_of("bluesky"), store.seen_post)]
        assert second == ["at://did:plc:alice2kx7u4z5xq4a7zqk3abc/app.bsky.feed.post/3l3qo2vuowo3a"]
        assert feed.connections[-1]["cursor"] == [str(stored - REWIND_US)]
        # the rewind re-read frank's post (unknown author) and erin's (opt-out kept in the store), and
        # carol's new one: all three decided from the store; the AppView is asked only about alice's new post
        assert (src.counts["author_unknown"], src.counts["opted_out"]) == (1, 2)
        asked = [r.query["actors"] for r in emu.records() if r.host == APPVIEW_HOST]
        assert asked[5:] == [["did:plc:alice2kx7u4z5xq4a7zqk3abc"]]
        assert store.cursor("bluesky", "time_us") == str(feed.frames[-1][0])


def test_a_post_handed_on_but_not_recorded_is_read_again(emu: Emulator) -> None:
    """kill -9 between the yield and the crawler's record: the cursor has not moved past the post."""
    cursors = MemCursors()
    gen = source_for(emu).poll(cursors, lambda _p: False)
    first = next(gen)
    assert int(cursors.get("time_us") or 0) < emu.scenario.jetstream.frames[1][0]  # not past the first post
    gen.close()
    assert int(cursors.get("time_us") or 0) < emu.scenario.jetstream.frames[1][0]
    again = next(source_for(emu).poll(cursors, lambda _p: False))
    assert again.post_id == first.post_id


def test_item_budget_ends_a_cycle_and_the_next_goes_on(emu: Emulator) -> None:
    cursors, seen = MemCursors(), set()
    src = source_for(emu, max_posts=1)
    rounds = [drain(src, cursors, seen) for _ in range(5)]
    assert [len(r) for r in rounds] == [1, 1, 1, 1, 0]
    assert sum(rounds, []) == accepted_ids(emu)


def test_quiet_stream_ends_the_cycle_without_blocking(emu: Emulator) -> None:
    src = source_for(emu, idle_seconds=0.3, cycle_seconds=30.0)
    start = time.monotonic()
    drain(src, MemCursors(), set())
    assert time.monotonic() - start < 5  # the server lingers 5 s: the idle limit ended the read
    src = source_for(emu, idle_seconds=30.0, cycle_seconds=1.0)
    start = time.monotonic()
    drain(src, MemCursors(), set())
    assert time.monotonic() - start < 4  # the time budget ends it too


def test_server_hang_up_reconnects_from_the_cursor(emu: Emulator) -> None:
    feed = emu.scenario.jetstream
    feed.close_after = 5
    sleeps: list[float] = []
    src = source_for(emu, retries=10, sleep=lambda s: sleeps.append(s) and False)
    got = drain(src, MemCursors(), set())
    assert got == accepted_ids(emu)  # nothing lost, nothing twice
    assert len(feed.connections) >= 3 and src.counts["reconnects"] >= 2
    cursors_sent = [int(q["cursor"][0]) for q in feed.connections[1:]]
    assert cursors_sent == sorted(cursors_sent) and len(sleeps) >= 2


def test_an_oversized_event_is_left_out_by_the_server(emu: Emulator) -> None:
    """Our 1 MiB cap goes to Jetstream as maxMessageSizeBytes: a huge event cannot wedge the stream."""
    feed = emu.scenario.jetstream
    big = post_event("did:plc:alice2kx7u4z5xq4a7zqk3abc", "3l3qo2vuowo2x", text="x" * (2 << 20))
    big["time_us"] = feed.frames[0][0] + 1
    feed.frames.insert(1, (big["time_us"], json.dumps(big), POST))
    got = drain(source_for(emu, retries=1), MemCursors(), set())
    assert got == accepted_ids(emu) and feed.connections[0]["maxMessageSizeBytes"] == ["1048576"]


def test_rate_limited_handshake_backs_off_then_reads(emu: Emulator) -> None:
    emu.scenario.inject[(JETSTREAM_HOST, "/subscribe")] = [429]
    sleeps: list[float] = []
    states: list[str] = []
    src = source_for(emu, sleep=lambda s: sleeps.append(s) and False, on_status=lambda n, s: states.append(s.state))
    assert drain(src, MemCursors(), set()) == accepted_ids(emu)
    assert states[:2] == ["rate_limited", "ok"]
    assert sleeps and sleeps[0] >= 1.0  # Retry-After: 1


def test_errors_raise_a_transient_source_error_and_back_off(emu: Emulator) -> None:
    emu.scenario.inject[(JETSTREAM_HOST, "/subscribe")] = [503, 503, 503]
    clock = [100.0]
    src = source_for(emu, retries=1, sleep=lambda s: False, clock=lambda: clock[0])
    with pytest.raises(SourceError) as err:
        drain(src, MemCursors(), set())
    assert err.value.transient and err.value.reason == "bluesky_fetch" and src.status.state == "error"
    asked = emu.count(host=JETSTREAM_HOST)
    assert asked == 2
    assert drain(src, MemCursors(), set()) == []  # still backing off: not even a connection attempt
    assert emu.count(host=JETSTREAM_HOST) == asked
    clock[0] += 10_000
    emu.scenario.inject.clear()
    assert drain(src, MemCursors(), set()) == accepted_ids(emu)


def test_stop_during_backoff_ends_the_poll(emu: Emulator) -> None:
    emu.scenario.inject[(JETSTREAM_HOST, "/subscribe")] = [503]
    src = source_for(emu, sleep=lambda s: True)  # the crawler's stop event is set
    assert drain(src, MemCursors(), set()) == []


def test_ssrf_guard_refuses_a_name_resolving_to_loopback(emu: Emulator) -> None:
    http = HttpClient(HttpConfig(ca_bundle=emu.ca_bundle), resolver=lambda h, p: ["127.0.0.1"])
    src = source_for(emu, http)
    with pytest.raises(SourceError) as err:
        drain(src, MemCursors(), set())
    assert "loopback" in str(err.value) and src.status.state == "error"
    assert emu.count(host=JETSTREAM_HOST) == 0
    # the operator's --allow-private-addresses turns the guard off for it
    http = HttpClient(HttpConfig(ca_bundle=emu.ca_bundle, allow_private=True), resolver=lambda h, p: ["127.0.0.1"])
    assert drain(source_for(emu, http), MemCursors(), set()) == accepted_ids(emu)


def test_tls_is_verified_against_the_host_name(emu: Emulator) -> None:
    http = HttpClient(HttpConfig(resolve=emu.resolve_entries()))  # no --ca-bundle: the emulator's CA is unknown
    src = source_for(emu, http, retries=0)
    with pytest.raises(SourceError) as err:
        drain(src, MemCursors(), set())
    assert "tls" in str(err.value) or "certificate" in str(err.value).lower()
    assert emu.scenario.jetstream.connections == []


def test_registry_contract(emu: Emulator) -> None:
    import argparse

    from nomad.config import _Flags
    from nomad.sources.registry import CrawlContext

    parser = argparse.ArgumentParser()
    bluesky.add_flags(_Flags(parser, {"NOMAD_BLUESKY_MAX_POSTS": "7"}))
    args = parser.parse_args(["--bluesky-jetstream-url", f"wss://{JETSTREAM_HOST}:{emu.port}/subscribe",
                              "--bluesky-cdn-url", f"https://{CDN_HOST}:{emu.port}", "--bluesky-idle-seconds", "0.5",
                              "--bluesky-appview-url", f"https://{APPVIEW_HOST}:{emu.port}"])
    assert bluesky.NAME == "bluesky" and bluesky.available(args, {})
    statuses: dict[str, SourceStatus] = {}
    waits: list[tuple[str, str, float]] = []
    ctx = CrawlContext(http=http_for(emu), user_agent="nomad-test/1", environ={}, sleep=lambda s: False,
                       on_status=statuses.__setitem__, on_wait=lambda *w: waits.append(w))
    emu.scenario.inject[(JETSTREAM_HOST, "/subscribe")] = [429]
    emu.scenario.inject[(APPVIEW_HOST, "/xrpc/app.bsky.actor.getProfiles")] = [503]
    src = bluesky.build(args, ctx)
    assert src.max_posts == 7 and src.name == "bluesky" and "Jetstream" in src.describe()
    assert drain(src, MemCursors(), set()) == accepted_ids(emu)
    assert statuses["bluesky"].state == "ok"
    assert [(w[0], w[1]) for w in waits] == [("bluesky", "rate_limited"), ("bluesky", "HTTP 503")]
    ua = {r.headers.get("User-Agent") for r in emu.records() if r.host in (JETSTREAM_HOST, APPVIEW_HOST)}
    assert ua == {"nomad-test/1"}
    bad = parser.parse_args(["--bluesky-cdn-url", "cdn.bsky.app"])
    with pytest.raises(ValueError, match="--bluesky-cdn-url"):
        bluesky.build(bad, ctx)
    with pytest.raises(ValueError, match="--bluesky-appview-url"):
        bluesky.build(parser.parse_args(["--bluesky-appview-url", "public.api.bsky.app"]), ctx)
    assert bluesky.build(parser.parse_args(["--bluesky-appview-url", ""]), ctx).appview is None


def test_emulator_serves_the_cdn_images(emu: Emulator) -> None:
    http = http_for(emu)
    src = source_for(emu)
    cands = list(src.poll(MemCursors(), lambda _p: False))
    sizes = []
    for cand in cands:
        dl = http.download_image(cand.links[0].url)
        assert dl.format == "jpeg"
        sizes.append((cand.links[0].width, cand.links[0].height))
    assert sizes == [(1600, 1200), (2000, 1500), (None, None), (800, 600)]



def test_without_the_appview_only_stream_opt_outs_count(emu: Emulator) -> None:
    """The documented limit of --bluesky-appview-url '': an opt-out older than the stream is not known."""
    got = drain(source_for(emu, appview_url=None), MemCursors(), set())
    feed = emu.scenario.jetstream
    assert got == [pid for pid, want in feed.expected.items() if want in ("accept_candidate", "skip_small", "skip_author_unknown")
                   or "erin" in pid]
    assert emu.count(host=APPVIEW_HOST) == 0


def test_appview_failure_ends_the_cycle_before_the_unchecked_post(emu: Emulator) -> None:
    emu.scenario.inject[(APPVIEW_HOST, "/xrpc/app.bsky.actor.getProfiles")] = [503, 503]
    cursors, seen = MemCursors(), set()
    src = source_for(emu, retries=1)
    with pytest.raises(SourceError) as err:
        drain(src, cursors, seen)
    assert err.value.transient and seen == set()
    first_post = emu.scenario.jetstream.frames[1][0]
    assert int(cursors.get("time_us") or 0) < first_post  # alice's post was not handed on, and not passed
    assert drain(src, cursors, seen) == accepted_ids(emu)  # the AppView is back: nothing was lost


# --- the whole crawler: `nomad once --source bluesky` ----------------------------------------


def bluesky_outcome(store: Store, post_id: str) -> str:
    """What nomad made of a post, spelled like the scenario's labels (skips inside the source leave no row)."""
    state = store.post_state(post_id)
    if state is None:
        return "unseen"
    images = store.images_of(post_id)
    if state[0] != "expanded" or len(images) != 1:
        return f"post_{state[0]}_{state[1]}_{len(images)}"
    _key, st, reason = images[0]
    if st == "delivered":
        return "accept_candidate"
    return "skip_small" if (st, reason) == ("rejected", "too_small") else f"{st}_{reason}"


def test_nomad_once_source_bluesky_keeps_the_right_images_then_fetches_nothing(emu: Emulator, tmp_path: Path) -> None:
    import threading

    from nomad.cli import build_crawler, build_parser
    from tests.test_nomad_crawler import FakeFilter

    def once() -> Any:
        args = build_parser({}).parse_args([
            "once", *emu.nomad_args(), "--source", "bluesky",  # nomad_args() points Bluesky at the emulator
            "--state-dir", str(tmp_path / "state"), "--save-dir", str(tmp_path / "out"),
            "--deadline", "5", "--http-retries", "0", "--backoff-max", "0.2"])
        crawler = build_crawler(args, threading.Event(), environ={})  # no credentials of any site
        crawler.filter_stage.client = FakeFilter()
        try:
            stats = crawler.cycle(final=True)
            got = {pid: bluesky_outcome(crawler.store, pid) for pid in feed.expected}
            statuses = crawler.store.source_statuses()
        finally:
            crawler.shutdown()
            crawler.store.close()
        return stats, got, statuses

    feed = emu.scenario.jetstream
    stats, got, statuses = once()
    want = {pid: (w if w in ("accept_candidate", "skip_small") else "unseen") for pid, w in feed.expected.items()}
    assert got == want
    accepted = sum(1 for w in want.values() if w == "accept_candidate")
    assert stats.accepted == stats.delivered == accepted == 3
    # the three kept images only: the small one is refused on its aspectRatio size, before any download
    assert sorted(r.path.rsplit("/", 2)[1] for r in emu.records() if r.host == CDN_HOST) == [
        "did:plc:alice2kx7u4z5xq4a7zqk3abc", "did:plc:bobby6yq2n4m5r7t3vwx9def", "did:web:dave.example.com"]
    assert statuses["bluesky"]["state"] == "ok"
    sidecars = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    lake = next(m for m in sidecars if m["post_id"].endswith("/3l3qo2vuowo2a"))
    assert lake["source"] == "bluesky" and lake["alt"] == "photo lake" and lake["width"] == 1600
    assert lake["description_url"] == "https://bsky.app/profile/did:plc:alice2kx7u4z5xq4a7zqk3abc/post/3l3qo2vuowo2a"

    before = len(emu.records())
    stats, got, _ = once()  # a restart: the cursor, opt-outs and seen posts come from the state DB
    new = [(r.host, r.path) for r in emu.records()[before:]]
    assert new == [(JETSTREAM_HOST, "/subscribe")]  # only the stream itself; no image, no AppView lookup
    assert stats.new_posts == 0 and stats.downloaded == 0 and got == want


@pytest.mark.parametrize("flag,value", [("--bluesky-jetstream-url", "https://jetstream.example/subscribe"),
                                        ("--bluesky-cdn-url", "cdn.bsky.app"), ("--bluesky-appview-url", "ftp://x.example")])
def test_nomad_once_with_a_bad_bluesky_url_says_so_in_one_line(tmp_path: Path, flag: str, value: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "nomad", "once", "--source", "bluesky", flag, value,
                           "--state-dir", str(tmp_path / "state"), "--save-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in proc.stderr
