"""nomad's review sample: which rejected images go to the gallery's review queue, what they carry, and that
sending them never touches the crawl (gallery down, slow, or the sample switched off)."""
from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from anti_sus.client import FilterResult, ImageResult
from nomad.crawler import Crawler, CrawlerConfig, CycleStats
from nomad.delivery import Downloaded, FilterStage, SaveDirDeliverer
from nomad.delivery.review import ReviewConfig, ReviewSampler, gallery_sender, margin, pick, review_jpeg
from nomad.http import HttpClient
from nomad.rules import Rules
from nomad.sources.base import ImageRef
from nomad.sources.registry import ExpanderRegistry
from nomad.store import Store
from stack.procs import free_port
from tests.nomad_fakes import pillow_load_sizes

pytestmark = pytest.mark.timeout(60)

THRESHOLDS = {"gmm": 100.0, "watermark": 0.5}


class FakeSender:
    """``IngestClient.review``'s signature; records every call. ``fail``: raise; ``hold``: block that long first."""

    def __init__(self, fail: Exception | None = None, hold: float = 0.0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail
        self.hold = hold
        self.closed = 0

    def review(self, key: str, meta: dict[str, Any], image: bytes, scores: dict[str, Any], rejected_by: str,
               features: np.ndarray | None = None) -> dict[str, Any]:
        if self.hold:
            time.sleep(self.hold)
        if self.fail is not None:
            raise self.fail
        self.calls.append({"key": key, "meta": meta, "image": image, "scores": scores, "rejected_by": rejected_by,
                           "features": features})
        return {"status": "added", "review_id": len(self.calls)}

    def close(self) -> None:
        self.closed += 1


def jpeg(width: int, height: int, orientation: int | None = None, colour: tuple[int, int, int] = (90, 120, 160)) -> bytes:
    im = Image.new("RGB", (width, height), colour)
    im.paste((250, 20, 20), (0, 0, width // 4, height // 4))  # a red top-left corner, to see the rotation
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    im.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def results_of(*rows: tuple[str, float, float | None]) -> list[ImageResult]:
    return [ImageResult(i, gmm, wm, verdict) for i, (verdict, gmm, wm) in enumerate(rows)]


# --- which ones ----------------------------------------------------------------------------

def test_pick_takes_the_nearest_first_and_the_stages_take_turns() -> None:
    res = results_of(("outlier", 10.0, None), ("outlier", 95.0, None), ("watermark", 140.0, 0.99), ("good", 150.0, 0.1),
                     ("outlier", 99.0, None), ("watermark", 130.0, 0.55), ("watermark", 120.0, 0.7))
    picks = pick(res, THRESHOLDS, 4)
    assert [(p.index, p.stage) for p in picks] == [(4, "gmm"), (5, "watermark"), (1, "gmm"), (6, "watermark")]
    assert [p.margin for p in picks] == pytest.approx([1.0, 0.05, 5.0, 0.2])
    assert 3 not in [p.index for p in pick(res, THRESHOLDS, 10)]  # never a good image
    # No thresholds (an old anti_sus, info unreachable): the same order, from the scores alone.
    assert [p.index for p in pick(res, None, 4)] == [4, 5, 1, 6]
    assert margin(ImageResult(0, 1.0, None, "corrupt"), THRESHOLDS) == float("inf")


def test_the_learnt_probe_is_a_stage_of_its_own() -> None:
    """anti_sus versions with a learnt probe reject with verdict 'probe' and report P(good) per image."""
    from dataclasses import fields

    if "probe" not in {f.name for f in fields(ImageResult)}:
        pytest.skip("this anti_sus client has no probe score")
    res = [ImageResult(0, 150.0, None, "probe", 0.1), ImageResult(1, 150.0, None, "probe", 0.45),  # type: ignore[call-arg]
           ImageResult(2, 99.0, None, "outlier", None)]  # type: ignore[call-arg]
    picks = pick(res, {**THRESHOLDS, "probe": 0.5}, 3)
    assert [(p.index, p.stage) for p in picks] == [(2, "gmm"), (1, "probe"), (0, "probe")]
    assert picks[1].margin == pytest.approx(0.05)


def test_other_verdicts_are_sampled_after_their_turn() -> None:
    res = results_of(("outlier", 50.0, None), ("corrupt", 0.0, None), ("outlier", 90.0, None))
    assert [(p.index, p.stage) for p in pick(res, THRESHOLDS, 3)] == [(2, "gmm"), (1, "corrupt"), (0, "gmm")]


# --- the sampler on its own --------------------------------------------------------------------

@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state") as s:
        yield s


def downloaded(store: Store, n: int, *, start: int = 0) -> list[Downloaded]:
    items = []
    for i in range(start, start + n):
        ref = ImageRef(f"reddit:t3_r{i}:0", f"https://i.redd.it/r{i}.jpg",
                       meta={"title": f"post {i}", "author": f"u{i}", "permalink": f"https://www.reddit.com/r/p/{i}",
                             "source": "reddit", "subreddit": "EarthPorn"})
        store.add_image(ref, f"t3_r{i}")
        spool = store.spool_path(ref.key, ".jpeg")
        spool.write_bytes(jpeg(1600, 1200))
        items.append(Downloaded(ref, np.zeros((8, 8, 3), np.uint8), spool, 1600, 1200, "jpeg"))
    return items


def all_rejected(n: int) -> FilterResult:
    res = [ImageResult(i, 90.0 - i, None, "outlier") for i in range(n)]
    feats = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return FilterResult([], res, feats, 1.0, list(range(n)), dict(THRESHOLDS))


def test_per_cycle_cap_and_rate_bound_the_sample(store: Store) -> None:
    sender = FakeSender()
    sampler = ReviewSampler(lambda: sender, ReviewConfig(per_cycle=3, rate=0.5, queue=50))
    cycle1 = CycleStats()
    assert sampler.offer(downloaded(store, 4), all_rejected(4), cycle1) == 3   # credit 1 + 0.5*4, capped at 3
    assert sampler.offer(downloaded(store, 4, start=4), all_rejected(4), cycle1) == 0  # this cycle's cap is spent
    cycle2 = CycleStats()
    assert sampler.offer(downloaded(store, 2, start=8), all_rejected(2), cycle2) == 2  # a new cycle, credit 2 + 1
    sampler.close()
    assert len(sender.calls) == 5 and cycle1.reviews["queued"] == 3 and cycle1.reviews["sent"] == 3
    assert cycle2.reviews["sent"] == 2
    # The nearest first: index 0 has the highest GMM score (90) of each batch.
    assert sender.calls[0]["key"] == "reddit:t3_r0:0" and sender.calls[3]["key"] == "reddit:t3_r8:0"


def test_an_older_anti_sus_has_its_thresholds_asked_once(store: Store) -> None:
    """Replies without thresholds: ``info``'s, with this crawler's override on top, asked once and kept."""
    from nomad.delivery.review import server_thresholds

    asked: list[int] = []

    def info() -> dict[str, Any]:
        asked.append(1)
        return {"thresholds": {"gmm": 100.0, "watermark": 0.5}}

    sender = FakeSender()
    sampler = ReviewSampler(lambda: sender, ReviewConfig(per_cycle=10, rate=0.0),
                            thresholds=server_thresholds(info, {"gmm": 95.0, "watermark": None}))
    old_reply = lambda n: FilterResult([], all_rejected(n).results, None, 1.0)  # noqa: E731
    stats = CycleStats()
    sampler.offer(downloaded(store, 2), old_reply(2), stats)
    sampler.credit = 1.0
    sampler.offer(downloaded(store, 2, start=2), old_reply(2), stats)
    sampler.close()
    assert len(asked) == 1 and len(sender.calls) == 2
    assert sender.calls[0]["scores"]["gmm_threshold"] == 95.0 and sender.calls[0]["scores"]["margin"] == pytest.approx(5.0)
    assert sender.calls[0]["scores"]["watermark_threshold"] == 0.5 and sender.calls[0]["features"] is None

    def down() -> dict[str, Any]:
        raise OSError("anti_sus gone")

    sender2 = FakeSender()
    blind = ReviewSampler(lambda: sender2, ReviewConfig(per_cycle=10, rate=0.0), thresholds=server_thresholds(down, {}))
    blind.offer(downloaded(store, 3, start=4), old_reply(3), CycleStats())
    blind.close()
    # Ranked by the scores alone (the highest GMM score is nearest), and no margin is claimed.
    assert sender2.calls[0]["key"] == "reddit:t3_r4:0" and "margin" not in sender2.calls[0]["scores"]


def test_rate_zero_sends_one_then_nothing(store: Store) -> None:
    sender = FakeSender()
    sampler = ReviewSampler(lambda: sender, ReviewConfig(per_cycle=50, rate=0.0))
    stats = CycleStats()
    assert sampler.offer(downloaded(store, 5), all_rejected(5), stats) == 1  # the starting credit: a run shows something
    assert sampler.offer(downloaded(store, 5, start=5), all_rejected(5), stats) == 0
    sampler.close()
    assert len(sender.calls) == 1


def test_a_full_queue_drops_and_counts(store: Store) -> None:
    gate = threading.Event()

    class Held(FakeSender):
        def review(self, *a: Any, **kw: Any) -> dict[str, Any]:
            gate.wait(10)
            return super().review(*a, **kw)

    sender = Held()
    sampler = ReviewSampler(lambda: sender, ReviewConfig(per_cycle=10, rate=1.0, queue=1))
    stats = CycleStats()
    before = REGISTRY.get_sample_value("nomad_reviews_total", {"outcome": "dropped"}) or 0.0
    from nomad.outcomes import Metrics

    sampler.on_count = Metrics().review
    items = downloaded(store, 6)
    t0 = time.monotonic()
    sampler.offer(items, all_rejected(6), stats)
    assert time.monotonic() - t0 < 1.0  # never waits for the queue
    gate.set()
    sampler.close()
    assert stats.reviews["dropped"] >= 1 and stats.reviews["sent"] + stats.reviews["dropped"] == 6
    assert (REGISTRY.get_sample_value("nomad_reviews_total", {"outcome": "dropped"}) or 0.0) - before == stats.reviews["dropped"]
    assert list(store.spool_dir.iterdir()) == []


# --- the copy --------------------------------------------------------------------------------

def test_review_copy_is_a_small_upright_jpeg(tmp_path: Path) -> None:
    src = tmp_path / "a.jpeg"
    src.write_bytes(jpeg(2400, 1600, orientation=6))  # stored landscape, shown rotated 90° clockwise
    out = Image.open(io.BytesIO(review_jpeg(src)))
    assert out.format == "JPEG" and max(out.size) <= 512
    assert out.size == (341, 512)  # upright: portrait
    # The red corner was top-left in storage; after a 90° clockwise turn it is top-right.
    assert out.getpixel((330, 10))[0] > 200 and out.getpixel((10, 10))[0] < 150
    png = tmp_path / "b.png"
    Image.new("RGBA", (900, 700), (10, 200, 10, 128)).save(png)
    small = Image.open(io.BytesIO(review_jpeg(png)))
    assert small.format == "JPEG" and small.mode == "RGB" and small.size == (512, 398)
    tiny = tmp_path / "c.jpeg"
    tiny.write_bytes(jpeg(300, 200))
    assert Image.open(io.BytesIO(review_jpeg(tiny))).size == (300, 200)  # never enlarged


def test_a_pixel_bomb_is_not_decoded(tmp_path: Path) -> None:
    src = tmp_path / "big.jpeg"
    src.write_bytes(jpeg(1000, 1000))
    with pytest.raises(ValueError, match="pixels"):
        review_jpeg(src, max_pixels=999_999)


def test_review_copy_uses_the_crawlers_safe_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One open/check/draft/orient implementation (nomad.images.opened): its refusals, its DCT scaling."""
    from stack.emulator import images as gen

    cut = tmp_path / "cut.jpeg"
    cut.write_bytes(gen.truncated_jpeg())
    with pytest.raises(ValueError, match="truncated"):  # an error, never a half-grey copy
        review_jpeg(cut)
    bmp = tmp_path / "x.jpeg"
    Image.new("RGB", (40, 30)).save(bmp, "BMP")
    with pytest.raises(ValueError, match="bad_format"):
        review_jpeg(bmp)
    big = tmp_path / "big.jpeg"
    big.write_bytes(gen.picture(3000, 2000, "jpeg", 4))
    sizes, copy = pillow_load_sizes(monkeypatch, lambda: review_jpeg(big))
    out = Image.open(io.BytesIO(copy))
    assert sizes[0] == (750, 500), "1/4 is still larger than the 512x341 copy"
    assert out.size == (512, 341)


def test_review_copy_puts_transparency_over_white_like_the_wire(tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    arr = np.zeros((100, 200, 4), np.uint8)
    arr[:, 100:] = (0, 0, 255, 255)  # right half opaque blue, left half transparent black
    Image.fromarray(arr, "RGBA").save(png)
    out = np.asarray(Image.open(io.BytesIO(review_jpeg(png))))
    assert out[:, :90].min() > 240, "transparent pixels are white, as anti_sus saw them"
    assert out[:, 110:, 2].mean() > 230 and out[:, 110:, 0].mean() < 20


# --- in the crawler -------------------------------------------------------------------------

class Answers:
    """anti_sus stand-in answering ``return_features="all"`` like the real server: one feature row per image."""

    def __init__(self, verdicts: list[tuple[str, float, float | None]]) -> None:
        self.verdicts = verdicts
        self.asked: list[Any] = []

    def filter(self, images: np.ndarray, *, return_features: Any = False, **_: Any) -> FilterResult:
        self.asked.append(return_features)
        res = [ImageResult(i, g, w, v) for i, (v, g, w) in enumerate(self.verdicts[: len(images)])]
        good = [r.index for r in res if r.verdict == "good"]
        feats = np.stack([np.full(4, i, np.float32) for i in range(len(images))])
        return FilterResult(good, res, feats, 1.0, list(range(len(images))), dict(THRESHOLDS))


VERDICTS = [("outlier", 20.0, None), ("good", 150.0, 0.1), ("watermark", 130.0, 0.6), ("outlier", 97.0, None)]


def crawler_with(store: Store, tmp_path: Path, sampler: ReviewSampler | None) -> tuple[Crawler, Answers]:
    answers = Answers(VERDICTS)
    crawler = Crawler(CrawlerConfig(batch_size=4), store=store, rules=Rules(), http=HttpClient(), sources=[],
                      expanders=ExpanderRegistry([]), filter_stage=FilterStage(answers, features="all"),  # type: ignore[arg-type]
                      deliverer=SaveDirDeliverer(tmp_path / "out"), review=sampler)
    return crawler, answers


def flush(crawler: Crawler, store: Store) -> CycleStats:
    stats = CycleStats()
    for it in downloaded(store, 4):
        crawler.batcher.add(it)
    crawler.flush(stats, force=True)
    return stats


def test_rejected_images_travel_with_scores_stage_source_and_features(store: Store, tmp_path: Path) -> None:
    sender = FakeSender()
    crawler, answers = crawler_with(store, tmp_path, ReviewSampler(lambda: sender, ReviewConfig(per_cycle=10, rate=1.0)))
    stats = flush(crawler, store)
    crawler.close()
    assert answers.asked == ["all"]
    assert [c["key"] for c in sender.calls] == ["reddit:t3_r3:0", "reddit:t3_r2:0", "reddit:t3_r0:0"]
    near = sender.calls[0]
    assert near["rejected_by"] == "gmm" and near["scores"]["gmm"] == 97.0 and near["scores"]["margin"] == pytest.approx(3.0)
    assert near["scores"]["gmm_threshold"] == 100.0 and "watermark" not in near["scores"]  # the stage never ran on it
    assert near["features"].tolist() == [3.0] * 4  # its own row of the "all" features
    meta = near["meta"]
    assert (meta["title"], meta["author"], meta["permalink"]) == ("post 3", "u3", "https://www.reddit.com/r/p/3")
    assert meta["source_url"] == meta["image_url"] == "https://i.redd.it/r3.jpg" and meta["verdict"] == "outlier"
    wm = sender.calls[1]
    assert wm["rejected_by"] == "watermark" and wm["scores"]["watermark"] == 0.6 and wm["features"].tolist() == [2.0] * 4
    assert max(Image.open(io.BytesIO(near["image"])).size) <= 512
    # The crawl's own record is unchanged: verdicts stored, the good image's features are its own row.
    assert dict(stats.rejected) == {"outlier": 2, "watermark": 1} and stats.accepted == 1
    assert stats.reviews["sent"] == 3
    (item,) = store.outbox()
    assert item.read_features().tolist() == [1.0] * 4
    assert list(store.spool_dir.iterdir()) == []  # every spooled original gone, sampled or not


def test_gallery_down_leaves_the_crawl_alone(store: Store, tmp_path: Path) -> None:
    """Nothing listens at the gallery's address: the crawl records the same outcomes, at once."""
    port = free_port()
    sampler = ReviewSampler(gallery_sender(f"tcp://127.0.0.1:{port}", timeout=0.5), ReviewConfig(per_cycle=10, rate=1.0))
    crawler, _ = crawler_with(store, tmp_path, sampler)
    t0 = time.monotonic()
    stats = flush(crawler, store)
    assert time.monotonic() - t0 < 1.5
    assert dict(stats.rejected) == {"outlier": 2, "watermark": 1} and stats.accepted == 1
    crawler.close()
    assert stats.reviews["failed"] >= 1 and stats.reviews["sent"] == 0
    assert stats.reviews["failed"] + stats.reviews["dropped"] == 3
    assert list(store.spool_dir.iterdir()) == []


def test_a_hung_gallery_does_not_hold_the_shutdown(store: Store, tmp_path: Path) -> None:
    sender = FakeSender(hold=3.0)
    crawler, _ = crawler_with(store, tmp_path, ReviewSampler(lambda: sender, ReviewConfig(per_cycle=10, rate=1.0)))
    stats = flush(crawler, store)
    t0 = time.monotonic()
    crawler.review.close(wait=0.3)  # type: ignore[union-attr]
    assert time.monotonic() - t0 < 1.0
    assert stats.reviews["dropped"] >= 2  # the ones still queued
    crawler.close()


def test_a_sender_that_raises_is_counted_and_reconnected(store: Store, tmp_path: Path) -> None:
    made: list[FakeSender] = []

    def connect() -> FakeSender:
        made.append(FakeSender(fail=RuntimeError("gallery refused")))
        return made[-1]

    crawler, _ = crawler_with(store, tmp_path, ReviewSampler(connect, ReviewConfig(per_cycle=10, rate=1.0)))
    stats = flush(crawler, store)
    crawler.close()
    assert stats.reviews["failed"] == 3 and len(made) == 3 and all(s.closed == 1 for s in made)


def test_a_failed_connect_does_not_end_the_sending_thread(store: Store, tmp_path: Path) -> None:
    sender = FakeSender()
    tries: list[int] = []

    def connect() -> FakeSender:
        tries.append(1)
        if len(tries) == 1:
            raise OSError("no route")
        return sender

    crawler, _ = crawler_with(store, tmp_path, ReviewSampler(connect, ReviewConfig(per_cycle=10, rate=1.0)))
    stats = flush(crawler, store)
    crawler.close()
    assert stats.reviews["failed"] == 1 and stats.reviews["sent"] == 2 and len(sender.calls) == 2


def test_without_a_sampler_nothing_is_sampled(store: Store, tmp_path: Path) -> None:
    crawler, _ = crawler_with(store, tmp_path, None)
    stats = flush(crawler, store)
    crawler.close()
    assert not stats.reviews and dict(stats.rejected) == {"outlier": 2, "watermark": 1}
    assert list(store.spool_dir.iterdir()) == []


# --- flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("extra", "env", "on"), [
    ([], {}, True),
    (["--no-review"], {}, False),
    ([], {"NOMAD_REVIEW": "0"}, False),
    (["--save-dir", "OUT"], {}, False),
    (["--save-dir", "OUT", "--review"], {}, False),  # never with --save-dir: there is no gallery
])
def test_on_by_default_with_a_gallery_off_with_the_flag(tmp_path: Path, extra: list[str], env: dict[str, str], on: bool) -> None:
    from nomad.cli import build_crawler, build_parser

    extra = [str(tmp_path / "out") if x == "OUT" else x for x in extra]
    args = build_parser(env).parse_args(["once", "--source", "reddit", "--state-dir", str(tmp_path / "state"),
                                         "--review-per-cycle", "7", "--review-rate", "0.25", *extra])
    crawler = build_crawler(args, threading.Event(), environ={})
    try:
        assert (crawler.review is not None) is on
        assert crawler.filter_stage.features == ("all" if on else True)
        if on:
            assert crawler.review.config.per_cycle == 7 and crawler.review.config.rate == 0.25
    finally:
        crawler.close()
        crawler.store.close()


def test_a_halved_batch_keeps_each_feature_row_with_its_image() -> None:
    """anti_sus took fewer images per request: the halves' "all" rows are merged with their indexes shifted."""
    from nomad.delivery import merge_results

    a = FilterResult([1], results_of(("outlier", 1.0, None), ("good", 150.0, 0.1)), np.array([[0.0], [1.0]], np.float32),
                     1.0, [0, 1], dict(THRESHOLDS))
    b = FilterResult([], [ImageResult(0, 2.0, None, "outlier")], np.array([[2.0]], np.float32), 1.0, [0], dict(THRESHOLDS))
    merged = merge_results(a, b, 2)
    assert merged.features_index == [0, 1, 2] and merged.thresholds == THRESHOLDS
    assert [merged.feature_of(i).tolist() for i in range(3)] == [[0.0], [1.0], [2.0]]  # type: ignore[union-attr]
    old = merge_results(FilterResult([0], [], np.array([[5.0]], np.float32), 1.0), FilterResult([0], [], np.array([[6.0]], np.float32), 1.0), 1)
    assert merged.good == [1] and old.feature_of(1).tolist() == [6.0]  # type: ignore[union-attr]
