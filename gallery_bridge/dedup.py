"""Duplicate detection: perceptual hashes, a crop-tolerant check and a fast index.

Three signals, cheapest first (sha256 lives in the catalogue):

* ``phash``: scenery's 576-bit DCT hash (imagehash ``phash`` with hash_size 24
  from a 96x96 grey image) within Hamming ``phash_threshold`` (64), also against
  the mirrored image. Compatible with what scenery stores.
* crop-tolerant: that hash moves ~100 bits when 1 % of a border is cut off, so a
  second stage looks for small crops explicitly. A coarse 64-bit DCT hash (8x8
  from 32x32, only the lowest frequencies, which a few-percent crop barely moves)
  picks candidates at a loose threshold; each candidate is then verified by
  aligning the two 96x96 grey signatures over a grid of border crops (on either
  side, up to ``max_crop`` per axis) and requiring a high normalised correlation
  of their band-pass (edge) images.
  Different photos of one scene (another viewpoint, a subject that moved) do
  not line up under any border crop, so they stay apart.
* CLIP cosine similarity of the features anti_sus sent, when enabled.

The index keeps hashes as packed uint64 words and compares a query against all
of them with vectorised XOR + ``np.bitwise_count``: no Python loop per entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import imagehash
import numpy as np
from PIL import Image, ImageOps

SIG_SIDE = 96
"""Side of the grey signature (scenery hashes a 96x96 grey image)."""
PHASH_SIZE = 24
"""576-bit hash: 24x24 lowest DCT coefficients of the 96x96 image (highfreq_factor 4)."""
PHASH_WORDS = PHASH_SIZE * PHASH_SIZE // 64
COARSE_SIZE = 8
"""64-bit hash of the 8x8 lowest DCT coefficients of a 32x32 image: robust to small crops."""
_VERIFY_SIDE = 48


@dataclass(frozen=True)
class Fingerprint:
    """Everything dedup needs about one image, computed once at ingest."""

    phash: np.ndarray  # uint64[PHASH_WORDS]
    phash_mirror: np.ndarray  # uint64[PHASH_WORDS]
    coarse: np.ndarray  # uint64[1]
    coarse_mirror: np.ndarray  # uint64[1]
    signature: bytes  # 96x96 uint8 grey, row major

    @property
    def phash_hex(self) -> str:
        """The 576-bit hash as imagehash writes it (144 hex digits), scenery's notation."""
        return pack_bits_hex(self.phash)


def _bits_to_words(bits: np.ndarray) -> np.ndarray:
    """bool[...] flattened (imagehash order) -> big-endian-packed uint64 words."""
    packed = np.packbits(bits.reshape(-1).astype(np.uint8))
    return packed.view(">u8").astype(np.uint64)


def pack_bits_hex(words: np.ndarray) -> str:
    """uint64 words -> hex string in imagehash's bit order."""
    return words.astype(">u8").tobytes().hex()


def words_from_hex(text: str) -> np.ndarray:
    """Inverse of :func:`pack_bits_hex`."""
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


def grey_signature(image: Image.Image) -> Image.Image:
    """The 96x96 grey image scenery's hash is computed from (EXIF orientation applied)."""
    image = ImageOps.exif_transpose(image)
    # Exactly imagehash's own steps (convert, one LANCZOS resize), so the hash is
    # bit for bit what scenery computes; no reducing_gap shortcut.
    grey = image.convert("L")
    return grey.resize((SIG_SIDE, SIG_SIDE), Image.Resampling.LANCZOS)


