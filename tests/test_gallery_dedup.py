"""Near-duplicate detection: scenery's phash, the crop-tolerant check, the index."""
from __future__ import annotations

import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from gallery_bridge import dedup as D
from tests import gallery_helpers as T


def _recompress(img: Image.Image, quality: int = 60) -> Image.Image:
    return Image.open(io.BytesIO(T.encode(img, quality=quality)))


def _dedup_with(*stored: Image.Image, **cfg) -> D.Deduplicator:
    sigs: dict[int, bytes] = {}
    dd = D.Deduplicator(D.DedupConfig(**cfg), sigs.get)
    for i, img in enumerate(stored, start=1):
        fp = D.fingerprint(img)
        sigs[i] = fp.signature
        dd.add(i, fp)
    return dd


def _originals() -> dict[str, Image.Image]:
    out = {f"photo{s}": T.photo(s) for s in range(2)}
    out["scene"] = T.scene_view(3)
    skdata = pytest.importorskip("skimage.data", reason="scikit-image sample photos (models extra) not installed")
    for name in ("astronaut", "coffee", "rocket"):
        out[name] = Image.fromarray(getattr(skdata, name)())
    out["motorcycle"] = Image.fromarray(skdata.stereo_motorcycle()[0])
    return out


def test_phash_is_scenery_compatible() -> None:
    img = T.photo(1)
    fp = D.fingerprint(img)
    # scenery: imagehash.phash(hash_size=24) of a 96x96 grey image = 576 bits.
    ref = imagehash.phash(img.convert("L").resize((96, 96), Image.Resampling.LANCZOS), hash_size=24)
    assert len(ref.hash.reshape(-1)) == 576
    assert fp.phash_hex == str(ref)
    assert np.array_equal(D.words_from_hex(fp.phash_hex), fp.phash)


