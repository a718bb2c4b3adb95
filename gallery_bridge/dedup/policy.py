"""Dedup policy: which existing entry, if any, a new image duplicates, cheapest signal first.

Three signals (sha256 lives in the catalogue):

1. ``phash`` within Hamming ``phash_threshold`` (64), also against the
   mirrored image (:mod:`.fingerprint`, searched in :mod:`.index`);
2. crop-tolerant: coarse-hash candidates at a loose threshold, verified by
   :mod:`.crop` (gate correlation, then the border-crop alignment);
3. CLIP cosine similarity of the features anti_sus sent, when enabled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .crop import coarse_correlation, crop_correlation
from .fingerprint import PHASH_WORDS, Fingerprint
from .index import FeatureIndex, HashIndex


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
    """Hamming distance on the 576-bit phash, mirror included (``--phash-threshold``)."""
    coarse_threshold: int = 18
    """Hamming distance on the 64-bit coarse hash that makes an entry a crop candidate."""
    crop_correlation: float = 0.94
    """Band-pass correlation above which a border-cropped copy is a duplicate (``--crop-threshold``)."""
    max_crop: float = 0.04
    """Largest border crop (fraction per axis) the crop check tries; 0 disables it (``--max-crop``)."""
    gate_correlation: float = 0.6
    """24x24 block-mean correlation a candidate needs before the costly crop alignment."""
    clip_threshold: float | None = None
    """Cosine of CLIP features above which an image is a duplicate; None disables it (``--clip-threshold``)."""
    max_candidates: int = 8
    """Coarse-hash candidates verified per query (and per mirror)."""
    have_threshold: int = 3
    """Hamming distance on the 64-bit coarse hash within which the ``have`` op answers "near"
    for an item that carries no 576-bit phash.

    Far stricter than ``coarse_threshold`` (a candidate there is verified; a
    "near" here makes nomad drop the image unseen): resized and recompressed
    copies measured 0-2 bits apart from nomad's wire image, but another photo of
    the same scene (camera moved 5 %) already 4-10, unrelated photos 18 or more.
    Items with the 576-bit phash (nomad sends it) are judged by ``phash_threshold``
    instead, ingest's own rule.
    """


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

    def near64(self, hashes: np.ndarray) -> np.ndarray:
        """For each 64-bit pHash in ``hashes`` (uint64[k]): is a stored coarse hash within ``have_threshold``?

        For the ``have`` op; the whole batch in one pass over the index.
        """
        return self.coarse.any_within(np.asarray(hashes, dtype=np.uint64).reshape(-1, 1), self.config.have_threshold)

    def near_phash(self, words: np.ndarray) -> bool:
        """Is a stored 576-bit phash within ``phash_threshold`` of ``words``? Ingest's phash rule, for ``have``."""
        return bool(self.phash.search([words], self.config.phash_threshold, limit=1))

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
