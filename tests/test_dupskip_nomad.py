"""nomad's duplicate skip against a real gallery_bridge on 127.0.0.1: reposts never reach anti_sus.

A repost-heavy feed (stack/emulator/reposts.py) is crawled through the emulator
by the real crawler (build_crawler, real HTTP over TLS, real gallery_bridge
server); only anti_sus is a counting stand-in, so the test sees exactly which
images CLIP would have been spent on.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import zmq
from prometheus_client import REGISTRY

from anti_sus.client import FilterResult, ImageResult
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import IngestClient
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from nomad import images
from nomad.cli import build_crawler, build_parser
from nomad.crawler import Crawler, CrawlerConfig, CycleStats
from nomad.delivery import Downloaded, FilterStage, SaveDirDeliverer
from nomad.delivery.dupskip import DupSkip
from nomad.http import HttpClient
from nomad.rules import Rules
from nomad.sources.base import ImageRef
from nomad.sources.registry import ExpanderRegistry
from nomad.store import Store
from stack.emulator import Emulator
from stack.emulator.reposts import RepostFeed, repost_feed
from stack.emulator.scenario import Scenario
from stack.procs import free_port
from tests.nomad_fakes import Clock

pytestmark = pytest.mark.timeout(240)

SIZE = (800, 600)
SMALL_OK = ["--min-long-side", "0", "--min-short-side", "0"]  # the feed's photos are small to keep the test quick


class CountingFilter:
    """anti_sus stand-in: every image good; remembers how many images it was sent (the CLIP work)."""

    def __init__(self) -> None:
        self.sent = 0
        self.batches = 0

    def filter(self, batch: np.ndarray, **kw: Any) -> FilterResult:
        n = len(batch)
        self.sent += n
        self.batches += 1
        results = [ImageResult(i, 0.0, 0.1, "good") for i in range(n)]
        return FilterResult(list(range(n)), results, np.ones((n, 8), np.float32), 1.0)


@pytest.fixture(scope="module")
def feed() -> RepostFeed:
    return repost_feed(originals=6, posts=16, repost_share=0.75, seed=3, size=SIZE)


@pytest.fixture
def gallery(tmp_path: Path, feed: RepostFeed) -> Iterator[tuple[Ingester, str]]:
    """A real gallery_bridge holding the feed's originals."""
    target = FolderTarget(tmp_path / "gallery")
    ing = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        with IngestClient(server.endpoint, timeout=30, retries=0) as client:
            for n, data in enumerate(feed.originals):
                assert client.ingest(f"seed:{n}", {}, data).status == "added"
        yield ing, server.endpoint
    finally:
        server.close()
        ing.close()


@pytest.fixture
def emu(feed: RepostFeed) -> Iterator[Emulator]:
    def scenario(port: int) -> Scenario:
        scn = Scenario(port)
        feed.add_to(scn)
        return scn

    with Emulator(scenario) as e:
        yield e


def crawl(emu: Emulator, state: Path, gallery: str, *extra: str, env: dict[str, str] | None = None) -> tuple[CycleStats, CountingFilter, Crawler]:
    """One ``nomad once`` cycle (in process) over the feed, delivering to ``gallery``."""
    environ = {**emu.nomad_env(), **(env or {})}
    args = build_parser(environ).parse_args(
        ["once", *emu.nomad_args(), "--source", "reddit", "--state-dir", str(state), "--gallery", gallery,
         "--deadline", "5", "--http-retries", "0", "--backoff-max", "0.2", "--batch-size", "8", *SMALL_OK, *extra])
    crawler = build_crawler(args, threading.Event(), environ=environ)
    fake = CountingFilter()
    crawler.filter_stage.client = fake
    try:
        stats = crawler.cycle(final=True)
    finally:
        crawler.shutdown()
        crawler.store.close()
    return stats, fake, crawler


def states(state: Path, feed: RepostFeed) -> dict[str, tuple[str, str | None]]:
    """(state, reason) of each post's image, by post id."""
    with Store(state) as store:
        return {p.post_id: store.image_state(f"reddit:t3_{p.post_id}:0")[:2] for p in feed.posts}  # type: ignore[index]


def metric(reason: str) -> float:
    return REGISTRY.get_sample_value("nomad_images_total", {"outcome": "rejected", "reason": reason}) or 0.0


