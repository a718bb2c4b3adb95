"""Duplicate detection: perceptual hashes, a crop-tolerant check and a fast index.

Three signals, cheapest first (sha256 lives in the catalogue):

* ``phash``: scenery's 576-bit DCT hash (imagehash ``phash`` with hash_size 24
  from a 96x96 grey image) within Hamming ``phash_threshold`` (64), also against
  the mirrored image. Compatible with what scenery stores.
* crop-tolerant: that hash moves ~40 bits per 1 % of border cut off (measured
  35-65), so a 2-3 % crop is out of its reach and a second stage looks for small
  crops explicitly. A coarse 64-bit DCT hash (8x8 from 32x32, only the lowest
  frequencies, which a few-percent crop barely moves) picks candidates at a
  loose threshold; a 24x24 correlation gate drops unrelated ones; each survivor
  is verified by aligning the two 96x96 grey signatures over a grid of border
  crops (of either image, up to ``max_crop`` per axis) and requiring a high
  normalised correlation of their band-pass (edge) images.
  Different photos of one scene (another viewpoint, a subject that moved) do
  not line up under any border crop, so they stay apart.
* CLIP cosine similarity of the features anti_sus sent, when enabled.

The index keeps hashes as packed uint64 words and compares a query against all
of them with vectorised XOR + ``np.bitwise_count``: no Python loop per entry.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import imagehash
import numpy as np
from PIL import Image, ImageOps

from .validate import to_8bit

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
    image = to_8bit(ImageOps.exif_transpose(image))
    # Exactly imagehash's own steps (convert, one LANCZOS resize), so the hash is
    # bit for bit what scenery computes; no reducing_gap shortcut. 16-bit grey
    # is scaled first (to_8bit): convert("L") would clip it to white.
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
    """Packed binary hashes with ids; Hamming-distance search over all of them at once.

    Stored word-major (``words x capacity``): each 64-bit word of every hash is
    one contiguous array, so a query is ``words`` passes of XOR + popcount over
    contiguous memory, done in cache-sized blocks; a query reads only the
    first words of every hash (see ``PREFIX_WORDS``). bench/gallery.py
    measures it at 10k, 100k and 1M hashes.
    """

    BLOCK = 1 << 15

    def __init__(self, words: int, capacity: int = 1024) -> None:
        self.words = words
        self._cols = np.zeros((words, capacity), dtype=np.uint64)
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _reserve(self, need: int) -> None:
        if need <= self._ids.shape[0]:
            return
        cap = max(1024, need, 2 * self._ids.shape[0])
        cols = np.zeros((self.words, cap), dtype=np.uint64)
        cols[:, : self._n] = self._cols[:, : self._n]
        ids = np.zeros(cap, dtype=np.int64)
        ids[: self._n] = self._ids[: self._n]
        self._cols, self._ids = cols, ids

    def add(self, entry_id: int, words: np.ndarray) -> None:
        """Append one hash (amortised O(1): capacity doubles)."""
        self._reserve(self._n + 1)
        self._cols[:, self._n] = np.asarray(words, dtype=np.uint64).reshape(self.words)
        self._ids[self._n] = entry_id
        self._n += 1

    def add_many(self, ids: np.ndarray, hashes: np.ndarray) -> None:
        """Bulk load (startup, benchmarks): ``hashes`` is (n, words)."""
        ids = np.asarray(ids, dtype=np.int64)
        hashes = np.asarray(hashes, dtype=np.uint64).reshape(len(ids), self.words)
        need = self._n + len(ids)
        self._reserve(need)
        self._cols[:, self._n:need] = hashes.T
        self._ids[self._n:need] = ids
        self._n = need

    def remove(self, entry_id: int) -> None:
        """Drop every hash of an entry (rare: rollback of a failed write)."""
        keep = np.flatnonzero(self._ids[: self._n] != entry_id)
        kept = len(keep)
        self._cols[:, :kept] = self._cols[:, keep]
        self._ids[:kept] = self._ids[keep]
        self._n = kept

    PREFIX_WORDS = 3
    """Words scanned for every entry before the rest: 192 bits of unrelated hashes sit
    ~96 +- 7 apart, so a prefix already over a threshold of 64 rules an entry out
    and the remaining words are read for a handful of entries only."""

    def _scan(self, qs: list[np.ndarray], words: int) -> np.ndarray:
        """Min over queries of the distance on the first ``words`` words, for every entry."""
        n, block = self._n, self.BLOCK
        out = np.empty(n, dtype=np.uint16)
        xor = np.empty(block, dtype=np.uint64)
        cnt = np.empty(block, dtype=np.uint8)
        acc = np.empty((len(qs), block), dtype=np.uint16)
        # Block by block so that the temporaries stay in cache; no Python loop per entry.
        for start in range(0, n, block):
            stop = min(n, start + block)
            m = stop - start
            acc[:, :m] = 0
            for w in range(words):
                col = self._cols[w, start:stop]
                for k, q in enumerate(qs):
                    np.bitwise_xor(col, q[w], out=xor[:m])
                    np.bitwise_count(xor[:m], out=cnt[:m])
                    np.add(acc[k, :m], cnt[:m], out=acc[k, :m])
            np.min(acc[:, :m], axis=0, out=out[start:stop])
        return out

    def distances(self, *queries: np.ndarray) -> np.ndarray:
        """Hamming distance from the nearest of ``queries`` to every stored hash (uint16[n]).

        Several queries (an image and its mirror) share one pass over memory:
        at a million hashes the scan is bound by memory bandwidth, not popcount.
        """
        qs = [np.asarray(q, dtype=np.uint64).reshape(self.words) for q in queries]
        return self._scan(qs, self.words)

    def search(self, queries: Iterable[np.ndarray], max_distance: int, limit: int = 16) -> list[tuple[int, int]]:
        """(entry_id, distance) of hashes within ``max_distance`` of any query, nearest first."""
        qs = [np.asarray(q, dtype=np.uint64).reshape(self.words) for q in queries]
        if self._n == 0 or not qs:
            return []
        prefix = min(self.PREFIX_WORDS, self.words)
        # A prefix distance is a lower bound of the full one (for each query,
        # hence for their minimum): entries over the threshold are out for sure.
        bound = self._scan(qs, prefix)
        cand = np.flatnonzero(bound <= max_distance)
        if prefix < self.words and len(cand):
            cols = self._cols[:, cand]  # only the survivors' words
            full = np.stack([np.bitwise_count(cols ^ q[:, None]).sum(axis=0, dtype=np.uint16) for q in qs]).min(axis=0)
        else:
            full = bound[cand]
        keep = full <= max_distance
        cand, full = cand[keep], full[keep]
        if len(cand) > limit:
            part = np.argpartition(full, limit)[:limit]
            cand, full = cand[part], full[part]
        order = np.argsort(full, kind="stable")
        return [(int(self._ids[cand[i]]), int(full[i])) for i in order]

    def hash_of(self, entry_id: int) -> np.ndarray | None:
        """The stored hash of an entry (first match), for explaining a hit."""
        pos = np.flatnonzero(self._ids[: self._n] == entry_id)
        return self._cols[:, pos[0]].copy() if len(pos) else None


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


def _blur_matrix(n: int) -> np.ndarray:
    """[1, 2, 1]/4 blur along one axis as an n x n matrix (edges replicated)."""
    b = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        for j, w in ((i - 1, 0.25), (i, 0.5), (i + 1, 0.25)):
            b[i, min(max(j, 0), n - 1)] += w
    return b


_MATRIX_CACHE: dict[tuple[float, int], tuple[np.ndarray, np.ndarray]] = {}


def _windows(pairs: list[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per crop pair, the resampling matrix with the band-pass folded in: two terms.

    The band-pass is a difference of Gaussians, ``G1 - G3`` with ``G1`` the
    [1, 2, 1] blur and ``G3`` that blur applied three times. Both are
    separable, so a band-passed window of ``S`` is ``(B R) S (B R)^T -
    (B^3 R) S (B^3 R)^T`` for the window's resampling matrix ``R``: everything
    becomes batched matrix products, no per-window filtering.

    Raw correlation is dominated by smooth shading (sky, gradients), which two
    photos of one scene share even from another viewpoint; the band-pass
    image is what moves under parallax or a moved subject, and what a copy
    keeps. Measured on the test cases: copies >= 0.986, other photos <= 0.88.
    """
    key = (pairs[-1][0], len(pairs))
    if key not in _MATRIX_CACHE:
        side = float(SIG_SIDE)
        r = np.stack([_resample_matrix(SIG_SIDE, _VERIFY_SIDE, a * side, side - b * side) for a, b in pairs])
        blur = _blur_matrix(_VERIFY_SIDE)
        blur3 = blur @ blur @ blur
        _MATRIX_CACHE[key] = (blur @ r, blur3 @ r)
    return _MATRIX_CACHE[key]


