"""Ingest decodes once, at reduced size: counts, tolerances against a full decode, hostile files.

The reduced decode (JPEG draft / ``Image.reduce``) must not loosen validation,
must keep the dedup contract (hashes within a few bits of a full decode's, old
catalogue entries still matched) and must give the same thumbnail within a
grey level or so.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from gallery_bridge import dedup as D
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.ingest import Ingester
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.thumbnails import THUMB_SIDE, make_thumbnail
from gallery_bridge.validate import (WORK_LONG_SIDE, WORK_SHORT_SIDE, CheckedImage, Limits, Meta, check_image,
                                     reduction)
from photocore.protocol import ProtocolError
from tests import gallery_helpers as T

BIG = (3000, 2000)

# Documented tolerances (docs/gallery_bridge.md, dedup/fingerprint.py): measured <= 12, 2, 1 and 0.5-0.7.
PHASH_BITS = 16
COARSE_BITS = 2
SIGNATURE_LEVELS = 2
THUMB_MEAN_LEVELS = 1.5


def _bits(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits((a ^ b).view(np.uint8)).sum())


def _full_decode(data: bytes) -> Image.Image:
    """What check_image did before: every pixel at full size."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def big_jpegs() -> list[bytes]:
    return [T.encode(T.photo(900 + s, BIG), quality=92) for s in range(2)]


def _ingester(root: Path) -> Ingester:
    target = FolderTarget(root)
    return Ingester(Catalogue(target.catalogue_path), target)


def test_work_sizes_cover_the_thumbnail_and_signature() -> None:
    assert WORK_LONG_SIDE >= THUMB_SIDE and WORK_SHORT_SIDE >= 4 * D.SIG_SIDE
    assert reduction(3000, 2000, steps=(1, 2, 4, 8)) == 4
    assert reduction(2000, 1500, steps=(1, 2, 4, 8)) == 2
    assert reduction(12000, 8000, steps=(1, 2, 4, 8)) == 8
    assert reduction(4500, 3000) == 6 and reduction(1400, 900) == 1 and reduction(700, 500) == 1
    assert reduction(20000, 500) == 1  # a panorama keeps its short side


