"""Crawler._decide and injected collaborators: every outcome reaches store, stats and metrics together,
and time is the crawler's own clock and sleep (no monkeypatching, no real waiting)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from prometheus_client import REGISTRY

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterResult, ImageResult
from nomad.crawler import Crawler, CrawlerConfig, CycleStats
from nomad.delivery import Downloaded, FilterStage, SaveDirDeliverer
from nomad.http import HttpClient
from nomad.rules import Rules
from nomad.sources.base import ImageRef
from nomad.sources.registry import ExpanderRegistry
from nomad.store import Store
from tests.nomad_fakes import Clock


class Answers:
    """anti_sus stand-in: scripted exceptions first, then verdicts for all but ``skip`` indexes."""

    def __init__(self, *script: Exception, verdicts: list[str] | None = None, skip: tuple[int, ...] = ()) -> None:
        self.script = list(script)
        self.verdicts = verdicts or []
        self.skip = skip

    def filter(self, images: np.ndarray, **_: Any) -> FilterResult:
        if self.script:
            raise self.script.pop(0)
        n = len(images)
        results = [ImageResult(i, -1.0, 0.1, self.verdicts[i] if i < len(self.verdicts) else "good")
                   for i in range(n) if i not in self.skip]
        good = [r.index for r in results if r.verdict == "good"]
        return FilterResult(good, results, np.ones((len(good), 4), np.float32), 1.0)


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def crawler_with(store: Store, tmp_path: Path, client: Answers, clock: Clock | None = None, **cfg: Any) -> Crawler:
    kw: dict[str, Any] = {"clock": clock.now, "sleep": clock.sleep} if clock else {}
    return Crawler(CrawlerConfig(**cfg), store=store, rules=Rules(), http=HttpClient(), sources=[],
                   expanders=ExpanderRegistry([]), filter_stage=FilterStage(client),  # type: ignore[arg-type]
                   deliverer=SaveDirDeliverer(tmp_path / "out"), **kw)


def batch_of(crawler: Crawler, n: int) -> list[Downloaded]:
    items = []
    for i in range(n):
        ref = ImageRef(f"reddit:t3_d{i}:0", f"https://i.redd.it/d{i}.jpg")
        crawler.store.add_image(ref, f"t3_d{i}")
        spool = crawler.store.spool_path(ref.key, ".jpg")
        spool.write_bytes(b"\xff\xd8\xff" + bytes(100))
        items.append(Downloaded(ref, np.zeros((512, 512, 3), np.uint8), spool, 2000, 1500, "jpeg"))
    return items


def image_metric(outcome: str, reason: str = "") -> float:
    return REGISTRY.get_sample_value("nomad_images_total", {"outcome": outcome, "reason": reason}) or 0.0


def error_metric(kind: str) -> float:
    return REGISTRY.get_sample_value("nomad_errors_total", {"kind": kind}) or 0.0


def flushed(crawler: Crawler, n: int) -> CycleStats:
    """One forced flush of a batch of ``n`` fresh images; the crawler is closed after it."""
    stats = CycleStats()
    try:
        for it in batch_of(crawler, n):
            crawler.batcher.add(it)
        crawler.flush(stats, force=True)
    finally:
        crawler.close()
    return stats


def test_every_verdict_is_in_store_stats_and_metrics(store: Store, tmp_path: Path) -> None:
    crawler = crawler_with(store, tmp_path, Answers(verdicts=["good", "outlier", "good"], skip=(3,)), batch_size=4)
    before = {"accepted": image_metric("accepted"), "outlier": image_metric("rejected", "outlier"),
              "no_result": image_metric("failed", "anti_sus_no_result"), "error": error_metric("anti_sus_no_result")}
    stats = flushed(crawler, 4)
    assert [store.image_state(f"reddit:t3_d{i}:0")[:2] for i in range(4)] == [
        ("accepted", None), ("rejected", "outlier"), ("accepted", None), ("failed", "anti_sus_no_result")]
    assert stats.accepted == 2 and dict(stats.rejected) == {"outlier": 1} and dict(stats.failed) == {"anti_sus_no_result": 1}
    assert image_metric("accepted") - before["accepted"] == 2
    assert image_metric("rejected", "outlier") - before["outlier"] == 1
    # An image anti_sus did not answer for is a failure like any other: counted, not only stored.
    assert image_metric("failed", "anti_sus_no_result") - before["no_result"] == 1
    assert error_metric("anti_sus_no_result") - before["error"] == 1


def test_a_refused_batch_fails_each_image_everywhere(store: Store, tmp_path: Path) -> None:
    crawler = crawler_with(store, tmp_path, Answers(AntiSusError("bad_shape", "no")), batch_size=2)
    before = image_metric("failed", "anti_sus_bad_shape"), error_metric("anti_sus_bad_shape")
    stats = flushed(crawler, 2)
    assert {store.image_state(f"reddit:t3_d{i}:0")[:2] for i in range(2)} == {("failed", "anti_sus_bad_shape")}
    assert dict(stats.failed) == {"anti_sus_bad_shape": 2}
    assert image_metric("failed", "anti_sus_bad_shape") - before[0] == 2
    assert error_metric("anti_sus_bad_shape") - before[1] == 2


def test_shutdown_patience_runs_on_the_injected_clock(store: Store, tmp_path: Path) -> None:
    clock = Clock()
    crawler = crawler_with(store, tmp_path, Answers(*[AntiSusUnavailable("down")] * 1000), clock, backoff_max=5.0)
    for it in batch_of(crawler, 2):
        crawler.batcher.add(it)
    crawler.stop.set()
    t0 = time.monotonic()
    crawler.shutdown()
    # anti_sus stayed down: the patience (backoff_max on the crawler's clock) ran out without any real wait.
    assert time.monotonic() - t0 < 2.0
    assert clock.slept and sum(clock.slept) <= 5.0 and clock.t <= 1005.0
    assert {store.image_state(f"reddit:t3_d{i}:0")[0] for i in range(2)} == {"pending"}


def test_cycle_length_is_measured_on_the_injected_clock(store: Store, tmp_path: Path) -> None:
    clock = Clock()
    crawler = crawler_with(store, tmp_path, Answers(), clock)

    class Ticking:
        """A listing source whose poll takes 7 s of the crawler's clock."""

        name = "ticking"

        def poll(self, cursors: Any, seen: Any) -> Iterator[Any]:
            clock.t += 7.0
            return iter(())

        def ratelimit(self) -> str:
            return ""

    crawler.sources = [Ticking()]  # type: ignore[list-item]
    cycles = REGISTRY.get_sample_value("nomad_cycles_total") or 0.0
    try:
        assert crawler.cycle().seconds == 7.0
    finally:
        crawler.close()
    # The metrics say a cycle finished, how long it took and when (a stuck crawl shows as an old end time).
    assert REGISTRY.get_sample_value("nomad_cycles_total") == cycles + 1
    assert REGISTRY.get_sample_value("nomad_last_cycle_seconds") == 7.0
    assert abs(time.time() - (REGISTRY.get_sample_value("nomad_last_cycle_end_time_seconds") or 0.0)) < 60


