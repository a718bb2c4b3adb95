"""nomad's review sample against a real gallery_bridge server on 127.0.0.1: the items land in the review queue
with their scores, stage, source and CLIP features, apart from the gallery, and a rerun adds nothing."""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from gallery_bridge import reviews
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from nomad.delivery.review import ReviewConfig, ReviewSampler, gallery_sender
from nomad.store import Store

from .test_nomad_review import crawler_with, flush

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def gallery(tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    root = tmp_path / "gallery"
    target = FolderTarget(root)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    try:
        yield root, server
    finally:
        server.close()
        ing.close()


def crawl_once(state: Path, out: Path, endpoint: str) -> dict[str, int]:
    """One batch (2 outliers, 1 watermark, 1 good) through a crawler whose review sample goes to ``endpoint``."""
    with Store(state) as store:
        sampler = ReviewSampler(gallery_sender(endpoint, timeout=20), ReviewConfig(per_cycle=10, rate=1.0))
        crawler, _ = crawler_with(store, out, sampler)
        stats = flush(crawler, store)
        crawler.close()
        assert list(store.spool_dir.iterdir()) == []
    return dict(stats.reviews)


def test_review_items_reach_the_gallerys_review_queue_once(gallery, tmp_path: Path) -> None:
    root, server = gallery
    assert crawl_once(tmp_path / "state1", tmp_path, server.endpoint) == {"queued": 3, "sent": 3}
    conn = sqlite3.connect(f"{(root / 'catalogue.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        items = {i["key"]: i for i in reviews.list_items(conn, 10)}
        assert set(items) == {"reddit:t3_r0:0", "reddit:t3_r2:0", "reddit:t3_r3:0"}
        near = items["reddit:t3_r3:0"]
        assert near["rejected_by"] == "gmm" and near["scores"]["gmm"] == 97.0
        assert near["scores"]["margin"] == pytest.approx(3.0) and near["scores"]["gmm_threshold"] == 100.0
        assert (near["title"], near["author"], near["source_url"]) == ("post 3", "u3", "https://i.redd.it/r3.jpg")
        assert items["reddit:t3_r2:0"]["rejected_by"] == "watermark"
        with Image.open(reviews.image_path(root, near)) as im:
            assert im.format == "JPEG" and max(im.size) <= 512
        # The features travelled: the stored vector is the image's own row of anti_sus's "all" features.
        (blob,) = conn.execute("SELECT features FROM reviews WHERE key = ?", ("reddit:t3_r3:0",)).fetchone()
        assert np.frombuffer(blob, dtype="<f4").tolist() == [3.0] * 4
        # Apart from the gallery: only the good image would be ingested, and that goes through the outbox, not here.
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 0
    finally:
        conn.close()
    # A rerun (a fresh state dir, the same keys): the gallery answers duplicate and keeps one item per key.
    assert crawl_once(tmp_path / "state2", tmp_path, server.endpoint) == {"queued": 3, "duplicate": 3}
    conn = sqlite3.connect(f"{(root / 'catalogue.sqlite').resolve().as_uri()}?mode=ro", uri=True)
    try:
        assert reviews.count(conn) == 3
    finally:
        conn.close()