def test_reposts_never_reach_anti_sus_and_are_counted(emu: Emulator, gallery: tuple[Ingester, str], feed: RepostFeed,
                                                      tmp_path: Path) -> None:
    ing, endpoint = gallery
    kinds = feed.counts()
    before = {r: metric(r) for r in ("duplicate_exact", "duplicate_near")}

    stats, fake, _ = crawl(emu, tmp_path / "state1", endpoint)
    assert fake.sent == kinds["new"]  # CLIP only for the photos the gallery did not hold
    assert stats.rejected["duplicate_exact"] == kinds["exact"]
    assert stats.rejected["duplicate_near"] == kinds["recompressed"] + kinds["resized"]
    assert stats.downloaded == len(feed.posts) and stats.delivered == kinds["new"]
    assert metric("duplicate_exact") - before["duplicate_exact"] == kinds["exact"]
    assert metric("duplicate_near") - before["duplicate_near"] == kinds["recompressed"] + kinds["resized"]
    got = states(tmp_path / "state1", feed)
    for p in feed.posts:
        if p.kind == "new":
            assert got[p.post_id][0] == "delivered", p
        else:
            assert got[p.post_id] == ("rejected", "duplicate_exact" if p.kind == "exact" else "duplicate_near"), p
    assert ing.catalogue.count() == len(feed.originals) + kinds["new"]

    # Decided: the same state again fetches nothing and sends nothing.
    stats, fake, _ = crawl(emu, tmp_path / "state1", endpoint)
    assert fake.sent == 0 and stats.downloaded == 0

    # A second crawler (fresh state) over the same feed: everything is in the gallery by now.
    stats, fake, _ = crawl(emu, tmp_path / "state2", endpoint)
    assert fake.sent == 0 and fake.batches == 0
    assert stats.rejected["duplicate_exact"] == kinds["exact"] + kinds["new"]
    assert stats.rejected["duplicate_near"] == kinds["recompressed"] + kinds["resized"]
    assert ing.catalogue.count() == len(feed.originals) + kinds["new"]


def test_off_flag_sends_everything_to_anti_sus(emu: Emulator, gallery: tuple[Ingester, str], feed: RepostFeed,
                                               tmp_path: Path) -> None:
    _, endpoint = gallery
    stats, fake, crawler = crawl(emu, tmp_path / "state", endpoint, env={"NOMAD_DUPSKIP": "0"})
    assert crawler.dupskip is None
    assert fake.sent == len(feed.posts)
    assert not stats.rejected["duplicate_exact"] and not stats.rejected["duplicate_near"]
    stats, fake, crawler = crawl(emu, tmp_path / "state_flag", endpoint, "--no-dupskip")
    assert crawler.dupskip is None and fake.sent == len(feed.posts)


def test_only_when_delivering_to_a_gallery(tmp_path: Path) -> None:
    base = ["once", "--state-dir", str(tmp_path / "s"), "--source", "reddit"]
    for extra, on in (([], True), (["--save-dir", str(tmp_path / "out")], False), (["--no-dupskip"], False)):
        crawler = build_crawler(build_parser({}).parse_args(base + extra), threading.Event(), environ={})
        try:
            assert (crawler.dupskip is not None) is on, extra
        finally:
            crawler.close()
            crawler.store.close()


# --- fallback: a gallery that is down, or too old to know `have` ------------------------------------

def _batch(store: Store, feed: RepostFeed, n: int) -> list[Downloaded]:
    items = []
    for i, post in enumerate(feed.posts[:n]):
        ref = ImageRef(f"reddit:t3_{post.post_id}:0", f"https://i.redd.it/{post.filename}")
        store.add_image(ref, f"t3_{post.post_id}")
        spool = store.spool_path(ref.key, ".jpeg")
        spool.write_bytes(post.data)
        dec = images.decode(post.data)
        items.append(Downloaded(ref, dec.wire, spool, dec.width, dec.height, dec.format))
    return items


def _flush(tmp_path: Path, feed: RepostFeed, dupskip: DupSkip, n: int = 8, clock: Clock | None = None) -> tuple[CountingFilter, CycleStats, float]:
    fake = CountingFilter()
    with Store(tmp_path / "state") as store:
        crawler = Crawler(CrawlerConfig(batch_size=64), store=store, rules=Rules(), http=HttpClient(), sources=[],
                          expanders=ExpanderRegistry([]), filter_stage=FilterStage(fake),  # type: ignore[arg-type]
                          deliverer=SaveDirDeliverer(tmp_path / "out"), dupskip=dupskip)
        stats = CycleStats()
        for it in _batch(store, feed, n):
            crawler.batcher.add(it)
        t0 = time.monotonic()
        crawler.flush(stats, force=True)
        took = time.monotonic() - t0
        crawler._pool.shutdown(wait=True)
    return fake, stats, took


