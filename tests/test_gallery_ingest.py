"""The ingest service over ZeroMQ: idempotency, dedup, validation, hostile metadata."""
from __future__ import annotations

import json
import os
import sqlite3
import zlib
import struct
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import zmq
from PIL import Image

from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.client import GalleryUnavailable, IngestClient, IngestError
from gallery_bridge.dedup import DedupConfig
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.validate import Limits


class Running:
    def __init__(self, root: Path, limits: Limits | None = None, dedup: DedupConfig | None = None) -> None:
        self.root = root
        target = FolderTarget(root)
        self.ingester = Ingester(Catalogue(target.catalogue_path), target, dedup)
        self.server = Server(self.ingester, ServerConfig(bind="tcp://127.0.0.1:*", limits=limits or Limits())).start()
        self.client = IngestClient(self.server.endpoint, timeout=20, retries=0)

    def stop(self) -> None:
        self.client.close()
        self.server.close()  # joins the server thread, or raises
        self.ingester.close()


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[Running]:
    run = Running(tmp_path / "gallery")
    yield run
    run.stop()


def rows(root: Path) -> list[sqlite3.Row]:
    db = sqlite3.connect(root / "catalogue.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return db.execute("SELECT * FROM entries ORDER BY id").fetchall()
    finally:
        db.close()


META = {"source_url": "https://i.redd.it/abc.jpg", "permalink": "https://www.reddit.com/r/EarthPorn/comments/abc/x/",
        "title": "Lake at dawn", "subreddit": "EarthPorn", "author": "someone", "scores": {"gmm": -12.5, "watermark": 0.03}}


def test_ping_and_info(gallery: Running) -> None:
    assert gallery.client.ping()["pong"] is True
    info = gallery.client.info()
    assert info["target"]["kind"] == "folder" and info["entries"] == 0
    assert info["dedup"]["phash_threshold"] == 64


def test_added_then_idempotent(gallery: Running) -> None:
    data = T.encode(T.photo(1, (1200, 800)))
    first = gallery.client.ingest("reddit:t3_abc:0", META, data)
    assert first.status == "added" and isinstance(first.gallery_id, int)
    again = gallery.client.ingest("reddit:t3_abc:0", META, data)
    assert (again.status, again.gallery_id, again.reason) == ("duplicate", first.gallery_id, "key")
    other_key = gallery.client.ingest("imgur:XyZ", {}, data)
    assert (other_key.status, other_key.gallery_id, other_key.reason) == ("duplicate", first.gallery_id, "sha256")
    # The alias is remembered: the second key answers the same way by key now.
    assert gallery.client.ingest("imgur:XyZ", {}, data).reason == "key"
    entries = rows(gallery.root)
    assert len(entries) == 1 and entries[0]["state"] == "complete"
    e = entries[0]
    assert (e["title"], e["subreddit"], e["author"]) == ("Lake at dawn", "EarthPorn", "someone")
    assert json.loads(e["scores"]) == {"gmm": -12.5, "watermark": 0.03}
    assert len(e["phash"]) == 144
    original = gallery.root / "images" / f"{first.gallery_id}.jpg"
    assert original.read_bytes() == data
    with Image.open(gallery.root / "thumbs" / f"{first.gallery_id}.jpg") as thumb:
        assert max(thumb.size) == 750 and thumb.size[0] > thumb.size[1]
    page = (gallery.root / "index.html").read_text()
    assert f'images/{first.gallery_id}.jpg' in page and "gmm -12.5" in page


def test_near_duplicates_over_the_wire(gallery: Running) -> None:
    img = T.photo(2, (900, 600))
    first = gallery.client.ingest("k:orig", {}, T.encode(img))
    cropped = gallery.client.ingest("k:crop", {}, T.encode(T.crop_fraction(img, left=0.02, top=0.01), quality=70))
    assert (cropped.status, cropped.gallery_id, cropped.reason) == ("duplicate", first.gallery_id, "crop")
    resized = gallery.client.ingest("k:small", {}, T.encode(img.resize((450, 300)), "PNG"))
    assert resized.status == "duplicate" and resized.reason == "phash"
    other = gallery.client.ingest("k:other", {}, T.encode(T.photo(3, (900, 600))))
    assert other.status == "added" and other.gallery_id != first.gallery_id
    assert len(rows(gallery.root)) == 2


def test_features_frame(gallery: Running, tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=512).astype(np.float32)
    r = gallery.client.ingest("f:1", {}, T.encode(T.photo(4)), features=feats)
    assert r.status == "added"
    stored = np.frombuffer(rows(gallery.root)[0]["features"], dtype="<f4")
    assert np.array_equal(stored, feats)
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(gallery.server.endpoint)
    try:
        header = {"v": 1, "op": "ingest", "id": "x", "key": "f:2", "meta": {}, "features_dim": 100}
        sock.send_multipart([json.dumps(header).encode(), T.encode(T.photo(5)), feats.tobytes()])
        assert sock.poll(20000)
        reply = json.loads(sock.recv())
        assert reply["ok"] is False and reply["error"]["code"] == "size_mismatch" and reply["id"] == "x"
        header["features_dim"] = 2
        sock.send_multipart([json.dumps(header).encode(), T.encode(T.photo(5)), np.array([1.0, np.nan], "<f4").tobytes()])
        assert sock.poll(20000)
        assert json.loads(sock.recv())["error"]["code"] == "bad_shape"
    finally:
        sock.close(0)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, code",
    [
        (b"not an image at all", "bad_image"),
        (b"GIF89a" + b"\0" * 100, "bad_image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, "bad_image"),  # JPEG magic, garbage body
        (_png_header_only(50000, 50000), "too_large"),
        (b"", "bad_image"),
    ],
)
def test_bad_images_are_refused(gallery: Running, data: bytes, code: str) -> None:
    with pytest.raises(IngestError) as err:
        gallery.client.ingest("bad:1", {}, data)
    assert err.value.code == code
    assert rows(gallery.root) == []
    assert gallery.client.ping()["pong"]  # the service is still there


def test_truncated_jpeg_refused(gallery: Running) -> None:
    data = T.encode(T.photo(6))
    with pytest.raises(IngestError) as err:
        gallery.client.ingest("bad:trunc", {}, data[: len(data) // 2])
    assert err.value.code == "bad_image"


def test_small_images_rejected(gallery: Running) -> None:
    r = gallery.client.ingest("tiny", {}, T.encode(T.photo(7, (40, 30))))
    assert (r.status, r.gallery_id, r.reason) == ("rejected", None, "too_small")
    assert rows(gallery.root) == []


@pytest.mark.parametrize(
    "meta",
    [
        {"title": 5},
        {"title": ["list"]},
        {"source_url": {"x": 1}},
        {"scores": {"gmm": "high"}},
        {"scores": {"gmm": True}},
        {"scores": [1, 2]},
        {"scores": {f"s{i}": 1.0 for i in range(100)}},
        "not an object",
        [1, 2, 3],
    ],
)
def test_wrong_types_in_meta_are_refused(gallery: Running, meta) -> None:
    with pytest.raises(IngestError) as err:
        gallery.client.ingest("m:1", meta, T.encode(T.photo(8)))
    assert err.value.code == "bad_meta"
    assert rows(gallery.root) == []


@pytest.mark.parametrize("key", ["", "x" * 300, "a\nb", "tab\there", "nul\x00"])
def test_bad_keys_are_refused(gallery: Running, key: str) -> None:
    with pytest.raises(IngestError) as err:
        gallery.client.ingest(key, {}, T.encode(T.photo(9)))
    assert err.value.code == "bad_header"


def test_hostile_metadata_is_neutralised(gallery: Running) -> None:
    hostile = {
        "title": "<script>alert(1)</script>" + "A" * 20_000,
        "author": "../../../../etc/passwd",
        "subreddit": "x\u202eevil\r\ninjected",
        "source_url": "javascript:alert(document.cookie)",
        "permalink": "https://example.com/" + "p" * 5000,
        "licence": "\"><img src=x onerror=alert(1)>",
        "unknown_field": {"deep": ["ignored"]},
    }
    key = "../../../../tmp/owned"
    r = gallery.client.ingest(key, hostile, T.encode(T.photo(10)))
    assert r.status == "added"
    e = rows(gallery.root)[0]
    assert len(e["title"]) == 300 and e["title"].startswith("<script>")
    assert e["source_url"] is None and e["permalink"] is None  # not http(s) / too long: dropped
    assert "\u202e" not in e["subreddit"] and "\n" not in e["subreddit"]
    assert e["key"] == key
    # Files are named by id only, inside the gallery.
    files = sorted(p.relative_to(gallery.root).as_posix() for p in gallery.root.rglob("*") if p.is_file())
    assert f"images/{r.gallery_id}.jpg" in files and f"thumbs/{r.gallery_id}.jpg" in files
    assert not any("passwd" in f or "owned" in f for f in files)
    assert not (Path("/tmp") / "owned").exists()
    page = (gallery.root / "index.html").read_text()
    assert "<script>" not in page and "javascript:" not in page
    assert "<img src=x" not in page  # the licence stays text inside an attribute
    assert "&lt;script&gt;" in page and "&quot;&gt;&lt;img src=x onerror" in page
    # A header over the 64 KiB cap is refused before it is parsed.
    with pytest.raises(IngestError) as err:
        gallery.client.ingest("huge", {"title": "A" * 100_000}, T.encode(T.photo(12)))
    assert err.value.code == "bad_header"


def test_protocol_errors(gallery: Running) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)  # DEALER: no empty delimiter frame
    sock.connect(gallery.server.endpoint)
    try:
        cases = [
            ([b"{not json"], "bad_header"),
            ([json.dumps({"v": 2, "op": "ping"}).encode()], "unsupported_version"),
            ([json.dumps({"v": 1, "op": "explode"}).encode()], "unknown_op"),
            ([json.dumps({"v": 1, "op": "ingest", "key": "k"}).encode()], "size_mismatch"),
            ([json.dumps({"v": 1, "op": "ingest", "key": "k"}).encode(), b"a", b"b", b"c"], "size_mismatch"),
        ]
        for frames, code in cases:
            sock.send_multipart(frames)
            assert sock.poll(20000)
            reply = json.loads(sock.recv())
            assert reply["ok"] is False and reply["error"]["code"] == code, (frames, reply)
        sock.send_multipart([json.dumps({"v": 1, "op": "ping", "id": "p1"}).encode()])
        assert sock.poll(20000)
        pong = json.loads(sock.recv())
        assert pong == {"v": 1, "id": "p1", "ok": True, "pong": True, "version": "0.1.0",
                        "pid": os.getpid(), "instance": gallery.server.config.instance}
    finally:
        sock.close(0)


def test_oversized_message_refused_by_libzmq(tmp_path: Path) -> None:
    run = Running(tmp_path / "g", limits=Limits(max_image_bytes=100_000))
    try:
        run.client.timeout = 2
        with pytest.raises(IngestError) as err:
            run.client.ingest("big:0", {}, b"\xff\xd8\xff" + b"\0" * 90_000)
        assert err.value.code == "bad_image"
        # Over MAXMSGSIZE: libzmq drops the connection; the client gives up, the server lives.
        with pytest.raises(GalleryUnavailable):
            run.client.ingest("big:1", {}, b"\0" * 300_000)
        assert run.client.ping()["pong"]
    finally:
        run.stop()


def test_client_gives_up_when_nobody_answers() -> None:
    with IngestClient("tcp://127.0.0.1:9", timeout=0.2, retries=2) as client:
        with pytest.raises(GalleryUnavailable, match="3 attempt"):
            client.ping()


def test_restart_reloads_index(tmp_path: Path) -> None:
    img = T.photo(11)
    run = Running(tmp_path / "g")
    first = run.client.ingest("a", {}, T.encode(img))
    run.stop()
    run = Running(tmp_path / "g")
    try:
        again = run.client.ingest("b", {}, T.encode(T.crop_fraction(img, right=0.03)))
        assert (again.status, again.gallery_id) == ("duplicate", first.gallery_id)
    finally:
        run.stop()


def test_curve_encrypted_socket(tmp_path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    target = FolderTarget(tmp_path / "g")
    ingester = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ingester, ServerConfig(bind="tcp://127.0.0.1:*", curve_secret=server_secret)).start()
    try:
        with IngestClient(server.endpoint, timeout=10, retries=0, curve=(server_public, client_public, client_secret)) as c:
            assert c.ingest("curve:1", {}, T.encode(T.photo(13))).status == "added"
            assert c.info()["curve"] == {"enabled": True, "allow_list": False}
        with IngestClient(server.endpoint, timeout=0.5, retries=0) as plain:  # no CURVE: no handshake, no answer
            with pytest.raises(GalleryUnavailable):
                plain.ping()
    finally:
        server.close()
        ingester.close()


def test_metrics_count_ingests(gallery: Running) -> None:
    from prometheus_client import REGISTRY

    def count(status: str) -> float:
        return REGISTRY.get_sample_value("gallery_bridge_ingests_total", {"status": status}) or 0.0

    before = count("added"), count("duplicate")
    data = T.encode(T.photo(14))
    gallery.client.ingest("m:1", {}, data)
    gallery.client.ingest("m:1", {}, data)
    assert (count("added"), count("duplicate")) == (before[0] + 1, before[1] + 1)


def test_phone_mpo_jpeg_is_a_photo_and_animated_png_is_not(gallery: Running) -> None:
    import io

    first, second = T.photo(15), T.photo(16)
    buf = io.BytesIO()
    first.save(buf, "MPO", save_all=True, append_images=[second])  # JPEG + a second picture, like phones write
    r = gallery.client.ingest("mpo", {}, buf.getvalue())
    assert r.status == "added"
    assert (gallery.root / "images" / f"{r.gallery_id}.jpg").read_bytes() == buf.getvalue()
    buf = io.BytesIO()
    T.photo(17).save(buf, "PNG", save_all=True, append_images=[T.photo(18)])  # APNG
    with pytest.raises(IngestError) as err:
        gallery.client.ingest("apng", {}, buf.getvalue())
    assert err.value.code == "bad_image" and "animated" in err.value.message


def test_clip_near_duplicates_survive_a_restart(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    feats = rng.normal(size=512).astype(np.float32)
    near = feats + 0.05 * rng.normal(size=512).astype(np.float32)
    cfg = DedupConfig(clip_threshold=0.95)
    run = Running(tmp_path / "g", dedup=cfg)
    try:
        first = run.client.ingest("c:1", {}, T.encode(T.photo(20)), features=feats)
        assert first.status == "added"
        # A different picture whose CLIP features say "same content".
        dup = run.client.ingest("c:2", {}, T.encode(T.photo(21)), features=near)
        assert (dup.status, dup.gallery_id, dup.reason) == ("duplicate", first.gallery_id, "clip")
    finally:
        run.stop()
    run = Running(tmp_path / "g", dedup=cfg)
    try:
        again = run.client.ingest("c:3", {}, T.encode(T.photo(22)), features=near)
        assert (again.status, again.reason) == ("duplicate", "clip")
        other = run.client.ingest("c:4", {}, T.encode(T.photo(23)), features=rng.normal(size=512).astype(np.float32))
        assert other.status == "added"
    finally:
        run.stop()