class Gated(Answers):
    """anti_sus that holds its first answer until released, recording how many downloads finished meanwhile."""

    def __init__(self, fetched: list[str]) -> None:
        super().__init__()
        import threading

        self.fetched = fetched
        self.release = threading.Event()
        self.in_call = threading.Event()
        self.calls: list[int] = []
        self.concurrent = 0
        self.most_concurrent = 0
        self.fetched_while_held: list[int] = []

    def filter(self, images: np.ndarray, **kw: Any) -> FilterResult:
        self.concurrent += 1
        self.most_concurrent = max(self.most_concurrent, self.concurrent)
        try:
            self.calls.append(len(images))
            if len(self.calls) == 1:
                self.in_call.set()
                deadline = time.monotonic() + 10
                while not self.release.is_set() and time.monotonic() < deadline:
                    self.fetched_while_held.append(len(self.fetched))
                    time.sleep(0.01)
            return super().filter(images, **kw)
        finally:
            self.concurrent -= 1


def test_downloads_go_on_while_anti_sus_filters_a_batch(store: Store, tmp_path: Path) -> None:
    """The next batch is downloaded while anti_sus scores the current one, and no further than that batch."""
    fetched: list[str] = []
    gate = Gated(fetched)
    crawler = crawler_with(store, tmp_path, gate, batch_size=4, workers=1, batch_timeout=30.0)

    def fetch(ref: ImageRef) -> tuple[str, str, Downloaded | None]:
        spool = crawler.store.spool_path(ref.key, ".jpg")
        spool.write_bytes(b"\xff\xd8\xff" + bytes(100))
        fetched.append(ref.key)
        return "ok", "", Downloaded(ref, np.zeros((512, 512, 3), np.uint8), spool, 2000, 1500, "jpeg")

    crawler.fetch = fetch  # type: ignore[method-assign]
    for i in range(12):
        store.add_image(ImageRef(f"reddit:t3_p{i}:0", f"https://i.redd.it/p{i}.jpg"), f"t3_p{i}")
    stats = CycleStats()

    def release_when_the_next_batch_is_in() -> None:
        gate.in_call.wait(10)
        deadline = time.monotonic() + 10
        while len(fetched) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time for a (wrong) ninth download to start
        gate.release.set()

    import threading

    releaser = threading.Thread(target=release_when_the_next_batch_is_in)
    releaser.start()
    try:
        crawler.download(stats)
        crawler.flush(stats, force=True)
    finally:
        releaser.join(20)
        crawler.close()
    assert gate.release.is_set()
    # While the first batch of 4 was held, the next 4 were downloaded (the old loop stopped at 4 + 2 x workers = 6),
    # and not a ninth: one batch in flight and one collecting bound the memory.
    assert max(gate.fetched_while_held) == 8
    assert gate.calls == [4, 4, 4] and gate.most_concurrent == 1
    assert stats.accepted == 12 and len(set(fetched)) == 12