def test_gallery_down_sends_everything_to_anti_sus_without_stalling(tmp_path: Path, feed: RepostFeed,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    dead = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    skip = DupSkip.for_gallery(dead, timeout=0.3, clock=clock.now, retry_after=60)
    try:
        with caplog.at_level(logging.WARNING, logger="nomad.delivery.dupskip"):
            fake, stats, took = _flush(tmp_path / "a", feed, skip)
            assert fake.sent == 8 and stats.accepted == 8 and not stats.rejected
            assert took < 3.0  # one short try, no resend
            # Resting: the next batch does not even ask (no second wait), and nothing is logged again.
            fake, stats, took = _flush(tmp_path / "b", feed, skip)
            assert fake.sent == 8 and took < 1.0
        warnings = [r for r in caplog.records if "dupskip" in r.getMessage()]
        assert len(warnings) == 1 and "no answer from the gallery" in warnings[0].getMessage()
        assert skip.counts["unchecked"] == 16 and skip.counts["asked"] == 0
    finally:
        skip.close()


class OldGallery:
    """A gallery_bridge from before `have`: a ROUTER that answers every request unknown_op, as the old server did."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            *env, body = self.sock.recv_multipart()
            self.requests += 1
            head = json.loads(body)
            reply = {"v": 1, "id": head.get("id"), "ok": False,
                     "error": {"code": "unknown_op", "message": f"unknown op {head.get('op')!r}; ops are ingest, ping, info"}}
            self.sock.send_multipart([*env, json.dumps(reply).encode()])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()


def test_old_gallery_answering_unknown_op_skips_the_check(tmp_path: Path, feed: RepostFeed,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    old = OldGallery()
    clock = Clock()
    skip = DupSkip.for_gallery(old.endpoint, timeout=5, clock=clock.now)
    try:
        with caplog.at_level(logging.WARNING, logger="nomad.delivery.dupskip"):
            fake, stats, _ = _flush(tmp_path / "a", feed, skip)
            assert fake.sent == 8 and not stats.rejected
            fake, _, _ = _flush(tmp_path / "b", feed, skip)
            assert fake.sent == 8
        assert old.requests == 1  # asked once, then left alone
        msgs = [r.getMessage() for r in caplog.records if "dupskip" in r.getMessage()]
        assert len(msgs) == 1 and "predates the have op" in msgs[0]
        clock.t += skip.old_server_retry + 1  # after the long rest it asks again (the gallery may be upgraded)
        _flush(tmp_path / "c", feed, skip)
        assert old.requests == 2
    finally:
        skip.close()
        old.close()


def test_the_check_comes_back_when_the_gallery_does(tmp_path: Path, feed: RepostFeed, gallery: tuple[Ingester, str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    _, endpoint = gallery
    clock = Clock()
    skip = DupSkip.for_gallery(endpoint, timeout=5, clock=clock.now, retry_after=60)
    real = skip.asker

    class Down:
        def have(self, items: list[tuple[str, str]]) -> list[str]:
            raise TimeoutError("scripted outage")

        def close(self) -> None:
            pass

    try:
        skip.asker = Down()  # type: ignore[assignment]
        fake, _, _ = _flush(tmp_path / "a", feed, skip)
        assert fake.sent == 8
        skip.asker = real
        fake, _, _ = _flush(tmp_path / "b", feed, skip)
        assert fake.sent == 8  # still resting
        clock.t += 61
        with caplog.at_level(logging.INFO, logger="nomad.delivery.dupskip"):
            fake, stats, _ = _flush(tmp_path / "c", feed, skip)
        reposts = sum(1 for p in feed.posts[:8] if p.kind != "new")
        assert fake.sent == 8 - reposts and sum(stats.rejected.values()) == reposts
        assert any("answers the have check again" in r.getMessage() for r in caplog.records)
    finally:
        skip.close()


def test_hashes_are_made_by_the_download_worker_not_when_the_batch_is_due(emu: Emulator, tmp_path: Path,
                                                                         gallery: tuple[Ingester, str]) -> None:
    """fetch() attaches the have-hashes (same values as hashing the spooled file); answers() then reads no file."""
    environ = emu.nomad_env()
    args = build_parser(environ).parse_args(
        ["once", *emu.nomad_args(), "--source", "reddit", "--state-dir", str(tmp_path / "state"),
         "--gallery", gallery[1], *SMALL_OK])
    crawler = build_crawler(args, threading.Event(), environ=environ)
    try:
        crawler.read_listings(CycleStats())
        ref = next(iter(crawler.store.work(3)))
        outcome, _, item = crawler.fetch(ref)
        assert outcome == "ok" and item is not None and item.hashes is not None
        from nomad.delivery.dupskip import item_hashes

        assert item.hashes == item_hashes(item)

        class Asked:
            got: list[tuple[str, ...]] = []

            def have(self, items: list[tuple[str, ...]]) -> list[str]:
                Asked.got = items
                return ["new"] * len(items)

            def close(self) -> None:
                pass

        item.spool.unlink()  # the worker's hashes are used: the file is not read again
        assert DupSkip(Asked()).answers([item]) == ["new"] and Asked.got == [item.hashes]
    finally:
        crawler.shutdown()
        crawler.store.close()
