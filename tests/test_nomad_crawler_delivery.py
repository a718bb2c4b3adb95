"""Delivery stage: batching, patience with anti_sus, the outbox drain, --save-dir files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from anti_sus.client import AntiSusError, AntiSusUnavailable, FilterResult, ImageResult
from nomad.delivery import (
    Batcher,
    Downloaded,
    FilterStage,
    SaveDirDeliverer,
    Stopped,
    drain_outbox,
    ingest_meta,
)
from nomad.sources.base import ImageRef
from nomad.store import Store
from tests.nomad_deliverers import ScriptedDeliverer


def item(i: int) -> Downloaded:
    return Downloaded(ImageRef(f"k:{i}", f"https://x/{i}.jpg"), np.zeros((512, 512, 3), np.uint8), Path(f"/nonexistent/{i}"), 2000, 1500, "jpeg")


def test_batcher_full_and_timeout() -> None:
    now = [0.0]
    b = Batcher(size=3, timeout=10.0, clock=lambda: now[0])
    assert not b.due() and b.due_in() is None
    b.add(item(0))
    assert not b.due() and b.due_in() == 10.0
    now[0] = 10.0
    assert b.due()  # the oldest waited --batch-timeout
    b.add(item(1))
    b.add(item(2))
    b.add(item(3))
    assert b.full()
    assert [i.ref.key for i in b.take()] == ["k:0", "k:1", "k:2"]
    assert [i.ref.key for i in b.items] == ["k:3"] and not b.full()


class Scripted:
    """A FilterClient whose answers are scripted: exceptions or 'ok'."""

    def __init__(self, script: list[Any], max_images: int = 1000) -> None:
        self.script = script
        self.max_images = max_images
        self.sizes: list[int] = []

    def filter(self, images: np.ndarray, **kw: Any) -> FilterResult:
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
        if len(images) > self.max_images:
            raise AntiSusError("too_large", "too many images")
        self.sizes.append(len(images))
        n = len(images)
        good = [i for i in range(n) if i % 2 == 0]
        res = [ImageResult(i, float(i), None, "good" if i % 2 == 0 else "outlier") for i in range(n)]
        return FilterResult(good, res, np.full((len(good), 4), 1.0, np.float32), 1.0)


def test_filter_waits_through_outages_and_never_drops() -> None:
    sleeps: list[float] = []
    stage = FilterStage(Scripted([AntiSusUnavailable("down")] * 4), sleep=lambda s: bool(sleeps.append(s)), backoff_max=2.0)  # type: ignore[arg-type]
    r = stage.filter(np.zeros((3, 8, 8, 3), np.uint8))
    assert r.good == [0, 2] and len(sleeps) == 4 and max(sleeps) <= 2.0


def test_filter_stop_while_down_raises_stopped() -> None:
    stage = FilterStage(Scripted([AntiSusUnavailable("down")] * 100), sleep=lambda s: True)  # type: ignore[arg-type]
    with pytest.raises(Stopped):
        stage.filter(np.zeros((1, 8, 8, 3), np.uint8))


def test_filter_splits_batches_the_server_finds_too_large() -> None:
    client = Scripted([], max_images=2)
    stage = FilterStage(client, sleep=lambda s: False)  # type: ignore[arg-type]
    r = stage.filter(np.zeros((5, 8, 8, 3), np.uint8))
    assert sorted(client.sizes) == [1, 2, 2]
    assert [x.index for x in r.results] == [0, 1, 2, 3, 4]
    # Halves [0,1] and [2,3,4]; the second is split again into [2] and [3,4]: each part's first image is good.
    assert r.good == [0, 2, 3] and r.features.shape == (3, 4)
    verdicts = {x.index: x.verdict for x in r.results}
    assert all((verdicts[i] == "good") == (i in r.good) for i in range(5))


def test_filter_bad_request_is_not_retried() -> None:
    stage = FilterStage(Scripted([AntiSusError("bad_shape", "no")]), sleep=lambda s: False)  # type: ignore[arg-type]
    with pytest.raises(AntiSusError):
        stage.filter(np.zeros((1, 8, 8, 3), np.uint8))


def outbox_with(tmp_path: Path, n: int) -> Store:
    s = Store(tmp_path / "state")
    for i in range(n):
        ref = ImageRef(f"reddit:t3_{i}:0", f"https://i.redd.it/{i}.jpg")
        s.add_image(ref, f"t3_{i}")
        sp = s.spool_path(ref.key, ".jpg")
        sp.write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
        s.accept(ref.key, sp, ingest_meta(ref, 2000, 1500, "jpeg", {"gmm": 1.5, "watermark": None}), None, {"gmm": 1.5})
    return s


def test_drain_waits_for_the_gallery_when_asked(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 3) as s:
        d = ScriptedDeliverer(unavailable=2)
        sleeps: list[float] = []
        assert drain_outbox(s, d, sleep=lambda x: bool(sleeps.append(x)), wait=True) == (3, 0)
        assert len(sleeps) == 2 and sorted(d.got) == ["reddit:t3_0:0", "reddit:t3_1:0", "reddit:t3_2:0"]


def test_drain_without_wait_leaves_the_outbox_for_later(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 2) as s:
        assert drain_outbox(s, ScriptedDeliverer(unavailable=1), sleep=lambda x: False, wait=False) == (0, 2)
        assert drain_outbox(s, ScriptedDeliverer(), sleep=lambda x: False, wait=False) == (2, 0)


def test_refused_items_become_dead_letters_and_do_not_block_others(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 3) as s:
        d = ScriptedDeliverer(refuse={"reddit:t3_1:0"})
        delivered, left = drain_outbox(s, d, sleep=lambda x: False, wait=True)
        assert (delivered, left) == (2, 0)
        (dead,) = s.dead_letters()
        assert dead["key"] == "reddit:t3_1:0" and dead["attempts"] == 1 and "ingest_bad_meta" in dead["reason"]
        assert s.image_state("reddit:t3_1:0")[0] == "dead_letter"
        assert len(list(s.outbox_dir.iterdir())) == 1  # its file stays, for nomad retry-dead


def test_save_dir_writes_image_and_sidecar(tmp_path: Path) -> None:
    with outbox_with(tmp_path, 1) as s:
        out = tmp_path / "out"
        delivered, _ = drain_outbox(s, SaveDirDeliverer(out), sleep=lambda x: False, wait=False)
        assert delivered == 1
        (side,) = out.glob("*.json")
        meta = json.loads(side.read_text())
        assert meta["key"] == "reddit:t3_0:0" and meta["scores"] == {"gmm": 1.5, "watermark": None}
        assert (out / meta["file"]).read_bytes().startswith(b"\xff\xd8\xff")
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
        assert s.image_state("reddit:t3_0:0")[0] == "delivered"


def test_ingest_meta_has_the_gallery_fields() -> None:
    ref = ImageRef("reddit:t3_a:0", "https://live.staticflickr.com/1/2_x_o.jpg", site="flickr",
                   meta={"permalink": "https://www.reddit.com/r/p/comments/a/", "title": "t", "subreddit": "p", "author": "u",
                         "license": "CC BY 2.0", "page_url": "https://www.flickr.com/photos/u/2/", "post_score": 12, "source": "reddit"})
    m = ingest_meta(ref, 4000, 3000, "jpeg", {"gmm": -1.0, "watermark": 0.2})
    assert m["source"] == "flickr" and m["licence"] == "CC BY 2.0"
    assert m["source_url"] == "https://www.flickr.com/photos/u/2/" and m["image_url"] == ref.url
    assert m["scores"] == {"gmm": -1.0, "watermark": 0.2, "reddit_score": 12}
    assert all(isinstance(v, (int, float)) for v in m["scores"].values())


def test_filter_waits_follow_the_injected_rng_and_the_shared_schedule() -> None:
    """The waits are photocore's full-jitter schedule (0.5 s doubling, capped), drawn from the injected rng."""
    import random

    runs: list[list[float]] = []
    for _ in range(2):
        sleeps: list[float] = []
        stage = FilterStage(Scripted([AntiSusUnavailable("down")] * 6), sleep=lambda s: bool(sleeps.append(s)),  # type: ignore[arg-type]
                            backoff_max=4.0, rng=random.Random(7))
        stage.filter(np.zeros((1, 8, 8, 3), np.uint8))
        runs.append(sleeps)
    assert runs[0] == runs[1] and len(runs[0]) == 6
    assert all(0.0 <= s <= min(4.0, 0.5 * 2**n) for n, s in enumerate(runs[0]))