COPIES = {
    "resized+recompressed": lambda im: _recompress(im.resize((im.width // 2, im.height // 2)), 60),
    "recompressed q40": lambda im: _recompress(im, 40),
    "mirrored": lambda im: ImageOps.mirror(im),
    "crop 1% left": lambda im: T.crop_fraction(im, left=0.01),
    "crop 2% top": lambda im: T.crop_fraction(im, top=0.02),
    "crop 3% right": lambda im: T.crop_fraction(im, right=0.03),
    "crop 3% split on all sides": lambda im: T.crop_fraction(im, left=0.015, right=0.015, top=0.01, bottom=0.02),
    "crop 1% + mirror": lambda im: ImageOps.mirror(T.crop_fraction(im, top=0.01, left=0.005)),
    "crop 2% + resize + recompress": lambda im: _recompress(T.crop_fraction(im, left=0.02, bottom=0.01).resize((im.width // 3, im.height // 3)), 50),
}


@pytest.mark.parametrize("copy", list(COPIES))
def test_copies_are_caught(copy: str) -> None:
    originals = _originals()
    for name, img in originals.items():
        dd = _dedup_with(*[o for o in originals.values() if o is not img], img)
        target = len(originals)  # the original was added last
        match = dd.find(D.fingerprint(COPIES[copy](img)))
        assert match is not None, f"{copy} of {name} not caught"
        assert match.entry_id == target, (name, match)


def test_crop_check_works_both_ways() -> None:
    """The cropped copy may arrive first: the full image is then the duplicate."""
    img = T.photo(4)
    dd = _dedup_with(T.crop_fraction(img, left=0.03, bottom=0.02))
    match = dd.find(D.fingerprint(img))
    assert match is not None and match.reason == "crop"


def test_scenery_phash_alone_misses_small_crops() -> None:
    """Why the crop check exists: a 2% crop is far outside the phash threshold."""
    img = T.photo(5)
    dd = _dedup_with(img, max_crop=0.0)
    assert dd.find(D.fingerprint(T.crop_fraction(img, left=0.02))) is None
    assert _dedup_with(img).find(D.fingerprint(T.crop_fraction(img, left=0.02))) is not None


def test_different_photos_of_the_same_scene_are_not_duplicates() -> None:
    """Honest negatives: same place, another photo (viewpoint, subject, light), and stereo pairs."""
    base = T.scene_view(7)
    others = {
        "camera moved 5%": T.scene_view(7, camera_x=0.05),
        "camera moved 10%": T.scene_view(7, camera_x=0.10),
        "subject moved": T.scene_view(7, subject_x=0.3),
        "other light, subject moved": T.scene_view(7, subject_x=0.65, light=0.8),
    }
    dd = _dedup_with(base)
    for label, img in others.items():
        assert dd.find(D.fingerprint(img)) is None, label
    skdata = pytest.importorskip("skimage.data", reason="scikit-image sample photos (models extra) not installed")
    left, right = skdata.stereo_motorcycle()[:2]
    # A stereo pair: the same scene from two viewpoints a few cm apart.
    assert _dedup_with(Image.fromarray(left)).find(D.fingerprint(Image.fromarray(right))) is None
    # A recrop much larger than any accidental border trim is a different picture.
    astro = Image.fromarray(skdata.astronaut())
    assert _dedup_with(astro).find(D.fingerprint(T.crop_fraction(astro, left=0.08))) is None


def test_unrelated_photos_are_not_duplicates() -> None:
    imgs = [T.photo(s) for s in range(10, 22)]
    dd = _dedup_with(*imgs[:6])
    for img in imgs[6:]:
        assert dd.find(D.fingerprint(img)) is None


def test_clip_cosine_marks_duplicates_only_when_enabled() -> None:
    rng = np.random.default_rng(0)
    feat = rng.normal(size=512).astype(np.float32)
    near = feat + 0.05 * rng.normal(size=512).astype(np.float32)
    sigs = {1: D.fingerprint(T.photo(30)).signature}
    on = D.Deduplicator(D.DedupConfig(clip_threshold=0.95), sigs.get)
    off = D.Deduplicator(D.DedupConfig(), sigs.get)
    for dd in (on, off):
        dd.add(1, D.fingerprint(T.photo(30)), feat)
    query = D.fingerprint(T.photo(31))
    match = on.find(query, near)
    assert match is not None and match.reason == "clip" and match.score > 0.95
    assert off.find(query, near) is None
    assert on.find(query, rng.normal(size=512).astype(np.float32)) is None
    assert on.find(query, np.ones(256, np.float32)) is None  # other dimension: no comparison


def test_hash_index_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    n = 5000
    hashes = rng.integers(0, 2**63, size=(n, D.PHASH_WORDS), dtype=np.int64).view(np.uint64)
    idx = D.HashIndex(D.PHASH_WORDS, capacity=16)
    for i in range(100):
        idx.add(i, hashes[i])
    idx.add_many(np.arange(100, n), hashes[100:])
    query = hashes[1234].copy()
    query[0] ^= np.uint64(0b1011)  # 3 bits away from entry 1234
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    qbits = np.unpackbits(query.view(np.uint8))
    brute = (bits != qbits).sum(axis=1)
    assert np.array_equal(idx.distances(query), brute)
    assert idx.search([query], 64) == [(1234, 3)]
    idx.remove(1234)
    assert len(idx) == n - 1 and idx.search([query], 64) == []


def test_prefix_pruned_search_is_exact() -> None:
    """search() reads only a prefix for most entries; it must agree with the full distances."""
    rng = np.random.default_rng(2)
    n = 3000
    base = rng.integers(0, 2**63, size=D.PHASH_WORDS, dtype=np.int64).view(np.uint64)
    hashes = rng.integers(0, 2**63, size=(n, D.PHASH_WORDS), dtype=np.int64).view(np.uint64)
    # Plant near neighbours at known distances, some with all their differences in the prefix.
    for i, flips in enumerate((0, 10, 40, 63, 64, 65, 90)):
        h = base.copy()
        bits = rng.choice(576 if i % 2 else 192, size=flips, replace=False)
        for b in bits:
            h[b // 64] ^= np.uint64(1) << np.uint64(63 - b % 64)
        hashes[100 * i] = h
    idx = D.HashIndex(D.PHASH_WORDS)
    idx.add_many(np.arange(n), hashes)
    mirror = rng.integers(0, 2**63, size=D.PHASH_WORDS, dtype=np.int64).view(np.uint64)
    full = idx.distances(base, mirror)
    expected = sorted((int(full[i]), i) for i in np.flatnonzero(full <= 64))
    got = idx.search([base, mirror], 64, limit=50)
    assert [(d, i) for i, d in got] == expected
    assert [d for d, _ in expected] == [0, 10, 40, 63, 64]
