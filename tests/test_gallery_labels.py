"""The ``label`` op through a real server on 127.0.0.1, and ``labels export`` feeding ``anti-sus tune``.

good on a review item ingests it exactly once; bad on a gallery image removes it (files, page) and blocks
its hashes, so the same image or a near copy is refused from then on, across restarts; the last label wins.
"""
from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from gallery_bridge import labels, reviews
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.cli import main as gb_main
from gallery_bridge.client import GalleryUnavailable, IngestClient, IngestError
from gallery_bridge.ingest import Ingester
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from tests import gallery_helpers as T

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parent.parent
DIM = 32  # the tiny models' CLIP dimension


def jpeg(seed: int, size: tuple[int, int] = (512, 384), quality: int = 90) -> bytes:
    return T.encode(T.photo(seed, size=size), quality=quality)


def feats(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


class Gallery:
    """A folder gallery served by an in-process server bound to 127.0.0.1; restartable."""

    def __init__(self, root: Path, **config) -> None:
        self.root, self.config = root, config
        self.start()

    def start(self) -> None:
        target = FolderTarget(self.root)
        self.ingester = Ingester(Catalogue(target.catalogue_path), target)
        self.server = Server(self.ingester, ServerConfig(bind="tcp://127.0.0.1:*", **self.config)).start()
        self.client = IngestClient(self.server.endpoint, timeout=30, retries=0)

    def stop(self) -> None:
        self.client.close()
        self.server.close()
        self.ingester.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"{(self.root / 'catalogue.sqlite').resolve().as_uri()}?mode=ro", uri=True)

    def entries(self) -> int:
        with self.db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM entries WHERE state='complete'").fetchone()[0])


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[Gallery]:
    g = Gallery(tmp_path / "gallery")
    yield g
    g.stop()


def test_good_on_a_review_item_ingests_it_exactly_once(gallery: Gallery) -> None:
    c = gallery.client
    data, f = jpeg(1), feats(1)
    rid = c.review("reddit:t3_r:0", {"title": "wrongly rejected", "source": "reddit"}, data, {"gmm": -700.0}, "gmm", f)["review_id"]
    first = c.label(f"r{rid}", "good")
    assert first["status"] == "labelled" and first["ingest"] == "added" and isinstance(first["gallery_id"], int)
    again = c.label(f"r{rid}", "good")  # a resend, or a second click
    assert again["ingest"] == "duplicate" and again["gallery_id"] == first["gallery_id"]
    assert gallery.entries() == 1
    with gallery.db() as conn:
        row = conn.execute("SELECT title, source, scores, features FROM entries").fetchone()
        assert row[0] == "wrongly rejected" and row[1] == "reddit" and '"gmm": -700.0' in row[2]
        assert np.array_equal(np.frombuffer(row[3], "<f4"), f)  # the review's features came along
        lab = conn.execute("SELECT key, label, features, sha256 FROM labels WHERE item=?", (f"r{rid}",)).fetchone()
        assert lab[0] == "reddit:t3_r:0" and lab[1] == "good" and np.array_equal(np.frombuffer(lab[2], "<f4"), f)
        assert labels.label_of(conn, f"r{rid}") == "good" and labels.label_of(conn, "g1") is None
        item = reviews.get_item(conn, rid)
        assert item["label"] == "good" and item["gallery_id"] == first["gallery_id"]
    # The original is in the gallery and on its page.
    assert (gallery.root / "images" / f"{first['gallery_id']}.jpg").read_bytes() == data
    assert f'id="e{first["gallery_id"]}"' in (gallery.root / "index.html").read_text()
    # The crawler delivering the same image later is a duplicate, not a second entry.
    assert c.ingest("reddit:t3_r:0", {}, data).status == "duplicate"
    assert gallery.entries() == 1