def _band_passed(m1: np.ndarray, m3: np.ndarray, img: np.ndarray) -> np.ndarray:
    """All crop windows of ``img``, band-passed, materialised: (P*P, V*V).

    The direct computation; :func:`_window_correlations` gets the same
    correlations without building the windows (tests compare the two).
    """
    p, v, side = m1.shape
    out = np.zeros((p * v, p * v), dtype=np.float32)
    for m, sign in ((m1, 1.0), (m3, -1.0)):
        flat = m.reshape(p * v, side)
        out += sign * ((flat @ img) @ flat.T)
    return out.reshape(p, v, p, v).transpose(0, 2, 1, 3).reshape(p * p, v * v)


def _window_correlations(m1: np.ndarray, m3: np.ndarray, big: np.ndarray, small_unit: np.ndarray) -> np.ndarray:
    """Correlation of every band-passed crop window of ``big`` with ``small_unit`` (P x P).

    A window is ``W_ab = A - B`` with ``A = m1[a] S m1[b]^T`` and
    ``B = m3[a] S m3[b]^T``. Its dot product with the (zero-mean, unit) query,
    its sum and its sum of squares are all bilinear in per-row and per-column
    factors, so each is one small matrix product over the P crop pairs:

    * dot:   <m[a] S, Q m[b]>
    * sum:   (m[a]^T 1)^T S (m[b]^T 1)
    * sumsq: <L_a^T L'_a, m[b]^T m'[b]> with L_a = m[a] S, for (m, m') in
      (m1, m1), (m1, m3), (m3, m3)

    About 5x fewer operations than building the P*P windows.
    """
    p, v, side = m1.shape
    q = small_unit.reshape(v, v)
    l1, l3 = m1 @ big, m3 @ big  # (P, V, S)
    dot = (l1.reshape(p, -1) @ (q @ m1).reshape(p, -1).T) - (l3.reshape(p, -1) @ (q @ m3).reshape(p, -1).T)
    u1, u3 = m1.sum(axis=1), m3.sum(axis=1)  # (P, S): m^T 1
    total = u1 @ big @ u1.T - u3 @ big @ u3.T

    def gram(la: np.ndarray, lb: np.ndarray, ma: np.ndarray, mb: np.ndarray) -> np.ndarray:
        g = (la.transpose(0, 2, 1) @ lb).reshape(p, -1)  # (P, S*S)
        h = (ma.transpose(0, 2, 1) @ mb).reshape(p, -1)
        return g @ h.T

    sumsq = gram(l1, l1, m1, m1) - 2.0 * gram(l1, l3, m1, m3) + gram(l3, l3, m3, m3)
    var = np.maximum(sumsq - total * total / (v * v), 1e-6)
    return dot / np.sqrt(var)


