"""No accounts at all: reddit through its Atom feeds (JSON blocked), flickr through its public feed.

The crawl runs in-process over the emulator (real HTTPS, SSRF guard on) with a scripted
anti_sus; test_nomad_crawler_e2e.py runs the same as a real `nomad once` process.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from stack.emulator import Emulator
from tests.nomad_outcomes import keyless_cycle, keyless_expected

pytestmark = pytest.mark.timeout(180)


def run(emu: Emulator, tmp: Path, *extra: str) -> tuple[Any, dict[str, str]]:
    stats, got, statuses, _ = keyless_cycle(emu, tmp, keyless_expected(emu.scenario),
                                            "--source", "reddit", "--source", "flickr", *extra)
    return (stats, statuses), got


def json_requests(emu: Emulator) -> int:
    return sum(1 for r in emu.records() if "reddit.com" in r.host and r.path.endswith(".json"))


def test_keyless_run_keeps_the_right_images_and_a_second_run_fetches_nothing(tmp_path: Path) -> None:
    with Emulator() as emu:
        (stats, statuses), got = run(emu, tmp_path)
        expected = keyless_expected(emu.scenario)
        wrong = {k: (v, got[k]) for k, v in expected.items() if got[k] != v}
        assert not wrong, wrong
        accepted = sum(1 for v in expected.values() if v == "accept_candidate")
        assert stats.accepted == stats.delivered == accepted
        assert json_requests(emu) == 1  # asked once, got the block page, never again this run
        assert emu.count(host="www.reddit.com", path="/r/all/new/.rss") == 1
        assert emu.count(host="api.flickr.com", path="/services/feeds/photos_public.gne") == 1
        assert emu.count(host="oauth.reddit.com") == 0 and emu.count(host="api.imgur.com") == 0
        # flickr's 1024 px files, credited to the photographer's page.
        assert emu.count(host="live.staticflickr.com", path="/65535/53800000001_b1c2d3e4f5_b.jpg") == 1
        sidecars = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
        lake = next(m for m in sidecars if m["key"] == "flickr:flickr_53800000001:0")
        assert lake["width"] == 1024 and lake["height"] < 1024 and lake["source"] == "flickr"  # the _b size
        assert lake["artist"] == "dave_photos" and lake["source_url"] == "https://www.flickr.com/photos/dave_photos/53800000001/"
        assert statuses["reddit"]["state"] == "ok" and statuses["flickr"]["state"] == "ok"

        assert emu.wait_idle(10)  # the emulator logs a request when its handler ends (the slow body)
        before = len(emu.records())
        (stats, _), _ = run(emu, tmp_path, "--max-retries", "1")
        new = emu.records()[before:]
        assert sorted((r.host, r.path) for r in new) == [
            ("api.flickr.com", "/services/feeds/photos_public.gne"), ("www.reddit.com", "/r/all/new/.rss")]
        assert stats.new_posts == 0 and stats.downloaded == 0
        assert json_requests(emu) == 1  # the block was remembered across the restart


def test_feed_throttle_is_obeyed_by_pacing_and_a_429_is_waited_out(tmp_path: Path) -> None:
    with Emulator() as emu:
        emu.scenario.reddit_feed_interval = 1.0  # like reddit's ~1 request/min, shortened
        two = ["--listing", "r/EarthPorn/new", "--listing", "r/pics/new"]
        t0 = time.monotonic()
        (stats, statuses), _ = run(emu, tmp_path / "paced", *two, "--reddit-feed-interval", "1.2")
        assert time.monotonic() - t0 >= 1.2
        feeds = [r for r in emu.records() if r.path.endswith(".rss")]
        assert [r.status for r in feeds] == [200, 200]  # paced: never throttled
        # Unpaced, the second feed gets a 429 with Retry-After; nomad waits it out and reads it.
        emu.reset_rate_limits()
        before = len(emu.records())
        (stats, statuses), got = run(emu, tmp_path / "unpaced", *two)
        feeds = [r for r in emu.records()[before:] if r.path.endswith(".rss")]
        assert [r.status for r in feeds] == [200, 429, 200]
        assert stats.listings_failed == 0 and got["aa0001"] == "accept_candidate" and got["cc0003"] == "accept_candidate"


@pytest.mark.parametrize("sub,reason", [("entitybomb", "hostile_feed"), ("xxe", "hostile_feed"), ("truncated", "bad_feed")])
def test_hostile_feeds_fail_the_listing_not_the_crawler(tmp_path: Path, sub: str, reason: str) -> None:
    with Emulator() as emu:
        (stats, statuses), _ = run(emu, tmp_path, "--listing", f"r/{sub}/new")
        assert stats.listings_failed == 1 and stats.failed[f"listing_{reason}"] == 1
        assert stats.posts_seen == len(emu.scenario.flickr_feed)  # not one reddit post, not one bomb entry
        assert stats.accepted > 0  # the other source (flickr's feed) still delivered
        assert "t3_bomb01" not in str(statuses) and statuses["flickr"]["state"] == "ok"
