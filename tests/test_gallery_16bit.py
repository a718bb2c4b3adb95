"""16-bit grey PNGs: scaled to 8 bits (not clipped to white) for thumbnails and hashes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests import gallery_helpers as T
from gallery_bridge.catalogue import Catalogue
from gallery_bridge.dedup import DedupConfig, fingerprint
from gallery_bridge.ingest import Ingester
from gallery_bridge.targets.folder import FolderTarget
from gallery_bridge.thumbnails import make_thumbnail
from gallery_bridge.validate import Limits, Meta, check_image, to_8bit


def png16(values: np.ndarray) -> bytes:
    """A 16-bit greyscale PNG of ``values`` (uint16)."""
    out = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(out, "PNG")
    return out.getvalue()


def photo16(seed: int) -> bytes:
    """A procedural photo as a 16-bit grey PNG using the whole 16-bit range."""
    grey = np.asarray(T.photo(seed, (400, 300)).convert("L"), dtype=np.uint16)
    return png16(grey * 257)


def test_mid_grey_16bit_png_gives_a_mid_grey_thumbnail() -> None:
    img = check_image(png16(np.full((300, 400), 32768)), Limits())
    assert img.image.mode == "I;16"  # what Pillow decodes a 16-bit grey PNG to
    thumb = Image.open(io.BytesIO(make_thumbnail(img.image)))
    assert abs(np.asarray(thumb, dtype=np.float64).mean() - 128) < 2
    sig = np.frombuffer(fingerprint(img.image).signature, dtype=np.uint8)
    assert abs(sig.mean() - 128) < 2


def test_different_16bit_photos_get_different_phashes() -> None:
    a = fingerprint(check_image(photo16(41), Limits()).image)
    b = fingerprint(check_image(photo16(42), Limits()).image)
    distance = int(np.bitwise_count(a.phash ^ b.phash).sum())
    assert distance > 64  # unrelated photos: far beyond the duplicate threshold, not 0


def test_16bit_copy_hashes_like_its_8bit_original() -> None:
    """>> 8 keeps the picture: the 16-bit PNG is a near-duplicate of the 8-bit one, and nothing else."""
    grey = T.photo(43, (400, 300)).convert("L")
    eight = fingerprint(grey)
    sixteen = fingerprint(check_image(png16(np.asarray(grey, dtype=np.uint16) * 257), Limits()).image)
    assert int(np.bitwise_count(eight.phash ^ sixteen.phash).sum()) <= 2


def test_other_modes_are_left_alone() -> None:
    rgb = T.photo(44)
    assert to_8bit(rgb) is rgb
    wide = Image.fromarray(np.full((10, 10), 70000, dtype=np.int32), "I")  # 32-bit container, clipped to 16-bit range
    assert np.asarray(to_8bit(wide)).max() == 255


def test_16bit_photos_through_the_folder_target(tmp_path: Path) -> None:
    target = FolderTarget(tmp_path / "g")
    ing = Ingester(Catalogue(target.catalogue_path), target, DedupConfig())
    try:
        first = ing.ingest("a", Meta(), check_image(photo16(45), Limits()))
        second = ing.ingest("b", Meta(), check_image(photo16(46), Limits()))
        assert (first.status, second.status) == ("added", "added")  # not duplicates of each other
        grey = ing.ingest("c", Meta(), check_image(png16(np.full((300, 400), 32768)), Limits()))
        thumb = Image.open(target.root / "thumbs" / f"{grey.gallery_id}.jpg")
        assert abs(np.asarray(thumb, dtype=np.float64).mean() - 128) < 2
    finally:
        ing.close()
