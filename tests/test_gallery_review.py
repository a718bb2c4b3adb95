"""The ``review`` op through a real server on 127.0.0.1: idempotent by key, apart from the gallery, capped, crash-safe."""
from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from gallery_bridge import reviews
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import IngestClient, IngestError
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from tests import gallery_helpers as T
from tests.gallery_process import free_port, send_and_wait_for_death, start_serve

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
META = {"source": "reddit", "source_url": "https://i.example.org/a.jpg", "permalink": "https://example.org/p/1",
        "title": "a rejected one", "author": "someone"}
SCORES = {"gmm": -412.5, "watermark": 0.93}


def jpeg(seed: int, size: tuple[int, int] = (512, 384)) -> bytes:
    return T.encode(T.photo(seed, size=size))


def serve(root: Path, **config) -> tuple[Ingester, Server]:
    target = FolderTarget(root)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    return ing, Server(ing, ServerConfig(bind="tcp://127.0.0.1:*", **config)).start()


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[tuple[Path, Ingester, Server]]:
    root = tmp_path / "gallery"
    ing, server = serve(root)
    yield root, ing, server
    server.close()
    ing.close()


def ro(root: Path) -> sqlite3.Connection:
    """What the web app holds: its own read-only connection."""
    return sqlite3.connect(f"{(root / 'catalogue.sqlite').resolve().as_uri()}?mode=ro", uri=True)


def test_review_is_stored_apart_from_the_gallery_and_idempotent_by_key(gallery) -> None:
    root, ing, server = gallery
    feats = np.linspace(-1, 1, 32, dtype=np.float32)
    data = jpeg(1)
    with IngestClient(server.endpoint, timeout=20, retries=0) as client:
        first = client.review("reddit:t3_a:0", META, data, SCORES, "watermark", feats)
        again = client.review("reddit:t3_a:0", META, data, SCORES, "watermark", feats)
        other = client.review("reddit:t3_b:0", {}, jpeg(2), {"gmm": -900.0}, "gmm")
    assert first == {**first, "status": "added"} and isinstance(first["review_id"], int)
    assert again["status"] == "duplicate" and again["review_id"] == first["review_id"]
    assert other["status"] == "added" and other["review_id"] > first["review_id"]
    # Nothing reached the gallery: no entry, no original, no thumbnail.
    assert ing.catalogue.count() == 0 and not list((root / "images").iterdir()) and not list((root / "thumbs").iterdir())
    conn = ro(root)
    try:
        assert reviews.count(conn) == 2
        items = reviews.list_items(conn, 10)
        assert [i["item"] for i in items] == [f"r{other['review_id']}", f"r{first['review_id']}"]
        item = reviews.get_item(conn, first["review_id"])
        assert item is not None and item["key"] == "reddit:t3_a:0" and item["rejected_by"] == "watermark"
        assert item["scores"] == SCORES and item["title"] == "a rejected one" and item["permalink"] == META["permalink"]
        assert item["label"] is None and (item["width"], item["height"]) == (512, 384)
        assert reviews.image_path(root, item).read_bytes() == data  # the file the web app serves
        assert reviews.list_items(conn, 10, before=other["review_id"])[0]["id"] == first["review_id"]
        assert reviews.get_item(conn, 999) is None
        stored = conn.execute("SELECT features FROM reviews WHERE id=?", (first["review_id"],)).fetchone()[0]
        assert np.array_equal(np.frombuffer(stored, "<f4"), feats)
    finally:
        conn.close()


def test_review_cap_keeps_the_newest_and_deletes_the_rest_with_their_files(tmp_path: Path) -> None:
    root = tmp_path / "gallery"
    ing, server = serve(root, review_keep=3)
    try:
        with IngestClient(server.endpoint, timeout=20, retries=0) as client:
            ids = [client.review(f"k:{i}", {}, jpeg(10 + i), {"gmm": -1.0}, "gmm")["review_id"] for i in range(5)]
            # An evicted key is gone: sending it again stores it anew (as the newest).
            again = client.review("k:0", {}, jpeg(10), {"gmm": -1.0}, "gmm")
            info = client.info()
    finally:
        server.close()
        ing.close()
    assert again["status"] == "added" and again["review_id"] > ids[-1]
    assert info["review"] == {"items": 3, "keep": 3, "label_copies": 20000}
    conn = ro(root)
    try:
        kept = [i["id"] for i in reviews.list_items(conn, 100)]
        files = {i["file"] for i in reviews.list_items(conn, 100)}
    finally:
        conn.close()
    assert kept == [again["review_id"], ids[4], ids[3]]
    on_disk = {p.name for p in (root / ".review").iterdir() if p.is_file()}
    assert on_disk == files and len(on_disk) == 3


