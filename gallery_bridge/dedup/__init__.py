"""Duplicate detection for the gallery, one job per module.

* :mod:`.fingerprint` — the hashes and grey signature of one image, computed once at ingest;
* :mod:`.index` — the in-memory search structures (packed hashes by Hamming
  distance, CLIP features by cosine);
* :mod:`.crop` — the crop maths: is one signature a border crop of the other;
* :mod:`.policy` — :class:`Deduplicator`: which signal, in which order, with which thresholds;
* :mod:`.have` — the ``have`` op: exact / near / new from a sha256 and a 64-bit pHash.

The names callers use are re-exported here (``from gallery_bridge.dedup import
DedupConfig, fingerprint``).
"""
from __future__ import annotations

from .crop import coarse_correlation, crop_correlation
from .fingerprint import COARSE_SIZE, PHASH_SIZE, PHASH_WORDS, SIG_SIDE, Fingerprint, fingerprint, grey_signature
from .fingerprint import have_hashes, pack_bits_hex, phash64, words_from_hex
from .index import FeatureIndex, HashIndex, normalise
from .policy import DedupConfig, Deduplicator, Match

__all__ = [
    "COARSE_SIZE", "PHASH_SIZE", "PHASH_WORDS", "SIG_SIDE", "Fingerprint", "fingerprint", "grey_signature",
    "have_hashes", "pack_bits_hex", "phash64", "words_from_hex", "FeatureIndex", "HashIndex", "normalise", "coarse_correlation",
    "crop_correlation", "DedupConfig", "Deduplicator", "Match",
]