_BLAS: object | None = None


def _one_blas_thread() -> ContextManager[object]:
    """Run BLAS single-threaded for the verification's small products.

    The matrices are at most 96 x 720: threads only add synchronisation, and on a
    small box shared with anti_sus, OpenBLAS's spinning threads made one
    verification 50x slower (measured: 13 ms -> 1.2 s under load).
    threadpoolctl comes with scikit-learn; without it this is a no-op.
    """
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except ImportError:  # pragma: no cover
            _BLAS = False
    if _BLAS is False:
        return contextlib.nullcontext()
    return _BLAS.limit(limits=1, user_api="blas")  # type: ignore[union-attr]


def crop_correlation(query_sig: bytes, stored_sig: bytes, *, max_crop: float = 0.04, step: float = 0.01, mirror: bool = False) -> float:
    """Best correlation of two signatures over border crops of either one.

    One of the two images may be the other with up to ``max_crop`` of each axis
    cut away (split between both borders in ``step`` increments). For each
    hypothesis the larger image's matching window is resampled to the full
    frame and compared with the other image by normalised correlation of their
    band-pass images; the best value over all hypotheses (and both
    directions) is returned.
    """
    q = np.frombuffer(query_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    s = np.frombuffer(stored_sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
    if mirror:
        q = np.ascontiguousarray(q[:, ::-1])
    pairs = _crop_pairs(max_crop, step)
    m1, m3 = _windows(pairs)  # pairs[0] is (0, 0): the whole frame
    best = -1.0
    with _one_blas_thread():
        for big, small in ((s, q), (q, s)):
            whole = m1[0] @ small @ m1[0].T - m3[0] @ small @ m3[0].T
            small_unit = _unit_rows(whole.reshape(1, -1))[0]
            best = max(best, float(np.max(_window_correlations(m1, m3, big, small_unit))))
    return best


def coarse_correlation(query_sig: bytes, stored_sig: bytes, mirror: bool = False) -> float:
    """Correlation of 24x24 block means: a cheap gate before :func:`crop_correlation`.

    Copies cropped by up to 4% per axis still score >= 0.74 here, while most
    unrelated pairs score far lower, so most random candidates stop here.
    """
    vecs = []
    for sig, flip in ((query_sig, mirror), (stored_sig, False)):
        a = np.frombuffer(sig, dtype=np.uint8).reshape(SIG_SIDE, SIG_SIDE).astype(np.float32)
        if flip:
            a = a[:, ::-1]
        vecs.append(a.reshape(24, 4, 24, 4).mean(axis=(1, 3)).reshape(1, -1))
    return float(_unit_rows(vecs[0])[0] @ _unit_rows(vecs[1])[0])


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
    gate_correlation: float = 0.6
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
        # Features are kept in memory only when the CLIP check is on (2 KB each);
        # the catalogue stores them either way, so turning it on later works.
        if features is not None and self.config.clip_threshold is not None:
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
        hits = self.phash.search([fp.phash, fp.phash_mirror], cfg.phash_threshold, limit=1)
        if hits:
            entry_id, dist = hits[0]
            stored = self.phash.hash_of(entry_id)
            direct = int(np.bitwise_count(stored ^ fp.phash).sum()) if stored is not None else dist
            return Match(entry_id, "phash" if direct == dist else "phash_mirror", float(dist))
        if cfg.max_crop > 0:
            seen: set[tuple[int, bool]] = set()
            for words, mirror in ((fp.coarse, False), (fp.coarse_mirror, True)):
                for entry_id, _dist in self.coarse.search([words], cfg.coarse_threshold, limit=cfg.max_candidates):
                    if (entry_id, mirror) in seen:
                        continue
                    seen.add((entry_id, mirror))
                    stored = self._signature_of(entry_id)
                    if stored is None or coarse_correlation(fp.signature, stored, mirror) < cfg.gate_correlation:
                        continue
                    corr = crop_correlation(fp.signature, stored, max_crop=cfg.max_crop, mirror=mirror)
                    if corr >= cfg.crop_correlation:
                        return Match(entry_id, "crop", corr)
        if features is not None and cfg.clip_threshold is not None:
            hit = self.features.best(features)
            if hit is not None and hit[1] >= cfg.clip_threshold:
                return Match(hit[0], "clip", hit[1])
        return None