def test_bad_on_a_gallery_image_removes_it_and_blocks_it_and_near_copies(gallery: Gallery) -> None:
    c = gallery.client
    photo = T.photo(5, size=(800, 600))
    data = T.encode(photo)
    keep = c.ingest("site:keep", {}, jpeg(6)).gallery_id
    gid = c.ingest("site:bad", {"title": "a watermarked one"}, data, feats(5)).gallery_id
    assert gallery.entries() == 2 and (gallery.root / "images" / f"{gid}.jpg").is_file()
    reply = c.label(f"g{gid}", "bad")
    assert reply["removed"] is True and reply["gallery_id"] is None
    assert gallery.entries() == 1
    assert not (gallery.root / "images" / f"{gid}.jpg").exists() and not (gallery.root / "thumbs" / f"{gid}.jpg").exists()
    page = (gallery.root / "index.html").read_text()
    assert f'id="e{gid}"' not in page and f'id="e{keep}"' in page
    # The same bytes under a new key, a re-encoded smaller copy, and a mirrored one: all refused.
    out = c.ingest("other:same", {}, data)
    assert (out.status, out.reason) == ("rejected", "blocked")
    small = io.BytesIO()
    photo.resize((640, 480)).save(small, "JPEG", quality=70)
    for key, copy in (("other:small", small.getvalue()), ("other:mirror", T.encode(photo.transpose(Image.FLIP_LEFT_RIGHT)))):
        out = c.ingest(key, {}, copy)
        assert (out.status, out.reason) == ("rejected", "blocked"), key
    assert c.ingest("other:new", {}, jpeg(7)).status == "added"  # other images still come in
    # The block list is durable: a restarted service still refuses it.
    gallery.restart()
    assert gallery.client.ingest("again:small", {}, small.getvalue()).reason == "blocked"
    assert gallery.client.ingest("again:same", {}, data).reason == "blocked"
    with gallery.db() as conn:
        assert labels.label_of(conn, f"g{gid}") == "bad"
        assert conn.execute("SELECT COUNT(*) FROM blocked").fetchone()[0] == 1


def test_the_last_label_wins(gallery: Gallery) -> None:
    c = gallery.client
    data = jpeg(8)
    rid = c.review("k:flip", {}, data, {"gmm": -1.0}, "gmm", feats(8))["review_id"]
    gid = c.label(f"r{rid}", "good")["gallery_id"]
    assert gallery.entries() == 1
    # Back to bad: the entry the good label added leaves the gallery and is blocked.
    assert c.label(f"r{rid}", "bad")["removed"] is True
    assert gallery.entries() == 0 and c.ingest("k:other", {}, data).reason == "blocked"
    with gallery.db() as conn:
        assert reviews.get_item(conn, rid)["gallery_id"] is None  # no longer points into the gallery
    # And good again: in once more, the block lifted.
    again = c.label(f"r{rid}", "good")
    assert again["ingest"] == "added" and gallery.entries() == 1
    # A gallery image labelled bad then good comes back from the kept copy, no longer blocked.
    g2 = c.ingest("k:g2", {}, jpeg(9), feats(9)).gallery_id
    c.label(f"g{g2}", "bad")
    assert gallery.entries() == 1
    back = c.label(f"g{g2}", "good")
    assert back["ingest"] == "added" and gallery.entries() == 2
    assert c.ingest("k:g2-again", {}, jpeg(9)).status == "duplicate"
    with gallery.db() as conn:
        assert labels.label_of(conn, f"r{rid}") == "good" and labels.label_of(conn, f"g{g2}") == "good"
        assert conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 2  # one row per item
    assert gid is not None


@pytest.mark.parametrize("item, label", [("x1", "good"), ("g0", "good"), ("g1", "meh"), ("r999", "good"),
                                         ("g999", "bad"), (12, "good"), ("g1; drop table", "bad")])
def test_malformed_or_unknown_labels_are_refused(gallery: Gallery, item, label) -> None:
    gallery.client.ingest("k:1", {}, jpeg(11))
    with pytest.raises(IngestError) as err:
        gallery.client.request({"op": "label", "item": item, "label": label})
    assert err.value.code == "bad_header"
    assert gallery.entries() == 1 and gallery.client.ping()["pong"] is True


