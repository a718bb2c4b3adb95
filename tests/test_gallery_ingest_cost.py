"""What one ingest costs: a bounded number of fsyncs, a page not rebuilt from the catalogue, no redundant pixel passes or lookups.

The durability side of the same code (kill -9 at every step, then redelivery)
is tests/test_gallery_crash.py; these tests hold the cost side.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image, ImageOps

from gallery_bridge import page
from gallery_bridge.catalogue import Catalogue
from photocore.blas import BLAS_THREAD_VARS, single_threaded_blas
from gallery_bridge.client import IngestClient
from gallery_bridge.dedup import fingerprint
from gallery_bridge.ingest import Ingester
from gallery_bridge.labels import Labeller
from gallery_bridge.reviews import ReviewStore
from gallery_bridge.server import Server, ServerConfig
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.thumbnails import THUMB_QUALITY, make_thumbnail
from gallery_bridge.validate import Limits, Meta, check_image
from stack.emulator.images import picture
from tests import gallery_helpers as T
from tests.gallery_process import REPO, free_port


@pytest.fixture
def ingester(tmp_path: Path) -> Iterator[Ingester]:
    target = FolderTarget(tmp_path / "g", page_limit=3)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    yield ing
    ing.close()


def _add(ing: Ingester, seed: int, title: str | None = None) -> int:
    data = T.encode(T.photo(seed, (640, 480)))
    out = ing.ingest(f"k:{seed}", Meta(title=title or f"photo {seed}", source_url="https://example.org/a.jpg"),
                     check_image(data, Limits()))
    assert out.status == "added", out
    assert out.gallery_id is not None
    return out.gallery_id


def _full_render(ing: Ingester) -> str:
    target = ing.target
    assert isinstance(target, FolderTarget)
    return page.render(ing.catalogue.recent(target.page_limit), ing.catalogue.count(), title=target.root.resolve().name)


def test_fsyncs_per_ingest_are_bounded(ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Original and thumbnail: file + directory each (4); the page, derived data rebuilt at every start, none."""
    _add(ingester, 1)  # warm: first-use work stays out of the count
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    gid = _add(ingester, 2)
    assert len(calls) == 4
    root = ingester.target.root  # type: ignore[attr-defined]
    # Everything the acknowledgement promises is in place, the page included.
    assert (root / "images" / f"{gid}.jpg").is_file() and (root / "thumbs" / f"{gid}.jpg").is_file()
    assert f"thumbs/{gid}.jpg" in (root / "index.html").read_text()