def fingerprint(image: Image.Image) -> Fingerprint:
    """Compute all hashes and the signature of a decoded image."""
    sig = grey_signature(image)
    mirror = ImageOps.mirror(sig)
    ph = imagehash.phash(sig, hash_size=PHASH_SIZE, highfreq_factor=SIG_SIDE // PHASH_SIZE)
    phm = imagehash.phash(mirror, hash_size=PHASH_SIZE, highfreq_factor=SIG_SIDE // PHASH_SIZE)
    co = imagehash.phash(sig, hash_size=COARSE_SIZE, highfreq_factor=4)
    com = imagehash.phash(mirror, hash_size=COARSE_SIZE, highfreq_factor=4)
    return Fingerprint(
        phash=_bits_to_words(ph.hash),
        phash_mirror=_bits_to_words(phm.hash),
        coarse=_bits_to_words(co.hash),
        coarse_mirror=_bits_to_words(com.hash),
        signature=sig.tobytes(),
    )


class HashIndex:
    """Packed binary hashes with ids; Hamming-distance search over all of them at once."""

    def __init__(self, words: int, capacity: int = 1024) -> None:
        self.words = words
        self._hashes = np.zeros((capacity, words), dtype=np.uint64)
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, entry_id: int, words: np.ndarray) -> None:
        """Append one hash (amortised O(1): capacity doubles)."""
        if self._n == len(self._ids):
            cap = max(1024, 2 * len(self._ids))
            self._hashes = np.resize(self._hashes, (cap, self.words))
            self._ids = np.resize(self._ids, cap)
        self._hashes[self._n] = words
        self._ids[self._n] = entry_id
        self._n += 1

    def add_many(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Bulk load (startup, benchmarks)."""
        ids = np.asarray(ids, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(len(ids), self.words)
        need = self._n + len(ids)
        if need > len(self._ids):
            cap = max(1024, need)
            self._hashes = np.resize(self._hashes, (cap, self.words))
            self._ids = np.resize(self._ids, cap)
        self._hashes[self._n:need] = hashes
        self._ids[self._n:need] = ids
        self._n = need

    def remove(self, entry_id: int) -> None:
        """Drop every hash of an entry (rare: rollback of a failed write)."""
        keep = self._ids[: self._n] != entry_id
        kept = int(keep.sum())
        self._hashes[:kept] = self._hashes[: self._n][keep]
        self._ids[:kept] = self._ids[: self._n][keep]
        self._n = kept

    def distances(self, query: np.ndarray) -> np.ndarray:
        """Hamming distance from ``query`` to every stored hash (uint16[n])."""
        hashes = self._hashes[: self._n]
        if self.words == 1:
            return np.bitwise_count(hashes[:, 0] ^ query[0]).astype(np.uint16)
        acc = np.zeros(self._n, dtype=np.uint16)
        # Word by word keeps the temporaries at n elements instead of n*words.
        for w in range(self.words):
            acc += np.bitwise_count(hashes[:, w] ^ query[w])
        return acc

    def search(self, queries: Iterable[np.ndarray], max_distance: int, limit: int = 16) -> list[tuple[int, int]]:
        """(entry_id, distance) of hashes within ``max_distance`` of any query, nearest first."""
        if self._n == 0:
            return []
        best: np.ndarray | None = None
        for q in queries:
            d = self.distances(np.asarray(q, dtype=np.uint64))
            best = d if best is None else np.minimum(best, d)
        assert best is not None
        hits = np.flatnonzero(best <= max_distance)
        if len(hits) > limit:
            hits = hits[np.argpartition(best[hits], limit)[:limit]]
        order = hits[np.argsort(best[hits], kind="stable")]
        return [(int(self._ids[i]), int(best[i])) for i in order]


class FeatureIndex:
    """L2-normalised CLIP features; cosine similarity by one matrix-vector product."""

    def __init__(self) -> None:
        self.dim: int | None = None
        self._feats = np.zeros((0, 0), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, entry_id: int, features: np.ndarray) -> bool:
        """Store one vector; False (ignored) when its dimension differs from the index's."""
        vec = normalise(features)
        if self.dim is None:
            self.dim = len(vec)
            self._feats = np.zeros((1024, self.dim), dtype=np.float32)
            self._ids = np.zeros(1024, dtype=np.int64)
        if len(vec) != self.dim:
            return False
        if self._n == len(self._ids):
            self._feats = np.resize(self._feats, (2 * self._n, self.dim))
            self._ids = np.resize(self._ids, 2 * self._n)
        self._feats[self._n] = vec
        self._ids[self._n] = entry_id
        self._n += 1
        return True

    def remove(self, entry_id: int) -> None:
        keep = self._ids[: self._n] != entry_id
        kept = int(keep.sum())
        self._feats[:kept] = self._feats[: self._n][keep]
        self._ids[:kept] = self._ids[: self._n][keep]
        self._n = kept

    def best(self, features: np.ndarray) -> tuple[int, float] | None:
        """(entry_id, cosine) of the most similar stored vector, or None."""
        if self._n == 0 or self.dim != len(features):
            return None
        sims = self._feats[: self._n] @ normalise(features)
        i = int(np.argmax(sims))
        return int(self._ids[i]), float(sims[i])


def normalise(features: np.ndarray) -> np.ndarray:
    """float32 unit vector (zero vectors stay zero)."""
    vec = np.asarray(features, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


# ---- crop-tolerant verification ------------------------------------------------

def _crop_pairs(max_crop: float, step: float) -> list[tuple[float, float]]:
    """(cut at start, cut at end) fractions of one axis whose sum is at most max_crop."""
    n = int(round(max_crop / step))
    return [(a * step, b * step) for a in range(n + 1) for b in range(n + 1 - a)]


def _resample_matrix(n_in: int, n_out: int, start: float, end: float) -> np.ndarray:
    """Linear (triangle-filter) resampling of the window [start, end) of n_in samples to n_out.

    The same filter Pillow's BILINEAR resize uses, as a matrix, so that hundreds of
    crop windows can be resampled by a few batched matrix products.
    """
    scale = (end - start) / n_out
    support = max(scale, 1.0)
    centres = start + (np.arange(n_out) + 0.5) * scale
    pos = np.arange(n_in) + 0.5
    w = np.clip(1.0 - np.abs(pos[None, :] - centres[:, None]) / support, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row zero-mean and unit-norm, so that a dot product is a correlation."""
    x = x - x.mean(axis=-1, keepdims=True)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-6)


def _blur(x: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 separable blur over the last two axes (edges replicated)."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    y = 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]
    return 0.25 * y[..., :, :-2] + 0.5 * y[..., :, 1:-1] + 0.25 * y[..., :, 2:]


def _band_pass(x: np.ndarray) -> np.ndarray:
    """Difference of Gaussians: keeps edges and texture, drops shading and pixel noise.

    Raw correlation is dominated by smooth shading (sky, gradients), which two
    photos of one scene share even from another viewpoint; the band-pass
    image is what moves under parallax or a moved subject, and what a copy
    keeps. Measured on the test cases: copies >= 0.986, other photos <= 0.88.
    """
    b = _blur(x)
    return b - _blur(_blur(b))


_MATRIX_CACHE: dict[tuple[float, float], np.ndarray] = {}


def _windows(pairs: list[tuple[float, float]]) -> np.ndarray:
    """Stacked resampling matrices (len(pairs), VERIFY, SIG) for the crop pairs."""
    key = (pairs[-1][0], float(len(pairs)))
    if key not in _MATRIX_CACHE:
        side = float(SIG_SIDE)
        _MATRIX_CACHE[key] = np.stack(
            [_resample_matrix(SIG_SIDE, _VERIFY_SIDE, a * side, side - b * side) for a, b in pairs]
        )
    return _MATRIX_CACHE[key]


def crop_correlation(query_sig: bytes, stored_sig: bytes, *, max_crop: float = 0.04, step: float = 0.01, mirror: bool = False) -> float:
    """Best correlation of two signatures over border crops of either one.

    One of the two images may be the other with up to ``max_crop`` of each axis
    cut away (split between both borders in ``step`` increments). For each
    hypothesis the larger image's matching window is resampled to the full
    frame and compared with the other image by normalised correlation; the best
    value over all hypotheses (and both directions) is returned.
    """
    q = np.frombuffer(query_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    s = np.frombuffer(stored_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    if mirror:
        q = q[:, ::-1]
    pairs = _crop_pairs(max_crop, step)
    mats = _windows(pairs)  # (P, V, S); pairs[0] is (0, 0): the whole frame
    full = mats[0]
    best = -1.0
    for big, small in ((s, q), (q, s)):
        small_vec = _unit_rows(_band_pass(full @ small @ full.T).reshape(1, -1))[0]
        # Rows first for every vertical pair, then columns for every horizontal
        # pair: (P, V, S) -> (P, P, V, V) windows in two batched products.
        rows = mats @ big  # (P, V, S)
        wins = np.einsum("ays,bxs->abyx", rows, mats, optimize=True)
        wins = _band_pass(wins.reshape(len(pairs) * len(pairs), _VERIFY_SIDE, _VERIFY_SIDE))
        flat = _unit_rows(wins.reshape(len(pairs) * len(pairs), -1))
        best = max(best, float(np.max(flat @ small_vec)))
    return best


@dataclass(frozen=True)
class Match:
    """Why an image counts as a duplicate of an existing entry."""

    entry_id: int
    reason: str  # "phash", "phash_mirror", "crop", "clip"
    score: float


@dataclass
class DedupConfig:
    """Thresholds; defaults match scenery for the phash."""

    phash_threshold: int = 64
    coarse_threshold: int = 18
    crop_correlation: float = 0.94
    max_crop: float = 0.04
    clip_threshold: float | None = None  # cosine; None disables the CLIP check
    max_candidates: int = 8


class Deduplicator:
    """The in-memory indexes of one gallery; the catalogue is the durable copy."""

    def __init__(self, config: DedupConfig, signature_of: Callable[[int], bytes | None]) -> None:
        self.config = config
        self.phash = HashIndex(PHASH_WORDS)
        self.coarse = HashIndex(1)
        self.features = FeatureIndex()
        self._signature_of = signature_of

    def add(self, entry_id: int, fp: Fingerprint, features: np.ndarray | None = None) -> None:
        self.phash.add(entry_id, fp.phash)
        self.coarse.add(entry_id, fp.coarse)
        if features is not None:
            self.features.add(entry_id, features)

    def remove(self, entry_id: int) -> None:
        self.phash.remove(entry_id)
        self.coarse.remove(entry_id)
        self.features.remove(entry_id)

    def find(self, fp: Fingerprint, features: np.ndarray | None = None) -> Match | None:
        """The existing entry this image duplicates, or None."""
        cfg = self.config
        # Stored hashes are of unmirrored images; comparing the query's mirror
        # against them is the same as comparing the query against stored mirrors.
        for words, reason in ((fp.phash, "phash"), (fp.phash_mirror, "phash_mirror")):
            hits = self.phash.search([words], cfg.phash_threshold, limit=1)
            if hits:
                return Match(hits[0][0], reason, float(hits[0][1]))
        if cfg.max_crop > 0:
            seen: set[tuple[int, bool]] = set()
            for words, mirror in ((fp.coarse, False), (fp.coarse_mirror, True)):
                for entry_id, _dist in self.coarse.search([words], cfg.coarse_threshold, limit=cfg.max_candidates):
                    if (entry_id, mirror) in seen:
                        continue
                    seen.add((entry_id, mirror))
                    stored = self._signature_of(entry_id)
                    if stored is None:
                        continue
                    corr = crop_correlation(fp.signature, stored, max_crop=cfg.max_crop, mirror=mirror)
                    if corr >= cfg.crop_correlation:
                        return Match(entry_id, "crop", corr)
        if features is not None and cfg.clip_threshold is not None:
            hit = self.features.best(features)
            if hit is not None and hit[1] >= cfg.clip_threshold:
                return Match(hit[0], "clip", hit[1])
        return None
