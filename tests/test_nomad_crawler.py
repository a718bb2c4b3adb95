"""The crawl over the loopback emulator (real HTTPS, SSRF guard on) with a scripted anti_sus.

The real anti_sus and gallery_bridge processes are in test_nomad_crawler_e2e.py;
here the filter is a small fake so rules, state and delivery paths run fast.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anti_sus.client import AntiSusUnavailable, FilterResult, ImageResult
from nomad.cli import build_crawler, build_parser
from stack.emulator import Emulator
from tests.nomad_outcomes import outcome

__all__ = ["FakeFilter", "make"]

pytestmark = pytest.mark.timeout(180)


class FakeFilter:
    """anti_sus stand-in: every image good (or 'outlier' for chosen batch positions); can be 'down'."""

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.batches: list[int] = []
        self.options: list[dict[str, Any]] = []

    def filter(self, images: np.ndarray, *, gmm_threshold: float | None = None, watermark_threshold: float | None = None,
               return_features: bool = False) -> FilterResult:
        if self.down > 0:
            self.down -= 1
            raise AntiSusUnavailable("scripted outage")
        assert images.dtype == np.uint8 and images.shape[1:] == (512, 512, 3)
        self.batches.append(len(images))
        self.options.append({"gmm_threshold": gmm_threshold, "watermark_threshold": watermark_threshold})
        n = len(images)
        results = [ImageResult(i, float(images[i].mean()), 0.1, "good") for i in range(n)]
        feats = np.ones((n, 8), np.float32) if return_features else None
        return FilterResult(list(range(n)), results, feats, 1.0)


def make(emu: Emulator, tmp: Path, *extra: str, env: dict[str, str] | None = None, fake: FakeFilter | None = None) -> Any:
    args = build_parser().parse_args(
        # reddit alone (OAuth JSON: the credentials are in emu.nomad_env()): the scenario's posts and labels.
        ["once", *emu.nomad_args(), "--source", "reddit", "--state-dir", str(tmp / "state"), "--save-dir", str(tmp / "out"),
         "--deadline", "2", "--http-retries", "0", "--workers", "4", "--backoff-max", "0.2", *extra]
    )
    crawler = build_crawler(args, threading.Event(), environ=emu.nomad_env() if env is None else env)
    crawler.filter_stage.client = fake or FakeFilter()
    return crawler


@pytest.fixture(scope="module")
def emu() -> Any:
    with Emulator() as e:
        yield e


def test_every_post_reaches_its_expected_outcome(emu: Emulator, tmp_path: Path) -> None:
    fake = FakeFilter()
    crawler = make(emu, tmp_path, "--gmm-threshold", "-5.5", "--batch-size", "8", fake=fake)
    try:
        stats = crawler.cycle(final=True)
        got = {k: outcome(crawler.store, k) for k in emu.scenario.expected}
    finally:
        crawler.shutdown()
        crawler.store.close()
    wrong = {k: (v, got[k]) for k, v in emu.scenario.expected.items() if got[k] != v}
    assert not wrong, wrong
    accepted = sum(1 for v in emu.scenario.expected.values() if v == "accept_candidate")
    assert stats.accepted == accepted and stats.delivered == accepted
    assert max(fake.batches) <= 8 and sum(fake.batches) == accepted
    assert fake.options[0] == {"gmm_threshold": -5.5, "watermark_threshold": None}
    # Standalone mode: one image + one JSON sidecar per accepted image, nothing half-written.
    out = tmp_path / "out"
    sidecars = sorted(out.glob("*.json"))
    assert len(sidecars) == accepted and not list(out.glob(".*.tmp"))
    flickr = [json.loads(p.read_text()) for p in sidecars if json.loads(p.read_text())["key"].startswith("reddit:t3_cc0001")]
    assert flickr and flickr[0]["licence"] == "CC BY 2.0" and "/photos/dave_photos/" in flickr[0]["source_url"]
    for p in sidecars:
        meta = json.loads(p.read_text())
        assert (out / meta["file"]).stat().st_size > 1000
        assert meta["permalink"].startswith("https://www.reddit.com/r/") and "gmm" in meta["scores"]


def test_restart_does_not_refetch(emu: Emulator, tmp_path: Path) -> None:
    crawler = make(emu, tmp_path)
    try:
        crawler.cycle(final=True)
    finally:
        crawler.shutdown()
        crawler.store.close()
    assert emu.wait_idle(10)  # the emulator logs a request when its handler ends: let the abandoned slow body finish
    before = len(emu.records())
    crawler = make(emu, tmp_path, "--max-retries", "1")  # the slow-body timeout already used its one try
    try:
        stats = crawler.cycle(final=True)
    finally:
        crawler.shutdown()
        crawler.store.close()
    new = emu.records()[before:]
    fetched = [r for r in new if r.host not in ("www.reddit.com", "oauth.reddit.com")]
    assert fetched == [], [(r.host, r.path) for r in fetched]  # only the listing was read again
    assert stats.new_posts == 0 and stats.downloaded == 0


def test_failed_download_is_retried_a_bounded_number_of_times(emu: Emulator, tmp_path: Path) -> None:
    def slow_fetches() -> int:
        return emu.count(host="hostile.example", path="/slow.jpg")

    assert emu.wait_idle(10)  # requests are logged when their handler ends (see above)
    start = slow_fetches()
    for _ in range(3):
        crawler = make(emu, tmp_path, "--max-retries", "2")
        try:
            crawler.cycle(final=True)
            state = crawler.store.image_state("reddit:t3_ee0004:0")
        finally:
            crawler.shutdown()
            crawler.store.close()
    assert state == ("failed", "timeout", 2)
    assert emu.wait_idle(10)
    assert slow_fetches() - start == 2


def test_anti_sus_down_then_back_loses_nothing(emu: Emulator, tmp_path: Path) -> None:
    fake = FakeFilter(down=3)
    crawler = make(emu, tmp_path, "--batch-size", "64", fake=fake)
    try:
        stats = crawler.cycle(final=True)
    finally:
        crawler.shutdown()
        crawler.store.close()
    accepted = sum(1 for v in emu.scenario.expected.values() if v == "accept_candidate")
    assert fake.down == 0 and stats.accepted == accepted == sum(fake.batches)


def test_stop_while_anti_sus_down_keeps_keys_pending(emu: Emulator, tmp_path: Path) -> None:
    fake = FakeFilter(down=10**6)
    crawler = make(emu, tmp_path, fake=fake)
    crawler.cfg.backoff_max = 0.2
    timer = threading.Timer(3.0, crawler.stop.set)
    timer.start()
    try:
        crawler.cycle(final=True)
        crawler.shutdown()
        pending = crawler.store.work(max_retries=3)
        assert crawler.store.stats()["images"].get("accepted", 0) == 0
        assert list(crawler.store.spool_dir.iterdir()) == []
    finally:
        timer.cancel()
        crawler.store.close()
    assert {r.key for r in pending} >= {"reddit:t3_aa0001:0", "reddit:t3_bb0003:0"}
    # Back up: the next run decides them.
    crawler = make(emu, tmp_path)
    try:
        stats = crawler.cycle(final=True)
        assert crawler.store.image_state("reddit:t3_aa0001:0")[0] == "delivered"
    finally:
        crawler.shutdown()
        crawler.store.close()
    assert stats.accepted >= 2


def test_an_api_answer_of_unexpected_shape_fails_one_post_not_the_crawl(emu: Emulator, tmp_path: Path) -> None:
    crawler = make(emu, tmp_path)

    def broken(*_a: Any, **_k: Any) -> Any:
        raise KeyError("size")

    crawler.expanders.get("flickr").client.expand = broken  # the registry's flickr link expander
    try:
        stats = crawler.cycle(final=True)
        state = crawler.store.post_state("t3_cc0001")
        other = crawler.store.image_state("reddit:t3_aa0001:0")
    finally:
        crawler.shutdown()
        crawler.store.close()
    assert state == ("failed", "expand_crash_KeyError", 1)
    assert other[0] == "delivered" and stats.failed["expand_crash"] == 4