def test_page_is_updated_per_ingest_without_reading_the_catalogue(ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ingest renders only the new figure, yet the page equals a full render from the catalogue every time."""
    recent_calls = []
    real_recent = Catalogue.recent
    monkeypatch.setattr(Catalogue, "recent", lambda self, *a, **k: (recent_calls.append(a), real_recent(self, *a, **k))[1])
    count_calls = []
    real_count = Catalogue.count
    monkeypatch.setattr(Catalogue, "count", lambda self: (count_calls.append(1), real_count(self))[1])
    root = ingester.target.root  # type: ignore[attr-defined]
    for n, seed in enumerate(range(10, 15), start=1):  # past page_limit=3: the oldest figures drop off
        gid = _add(ingester, seed, title=f"t<{seed}>")
        html = (root / "index.html").read_text()
        assert f'id="e{gid}"' in html and f"t&lt;{seed}&gt;" in html
        monkeypatch.setattr(Catalogue, "recent", real_recent)
        monkeypatch.setattr(Catalogue, "count", real_count)
        assert html == _full_render(ingester)
        monkeypatch.setattr(Catalogue, "recent", lambda self, *a, **k: (recent_calls.append(a), real_recent(self, *a, **k))[1])
        monkeypatch.setattr(Catalogue, "count", lambda self: (count_calls.append(1), real_count(self))[1])
    assert html.count("<figure") == 3 and "Showing the newest 3 of 5" in html
    assert recent_calls == [] and count_calls == []
    assert ingester.target.page_writes == {"full": 1, "incremental": 5}  # type: ignore[attr-defined]  # the 1: at start


def test_a_removal_rebuilds_the_page_and_later_ingests_stay_right(ingester: Ingester) -> None:
    """Labelling an entry bad takes it off the page (a full rebuild); the next ingest is incremental again and correct."""
    ids = [_add(ingester, seed) for seed in (20, 21, 22, 23)]
    labeller = Labeller(ingester, ReviewStore(ingester.catalogue))
    full = ingester.target.page_writes["full"]  # type: ignore[attr-defined]
    labeller.label(f"g{ids[-1]}", "bad")  # the newest: the page must fall back to the older ones
    assert ingester.target.page_writes["full"] == full + 1  # type: ignore[attr-defined]
    root = ingester.target.root  # type: ignore[attr-defined]
    html = (root / "index.html").read_text()
    assert f'id="e{ids[-1]}"' not in html and f'id="e{ids[0]}"' in html
    assert html == _full_render(ingester)
    new = _add(ingester, 24)
    html = (root / "index.html").read_text()
    assert f'id="e{new}"' in html and html == _full_render(ingester)


def test_restart_rewrites_the_page_from_the_catalogue(tmp_path: Path) -> None:
    """The page is not fsynced: a start must rebuild it, so a lost or stale page never outlives a restart."""
    target = FolderTarget(tmp_path / "g", page_limit=3)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    gid = _add(ing, 30)
    ing.close()
    (tmp_path / "g" / "index.html").write_text("")  # what a power cut may leave of an un-fsynced page
    target = FolderTarget(tmp_path / "g", page_limit=3)
    ing = Ingester(Catalogue(target.catalogue_path), target)
    try:
        assert f'id="e{gid}"' in (tmp_path / "g" / "index.html").read_text()
    finally:
        ing.close()


def _jpeg(orientation: int = 1) -> bytes:
    """A 3000x2000 JPEG (decoded at 1/4: 750x500, the thumbnail's size), with an EXIF orientation."""
    return picture(3000, 2000, "jpeg", seed=5, orientation=orientation)


def test_an_upright_photo_is_never_copied_whole(ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashes and thumbnail read the decoded pixels in place: no full-size copy, no exif_transpose pass."""
    checked = check_image(_jpeg(), Limits())
    copies: list[tuple[int, int]] = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: (copies.append(self.size), real_copy(self))[1])
    transposes: list[int] = []
    real_transpose = ImageOps.exif_transpose
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda im, **kw: (transposes.append(1), real_transpose(im, **kw))[1])
    assert ingester.ingest("k:upright", Meta(), checked).status == "added"
    assert checked.image.size == (750, 500)
    assert [s for s in copies if s == checked.image.size] == [] and transposes == []


def test_a_rotated_photo_is_turned_once_for_hashes_and_thumbnail(ingester: Ingester, monkeypatch: pytest.MonkeyPatch) -> None:
    """EXIF orientation 6: one transpose shared by both, with the same results as turning it for each."""
    checked = check_image(_jpeg(6), Limits())
    reference = ImageOps.exif_transpose(checked.image)
    transposes: list[int] = []
    real_transpose = ImageOps.exif_transpose
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda im, **kw: (transposes.append(1), real_transpose(im, **kw))[1])
    out = ingester.ingest("k:rotated", Meta(), checked)
    assert out.status == "added" and len(transposes) == 1
    monkeypatch.setattr(ImageOps, "exif_transpose", real_transpose)
    row = ingester.catalogue.get(out.gallery_id)
    assert row is not None and row["phash"] == fingerprint(reference).phash_hex
    assert bytes(row["signature"]) == fingerprint(reference).signature
    thumb = Image.open(ingester.target.thumb_path(out.gallery_id))  # type: ignore[attr-defined]
    assert thumb.size == (500, 750)
    assert np.array_equal(np.asarray(thumb), np.asarray(Image.open(io.BytesIO(make_thumbnail(reference)))))


def test_thumbnail_has_the_pixels_of_an_optimised_encode_for_less_work() -> None:
    """Standard Huffman tables: the same decoded pixels as ``optimize=True``, without its second pass."""
    image = check_image(_jpeg(), Limits()).image
    thumb = make_thumbnail(image)
    optimised = io.BytesIO()
    image.save(optimised, "JPEG", quality=THUMB_QUALITY, optimize=True)
    assert thumb != optimised.getvalue()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(thumb))), np.asarray(Image.open(optimised)))
    assert len(thumb) < 1.25 * len(optimised.getvalue())


def test_the_service_looks_a_new_image_up_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The redelivery check (key, sha256, block list) runs once per ingest, not again inside Ingester.ingest."""
    target = FolderTarget(tmp_path / "g")
    ing = Ingester(Catalogue(target.catalogue_path), target)
    server = Server(ing, ServerConfig(bind="tcp://127.0.0.1:*")).start()
    lookups: list[str] = []
    real_by_key = Catalogue.by_key
    monkeypatch.setattr(Catalogue, "by_key", lambda self, key: (lookups.append(key), real_by_key(self, key))[1])
    try:
        with IngestClient(server.endpoint, timeout=20, retries=0) as client:
            first = client.ingest("k:once", {}, _jpeg())
            assert first.status == "added" and lookups == ["k:once"]
            again = client.ingest("k:once", {}, _jpeg())
            assert (again.status, again.gallery_id) == ("duplicate", first.gallery_id)
            other = client.ingest("k:other", {}, _jpeg())  # same bytes, new key: the sha256 answer
            assert (other.status, other.gallery_id) == ("duplicate", first.gallery_id)
    finally:
        server.close()
        ing.close()


def test_blas_threads_default_to_one_unless_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve sets OPENBLAS_NUM_THREADS=1 before numpy loads, and never overrides a count the user chose."""
    monkeypatch.delitem(sys.modules, "numpy")  # as in a fresh `gallery-bridge serve`, before any import of it
    env: dict[str, str] = {}
    assert single_threaded_blas(env) and env == {"OPENBLAS_NUM_THREADS": "1"}
    for name in BLAS_THREAD_VARS:
        chosen = {name: "4"}
        assert not single_threaded_blas(chosen) and chosen == {name: "4"}


def _serve_threads(root: Path, blas: str | None) -> int:
    """Threads of an idle `gallery-bridge serve` (after its first ping), with OPENBLAS_NUM_THREADS as given."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS and not k.startswith("GALLERY_BRIDGE_")}
    if blas is not None:
        env["OPENBLAS_NUM_THREADS"] = blas
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gallery_bridge", "serve", "--bind", f"tcp://127.0.0.1:{port}",
                             "--target", f"folder:{root}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with IngestClient(f"tcp://127.0.0.1:{port}", timeout=0.5, retries=60) as client:
            client.ping()
        return len(os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/task").is_dir(),
                    reason="OpenBLAS starts workers only with 2+ cores; thread count read from /proc")
def test_serve_starts_no_blas_worker_threads(tmp_path: Path) -> None:
    """By default serve has as many threads as with OPENBLAS_NUM_THREADS=1, fewer than with 2."""
    default = _serve_threads(tmp_path / "a", None)
    assert default == _serve_threads(tmp_path / "b", "1")
    assert default < _serve_threads(tmp_path / "c", "2")