def test_one_reduced_decode_per_ingest(tmp_path: Path, big_jpegs: list[bytes], monkeypatch) -> None:
    """One Image.open and one pixel decode serve validation, hashes and thumbnail, at 1/4 scale."""
    opens: list[bytes] = []
    decoded: list[tuple[int, int]] = []
    real_open, real_load = Image.open, ImageFile.ImageFile.load

    def counting_open(fp, *a, **kw):
        opens.append(b"")
        return real_open(fp, *a, **kw)

    def counting_load(self):
        pending = bool(self.tile)  # load() without tiles left decodes nothing
        out = real_load(self)
        if pending:
            decoded.append(self.size)
        return out

    ing = _ingester(tmp_path / "g")
    try:
        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
        data = big_jpegs[0]
        assert ing.known("k:1", data) is None
        out = ing.ingest("k:1", Meta(), check_image(data, Limits()))
        monkeypatch.undo()
        assert out.status == "added"
        assert len(opens) == 1
        assert decoded == [(BIG[0] // 4, BIG[1] // 4)]  # DCT-scaled, not 3000x2000
        row = ing.catalogue.db.execute("SELECT width, height FROM entries").fetchone()
        assert (row["width"], row["height"]) == BIG  # the file's real size is what is recorded
        with Image.open(ing.target.thumb_path(1)) as thumb:
            assert thumb.size == (THUMB_SIDE, THUMB_SIDE * 2 // 3)
    finally:
        ing.close()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_hashes_and_thumbnail_match_a_full_decode(fmt: str, big_jpegs: list[bytes]) -> None:
    from stack.emulator.images import picture

    # The emulator's smooth pictures drift most (12 bits measured for seed 3).
    payloads = [*big_jpegs, picture(*BIG, "jpeg", 3)] if fmt == "JPEG" else [T.encode(T.photo(910, (3200, 2100)), "PNG")]
    for data in payloads:
        checked = check_image(data, Limits())
        full = _full_decode(data)
        assert max(checked.image.size) < max(full.size)  # the reduced path was taken
        assert (checked.width, checked.height) == full.size
        a, b = D.fingerprint(full), D.fingerprint(checked.image)
        assert _bits(a.phash, b.phash) <= PHASH_BITS and _bits(a.phash_mirror, b.phash_mirror) <= PHASH_BITS
        assert _bits(a.coarse, b.coarse) <= COARSE_BITS
        sa, sb = (np.frombuffer(x.signature, np.uint8).astype(int) for x in (a, b))
        assert np.abs(sa - sb).max() <= SIGNATURE_LEVELS
        ta, tb = (np.asarray(Image.open(io.BytesIO(make_thumbnail(x)))).astype(int) for x in (full, checked.image))
        assert ta.shape == tb.shape
        assert np.abs(ta - tb).mean() <= THUMB_MEAN_LEVELS


def test_old_full_decode_entries_still_match(tmp_path: Path, big_jpegs: list[bytes]) -> None:
    """Entries hashed from a full decode (before this change) catch copies hashed from a reduced one."""
    data = big_jpegs[1]
    root = tmp_path / "g"
    ing = _ingester(root)
    try:
        old = CheckedImage(data=data, image=_full_decode(data), ext="jpg", width=BIG[0], height=BIG[1])
        first = ing.ingest("old:1", Meta(), old)
        assert first.status == "added"
    finally:
        ing.close()
    ing = _ingester(root)  # hashes now come from the catalogue, as after an upgrade
    try:
        src = _full_decode(data)
        copies = {
            "phash": T.encode(src, quality=70),
            "crop": T.encode(T.crop_fraction(src, left=0.02, top=0.01), quality=85),
        }
        for reason, copy in copies.items():
            out = ing.ingest(f"new:{reason}", Meta(), check_image(copy, Limits()))
            assert (out.status, out.gallery_id, out.reason) == ("duplicate", first.gallery_id, reason)
    finally:
        ing.close()


def test_exif_rotation_survives_the_draft_decode() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 3000x2000 is a portrait photo
    buf = io.BytesIO()
    T.photo(920, BIG).save(buf, "JPEG", quality=85, exif=exif)
    checked = check_image(buf.getvalue(), Limits())
    assert checked.image.size == (750, 500)
    with Image.open(io.BytesIO(make_thumbnail(checked.image))) as thumb:
        assert thumb.size == (500, 750)


def test_large_palette_and_16bit_png_are_reduced() -> None:
    pal = T.photo(921, (3200, 2000)).convert("P", palette=Image.Palette.ADAPTIVE)
    checked = check_image(T.encode(pal, "PNG"), Limits())
    assert checked.image.size == (800, 500) and (checked.width, checked.height) == (3200, 2000)
    buf = io.BytesIO()
    grey = (np.asarray(T.photo(922, (3200, 2000)).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey).save(buf, "PNG")
    checked = check_image(buf.getvalue(), Limits())
    assert checked.image.mode == "L" and checked.image.size == (800, 500)
    sig = np.frombuffer(D.fingerprint(checked.image).signature, np.uint8)
    assert 40 < sig.mean() < 215  # scaled to 8 bits, not clipped to white


def test_hostile_large_images_still_refused(big_jpegs: list[bytes]) -> None:
    data = big_jpegs[0]
    for cut in (len(data) // 2, len(data) - 4000):
        with pytest.raises(ProtocolError) as err:
            check_image(data[:cut], Limits())  # truncated: the draft decode still reads every scan
        assert err.value.code == "bad_image"
    prog = io.BytesIO()
    _full_decode(data).save(prog, "JPEG", progressive=True, quality=80)
    with pytest.raises(ProtocolError) as err:
        check_image(prog.getvalue()[: prog.tell() // 2], Limits())
    assert err.value.code == "bad_image"
    with pytest.raises(ProtocolError) as err:
        check_image(data, Limits(max_pixels=BIG[0] * BIG[1] - 1))  # the cap is on the full size
    assert err.value.code == "too_large"


def test_bench_collect_quick_reports_both_paths() -> None:
    """bench/gallery.py's collect() (read by bench/report.py) measures both decodes side by side, and the service's CPU."""
    import sys

    repo = str(Path(__file__).resolve().parent.parent)
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from bench import gallery as bench_gallery

    figures = bench_gallery.collect(True)
    for key in ("ingest_reduced_ms", "ingest_full_decode_ms", "ingest_decode_speedup", "ingest_inproc_img_s",
                "ingest_server_cpu_ms", "ingest_server_cpu_before_ms"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert isinstance(figures["cpu"], str) and figures["cpu"]