@pytest.mark.parametrize("header, frames, code", [
    ({"key": "k", "meta": {}, "scores": {}}, "jpeg", "bad_header"),  # no rejected_by
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "x" * 65}, "jpeg", "bad_header"),
    ({"meta": {}, "scores": {}, "rejected_by": "gmm"}, "jpeg", "bad_header"),  # no key
    ({"key": "k", "meta": "nope", "scores": {}, "rejected_by": "gmm"}, "jpeg", "bad_meta"),
    ({"key": "k", "meta": {}, "scores": {"gmm": "high"}, "rejected_by": "gmm"}, "jpeg", "bad_meta"),
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "gmm"}, "png", "bad_image"),  # not a JPEG
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "gmm"}, "big", "too_large"),  # 640 px: over 512
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "gmm"}, "junk", "bad_image"),
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "gmm"}, "none", "size_mismatch"),
    ({"key": "k", "meta": {}, "scores": {}, "rejected_by": "gmm", "features_dim": 8}, "odd", "size_mismatch"),
])
def test_malformed_review_requests_are_refused_and_the_service_goes_on(gallery, header, frames, code) -> None:
    root, _, server = gallery
    bodies = {"jpeg": [jpeg(3)], "png": [T.encode(T.photo(3, size=(512, 384)), "PNG")], "big": [jpeg(3, (640, 480))],
              "junk": [b"\xff\xd8\xff" + b"\0" * 100], "none": [], "odd": [jpeg(3), b"\0" * 12]}
    with IngestClient(server.endpoint, timeout=20, retries=0) as client:
        with pytest.raises(IngestError) as err:
            client.request({"op": "review", **header}, *bodies[frames])
        assert err.value.code == code
        assert client.ping()["pong"] is True
        assert client.review("ok", {}, jpeg(4), {}, "gmm")["status"] == "added"
    # Only the good request left a file behind.
    assert len([p for p in (root / ".review").iterdir() if p.is_file()]) == 1


# ---- crash safety: a real `gallery-bridge serve` that SIGKILLs itself at a named point --------------------

def _start(root: Path, port: int, crash_at: str | None = None) -> subprocess.Popen:
    # the cap's flag through its env var, as a container would set it
    return start_serve(root, port, crash_at, env={"GALLERY_BRIDGE_REVIEW_KEEP": "2"})


def _review_and_wait_for_death(proc: subprocess.Popen, port: int, key: str, data: bytes) -> None:
    header = {"op": "review", "key": key, "meta": {}, "scores": {"gmm": 1.0}, "rejected_by": "gmm"}
    assert send_and_wait_for_death(proc, port, header, data) == -9


def _consistent(root: Path) -> list[dict]:
    """Every row has its file and every file has its row; returns the rows."""
    conn = ro(root)
    try:
        rows = reviews.list_items(conn, 100)
    finally:
        conn.close()
    files = {p.name for p in (root / ".review").iterdir() if p.is_file()}
    assert files == {r["file"] for r in rows}
    assert not [p for p in (root / ".review" / ".tmp").iterdir()]
    return rows


@pytest.mark.parametrize("point", reviews.CRASH_POINTS)
def test_a_crash_while_storing_or_capping_leaves_no_orphan_file_and_no_row_without_file(tmp_path: Path, point: str) -> None:
    root = tmp_path / "gallery"
    port = free_port()
    proc = _start(root, port, crash_at=None)
    try:
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=20, retries=0) as client:
            for i in range(2):
                assert client.review(f"k:{i}", {}, jpeg(20 + i), {}, "gmm")["status"] == "added"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    proc = _start(root, port, crash_at=point)
    # The third item: its file is written, then (review_file) the process dies before the row,
    # or (review_evicted) the oldest row is gone but its file not yet.
    _review_and_wait_for_death(proc, port, "k:2", jpeg(22))
    on_disk = {p.name for p in (root / ".review").iterdir() if p.is_file()}
    assert len(on_disk) == 3  # the crash did leave a file nobody points at ...
    proc = _start(root, port)
    try:
        rows = _consistent(root)  # ... and the restart swept it
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=20, retries=0) as client:
            again = client.review("k:2", {}, jpeg(22), {}, "gmm")
        if point == "review_file":
            assert [r["key"] for r in rows] == ["k:1", "k:0"] and again["status"] == "added"
        else:
            assert [r["key"] for r in rows] == ["k:2", "k:1"] and again["status"] == "duplicate"
        rows = _consistent(root)
        assert [r["key"] for r in rows] == ["k:2", "k:1"]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