# ---- export -> anti-sus tune ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The torch-free tiny model directory (models/tiny_onnx.py): CLIP (32-d), GMM, watermark."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "models"
    run = subprocess.run([sys.executable, "-m", "models.tiny_onnx", "--out", str(out), "--images", "48"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return out


def test_labels_export_feeds_anti_sus_tune(tmp_path: Path, onnx_models: Path) -> None:
    g = Gallery(tmp_path / "gallery", label_copies=100)
    try:
        c = g.client
        good_r = [c.review(f"rev:{i}", {}, jpeg(30 + i), {"gmm": -5.0}, "gmm", feats(30 + i))["review_id"] for i in range(3)]
        bad_r = c.review("rev:bad", {}, jpeg(40), {"watermark": 0.99}, "watermark", feats(40))["review_id"]
        gallery_ids = [c.ingest(f"site:{i}", {}, jpeg(50 + i), feats(50 + i)).gallery_id for i in range(3)]
        for rid in good_r:
            assert c.label(f"r{rid}", "good")["ingest"] == "added"
        c.label(f"r{bad_r}", "bad")
        c.label(f"g{gallery_ids[0]}", "good")
        c.label(f"g{gallery_ids[1]}", "bad")  # removed from the gallery: exported from the kept copy
        c.label(f"g{gallery_ids[2]}", "bad")
        assert not (g.root / "images" / f"{gallery_ids[1]}.jpg").exists()
        # The CLI reads the catalogue read-only, next to the running service.
        out = tmp_path / "export"
        assert gb_main(["labels", "export", str(out), "--gallery", str(g.root)]) == 0
    finally:
        g.stop()
    good, bad = sorted((out / "good").iterdir()), sorted((out / "bad").iterdir())
    assert len(good) == 4 and len(bad) == 3
    assert any(p.name.startswith("site_1-") for p in bad)  # named by key (made safe), removed image included
    with np.load(out / "labels.npz", allow_pickle=False) as z:
        assert z["features"].dtype == np.float32 and z["features"].shape == (7, DIM)
        assert z["labels"].dtype == np.int8 and sorted(z["labels"].tolist()) == [0, 0, 0, 1, 1, 1, 1]
        assert z["keys"].dtype.kind == "U" and set(z["keys"].tolist()) == {
            "rev:0", "rev:1", "rev:2", "rev:bad", "site:0", "site:1", "site:2"}
        i = z["keys"].tolist().index("site:1")
        assert z["labels"][i] == 0 and np.allclose(z["features"][i], feats(51))
        assert (out / z["files"][i]).is_file()
    # anti-sus tune reads the two folders as they are.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTI_SUS_")}
    run = subprocess.run([sys.executable, "-m", "anti_sus", "tune", "--models", str(onnx_models), "--good", str(out / "good"),
                          "--bad", str(out / "bad"), "--plot", str(tmp_path / "tune.png"), "--json", str(tmp_path / "tune.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "suggested threshold" in run.stdout and '"n": 4' in (tmp_path / "tune.json").read_text()


def test_labels_export_refuses_a_used_folder_and_a_missing_gallery(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    g = Gallery(tmp_path / "gallery")
    g.stop()
    assert gb_main(["labels", "export", str(used), "--gallery", str(tmp_path / "gallery")]) == 2
    assert gb_main(["labels", "export", str(tmp_path / "new"), "--gallery", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not an empty folder" in err[0] and "no gallery catalogue" in err[1]
    assert "Traceback" not in "".join(err)


def test_kept_copies_are_capped_and_an_image_whose_copy_is_gone_is_counted_missing(tmp_path: Path) -> None:
    g = Gallery(tmp_path / "gallery", label_copies=1)
    try:
        ids = [g.client.ingest(f"site:{i}", {}, jpeg(60 + i), feats(60 + i)).gallery_id for i in range(2)]
        for gid in ids:
            assert g.client.label(f"g{gid}", "bad")["removed"] is True
    finally:
        g.stop()
    assert [p.name for p in (g.root / ".labels").iterdir() if p.is_file()] == [f"g{ids[1]}.jpg"]
    out = tmp_path / "export"
    assert gb_main(["labels", "export", str(out), "--gallery", str(g.root / "catalogue.sqlite")]) == 0
    assert len(list((out / "bad").iterdir())) == 1
    with np.load(out / "labels.npz", allow_pickle=False) as z:
        # Both labels keep their row and features; the one without an image says so with an empty path.
        assert z["features"].shape == (2, DIM) and sorted(z["files"].tolist())[0] == ""


def test_a_crash_after_removing_a_bad_entry_leaves_no_orphan_files_after_restart(tmp_path: Path) -> None:
    import socket

    from gallery_bridge.ingest import CRASH_ENV

    root = tmp_path / "gallery"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = Gallery(root)
    try:
        gid = g.client.ingest("site:doomed", {}, jpeg(70)).gallery_id
        keep = g.client.ingest("site:keep", {}, jpeg(71)).gallery_id
    finally:
        g.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GALLERY_BRIDGE_")}
    argv = [sys.executable, "-m", "gallery_bridge", "serve", "--bind", f"tcp://127.0.0.1:{port}", "--target", f"folder:{root}"]
    proc = subprocess.Popen(argv, cwd=REPO, env={**env, CRASH_ENV: "label_removed"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=1, retries=30) as c:
            c.ping()
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=5, retries=0) as c:
            with pytest.raises(GalleryUnavailable):
                c.label(f"g{gid}", "bad")  # no reply: the process killed itself
        assert proc.wait(timeout=60) == -9
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # Committed: the row is gone, but the crash left the files and a page that still shows it.
    assert (root / "images" / f"{gid}.jpg").exists() and f'id="e{gid}"' in (root / "index.html").read_text()
    g = Gallery(root)  # the restart's recovery pass
    try:
        assert not (root / "images" / f"{gid}.jpg").exists() and not (root / "thumbs" / f"{gid}.jpg").exists()
        page = (root / "index.html").read_text()
        assert f'id="e{gid}"' not in page and f'id="e{keep}"' in page
        assert g.client.ingest("other:doomed", {}, jpeg(70)).reason == "blocked"
        with g.db() as conn:
            assert labels.label_of(conn, f"g{gid}") == "bad"
        assert [p.name for p in (root / ".labels").iterdir() if p.is_file()] == [f"g{gid}.jpg"]
    finally:
        g.stop()


def test_export_counts_an_image_once_with_the_label_given_last(tmp_path: Path) -> None:
    """A review item labelled good and the entry it became share a key: the later label speaks for the image."""
    g = Gallery(tmp_path / "gallery")
    try:
        rid = g.client.review("k:shared", {}, jpeg(80), {"gmm": -3.0}, "gmm", feats(80))["review_id"]
        gid = g.client.label(f"r{rid}", "good")["gallery_id"]
        other = g.client.ingest("k:other", {}, jpeg(81), feats(81)).gallery_id
        g.client.label(f"g{other}", "good")
        g.client.label(f"g{gid}", "bad")  # within the same second as the good label
        with g.db() as conn:
            assert reviews.get_item(conn, rid)["gallery_id"] is None  # its entry left the gallery
        assert gb_main(["labels", "export", str(tmp_path / "one"), "--gallery", str(g.root)]) == 0
        g.client.label(f"r{rid}", "good")  # and good again: in once more, and the export follows
        assert gb_main(["labels", "export", str(tmp_path / "two"), "--gallery", str(g.root)]) == 0
    finally:
        g.stop()
    for name, shared in (("one", 0), ("two", 1)):
        with np.load(tmp_path / name / "labels.npz", allow_pickle=False) as z:
            keys = z["keys"].tolist()
            assert sorted(keys) == ["k:other", "k:shared"], name
            assert z["labels"][keys.index("k:shared")] == shared, name
        assert len(list((tmp_path / name / "good").iterdir())) == 1 + shared
        assert len(list((tmp_path / name / "bad").iterdir())) == 1 - shared


def test_a_label_on_an_image_sent_without_features_exports_its_file_but_no_row(gallery: Gallery, tmp_path: Path) -> None:
    c = gallery.client
    plain = c.ingest("k:plain", {}, jpeg(85)).gallery_id  # no CLIP features came with it
    withf = c.ingest("k:feats", {}, jpeg(86), feats(86)).gallery_id
    c.label(f"g{plain}", "good")
    c.label(f"g{withf}", "bad")
    assert gb_main(["labels", "export", str(tmp_path / "out"), "--gallery", str(gallery.root)]) == 0
    assert len(list((tmp_path / "out" / "good").iterdir())) == 1 and len(list((tmp_path / "out" / "bad").iterdir())) == 1
    with np.load(tmp_path / "out" / "labels.npz", allow_pickle=False) as z:
        assert z["keys"].tolist() == ["k:feats"] and z["labels"].tolist() == [0]
